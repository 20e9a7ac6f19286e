"""A pipeline process stopped mid train_tokenizer: SIGTERM ends its MLflow runs KILLED; after a SIGKILL the
next run marks the dead process's run KILLED and the stage resumes from its last checkpoint.

Real Prefect (test harness API shared with the subprocesses), real Ray (local), real MLflow (sqlite).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra.config import resolve

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["ray.num_workers=1", "tokenizer.max_steps=40", "tokenizer.eval_every=8",
             "tokenizer.checkpoint_every=8", "tokenizer.keep_checkpoints=3"]


def _start(root: Path, prefect_url: str) -> subprocess.Popen:
    """The pipeline in a fresh process, its tokenizer slowed to 0.3 s per step so it can be caught midway."""
    script = textwrap.dedent(f"""
        from prefect import task
        from prefect.cache_policies import NO_CACHE
        import tasks.train_tokenizer as tt
        from flows.pipeline import run_pipeline
        from infra.config import resolve

        from tests.fixtures.hooks import SlowDown

        def slow_train_tokenizer(cfg, inputs, force=False, parent_run_id=None):
            return tt.run(cfg, inputs, force=force, parent_run_id=parent_run_id, on_step=SlowDown(0.3))

        tt.train_tokenizer_task = task(slow_train_tokenizer, name="train_tokenizer", cache_policy=NO_CACHE)
        run_pipeline(resolve("tiny", overrides={json.dumps([f"run.root={root}", *OVERRIDES])}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PREFECT_API_URL"] = prefect_url
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _checkpoint_steps(root: Path) -> list[int]:
    """Steps of the stored checkpoints that verify (what a restart restores), oldest first."""
    from tests.fixtures.ray_runs import stored_checkpoints

    steps = []
    for run_dir in (root / "ray").glob("train_tokenizer-*-a0"):
        steps += [step for _, step in stored_checkpoints(run_dir)]
    return sorted(steps)


def _wait_for_step(proc: subprocess.Popen, root: Path, step: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = _checkpoint_steps(root) if (root / "ray").exists() else []
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no checkpoint at step >= {step} within {timeout} s")


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the process group still holds (the local Ray)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _runs(root: Path, kind: str) -> list:
    from infra.tracking import Tracker

    client = Tracker(root, "mqgen").client
    exp = client.get_experiment_by_name("mqgen").experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mqgen.kind` = '{kind}'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_sigterm_ends_runs_killed_and_after_sigkill_the_rerun_resumes_from_the_checkpoint(
        prefect_api: str, tmp_path: Path, mlflow_db_template: Path) -> None:
    import shutil

    from flows.pipeline import run_pipeline
    from infra.tracking import Tracker

    root = tmp_path / "run"
    root.mkdir()
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")

    # 1. SIGTERM (a scheduler stopping the job): the process exits, its runs end KILLED, not RUNNING forever
    first = _start(root, prefect_api)
    try:
        _wait_for_step(first, root, 8)
        first.send_signal(signal.SIGTERM)
        rc = first.wait(timeout=120)
    finally:
        _reap(first)
    assert rc != 0
    [pipeline_1] = _runs(root, "pipeline")
    [stage_1] = [r for r in _runs(root, "stage") if r.data.tags["mqgen.stage"] == "train_tokenizer"]
    assert pipeline_1.info.status == "KILLED" and stage_1.info.status == "KILLED"

    # 2. SIGKILL (nothing can be caught) after a later checkpoint: the runs stay RUNNING
    steps_before = _checkpoint_steps(root)
    second = _start(root, prefect_api)
    try:
        _wait_for_step(second, root, steps_before[-1] + 8)
    finally:
        _reap(second)
    on_disk = _checkpoint_steps(root)  # read after the kill: one may have been stored meanwhile
    pipeline_2 = _runs(root, "pipeline")[1]
    assert pipeline_2.info.status == "RUNNING"

    # 3. the rerun: the dead process's run is marked KILLED, the stage resumes at the newest checkpoint
    cfg = resolve("tiny", overrides=[f"run.root={root}", *OVERRIDES])
    ref = run_pipeline(cfg, only="train_tokenizer")["train_tokenizer"]
    assert ref.step == 40
    client = Tracker(root, "mqgen").client
    tags = client.get_run(ref.mlflow_run_id).data.tags
    resumed = int(tags["mqgen.resumed_from_step"])
    assert resumed in on_disk and resumed >= steps_before[-1] + 8  # a checkpoint the killed run wrote
    assert ref.mlflow_run_id == stage_1.info.run_id  # one MLflow run per stage key, re-attached each time
    steps = [m.step for m in client.get_metric_history(ref.mlflow_run_id, "train_l1")]
    assert len(steps) == len(set(steps)) and max(steps) == 40
    killed = client.get_run(pipeline_2.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["mqgen.ended_by"] == "owner process gone"
    assert _runs(root, "pipeline")[-1].info.status == "FINISHED"
    # ... and so is its Prefect flow run (Running forever otherwise)
    from prefect import get_client

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(killed.data.tags["mqgen.prefect_flow_run_id"])
    assert flow_run.state.type.value == "CRASHED"
    from flows.stages import cached_refs

    assert cached_refs(cfg)["train_tokenizer"] == ref
