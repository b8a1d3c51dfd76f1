"""Tests for stages/prepare.py: every source type, row format, refusal reason and fatal error."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.config import DataConfig
from stages.prepare import DataError, PrepareSummary, prepare_data

HH_SAMPLE = Path("/work/shared/data/hh-rlhf-harmless-sample.jsonl")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def preference_rows(count: int, tag: str = "q") -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"{tag} question {index}",
            "chosen": f"good answer {index}",
            "rejected": f"bad answer {index}",
        }
        for index in range(count)
    ]


def prompt_rows(count: int) -> list[dict[str, Any]]:
    return [{"prompt": f"prompt number {index}"} for index in range(count)]


def sft_rows(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"sft question {index}", "completion": f"sft answer {index}"} for index in range(count)
    ]


def conversational_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "prompt": [user(f"conv {index}")],
            "chosen": [assistant(f"yes {index}")],
            "rejected": [assistant("no")],
        }
        for index in range(count)
    ]


def hh_rows(count: int) -> list[dict[str, Any]]:
    dialogue = "\n\nHuman: hh question {index}\n\nAssistant: {reply}"
    return [
        {
            "chosen": dialogue.format(index=index, reply="yes"),
            "rejected": dialogue.format(index=index, reply="no"),
        }
        for index in range(count)
    ]


FILLERS = {"preference": preference_rows, "prompt_only": prompt_rows, "sft": sft_rows}
FORMAT_FILLERS = {
    "standard": preference_rows,
    "conversational": conversational_rows,
    "hh": hh_rows,
    "prompt_only": prompt_rows,
    "sft": sft_rows,
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """dict rows are JSON-encoded; str rows are written verbatim (for broken lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def run(root: Path, source: str, *, seed: int = 0, out: str = "run", **data: Any) -> PrepareSummary:
    data.setdefault("eval_fraction", 0.5)
    return prepare_data(DataConfig(source=source, **data), root / "prepared" / out, seed=seed, root=root)


def prepared(root: Path, out: str = "run") -> list[dict[str, Any]]:
    directory = root / "prepared" / out
    return read_jsonl(directory / "train.jsonl") + read_jsonl(directory / "eval.jsonl")


def quarantined(root: Path, out: str = "run") -> list[dict[str, Any]]:
    return read_jsonl(root / "data" / "quarantine" / f"{out}.jsonl")


def triples(rows: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts of normalised single-turn preference rows."""
    return {
        (row["prompt"][-1]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"])
        for row in rows
    }


def expected_triples(rows: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(row["prompt"], row["chosen"], row["rejected"]) for row in rows}


def without_id(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "id"}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------------------------------
# Row formats
# --------------------------------------------------------------------------------------------------
FORMAT_CASES = {
    "standard": (
        "preference",
        {"prompt": "  Hi\r\nthere ", "chosen": " Yes\r\n", "rejected": "No", "score": 3},
        {"prompt": [user("Hi\nthere")], "chosen": [assistant("Yes")], "rejected": [assistant("No")]},
    ),
    "conversational": (
        "preference",
        {
            "prompt": [
                {"role": "system", "content": "Be kind."},
                user("Hi"),
                assistant("Hello"),
                user("Help?"),
            ],
            "chosen": [assistant("Sure.")],
            "rejected": [{"role": "assistant", "content": " No. ", "name": "bot"}],
        },
        {
            "prompt": [
                {"role": "system", "content": "Be kind."},
                user("Hi"),
                assistant("Hello"),
                user("Help?"),
            ],
            "chosen": [assistant("Sure.")],
            "rejected": [assistant("No.")],
        },
    ),
    "conversational_implicit": (
        "preference",
        {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]},
        {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},
    ),
    "hh": (
        "preference",
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Can you help?\n\nAssistant: Sure, gladly.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Can you help?\n\nAssistant:  No. ",
        },
        {
            "prompt": [user("Hi"), assistant("Hello"), user("Can you help?")],
            "chosen": [assistant("Sure, gladly.")],
            "rejected": [assistant("No.")],
        },
    ),
    "prompt_only": ("prompt_only", {"prompt": " Tell me a joke. "}, {"prompt": [user("Tell me a joke.")]}),
    "prompt_only_messages": (
        "prompt_only",
        {"prompt": [{"role": "system", "content": "Be brief."}, user("Why?")]},
        {"prompt": [{"role": "system", "content": "Be brief."}, user("Why?")]},
    ),
    "sft": (
        "sft",
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [user("2+2?")], "completion": [assistant("4")]},
    ),
    "sft_conversational": (
        "sft",
        {"prompt": [user("2+3?")], "completion": [assistant("5")]},
        {"prompt": [user("2+3?")], "completion": [assistant("5")]},
    ),
    "sft_messages": (
        "sft",
        {"messages": [user("Hi"), assistant("Hello"), user("Name?"), assistant("Ada.")]},
        {"prompt": [user("Hi"), assistant("Hello"), user("Name?")], "completion": [assistant("Ada.")]},
    ),
}
EXPLICIT_FORMAT = {
    "standard": "standard",
    "conversational": "conversational",
    "conversational_implicit": "conversational",
    "hh": "hh",
    "prompt_only": "prompt_only",
    "prompt_only_messages": "prompt_only",
    "sft": "sft",
    "sft_conversational": "sft",
    "sft_messages": "sft",
}


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_each_format_is_normalised_to_conversational_rows(tmp_path: Path, case: str, explicit: bool) -> None:
    kind, row, expected = FORMAT_CASES[case]
    write_jsonl(tmp_path / "data.jsonl", [row, *FORMAT_FILLERS[EXPLICIT_FORMAT[case]](12)])

    summary = run(tmp_path, "data.jsonl", format=EXPLICIT_FORMAT[case] if explicit else "auto")

    rows = prepared(tmp_path)
    assert summary.kind == kind
    assert summary.kept == 13 and summary.refused == 0 and summary.quarantine_path is None
    assert expected in [without_id(item) for item in rows]
    assert all(set(item) == {"id", *expected} for item in rows)


def test_row_id_is_sha256_of_canonical_content(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", preference_rows(12))
    run(tmp_path, "data.jsonl")
    for row in prepared(tmp_path):
        canonical = json.dumps(without_id(row), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        assert row["id"] == hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_explicit_standard_format_refuses_conversational_rows(tmp_path: Path) -> None:
    _, row, _ = FORMAT_CASES["conversational"]
    write_jsonl(tmp_path / "data.jsonl", [*preference_rows(12), row])

    summary = run(tmp_path, "data.jsonl", format="standard")

    assert summary.kept == 12 and summary.refused == 1
    [record] = quarantined(tmp_path)
    assert (record["row"], record["field"]) == (13, "prompt") and "expected a string" in record["reason"]


# --------------------------------------------------------------------------------------------------
# Source types
# --------------------------------------------------------------------------------------------------
ROWS = preference_rows(12)


def test_json_list_source(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    summary = run(tmp_path, "data.json")
    assert summary.sources == ["data.json"] and summary.kept == 12
    assert triples(prepared(tmp_path)) == expected_triples(ROWS)


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.json", [*ROWS[:5], "{broken", *ROWS[5:]])
    summary = run(tmp_path, "data.json")
    assert (summary.kept, summary.refused) == (12, 1)
    assert [(record["row"], record["field"]) for record in quarantined(tmp_path)] == [(6, "<row>")]


def test_gzipped_jsonl_source(tmp_path: Path) -> None:
    payload = "\n".join(json.dumps(row) for row in ROWS).encode()
    (tmp_path / "data.jsonl.gz").write_bytes(gzip.compress(payload))
    assert run(tmp_path, "data.jsonl.gz").kept == 12
    assert triples(prepared(tmp_path)) == expected_triples(ROWS)


def test_parquet_source_with_message_lists(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "prompt": [user(f"q{index}")],
            "chosen": [assistant(f"good {index}")],
            "rejected": [assistant(f"bad {index}")],
        }
        for index in range(12)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")

    summary = run(tmp_path, "data.parquet")

    assert summary.kept == 12 and summary.kind == "preference"
    assert triples(prepared(tmp_path)) == {(f"q{i}", f"good {i}", f"bad {i}") for i in range(12)}


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_source_with_a_json_messages_cell(tmp_path: Path) -> None:
    messages = json.dumps([{"role": "system", "content": "Be brief."}, user("Why, with a comma?")])
    rows = [[f"prompt {index}"] for index in range(11)] + [[messages]]
    write_csv(tmp_path / "data.csv", ["prompt"], rows)

    summary = run(tmp_path, "data.csv")

    assert summary.kind == "prompt_only" and summary.kept == 12
    prompts = [row["prompt"] for row in prepared(tmp_path)]
    assert [{"role": "system", "content": "Be brief."}, user("Why, with a comma?")] in prompts
    assert [user("prompt 0")] in prompts


def test_csv_short_and_long_lines_are_refused(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "data.csv",
        ["prompt", "chosen", "rejected"],
        [[f"q{i}", f"good {i}", f"bad {i}"] for i in range(12)],
    )
    with path.open("a", encoding="utf-8") as stream:
        stream.write("short question,only chosen\nq,c,r,extra\n")

    summary = run(tmp_path, "data.csv")

    assert (summary.kept, summary.refused) == (12, 2)
    records = quarantined(tmp_path)
    assert [(r["row"], r["field"]) for r in records] == [(13, "rejected"), (14, "<row>")]
    assert "missing" in records[0]["reason"] and "more cells than the header" in records[1]["reason"]


def test_directory_source_reads_every_file_in_name_order(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", ROWS[4:8])
    write_csv(folder / "a.csv", ["prompt", "chosen", "rejected"], [list(row.values()) for row in ROWS[:4]])
    pq.write_table(pa.Table.from_pylist(ROWS[8:]), folder / "c.parquet")
    (folder / "README.md").write_text("not data")
    (folder / ".gitignore").write_text("/x")

    summary = run(tmp_path, "raw")

    assert summary.sources == ["raw/a.csv", "raw/b.jsonl", "raw/c.parquet"]
    assert summary.kept == 12
    assert triples(prepared(tmp_path)) == expected_triples(ROWS)


def test_duplicate_across_files_names_the_first_file(tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    write_jsonl(folder / "a.jsonl", ROWS)
    write_jsonl(folder / "b.jsonl", [ROWS[3]])

    summary = run(tmp_path, "raw")

    assert summary.duplicates == 1
    [record] = quarantined(tmp_path)
    assert record["file"] == "raw/b.jsonl" and record["reason"] == "duplicate of row 4 in raw/a.jsonl"


def test_save_to_disk_dataset_directory(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    summary = run(tmp_path, "saved")
    assert summary.sources == ["saved"] and summary.kept == 12
    assert triples(prepared(tmp_path)) == expected_triples(ROWS)


def test_save_to_disk_dataset_dict_uses_the_configured_split(tmp_path: Path) -> None:
    import datasets

    splits = {
        "train": datasets.Dataset.from_list(ROWS),
        "test": datasets.Dataset.from_list(preference_rows(12, "t")),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))

    summary = run(tmp_path, "saved", split="test")

    assert summary.sources == ["saved[test]"]
    assert triples(prepared(tmp_path)) == expected_triples(preference_rows(12, "t"))
    with pytest.raises(DataError, match=r"saved: DatasetDict has no split 'validation'.*\['test', 'train'\]"):
        run(tmp_path, "saved", split="validation")


def test_builtin_sentiment_openings(tmp_path: Path) -> None:
    asset = Path(__file__).parents[1] / "stages" / "assets" / "sentiment_openings.txt"
    openings = asset.read_text(encoding="utf-8").splitlines()
    assert 300 <= len(openings) <= 400 and len(set(openings)) == len(openings)

    summary = run(tmp_path, "builtin:sentiment-openings", prompt_template="Review: {text}", eval_fraction=0.2)

    assert summary.kind == "prompt_only" and summary.sources == ["builtin:sentiment-openings"]
    assert summary.kept == len(openings) and summary.refused == 0
    assert 0.1 < summary.eval_rows / summary.kept < 0.3
    prompts = {row["prompt"][0]["content"] for row in prepared(tmp_path)}
    assert prompts == {f"Review: {opening}" for opening in openings}


def test_builtin_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="builtin:nope.*known: builtin:sentiment-openings"):
        run(tmp_path, "builtin:nope")
    with pytest.raises(DataError, match="set data.format to auto or prompt_only"):
        run(tmp_path, "builtin:sentiment-openings", format="sft")
    with pytest.raises(DataError, match=r"data.prompt_template .*\{text\} placeholder"):
        run(tmp_path, "builtin:sentiment-openings", prompt_template="Review {film}: {text}")


def test_hub_id_is_loaded_with_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(source: str, split: str) -> datasets.Dataset:
        calls.append((source, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    summary = run(tmp_path, "someone/prefs", split="test")
    assert calls == [("someone/prefs", "test")]
    assert summary.sources == ["someone/prefs[test]"] and summary.kept == 12


def test_hub_failure_is_a_data_error_naming_the_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(source: str, split: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'someone/prefs'.*hub dataset.*no network"):
        run(tmp_path, "someone/prefs")


# --------------------------------------------------------------------------------------------------
# Refusals: the quarantine holds exactly the bad row, with its file, row and field
# --------------------------------------------------------------------------------------------------
_CONV = {"prompt": [user("Hi")], "chosen": [assistant("A")], "rejected": [assistant("B")]}
REFUSALS = {
    "missing_prompt": ("preference", {"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    "missing_chosen": ("preference", {"prompt": "p", "rejected": "b"}, "chosen", "missing"),
    "null_rejected": ("preference", {"prompt": "p", "chosen": "a", "rejected": None}, "rejected", "null"),
    "wrong_type": ("preference", {"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "wrong type"),
    "whitespace_only": (
        "preference",
        {"prompt": " \r\n\t", "chosen": "a", "rejected": "b"},
        "prompt",
        "empty",
    ),
    "chosen_equals_rejected": (
        "preference",
        {"prompt": "p", "chosen": " same\r\nthing ", "rejected": "same\nthing"},
        "rejected",
        "identical",
    ),
    "message_lacks_role": (
        "preference",
        {**_CONV, "chosen": [{"content": "A"}]},
        "chosen[0].role",
        "lacks 'role'",
    ),
    "message_lacks_content": (
        "preference",
        {**_CONV, "prompt": [{"role": "user"}]},
        "prompt[0].content",
        "lacks 'content'",
    ),
    "unknown_role": (
        "preference",
        {**_CONV, "prompt": [{"role": "human", "content": "Hi"}]},
        "prompt[0].role",
        "unknown role",
    ),
    "message_not_an_object": ("preference", {**_CONV, "prompt": ["Hi"]}, "prompt[0]", "wrong type"),
    "empty_message_list": ("preference", {**_CONV, "prompt": []}, "prompt", "empty list"),
    "chosen_two_messages": (
        "preference",
        {**_CONV, "chosen": [assistant("A"), assistant("A2")]},
        "chosen",
        "one assistant message",
    ),
    "chosen_not_assistant": ("preference", {**_CONV, "chosen": [user("A")]}, "chosen[0].role", "'assistant'"),
    "conversational_string_prompt": ("preference", {**_CONV, "prompt": "Hi"}, "prompt", "list of messages"),
    "implicit_prompt_differs": (
        "preference",
        {"chosen": [user("Hi"), assistant("A")], "rejected": [user("Hello"), assistant("B")]},
        "rejected",
        "share every message but the last",
    ),
    "implicit_prompt_missing": (
        "preference",
        {"chosen": [assistant("A")], "rejected": [assistant("B")]},
        "chosen",
        "prompt messages",
    ),
    "hh_lacks_assistant": (
        "preference",
        {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi\n\nAssistant: x"},
        "chosen",
        "lacks '\\n\\nAssistant:'",
    ),
    "hh_no_shared_prefix": (
        "preference",
        {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: bye\n\nAssistant: no"},
        "rejected",
        "do not share a prefix",
    ),
    "hh_empty_final_reply": (
        "preference",
        {"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        "chosen",
        "reply after the last '\\n\\nAssistant:' is empty",
    ),
    "hh_empty_turn": (
        "preference",
        {"chosen": "\n\nHuman: \n\nAssistant: yes", "rejected": "\n\nHuman: \n\nAssistant: no"},
        "chosen",
        "turn 1 (Human) is empty",
    ),
    "hh_text_before_human": (
        "preference",
        {"chosen": "Intro\n\nHuman: hi\n\nAssistant: yes", "rejected": "Intro\n\nHuman: hi\n\nAssistant: no"},
        "chosen",
        "must start with",
    ),
    "unparseable_json": ("preference", '{"prompt": "p", "chosen": ', "<row>", "not valid JSON"),
    "not_an_object": ("preference", "[1, 2]", "<row>", "expected an object"),
    "no_known_format": ("preference", {"text": "hello"}, "<row>", "match no known format"),
    "other_kind": (
        "preference",
        {"prompt": "only a prompt"},
        "<row>",
        "most rows of this source are preference",
    ),
    "unpaired_surrogate": (
        "preference",
        '{"prompt": "bad \\ud800 escape", "chosen": "a", "rejected": "b"}',
        "prompt",
        "surrogate",
    ),
    "prompt_only_wrong_type": (
        "prompt_only",
        {"prompt": {"text": "x"}},
        "prompt",
        "string or a list of messages",
    ),
    "sft_null_completion": ("sft", {"prompt": "p", "completion": None}, "completion", "null"),
    "sft_completion_two_messages": (
        "sft",
        {"prompt": "p", "completion": [assistant("a"), assistant("b")]},
        "completion",
        "one assistant",
    ),
    "sft_messages_end_with_user": (
        "sft",
        {"messages": [user("Hi"), assistant("Yo"), user("Bye")]},
        "messages[2].role",
        "'assistant'",
    ),
    "sft_messages_single": (
        "sft",
        {"messages": [assistant("Yo")]},
        "messages",
        "at least one message before",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_row_is_quarantined_with_file_row_and_field(tmp_path: Path, case: str) -> None:
    kind, bad_row, field, reason = REFUSALS[case]
    good = FILLERS[kind](12)
    write_jsonl(tmp_path / "data.jsonl", [*good[:4], bad_row, *good[4:]])

    summary = run(tmp_path, "data.jsonl")

    assert (summary.rows_in, summary.kept, summary.refused, summary.duplicates) == (13, 12, 1, 0)
    assert summary.quarantine_path == str(tmp_path / "data" / "quarantine" / "run.jsonl")
    [record] = quarantined(tmp_path)
    assert set(record) == {"file", "row", "field", "reason", "raw"}
    assert (record["file"], record["row"], record["field"]) == ("data.jsonl", 5, field)
    assert reason in record["reason"]
    if isinstance(bad_row, dict):
        assert record["raw"] == bad_row
    else:  # raw text: the parsed value if it parsed, else the line itself
        try:
            assert record["raw"] == json.loads(bad_row)
        except json.JSONDecodeError:
            assert record["raw"] == bad_row


def test_duplicates_after_normalisation_are_refused(tmp_path: Path) -> None:
    rows = preference_rows(12)
    variant = {"prompt": " q question 0\r\n", "chosen": "good answer 0 ", "rejected": "\tbad answer 0"}
    write_jsonl(tmp_path / "data.jsonl", [rows[0], rows[1], variant, *rows[2:], rows[0]])

    summary = run(tmp_path, "data.jsonl")

    assert (summary.rows_in, summary.kept, summary.refused, summary.duplicates) == (14, 12, 2, 2)
    records = quarantined(tmp_path)
    assert [(r["row"], r["field"], r["reason"]) for r in records] == [
        (3, "<row>", "duplicate of row 1 in data.jsonl"),
        (14, "<row>", "duplicate of row 1 in data.jsonl"),
    ]
    assert len({row["id"] for row in prepared(tmp_path)}) == 12


def test_minority_kind_rows_are_refused_and_majority_kept(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [*prompt_rows(12), *sft_rows(2), *preference_rows(3)])

    summary = run(tmp_path, "data.jsonl")

    assert summary.kind == "prompt_only" and (summary.kept, summary.refused) == (12, 5)
    assert [r["row"] for r in quarantined(tmp_path)] == list(range(13, 18))


def test_a_clean_rerun_removes_the_stale_quarantine_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [*ROWS, {"prompt": "p"}])
    assert run(tmp_path, "data.jsonl").quarantine_path is not None
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert run(tmp_path, "data.jsonl").quarantine_path is None
    assert not (tmp_path / "data" / "quarantine" / "run.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# Fatal errors
# --------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        run(tmp_path, "nope.jsonl")


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.csv", "data.parquet"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text(" \n\n")
    with pytest.raises(DataError, match=f"{name}: file is empty"):
        run(tmp_path, name)


@pytest.mark.parametrize(("name", "content"), [("data.json", "[]"), ("data.csv", "prompt,chosen\n")])
def test_file_without_rows(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{name}: file holds no rows"):
        run(tmp_path, name)


def test_not_utf8_names_the_byte_offset(tmp_path: Path) -> None:
    payload = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'
    (tmp_path / "data.jsonl").write_bytes(payload)
    offset = payload.index(b"\xe9")
    with pytest.raises(DataError, match=rf"data.jsonl: not valid UTF-8 at byte offset {offset} \(line 2"):
        run(tmp_path, "data.jsonl")


def test_truncated_json(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text('[{"prompt": "a"},\n {"prompt": ')
    with pytest.raises(DataError, match="data.json: not valid JSON .*line 2"):
        run(tmp_path, "data.json")


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "data.tsv").write_text("prompt\tchosen\n")
    with pytest.raises(DataError, match="data.tsv: unknown extension '.tsv'"):
        run(tmp_path, "data.tsv")


def test_unknown_extension_inside_a_directory(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "raw" / "a.jsonl", ROWS)
    (tmp_path / "raw" / "b.tsv").write_text("prompt\tchosen\n")
    with pytest.raises(DataError, match="raw/b.tsv: unknown extension '.tsv'"):
        run(tmp_path, "raw")


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "data.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="data.parquet: not a readable parquet file"):
        run(tmp_path, "data.parquet")


def test_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "README.md").write_text("nothing here")
    with pytest.raises(DataError, match="raw: directory holds no data files"):
        run(tmp_path, "raw")


def test_rows_matching_no_format(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"data.jsonl: no row matches a known format .*\['text'\]"):
        run(tmp_path, "data.jsonl")


def test_kinds_in_equal_numbers_are_ambiguous(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [*prompt_rows(3), *sft_rows(3)])
    with pytest.raises(DataError, match="equal numbers"):
        run(tmp_path, "data.jsonl")


def test_all_rows_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 2 + ["{oops"])
    with pytest.raises(DataError, match="all 3 rows were refused.*run.jsonl"):
        run(tmp_path, "data.jsonl")
    assert [r["row"] for r in quarantined(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / "prepared" / "run").exists()


@pytest.mark.parametrize("eval_fraction", [1e-9, 1 - 1e-9])
def test_a_split_without_rows_is_fatal(tmp_path: Path, eval_fraction: float) -> None:
    write_jsonl(tmp_path / "data.jsonl", ROWS[:3])
    with pytest.raises(DataError, match="add data or change data.eval_fraction"):
        run(tmp_path, "data.jsonl", eval_fraction=eval_fraction)
    assert not (tmp_path / "prepared" / "run").exists()


# --------------------------------------------------------------------------------------------------
# Split, max_rows, outputs
# --------------------------------------------------------------------------------------------------
def _ids(root: Path, out: str, split: str) -> list[str]:
    return [row["id"] for row in read_jsonl(root / "prepared" / out / f"{split}.jsonl")]


def test_split_is_seeded_hash_and_independent_of_row_order(tmp_path: Path) -> None:
    rows = preference_rows(60)
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", random.Random(1).sample(rows, len(rows)))

    first = run(tmp_path, "a.jsonl", seed=7, out="a", eval_fraction=0.3)
    shuffled = run(tmp_path, "b.jsonl", seed=7, out="b", eval_fraction=0.3)
    other_seed = run(tmp_path, "a.jsonl", seed=8, out="c", eval_fraction=0.3)

    assert set(_ids(tmp_path, "a", "eval")) == set(_ids(tmp_path, "b", "eval"))
    assert set(_ids(tmp_path, "a", "eval")) != set(_ids(tmp_path, "c", "eval"))
    assert first.eval_rows == shuffled.eval_rows and first.train_rows + first.eval_rows == 60
    assert other_seed.rows_in == other_seed.kept + other_seed.refused == 60
    for row_id in _ids(tmp_path, "a", "train") + _ids(tmp_path, "a", "eval"):
        score = int(hashlib.sha256(f"7:{row_id}".encode()).hexdigest(), 16) / 16**64
        assert (score < 0.3) == (row_id in _ids(tmp_path, "a", "eval"))


def test_outputs_are_in_source_order_with_no_temporary_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    prepare_data(
        DataConfig(source="data.jsonl", eval_fraction=0.5), tmp_path / "deep" / "out", seed=0, root=tmp_path
    )

    assert sorted(path.name for path in (tmp_path / "deep" / "out").iterdir()) == [
        "eval.jsonl",
        "judge.jsonl",  # empty: no held-out judge split was asked for
        "train.jsonl",
    ]
    order = [f"q question {i}" for i in range(12)]
    for split in ("train", "eval"):
        prompts = [
            row["prompt"][0]["content"] for row in read_jsonl(tmp_path / "deep" / "out" / f"{split}.jsonl")
        ]
        assert prompts == sorted(prompts, key=order.index)


def test_max_rows_keeps_the_first_rows_in_source_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [*ROWS[:2], {"prompt": "p"}, *ROWS[2:]])

    summary = run(tmp_path, "data.jsonl", max_rows=8)

    assert (summary.rows_in, summary.kept, summary.refused) == (9, 8, 1)
    assert triples(prepared(tmp_path)) == expected_triples(ROWS[:8])


def test_summary_metrics_and_invariants(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [*ROWS, ROWS[0], "{"])
    summary = run(tmp_path, "data.jsonl")
    metrics = summary.as_metrics()
    assert metrics["rows_in"] == 14.0 and metrics["kept"] == 12.0 and metrics["refused"] == 2.0
    assert metrics["duplicates"] == 1.0 and metrics["refused_fraction"] == pytest.approx(2 / 14)
    assert metrics["train_rows"] + metrics["eval_rows"] == 12.0
    assert all(isinstance(value, float) for value in metrics.values())
    with pytest.raises(ValueError, match="rows_in"):
        PrepareSummary("preference", 5, 3, 1, 0, 2, 1, ["x"], None)


# --------------------------------------------------------------------------------------------------
# The real HH-RLHF sample
# --------------------------------------------------------------------------------------------------
def test_real_hh_rlhf_sample_is_ingested(tmp_path: Path) -> None:
    summary = prepare_data(
        DataConfig(source=str(HH_SAMPLE)), tmp_path / "prepared" / "hh", seed=0, root=tmp_path
    )

    assert summary.kind == "preference" and summary.rows_in == 1000
    assert summary.kept + summary.refused == 1000 and summary.kept >= 950
    records = read_jsonl(tmp_path / "data" / "quarantine" / "hh.jsonl") if summary.refused else []
    assert len(records) == summary.refused and len({r["row"] for r in records}) == summary.refused
    assert all(1 <= r["row"] <= 1000 and r["field"] and r["reason"] and r["raw"] for r in records)
    rows = prepared(tmp_path, "hh")
    assert len(rows) == summary.kept == summary.train_rows + summary.eval_rows
    assert 0.1 < summary.eval_rows / summary.kept < 0.3

    source = read_jsonl(HH_SAMPLE)
    first = next(
        row for row in rows if row["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    )
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert source[0]["chosen"].rstrip().endswith(first["chosen"][0]["content"])
    assert source[0]["rejected"].rstrip().endswith(first["rejected"][0]["content"])
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and row["prompt"][-1]["role"] == "user"
        assert row["chosen"] != row["rejected"] and "\n\nHuman:" not in row["chosen"][0]["content"]


# --------------------------------------------------------------------------------------------------
# Property: mixed valid and malformed rows; nothing is lost, every row is accounted for
# --------------------------------------------------------------------------------------------------
TEXT = st.text(alphabet="ab é\r\n\t", max_size=5)
VALUE = st.one_of(TEXT, TEXT, st.none(), st.integers(), st.lists(st.integers(), max_size=2))
ROW = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "extra"]), VALUE)
LINE = st.one_of(ROW.map(json.dumps), st.sampled_from(["{broken", "[1, 2]", "7", '"text"', "null"]))
BASE = [json.dumps(row) for row in preference_rows(16, "base")]  # a preference majority, both splits


def oracle(line: str) -> tuple[str, str, str] | None:
    """What the spec says a line normalises to: None when it must be refused (not a duplicate)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict):
        return None
    texts = [row.get(key) for key in ("prompt", "chosen", "rejected")]
    if not all(isinstance(text, str) for text in texts):
        return None
    cleaned = tuple(text.replace("\r\n", "\n").strip() for text in texts)
    if not all(cleaned) or cleaned[1] == cleaned[2]:
        return None
    return cleaned


@pytest.mark.parametrize("data_format", ["auto", "standard"])
@settings(max_examples=40, deadline=None)
@given(generated=st.lists(LINE, max_size=15), data=st.data())
def test_property_every_row_kept_or_refused(
    tmp_path_factory: pytest.TempPathFactory, data_format: str, generated: list[str], data: st.DataObject
) -> None:
    lines = data.draw(st.permutations([*generated, *BASE]))
    root = tmp_path_factory.mktemp("property")
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    summary = run(root, "data.jsonl", format=data_format)

    seen: set[tuple[str, str, str]] = set()
    refused_lines = []
    for number, line in enumerate(lines, start=1):
        key = oracle(line)
        if key is None or key in seen:
            refused_lines.append(number)
        else:
            seen.add(key)
    assert summary.rows_in == len(lines) == summary.kept + summary.refused
    assert summary.kept == len(seen) and summary.refused == len(refused_lines)
    assert triples(prepared(root)) == seen  # no valid row is lost, no invalid row is kept
    records = quarantined(root) if refused_lines else []
    assert [record["row"] for record in records] == refused_lines
    assert all(record["field"] and record["reason"] for record in records)
