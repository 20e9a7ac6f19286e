"""A full disk: the stage stops with a "no space left on <file system>" message and exit code 3, is not retried,
leaves every finished output as it was, and the same command resumes once there is space. The file system that
fills up is a real, small tmpfs mounted over the stage's folder (CI runs as root; elsewhere the test is skipped
and says why)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.refs import TokenizeInputs
from infra.storage import sha256_file
from tasks import tokenize as tk
from tests.fixtures import tokenize_data as fx

ray_cluster = fx.ray_cluster  # the session's shared Ray instance (the in-process rerun uses it)


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """Mount a tmpfs of ``size`` over a folder; remount it larger; unmounted at the end."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" if path not in mounted else f"remount,size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root, as in CI): {proc.stderr.strip()}")
        if path not in mounted:
            mounted.append(path)
        return path

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8), as in CI")
    yield mount
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], check=False)


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
@pytest.mark.slow  # a real `mqgen` process
def test_a_full_disk_stops_tokenize_clearly_and_the_rerun_resumes(small_fs, run_root: Path) -> None:
    cfg = fx.tiny_config(run_root, 64, 8)
    ingest = fx.make_ingest(cfg)
    tokenizer = fx.make_tokenizer(cfg, ingest=ingest)  # a finished train_tokenizer output for this config
    before = {p: sha256_file(p) for p in run_root.rglob("*") if p.is_file() and p.suffix in (".tar", ".json",
                                                                                           ".safetensors")}
    small_fs(run_root / "tokenize", "48k")

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME",
                                                           "RAY_ADDRESS")}
    overrides = [f"run.root={run_root}", "data.source=digits", "data.max_images=64", "data.shard_max_count=8",
                 "data.min_shards=1", "run.retries=2", "run.retry_delay_s=0"]
    proc = subprocess.run([str(Path(sys.executable).parent / "mqgen"), "run", "--only", "tokenize", "--preset", "tiny",
                           *overrides], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"no space left on {run_root / 'tokenize'}" in proc.stderr, proc.stderr[-3000:]
    assert "this stage needs about" in proc.stderr and "run the same command again" in proc.stderr
    logs = "".join(p.read_text() for p in (run_root / "logs").rglob("mqgen.log"))
    assert "Retrying" not in proc.stderr + logs and "retry" not in logs.lower().replace("run.retries", "")
    assert {p: sha256_file(p) for p in before} == before  # nothing finished was touched

    small_fs(run_root / "tokenize", "16m")  # space freed: the same work resumes and finishes
    out = tk.run(cfg, TokenizeInputs(ingest=ingest, train_tokenizer=tokenizer))
    assert out.num_train + out.num_val == ingest.num_train + ingest.num_val
    assert tk.cached(cfg, TokenizeInputs(ingest=ingest, train_tokenizer=tokenizer)) == out


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
@pytest.mark.slow  # a real `mqgen` process
def test_a_full_disk_stops_ingest_without_retries_and_the_rerun_finishes(small_fs, run_root: Path) -> None:
    """ENOSPC while ingest writes shards is not a transient fault: no retry of the chunk or the task, exit 3 with
    the message, and once there is space the same command finishes."""
    small_fs(run_root / "ingest", "32k")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME",
                                                           "RAY_ADDRESS")}
    command = [str(Path(sys.executable).parent / "mqgen"), "run", "--only", "ingest", "--preset", "tiny",
               f"run.root={run_root}", "data.source=digits", "data.max_images=400", "data.shard_max_count=50",
               "run.retries=2", "run.retry_delay_s=0"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"no space left on {run_root / 'ingest'}" in proc.stderr, proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in (run_root / "logs").rglob("*.log"))
    assert "Retrying" not in proc.stderr + logs and "retrying" not in logs.lower(), logs[-3000:]
    assert not list((run_root / "ingest").glob("*/manifest.json"))  # nothing half-written looks finished

    small_fs(run_root / "ingest", "16m")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    [manifest] = (run_root / "ingest").glob("*/manifest.json")
    assert manifest.stat().st_size > 0


def test_a_full_disk_under_the_mlflow_store_is_known_as_one(small_fs, tmp_path: Path) -> None:
    """The run root's SQLite store (MLflow's, Prefect's) says SQLITE_FULL only in words, wrapped by SQLAlchemy and
    MLflow: it is recognised as a full disk (exit 3, no retry), not an unknown error retried as transient."""
    from infra.errors import is_no_space
    from infra.tracking import Tracker

    root = small_fs(tmp_path / "root", "8m")
    run = Tracker(root).pipeline_run("cfg")
    ballast = root / "ballast"
    with open(ballast, "wb") as f:  # fill what is left
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass
    with pytest.raises(Exception) as full:  # whatever MLflow wraps it in
        for i in range(10_000):
            run.log_params({f"p{i}": "x" * 5000})
    assert is_no_space(full.value), repr(full.value)


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
@pytest.mark.slow  # a real `mqgen` process and Ray Train workers
def test_a_full_disk_under_the_training_checkpoints_stops_the_stage_clearly(small_fs, run_root: Path) -> None:
    """The checkpoints' file system (``<run.root>/ray``, where Ray Train stores them) fills up during training:
    exit 3 naming it, no Prefect retry and no Ray restart, nothing finished touched; with space again the same
    command trains to the end."""
    cfg = fx.tiny_config(run_root, 64, 8)
    fx.make_ingest(cfg)
    before = {p: sha256_file(p) for p in run_root.rglob("*") if p.is_file() and p.suffix in (".tar", ".json")}
    small_fs(run_root / "ray", "96k")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME",
                                                           "RAY_ADDRESS")}
    cmd = [str(Path(sys.executable).parent / "mqgen"), "run", "--only", "train_tokenizer", "--preset", "tiny",
           f"run.root={run_root}", "data.source=digits", "data.max_images=64", "data.shard_max_count=8",
           "data.min_shards=1", "run.retries=2", "run.retry_delay_s=0", "ray.max_failures=2",
           "tokenizer.max_steps=8", "tokenizer.checkpoint_every=4", "tokenizer.eval_every=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "NoSpaceLeft: no space left on" in proc.stderr and "run the same command again" in proc.stderr, \
        proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in (run_root / "logs").rglob("*.log"))
    assert "restarting from its latest checkpoint" not in logs and "Retrying" not in proc.stderr + logs
    assert {p: sha256_file(p) for p in before} == before
    assert not list((run_root / "train_tokenizer").glob("*/_SUCCESS.json"))

    small_fs(run_root / "ray", "256m")  # space freed
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert list((run_root / "train_tokenizer").glob("*/_SUCCESS.json"))
