"""End-to-end pipeline: ingest -> train_tokenizer -> tokenize -> train_stackformer -> evaluate.

Wiring only. Each stage lives in ``tasks/<stage>.py`` and exposes ``run(cfg, upstream, force)`` plus a
Prefect task ``<stage>_task`` wrapping it. Every stage caches and resumes on its own (commit markers,
checkpoints, LMDB done keys), so a rerun of a finished config skips every stage and a crashed one
resumes where it stopped. Importing this module starts nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
from pathlib import Path
from typing import Any

from infra.config import STAGES, PipelineConfig, from_dict


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
    if importlib.util.find_spec(f"tasks.{stage}") is None:
        available = [s for s in STAGES if importlib.util.find_spec(f"tasks.{s}") is not None]
        raise StageNotImplemented(f"stage {stage!r} is not implemented yet in this version of mqgen; "
                                  f"stages available: {', '.join(available) or 'none'}")
    return importlib.import_module(f"tasks.{stage}")


def stage_status(cfg: PipelineConfig) -> list[dict[str, str]]:
    """Per stage: ``done`` (verified output for this config), ``not done`` (its inputs are ready: the next
    run computes or resumes it), ``waiting`` (an upstream stage is not done) or ``not implemented``."""
    rows: list[dict[str, str]] = []
    refs: dict[str, Any] = {}
    blocked = False
    for stage in STAGES:
        row = {"stage": stage, "state": "waiting", "key": "", "path": "", "run_id": ""}
        try:
            module = load_stage(stage)
        except StageNotImplemented:
            row["state"] = "not implemented"
            rows.append(row)
            blocked = True
            continue
        ref = None if blocked else module.cached(cfg, refs)
        if ref is not None:
            refs[stage] = ref
            row.update(state="done", key=ref.key, path=ref.path, run_id=ref.mlflow_run_id)
        elif not blocked:
            row["state"] = "not done"
            blocked = True
        rows.append(row)
    return rows


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pipeline(config: dict[str, Any], only: str | None = None, from_stage: str | None = None) -> dict[str, Any]:
    """The flow body: one MLflow parent run, then each selected stage as a Prefect task, in order."""
    from infra.tracking import Tracker

    cfg = from_dict(PipelineConfig, config)
    stages = select_stages(only, from_stage)
    modules = {s: load_stage(s) for s in stages}  # fail before any work when a stage is missing
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    parent = tracker.pipeline_run(cfg.hash(), params=cfg.to_dict(),
                                  tags={"mqgen.preset": cfg.preset, "mqgen.git_commit": _git_commit(),
                                        "mqgen.stages": ",".join(stages)})
    refs: dict[str, Any] = {"_parent_run_id": parent.run_id}
    with parent:
        for stage in stages:
            task = getattr(modules[stage], f"{stage}_task")
            ref = task(cfg, refs, force=(stage == from_stage))
            refs[stage] = ref
            parent.set_tags({f"mqgen.{stage}.key": getattr(ref, "key", ""),
                             f"mqgen.{stage}.run_id": getattr(ref, "mlflow_run_id", "")})
    return {k: v for k, v in refs.items() if not k.startswith("_")}


def run_pipeline(cfg: PipelineConfig, only: str | None = None, from_stage: str | None = None) -> dict[str, Any]:
    """Run the selected stages as a Prefect flow (ephemeral API unless ``PREFECT_API_URL`` is set)."""
    from prefect import flow

    pipeline_flow = flow(name="mqgen-pipeline", flow_run_name=f"{cfg.preset}-{cfg.hash()}",
                         log_prints=True, validate_parameters=False)(_pipeline)
    return pipeline_flow(cfg.to_dict(), only=only, from_stage=from_stage)
