"""DVC helpers: record a prepared dataset as a DVC version and read back its digest.

The ``prepare`` stage of ``dvc.yaml`` declares ``data/prepared`` as its output, so ``dvc repro``
versions it by itself. When the Prefect flow (or ``alignflow stage prepare`` outside DVC) writes the
same directory, ``dvc commit`` records it the same way: one mechanism, one ``dvc.lock`` entry, whose
md5 is the dataset version logged to MLflow.

A single file outside ``dvc.yaml`` (the preference dataset that ``alignflow retrain`` appends to) is
versioned with ``dvc add``: its ``.dvc`` pointer holds the md5, and ``git_commit`` can record the
pointer in git.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


class VersioningError(RuntimeError):
    """A DVC command failed; the message holds the command and DVC's own output."""


def inside_dvc_repro() -> bool:
    """``dvc repro`` sets DVC_STAGE for the commands it runs; it then versions outputs itself."""
    return bool(os.environ.get("DVC_STAGE"))


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir()


def dvc(root: Path, *args: str, timeout: float = 600) -> str:
    """Run ``dvc ARGS`` in ``root`` and return its output; raise with DVC's message on failure."""
    command = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if done.returncode != 0:
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {root}:\n{done.stderr or done.stdout}")
    return done.stdout


def locked_out_md5(root: Path, stage: str, out_path: str) -> str | None:
    """The md5 that ``dvc.lock`` records for ``out_path`` of ``stage`` (None if not recorded)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get(stage, {}).get("outs", []):
        if Path(out.get("path", "")) == Path(out_path):
            return out.get("md5")
    return None


def commit_stage(root: Path, stage: str, out_path: str, *, push: bool) -> str:
    """``dvc commit`` the outputs of ``stage`` (and push them); return the md5 of ``out_path``."""
    if not is_dvc_repo(root):
        raise VersioningError(
            f"{root} is not a DVC repository (no .dvc/): run `dvc init` there, or set run.dvc: false"
        )
    dvc(root, "commit", "--force", stage)
    if push:
        dvc(root, "push", stage)
    md5 = locked_out_md5(root, stage, out_path)
    if md5 is None:
        raise VersioningError(f"dvc.lock in {root} has no entry for {out_path} of stage {stage!r}")
    return md5


# --------------------------------------------------------------------------------------------------
# Single files outside dvc.yaml (the retrain preference dataset): a `.dvc` pointer beside the file
# --------------------------------------------------------------------------------------------------
def pointer_path(path: str) -> str:
    """The ``.dvc`` pointer that ``dvc add PATH`` writes."""
    return f"{path}.dvc"


def pointer_md5(root: Path, path: str) -> str | None:
    """The md5 that ``PATH.dvc`` records (None when the file is not DVC-tracked)."""
    pointer = root / pointer_path(path)
    if not pointer.is_file():
        return None
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs", [])
    return outs[0].get("md5") if outs else None


def add_file(root: Path, path: str, *, push: bool) -> str:
    """``dvc add PATH`` (a new version in the DVC cache and its ``.dvc`` pointer), then ``dvc push`` it
    to the default remote when ``push``; return the md5 that the pointer records."""
    if not is_dvc_repo(root):
        raise VersioningError(
            f"{root} is not a DVC repository (no .dvc/): run `dvc init` there, or set run.dvc: false"
        )
    dvc(root, "add", "--quiet", path)
    if push:
        dvc(root, "push", "--quiet", pointer_path(path))
    md5 = pointer_md5(root, path)
    if md5 is None:
        raise VersioningError(f"`dvc add {path}` in {root} wrote no md5 to {pointer_path(path)}")
    return md5


def git_commit(root: Path, paths: list[str], message: str) -> None:
    """``git add`` then ``git commit`` of ``paths`` only (whatever else is staged stays staged)."""
    for command in (["git", "add", "--", *paths], ["git", "commit", "--quiet", "-m", message, "--", *paths]):
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise VersioningError(f"`{' '.join(command)}` failed in {root}:\n{done.stderr or done.stdout}")
