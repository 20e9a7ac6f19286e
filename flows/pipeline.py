"""End-to-end pipeline: ingest -> train_tokenizer -> tokenize -> train_stackformer -> evaluate.

Wiring only: each stage lives in ``tasks/<stage>.py`` and exposes ``run(cfg, upstream) -> reference``.
"""

from __future__ import annotations

import importlib
from typing import Any

from infra.config import STAGES, PipelineConfig


class StageNotImplemented(RuntimeError):
    """The stage exists in the pipeline contract but this version of mqgen does not ship it."""


def select_stages(only: str | None = None, from_stage: str | None = None) -> list[str]:
    """The stages to run for ``--only`` / ``--from`` (mutually exclusive), in pipeline order."""
    for flag, value in (("--only", only), ("--from", from_stage)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{flag} {value!r} is not a stage; allowed: {', '.join(STAGES)}")
    if only and from_stage:
        raise ValueError("--only and --from are mutually exclusive")
    if only:
        return [only]
    if from_stage:
        return list(STAGES[STAGES.index(from_stage):])
    return list(STAGES)


def load_stage(stage: str) -> Any:
    try:
        return importlib.import_module(f"tasks.{stage}")
    except ModuleNotFoundError as e:
        if e.name != f"tasks.{stage}":
            raise
        raise StageNotImplemented(
            f"stage {stage!r} is not implemented yet in this version of mqgen; "
            f"stages available: {', '.join(s for s in STAGES if _exists(s)) or 'none'}") from None


def _exists(stage: str) -> bool:
    return importlib.util.find_spec(f"tasks.{stage}") is not None


def run_pipeline(cfg: PipelineConfig, only: str | None = None, from_stage: str | None = None) -> dict[str, Any]:
    """Run the selected stages in order, each receiving the references of the stages before it."""
    refs: dict[str, Any] = {}
    for stage in select_stages(only, from_stage):
        module = load_stage(stage)
        refs[stage] = module.run(cfg, refs, force=(from_stage is not None and stage == from_stage))
    return refs
