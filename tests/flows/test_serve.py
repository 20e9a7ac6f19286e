"""Scheduled retraining: `mqgen serve` against a real Prefect API, its cron validation, and prefect.yaml."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import PipelineConfig, from_dict, resolve

REPO = Path(__file__).resolve().parents[2]
MQGEN = [sys.executable, "-c", "from flows.cli import app; app()"]
CRON = "0 3 * * *"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def _start_serve(root: Path, log: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*MQGEN, "serve", "--cron", CRON, "--preset", "tiny", *args, f"run.root={root}"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _hold_start_lock(home: Path) -> subprocess.Popen:
    """Another process holding the Prefect start lock of ``home`` until its stdin closes."""
    home.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
            "os.write(fd, b'pid ' + str(os.getpid()).encode()); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(home / ".mqgen-start.lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _wait_for_deployment(proc: subprocess.Popen, log: Path, name: str, timeout_s: float = 120.0) -> Any:
    """The deployment once the runner has polled for it (status READY), read with Prefect's client."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            assert proc.poll() is None, f"mqgen serve exited early:\n{log.read_text(errors='replace')}"
            try:
                deployment = client.read_deployment_by_name(name)
                if deployment.status == DeploymentStatus.READY:
                    return deployment
            except (ObjectNotFound, httpx.TransportError):  # not registered yet / server still starting
                pass
            assert time.monotonic() < deadline, f"no served deployment {name}:\n{log.read_text(errors='replace')}"
            time.sleep(1.0)


def _stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM, then the exit code; killed (and the test failed) when it does not stop in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"mqgen serve did not stop within {timeout_s:.0f} s of SIGTERM")


def _read(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _check_deployment(deployment: Any, cfg: PipelineConfig, **parameters: Any) -> None:
    assert [s.schedule.cron for s in deployment.schedules] == [CRON]
    assert all(s.active for s in deployment.schedules)
    assert deployment.parameters == {"config": cfg.to_dict(), **parameters}
    assert deployment.entrypoint == "flows.pipeline.pipeline_flow"
    assert not deployment.paused


@pytest.mark.slow
def test_serve_registers_the_scheduled_deployment_then_stops_cleanly_on_sigterm(prefect_api: str,
                                                                                 tmp_path: Path) -> None:
    from flows.serve import deployment_name

    root = tmp_path / "run"
    cfg = resolve("tiny", overrides=[f"run.root={root}"])
    name = f"mqgen-pipeline/{deployment_name(cfg)}"
    log = tmp_path / "serve.log"
    api = prefect_api
    proc = _start_serve(root, log, _env(PREFECT_API_URL=api), "--gc-keep-days", "7")
    try:
        deployment = _wait_for_deployment(proc, log, name)
        _check_deployment(deployment, cfg, gc_keep_days=7.0)  # each scheduled run reclaims disk after its stages
        assert name.split("/")[1] == f"mqgen-tiny-{cfg.hash()}"
        out = log.read_text()
        assert name in out and "prefect deployment ls" in out and api in out
    finally:
        rc = _stop(proc)
    assert rc == 0, log.read_text(errors="replace")
    assert f"stopped serving {name!r}" in log.read_text()
    assert _read(name).paused  # the runner paused its schedule on the way out: nobody serves it now
    assert (root / ".prefect").is_dir() and not (root / ".prefect" / "server.log").exists()  # used the given API


@pytest.mark.slow
def test_serve_without_an_api_url_starts_and_stops_its_own_local_server(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import _healthy, deployment_name, free_port

    root = tmp_path / "run"
    cfg = resolve("tiny", overrides=[f"run.root={root}"])
    name = f"mqgen-pipeline/{deployment_name(cfg)}"
    port = free_port(0)
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "serve.log"
    # a `mqgen run` on the same fresh root is starting its own server: serve waits for it before creating and
    # migrating the shared database
    holder = _hold_start_lock(root / ".prefect")
    proc = _start_serve(root, log, _env(), "--port", str(port))
    try:
        time.sleep(6)
        assert proc.poll() is None, log.read_text(errors="replace")
        assert not (root / ".prefect" / "server.log").exists(), "the server started while another start held the lock"
        assert "waiting for Prefect's local database" in log.read_text(errors="replace")
        holder.stdin.close()
        holder.wait(timeout=30)
        with temporary_settings({PREFECT_API_URL: api}):
            _check_deployment(_wait_for_deployment(proc, log, name, timeout_s=240), cfg)
        assert (root / ".prefect" / "prefect.db").is_file()  # the server's database lives under the run root
    finally:
        rc = _stop(proc)
    assert rc == 0, log.read_text(errors="replace")
    assert not _healthy(api)  # the local server went with it


def test_bad_cron_is_refused_with_exit_code_2_before_anything_starts(tmp_path: Path) -> None:
    root = tmp_path / "run"
    t0 = time.monotonic()
    out = subprocess.run([*MQGEN, "serve", "--cron", "0 3 * *", "--preset", "tiny", f"run.root={root}"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "invalid schedule --cron '0 3 * *'" in out.stderr and "five fields" in out.stderr
    assert "starting" not in out.stdout and "serving" not in out.stdout
    assert not (root / ".prefect" / "server.log").exists() and not (root / ".prefect" / "prefect.db").exists()
    assert time.monotonic() - t0 < 60


def test_cron_and_timezone_validation_names_the_bad_value() -> None:
    from flows.serve import ScheduleError, cron_schedule

    assert cron_schedule(CRON, "Europe/Paris").timezone == "Europe/Paris"
    with pytest.raises(ScheduleError, match=r"--cron '61 3 \* \* \*'"):
        cron_schedule("61 3 * * *")
    with pytest.raises(ScheduleError, match="--timezone 'Mars/Olympus'"):
        cron_schedule(CRON, "Mars/Olympus")


def test_prefect_yaml_deploys_the_pipeline_flow_nightly_on_the_mqgen_pool() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from flows.pipeline import pipeline_flow
    from flows.serve import cron_schedule

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = doc["deployments"]
    flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
    assert dep["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    assert flow.name == pipeline_flow.name == "mqgen-pipeline"
    assert Path(flow.fn.__code__.co_filename).resolve() == Path(pipeline_flow.fn.__code__.co_filename).resolve()
    assert dep["work_pool"]["name"] == "mqgen"
    for schedule in dep["schedules"]:
        cron_schedule(schedule["cron"], schedule.get("timezone"))
    assert [s["cron"] for s in dep["schedules"]] == [CRON]
    (pull,) = doc["pull"]
    assert "directory" in pull["prefect.deployments.steps.set_working_directory"]
    params = dep["parameters"]
    assert set(params) <= {"config", "only", "from_stage", "gc_keep_days"}
    assert from_dict(PipelineConfig, params["config"]).to_dict() == resolve("fmnist").to_dict()
