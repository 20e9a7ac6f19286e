"""End-to-end pipeline: ingest -> train_tokenizer -> tokenize -> train_stackformer -> evaluate.

Wiring only. Each stage lives in ``tasks/<stage>.py`` and exposes ``run(cfg, inputs, *, force, parent_run_id)``
plus a Prefect task ``<stage>_task`` wrapping it; :mod:`flows.stages` holds the graph that says which outputs
feed which stage. Every stage caches and resumes on its own (commit markers,
checkpoints, LMDB done keys), so a rerun of a finished config skips every stage and a crashed one
resumes where it stopped. Prefect adds retries (``run.retries``), the run history and JSON results (the
stage references, never pickles). Importing this module starts nothing.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.publish import publish_artifacts, publish_failure, record_lineage, registry_step
from flows.stages import GRAPH, cached_refs, descendants, inputs_for, skip_reason
from infra.config import STAGES, PipelineConfig, from_dict, stable_hash
from infra.console import fmt_bytes, fmt_duration, route_stage_logs_to_prefect, say, stage_log, stage_log_path
from infra.errors import NoSpaceLeft, exception_chain, is_no_space, no_space_message
from infra.secrets import keep_private, private_value
from infra.storage import nearest_key_change

log = logging.getLogger("mqgen")


def select_stages(only: str | None = None, from_stage: str | None = None) -> list[str]:
    """The stages to run for ``--only`` / ``--from`` (mutually exclusive), in pipeline order. ``--from`` selects
    the stage and every stage that reads its output, directly or not."""
    for flag, value in (("--only", only), ("--from", from_stage)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{flag} {value!r} is not a stage; allowed: {', '.join(STAGES)}")
    if only and from_stage:
        raise ValueError("--only and --from are mutually exclusive")
    if only:
        return [only]
    if from_stage:
        later = descendants(from_stage)
        return [s for s in STAGES if s in later]
    return list(STAGES)


def stage_status(cfg: PipelineConfig) -> list[dict[str, str]]:
    """Per stage: ``done`` (verified output for this config), ``skipped`` (nothing to do for this config, e.g.
    no evaluator classifier for unlabelled data), ``damaged`` (an output is there but does not verify: the next
    run sets it aside and builds it again; ``path`` says what is wrong), ``not done`` (its inputs are ready: the
    next run computes or resumes it) or ``waiting`` (an output it reads is not done). A ``not done`` stage shows
    the key it will have and, in ``why``, how the nearest earlier output of that stage on the root differs (a
    changed setting, a new stage version, a retrained upstream), where one recorded its key document."""
    skipped: dict[str, str] = {}
    damaged: dict[str, Any] = {}
    from infra.registry import pending

    refs = cached_refs(cfg, skipped, damaged)
    left = {marker.parent for marker in pending(refs)}  # registry work a tracking outage left to the next run
    rows: list[dict[str, str]] = []
    for stage in STAGES:
        row = {"stage": stage, "state": "waiting", "key": "", "path": "", "run_id": "", "why": ""}
        if stage in skipped:
            row.update(state="skipped", path=skipped[stage])
        elif stage in damaged:
            e = damaged[stage]
            row.update(state="damaged", key=e.out_dir.name, path=f"{e.out_dir}: {e.reason}")
        elif stage in refs:
            ref = refs[stage]
            row.update(state="done", key=ref.key, path=ref.path, run_id=ref.mlflow_run_id)
            if Path(ref.path) in left:
                row["why"] = ("the tracking server was down when it finished: the next `mqgen run` "
                              + ("decides the promotion" if stage == "evaluate" else "registers its model"))
        elif all(n in refs for n in GRAPH[stage].needs):
            row.update(state="not done", **_key_change(cfg, stage, refs))
        rows.append(row)
    return rows


def _key_change(cfg: PipelineConfig, stage: str, refs: dict[str, Any]) -> dict[str, str]:
    """``key`` (the key a not-done stage will have) and ``why`` (what differs from its nearest earlier output)."""
    try:
        doc = GRAPH[stage].module.key_doc(cfg, inputs_for(stage, refs))
    except (ValueError, FileNotFoundError) as e:  # inputs that do not fit, an extractor missing: run will say
        return {"why": f"(its key cannot be computed yet: {e})"}
    key = stable_hash(doc)
    change = nearest_key_change(cfg.run.root, stage, doc, key)
    return {"key": key, "why": change.describe() if change is not None else ""}


def retry_unless_permanent(own_condition: Any = None) -> Any:
    """A Prefect retry condition: never for a permanent failure (:func:`infra.errors.is_permanent`: bad config,
    bad data, a refused checkpoint, inputs that do not fit together), else ``own_condition``."""
    from infra.errors import is_permanent

    def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException) and is_permanent(exc):
            return False
        return own_condition(task, task_run, state) if own_condition else True

    return retry_condition


def stage_task(stage: str, cfg: PipelineConfig, result_storage: Any = None) -> Any:
    """The stage's Prefect task with this config's retries, and its JSON results kept under the run root."""
    base = GRAPH[stage].task
    retry_condition = retry_unless_permanent(base.retry_condition_fn)
    from prefect.cache_policies import CacheKeyFnPolicy

    # One JSON result record per task run, never a cache hit: whether a stage is done is decided by its own
    # verified output on disk (a Prefect record proves a past run, not today's disk).
    options: dict[str, Any] = {"retries": cfg.run.retries, "retry_delay_seconds": cfg.run.retry_delay_s,
                               "retry_condition_fn": retry_condition,
                               "cache_policy": CacheKeyFnPolicy(cache_key_fn=_record_key)}
    if result_storage is not None:
        options["result_storage"] = result_storage
    return base.with_options(**options)


def _record_key(ctx: Any, parameters: dict[str, Any]) -> str:
    return f"{ctx.task.name}-{ctx.task_run.id}.json"


def _result_storage(cfg: PipelineConfig) -> Any:
    """A saved LocalFileSystem block at ``<run.root>/prefect-results`` (Prefect wants result storage saved
    server-side); None for a remote root (Prefect's default storage then)."""
    if "://" in cfg.run.root:
        return None
    from prefect.filesystems import LocalFileSystem

    from infra.config import stable_hash

    results = Path(cfg.run.root).resolve() / "prefect-results"
    block = LocalFileSystem(basepath=str(results))
    block.save(f"mqgen-results-{stable_hash(str(results))}", overwrite=True)
    return block


# Figures copied from the stage references onto the pipeline's (or grid variant's) run, for comparisons.
SUMMARY_FROM = {"evaluate": "", "train_tokenizer": "tokenizer.", "train_stackformer": "stackformer."}


def summary_figures(refs: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of a finished pipeline (evaluation, tokenizer and Stackformer validation)."""
    out: dict[str, float] = {}
    for stage, prefix in SUMMARY_FROM.items():
        ref = refs.get(stage)
        for k, v in (getattr(ref, "metrics", None) or {}).items():
            if isinstance(v, (int, float)) and not math.isnan(v):  # drop None and NaN
                out[prefix + k] = float(v)
    return out


TAG_FLOW_RUN = "mqgen.prefect_flow_run_id"


def prefect_run_tag() -> dict[str, str]:
    """The current Prefect flow run's id as an MLflow tag (links the two histories)."""
    from prefect.runtime import flow_run

    return {TAG_FLOW_RUN: str(flow_run.id)} if flow_run.id else {}


def mark_crashed(dead_runs: dict[str, dict[str, str]]) -> list[str]:
    """Prefect flow runs of pipeline processes that died (their MLflow runs were just marked KILLED) end
    Crashed instead of showing Running forever. Returns the flow run ids changed."""
    from prefect import get_client
    from prefect.states import Crashed

    ids = [tags[TAG_FLOW_RUN] for tags in dead_runs.values() if tags.get(TAG_FLOW_RUN)]
    changed = []
    if ids:
        with get_client(sync_client=True) as client:
            for fid in ids:
                try:
                    run = client.read_flow_run(fid)
                    if run.state is not None and not run.state.is_final():
                        client.set_flow_run_state(fid, Crashed(message="its process died (found by the next run)"),
                                                  force=True)
                        changed.append(fid)
                except Exception as e:  # noqa: BLE001 - another API / a deleted database: nothing to mark
                    print(f"could not mark Prefect flow run {fid} Crashed: {e}")
    return changed


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    cfg = private_value(params.get("config") or {})
    return f"{cfg.get('preset', 'config')}-{from_dict(PipelineConfig, cfg).hash() if cfg else 'default'}"


@flow(name="mqgen-pipeline", flow_run_name=_flow_run_name, log_prints=True, validate_parameters=False)
def pipeline_flow(config: dict[str, Any], only: str | None = None, from_stage: str | None = None,
                  gc_keep_days: float | None = None) -> dict[str, Any]:
    """The whole pipeline (or ``only`` one stage, or ``from_stage`` on) for one config, given as a dict (a
    deployment's parameters). One MLflow parent run; each selected stage as a Prefect task, in order. With
    ``gc_keep_days``, a finished run then reclaims disk on its root (:mod:`flows.gc`; never this config's outputs)."""
    from infra.tracking import Tracker, git_commit, sigterm_raises

    cfg = from_dict(PipelineConfig, private_value(config))
    route_stage_logs_to_prefect()
    stages = select_stages(only, from_stage)
    storage = _result_storage(cfg)
    tasks = {s: stage_task(s, cfg, storage) for s in stages}
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    mark_crashed(tracker.mark_dead_runs_killed())
    parent = tracker.pipeline_run(cfg.hash(), params=cfg.flat_dict(),
                                  tags={"mqgen.preset": cfg.preset, "mqgen.git_commit": git_commit(),
                                        "mqgen.stages": ",".join(stages), **prefect_run_tag()})
    refs: dict[str, Any] = {}
    durations: dict[str, float] = {}
    reused: set[str] = set()
    with sigterm_raises(), parent:
        for i, stage in enumerate(stages, 1):
            say(f"[{i}/{len(stages)}] {stage}")
            t0, started = time.perf_counter(), time.time()
            with stage_log(stage):
                try:
                    if any(n not in refs for n in GRAPH[stage].needs):  # stages not selected: their cached outputs
                        refs = {**cached_refs(cfg), **refs}
                        # the chain this run reads, recorded now: `mqgen gc` keeps what a running run uses
                        parent.set_tags({f"mqgen.{s}.key": r.key for s, r in refs.items() if r is not None})
                    inputs = inputs_for(stage, refs)
                    why = skip_reason(stage, cfg, inputs)
                    if why is not None:
                        refs[stage] = None
                        say(f"  skipped: {why}")
                        continue
                    ref = tasks[stage](cfg, inputs, force=from_stage is not None,  # --from: this stage and later
                                       parent_run_id=parent.run_id)
                except BaseException as e:
                    failed = stage_failed(stage, e, cfg, tracker, parent.run_id, refs)
                    publish_failure(cfg, stages, refs, durations, stage, failed, tracker, parent.run_id, reused=reused)
                    raise failed from e
            refs[stage] = ref
            durations[stage] = time.perf_counter() - t0
            if was_reused(stage, ref, started):
                reused.add(stage)
            say(f"  done in {fmt_duration(durations[stage])}: {describe_output(stage, ref)}")
            parent.set_tags({f"mqgen.{stage}.key": ref.key, f"mqgen.{stage}.run_id": ref.mlflow_run_id})
        parent.log_metrics(summary_figures(refs))
        decision = registry_step(cfg, refs, tracker, parent, promote="evaluate" in stages)
        record_lineage({s: refs[s] for s in stages if refs.get(s) is not None}, tracker, parent)
        if decision is not None:
            say(f"promotion: {decision.summary()}")
        publish_artifacts(cfg, {s: refs.get(s) for s in stages if s in refs}, durations, decision, tracker,
                          parent.run_id, reused=reused)
        if gc_keep_days is not None:
            collect_garbage(cfg, gc_keep_days, parent)
    return {k: v for k, v in refs.items() if k in stages and v is not None}


def was_reused(stage: str, ref: Any, started: float) -> bool:
    """Whether ``ref`` was a cache hit: its completion marker was written before the stage started (at ``started``,
    wall clock)."""
    from flows.gc import MARKERS, SUCCESS

    path = getattr(ref, "path", None)
    if not path or "://" in str(path):
        return False
    try:
        return (Path(path) / MARKERS.get(stage, SUCCESS)).stat().st_mtime < started
    except OSError:
        return False


def touch_outputs(refs: dict[str, Any]) -> None:
    """Mark the outputs a cached run reused as used now (their folders' modification time), since such a run records
    no MLflow run: ``mqgen gc`` keeps what changed in its last ``--keep-days``."""
    import os

    for ref in refs.values():
        path = getattr(ref, "path", None)
        if path and "://" not in str(path):
            try:
                os.utime(path)
            except OSError:
                pass  # (a read-only root: its outputs stay as they are)


def collect_garbage(cfg: PipelineConfig, keep_days: float, parent: Any = None) -> None:
    """``mqgen gc --yes --keep-days N`` for this config after its run, recorded on the pipeline run (when given).
    A failure here is logged, never the run's: the stages are done."""
    from flows import gc

    try:
        _, done = gc.collect(cfg, keep_days=keep_days)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reclaiming disk is a courtesy after a finished run
        log.warning("gc after the run failed (%s: %s); the run's outputs are complete", type(e).__name__, e)
        return
    in_use = f", {len(done.in_use)} in use left" if done.in_use else ""
    say(f"gc: removed {done.count} folder(s), {fmt_bytes(done.size)} freed{in_use} (kept {keep_days:g} days)")
    if parent is not None:
        parent.log_metrics({"gc_removed": done.count, "gc_freed_bytes": done.size})


# What `mqgen run` (and the failure summary in Prefect) advises per kind of error.
ADVICE = {
    "ConfigError": "fix the configuration value named above (`mqgen config show` prints the resolved config) "
                   "and run the same command again",
    "UnsafeCheckpointError": "a stored file failed verification and was not loaded; delete it (or the stage "
                             "folder named above) and run again to recompute it",
    "IngestError": "check the input data named above (data.source / data.path), then run again: images "
                   "already ingested are reused",
    "SourceError": "check data.source / data.path, then run again",
    "ShardIntegrityError": "a shard is damaged; delete the ingest folder named above and run again",
    "TokenFormatError": "the token database is damaged or from another version; rerun with --from tokenize",
    "FileNotFoundError": "a file this stage reads is missing; rerun the stage that writes it (`mqgen run --from "
                         "STAGE`), or check the paths in the config",
    "MetricsUnavailable": "see the message above: the figure needs something this run lacks",
    "InceptionWeightsMissing": "see the message above for where the Inception weights are looked for",
    "NoSpaceLeft": "free disk space as the message above says, then run the same command again (exit code 3)",
    "TrackingUnavailable": "start the tracking server (or fix or unset MLFLOW_TRACKING_URI), then run the same "
                           "command again: finished stages are reused",
}


def what_to_do(cause: BaseException) -> str:
    """The advice under a failure: :data:`ADVICE` for the error's kind, else fix the cause (a permanent error) or
    run again (a transient one)."""
    from infra.errors import is_permanent

    advice = next((ADVICE[k.__name__] for k in type(cause).__mro__ if k.__name__ in ADVICE), None)
    if advice is not None:
        return advice
    return ("the same command would fail the same way: fix the cause above first" if is_permanent(cause)
            else "run the same command again: finished stages are reused and training resumes from its last "
                 "checkpoint")


class StageFailed(RuntimeError):
    """A stage of the pipeline failed; carries what the user needs to act on it (see ``mqgen run``'s message)."""

    def __init__(self, stage: str, cause: BaseException, *, config_hash: str, root: str,
                 log_file: str | None, mlflow_run_id: str | None):
        super().__init__(f"stage {stage} failed: {type(cause).__name__}: {cause}")
        self.stage, self.cause, self.config_hash, self.root = stage, cause, config_hash, root
        self.log_file, self.mlflow_run_id = log_file, mlflow_run_id


def _written_path(e: BaseException, cfg: PipelineConfig, stage: str) -> str:
    """The file an ``OSError`` in ``e``'s chain names, else the stage's folder."""
    for seen in exception_chain(e):
        if isinstance(seen, NoSpaceLeft) and seen.path:
            return seen.path
        if isinstance(seen, OSError) and seen.filename:
            return str(seen.filename)
    return str(Path(cfg.run.root) / stage)


def disk_need(stage: str, cfg: PipelineConfig, refs: dict[str, Any]) -> int | None:
    """About how many bytes ``stage`` writes for ``cfg`` (None where it cannot tell before it runs)."""
    d = cfg.data
    if stage == "ingest":
        n = 2 * d.max_images if d.max_images else {"fashion-mnist": 70_000, "mnist": 70_000, "digits": 1797}.get(d.source)
        return n * (d.image_size ** 2 * d.channels // 2 + 1536) if n else None  # PNG + tar headers per image
    if stage == "tokenize" and refs.get("ingest") is not None:
        ing, tok = refs["ingest"], refs.get("train_tokenizer")
        seq = tok.seq_len if tok is not None else cfg.tokenizer.model.num_kept
        return (ing.num_train + ing.num_val) * (4 * seq + 4) * 3  # records, LMDB pages, the compacted copy
    ckpts = sorted((Path(cfg.run.root) / "ray").glob(f"{stage}-*/checkpoint_*"))
    if ckpts:  # training: the kept checkpoints plus the one being written and the exported weights
        size = max(sum(f.stat().st_size for f in c.rglob("*") if f.is_file()) for c in ckpts)
        keep = cfg.tokenizer.keep_checkpoints if stage == "train_tokenizer" else 2
        return size * (keep + 2)
    return None


def stage_failed(stage: str, e: BaseException, cfg: PipelineConfig, tracker: Any, parent_run_id: str,
                 refs: dict[str, Any] | None = None) -> BaseException:
    """The error a stage failure leaves the flow with: Ctrl-C / SIGTERM unchanged; anything else a
    :class:`StageFailed` whose full traceback is in the stage's log file and on its MLflow run. A full file
    system becomes :class:`~infra.errors.NoSpaceLeft` (where, what is free, about what the stage needs)."""
    import traceback

    if not isinstance(e, Exception):
        return e
    if is_no_space(e):
        try:
            need = disk_need(stage, cfg, refs or {})
            raise NoSpaceLeft(no_space_message(_written_path(e, cfg, stage), need)) from e
        except NoSpaceLeft as full:
            e = full
    text = "".join(traceback.format_exception(e))
    log.error("stage %s failed:\n%s", stage, text, extra={"file_only": True})
    run_id = None
    try:  # the stage's own run when it got that far, else the pipeline's
        from infra.tracking import TAG_STAGE, StageRun

        run_id = tracker.find_run({TAG_STAGE: stage, "mlflow.parentRunId": parent_run_id}) or parent_run_id
        StageRun(tracker.client, run_id).log_text(text, f"error/{stage}-traceback.txt")
        StageRun(tracker.client, run_id).set_tags({"mqgen.error": f"{type(e).__name__}: {e}"[:4000]})
    except Exception as err:  # noqa: BLE001 - a tracking failure must not hide the stage's error
        log.warning("could not record the traceback on MLflow: %s", err)
    log_file = stage_log_path(stage)
    return StageFailed(stage, e, config_hash=cfg.hash(), root=cfg.run.root,
                       log_file=str(log_file) if log_file else None, mlflow_run_id=run_id)


def describe_output(stage: str, ref: Any) -> str:
    """One line of a finished stage's key figures (the end line on the console)."""
    m = getattr(ref, "metrics", None) or {}
    parts: list[str] = []

    def add(label: str, value: Any, fmt: str = "{:.4g}") -> None:
        if isinstance(value, (int, float)) and not math.isnan(value):
            parts.append(f"{label} {fmt.format(value)}")

    if stage == "ingest":
        parts.append(f"{ref.num_train} train / {ref.num_val} val images, {ref.image_size}x{ref.image_size}x"
                     f"{ref.channels}, {ref.num_classes} classes")
    elif stage == "train_tokenizer":
        add("val PSNR", m.get("val_psnr"), "{:.2f} dB")
        add("val L1", m.get("val_l1"))
        add("code usage", m.get("val_code_usage"), "{:.0%}")
    elif stage == "tokenize":
        parts.append(f"{ref.num_train} train / {ref.num_val} val sequences")
        add("images/s", m.get("images_per_s"), "{:.0f}")
    elif stage == "train_stackformer":
        add("val bits/image", m.get("val_bits_per_image"), "{:.1f}")
        add("val code CE", m.get("val_code_ce"), "{:.3f}")
    elif stage == "train_evaluator":
        add("val accuracy", getattr(ref, "val_accuracy", None), "{:.1%}")
    elif stage == "evaluate":
        add("FID", m.get("fid"), "{:.2f}")
        add("IS", m.get("isc_mean"), "{:.2f}")
        add("recon PSNR", m.get("recon_psnr"), "{:.2f} dB")
        add("sampling images/s", m.get("sampling_images_per_s"), "{:.0f}")
    parts.append(f"key {getattr(ref, 'key', '?')}")
    return ", ".join(parts)


def run_pipeline(cfg: PipelineConfig, only: str | None = None, from_stage: str | None = None,
                 gc_keep_days: float | None = None) -> dict[str, Any]:
    """Run the selected stages as a Prefect flow (ephemeral API unless ``PREFECT_API_URL`` is set)."""
    # a data.path or run.root with credentials: Prefect records the redacted config, the flow reads the real one
    return pipeline_flow(keep_private(cfg.to_dict()), only=only, from_stage=from_stage, gc_keep_days=gc_keep_days)
