"""Batched, KV-cached sampling from a policy, and scoring of sampled responses.

Used by the SFT (self-samples), label and evaluate stages. Prompts are chats (lists of
``{role, content}``) rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList

from stages.config import GenerationConfig
from stages.losses import gather_log_probs
from stages.models import backbone, process_group

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Samples:
    """Sampled responses, one per (prompt, sample) in prompt-major order."""

    prompt_index: list[int]  # index into the prompts given to `sample`
    prompt_ids: list[list[int]]  # chat-rendered prompt tokens, no padding
    response_ids: list[list[int]]  # response tokens up to and including EOS, no padding
    texts: list[str]  # decoded responses, special tokens removed
    ended: list[bool]  # whether the response ended with EOS (not cut at max_new_tokens)
    seconds: float  # wall time of generation
    # With ``sample(..., with_logprobs=True)``: per response token, its log-prob under the sampling
    # distribution softmax(logits / temperature), and that distribution's entropy (nats).
    logprobs: list[list[float]] | None = None
    entropies: list[list[float]] | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.response_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)


def render_prompts(tokenizer, prompts: list[Messages]) -> list[list[int]]:
    return [
        list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        for messages in prompts
    ]


def pad_rows(rows: list[list[int]] | list[list[float]], pad_id: float, device: torch.device, side: str = "left",
             dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of tokens (or per-token numbers) -> (values, mask), each (B, longest row), padded with
    ``pad_id`` on ``side``; mask is bool."""
    from torch.nn.utils.rnn import pad_sequence

    ids = pad_sequence([torch.tensor(row, dtype=dtype) for row in rows], batch_first=True,
                       padding_value=pad_id, padding_side=side)
    mask = pad_sequence([torch.ones(len(row), dtype=torch.bool) for row in rows], batch_first=True,
                        padding_value=False, padding_side=side)
    return ids.to(device), mask.to(device)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_rows(rows, pad_id, device, "left")
    return ids, mask.long()


def _trim_response(tokens: list[int], eos_ids: set[int], pad_id: int) -> tuple[list[int], bool]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1], True
    return [t for t in tokens if t != pad_id] if pad_id in eos_ids else tokens, False


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[Messages],
    n: int,
    generation: GenerationConfig,
    *,
    seed: int,
    desc: str = "sampling",
    with_logprobs: bool = False,
) -> Samples:
    """Draw ``n`` responses per prompt, ``generation.batch_size`` sequences per ``generate`` call.

    Sequences are grouped by prompt length so batches carry little padding; the KV cache makes each
    new token cost one forward step over the batch. ``with_logprobs`` also returns each token's
    log-prob and the entropy at the sampling temperature, read off the logits that sampling computed
    anyway (PPO takes its pi_old from here instead of a second forward pass). Under ``accelerate launch``
    the processes take turns at the batches and then exchange their samples.
    """
    model.eval()
    device = next(model.parameters()).device
    rendered = render_prompts(tokenizer, prompts)
    jobs = sorted(((i, k) for i in range(len(prompts)) for k in range(n)), key=lambda j: len(rendered[j[0]]))
    eos_ids, pad_id = _eos_ids(model, tokenizer), tokenizer.pad_token_id
    generator_state = torch.random.get_rng_state()
    rank, world = process_group()
    results: dict[tuple[int, int], tuple[list[int], bool]] = {}
    token_stats: dict[tuple[int, int], tuple[list[float], list[float]]] = {}
    started = time.perf_counter()
    batches = list(range(0, len(jobs), generation.batch_size))
    mine = range(rank, len(batches), world)
    with tqdm(total=sum(len(jobs[batches[n] : batches[n] + generation.batch_size]) for n in mine), desc=desc,
              unit="seq") as bar:
        # each batch has its own seed: the samples do not depend on how many processes share the batches
        for number in mine:
            torch.manual_seed(seed + 1_000_003 * number)
            batch = jobs[batches[number] : batches[number] + generation.batch_size]
            ids, mask = _left_pad([rendered[i] for i, _ in batch], pad_id, device)
            sampler = TokenSampler(generation.temperature, generation.top_p, record=with_logprobs)
            config = explicit_generation_config(generation, pad_id, eos_ids,
                                                static_cache=not torch.is_autocast_enabled(device.type))
            with own_generation_defaults(model):
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                     logits_processor=LogitsProcessorList([sampler]))
            new_tokens = out.sequences[:, ids.shape[1]:]  # (b, T)
            for job, row in zip(batch, new_tokens.tolist(), strict=True):
                results[job] = _trim_response(row, eos_ids, pad_id)
            if with_logprobs:
                logprobs, entropies = sampler.statistics()  # (b, T) each
                for j, job in enumerate(batch):
                    length = len(results[job][0])
                    token_stats[job] = logprobs[j, :length].tolist(), entropies[j, :length].tolist()
            bar.update(len(batch))
    if world > 1:  # under `accelerate launch`: every process gets every sample
        shards: list = [None] * world
        torch.distributed.all_gather_object(shards, (results, token_stats))
        for shard_results, shard_stats in shards:
            results |= shard_results
            token_stats |= shard_stats
    seconds = time.perf_counter() - started
    torch.random.set_rng_state(generator_state)
    order = [(i, k) for i in range(len(prompts)) for k in range(n)]
    response_ids = [results[job][0] for job in order]
    return Samples(
        prompt_index=[i for i, _ in order],
        prompt_ids=[rendered[i] for i, _ in order],
        response_ids=response_ids,
        texts=[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in response_ids],
        ended=[results[job][1] for job in order],
        seconds=seconds,
        logprobs=[token_stats[job][0] for job in order] if with_logprobs else None,
        entropies=[token_stats[job][1] for job in order] if with_logprobs else None,
    )


def explicit_generation_config(generation: GenerationConfig, pad_id: int, eos_ids: set[int], *,
                               static_cache: bool) -> HFGenerationConfig:
    """The whole ``generate`` configuration, given explicitly instead of merged into the model's own.

    ``generate`` otherwise starts from ``model.generation_config`` (``generation_config.json``), whose
    ``repetition_penalty``, ``no_repeat_ngram_size``, ``top_k``, ``bad_words_ids``... would reshape the
    distribution that :class:`TokenSampler` draws from, so the samples would come from another
    policy than the one whose log-probs PPO trains and the KL is measured on. Greedy decoding over the
    sampler's output takes the token it drew; nothing else touches the logits.
    """
    return HFGenerationConfig(
        do_sample=False,  # the sampler draws the token; greedy decoding then takes it
        max_new_tokens=generation.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) or None,
        use_cache=True,
        # preallocated in the weights' dtype (no growing concatenation per step); autocast's keys and
        # values have another dtype, so the dynamic cache then
        cache_implementation="static" if static_cache else None,
        disable_compile=True,
        return_dict_in_generate=True,
    )


@contextmanager
def own_generation_defaults(model) -> Iterator[None]:
    """The model's ``generation_config`` replaced by transformers' global defaults for the duration.

    ``generate`` fills every key a passed config leaves unset from ``model.generation_config``, so an
    explicit config alone does not keep a model's ``repetition_penalty`` or ``no_repeat_ngram_size``
    out; with neutral defaults underneath, only what :func:`explicit_generation_config` says applies.
    """
    owners = [model, *([model.get_base_model()] if hasattr(model, "get_base_model") else [])]
    owners = [owner for owner in owners if isinstance(getattr(owner, "generation_config", None), HFGenerationConfig)]
    saved = [owner.generation_config for owner in owners]
    for owner in owners:
        owner.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        for owner, config in zip(owners, saved, strict=True):
            owner.generation_config = config


class TokenSampler(LogitsProcessor):
    """Draws each next token from softmax(logits / temperature), nucleus-filtered when ``top_p`` < 1.

    Used as ``generate``'s only logits processor with greedy decoding: it returns scores that are
    -inf except at the drawn token. It replaces transformers' sampling step for speed on CPU:
    one log-softmax per step gives the sampling distribution, the token's log-prob and the
    entropy, without keeping every step's logits, and :func:`draw` picks the token by inverse CDF
    (one uniform number per row instead of an exponential draw per vocabulary entry). The log-probs and entropies
    are of the temperature-scaled distribution before nucleus filtering, which is what PPO's
    forward passes compute. Draws use torch's global generator, so ``torch.manual_seed`` fixes them.
    """

    def __init__(self, temperature: float, top_p: float = 1.0, *, record: bool = True):
        self.temperature, self.top_p, self.record = temperature, top_p, record  # record: keep log-probs, entropies
        self.logprobs: list[torch.Tensor] = []  # per step: (b,) log-prob of the drawn token
        self.entropies: list[torch.Tensor] = []  # per step: (b,) entropy of the step's distribution

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores: (b, V) raw next-token logits -> (b, V), 0 at the drawn token and -inf elsewhere."""
        logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (b, V)
        probs = logprobs.exp()  # (b, V)
        tokens = draw(nucleus(probs, self.top_p))  # (b, 1)
        if self.record:
            self.entropies.append(-(probs * logprobs).sum(-1))
            self.logprobs.append(logprobs.gather(-1, tokens).squeeze(-1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T) float32 log-probs of the drawn tokens and (b, T) entropies, T = steps generated."""
        return torch.stack(self.logprobs, dim=1), torch.stack(self.entropies, dim=1)


def draw(weights: torch.Tensor) -> torch.Tensor:
    """(b, V) non-negative, unnormalised weights -> (b, 1) token ids drawn in proportion to them, by inverse CDF.

    ``torch.multinomial(weights, 1)`` on the CPU draws an exponential number per vocabulary entry and
    takes an argmax (118 ms per step for 64 rows of SmolLM2's 49,152 tokens, a quarter of a sampling
    pass); here it is one uniform number per row and a binary search in the float64 running sum
    (exact enough for tokens of probability 1e-12). A token of weight 0 is never drawn: its running sum
    equals its predecessor's, and the search takes the first entry above the uniform number.
    """
    cdf = weights.double().cumsum(-1)  # (b, V)
    total = cdf[:, -1:]  # (b, 1)
    u = torch.rand(total.shape, dtype=torch.float64, device=weights.device) * total  # (b, 1) in [0, total)
    tokens = torch.searchsorted(cdf, u, right=True)  # (b, 1) first index whose running sum exceeds u
    overflow = tokens == weights.shape[-1]  # (b, 1): u rounded up to total (rand() within 2**-53 of 1)
    if overflow.any():  # then the last token of weight > 0
        last = (weights > 0).long().cumsum(-1).argmax(-1, keepdim=True)  # (b, 1)
        tokens = torch.where(overflow, last, tokens)
    return tokens


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(b, V) probabilities -> the same with everything outside the top-``top_p`` nucleus set to 0.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (always at
    least the most likely token), as transformers' ``TopPLogitsWarper`` keeps it. Not renormalised:
    :func:`draw` takes unnormalised weights.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (b, V)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (b, V) mass of the more likely tokens
    keep_sorted = mass_before < top_p  # (b, V); the first token always has mass_before 0
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return torch.where(keep, probs, 0.0)


@torch.no_grad()
def sequence_log_probs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], *,
                       pad_id: int, temperature: float = 1.0, batch_size: int = 16) -> torch.Tensor:
    """Sum of the response tokens' log-probs under ``model`` at ``temperature``: (N,) float32 on the CPU.

    log pi_T(y|x) = sum_t log softmax(logits_t / T)[y_t]. With samples drawn at temperature T and
    scored under the policy and the reference at the same T, the mean difference is a Monte-Carlo
    estimate of KL(pi_T || pi_ref,T): the KL between the two distributions that actually sample
    (and the one PPO's penalty controls). T = 1 gives the models' own log-probs (DPO's implicit
    reward). Computed in float32 whatever autocast the caller runs under.
    """
    model.eval()
    device = next(model.parameters()).device
    totals: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + r for p, r in zip(prompt_ids[start : start + batch_size],
                                      response_ids[start : start + batch_size], strict=True)]
        ids, mask = _left_pad(rows, pad_id, device)
        with torch.autocast(device.type, enabled=False):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, L-1, V)
        labels = ids[:, 1:]  # (B, L-1)
        token_logps = gather_log_probs(logits.float(), labels, temperature)  # (B, L-1)
        response_mask = torch.zeros_like(labels, dtype=torch.bool)
        for i, r in enumerate(response_ids[start : start + batch_size]):
            if r:
                response_mask[i, -len(r):] = True
        totals.append((token_logps * response_mask).sum(-1).cpu())
    return torch.cat(totals) if totals else torch.zeros(0)


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Length of the longest common prefix of ``rows``, leaving every row at least one token after it."""
    length = min(len(row) for row in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return max(length, 0)


def prefix_inputs(backbone, prefix_ids: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Keyword arguments for a forward pass over ``[prefix | input_ids]`` that runs the prefix once.

    prefix_ids: (C,) tokens every row starts with; input_ids, mask: (B, L) the rest of each row,
    left-padded (mask bool or 0/1). The prefix goes through ``backbone`` (the model's transformer
    body) as a single row and its key/value cache is repeated over the batch: the rows then attend
    to it as if each had been given the prefix itself, while the projections and MLPs of the prefix
    tokens run once instead of B times. Gradients flow through the cache into the prefix
    computation. Positions count real tokens only, as ``generate`` counts them under left padding.
    With an empty prefix these are the plain inputs.
    """
    batch, prefix_length = input_ids.shape[0], prefix_ids.shape[0]
    mask = mask.long()
    inputs: dict = {"input_ids": input_ids, "use_cache": False}
    if prefix_length:
        cache = backbone(input_ids=prefix_ids[None], use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch)
        inputs |= {"past_key_values": cache, "use_cache": True}
        mask = torch.cat([mask.new_ones(batch, prefix_length), mask], dim=1)  # (B, C + L)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_length:]  # (B, L)
    return inputs | {"attention_mask": mask, "position_ids": position_ids}


@torch.no_grad()
def reward_scores(reward_model, tokenizer, conversations: list[Messages], *, batch_size: int = 16) -> torch.Tensor:
    """The reward model's scalar score of each whole conversation: (N,) float32 on the CPU.

    Conversations are rendered with the chat template exactly as TRL's RewardTrainer renders its
    training pairs, so the score is read at the same position it was trained at. The tokens all
    conversations share (system prompt, instruction) go through the model once per batch (see
    :func:`prefix_inputs`), and batches are formed by length so they carry little padding. Always
    float32, whatever autocast the caller runs under: bf16's spacing near a score of 1.7 (0.0078) is a
    sizeable part of a reward model's typical margin between two responses.
    """
    reward_model.eval()
    if not conversations:
        return torch.zeros(0)
    device = next(reward_model.parameters()).device
    rows = [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
            for c in conversations]
    prefix_length = shared_prefix_length(rows)
    prefix = torch.tensor(rows[0][:prefix_length], dtype=torch.long, device=device)  # (C,)
    body = backbone(reward_model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = torch.zeros(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = _left_pad([rows[i][prefix_length:] for i in chunk], tokenizer.pad_token_id, device)
        with torch.autocast(device.type, enabled=False):
            logits = reward_model(**prefix_inputs(body, prefix, ids, mask)).logits  # (b, 1)
        scores[chunk] = logits[:, 0].float().cpu()
    return scores


def pair_accuracy(reward_model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """A reward model on held-out preference pairs: the share whose chosen conversation outscores the
    rejected one (``eval_pair_accuracy``), the mean margin, and how many pairs (``eval_pairs``)."""
    chosen = reward_scores(reward_model, tokenizer, [r["prompt"] + r["chosen"] for r in rows])
    rejected = reward_scores(reward_model, tokenizer, [r["prompt"] + r["rejected"] for r in rows])
    margins = (chosen - rejected).tolist()
    return {
        "eval_pair_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
        "eval_reward_margin": sum(margins) / max(len(margins), 1),
        "eval_pairs": float(len(margins)),
    }


def pair_token_ids(tokenizer, rows: list[dict]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Chat-rendered (prompt ids, chosen ids, rejected ids) of preference rows: each response is the
    tokens the full conversation adds after the prompt with its generation header (what a policy
    would have generated, end-of-turn token included)."""
    prompts = render_prompts(tokenizer, [row["prompt"] for row in rows])
    responses: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
    for row, prompt_ids in zip(rows, prompts, strict=True):
        for side in responses:
            full = list(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True,
                                                      return_dict=True)["input_ids"])
            if full[: len(prompt_ids)] != prompt_ids:  # a template that renders the prompt differently
                raise ValueError(f"pair {row.get('id')!r}: the chat template renders the prompt differently "
                                 f"with a {side} reply, so the reply's tokens cannot be told apart")
            responses[side].append(full[len(prompt_ids):] or [tokenizer.eos_token_id])
    return prompts, responses["chosen"], responses["rejected"]


def implicit_pair_accuracy(policy, reference, tokenizer, rows: list[dict], *, batch_size: int = 16) -> float:
    """Judge-free: the share of held-out pairs whose implicit reward (Rafailov et al. 2023, eq. 5 without beta)
    log pi(y_w|x) - log pi_ref(y_w|x) exceeds that of y_l, i.e. the policy moved towards the chosen reply
    more than towards the rejected one. Log-probs at temperature 1, in float32."""
    prompts, chosen, rejected = pair_token_ids(tokenizer, rows)
    pad = tokenizer.pad_token_id
    margins = torch.zeros(len(rows))
    for sign, responses in ((1.0, chosen), (-1.0, rejected)):
        policy_logps = sequence_log_probs(policy, prompts, responses, pad_id=pad, batch_size=batch_size)
        reference_logps = sequence_log_probs(reference, prompts, responses, pad_id=pad, batch_size=batch_size)
        margins += sign * (policy_logps - reference_logps)  # (N,)
    return float((margins > 0).float().mean()) if len(rows) else float("nan")
