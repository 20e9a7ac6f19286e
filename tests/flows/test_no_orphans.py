"""A ``mqgen`` process killed with SIGKILL (the OOM killer, a power-cut of the job, ``kill -9``) leaves no Prefect
server behind: the server it started gets SIGTERM from the kernel when its parent dies (``PR_SET_PDEATHSIG``), so
it does not keep the port, the run root's database and hundreds of MB of memory until the next reboot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MQGEN = Path(sys.executable).parent / "mqgen"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS")}


def _children(pid: int, needle: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and needle in cmd:
            out.append(int(p))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for_child(proc: subprocess.Popen, needle: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        found = _children(proc.pid, needle)
        if found:
            return found[0]
        assert proc.poll() is None, f"mqgen exited ({proc.returncode}) before starting {needle}"
        assert time.monotonic() < deadline, f"no {needle} child of mqgen after {timeout_s:.0f} s"
        time.sleep(0.2)


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _kill_and_check(proc: subprocess.Popen, server: int, what: str) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the mqgen process only, as the OOM killer would
        proc.wait(timeout=30)
        assert _gone_within(server, 60), f"{what} (pid {server}) outlived the SIGKILLed mqgen by 60 s"
    finally:
        if _running(server):
            os.kill(server, signal.SIGKILL)


def test_a_killed_run_leaves_no_prefect_server_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen([str(MQGEN), "run", "--preset", "tiny", f"run.root={tmp_path / 'runs'}"], env=_env(),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        server = _wait_for_child(proc, "uvicorn", 180)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    _kill_and_check(proc, server, "the temporary Prefect API server")


def test_a_killed_serve_leaves_no_prefect_server_behind(tmp_path: Path) -> None:
    from flows.serve import _healthy, free_port

    port = free_port(0)
    env = {k: v for k, v in _env().items() if not k.startswith("PREFECT_")}
    proc = subprocess.Popen([sys.executable, "-c", "from flows.cli import app; app()", "serve", "--cron", "0 3 * * *",
                             "--preset", "tiny", "--port", str(port), f"run.root={tmp_path / 'runs'}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        server = _wait_for_child(proc, "prefect server start", 120)
        deadline = time.monotonic() + 240
        while not _healthy(f"http://127.0.0.1:{port}/api"):
            assert proc.poll() is None and time.monotonic() < deadline, "the local Prefect server never came up"
            time.sleep(1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    _kill_and_check(proc, server, "mqgen serve's local Prefect server")
    assert not _healthy(f"http://127.0.0.1:{port}/api")
