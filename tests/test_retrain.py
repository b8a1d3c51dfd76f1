"""Retraining on new preference data.

Ingestion on its own (names, bad files, quarantine, de-duplication, concurrent processes); the retrain
flow under a real Prefect server with a real MLflow SQLite store and a real DVC repository, on a tiny
random-init model (three drops: new rows with some bad ones, two files taken by two runs started at
once, duplicates only); the promotion gate; and the ingest, promote and rollback commands.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import yaml

from stages.config import load_config, validate
from stages.ingest import IngestError, drop_files, ingest, safe_name
from stages.promotion import CHALLENGER, CHAMPION, Registry, gate
from tests.conftest import REPO, make_project, tiny_params

HH_SAMPLE = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"
needs_hh = pytest.mark.skipif(not HH_SAMPLE.is_file(), reason="shared HH sample not beside the checkout")
BAD_ROWS = [
    '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}',  # rejected missing
    "not json at all",
    '{"prompt": "p", "chosen": "same", "rejected": "same"}',  # chosen == rejected
]


def hh_lines(start: int, stop: int) -> list[str]:
    """Rows ``start:stop`` of the HH sample's short dialogues (the tiny model trains fast on short pairs)."""
    from stages.prepare import check_rows, read_bytes

    lines = HH_SAMPLE.read_text(encoding="utf-8").splitlines()
    rows = read_bytes(HH_SAMPLE.read_bytes(), HH_SAMPLE.name, "hh")
    short: dict[str, str] = {}  # valid pairs, each once (the sample repeats and breaks a few)
    for row, record, _ in check_rows(rows, "hh", "hh"):
        if record and max(len(json.loads(lines[row.row - 1])[key]) for key in ("chosen", "rejected")) < 400:
            short.setdefault(record["id"], lines[row.row - 1])
    return list(short.values())[start:stop]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def dataset_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def no_dvc(root: Path, **retrain) -> tuple:
    return validate({"run": {"dvc": False}, "retrain": retrain}), root


# --------------------------------------------------------------------------------------------------
# Names: nothing escapes the incoming location
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", ".", "..", "../x.jsonl", "/etc/passwd", "a/b.jsonl", "..\\x.jsonl",
                                  "C:\\x.jsonl", "x\x00.jsonl", "x\n.jsonl", "a" * 201 + ".jsonl"])
def test_safe_name_refuses_names_that_could_escape(name):
    with pytest.raises(IngestError, match="refused"):
        safe_name(name)


def test_drop_files_refuses_traversal_and_copies_under_the_plain_name(tmp_path):
    config, root = no_dvc(tmp_path)
    source = write_lines(tmp_path / "outside" / "new.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}'])
    for bad in ("..", str(tmp_path / "outside" / ".."), "../..", str(tmp_path / "outside" / ".hidden.jsonl"),
                str(tmp_path / "outside" / "notes.txt")):
        with pytest.raises(IngestError):
            drop_files([bad], config, root)
    assert drop_files([str(source)], config, root) == ["new.jsonl"]
    incoming = tmp_path / "data" / "incoming"
    assert sorted(p.name for p in incoming.iterdir()) == ["new.jsonl"]  # no temporary .part left
    with pytest.raises(IngestError, match="already waiting"):
        drop_files([str(source)], config, root)


def test_links_directories_and_bad_names_are_left_alone_never_followed(tmp_path):
    config, root = no_dvc(tmp_path)
    secret = write_lines(tmp_path / "secret.jsonl", hh_lines(0, 2) if HH_SAMPLE.is_file() else ["{}"])
    incoming = tmp_path / "data" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "link.jsonl").symlink_to(secret)
    (incoming / "sub").mkdir()
    summary = ingest(config, root)
    assert summary.no_new_data and summary.new == 0
    assert {r.name: r.status for r in summary.files} == {"link.jsonl": "skipped", "sub": "skipped"}
    assert "symbolic link" in next(r.reason for r in summary.files if r.name == "link.jsonl")
    assert (incoming / "link.jsonl").is_symlink() and secret.is_file()  # not moved, not read
    assert not (tmp_path / "data" / "preferences" / "preferences.jsonl").exists()

    # any fsspec location: a name with a separator in it is refused, not read
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/incoming-test/..\\escape.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    summary = ingest(*no_dvc(tmp_path, incoming="memory://incoming-test"))
    assert [(r.name, r.status) for r in summary.files] == [("..\\escape.jsonl", "skipped")]
    assert "path separator" in summary.files[0].reason


# --------------------------------------------------------------------------------------------------
# Ingestion: validation, quarantine, de-duplication, rejected files
# --------------------------------------------------------------------------------------------------
@needs_hh
def test_ingest_quarantines_bad_rows_dedupes_and_rejects_unusable_files(tmp_path):
    config, root = no_dvc(tmp_path)
    incoming = tmp_path / "data" / "incoming"
    write_lines(incoming / "a.jsonl", hh_lines(0, 6) + BAD_ROWS)
    write_lines(incoming / "b.jsonl", hh_lines(4, 9) + hh_lines(8, 9))  # 2 rows of a.jsonl, one twice in itself
    (incoming / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (incoming / "empty.jsonl").write_bytes(b"")
    write_lines(incoming / "prompts.jsonl", ['{"prompt": "only a prompt"}'])
    summary = ingest(config, root)

    files = {r.name: r for r in summary.files}
    assert (files["a.jsonl"].rows_in, files["a.jsonl"].kept, files["a.jsonl"].refused, files["a.jsonl"].new) == \
        (9, 6, 3, 6)
    assert (files["b.jsonl"].kept, files["b.jsonl"].duplicates, files["b.jsonl"].new) == (6, 3, 3)
    assert summary.rows_in == summary.kept + summary.refused and summary.new == 9
    assert {name for name, r in files.items() if r.status == "rejected"} == {"latin1.jsonl", "empty.jsonl",
                                                                             "prompts.jsonl"}
    assert "UTF-8" in files["latin1.jsonl"].reason and "empty" in files["empty.jsonl"].reason

    # exactly the bad rows are quarantined, each with file, row, field and reason
    quarantined = [json.loads(line) for line in Path(files["a.jsonl"].quarantine).read_text().splitlines()]
    assert [(q["file"], q["row"]) for q in quarantined] == [("data/incoming/a.jsonl", row) for row in (7, 8, 9)]
    assert [q["field"] for q in quarantined] == ["rejected", "<row>", "rejected"]
    assert all(q["reason"] for q in quarantined)

    # the dataset holds each good row once; every file moved aside, the rejected ones with their reason
    ids = dataset_ids(tmp_path / "data" / "preferences" / "preferences.jsonl")
    assert len(ids) == len(set(ids)) == 9 == summary.dataset_rows
    assert not [p for p in incoming.iterdir() if p.is_file()]
    assert len(list((incoming / "processed").iterdir())) == 2
    reasons = sorted((incoming / "rejected").glob("*.reason.txt"))
    assert len(reasons) == 3 and "UTF-8" in next(p for p in reasons if "latin1" in p.name).read_text()

    # the same rows again: nothing new
    write_lines(incoming / "again.jsonl", hh_lines(0, 9))
    again = ingest(config, root)
    assert again.no_new_data and again.duplicates == 9 and again.files[0].status == "processed"
    assert dataset_ids(tmp_path / "data" / "preferences" / "preferences.jsonl") == ids


def _ingest_in_process(root: str, ready: float) -> dict:
    while time.time() < ready:  # start together
        time.sleep(0.001)
    summary = ingest(validate({"run": {"dvc": False}}), Path(root))
    return {"processed": [r.name for r in summary.files if r.status == "processed"], "new": summary.new}


@needs_hh
def test_concurrent_ingestion_takes_each_file_exactly_once(tmp_path):
    incoming = tmp_path / "data" / "incoming"
    for number in range(8):
        write_lines(incoming / f"drop{number}.jsonl", hh_lines(number * 5, number * 5 + 5))
    context = multiprocessing.get_context("spawn")
    ready = time.time() + 8  # after the workers' imports
    with context.Pool(3) as pool:
        results = pool.starmap(_ingest_in_process, [(str(tmp_path), ready)] * 3)
    taken = sorted(name for result in results for name in result["processed"])
    assert taken == sorted(f"drop{number}.jsonl" for number in range(8))  # each once: none twice, none lost
    assert sum(result["new"] for result in results) == 40
    ids = dataset_ids(tmp_path / "data" / "preferences" / "preferences.jsonl")
    assert len(ids) == len(set(ids)) == 40
    moved = sorted(p.name.split("-", 1)[1] for p in (incoming / "processed").iterdir())
    assert moved == taken


# --------------------------------------------------------------------------------------------------
# The gate on its own
# --------------------------------------------------------------------------------------------------
def test_gate_rules():
    first = gate("win_rate_vs_champion", 0.02, challenger="1", champion=None)
    assert first.decision == "promoted" and first.champion_after == "1" and "first champion" in first.reason
    # 3 wins, 1 tie, 1 loss of 5: win rate 0.7 > 0.52
    win = gate("win_rate_vs_champion", 0.02, challenger="2", champion="1",
               challenger_scores=[1, 1, 1, 0, 0], champion_scores=[0, 0, 0, 0, 1])
    assert (win.decision, win.champion_after) == ("promoted", "2")
    assert (win.challenger_score, win.champion_score) == pytest.approx((0.7, 0.3))
    # all ties: 0.5 is not above 0.52
    tie = gate("win_rate_vs_champion", 0.02, challenger="3", champion="2",
               challenger_scores=[1, 2], champion_scores=[1, 2])
    assert (tie.decision, tie.champion_after, tie.challenger_score) == ("rejected", "2", 0.5)
    mean = gate("judge_score_mean", 0.1, challenger="3", champion="2", challenger_scores=[0.5, 0.7],
                champion_scores=[0.5, 0.55])
    assert mean.decision == "rejected" and mean.bar == pytest.approx(0.625)


def test_retrain_profile_is_valid_and_keeps_sft_off_the_preference_data():
    from flows.retrain import retrain_config
    from stages.runner import STAGES, pipeline_order

    config = retrain_config(load_config(REPO / "params/retrain.yaml"))
    assert config.data.source == config.retrain.dataset and config.data.task == "preference"
    assert STAGES["sft"].inputs(config) == ("base", "prepare_sft")
    assert "prepare_sft" in pipeline_order(config) and "label" not in pipeline_order(config)


def test_prepare_reruns_when_its_source_file_changes(tmp_path):
    """The data source is part of prepare's cache key: rows appended by a retrain are never missed."""
    from stages.runner import stage_key

    config = validate({"data": {"task": "preference", "source": "pairs.jsonl"}})
    write_lines(tmp_path / "pairs.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}'])
    before = stage_key("prepare", config, {}, tmp_path)
    assert stage_key("prepare", config, {}, tmp_path) == before
    write_lines(tmp_path / "pairs.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}'] * 2)
    assert stage_key("prepare", config, {}, tmp_path) != before
    builtin = validate({})  # no local source: the key is as it always was
    assert stage_key("prepare", builtin, {}, tmp_path) == stage_key("prepare", builtin, {})


# --------------------------------------------------------------------------------------------------
# The retrain flow
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("retrain-project")
    lengths = {"max_length": 192}  # the short dialogues of hh_lines fit
    params = tiny_params(
        tiny_model_dir, root,
        data={"task": "preference", "source": "data/preferences/preferences.jsonl", "max_rows": None,
              "sft_source": "sft.jsonl"},
        sft={"source": "chosen", **lengths}, reward=lengths, dpo=lengths,
    )
    write_lines(root / "sft.jsonl", hh_lines(0, 24))
    return make_project(root, params)


@pytest.fixture(scope="module")
def drops(project, prefect_server):
    """Drop 1: 24 new rows and 3 bad ones. Drop 2: two files, two retrain runs started at once.
    Drop 3: rows of drop 1 only."""
    from flows.retrain import retrain

    incoming = project / "data" / "incoming"
    write_lines(incoming / "drop1.jsonl", hh_lines(100, 112) + BAD_ROWS + hh_lines(112, 124))
    first = retrain(params="params.yaml", root=str(project))
    md5_first = yaml.safe_load((project / "data/preferences/preferences.jsonl.dvc").read_text())["outs"][0]["md5"]

    write_lines(incoming / "drop2a.jsonl", hh_lines(130, 150))
    write_lines(incoming / "drop2b.jsonl", hh_lines(150, 160))
    concurrent: dict[str, dict] = {}

    def run(name: str) -> None:
        concurrent[name] = retrain(params="params.yaml", root=str(project))

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    second = next(result for result in concurrent.values() if result["status"] == "retrained")
    idle = next(result for result in concurrent.values() if result is not second)

    write_lines(incoming / "drop3.jsonl", hh_lines(100, 110))
    third = retrain(params="params.yaml", root=str(project))
    return {"first": first, "second": second, "idle": idle, "third": third, "md5_first": md5_first}


def client_for(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@needs_hh
def test_bad_rows_of_a_drop_are_quarantined_and_the_good_ones_kept(drops, project):
    ingested = drops["first"]["ingest"]
    assert (ingested["rows_in"], ingested["kept"], ingested["refused"], ingested["new"]) == (27, 24, 3, 24)
    (report,) = ingested["files"]
    quarantined = [json.loads(line) for line in Path(report["quarantine"]).read_text().splitlines()]
    assert [q["row"] for q in quarantined] == [13, 14, 15]
    assert all({"file", "row", "field", "reason"} <= set(q) for q in quarantined)
    assert report["moved_to"].startswith("data/incoming/processed/")


@needs_hh
def test_two_drops_make_two_dvc_versions(drops, project):
    pointer = yaml.safe_load((project / "data/preferences/preferences.jsonl.dvc").read_text())["outs"][0]
    md5_first, md5_second = drops["md5_first"], drops["second"]["ingest"]["dataset_md5"]
    assert md5_first != md5_second == pointer["md5"] == drops["third"]["ingest"]["dataset_md5"]
    for md5 in (md5_first, md5_second):
        assert (project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()
        assert (project / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()  # dvc push
    assert len(dataset_ids(project / "data/preferences/preferences.jsonl")) == 24 + 30


@needs_hh
def test_sft_is_trained_once_and_reward_and_policy_retrain(drops):
    first, second = drops["first"], drops["second"]
    assert {"base", "prepare_sft", "sft"} <= set(second["cached"])
    assert second["outputs"]["sft"] == first["outputs"]["sft"]
    for stage in ("prepare", "reward", "dpo", "evaluate"):
        assert stage not in second["cached"] and second["outputs"][stage] != first["outputs"][stage]


@needs_hh
def test_each_retrain_registers_a_version_and_records_a_gate_decision(drops, project):
    client = client_for(project)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='alignflow-policy'"))
    assert versions == [1, 2]  # the idle concurrent run and the duplicates-only drop trained nothing

    (first,) = drops["first"]["decisions"]
    assert (first["decision"], first["challenger"], first["champion_before"], first["champion_after"]) == \
        ("promoted", "1", None, "1")
    (second,) = drops["second"]["decisions"]
    assert second["challenger"] == "2" and second["champion_before"] == "1"
    # human preference data has no gold judge: the held-out judge, never the reward model DPO's run trained
    assert second["decision"] in ("promoted", "rejected") and second["judged_by"] == "held_out_rm"
    assert 0.0 <= second["challenger_score"] <= 1.0 and second["champion_score"] == pytest.approx(
        1.0 - second["challenger_score"])
    assert second["champion_after"] == ("2" if second["decision"] == "promoted" else "1")

    registry = Registry.open(validate({"run": {"tracking_uri": f"sqlite:///{project / 'mlflow.db'}"}}).run, project)
    assert registry.alias(CHALLENGER) == "2" and registry.alias(CHAMPION) == second["champion_after"]

    # the decisions, both scores, the versions and the data version are on the retrain runs
    for result, decision in ((drops["first"], first), (drops["second"], second)):
        run = client.get_run(result["mlflow_run_id"])
        assert run.data.tags["alignflow.decision"] == decision["decision"]
        assert run.data.tags["alignflow.challenger_version"] == decision["challenger"]
        assert run.data.tags["alignflow.dataset_md5"] == result["ingest"]["dataset_md5"]
        assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [result["ingest"]["dataset_md5"]]
    metrics = client.get_run(drops["second"]["mlflow_run_id"]).data.metrics
    assert metrics["gate/challenger_score"] == second["challenger_score"]
    assert metrics["gate/champion_score"] == second["champion_score"]


@needs_hh
def test_a_champion_whose_output_is_gone_is_fetched_from_the_registry(drops, project, tmp_path):
    from stages.promotion import policy_result

    elsewhere = validate({"run": {"tracking_uri": f"sqlite:///{project / 'mlflow.db'}",
                                  "output_dir": str(tmp_path / "elsewhere")}})
    result = policy_result(Registry.open(elsewhere.run, project), "1", elsewhere, project)
    assert result.path.is_relative_to(tmp_path) and result.info["policy"]
    assert (result.model_dir / "config.json").is_file() and list(result.model_dir.glob("*.safetensors"))


@needs_hh
def test_decisions_are_prefect_artifacts(drops):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        wanted = ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-decision"]))
        artifacts = client.read_artifacts(artifact_filter=wanted)
    assert len(artifacts) == 2
    assert any("first champion" in artifact.data for artifact in artifacts)


@needs_hh
def test_two_runs_at_once_take_each_file_once(drops, project):
    assert drops["idle"]["status"] == "no new data"
    taken = sorted(file["name"] for file in drops["second"]["ingest"]["files"])
    assert taken == ["drop2a.jsonl", "drop2b.jsonl"] and drops["second"]["ingest"]["new"] == 30
    processed = sorted(p.name.split("-", 1)[1] for p in (project / "data/incoming/processed").iterdir())
    assert processed == ["drop1.jsonl", "drop2a.jsonl", "drop2b.jsonl", "drop3.jsonl"]
    ids = dataset_ids(project / "data/preferences/preferences.jsonl")
    assert len(ids) == len(set(ids))


@needs_hh
def test_a_drop_of_duplicates_only_trains_nothing(drops, project):
    third = drops["third"]
    assert third["status"] == "no new data" and third["decisions"] == []
    assert (third["ingest"]["duplicates"], third["ingest"]["new"]) == (10, 0)
    assert not any((project / "data/incoming").glob("*.jsonl"))  # moved to processed/ all the same


# --------------------------------------------------------------------------------------------------
# The commands: promote, rollback, ingest
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def registry_project(tmp_path):
    """A params file and an MLflow store with three registered versions (no model files needed)."""
    from mlflow import MlflowClient

    params = {"run": {"tracking_uri": "sqlite:///mlflow.db", "dvc": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("alignflow-policy")
    for _ in range(3):
        client.create_model_version("alignflow-policy", source=(tmp_path / "model").as_uri())
    return tmp_path, client


def test_promote_and_rollback_move_the_champion_and_are_recorded(registry_project, capsys):
    from flows.cli import main

    root, client = registry_project
    args = ["--params", "params.yaml", "--root", str(root)]

    def champion() -> str:
        return str(client.get_model_version_by_alias("alignflow-policy", CHAMPION).version)

    assert main(["rollback", *args]) == 1 and "no champion" in capsys.readouterr().err
    for version in ("1", "3", "2"):
        assert main(["promote", version, "--reason", f"test {version}", *args]) == 0
        assert champion() == version
    assert main(["promote", "2", *args]) == 1 and "already the champion" in capsys.readouterr().err
    assert main(["promote", "9", *args]) == 1 and "no version '9'" in capsys.readouterr().err
    assert main(["rollback", "--reason", "bad outputs", *args]) == 0 and champion() == "3"
    assert "rollback" in capsys.readouterr().out
    assert main(["rollback", *args]) == 0 and champion() == "1"
    assert main(["rollback", *args]) == 1 and "no previous champion" in capsys.readouterr().err

    runs = client.search_runs([client.get_experiment_by_name("alignflow").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [(r.data.tags["alignflow.decision"], r.data.tags["alignflow.champion_version"]) for r in runs] == [
        ("manual_promote", "1"), ("manual_promote", "3"), ("manual_promote", "2"), ("rollback", "3"),
        ("rollback", "1")]
    assert runs[3].data.tags["alignflow.reason"] == "bad outputs"
    assert runs[3].data.tags["alignflow.previous_champion_version"] == "2"
    assert client.get_model_version("alignflow-policy", "2").tags["alignflow.rolled_back"]


def test_ingest_command_copies_files_and_emits_the_arrival_event(tmp_path, prefect_server, capsys):
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from flows.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"run": {"dvc": False}}))
    args = ["--params", "params.yaml", "--root", str(tmp_path)]
    source = write_lines(tmp_path / "upload" / "batch-7.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}'])
    assert main(["ingest", str(tmp_path / "upload" / ".."), *args]) == 1
    assert "refused" in capsys.readouterr().err
    assert main(["ingest", str(source), *args]) == 0
    assert (tmp_path / "data" / "incoming" / "batch-7.jsonl").read_text() == source.read_text()

    event_filter = EventFilter(event=EventNameFilter(name=["alignflow.preferences.arrived"]))
    deadline = time.time() + 30
    with get_client(sync_client=True) as client:
        while not (events := client.read_events(filter=event_filter, limit=50).events) and time.time() < deadline:
            time.sleep(0.5)
    assert [event.resource.id for event in events] == ["alignflow.incoming.batch-7.jsonl"]


def test_retrain_stops_before_ingesting_when_the_tracking_server_is_down(tmp_path, tiny_model_dir):
    import socket

    from flows.retrain import retrain
    from stages.preflight import PreflightError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket is closed
    root = tmp_path / "p"
    drop = {"prompt": "Is it going to rain?", "chosen": "It may; take an umbrella.", "rejected": "No idea."}
    write_lines(root / "data" / "incoming" / "drop.jsonl", [json.dumps(drop)] * 3)
    make_project(root, tiny_params(tiny_model_dir, root, run={"tracking_uri": url},
                                   data={"task": "preference", "source": "data/preferences/preferences.jsonl"}))

    with pytest.raises(PreflightError, match=url):
        retrain.fn(params="params.yaml", root=str(root))
    assert (root / "data" / "incoming" / "drop.jsonl").is_file()  # not taken: it waits for the next run
    assert not (root / "data" / "preferences").exists()
