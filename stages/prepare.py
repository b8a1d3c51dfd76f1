"""Prepare stage: read a data source, normalise every row, refuse bad rows, de-duplicate, split.

Every prepared row is conversational, so every later stage can apply the model's chat template::

    preference:  {"id", "prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}
    prompt_only: {"id", "prompt": [messages]}
    sft:         {"id", "prompt": [messages], "completion": [assistant msg]}

``id`` is the first 16 hex characters of the sha256 of the row's canonical JSON (without ``id``),
so two rows with the same normalised content are duplicates.

Sources (``data.source``, resolved against ``root``):

* ``builtin:sentiment-openings``: one movie-review opening per line of
  ``stages/assets/sentiment_openings.txt``, turned into prompt-only rows via
  ``data.prompt_template``;
* a ``.jsonl``, ``.json`` (a list of objects or JSON lines), ``.parquet`` or ``.csv`` file
  (``.jsonl.gz``/``.json.gz``/``.csv.gz`` too);
* a directory of such files (top level only, read in name order; hidden files and READMEs are
  skipped), or a directory written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``
  (``data.split`` picks the split of a ``DatasetDict``);
* anything else that is not an existing path: a Hugging Face hub id, ``load_dataset(id, split=...)``.

Row formats (``data.format``; ``auto`` detects each row from its keys): ``standard`` and
``conversational`` TRL preference rows (conversational may have an implicit prompt), ``hh``
(Anthropic HH-RLHF dialogues), ``prompt_only`` and ``sft`` (prompt/completion or messages).

One source holds one kind of row (preference, prompt_only or sft). With ``format: auto`` the kind
most rows have wins and rows of another kind are refused; a tie between kinds is a ``DataError``.
CSV cells that hold a JSON list (``[{"role": ..., "content": ...}]``) are read as message lists.

Bad rows are refused, never fixed silently: each goes to the quarantine file
``<root>/<data.quarantine_dir>/<out_dir.name>.jsonl`` as
``{"file", "row", "field", "reason", "raw"}`` (``row`` is the 1-based line of a JSON-lines file,
the 1-based record of a JSON list, CSV (header not counted), parquet file or dataset).
Problems that make the whole source unusable raise ``DataError`` before any training starts.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.config import DataConfig
from stages.judges import carves_judge_split
from stages.runner import StageContext, StageOutput, check_pair_batches, hash_files

log = logging.getLogger(__name__)

Message = dict[str, str]
Record = dict[str, Any]

ROLES = ("assistant", "system", "user")
BUILTIN_ASSETS = {"builtin:sentiment-openings": "sentiment_openings.txt"}
KIND_OF_FORMAT = {
    "standard": "preference",
    "conversational": "preference",
    "hh": "preference",
    "prompt_only": "prompt_only",
    "sft": "sft",
}
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
ROW_FIELD = "<row>"  # the quarantine "field" of a refusal that concerns the whole row
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


class DataError(ValueError):
    """A source cannot be used at all; the message names the file and says what to fix."""


class _Refusal(Exception):
    """One row is refused: ``field`` names what is wrong, ``reason`` says how."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class PrepareSummary:
    kind: str  # "preference" | "prompt_only" | "sft"
    rows_in: int  # rows examined (reading stops at the data.max_rows-th kept row)
    kept: int
    refused: int  # includes duplicates
    duplicates: int
    train_rows: int
    eval_rows: int
    sources: list[str]  # the files read
    quarantine_path: str | None  # file with the refused rows, None when nothing was refused
    judge_rows: int = 0  # rows kept apart for the held-out judge (0 unless evaluate.judge is held_out_rm)

    def __post_init__(self) -> None:
        if self.rows_in != self.kept + self.refused:
            raise ValueError(f"rows_in {self.rows_in} != kept {self.kept} + refused {self.refused}")
        if self.kept != self.train_rows + self.eval_rows + self.judge_rows:
            raise ValueError(f"kept {self.kept} != train {self.train_rows} + eval {self.eval_rows} "
                             f"+ judge {self.judge_rows}")

    def as_metrics(self) -> dict[str, float]:
        counts = {
            "rows_in": self.rows_in,
            "kept": self.kept,
            "refused": self.refused,
            "duplicates": self.duplicates,
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "judge_rows": self.judge_rows,
        }
        metrics = {name: float(value) for name, value in counts.items()}
        metrics["refused_fraction"] = self.refused / self.rows_in if self.rows_in else 0.0
        return metrics


@dataclass(frozen=True)
class _RawRow:
    file: str  # display name of the file (or dataset) the row came from
    row: int  # 1-based line / record number
    value: Any  # the parsed row, or the raw text when it did not parse
    error: str | None = None  # why the row did not parse


@dataclass(frozen=True)
class _Source:
    names: list[str]  # display names of the files read
    rows: list[_RawRow]
    forced_format: str | None = None  # the builtin task only has prompt-only rows


@dataclass
class _Outcome:
    kept: list[Record]
    quarantine: list[Record]
    duplicates: int


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def prepare_data(config: DataConfig, out_dir: Path, *, seed: int, root: Path,
                 judge_split: bool = False) -> PrepareSummary:
    """Read ``config.source``, write ``out_dir/train.jsonl``, ``eval.jsonl`` and ``judge.jsonl``.

    With ``judge_split`` (the held-out judge), ``config.judge_fraction`` of the rows go to ``judge.jsonl``
    instead of ``train.jsonl``; otherwise that file is empty. The eval split is the same either way.
    """
    out_dir, root = Path(out_dir), Path(root)

    # Read
    source = _load_source(config, root)
    formats = _resolve_formats(source, config.format, config.source)

    # Normalise, refuse, de-duplicate
    outcome = _normalise_rows(source.rows, formats, config.max_rows)
    quarantine_file = root / config.quarantine_dir / f"{out_dir.name}.jsonl"
    quarantine_path = write_quarantine(outcome.quarantine, quarantine_file)
    if not outcome.kept:
        raise DataError(all_refused_message(config.source, outcome.quarantine, quarantine_path))

    # Split
    if judge_split and config.eval_fraction + config.judge_fraction >= 1.0:
        raise DataError(f"data.eval_fraction ({config.eval_fraction}) + data.judge_fraction ({config.judge_fraction}) "
                        "must stay below 1 for the held-out judge, so that rows are left to train on")
    train, evaluation, judge = _split(outcome.kept, seed, config.eval_fraction,
                                      config.judge_fraction if judge_split else 0.0)
    if judge_split and not judge:
        raise DataError(f"{config.source}: {len(outcome.kept)} kept rows left none for the held-out judge; raise "
                        f"data.judge_fraction (now {config.judge_fraction}) or add data")
    if not train or not evaluation:
        raise DataError(
            f"{config.source}: {len(outcome.kept)} kept rows split into {len(train)} train and "
            f"{len(evaluation)} eval rows; add data or change data.eval_fraction "
            f"(now {config.eval_fraction}) so both splits get rows"
        )

    # Write
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train.jsonl", train)
    _write_jsonl(out_dir / "eval.jsonl", evaluation)
    _write_jsonl(out_dir / "judge.jsonl", judge)
    summary = PrepareSummary(
        kind=kind_of(outcome.kept[0]),
        rows_in=len(outcome.kept) + len(outcome.quarantine),
        kept=len(outcome.kept),
        refused=len(outcome.quarantine),
        duplicates=outcome.duplicates,
        train_rows=len(train),
        eval_rows=len(evaluation),
        judge_rows=len(judge),
        sources=source.names,
        quarantine_path=str(quarantine_path) if quarantine_path else None,
    )
    log.info("prepared %s: %s", config.source, summary.as_metrics())
    return summary


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------
def _load_source(config: DataConfig, root: Path) -> _Source:
    if config.source.startswith("builtin:"):
        return _load_builtin(config)
    path = (root / config.source).expanduser()
    if path.is_dir():
        return _load_directory(path, _display(path, root), config.split)
    if path.is_file():
        name = _display(path, root)
        return _Source([name], _read_file(path, name))
    if _looks_like_path(config.source):
        raise DataError(f"{config.source}: file not found under {root}; fix data.source")
    return _load_hub(config.source, config.split)


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _looks_like_path(source: str) -> bool:
    suffixes = {suffix.lower() for suffix in Path(source).suffixes}
    return source.startswith((".", "/", "~")) or bool(suffixes & (set(FILE_READERS) | {".gz"}))


def _load_builtin(config: DataConfig) -> _Source:
    asset = BUILTIN_ASSETS.get(config.source)
    if asset is None:
        known = ", ".join(sorted(BUILTIN_ASSETS))
        raise DataError(f"data.source {config.source!r} is not a builtin source; known: {known}")
    if config.format not in ("auto", "prompt_only"):
        raise DataError(
            f"{config.source} holds prompt-only rows; set data.format to auto or prompt_only "
            f"(now {config.format})"
        )
    path = Path(__file__).parent / "assets" / asset
    lines = _decode(path.read_bytes(), config.source).split("\n")
    rows = [
        _RawRow(config.source, number, {"prompt": _fill_template(config.prompt_template, line.strip())})
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    return _Source([config.source], rows, forced_format="prompt_only")


def _fill_template(template: str, text: str) -> str:
    try:
        return template.format(text=text)
    except (KeyError, IndexError, ValueError) as error:
        raise DataError(
            f"data.prompt_template {template!r} cannot be filled ({error!r}); it may only use the "
            "{text} placeholder (write {{ and }} for literal braces)"
        ) from None


def _load_directory(path: Path, name: str, split: str) -> _Source:
    if any((path / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
        return _load_saved_dataset(path, name, split)
    files = sorted(item for item in path.iterdir() if item.is_file() and not _skipped_in_directory(item))
    if not files:
        kinds = ", ".join(FILE_READERS)
        raise DataError(f"{name}: directory holds no data files ({kinds}); add files or fix data.source")
    names = [f"{name}/{item.name}" for item in files]
    rows = [row for item, item_name in zip(files, names, strict=True) for row in _read_file(item, item_name)]
    return _Source(names, rows)


def _skipped_in_directory(path: Path) -> bool:
    return path.name.startswith(".") or path.stem.upper() == "README"


def _load_saved_dataset(path: Path, name: str, split: str) -> _Source:
    import datasets  # heavy import, only when needed

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # the datasets library raises many kinds; all mean "unreadable"
        raise DataError(f"{name}: cannot load this save_to_disk directory: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{name}: DatasetDict has no split {split!r}; set data.split to one of {sorted(loaded)}"
            )
        loaded, name = loaded[split], f"{name}[{split}]"
    return _Source([name], _dataset_rows(loaded, name))


def _load_hub(source: str, split: str) -> _Source:
    import datasets  # heavy import, only when needed

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as error:  # network, auth, missing split: all are fatal for this source
        raise DataError(
            f"data.source {source!r} is not an existing path, and loading it as a Hugging Face hub "
            f"dataset (split {split!r}) failed: {error}. Fix the path or the dataset id/split"
        ) from None
    name = f"{source}[{split}]"
    return _Source([name], _dataset_rows(loaded, name))


def _dataset_rows(dataset: Iterable[dict[str, Any]], name: str) -> list[_RawRow]:
    rows = [_RawRow(name, number, dict(item)) for number, item in enumerate(dataset, start=1)]
    if not rows:
        raise DataError(f"{name}: dataset holds no rows; point data.source at data with rows")
    return rows


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _read_file(path: Path, name: str) -> list[_RawRow]:
    return read_bytes(path.read_bytes(), path.name, name)


def read_bytes(data: bytes, filename: str, name: str) -> list[_RawRow]:
    """The rows of one file's bytes; ``filename``'s extension picks the reader, ``name`` is shown in errors."""
    path = Path(filename)
    compressed = path.suffix.lower() == ".gz"
    extension = Path(path.stem).suffix.lower() if compressed else path.suffix.lower()
    reader = FILE_READERS.get(extension)
    if reader is None:
        raise DataError(
            f"{name}: unknown extension {extension or '(none)'!r}; use one of "
            f"{', '.join(FILE_READERS)} (optionally .gz), a directory of them, or a hub id"
        )
    data = _gunzip(data, name) if compressed else data
    if not data.strip():
        raise DataError(f"{name}: file is empty; add rows or point data.source at another file")
    rows = reader(data, name)
    if not rows:
        raise DataError(f"{name}: file holds no rows; add rows or point data.source at another file")
    return rows


def _gunzip(data: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise DataError(f"{name}: not a readable gzip file ({error}); re-compress or unzip it") from None


def _decode(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{name}: not valid UTF-8 at byte offset {error.start} (line {line}, byte "
            f"{data[error.start : error.start + 1]!r}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the data


def _read_jsonl(data: bytes, name: str) -> list[_RawRow]:
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    rows = []
    for number, line in enumerate(_decode(data, name).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_RawRow(name, number, json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append(_RawRow(name, number, line, f"not valid JSON: {error.msg} at column {error.colno}"))
    return rows


def _read_json(data: bytes, name: str) -> list[_RawRow]:
    try:
        parsed = json.loads(_decode(data, name))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return _read_jsonl(data, name)
        raise DataError(
            f"{name}: not valid JSON (truncated?) at line {error.lineno} column {error.colno}: "
            f"{error.msg}; fix the file, or save it as JSON lines (one object per line)"
        ) from None
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        raise DataError(f"{name}: top level is a {_type_name(parsed)}; it must be a list of row objects")
    return [_RawRow(name, number, item) for number, item in enumerate(parsed, start=1)]


def _read_csv(data: bytes, name: str) -> list[_RawRow]:
    reader = csv.DictReader(io.StringIO(_decode(data, name), newline=""))
    rows = []
    try:
        for number, record in enumerate(reader, start=1):
            rows.append(_csv_row(record, name, number))
    except csv.Error as error:
        raise DataError(f"{name}: unreadable CSV near line {reader.line_num}: {error}; fix it") from None
    return rows


def _csv_row(record: dict[str | None, Any], name: str, number: int) -> _RawRow:
    if None in record:  # csv puts the cells beyond the header under the key None
        return _RawRow(name, number, record, f"has {len(record[None])} more cells than the header")
    # cells missing at the end of a short line are None: drop them so the field reads as missing
    cells = {key: _csv_cell(value) for key, value in record.items() if value is not None}
    return _RawRow(name, number, cells)


def _csv_cell(value: str) -> Any:
    """A cell holding a JSON list (a message list) is read as that list; other cells stay text."""
    if value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _read_parquet(data: bytes, name: str) -> list[_RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{name}: not a readable parquet file ({error}); re-export it") from None
    return [_RawRow(name, number, item) for number, item in enumerate(table.to_pylist(), start=1)]


FILE_READERS: dict[str, Callable[[bytes, str], list[_RawRow]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


# --------------------------------------------------------------------------------------------------
# Format detection: one kind per source
# --------------------------------------------------------------------------------------------------
def _resolve_formats(source: _Source, configured: str, source_name: str) -> list[str | _Refusal]:
    """The format to normalise each row with, or the refusal of a row no format fits."""
    if source.forced_format is not None:
        return [source.forced_format] * len(source.rows)
    if configured != "auto":
        return [configured] * len(source.rows)
    detected = [_detect_format(row.value) if row.error is None else None for row in source.rows]
    _check_each_file_has_a_format(source.rows, detected)
    majority = _majority_kind(detected, source_name)
    return [_format_or_refusal(row, fmt, majority) for row, fmt in zip(source.rows, detected, strict=True)]


def _detect_format(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if "chosen" in value or "rejected" in value:
        return _detect_preference_format(value)
    if "messages" in value or "completion" in value:
        return "sft"
    if "prompt" in value:
        return "prompt_only"
    return None


def _detect_preference_format(value: dict[str, Any]) -> str:
    fields = [value.get(key) for key in ("prompt", "chosen", "rejected")]
    if any(isinstance(field, list) for field in fields):
        return "conversational"
    if "prompt" not in value and any(_looks_like_hh(field) for field in fields):
        return "hh"
    return "standard"


def _looks_like_hh(value: Any) -> bool:
    return isinstance(value, str) and ("\n\nHuman:" in value or HH_ASSISTANT in value)


def _check_each_file_has_a_format(rows: list[_RawRow], detected: list[str | None]) -> None:
    matched: dict[str, bool] = {}
    first_keys: dict[str, Any] = {}
    for row, fmt in zip(rows, detected, strict=True):
        matched[row.file] = matched.get(row.file, False) or fmt is not None
        if row.error is None and isinstance(row.value, dict):
            first_keys.setdefault(row.file, sorted(row.value))
    for name, any_matched in matched.items():
        if not any_matched and name in first_keys:
            raise DataError(
                f"{name}: no row matches a known format (first row has keys {first_keys[name]}); "
                f"{_EXPECTED_KEYS}, or set data.format"
            )


_EXPECTED_KEYS = (
    "rows need prompt/chosen/rejected (preference), chosen/rejected HH dialogues, prompt "
    "(prompt-only), prompt/completion or messages (sft)"
)


def _majority_kind(detected: list[str | None], source_name: str) -> str | None:
    counts = Counter(KIND_OF_FORMAT[fmt] for fmt in detected if fmt is not None)
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        tied = ", ".join(f"{kind}: {count}" for kind, count in ranked)
        raise DataError(
            f"{source_name}: rows of different kinds in equal numbers ({tied}); a source must hold "
            "one kind: split it into separate sources or set data.format"
        )
    return ranked[0][0] if ranked else None


def _format_or_refusal(row: _RawRow, fmt: str | None, majority: str | None) -> str | _Refusal:
    if row.error is not None or not isinstance(row.value, dict):
        return "unparsed"  # _normalise_row refuses these before looking at the format
    if fmt is None:
        return _Refusal(ROW_FIELD, f"keys {sorted(row.value)} match no known format; {_EXPECTED_KEYS}")
    if KIND_OF_FORMAT[fmt] != majority:
        return _Refusal(
            ROW_FIELD,
            f"row is {KIND_OF_FORMAT[fmt]} ({fmt} format) but most rows of this source are {majority}; "
            "a source must hold one kind of row",
        )
    return fmt


# --------------------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def _field(row: dict[str, Any], key: str, missing: str = "required field is missing") -> Any:
    if key not in row:
        raise _Refusal(key, missing)
    if row[key] is None:
        raise _Refusal(key, "is null")
    return row[key]


def _as_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Refusal(field, f"wrong type: expected a string, got {_type_name(value)}")
    text = _clean(value)
    if not text:
        raise _Refusal(field, "is empty or whitespace-only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refusal(field, "holds an unpaired surrogate (a broken \\ud800-\\udfff escape)") from None
    return text


def _as_message(value: Any, field: str) -> Message:
    if not isinstance(value, dict):
        raise _Refusal(field, f"wrong type: expected a message {{role, content}}, got {_type_name(value)}")
    for key in ("role", "content"):
        if value.get(key) is None:
            raise _Refusal(f"{field}.{key}", f"message lacks '{key}'")
    if value["role"] not in ROLES:
        raise _Refusal(f"{field}.role", f"unknown role {value['role']!r}; expected one of {', '.join(ROLES)}")
    return {"role": value["role"], "content": _as_text(value["content"], f"{field}.content")}


def _as_messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise _Refusal(field, f"wrong type: expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _Refusal(field, "is an empty list of messages")
    return [_as_message(item, f"{field}[{index}]") for index, item in enumerate(value)]


def _as_prompt(value: Any, field: str) -> list[Message]:
    """A string prompt becomes one user message; a list must be messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _as_text(value, field)}]
    if isinstance(value, list):
        return _as_messages(value, field)
    raise _Refusal(field, f"wrong type: expected a string or a list of messages, got {_type_name(value)}")


def _as_reply(value: Any, field: str) -> list[Message]:
    """A string answer becomes one assistant message; a list must be exactly one assistant message."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _as_text(value, field)}]
    messages = _as_messages(value, field)
    if len(messages) != 1:
        raise _Refusal(field, f"must be one assistant message, got {len(messages)} messages")
    _require_assistant(messages[0], f"{field}[0]")
    return messages


def _require_assistant(message: Message, field: str) -> None:
    if message["role"] != "assistant":
        raise _Refusal(f"{field}.role", f"must be 'assistant', got {message['role']!r}")


def _preference(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> Record:
    if chosen == rejected:
        raise _Refusal("rejected", "chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------------------------------
# Row formats: raw row -> normalised content (without id)
# --------------------------------------------------------------------------------------------------
def _standard_row(row: dict[str, Any]) -> Record:
    missing_prompt = "required field is missing (implicit prompts are not supported in the standard format)"
    prompt = _as_text(_field(row, "prompt", missing_prompt), "prompt")
    return _preference(
        [{"role": "user", "content": prompt}],
        [{"role": "assistant", "content": _as_text(_field(row, "chosen"), "chosen")}],
        [{"role": "assistant", "content": _as_text(_field(row, "rejected"), "rejected")}],
    )


def _conversational_row(row: dict[str, Any]) -> Record:
    if "prompt" not in row:
        return _implicit_prompt_row(row)
    prompt = _as_messages(_field(row, "prompt"), "prompt")
    chosen = _as_messages(_field(row, "chosen"), "chosen")
    rejected = _as_messages(_field(row, "rejected"), "rejected")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) != 1:
            raise _Refusal(field, f"must be one assistant message, got {len(messages)} messages")
        _require_assistant(messages[0], f"{field}[0]")
    return _preference(prompt, chosen, rejected)


def _implicit_prompt_row(row: dict[str, Any]) -> Record:
    """chosen/rejected are whole conversations; the prompt is every message but the last."""
    chosen = _as_messages(_field(row, "chosen"), "chosen")
    rejected = _as_messages(_field(row, "rejected"), "rejected")
    prompt = chosen[:-1]
    if not prompt:
        raise _Refusal("chosen", "needs prompt messages before the final assistant reply (implicit prompt)")
    if rejected[:-1] != prompt:
        raise _Refusal(
            "rejected",
            f"chosen and rejected must share every message but the last (implicit prompt); they differ "
            f"at message {_first_difference(prompt, rejected[:-1])}",
        )
    _require_assistant(chosen[-1], f"chosen[{len(chosen) - 1}]")
    _require_assistant(rejected[-1], f"rejected[{len(rejected) - 1}]")
    return _preference(prompt, chosen[-1:], rejected[-1:])


def _first_difference(left: list[Message], right: list[Message]) -> int:
    pairs = zip(left, right, strict=False)  # stops at the shorter list
    differing = (index for index, (one, other) in enumerate(pairs) if one != other)
    return next(differing, min(len(left), len(right)))


def _hh_row(row: dict[str, Any]) -> Record:
    chosen_prefix, chosen_reply = _split_hh(_field(row, "chosen"), "chosen")
    rejected_prefix, rejected_reply = _split_hh(_field(row, "rejected"), "rejected")
    if chosen_prefix != rejected_prefix:
        raise _Refusal(
            "rejected",
            "chosen and rejected do not share a prefix: HH dialogues must be identical up to the last "
            "'\\n\\nAssistant:' and differ only in the final reply",
        )
    return _preference(
        _hh_messages(chosen_prefix),
        [{"role": "assistant", "content": chosen_reply}],
        [{"role": "assistant", "content": rejected_reply}],
    )


def _split_hh(value: Any, field: str) -> tuple[str, str]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: yo"`` -> (``"\\n\\nHuman: hi\\n\\nAssistant:"``, ``"yo"``)."""
    dialogue = "\n\n" + _as_text(value, field)  # _as_text strips the leading "\n\n"; put it back
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Refusal(field, "HH dialogue lacks '\\n\\nAssistant:'")
    cut += len(HH_ASSISTANT)
    reply = dialogue[cut:].strip()
    if not reply:
        raise _Refusal(field, "final assistant reply after the last '\\n\\nAssistant:' is empty")
    return dialogue[:cut], reply


def _hh_messages(prefix: str) -> list[Message]:
    """Shared HH prefix -> messages; the trailing empty "Assistant:" turn is the generation slot."""
    lead, *parts = HH_TURN.split(prefix)
    if lead.strip():
        raise _Refusal("chosen", "HH dialogue must start with '\\n\\nHuman:'; found text before it")
    turns = list(zip(parts[0::2], parts[1::2], strict=True))[:-1]
    if not turns:
        raise _Refusal("chosen", "HH dialogue has no turn before the last '\\n\\nAssistant:'")
    messages = []
    for number, (speaker, text) in enumerate(turns, start=1):
        if not text.strip():
            raise _Refusal("chosen", f"HH dialogue turn {number} ({speaker}) is empty")
        messages.append({"role": HH_ROLES[speaker], "content": text.strip()})
    return messages


def _prompt_only_row(row: dict[str, Any]) -> Record:
    return {"prompt": _as_prompt(_field(row, "prompt"), "prompt")}


def _sft_row(row: dict[str, Any]) -> Record:
    if "messages" in row:
        messages = _as_messages(_field(row, "messages"), "messages")
        last = len(messages) - 1
        _require_assistant(messages[last], f"messages[{last}]")
        if last == 0:
            raise _Refusal("messages", "needs at least one message before the final assistant reply")
        return {"prompt": messages[:last], "completion": messages[last:]}
    return {
        "prompt": _as_prompt(_field(row, "prompt"), "prompt"),
        "completion": _as_reply(_field(row, "completion"), "completion"),
    }


NORMALISERS: dict[str, Callable[[dict[str, Any]], Record]] = {
    "standard": _standard_row,
    "conversational": _conversational_row,
    "hh": _hh_row,
    "prompt_only": _prompt_only_row,
    "sft": _sft_row,
}


# --------------------------------------------------------------------------------------------------
# Rows: normalise, refuse, de-duplicate
# --------------------------------------------------------------------------------------------------
def _normalise_rows(rows: list[_RawRow], formats: list[str | _Refusal], max_rows: int | None) -> _Outcome:
    outcome = _Outcome(kept=[], quarantine=[], duplicates=0)
    first_seen: dict[str, _RawRow] = {}
    pairs = zip(rows, formats, strict=True)
    progress = tqdm(pairs, total=len(rows), desc="prepare", unit="row", disable=None)  # shown on a TTY only
    for row, fmt in progress:
        if max_rows is not None and len(outcome.kept) >= max_rows:
            break  # rows after the max_rows-th kept row are not read, so not counted in rows_in
        try:
            record = _normalise_row(row, fmt)
        except _Refusal as refusal:
            outcome.quarantine.append(_quarantine_record(row, refusal))
            continue
        original = first_seen.setdefault(record["id"], row)
        if original is not row:
            outcome.duplicates += 1
            refusal = _Refusal(ROW_FIELD, f"duplicate of row {original.row} in {original.file}")
            outcome.quarantine.append(_quarantine_record(row, refusal))
            continue
        outcome.kept.append(record)
    progress.close()
    return outcome


def check_rows(
    rows: list[_RawRow], fmt: str, source_name: str, kind: str | None = None
) -> Iterator[tuple[_RawRow, Record | None, Record | None]]:
    """Each row checked as prepare checks it, in order: ``(row, normalised record, None)`` or
    ``(row, None, quarantine record)``. No de-duplication; ``kind`` (e.g. "preference") refuses rows of
    another kind. Raises ``DataError`` when no row of a file matches a known format."""
    formats = _resolve_formats(_Source([source_name], rows), fmt, source_name)
    for row, row_format in zip(rows, formats, strict=True):
        try:
            record = _normalise_row(row, row_format)
            if kind is not None and kind_of(record) != kind:
                raise _Refusal(ROW_FIELD, f"row is {kind_of(record)}, expected {kind}")
        except _Refusal as refusal:
            yield row, None, _quarantine_record(row, refusal)
            continue
        yield row, record, None


def _normalise_row(row: _RawRow, fmt: str | _Refusal) -> Record:
    if row.error is not None:
        raise _Refusal(ROW_FIELD, row.error)
    if not isinstance(row.value, dict):
        raise _Refusal(ROW_FIELD, f"row is {_type_name(row.value)}, expected an object with named fields")
    if isinstance(fmt, _Refusal):
        raise fmt
    content = NORMALISERS[fmt](row.value)
    return {"id": _row_id(content), **content}


def _row_id(content: Record) -> str:
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def kind_of(record: Record) -> str:
    if "chosen" in record:
        return "preference"
    return "sft" if "completion" in record else "prompt_only"


def _quarantine_record(row: _RawRow, refusal: _Refusal) -> Record:
    return {
        "file": row.file,
        "row": row.row,
        "field": refusal.field,
        "reason": refusal.reason,
        "raw": row.value,
    }


def all_refused_message(source: str, quarantine: list[Record], path: Path | None) -> str:
    reasons = Counter(f"{record['field']}: {record['reason']}" for record in quarantine)
    common = "; ".join(f"{count}x {reason}" for reason, count in reasons.most_common(3))
    return (
        f"{source}: all {len(quarantine)} rows were refused (most common: {common}); see {path} "
        "and fix the rows, or set data.format to the format the rows use"
    )


# --------------------------------------------------------------------------------------------------
# Split and write
# --------------------------------------------------------------------------------------------------
def _eval_score(seed: int, row_id: str) -> float:
    """sha256 of ``"{seed}:{row_id}"`` mapped to [0, 1): a row goes to eval when this < eval_fraction."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()
    return int(digest[:16], 16) / 16**16


def _split(rows: list[Record], seed: int, eval_fraction: float,
           judge_fraction: float = 0.0) -> tuple[list[Record], list[Record], list[Record]]:
    """(train, eval, judge): a row's hash bucket below ``eval_fraction`` is eval, the next ``judge_fraction``
    of [0, 1) is the judge's, the rest train; so the eval split does not depend on the judge split."""
    train, evaluation, judge = [], [], []
    for row in rows:
        bucket = _eval_score(seed, row["id"])
        target = evaluation if bucket < eval_fraction else judge if bucket < eval_fraction + judge_fraction else train
        target.append(row)
    return train, evaluation, judge


def write_quarantine(records: list[Record], path: Path) -> Path | None:
    if not records:
        path.unlink(missing_ok=True)  # a stale file from an earlier run would mislead
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, records)
    return path


def _write_jsonl(path: Path, records: Iterable[Record]) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    # open(..., "x") rather than mkstemp: mkstemp makes the file owner-only (0600), not umask-based
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        # backslashreplace: an unpaired surrogate in a quarantined raw row is written as its JSON escape
        with open(temporary, "x", encoding="utf-8", errors="backslashreplace") as stream:
            stream.writelines(_json_lines(records))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _json_lines(records: Iterable[Record]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, ensure_ascii=False, default=str) + "\n"


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
PREPARED_FILES = ("train.jsonl", "eval.jsonl", "judge.jsonl")


def _publish_prepared(source: Path, target: Path) -> None:
    """Replace the DVC-tracked copy of the prepared data as a whole (staging dir, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
    shutil.copytree(source, staging)
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def run(ctx: StageContext) -> StageOutput:
    from stages.versioning import commit_stage, inside_dvc_repro

    config = ctx.config
    data_dir = ctx.out_dir / "prepared"
    summary = prepare_data(config.data, data_dir, seed=config.run.seed, root=ctx.root,
                           judge_split=carves_judge_split(config) and config.data.task == "preference")
    (data_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2))
    if summary.kind == "preference":
        check_pair_batches(config, summary.train_rows, f"{config.data.source} (prepared)", summary.judge_rows)
    for name in PREPARED_FILES:  # downstream stages read <output>/<name>
        shutil.copyfile(data_dir / name, ctx.out_dir / name)
    if summary.quarantine_path:
        shutil.copyfile(summary.quarantine_path, ctx.out_dir / "quarantine.jsonl")
        log.warning("prepare: %d of %d rows refused; reasons in %s", summary.refused, summary.rows_in,
                       summary.quarantine_path)

    # Versioning: the DVC md5 of data/prepared is the dataset version
    prepared_dir = ctx.root / config.data.prepared_dir
    _publish_prepared(data_dir, prepared_dir)
    md5 = None
    if config.run.dvc and not inside_dvc_repro():  # under `dvc repro`, DVC versions the output itself
        md5 = commit_stage(ctx.root, "prepare", config.data.prepared_dir, push=config.run.dvc_push)
    if ctx.tracker is not None:
        if md5:
            ctx.tracker.log_dataset(f"prepared-{config.data.task}", md5, config.data.prepared_dir, "prepare")
        if summary.quarantine_path:
            ctx.tracker.log_artifact(Path(summary.quarantine_path), "quarantine")
    return StageOutput(
        metrics=summary.as_metrics(),
        info={
            "kind": summary.kind,
            "dataset_md5": md5,
            "dataset_name": f"prepared-{config.data.task}",
            "dataset_path": config.data.prepared_dir,
            "quarantine": summary.quarantine_path,
            # the same rows prepared under other params keep their downstream stages cached
            "content_key": hash_files(ctx.out_dir, PREPARED_FILES),
        },
    )
