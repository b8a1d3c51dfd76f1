"""The ``prepare_sft`` stage: ``data.sft_source`` prepared by the prepare code, for the ``sft`` stage only.

With ``data.sft_source`` set, SFT reads this stage's output instead of ``prepare``'s, so its cache key
no longer depends on ``data.source``: new preference rows (``alignflow retrain``) re-run the reward
model and the policy, and leave the SFT model cached. The source takes any form ``data.source`` takes;
its rows are read in whatever format they are (``format: auto``) and all of them are kept
(``data.max_rows`` is for the preference data). Refused rows go to
``<data.quarantine_dir>/prepared_sft.jsonl``. Nothing is DVC-committed here: the source is versioned
where it lives (e.g. a ``.dvc`` pointer of its own).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from stages.prepare import PREPARED_FILES, prepare_data
from stages.runner import StageContext, StageOutput, hash_files

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageOutput:
    data = ctx.config.data
    if not data.sft_source:
        raise ValueError("stage prepare_sft needs data.sft_source (the SFT stage's own data source)")
    config = data.model_copy(update={"source": data.sft_source, "format": "auto", "max_rows": None})
    prepared_dir = ctx.out_dir / "prepared_sft"  # its name is the quarantine file's name
    summary = prepare_data(config, prepared_dir, seed=ctx.config.run.seed, root=ctx.root)
    (prepared_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2))
    for name in PREPARED_FILES:  # the sft stage reads <output>/train.jsonl
        shutil.copyfile(prepared_dir / name, ctx.out_dir / name)
    if summary.quarantine_path:
        log.warning("prepare_sft: %d of %d rows refused; reasons in %s", summary.refused, summary.rows_in,
                    summary.quarantine_path)
        if ctx.tracker is not None:
            ctx.tracker.log_artifact(Path(summary.quarantine_path), "quarantine")
    return StageOutput(
        metrics=summary.as_metrics(),
        info={
            "kind": summary.kind,
            "source": data.sft_source,
            "quarantine": summary.quarantine_path,
            # the same rows under other params keep SFT cached
            "content_key": hash_files(ctx.out_dir, PREPARED_FILES),
        },
    )
