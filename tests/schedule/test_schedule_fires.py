"""A schedule that actually fires: `mqgen serve` starts a real local Prefect server (scheduler included) and
serves the pipeline on a one-minute cron. The scheduled runs execute the tiny pipeline end to end (the first
trains and registers, its Stackformer becomes ``champion``; the next is a cache hit), their stage logs and result
artifacts are on the server, and a run that fails (a config whose evaluation cannot start, sent to the same
deployment) ends Failed with the ``champion`` alias untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from infra.config import STAGES, resolve

pytestmark = pytest.mark.slow

FAST = ["tokenizer.max_steps=12", "tokenizer.eval_every=12", "tokenizer.checkpoint_every=12",
        "stackformer.max_steps=12", "stackformer.eval_every=12", "stackformer.checkpoint_every=12",
        "evaluate.num_samples=32"]
MQGEN = Path(sys.executable).parent / "mqgen"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def _runs(client: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def _wait_for(what: str, check: Any, log: Path, proc: subprocess.Popen, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"mqgen serve exited while waiting for {what}:\n{log.read_text()[-4000:]}"
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(2.0)


def test_a_served_one_minute_schedule_runs_the_pipeline_then_hits_the_cache_and_a_failure_keeps_the_champion(
        tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import deployment_name, free_port
    from infra.tracking import Tracker

    root = tmp_path / "run"
    cfg = resolve("tiny", overrides=[f"run.root={root}", *FAST])
    port = free_port(0)
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(MQGEN), "serve", "--cron", "* * * * *", "--preset", "tiny", "--port", str(port),
                                 f"run.root={root}", *FAST], cwd=tmp_path, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            name = f"mqgen-pipeline/{deployment_name(cfg)}"

            def deployment() -> Any:
                try:
                    return client.read_deployment_by_name(name)
                except Exception:  # noqa: BLE001 - the server is still starting / nothing registered yet
                    return None

            dep = _wait_for("the deployment", deployment, log, proc, 300)

            def two_finished() -> list[Any] | None:
                runs = [r for r in _runs(client, dep.id) if r.state is not None and r.state.is_final()]
                return runs if len(runs) >= 2 else None

            first, second = _wait_for("two scheduled runs", two_finished, log, proc, 600)[:2]
            assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state,
                                                                                log.read_text()[-4000:])
            assert first.auto_scheduled and second.auto_scheduled  # the scheduler made them, nobody triggered them
            assert list((root / "evaluate").glob("*/evaluation.json")), "the scheduled run left no evaluation"

            tracker = Tracker(root, "mqgen")
            champion = tracker.client.get_model_version_by_alias("mqgen-stackformer-tiny", "champion")
            assert str(champion.version) == "1"
            stage_runs = tracker.client.search_runs([tracker.experiment_id], "tags.`mqgen.kind` = 'stage'")
            assert len(stage_runs) == 6, "the second scheduled run trained or evaluated again instead of reusing"
            # a stage recomputed under the same key resumes its own stage run, so the count above holds either way:
            # the second run's table artifact says, stage by stage, that each was a cache hit
            [table] = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[second.id]))) if a.type == "table"]
            rows = json.loads(table.data) if isinstance(table.data, str) else table.data
            cached = {r["stage"]: r.get("cached") for r in rows if r["stage"] in STAGES}
            assert cached == dict.fromkeys(STAGES, True), f"the second scheduled run computed a stage again: {rows}"
            assert len(tracker.client.search_model_versions("name = 'mqgen-stackformer-tiny'")) == 1

            # what the Prefect UI shows for the first run: the stages' own INFO logs and the result artifacts
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first.id])))
            assert any(entry.name.startswith("mqgen") and "registered mqgen-stackformer-tiny" in entry.message
                       for entry in logs), sorted({entry.name for entry in logs})
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[first.id])))
            assert len(arts) == 3 and {"markdown", "table"} == {a.type for a in arts}  # (a link is markdown)
            md = next(a for a in arts if a.type == "markdown" and "## Promotion" in str(a.data)).data
            assert "**first**" in md

            # a run that fails after training a new Stackformer: the evaluation's extractor weights do not exist
            bad = resolve("tiny", overrides=[f"run.root={root}", *FAST, "stackformer.warmup_steps=3",
                                             "evaluate.extractor=inception-v3-compat",
                                             f"evaluate.inception_weights={tmp_path / 'missing.pth'}"])
            failing = client.create_flow_run_from_deployment(dep.id, parameters={"config": bad.to_dict()})

            def finished() -> Any:
                r = client.read_flow_run(failing.id)
                return r if r.state is not None and r.state.is_final() else None

            done = _wait_for("the failing run", finished, log, proc, 600)
            assert done.state.is_failed(), (done.state, log.read_text()[-4000:])
            assert tracker.client.get_model_version_by_alias("mqgen-stackformer-tiny", "champion").version == 1
            versions = tracker.client.search_model_versions("name = 'mqgen-stackformer-tiny'")
            assert len(versions) == 2  # the failed run's model was registered, never evaluated, never promoted
            assert not any(k.startswith("mqgen.promotion") for v in versions if str(v.version) == "2" for k in v.tags)
    finally:
        from flows.serve import stop

        stop(proc, timeout_s=60)
