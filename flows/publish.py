"""After the stages of a pipeline run: the promotion gate and the Prefect artifacts. Wiring only.

:func:`promote_evaluated` hands a fresh evaluation to the registry's gate (:func:`infra.registry.promote`): the
evaluated Stackformer version takes the alias (``champion``) when it beats the holder by more than the noise.
:func:`publish_artifacts` leaves the run's result in the Prefect UI: a markdown summary (stage figures, durations,
the promotion decision), a table artifact of the figures, and a link artifact to the MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from infra.config import PipelineConfig

log = logging.getLogger("mqgen")


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
            if bundle.generator is None:
                raise ValueError(f"{holder.name} v{holder.version} holds no generator")
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


def _mlflow_link(tracker: Any, run_id: str) -> tuple[str, str]:
    """``(url, how to open it)`` of the MLflow run: the tracking server's page, or the local UI's address."""
    if tracker.uri.startswith(("http://", "https://")):
        return f"{tracker.uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{run_id}", ""
    return (f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}",
            f" (start the UI first: mlflow ui --backend-store-uri {tracker.uri})")


def _slug(text: str) -> str:
    """A Prefect artifact key: lower-case letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100]


def summary_markdown(cfg: PipelineConfig, refs: dict[str, Any], durations: dict[str, float], decision: Any,
                     mlflow_url: str, how: str, reused: set[str] | frozenset[str] = frozenset()) -> str:
    from flows.pipeline import describe_output

    lines = [f"# mqgen pipeline: preset {cfg.preset}, config {cfg.hash()}", "",
             "| stage | duration | result |", "|---|---|---|"]
    for stage, ref in refs.items():
        took = "cached" if stage in reused or stage not in durations else f"{durations[stage]:.1f} s"
        lines.append(f"| {stage} | {took} | {describe_output(stage, ref) if ref is not None else 'skipped'} |")
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


def publish_artifacts(cfg: PipelineConfig, refs: dict[str, Any], durations: dict[str, float], decision: Any,
                      tracker: Any, parent_run_id: str, *, reused: set[str] | frozenset[str] = frozenset()) -> None:
    """The Prefect artifacts of this flow run (a no-op outside one; ``reused``: the stages that were cache hits). A
    failure to publish is logged, never raised: the pipeline's outputs are already written."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    try:
        from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

        key = _slug(f"mqgen-{cfg.preset}-{cfg.hash()}")
        url, how = _mlflow_link(tracker, parent_run_id)
        create_markdown_artifact(summary_markdown(cfg, refs, durations, decision, url, how, reused), key=key,
                                 description=f"mqgen {cfg.preset} {cfg.hash()}: stage figures and the promotion")
        rows = [{"stage": s, "seconds": round(durations.get(s, 0.0), 1), "cached": s in reused or s not in durations,
                 "key": getattr(r, "key", ""), **{k: round(v, 4) for k, v in (getattr(r, "metrics", None) or {}).items()
                                                  if isinstance(v, (int, float)) and k in FIGURES}}
                for s, r in refs.items() if r is not None]
        if decision is not None:
            rows.append({"stage": "promotion", "decision": decision.decision, "version": decision.version,
                         "fid": decision.new.fid, "champion_fid": decision.champion.fid if decision.champion else None})
        create_table_artifact(rows, key=f"{key}-figures", description="stage figures of this run")
        create_link_artifact(url, link_text=f"MLflow run {parent_run_id}", key=f"{key}-mlflow",
                             description="the pipeline's MLflow run" + how)
    except Exception as e:  # noqa: BLE001 - the UI summary is a courtesy; the run's results stand
        log.warning("could not publish the Prefect artifacts: %s", e)


FIGURES = ("fid", "fid_low", "fid_high", "isc_mean", "recon_psnr", "sampling_images_per_s", "val_psnr",
           "val_bits_per_image", "images_per_s")
