"""Ablation grids: many pipeline variants, every stage they have in common computed once, the rest on Ray.

``mqgen grid tokenizer.keep_ratio=[1.0,0.75,0.5] tokenizer.scorer=[learned,random]`` expands to the
variants of :func:`infra.config.expand_grid`. The grid goes stage by stage. At each stage the variants are
grouped by the configuration that stage (and everything upstream of it) reads: one group = one stage
execution, shared by all of its variants (every variant above reads the same ingest, so ingest runs once).
The groups of one stage run concurrently, each a Prefect task whose body is a Ray task (the local Ray
instance, or the cluster at ``RAY_ADDRESS``); the stage's own Ray Train / Ray task work runs inside it.
Evaluations run one at a time, so that their sampling speeds are measured on an otherwise idle machine.

MLflow: one parent run (kind ``grid``), one child run per variant (kind ``pipeline``, tagged with its axis
values, its figures logged as metrics when it finishes). A stage run that belongs to one variant hangs under
that variant's run; a stage run shared by several variants hangs under the grid run. ``mqgen compare``
reads this structure back. Wiring only: the stages, tracking and Ray helpers live in ``tasks/`` and
``infra/``.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import mark_crashed, prefect_run_tag, retry_unless_permanent, summary_figures
from flows.publish import publish_grid
from flows.stages import GRAPH, inputs_for, skip_reason
from infra.config import ConfigError, GridVariant, PipelineConfig, from_dict, replace, stable_hash
from infra.secrets import keep_private, private_value

# What each stage reads from the config (sections or single fields), cumulatively (a stage's inputs come from the
# stages before it). Two variants that agree on these share the stage's execution: it runs with the first
# variant's config and its output goes to all of them, so a field missing here that moves the stage's key gives
# every variant the first one's output. tests/flows/test_grid_grouping.py checks the table against the stages'
# keys, field by field. An over-wide entry only costs sharing.
# Performance settings (``ray.*``, ``data.num_workers``) are left out: they never change a stage's output, and
# two groups with equal stage keys must not run at once. Variants that differ only in them share executions.
# ``text`` counts for captioned data: tokenize builds the caption ids (vocab_size, max_len or a pretrained
# encoder's tokenizer), train_stackformer trains the text encoder (n_layer).
TOKENIZE_TEXT = ("text.vocab_size", "text.max_len", "text.pretrained")
STAGE_READS: dict[str, tuple[str, ...]] = {
    "ingest": ("seed", "data"),
    "train_tokenizer": ("seed", "data", "tokenizer"),
    "tokenize": ("seed", "data", "tokenizer", *TOKENIZE_TEXT),
    "train_evaluator": ("seed", "data", "evaluate.classifier"),
    "train_stackformer": ("seed", "data", "tokenizer", "text", "stackformer"),
    "evaluate": ("seed", "data", "tokenizer", "text", "stackformer", "evaluate"),
}
PERFORMANCE_FIELDS = {"data": ("num_workers",)}
GRID_STAGES = tuple(GRAPH)
assert set(STAGE_READS) == set(GRID_STAGES)
# Stages whose executions run one at a time: evaluate measures sampling speed, which must not share the machine
# with another variant's evaluation (the speeds of a grid would not be comparable).
ONE_AT_A_TIME = frozenset({"evaluate"})


def watch_stage(stage: str, futures: list[Any], root: str, interval_s: float = 60.0,
                submitted: float | None = None) -> None:
    """Wait for a stage's executions, saying every ``interval_s`` how many are done and where the running ones
    are (the progress records their training workers write, ``<root>/<stage>/<key>/progress.json``, written
    since ``submitted``, the wall time before the executions were submitted): a grid runs for hours with its
    stages in Ray tasks whose own progress lines the console does not show."""
    from prefect.futures import wait as wait_futures

    from infra.console import ProgressFile, fmt_duration, progress_text, say

    started, t0 = (time.time() if submitted is None else submitted), time.monotonic()
    while True:
        state = wait_futures(futures, timeout=interval_s)
        if not state.not_done:
            return
        running = []
        if "://" not in root:
            for path in sorted(Path(root).glob(f"{stage}/*/progress.json")):
                rec = ProgressFile.read(path)
                if rec and float(rec.get("time", 0)) >= started and rec.get("total") != rec.get("done"):
                    running.append(progress_text(path.parent.name, int(rec["done"]), rec.get("total"),
                                                 rec.get("unit", "steps"), float(rec.get("elapsed", 0.0)),
                                                 int(rec.get("start", 0)), {})[0].strip())
        say(f"  {stage}: {len(state.done)}/{len(futures)} executions done after "
            f"{fmt_duration(time.monotonic() - t0)}" + ("; running: " + "; ".join(running) if running else ""))


@dataclass
class GridResult:
    grid_run_id: str
    variant_run_ids: list[str]
    labels: list[str]
    refs: list[dict[str, Any]]
    executions: dict[str, int] = field(default_factory=dict)  # stage -> number of executions (groups)
    failed: dict[str, str] = field(default_factory=dict)  # variant label -> "stage: the error's first line"


class GridIncomplete(Exception):
    """Some variants of a grid failed; the others finished and their outputs, runs and report are kept.
    ``result`` holds the grid's outcome (:class:`GridResult` fields; ``failed`` names each failed variant's
    stage and error)."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect may pickle the flow's exception
        return (type(self), (str(self), self.result))


def aborts_grid(exc: BaseException) -> bool:
    """An error that stops the whole grid rather than one variant: an interruption (Ctrl-C, SIGTERM) or a full
    disk, which every other variant writing to the same run root would hit as well."""
    from infra.errors import is_no_space

    return not isinstance(exc, Exception) or is_no_space(exc)


def group_key(stage: str, cfg: PipelineConfig) -> str:
    """Identity of ``stage``'s execution for ``cfg``: equal for variants that can share it."""
    d = cfg.flat_dict()
    picked: dict[str, Any] = {}
    for path in STAGE_READS[stage]:
        value: Any = d
        for part in path.split("."):
            value = value[part]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in PERFORMANCE_FIELDS.get(path, ())}
        picked[path] = value
    return stable_hash({"stage": stage, **picked})


def run_stage_remote(item: tuple[str, dict[str, Any], dict[str, Any], str, int]) -> Any:
    """Body of one Ray task: run ``stage`` for the config dict on the outputs it reads (``refs``), with
    ``threads`` torch threads (Ray gives a task that reserves no CPU a single one). None: nothing to do
    (the stage is skipped for this config, e.g. no classifier for unlabelled data)."""
    import torch

    stage, config, refs, parent_run_id, threads = item
    torch.set_num_threads(threads)
    cfg = from_dict(PipelineConfig, config)
    inputs = inputs_for(stage, refs)
    if skip_reason(stage, cfg, inputs) is not None:
        return None
    return GRAPH[stage].module.run(cfg, inputs, parent_run_id=parent_run_id)


_IN_FLIGHT: set[Any] = set()  # Ray handles of the stage executions running now (cancelled when the grid fails)


def _dispatch(stage: str, label: str, config: dict[str, Any], refs: dict[str, Any], parent_run_id: str,
              threads: int) -> Any:
    from infra import ray as rayx

    return rayx.run_remote(run_stage_remote, (stage, config, refs, parent_run_id, threads), num_cpus=0,
                           in_flight=_IN_FLIGHT)


def _with_cpus(cfg: PipelineConfig, concurrent: int) -> PipelineConfig:
    """Automatic ``ray.cpus_per_worker``, decided here in the driver: the local machine's CPUs shared by the
    training workers of the ``concurrent`` executions (1 on a cluster). Not part of any stage key."""
    if cfg.ray.cpus_per_worker is not None:
        return cfg
    if os.environ.get("RAY_ADDRESS"):
        cpus = 1
    else:
        cpus = max(1, (os.cpu_count() or 1) // max(1, concurrent * cfg.ray.num_workers))
    return replace(cfg, ray={"cpus_per_worker": cpus})


def _absolute_root(variants: list[GridVariant]) -> list[PipelineConfig]:
    roots = {(v.config.run.root, v.config.run.experiment) for v in variants}
    if len(roots) != 1:
        raise ConfigError(f"grid variants must share run.root and run.experiment; got {sorted(roots)}")
    root = variants[0].config.run.root
    absolute = root if "://" in root else str(Path(root).expanduser().resolve())
    return [replace(v.config, run={"root": absolute}) for v in variants]


def grid_axes(variants: list[GridVariant]) -> dict[str, list[Any]]:
    """Every axis and its values in first-seen order, over all variants (the grids of an experiment file have
    different axes)."""
    axes: dict[str, list[Any]] = {}
    for gv in variants:
        for k, v in gv.axes.items():
            if v not in axes.setdefault(k, []):
                axes[k].append(v)
    return axes


@flow(name="mqgen-grid", log_prints=True, validate_parameters=False)
def grid_flow(variants: list[dict[str, Any]], name: str = "", fail_fast: bool = False) -> dict[str, Any]:
    """Parameters: each variant as ``{"axes": {...}, "overrides": [...], "config": {...}}``.

    A stage execution that fails (after its retries) fails the variants that share it; they run no later stage
    and their MLflow runs end FAILED, tagged with the stage and the error, while the other variants go on. The
    grid then publishes what finished and raises :class:`GridIncomplete`, so the flow run ends Failed.
    ``fail_fast`` stops every variant at the first failure instead (as an interruption or a full disk always
    does: :func:`aborts_grid`)."""
    from infra.tracking import Tracker, sigterm_raises

    gvs = [GridVariant(axes=v["axes"], overrides=list(v["overrides"]), config=from_dict(PipelineConfig, v["config"]))
           for v in private_value(variants)]
    cfgs = _absolute_root(gvs)
    axes = grid_axes(gvs)
    grid_hash = stable_hash([c.flat_dict() for c in cfgs])
    from infra import ray as rayx

    rayx.init_ray()  # first, in the flow's thread: Ray's processes die with the thread that started them
    tracker = Tracker(cfgs[0].run.root, cfgs[0].run.experiment)
    mark_crashed(tracker.mark_dead_runs_killed())
    grid_run = tracker.pipeline_run(grid_hash, kind="grid", name=name or f"grid-{grid_hash}",
                                    params={"grid.size": len(gvs),
                                            **{f"grid.axis.{k}": json.dumps(v) for k, v in axes.items()}},
                                    tags={"mqgen.grid.axes": json.dumps(list(axes)), "mqgen.preset": cfgs[0].preset,
                                          **prefect_run_tag()})
    runs = [tracker.pipeline_run(c.hash(), params=c.flat_dict(), parent_run_id=grid_run.run_id,
                                 name=f"variant-{gv.label}",
                                 tags={"mqgen.preset": c.preset, "mqgen.grid_run_id": grid_run.run_id,
                                       "mqgen.variant": gv.label,
                                       **{f"mqgen.axis.{k}": json.dumps(v) for k, v in gv.axes.items()}})
            for gv, c in zip(gvs, cfgs)]
    refs: list[dict[str, Any]] = [{} for _ in gvs]
    executions: dict[str, int] = {}
    failed: dict[int, str] = {}  # variant index -> "stage: error"
    stage_task = task(_dispatch, name="grid-stage", task_run_name="{stage}-{label}", cache_policy=NO_CACHE,
                      persist_result=False, retries=cfgs[0].run.retries,
                      retry_delay_seconds=cfgs[0].run.retry_delay_s, retry_condition_fn=retry_unless_permanent())
    with sigterm_raises(), grid_run:
        try:
            for stage in GRID_STAGES:
                groups: dict[str, list[int]] = {}
                for i, c in enumerate(cfgs):
                    if i not in failed:
                        groups.setdefault(group_key(stage, c), []).append(i)
                futures: list[tuple[list[int], Future[Any]]] = []
                submitted = time.time()  # progress records older than this are an earlier run's
                concurrent = 1 if stage in ONE_AT_A_TIME else len(groups)
                threads = max(1, (os.cpu_count() or 1) // max(1, concurrent))
                for members in groups.values():
                    first = members[0]
                    parent = runs[first].run_id if len(members) == 1 else grid_run.run_id
                    label = gvs[first].label if len(members) == 1 else f"shared-by-{len(members)}"
                    config = _with_cpus(cfgs[first], concurrent).to_dict()
                    future = stage_task.submit(stage, label, config, dict(refs[first]), parent, threads)
                    if stage in ONE_AT_A_TIME:
                        future.wait()
                    futures.append((members, future))
                watch_stage(stage, [f for _, f in futures], cfgs[0].run.root, submitted=submitted)
                for members, fut in futures:
                    try:
                        ref = fut.result()
                    except BaseException as e:
                        if fail_fast or aborts_grid(e):
                            raise
                        _variants_failed(stage, e, members, gvs, runs, failed)
                        continue
                    for i in members:
                        refs[i][stage] = ref  # None: skipped for this config
                        if ref is not None:
                            runs[i].set_tags({f"mqgen.{stage}.key": ref.key,
                                              f"mqgen.{stage}.run_id": ref.mlflow_run_id})
                executions[stage] = len(groups)
                grid_run.log_metrics({f"executions.{stage}": len(groups)})
            for run, r in zip(runs, refs):
                run.log_metrics(summary_figures(r))
            for i, run in enumerate(runs):
                run.finish("FAILED" if i in failed else "FINISHED")
        except BaseException as e:
            from infra.tracking import exit_status

            cancelled = rayx.cancel_all(_IN_FLIGHT)  # the other executions would run on for hours otherwise
            if cancelled:
                print(f"grid failed ({type(e).__name__}): cancelled {cancelled} running stage execution(s)")
            for run in runs:
                run.finish(exit_status(e))
            raise
        failed_by_label = {gvs[i].label: why for i, why in sorted(failed.items())}
        if failed:
            grid_run.set_tags({"mqgen.failed_variants": json.dumps(failed_by_label)})
    publish_grid(cfgs[0], grid_hash, name or f"grid-{grid_hash}", gvs, refs, [r.run_id for r in runs], executions,
                 tracker, grid_run.run_id, failed=failed_by_label)
    result = {"grid_run_id": grid_run.run_id, "variant_run_ids": [r.run_id for r in runs],
              "labels": [gv.label for gv in gvs], "executions": executions,
              "refs": [{k: v.to_dict() for k, v in r.items() if v is not None} for r in refs],
              "failed": failed_by_label}
    if failed:
        grid_run.finish("FAILED")
        raise GridIncomplete(f"{len(failed)} of {len(gvs)} grid variants failed (the others finished): "
                             + "; ".join(f"{label} at {why}" for label, why in failed_by_label.items()), result)
    return result


def _variants_failed(stage: str, error: BaseException, members: list[int], gvs: list[GridVariant], runs: list[Any],
                     failed: dict[int, str]) -> None:
    """Record that ``stage`` failed for the variants ``members`` (one shared execution): the full traceback goes to
    the log file and to each of their MLflow runs (``error/<stage>-traceback.txt``), the runs are tagged with the
    stage and the error's first line, and the console says the others go on."""
    import logging
    import traceback

    from infra.console import say
    from infra.errors import original_error
    from infra.secrets import redact_text

    text = redact_text("".join(traceback.format_exception(error)))  # a Ray task error: the remote traceback too
    error = original_error(error)
    first = redact_text(f"{type(error).__name__}: {str(error).strip()}".splitlines()[0])[:500]
    labels = ", ".join(gvs[i].label for i in members)
    logging.getLogger("mqgen.grid").error("stage %s failed for %s:\n%s", stage, labels, text,
                                          extra={"file_only": True})
    for i in members:
        failed[i] = f"{stage}: {first}"
        runs[i].set_tags({"mqgen.failed_stage": stage, "mqgen.error": first})
        runs[i].log_text(text, f"error/{stage}-traceback.txt")
    say(f"  {stage} failed for {labels} ({first}); "
        f"{'the other variants go on' if len(failed) < len(gvs) else 'no variant is left'}")


def run_grid(variants: list[GridVariant], name: str = "", fail_fast: bool = False) -> GridResult:
    """Run the grid as a Prefect flow (ephemeral API unless ``PREFECT_API_URL`` is set). Raises
    :class:`GridIncomplete` (with the outcome) when some variants failed and the others finished."""
    if not variants:
        raise ConfigError("the grid has no variants")
    payload = [{"axes": v.axes, "overrides": v.overrides, "config": v.config.to_dict()} for v in variants]
    # Prefect records the payload redacted when it holds credentials
    out = grid_flow(keep_private(payload), name=name, fail_fast=fail_fast)
    return grid_result(out)


def grid_result(out: dict[str, Any]) -> GridResult:
    """The :class:`GridResult` of the grid flow's return value (or of :attr:`GridIncomplete.result`)."""
    return GridResult(grid_run_id=out["grid_run_id"], variant_run_ids=out["variant_run_ids"], labels=out["labels"],
                      refs=out["refs"], executions=out["executions"], failed=dict(out.get("failed") or {}))


__all__ = ["GRID_STAGES", "STAGE_READS", "GridIncomplete", "GridResult", "grid_flow", "grid_result", "group_key",
           "run_grid"]
