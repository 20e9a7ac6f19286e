"""Checkpoints staged by the training loops: the local scratch copy is gone once Ray has persisted it (also the
copies a killed process left behind), and the fallback order of stored checkpoints is their step, not the
wall-clock names Ray gives them."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.train
import torch

from infra import ray as rayx
from infra.checkpoint import write_checkpoint


def _loop(lc: dict) -> None:
    tempfile.tempdir = lc["tmp"]  # what TMPDIR does for a process, for the worker processes of this test
    w = rayx.worker()
    for step in range(1, 4):
        d = None
        if w.is_main:
            d = rayx.scratch_dir()
            write_checkpoint(d, step, {"model": {"w": torch.full((4,), float(step))}}, {"step": step})
            Path(lc["tmp"], f"staged-{step}").write_text(d)
        w.report({"step": step}, checkpoint_dir=d)


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
@pytest.mark.slow
def test_nothing_is_left_in_the_temp_dir_after_training(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp / f"{rayx.SCRATCH_PREFIX}{int(dead.stdout)}-abcd1234"  # left by a process killed mid-checkpoint
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    result = rayx.fit(_loop, {"tmp": str(tmp)}, name="scratch", storage_path=str(tmp_path / "ray"), num_workers=2,
                      cpus_per_worker=1, num_to_keep=2)
    assert result.metrics["step"] == 3 and result.checkpoint_path is not None
    staged = [Path((tmp / f"staged-{s}").read_text()) for s in (1, 2, 3)]
    assert all(d.parent == tmp for d in staged)  # the loop did stage in the test's temp dir
    left = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("staged-"))
    assert left == [], f"left in the temp dir: {left}"
    assert (Path(result.checkpoint_path) / "model.safetensors").is_file()  # persisted before the copy went


def test_fallback_checkpoints_are_ordered_by_their_step_not_their_names(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # names as Ray makes them from local time: after a clock change, an older step can sort after a newer one
    names = {"checkpoint_2026-03-29_01-59-00.000000": 3, "checkpoint_2026-03-29_02-30-00.000000": 1,
             "checkpoint_2026-03-29_01-10-00.000000": 4, "checkpoint_2026-03-29_03-00-00.000000": 2}
    for name, step in names.items():
        write_checkpoint(run / name, step, {"model": {"w": torch.zeros(1)}}, {})
    (run / "checkpoint_2026-03-29_04-00-00.000000").mkdir()  # no manifest: tried last
    fs = pafs.LocalFileSystem()
    latest = ray.train.Checkpoint(path=str(run / "checkpoint_2026-03-29_01-10-00.000000"), filesystem=fs)
    order = [Path(c.path).name for c in rayx._sibling_checkpoints(latest)]
    assert [names.get(n) for n in order] == [4, 3, 2, 1, None]
