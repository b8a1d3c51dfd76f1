"""The ``base`` stage: resolve the base model (importing the packaged GGUF once) and fingerprint it."""

from __future__ import annotations

from stages.models import base_fingerprint, resolve_base
from stages.runner import StageContext, StageOutput


def run(ctx: StageContext) -> StageOutput:
    path = resolve_base(ctx.config.model)
    return StageOutput(info={"path": path, "content_key": base_fingerprint(path)[:20]})
