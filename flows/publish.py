"""After the stages of a pipeline run: the promotion gate and the Prefect artifacts. Wiring only.

:func:`promote_evaluated` hands a fresh evaluation to the registry's gate (:func:`infra.registry.promote`): the
evaluated Stackformer version takes the alias (``champion``) when it beats the holder by more than the noise.
:func:`publish_artifacts` leaves the run's result in the Prefect UI: a markdown summary (stage figures, durations,
the promotion decision), a table artifact of the figures, and a link artifact to the MLflow run.
:func:`publish_failure` leaves a failed run's summary under the same key (the failed stage, the cause and what to do,
the stages done before it), and :func:`publish_grid` a grid's (one row per variant with its figures).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from infra.config import PipelineConfig

log = logging.getLogger("mqgen")


def registry_step(cfg: PipelineConfig, refs: dict[str, Any], tracker: Any, parent: Any, *, promote: bool) -> Any:
    """The registry's part of a pipeline run: the registrations an earlier run deferred, then (``promote``) the
    promotion gate. A tracking server that does not answer fails neither: the work is left to the next run
    (markers in the outputs, :func:`infra.registry.pending`) and the gap recorded on the pipeline run."""
    from infra import registry
    from infra.console import say
    from infra.storage import atomic_write_json

    ev = refs.get("evaluate")
    marker = Path(ev.path) / registry.PROMOTION_PENDING if ev is not None and "://" not in str(ev.path) else None
    try:
        registry.register_pending(tracker, cfg, refs)
        decision = promote_evaluated(cfg, refs, tracker, parent) if promote or (marker and marker.is_file()) else None
    except Exception as e:
        if not registry.server_down(tracker):
            raise
        say(f"registry: the MLflow tracking server does not answer ({type(e).__name__}); the next `mqgen run` of "
            "this config registers the models and decides the promotion")
        parent.set_tags({"mqgen.promotion": "deferred (tracking server down)"})
        if marker is not None and promote:
            atomic_write_json(marker, {"evaluate_run_id": ev.mlflow_run_id, "error": f"{type(e).__name__}: {e}"[:300]})
        return None
    if marker is not None and marker.is_file():
        marker.unlink()
    return decision


def record_lineage(refs: dict[str, Any], tracker: Any, parent: Any) -> None:
    """The datasets the run's stages read and the models they logged, listed on the pipeline run too: its row in
    the MLflow runs table (the one a user sees first) shows them in the Datasets and Models columns. Read from the
    stage runs (cached stages included: their outputs are what this run used); a run that cannot be read is
    skipped with a warning."""
    from infra.registry import server_down

    if server_down(tracker):  # each read would sit through MLflow's request retries
        log.warning("lineage: the tracking server does not answer; the pipeline run lists no datasets or models")
        return
    datasets, seen, models = [], set(), {}
    for stage, ref in refs.items():
        run_id = getattr(ref, "mlflow_run_id", None)
        if not run_id:
            continue
        try:
            run = tracker.client.get_run(run_id)
        except Exception as e:  # noqa: BLE001 - lineage is a view; the stage outputs are the record
            log.warning("lineage: the %s run %s could not be read (%s)", stage, run_id, type(e).__name__)
            continue
        for d in run.inputs.dataset_inputs if run.inputs else []:
            if (d.dataset.name, d.dataset.digest) not in seen:  # the first stage that read it names its context
                seen.add((d.dataset.name, d.dataset.digest))
                datasets.append(d)
        for o in run.outputs.model_outputs if run.outputs else []:
            models[o.model_id] = o.step
    parent.log_inputs(datasets)
    parent.log_model_outputs(models)


def promote_evaluated(cfg: PipelineConfig, refs: dict[str, Any], tracker: Any, parent: Any) -> Any:
    """Run the promotion gate for the evaluation in ``refs``; the decision is recorded on the pipeline run too.
    None when there is nothing to decide (registry off, no evaluation, no FID, an unregistered model)."""
    from infra import registry

    ev, gen, tok = refs.get("evaluate"), refs.get("train_stackformer"), refs.get("train_tokenizer")
    if not cfg.registry.enabled or ev is None or gen is None or tok is None:
        return None
    version = registry.find_version(tracker, cfg, "stackformer", gen.mlflow_run_id, gen.sha256)
    if version is None:
        log.warning("promotion skipped: the Stackformer of run %s is not registered (trained with "
                    "registry.enabled=false?)", gen.mlflow_run_id)
        return None
    tok_version = registry.find_version(tracker, cfg, "tokenizer", tok.mlflow_run_id, tok.sha256)
    evaluation = json.loads(Path(ev.evaluation_json).read_text())

    def rescore(holder: Any) -> tuple[dict[str, Any], str]:
        """The evaluate stage on the champion's registered weights, with this run's data, evaluator and settings
        (a cached stage output like any other: a second gate against the same champion reuses it)."""
        from infra.refs import EvaluateInputs
        from tasks import evaluate

        log.info("promotion: evaluating the %s v%s on this run's evaluation protocol", cfg.registry.alias,
                 holder.version)
        with registry.load_bundle(f"models:/{holder.name}/{holder.version}", cfg) as (bundle, _):
            _check_fits(holder, bundle, refs["ingest"], gen)
            out = evaluate.run(cfg, EvaluateInputs(ingest=refs["ingest"], train_tokenizer=bundle.tokenizer,
                                                   train_stackformer=bundle.generator,
                                                   train_evaluator=refs.get("train_evaluator")),
                               parent_run_id=parent.run_id)
        return json.loads(Path(out.evaluation_json).read_text()), out.mlflow_run_id

    decision = registry.promote(tracker, cfg, generator=gen, tokenizer_version=tok_version, version=version,
                                evaluation=evaluation, evaluate_run_id=ev.mlflow_run_id,
                                rescore=rescore if cfg.registry.reevaluate_champion else None)
    if decision is not None:
        parent.set_tags(decision.tags())
        figures = {"promotion.new_fid": decision.new.fid}
        if decision.champion is not None:
            figures["promotion.champion_fid"] = decision.champion.fid
        parent.log_metrics(figures)
    return decision


def _check_fits(holder: Any, bundle: Any, ingest: Any, new: Any) -> None:
    """Refuse (``ValueError``, the gate's "not comparable" reason) to score a champion on data it cannot draw: another
    image size or channel count (an extractor would resize its samples silently), or another conditioning than the
    ``new`` model's (captions one reads and the other does not)."""
    if bundle.generator is None:
        raise ValueError(f"{holder.name} v{holder.version} holds no generator")
    mc = bundle.tokenizer.model_config
    size, channels = mc.get("resolution"), mc.get("in_channels")
    if (size, channels) != (ingest.image_size, ingest.channels):
        raise ValueError(f"it draws {size} px, {channels} channel(s) images; this run's data is {ingest.image_size} "
                         f"px, {ingest.channels} channel(s)")
    if bool(bundle.generator.text_tokenizer) != bool(new.text_tokenizer):
        raise ValueError("it reads captions and the new model does not" if bundle.generator.text_tokenizer
                         else "the new model reads captions and it does not")


def _mlflow_link(tracker: Any, run_id: str) -> tuple[str, str]:
    """``(url, how to open it)`` of the MLflow run: the tracking server's page, or the local UI's address."""
    if tracker.uri.startswith(("http://", "https://")):
        return f"{tracker.uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{run_id}", ""
    return (f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}",
            f" (start the UI first: mlflow ui --backend-store-uri {tracker.uri})")


def _slug(text: str) -> str:
    """A Prefect artifact key: lower-case letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100]


def _artifact_key(cfg: PipelineConfig) -> str:
    """The key of a pipeline run's artifacts (``-figures``, ``-mlflow`` appended): one per config, so the Artifacts
    page shows each config's latest run, finished or failed."""
    return _slug(f"mqgen-{cfg.preset}-{cfg.hash()}")


def _stage_line(stage: str, ref: Any, durations: dict[str, float], reused: set[str] | frozenset[str]) -> str:
    from flows.pipeline import describe_output

    took = "cached" if stage in reused or stage not in durations else f"{durations[stage]:.1f} s"
    return f"| {stage} | {took} | {describe_output(stage, ref) if ref is not None else 'skipped'} |"


def summary_markdown(cfg: PipelineConfig, refs: dict[str, Any], durations: dict[str, float], decision: Any,
                     mlflow_url: str, how: str, reused: set[str] | frozenset[str] = frozenset()) -> str:
    lines = [f"# mqgen pipeline: preset {cfg.preset}, config {cfg.hash()}", "",
             "| stage | duration | result |", "|---|---|---|"]
    lines += [_stage_line(stage, ref, durations, reused) for stage, ref in refs.items()]
    ev = refs.get("evaluate")
    if ev is not None:
        m = ev.metrics or {}
        lines += ["", f"## Evaluation ({ev.extractor or 'no extractor'}, {ev.num_samples} samples)", "",
                  "| figure | value |", "|---|---|"]
        for k in ("fid", "fid_low", "fid_high", "kid_mean", "isc_mean", "recon_psnr", "recon_ssim", "rfid",
                  "sample_class_accuracy", "sampling_images_per_s"):
            if isinstance(m.get(k), (int, float)):
                lines.append(f"| {k} | {m[k]:.4g} |")
    if decision is not None:
        lines += ["", "## Promotion", "", f"**{decision.decision}**: {decision.summary()}"]
    lines += ["", f"MLflow run: [{mlflow_url}]({mlflow_url}){how}"]
    return "\n".join(lines)


def _publish(key: str, what: str, *, markdown: str, description: str, rows: list[dict[str, Any]], table: str,
             table_description: str, url: str, link_text: str, link_description: str) -> None:
    """The three Prefect artifacts of this flow run (a no-op outside one): the markdown summary under ``key``, the
    table under ``key-<table>``, the link to the MLflow run under ``key-mlflow``. A failure to publish is logged,
    never raised: the UI summary is a courtesy, the run's own result stands."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    try:
        from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

        create_markdown_artifact(markdown, key=key, description=description)
        create_table_artifact(rows, key=f"{key}-{table}", description=table_description)
        create_link_artifact(url, link_text=link_text, key=f"{key}-mlflow", description=link_description)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("could not publish the Prefect artifacts of %s: %s", what, e)


def publish_artifacts(cfg: PipelineConfig, refs: dict[str, Any], durations: dict[str, float], decision: Any,
                      tracker: Any, parent_run_id: str, *, reused: set[str] | frozenset[str] = frozenset()) -> None:
    """The Prefect artifacts of this flow run (a no-op outside one; ``reused``: the stages that were cache hits). A
    failure to publish is logged, never raised: the pipeline's outputs are already written."""
    url, how = _mlflow_link(tracker, parent_run_id)
    rows = _figure_rows(refs, durations, reused)
    if decision is not None:
        rows.append({"stage": "promotion", "decision": decision.decision, "version": decision.version,
                     "fid": decision.new.fid, "champion_fid": decision.champion.fid if decision.champion else None})
    _publish(_artifact_key(cfg), "the run", markdown=summary_markdown(cfg, refs, durations, decision, url, how, reused),
             description=f"mqgen {cfg.preset} {cfg.hash()}: stage figures and the promotion", rows=rows,
             table="figures", table_description="stage figures of this run", url=url,
             link_text=f"MLflow run {parent_run_id}", link_description="the pipeline's MLflow run" + how)


def _figure_rows(refs: dict[str, Any], durations: dict[str, float],
                 reused: set[str] | frozenset[str]) -> list[dict[str, Any]]:
    """Rows of the table artifact: per stage its time, whether it was a cache hit, its key and figures."""
    return [{"stage": s, "seconds": round(durations.get(s, 0.0), 1), "cached": s in reused or s not in durations,
             "key": getattr(r, "key", ""), **{k: round(v, 4) for k, v in (getattr(r, "metrics", None) or {}).items()
                                              if isinstance(v, (int, float)) and k in FIGURES}}
            for s, r in refs.items() if r is not None]


def failure_markdown(cfg: PipelineConfig, stages: list[str], refs: dict[str, Any], durations: dict[str, float],
                     failed_stage: str, error: BaseException, mlflow_url: str, how: str,
                     reused: set[str] | frozenset[str] = frozenset()) -> str:
    """A failed run's summary: the stage and its cause with what to do (the paragraph ``mqgen run`` prints), where
    the traceback is, and the selected stages in order: done (with their figures), failed, not run. Redacted."""
    from flows.pipeline import StageFailed, what_to_do
    from infra.secrets import redact_text

    cause = error.cause if isinstance(error, StageFailed) else error
    name = type(cause).__name__
    lines = [f"# mqgen pipeline failed at {failed_stage}: preset {cfg.preset}, config {cfg.hash()}", "",
             f"**stage {failed_stage} failed**: {name}: {str(cause).strip() or name}", "",
             f"**What to do**: {what_to_do(cause)}"]
    if isinstance(error, StageFailed):
        where = [f"`{error.log_file}`"] if error.log_file else []
        if error.mlflow_run_id:
            where.append(f"MLflow run {error.mlflow_run_id} (artifact `error/{failed_stage}-traceback.txt`)")
        if where:
            lines += ["", "Full traceback: " + " and ".join(where)]
    lines += ["", "| stage | duration | result |", "|---|---|---|"]
    for stage in stages:
        if stage == failed_stage:
            lines.append(f"| {stage} | | **failed** |")
        elif stage in refs:
            lines.append(_stage_line(stage, refs[stage], durations, reused))
        else:
            lines.append(f"| {stage} | | not run |")
    lines += ["", f"MLflow run: [{mlflow_url}]({mlflow_url}){how}"]
    return redact_text("\n".join(lines))


def publish_failure(cfg: PipelineConfig, stages: list[str], refs: dict[str, Any], durations: dict[str, float],
                    failed_stage: str, error: BaseException, tracker: Any, parent_run_id: str, *,
                    reused: set[str] | frozenset[str] = frozenset()) -> None:
    """The Prefect artifacts of a flow run whose stage ``failed_stage`` failed with ``error`` (what
    :func:`flows.pipeline.stage_failed` returned), under the keys of :func:`publish_artifacts`: the summary of
    :func:`failure_markdown`, the figures of the stages done before it, the link to the MLflow run. A no-op outside a
    flow run and for Ctrl-C / SIGTERM; a failure to publish is logged, never raised (the stage's error is the flow's)."""
    if not isinstance(error, Exception):
        return
    url, how = _mlflow_link(tracker, parent_run_id)
    done = {s: refs[s] for s in stages if s in refs and s != failed_stage}
    _publish(_artifact_key(cfg), "the failure",
             markdown=failure_markdown(cfg, stages, done, durations, failed_stage, error, url, how, reused),
             description=f"mqgen {cfg.preset} {cfg.hash()}: failed at {failed_stage}",
             rows=[*_figure_rows(done, durations, reused), {"stage": failed_stage, "failed": True}], table="figures",
             table_description="stage figures of this run, up to the failed stage", url=url,
             link_text=f"MLflow run {parent_run_id}",
             link_description="the pipeline's MLflow run (the failed stage's traceback under error/)" + how)


# The figures of a grid's variants (the names of flows.pipeline.summary_figures), in the order of its table.
GRID_FIGURES = ("fid", "fid_low", "fid_high", "isc_mean", "recon_psnr", "sampling_images_per_s", "tokenizer.val_psnr",
                "stackformer.val_bits_per_image")


def grid_rows(variants: list[Any], refs: list[dict[str, Any]], run_ids: list[str],
              failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per grid variant (:class:`infra.config.GridVariant`): its label, axis values, figures and MLflow
    run; with ``failed`` (label -> "stage: error"), a ``failed`` column for the variants that did not finish."""
    from flows.pipeline import summary_figures

    rows = []
    for gv, r, run_id in zip(variants, refs, run_ids):
        figures = summary_figures(r)
        axes = {k: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)
                for k, v in gv.axes.items()}
        why = {"failed": failed.get(gv.label, "")} if failed else {}
        rows.append({"variant": gv.label, **axes, **{k: round(figures[k], 4) for k in GRID_FIGURES if k in figures},
                     **why, "run": run_id})
    return rows


def grid_markdown(title: str, rows: list[dict[str, Any]], executions: dict[str, int], grid_run_id: str,
                  mlflow_url: str, how: str) -> str:
    """A grid's summary: a table of its variants' figures, the stage executions they shared, the MLflow run and how to
    write the comparison report."""
    shown = [k for k in GRID_FIGURES if any(k in row for row in rows)]
    lines = [f"# mqgen grid {title}: {len(rows)} variants", "",
             "| variant | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), (int, float)) else "" for k in shown]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    failures = [f"- **{row['variant']}** failed at {row['failed']}" for row in rows if row.get("failed")]
    if failures:
        lines += ["", f"{len(failures)} variant(s) failed; their runs are FAILED in MLflow, the others finished:",
                  *failures]
    lines += ["", "Stage executions (variants that agree on what a stage reads share one): "
              + ", ".join(f"{stage} {n}" for stage, n in executions.items()),
              "", f"Comparison report (figures against the axes, plots): `mqgen compare --grid {grid_run_id} --out DIR`",
              "", f"MLflow run: [{mlflow_url}]({mlflow_url}){how}"]
    return "\n".join(lines)


def publish_grid(cfg: PipelineConfig, grid_hash: str, title: str, variants: list[Any], refs: list[dict[str, Any]],
                 run_ids: list[str], executions: dict[str, int], tracker: Any, grid_run_id: str,
                 failed: dict[str, str] | None = None) -> None:
    """The Prefect artifacts of a finished grid's flow run (a no-op outside one), keyed by the grid's hash: a markdown
    summary, a table with one row per variant (:func:`grid_rows`; a failed variant's row says where it failed) and
    a link artifact to the grid's MLflow run. A failure to publish is logged, never raised: the variants' outputs
    are already written."""
    url, how = _mlflow_link(tracker, grid_run_id)
    rows = grid_rows(variants, refs, run_ids, failed)
    _publish(_slug(f"mqgen-grid-{cfg.preset}-{grid_hash}"), "the grid",
             markdown=grid_markdown(title, rows, executions, grid_run_id, url, how),
             description=f"mqgen grid {title}: the variants' figures", rows=rows, table="variants",
             table_description="one row per variant: axes and figures", url=url,
             link_text=f"MLflow grid run {grid_run_id}",
             link_description="the grid's MLflow run (a child run per variant)" + how)


FIGURES = ("fid", "fid_low", "fid_high", "isc_mean", "recon_psnr", "sampling_images_per_s", "val_psnr",
           "val_bits_per_image", "images_per_s")
