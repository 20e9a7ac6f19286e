"""The pipeline the way a user runs it: the installed ``mqgen`` command in a subprocess, from a fresh working
directory, with the default relative run root (``./runs``), then a cached rerun from another directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MQGEN = Path(sys.executable).parent / "mqgen"
# A user's shell has none of these: the CLI picks its local defaults (Prefect's temporary server, MLflow
# under the run root, a local Ray).
UNSET = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in UNSET:
        env.pop(name, None)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _mqgen(cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MQGEN), "run", "--preset", "tiny", *args], check=False, cwd=cwd, env=_env(),
                          timeout=timeout, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (f"exit {proc.returncode}\n--- stdout (tail) ---\n{_tail(proc.stdout)}\n"
            f"--- stderr (tail) ---\n{_tail(proc.stderr)}")


def test_mqgen_run_with_the_default_relative_root_then_cached_from_another_directory(tmp_path: Path) -> None:
    assert MQGEN.is_file(), f"{MQGEN} is missing: install the project (make setup)"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    # 1. a fresh directory, no run.root override: everything lands in ./runs
    first = _mqgen(a, timeout=900)
    assert first.returncode == 0, f"mqgen run --preset tiny failed in a fresh directory:\n{_describe(first)}"
    evaluations = sorted((a / "runs" / "evaluate").glob("*/evaluation.json"))
    assert len(evaluations) == 1, (f"expected one runs/evaluate/<key>/evaluation.json under {a}, found "
                                   f"{[str(p) for p in evaluations]}\n{_describe(first)}")
    keys = sorted(p.name for p in (a / "runs" / "evaluate").iterdir() if p.is_dir())

    # 2. another directory, the same runs through a relative override: every stage is a cache hit
    second = _mqgen(b, "run.root=../a/runs", timeout=300)
    assert second.returncode == 0, f"the cached rerun from another directory failed:\n{_describe(second)}"
    assert re.search(r"all \d+ stage\(s\) are done for config", second.stderr), (
        f"the rerun with run.root=../a/runs was not a cache hit:\n{_describe(second)}")
    assert not (b / "runs").exists(), f"the rerun created {b / 'runs'}:\n{_describe(second)}"
    keys_after = sorted(p.name for p in (a / "runs" / "evaluate").iterdir() if p.is_dir())
    assert keys_after == keys, f"the rerun made another evaluate key: {keys} -> {keys_after}\n{_describe(second)}"
