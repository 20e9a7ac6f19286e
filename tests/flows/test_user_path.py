"""The pipeline the way a user runs it: the installed ``mqgen`` command in a subprocess, from a fresh working
directory, with the default relative run root (``./runs``); meanwhile a second run of the same config from another
directory (a manual run beside a scheduled one) and a run of another config on the same fresh root; then a cached
rerun."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
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


def _cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MQGEN), *args], check=False, cwd=cwd, env=_env(), timeout=timeout,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (f"exit {proc.returncode}\n--- stdout (tail) ---\n{_tail(proc.stdout)}\n"
            f"--- stderr (tail) ---\n{_tail(proc.stderr)}")


def _start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(MQGEN), "run", "--preset", "tiny", *args], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _wait(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stage_runs(db: Path) -> list[tuple[str, str, str]]:
    """(stage, stage key, status) of every MLflow stage run in the SQLite store."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute("select s.value, k.value, r.status from runs r "
                         "join tags s on s.run_uuid = r.run_uuid and s.key = 'mqgen.stage' "
                         "join tags k on k.run_uuid = r.run_uuid and k.key = 'mqgen.stage_key'").fetchall()


def test_mqgen_run_with_the_default_relative_root_then_cached_from_another_directory(tmp_path: Path) -> None:
    assert MQGEN.is_file(), f"{MQGEN} is missing: install the project (make setup)"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()

    # 1. a fresh directory, no run.root override: everything lands in ./runs. 3 s later, while its MLflow and
    # Prefect databases are being created: the same config from another directory (it must wait for each stage
    # and reuse it) and another config on the same root (it must not wait for the first one's stages).
    first_p = _start(a)
    time.sleep(3)
    same_p = _start(b, "run.root=../a/runs")
    other_p = _start(c, "run.root=../a/runs", "seed=1", "--only", "ingest")
    first, same, other = _wait(first_p, 900), _wait(same_p, 900), _wait(other_p, 900)
    assert first.returncode == 0, f"mqgen run --preset tiny failed in a fresh directory:\n{_describe(first)}"
    assert same.returncode == 0, f"the same run started beside it failed:\n{_describe(same)}"
    assert other.returncode == 0, f"another config started beside it on the same root failed:\n{_describe(other)}"
    assert re.search(rf"waiting for train_tokenizer \w+ \(its result is reused\): process {first_p.pid} ",
                     same.stderr), f"the second run did not say whose training it waited for:\n{_describe(same)}"
    runs = _stage_runs(a / "runs" / "mlflow.db")
    assert all(status == "FINISHED" for _, _, status in runs), runs
    assert len(runs) == len({(stage, key) for stage, key, _ in runs}), f"a stage ran twice: {sorted(runs)}"
    assert sorted(stage for stage, _, _ in runs).count("ingest") == 2 and len(runs) == 7, sorted(runs)
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

    # 3. the finished model by name, never by path: the registry's champion sampled, exported, sampled again
    # from the exported folder (the same images for the same seed), and a tampered export refused
    root = "run.root=../a/runs"
    promoted = re.search(r"promotion: mqgen-stackformer-tiny v1: FID (\d+\.\d+) \((\d+\.?\d*)\.\.(\d+\.?\d*)\): first",
                         first.stdout + first.stderr + same.stdout + same.stderr)  # whichever gated first
    assert promoted, f"no run printed the first promotion decision:\n{_describe(first)}\n{_describe(same)}"
    fid, low, high = (float(g) for g in promoted.groups())
    assert low <= fid <= high and low < high, promoted.group(0)  # the figure and its bootstrap interval
    models = subprocess.run([str(MQGEN), "models", "--preset", "tiny", root], check=False, cwd=b, timeout=300,
                            env={**_env(), "COLUMNS": "200"}, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert models.returncode == 0 and "mqgen-stackformer-tiny" in models.stdout, _describe(models)
    row = next((line for line in models.stdout.splitlines() if re.match(r"\W*1\W+champion\W", line)), None)
    assert row is not None, f"no row for v1 holding champion:\n{_describe(models)}"
    shown = re.search(r"champion\W+(\d+\.?\d*)\W+(\d+\.?\d*) \.\. (\d+\.?\d*)\W.*first", row)
    assert shown, row
    # the same figures (the run prints the interval to 3 significant digits, the table to 4)
    assert all(math.isclose(float(g), v, rel_tol=6e-3) for g, v in zip(shown.groups(), (fid, low, high), strict=True)), \
        (row, promoted[0])
    grid = _cli(b, "sample", "--preset", "tiny", "--model", "champion", "--n", "8", "--class", "3", "--out",
                "grid.png", root)
    assert grid.returncode == 0, _describe(grid)
    assert (b / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "class 3" in grid.stdout
    by_alias = _cli(b, "sample", "--preset", "tiny", "--model", "models:/mqgen-stackformer-tiny@champion", "--n", "6",
                    "--seed", "7", "--out", "alias.safetensors", root)
    assert by_alias.returncode == 0, _describe(by_alias)
    exported = _cli(b, "export", "exported", "--preset", "tiny", "--model", "champion", root)
    assert exported.returncode == 0, _describe(exported)
    card = (b / "exported" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mqgen") and "| fid |" in card and "reference_set_hash" in card
    assert '"weights_sha256"' in card  # the extractor's, with its name
    from_folder = _cli(c, "sample", "--model", str(b / "exported"), "--n", "6", "--seed", "7", "--out",
                       "folder.safetensors")
    assert from_folder.returncode == 0, _describe(from_folder)
    from safetensors.torch import load_file

    assert load_file(b / "alias.safetensors")["images"].equal(load_file(c / "folder.safetensors")["images"])
    weights = b / "exported" / "generator" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    refused = _cli(c, "sample", "--model", str(b / "exported"), "--out", "bad.png")
    assert refused.returncode == 1 and "sha256" in refused.stderr and "Traceback" not in refused.stderr, \
        _describe(refused)
    assert not (c / "bad.png").exists()
    missing = _cli(c, "sample", "--preset", "tiny", "--model", "nosuchalias", "run.root=../a/runs")
    assert missing.returncode == 1 and "not in the registry" in missing.stderr, _describe(missing)

    # 4. a grid in which one variant fails: the other finishes, the report shows both, the exit says which failed.
    # The second variant's tokenizer run was killed earlier and both its checkpoints rotted since: resuming would
    # silently start over from step 0, so that stage refuses (at once, not retried)
    _grid_with_a_failing_variant(b, a / "runs")


def _grid_with_a_failing_variant(cwd: Path, root: Path) -> None:
    import sqlite3

    import torch

    from flows.pipeline import stage_status
    from infra.checkpoint import write_checkpoint
    from infra.config import resolve

    lr = resolve("tiny").tokenizer.lr
    failing = resolve("tiny", overrides=[f"run.root={root}", f"tokenizer.lr={lr / 2}"])
    [row] = [r for r in stage_status(failing) if r["stage"] == "train_tokenizer"]
    assert row["state"] == "not done" and row["key"], row
    for step in (8, 16):
        ckpt = root / "ray" / f"train_tokenizer-{row['key']}-a0" / f"checkpoint_2026-12-07_00-00-{step:02d}.000000"
        write_checkpoint(ckpt, step, {"model": {"w": torch.zeros(8)}}, {"step": step})
        (ckpt / "model.safetensors").write_bytes(b"rotted")
    out = _cli(cwd, "grid", "--preset", "tiny", f"tokenizer.lr=[{lr},{lr / 2}]", "--report", "grid-report",
               "run.root=../a/runs", timeout=600)
    assert out.returncode == 1, _describe(out)
    assert "1 of 2 grid variants failed" in out.stderr and "Traceback" not in out.stderr, _describe(out)
    assert re.search(rf"tokenizer\.lr={lr / 2}: train_tokenizer: UnsafeCheckpointError: .*step 0", out.stderr), \
        _describe(out)
    summary = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    assert list(summary["failed"]) == [f"tokenizer.lr={lr / 2}"] and summary["executions"]["evaluate"] == 1
    with sqlite3.connect(root / "mlflow.db") as db:
        status = dict(db.execute("select r.name, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                                 "where t.key = 'mqgen.grid_run_id'").fetchall())
    assert status == {f"variant-tokenizer.lr={lr}": "FINISHED", f"variant-tokenizer.lr={lr / 2}": "FAILED"}, status
    report = (cwd / "grid-report" / "report.md").read_text()
    assert "FAILED" in report and "FINISHED" in report, report


@pytest.mark.long
def test_two_different_configs_run_at_once_on_one_fresh_root(tmp_path: Path) -> None:
    """Two users (or a scheduled run and a manual one with another setting) start at the same moment on one fresh
    root: each trains its own models (two Ray Train runs at once), the stages the configs share run once, both
    finish with their own evaluation, and the registry holds both versions with one champion."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    first_p = _start(a)
    other_p = _start(b, "run.root=../a/runs", "tokenizer.keep_ratio=0.75")
    first, other = _wait(first_p, 1200), _wait(other_p, 1200)
    assert first.returncode == 0, f"the first config failed:\n{_describe(first)}"
    assert other.returncode == 0, f"the other config, started at the same moment, failed:\n{_describe(other)}"
    runs = _stage_runs(a / "runs" / "mlflow.db")
    assert all(status == "FINISHED" for _, _, status in runs), runs
    assert len(runs) == len({(stage, key) for stage, key, _ in runs}), f"a stage ran twice: {sorted(runs)}"
    per_stage = {s: sorted(k for stage, k, _ in runs if stage == s) for s, _, _ in runs}
    assert {s: len(k) for s, k in per_stage.items()} == {
        "ingest": 1, "train_evaluator": 1, "train_tokenizer": 2, "tokenize": 2, "train_stackformer": 2,
        "evaluate": 2}, per_stage
    assert len(list((a / "runs" / "evaluate").glob("*/evaluation.json"))) == 2

    from infra.tracking import Tracker

    client = Tracker(a / "runs", "mqgen").client
    versions = client.search_model_versions("name = 'mqgen-stackformer-tiny'")
    assert len(versions) == 2, [(v.version, v.run_id) for v in versions]
    champion = client.get_model_version_by_alias("mqgen-stackformer-tiny", "champion")
    assert champion.version in {v.version for v in versions}
    decisions = [client.get_run(v.run_id).data.tags for v in versions]
    assert all("mqgen.weights_sha256" in v.tags for v in versions), [v.tags for v in versions]
    evaluated = [v for v in client.search_model_versions("name = 'mqgen-stackformer-tiny'")
                 if any(k.endswith(".fid") for k in v.tags)]
    assert len(evaluated) == 2, (decisions, [v.tags for v in versions])
