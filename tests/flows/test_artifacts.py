"""What a user reads about runs without a terminal: the Prefect artifacts of a failed pipeline run and of a grid
(real Prefect test harness, real MLflow), and ``mqgen models``, whose FIDs are on the protocol of the champion's latest
evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from infra.config import STAGES, resolve


def _artifacts(flow_run_id: str) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as pc:
        return pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _table(artifact: Any) -> list[dict[str, Any]]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


@pytest.mark.slow
def test_a_failed_run_publishes_the_failed_stage_its_cause_and_the_stages_done_before_it(prefect_api: str,
                                                                                        run_root: Path) -> None:
    from prefect import get_client

    from flows.pipeline import StageFailed, run_pipeline, what_to_do
    from infra.tracking import Tracker

    # ingest runs; train_tokenizer cannot make its folder (a file holds the name) and fails at once, not retried
    (run_root / "train_tokenizer").write_text("in the way")
    cfg = resolve("tiny", overrides=[f"run.root={run_root}", "run.retries=0"])
    with pytest.raises(StageFailed) as failed:
        run_pipeline(cfg)
    assert failed.value.stage == "train_tokenizer"
    cause = type(failed.value.cause).__name__

    tracker = Tracker(run_root, "mqgen")
    [parent] = tracker.client.search_runs([tracker.experiment_id], "tags.`mqgen.kind` = 'pipeline'")
    flow_run_id = parent.data.tags["mqgen.prefect_flow_run_id"]
    with get_client(sync_client=True) as pc:
        assert pc.read_flow_run(flow_run_id).state.is_failed()  # the flow still fails
    arts = _artifacts(flow_run_id)
    key = f"mqgen-tiny-{cfg.hash()}"
    by_key = {a.key: a for a in arts if a.key}  # (Prefect's own record of the flow's error has no key)
    assert set(by_key) == {key, f"{key}-figures", f"{key}-mlflow"}, [(a.key, a.type) for a in arts]
    md = by_key[key].data
    assert f"**stage train_tokenizer failed**: {cause}: " in md and str(run_root / "train_tokenizer") in md
    assert f"**What to do**: {what_to_do(failed.value.cause)}" in md  # the advice `mqgen run` prints
    assert "(artifact `error/train_tokenizer-traceback.txt`)" in md  # where the traceback is
    assert "| ingest | " in md and " train / " in md  # the stage done before it, with its figures
    assert "| train_tokenizer | | **failed** |" in md and "| evaluate | | not run |" in md
    assert [line.split(" | ")[0][2:] for line in md.splitlines() if line.startswith("| ")][1:] == list(STAGES)
    assert parent.info.run_id in md and parent.info.run_id in by_key[f"{key}-mlflow"].data
    rows = {r["stage"]: r for r in _table(by_key[f"{key}-figures"])}
    assert rows["train_tokenizer"]["failed"] is True and rows["ingest"]["cached"] is False
    assert set(rows) == {"ingest", "train_tokenizer"}


def test_a_grid_publishes_one_row_per_variant_and_a_link_to_its_mlflow_run(prefect_api: str, run_root: Path) -> None:
    """The grid flow's publishing step, on a grid's variants and evaluation references (the stages themselves are
    covered by the grid test in test_pipeline.py)."""
    from prefect import flow
    from prefect.runtime import flow_run

    from flows.publish import publish_grid
    from infra.config import expand_grid
    from infra.refs import EvaluateOutput
    from infra.tracking import Tracker

    variants = expand_grid("tiny", None, [f"run.root={run_root}", "tokenizer.keep_ratio=[0.5,0.75]"])
    tracker = Tracker(run_root, "mqgen")
    refs = [{"evaluate": EvaluateOutput(path="", key=f"e{i}", evaluation_json="", mlflow_run_id=f"r{i}",
                                        metrics={"fid": fid, "recon_psnr": 20.0 + i, "kid_mean": None})}
            for i, fid in enumerate((31.25, 27.5))]

    @flow(name="mqgen-grid-publish")
    def publish() -> str:
        with tracker.pipeline_run("g", kind="grid", name="test-grid") as grid_run:
            publish_grid(variants[0].config, "g", "test-grid", variants, refs, ["v0", "v1"],
                         {"ingest": 1, "evaluate": 2}, tracker, grid_run.run_id)
        return f"{flow_run.id} {grid_run.run_id}"

    flow_run_id, grid_run_id = publish().split()
    arts = {a.key: a for a in _artifacts(flow_run_id)}
    key = "mqgen-grid-tiny-g"
    assert set(arts) == {key, f"{key}-variants", f"{key}-mlflow"}, list(arts)
    rows = _table(arts[f"{key}-variants"])
    assert [(r["variant"], r["tokenizer.keep_ratio"], r["fid"], r["run"]) for r in rows] == \
        [(variants[0].label, 0.5, 31.25, "v0"), (variants[1].label, 0.75, 27.5, "v1")]
    md = arts[key].data
    assert "| variant | fid | recon_psnr |" in md and f"| {variants[1].label} | 27.5 | 21 |" in md
    assert "ingest 1, evaluate 2" in md and f"mqgen compare --grid {grid_run_id}" in md
    assert grid_run_id in arts[f"{key}-mlflow"].data


def test_models_shows_the_fid_on_the_protocol_of_the_champions_latest_evaluation(run_root: Path,
                                                                                 monkeypatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from infra import registry
    from infra.tracking import Tracker

    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")
    cfg = resolve("tiny", overrides=[f"run.root={run_root}"])
    tracker = Tracker(run_root, "mqgen")
    client = tracker.client
    name = cfg.registry.model_name("stackformer", "tiny")
    client.create_registered_model(name)

    def version() -> registry.Version:
        run = tracker.stage_run("train_stackformer", f"k{time.monotonic_ns()}")
        run.finish()
        mv = client.create_model_version(name, source=f"runs:/{run.run_id}/model", run_id=run.run_id)
        return registry.Version(name, str(mv.version), run.run_id, {})

    def evaluation(n: int, fid: float) -> dict[str, Any]:
        return {"extractor": "classifier-test", "extractor_info": {"weights_sha256": "e" * 64}, "n": n,
                "set_sizes": {"reference": 256}, "data": {"reference_set_hash": "r" * 16}, "metrics": {"fid": fid},
                "fid_interval": {"std": 0.5, "low": fid - 1, "high": fid + 1}}

    def evaluate(v: registry.Version, ev: dict[str, Any]) -> None:
        run = tracker.stage_run("evaluate", f"k{time.monotonic_ns()}")
        run.finish()
        registry.record_evaluation(tracker, v, ev, run.run_id)
        time.sleep(0.01)  # the next evaluate run starts later

    # the champion's latest evaluation is on a protocol whose id sorts first (the old table showed the last id's)
    old = evaluation(64, 10.0)
    n_new = next(n for n in range(65, 200) if registry.protocol_id(evaluation(n, 0)) < registry.protocol_id(old))
    new_pid, old_pid = registry.protocol_id(evaluation(n_new, 0)), registry.protocol_id(old)
    v1, v2 = version(), version()
    evaluate(v1, old)
    evaluate(v2, evaluation(64, 8.0))  # v2: the old protocol only
    evaluate(v1, evaluation(n_new, 20.0))  # the champion re-evaluated on the new protocol
    client.set_registered_model_alias(name, "champion", v1.version)

    out = CliRunner().invoke(app, ["models", "--preset", "tiny", f"run.root={run_root}"])
    assert out.exit_code == 0, out.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.output.splitlines() if line.count("│") > 6 and line.split("│")[1].strip().isdigit()}
    assert rows["1"][:4] == ["champion", "20", "19 .. 21", new_pid], out.output
    assert rows["2"][1] == "8" and rows["2"][3].startswith(f"other: {old_pid} (classifier-test, 64 samples)"), \
        out.output
    assert f"FID on evaluation protocol {new_pid} (classifier-test, {n_new} samples): the latest evaluation of v1 " \
           "(champion)" in " ".join(out.output.split()), out.output
