"""Batched, KV-cached sampling from a policy, and scoring of sampled responses.

Used by the SFT (self-samples), label and evaluate stages. Prompts are chats (lists of
``{role, content}``) rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from stages.config import GenerationConfig
from stages.losses import entropy_from_logits, gather_log_probs
from stages.models import process_group

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
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=generation.temperature,
                top_p=generation.top_p,
                top_k=0,
                max_new_tokens=generation.max_new_tokens,
                pad_token_id=pad_id,
                use_cache=True,
                output_logits=with_logprobs,
                return_dict_in_generate=True,
            )
            new_tokens = out.sequences[:, ids.shape[1]:]  # (b, T)
            for job, row in zip(batch, new_tokens.tolist(), strict=True):
                results[job] = _trim_response(row, eos_ids, pad_id)
            if with_logprobs:
                logprobs, entropies = _step_statistics(out.logits, new_tokens, generation.temperature)
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


def _step_statistics(step_logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per generated token: log-prob of the sampled token and entropy, both at ``temperature``.

    step_logits: T tensors (b, V), the raw logits of each generation step.
    tokens: (b, T) the sampled tokens.
    Returns two (b, T) float32 tensors.
    """
    logits = torch.stack(step_logits, dim=1).float()  # (b, T, V); bf16/fp16 under autocast, upcast
    logprobs = gather_log_probs(logits, tokens, temperature)  # (b, T)
    entropies = entropy_from_logits(logits / temperature)  # (b, T)
    return logprobs.float(), entropies.float()


@torch.no_grad()
def sequence_log_probs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], *,
                       pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Sum of the response tokens' log-probs under ``model``: (N,) float32 on the CPU.

    log pi(y|x) = sum_t log pi(y_t | x, y_<t); with the same samples scored under the policy and the
    reference, their mean difference is a Monte-Carlo estimate of KL(pi || pi_ref).
    """
    model.eval()
    device = next(model.parameters()).device
    totals: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + r for p, r in zip(prompt_ids[start : start + batch_size],
                                      response_ids[start : start + batch_size], strict=True)]
        ids, mask = _left_pad(rows, pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, L-1, V)
        labels = ids[:, 1:]  # (B, L-1)
        token_logps = gather_log_probs(logits.float(), labels)  # (B, L-1)
        response_mask = torch.zeros_like(labels, dtype=torch.bool)
        for i, r in enumerate(response_ids[start : start + batch_size]):
            if r:
                response_mask[i, -len(r):] = True
        totals.append((token_logps * response_mask).sum(-1).cpu())
    return torch.cat(totals) if totals else torch.zeros(0)


@torch.no_grad()
def reward_scores(reward_model, tokenizer, conversations: list[Messages], *, batch_size: int = 16) -> torch.Tensor:
    """The reward model's scalar score of each whole conversation: (N,) float32 on the CPU.

    Conversations are rendered with the chat template exactly as TRL's RewardTrainer renders its
    training pairs, so the score is read at the same position it was trained at.
    """
    reward_model.eval()
    device = next(reward_model.parameters()).device
    rows = [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
            for c in conversations]
    scores: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = _left_pad(rows[start : start + batch_size], tokenizer.pad_token_id, device)
        scores.append(reward_model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
