"""Ingest preference files dropped into ``retrain.incoming`` into the DVC-versioned preference dataset.

One call of :func:`ingest` runs under a file lock on the dataset (:func:`dataset_lock`), so two
retrain runs never take the same file, nor lose one:

1. **List** the regular files directly in the incoming location (a directory of the project or any
   fsspec URL). Hidden names (``.name``: e.g. a copy still in progress) are not looked at. A name that
   could escape the location (``..``, a path separator, control characters) and anything that is not a
   regular file (a directory, a symbolic link) is refused, left where it is and reported, never
   followed.
2. **Validate** each file row by row with the prepare stage's own code (``stages.prepare``: the same
   readers, format detection and field checks). Refused rows go to
   ``<data.quarantine_dir>/incoming-<stamp>-<name>.jsonl`` as ``{file, row, field, reason, raw}``;
   ``rows_in = kept + refused`` and ``kept = new + duplicates`` are checked for every file.
3. **De-duplicate** the kept rows against the dataset and within the drop, on prepare's row id (the
   sha256 of the normalised prompt/chosen/rejected).
4. **Append** the new rows (normalised, one JSON object per line) to ``retrain.dataset`` through a
   temporary file and a rename, and make the file a new DVC version: ``dvc add``, ``dvc push`` when
   ``run.dvc_push``, ``git add`` + ``git commit`` of its ``.dvc`` pointer when ``retrain.git_commit``.
   If versioning fails, the dataset and its pointer are put back as they were.
5. **Move** each file aside, so that it is never ingested twice: to ``<incoming>/processed/<stamp>-<name>``,
   or, when the file cannot be used at all (not UTF-8, empty, an unknown format, every row refused),
   to ``<incoming>/rejected/<stamp>-<name>`` with the reason in ``<stamp>-<name>.reason.txt`` beside it.
   A crash between 4 and 5 leaves the files in place; the next run finds their rows already in the
   dataset (duplicates) and moves them then.

``<stamp>`` is the UTC time of the run, ``YYYYmmddTHHMMSSZ``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from stages.config import Config, RetrainConfig
from stages.prepare import FILE_READERS, DataError, all_refused_message, check_rows, read_bytes, write_quarantine

log = logging.getLogger(__name__)

PROCESSED = "processed"
REJECTED = "rejected"
PREFERENCE = "preference"
MAX_NAME_BYTES = 200  # leaves room for the stamp and the quarantine prefix within a 255-byte file name

Record = dict[str, Any]


class IngestError(ValueError):
    """An incoming file or name cannot be taken; the message names it and says why."""


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileReport:
    """What happened to one entry of the incoming location."""

    name: str
    status: Literal["processed", "rejected", "skipped"]  # skipped: refused name or not a regular file, left in place
    rows_in: int = 0
    kept: int = 0  # rows that passed validation
    refused: int = 0  # rows quarantined
    duplicates: int = 0  # kept rows already in the dataset or earlier in this drop
    new: int = 0  # kept rows appended to the dataset
    moved_to: str | None = None
    quarantine: str | None = None
    reason: str | None = None  # why the file was rejected or skipped

    def __post_init__(self) -> None:
        if self.rows_in != self.kept + self.refused:
            raise ValueError(f"{self.name}: rows_in {self.rows_in} != kept {self.kept} + refused {self.refused}")
        if self.kept != self.new + self.duplicates:
            raise ValueError(f"{self.name}: kept {self.kept} != new {self.new} + duplicates {self.duplicates}")


@dataclass(frozen=True)
class IngestSummary:
    """One ingestion: every file's report and the dataset version it left."""

    incoming: str
    dataset: str
    files: list[FileReport]
    dataset_rows: int  # rows in the dataset after this ingestion
    dataset_md5: str | None  # md5 of the dataset file (None: no dataset yet)
    versioned: bool  # dataset_md5 is the DVC version in the .dvc pointer (False: run.dvc is off)

    def _total(self, name: str) -> int:
        return sum(getattr(report, name) for report in self.files)

    @property
    def rows_in(self) -> int:
        return self._total("rows_in")

    @property
    def kept(self) -> int:
        return self._total("kept")

    @property
    def refused(self) -> int:
        return self._total("refused")

    @property
    def duplicates(self) -> int:
        return self._total("duplicates")

    @property
    def new(self) -> int:
        return self._total("new")

    @property
    def no_new_data(self) -> bool:
        return self.new == 0

    def by_status(self, status: str) -> list[FileReport]:
        return [report for report in self.files if report.status == status]

    def as_metrics(self) -> dict[str, float]:
        counts = {name: getattr(self, name) for name in ("rows_in", "kept", "refused", "duplicates", "new")}
        counts |= {f"files_{status}": len(self.by_status(status)) for status in (PROCESSED, REJECTED, "skipped")}
        return {f"ingest/{name}": float(value) for name, value in counts.items()} | {
            "ingest/dataset_rows": float(self.dataset_rows)}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {name: getattr(self, name) for name in ("rows_in", "kept", "refused", "duplicates",
                                                                      "new", "no_new_data")}

    def describe(self) -> str:
        if not self.files:
            return f"no new data: nothing in {self.incoming}"
        version = f"DVC md5 {self.dataset_md5}" if self.versioned else f"md5 {self.dataset_md5} (not DVC-versioned)"
        head = "no new data" if self.no_new_data else f"{self.new} new rows"
        return (f"{head}: {len(self.by_status(PROCESSED))} files processed, {len(self.by_status(REJECTED))} "
                f"rejected, {len(self.by_status('skipped'))} skipped; rows in {self.rows_in} = kept {self.kept} + "
                f"refused {self.refused}; duplicates {self.duplicates}; {self.dataset}: {self.dataset_rows} rows, "
                f"{version}")

    def markdown(self) -> str:
        lines = [f"### Ingestion from `{self.incoming}`", "", self.describe(), ""]
        if self.files:
            lines += ["| file | status | rows in | kept | refused | duplicates | new | moved to / reason |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| `{r.name}` | {r.status} | {r.rows_in} | {r.kept} | {r.refused} | {r.duplicates} | {r.new} "
                      f"| {_cell(r.reason or r.moved_to or '')} |" for r in self.files]
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


# --------------------------------------------------------------------------------------------------
# Names, locations, the lock
# --------------------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    """``name`` when it is one plain file name, else ``IngestError``: it could escape the location."""
    problem = None
    if name in ("", ".", ".."):
        problem = "is empty or a directory reference ('.', '..')"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator (an absolute path or a path into another directory)"
    elif any(ord(char) < 32 or ord(char) == 127 for char in name):
        problem = "holds control characters"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise IngestError(f"file name {name!r} {problem}: refused; an incoming file must have a plain file name, "
                          "directly in the incoming location")
    return name


def incoming_location(retrain: RetrainConfig, root: Path):
    """``(fsspec filesystem, path)`` of ``retrain.incoming``: a URL, or a directory relative to ``root``."""
    import fsspec

    if "://" in retrain.incoming:
        fs, path = fsspec.core.url_to_fs(retrain.incoming)
    else:
        fs, path = fsspec.filesystem("file"), str((root / Path(retrain.incoming).expanduser()).resolve())
    return fs, path.rstrip("/") or "/"


def dataset_lock(retrain: RetrainConfig, root: Path):
    """The file lock that serialises ingestion (and whole retrain runs) on one dataset:
    ``.<dataset name>.lock`` beside it. Re-entrant within a thread; other threads and processes wait."""
    from filelock import FileLock

    dataset = (root / retrain.dataset).resolve()
    dataset.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(dataset.with_name(f".{dataset.name}.lock"), is_singleton=True)


# --------------------------------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------------------------------
def ingest(config: Config, root: Path, *, now: datetime | None = None) -> IngestSummary:
    """Take every new preference file from ``retrain.incoming`` into ``retrain.dataset`` (see the module
    docstring); return what happened. Nothing new (or nothing there) is a summary with ``no_new_data``."""
    root = Path(root).resolve()
    retrain = config.retrain
    with dataset_lock(retrain, root):
        dataset = root / retrain.dataset
        _ignore_lock_in_git(dataset)
        fs, base = incoming_location(retrain, root)
        names, skipped = list_incoming(fs, base)
        for report in skipped:
            log.warning("ingest: %s", report.reason)
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")

        # Validate, de-duplicate
        known = _dataset_ids(dataset, retrain.dataset)
        reports, new_rows = [], []
        for name in names:
            quarantine_file = root / config.data.quarantine_dir / f"incoming-{stamp}-{name}.jsonl"
            report, rows = _check_file(fs, base, name, f"{retrain.incoming}/{name}", known, quarantine_file)
            reports.append(report)
            new_rows += rows

        # Append, version
        if new_rows:
            md5, versioned = _append_and_version(config, root, new_rows)
        else:
            md5, versioned = _current_version(config, root)

        # Move aside
        reports = [_move_aside(fs, base, retrain.incoming, report, stamp) for report in reports]
        summary = IngestSummary(
            incoming=retrain.incoming, dataset=retrain.dataset, files=reports + skipped,
            dataset_rows=_count_lines(dataset), dataset_md5=md5, versioned=versioned,
        )
    log.info("ingest: %s", summary.describe())
    return summary


def list_incoming(fs, base: str) -> tuple[list[str], list[FileReport]]:
    """The names of the files to ingest (sorted), and reports of the entries refused and left in place."""
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return [], []
    prefix = base.rstrip("/") + "/"
    names, skipped = [], []
    for entry in entries:
        full = entry["name"].rstrip("/")
        if full == base.rstrip("/"):
            continue  # some stores list the directory itself
        name = full[len(prefix):] if full.startswith(prefix) else full
        if entry["type"] == "directory" and name in (PROCESSED, REJECTED):
            continue
        try:
            safe_name(name)
        except IngestError as error:
            skipped.append(FileReport(name, "skipped", reason=str(error)))
            continue
        if name.startswith("."):
            continue  # hidden: e.g. a copy in progress (`alignflow ingest` writes .<name>.<id>.part, then renames)
        if entry.get("islink") or entry["type"] != "file":
            what = "a symbolic link" if entry.get("islink") else f"a {entry['type']}"
            skipped.append(FileReport(name, "skipped", reason=(
                f"{name!r} is {what}, not a regular file: left in place and not followed; only regular files "
                "directly in the incoming location are ingested")))
            continue
        names.append(name)
    return sorted(names), skipped


def _check_file(fs, base: str, name: str, display: str, known: set[str],
                quarantine_file: Path) -> tuple[FileReport, list[Record]]:
    """Validate one file as prepare does; its report (not yet moved) and its new rows (``known`` grows)."""
    try:
        raw_rows = read_bytes(fs.cat_file(f"{base}/{name}"), name, display)
        checked = list(check_rows(raw_rows, "auto", display, kind=PREFERENCE))
    except DataError as error:
        return FileReport(name, REJECTED, reason=str(error)), []
    quarantine = [refusal for _, _, refusal in checked if refusal is not None]
    records = [record for _, record, _ in checked if record is not None]
    new = []
    for record in records:
        if record["id"] not in known:
            known.add(record["id"])
            new.append(record)
    quarantine_path = write_quarantine(quarantine, quarantine_file)
    if quarantine:
        log.warning("ingest: %s: %d of %d rows refused; reasons in %s", display, len(quarantine), len(raw_rows),
                    quarantine_path)
    reason = all_refused_message(display, quarantine, quarantine_path) if not records else None
    return FileReport(
        name, REJECTED if reason else PROCESSED, rows_in=len(raw_rows), kept=len(records), refused=len(quarantine),
        duplicates=len(records) - len(new), new=len(new),
        quarantine=_shown(quarantine_path) if quarantine_path else None, reason=reason,
    ), new


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is below it (what the user reads)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _dataset_ids(dataset: Path, display: str) -> set[str]:
    """Row ids of the dataset's valid rows (what new rows are de-duplicated against)."""
    data = dataset.read_bytes() if dataset.is_file() else b""
    if not data.strip():
        return set()
    rows = read_bytes(data, dataset.name, display)
    return {record["id"] for _, record, _ in check_rows(rows, "auto", display, kind=PREFERENCE) if record}


def _move_aside(fs, base: str, incoming: str, report: FileReport, stamp: str) -> FileReport:
    folder = PROCESSED if report.status == PROCESSED else REJECTED
    fs.makedirs(f"{base}/{folder}", exist_ok=True)
    target = f"{stamp}-{report.name}"
    number = 1
    while fs.exists(f"{base}/{folder}/{target}"):  # the same name twice within a second
        number += 1
        target = f"{stamp}-{number}-{report.name}"
    fs.mv(f"{base}/{report.name}", f"{base}/{folder}/{target}")
    if report.status == REJECTED:
        fs.pipe_file(f"{base}/{folder}/{target}.reason.txt", f"{report.reason}\n".encode())
        log.warning("ingest: rejected %s: %s", report.name, report.reason)
    return replace(report, moved_to=f"{incoming}/{folder}/{target}")


# --------------------------------------------------------------------------------------------------
# The dataset file and its versions
# --------------------------------------------------------------------------------------------------
def _append_and_version(config: Config, root: Path, rows: list[Record]) -> tuple[str, bool]:
    """Append ``rows`` and version the dataset; on any failure put the dataset and its pointer back."""
    from stages.versioning import pointer_path

    dataset = root / config.retrain.dataset
    pointer = root / pointer_path(config.retrain.dataset)
    backup = dataset.with_name(f".{dataset.name}.previous")
    had_dataset = dataset.is_file()
    if had_dataset:
        shutil.copyfile(dataset, backup)
    old_pointer = pointer.read_bytes() if pointer.is_file() else None
    try:
        _append(dataset, rows)
        return _version(config, root, len(rows))
    except BaseException:
        if had_dataset:
            os.replace(backup, dataset)
        else:
            dataset.unlink(missing_ok=True)
        if old_pointer is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_bytes(old_pointer)
        raise
    finally:
        backup.unlink(missing_ok=True)


def _append(dataset: Path, rows: list[Record]) -> None:
    """The old bytes plus one line per row, written to a temporary file and renamed into place."""
    temporary = dataset.with_name(f".{dataset.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        if dataset.is_file():
            shutil.copyfile(dataset, temporary)
        with open(temporary, "ab") as stream:
            if not _ends_with_newline(temporary):
                stream.write(b"\n")  # a last line without its newline would merge with the first new row
            stream.writelines((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows)
        os.replace(temporary, dataset)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _ends_with_newline(path: Path) -> bool:
    """True for an empty file too (nothing to terminate)."""
    size = path.stat().st_size if path.exists() else 0
    if not size:
        return True
    with path.open("rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"


def _version(config: Config, root: Path, new_rows: int) -> tuple[str, bool]:
    from stages.versioning import add_file, git_commit, pointer_path

    path = config.retrain.dataset
    if not config.run.dvc:
        return _md5(root / path), False
    md5 = add_file(root, path, push=config.run.dvc_push)
    if config.retrain.git_commit:
        gitignore = str(Path(path).parent / ".gitignore")
        git_commit(root, [pointer_path(path), gitignore], f"alignflow retrain: {path} +{new_rows} rows (md5 {md5})")
    return md5, True


def _current_version(config: Config, root: Path) -> tuple[str | None, bool]:
    from stages.versioning import pointer_md5

    dataset = root / config.retrain.dataset
    if not dataset.is_file():
        return None, False
    md5 = _md5(dataset)
    return md5, config.run.dvc and pointer_md5(root, config.retrain.dataset) == md5


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # what DVC records for a file
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _ignore_lock_in_git(dataset: Path) -> None:
    """Keep the lock file (and the backup) out of git: a line in the dataset directory's .gitignore."""
    gitignore = dataset.parent / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    wanted = [f"/.{dataset.name}.lock", f"/.{dataset.name}.previous"]
    missing = [line for line in wanted if line not in lines]
    if missing:
        with gitignore.open("a") as handle:
            if lines and not gitignore.read_text().endswith("\n"):
                handle.write("\n")
            handle.write("".join(f"{line}\n" for line in missing))


# --------------------------------------------------------------------------------------------------
# Dropping files (`alignflow ingest FILE...`)
# --------------------------------------------------------------------------------------------------
def drop_files(sources: list[str], config: Config, root: Path) -> list[str]:
    """Copy local files (or fsspec URLs) into the incoming location under their own, validated names;
    return the names. Each is written under a hidden temporary name and renamed, so ingestion never reads
    half a file. Every name is checked before anything is copied."""
    import fsspec

    fs, base = incoming_location(config.retrain, Path(root).resolve())
    names: list[str] = []
    for source in sources:
        name = safe_name(posixpath.basename(str(source)))
        if name.startswith("."):
            raise IngestError(f"{source}: hidden names (starting with '.') are never ingested; rename the file")
        if _extension(name) not in FILE_READERS:
            raise IngestError(f"{source}: unknown extension; incoming files must be {', '.join(FILE_READERS)} "
                              "(optionally .gz)")
        source_fs, source_path = fsspec.core.url_to_fs(str(source))
        if not source_fs.isfile(source_path):
            raise IngestError(f"{source}: not a file")
        if name in names or fs.exists(f"{base}/{name}"):
            raise IngestError(f"{source}: a file named {name!r} is already waiting in {config.retrain.incoming}; "
                              "rename it, or let the waiting one be ingested first")
        names.append(name)
    fs.makedirs(base, exist_ok=True)
    for source, name in zip(sources, names, strict=True):
        partial = f"{base}/.{name}.{uuid.uuid4().hex}.part"
        with fsspec.open(str(source), "rb") as reader, fs.open(partial, "wb") as writer:
            shutil.copyfileobj(reader, writer)
        fs.mv(partial, f"{base}/{name}")
    return names


def _extension(name: str) -> str:
    path = Path(name[:-3] if name.lower().endswith(".gz") else name)
    return path.suffix.lower()
