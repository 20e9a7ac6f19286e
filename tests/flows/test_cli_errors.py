"""A failing stage, as a user meets it on the command line: one paragraph naming the stage, the cause and what to do,
a non-zero exit, no traceback on the console (it is in the stage's log file and on the MLflow run; --debug
prints it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MQGEN = Path(sys.executable).parent / "mqgen"


def _run(cwd: Path, prefect_api: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "RAY_ADDRESS")}
    env["PREFECT_API_URL"] = prefect_api
    return subprocess.run([str(MQGEN), "run", "--preset", "tiny", "data.source=image-folder", "data.path=photos",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_stage_failure_prints_one_paragraph_and_keeps_the_traceback_in_the_log(tmp_path: Path,
                                                                                  prefect_api: str) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    out = _run(tmp_path, prefect_api)
    assert out.returncode == 1, out.stderr[-3000:]
    err = out.stderr
    assert "Traceback" not in err and "Traceback" not in out.stdout, err[-3000:]
    assert "error: stage ingest failed:" in err
    assert str(tmp_path / "photos") in err  # the input involved, by its absolute path
    assert "what to do:" in err
    m = re.search(r"full traceback: (\S+\.log)", err)
    assert m, err
    log = Path(m.group(1))
    assert log.parent.parent == tmp_path / "runs" / "logs" and log.name == "ingest.log"
    assert "Traceback (most recent call last)" in log.read_text()
    assert len(err.strip().splitlines()) < 12, err  # start lines + one paragraph, no walls of text

    debug = _run(tmp_path, prefect_api, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr


def test_a_config_error_exits_2_before_anything_starts(tmp_path: Path) -> None:
    out = subprocess.run([str(MQGEN), "run", "--preset", "tiny", "tokenizer.keep_ratio=2"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "tokenizer.keep_ratio" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_tracking_server_that_does_not_answer_is_waited_for_then_named(tmp_path: Path, prefect_api: str) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: a server that is down (or a mistyped URI)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "RAY_ADDRESS")}
    env.update(PREFECT_API_URL=prefect_api, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MQGEN_TRACKING_WAIT_S="4")
    out = subprocess.run([str(MQGEN), "run", "--preset", "tiny", "--only", "ingest"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    err = out.stderr
    assert out.returncode == 1, err[-3000:]
    assert f"waiting for the MLflow tracking server http://127.0.0.1:{port}" in err, err[-3000:]
    assert re.search(rf"TrackingUnavailable: the MLflow tracking server http://127\.0\.0\.1:{port} .*did not answer "
                     r"for \d", err), err[-3000:]
    assert "MQGEN_TRACKING_WAIT_S" in err and "Traceback" not in err and "urllib3" not in err, err[-3000:]
    assert not (tmp_path / "runs" / "ingest").exists()  # nothing ran without its tracking


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_a_worker_lost_with_no_restarts_left_fails_the_run_its_task_and_its_runs(tmp_path: Path,
                                                                                  prefect_api: str) -> None:
    """A Ray Train worker SIGKILLed from outside (the OOM killer, a lost node) while ``ray.max_failures=0``: the
    command exits 1 with one paragraph saying that no restart was left, no stage output is written, the stage's
    MLflow run ends FAILED, and its Prefect task run and flow run end Failed."""
    import contextlib
    import signal
    import sqlite3
    import time

    from tests.fixtures.processes import cmdline, session_members

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "RAY_ADDRESS")}
    env["PREFECT_API_URL"] = prefect_api
    proc = subprocess.Popen([str(MQGEN), "run", "--preset", "tiny", "ray.max_failures=0", "run.retries=0",
                             "tokenizer.max_steps=2000"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        workers = [p for p in session_members(proc.pid) if cmdline(p).startswith(b"ray::RayTrainWorker")]
        if workers:
            time.sleep(3)  # a few steps in
            with contextlib.suppress(ProcessLookupError):
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
        time.sleep(0.5)
    if killed is None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # no worker to kill: do not wait for 2000 steps
    _, err = proc.communicate(timeout=300)
    assert killed is not None, f"no training worker was found to kill:\n{err[-3000:]}"
    assert proc.returncode == 1, err[-3000:]
    assert "error: stage train_tokenizer failed: TrainingFailed:" in err and "ray.max_failures=0" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not list((tmp_path / "runs" / "train_tokenizer").glob("*/_SUCCESS.json"))
    with sqlite3.connect(tmp_path / "runs" / "mlflow.db") as db:
        [(status,)] = db.execute("select r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                                 "where t.key = 'mqgen.stage' and t.value = 'train_tokenizer'").fetchall()
    assert status == "FAILED"
    from prefect import get_client

    with get_client(sync_client=True) as pc:
        tasks = [t for t in pc.read_task_runs() if t.name.startswith("train_tokenizer")]
        flows = {t.flow_run_id for t in tasks}
        assert tasks and all(t.state.is_failed() for t in tasks), [(t.name, t.state.type) for t in tasks]
        assert all(pc.read_flow_run(f).state.is_failed() for f in flows)

