"""A writer killed mid-shard: its ``*.tar.partial`` is never mistaken for a shard, the stage fails without
a manifest, and the rerun resumes from the chunks that did finish (their files reused as they are)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from infra.shards import ShardSet
from infra.storage import atomic_write_json
from tasks.ingest import run, stage_key
from tests.fixtures.ingest_data import FMNIST_DIR, config, write

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir() or not FMNIST_DIR.is_dir(),
                                reason="needs Linux /proc and Debian's dataset-fashion-mnist")

# 2 x 3000 train + 2 x 3000 val: four one-shard chunks for two workers
KILL_CFG = ("data.image_size=32", "data.max_images=6000", "data.shard_max_count=3000", "data.min_shards=1",
            "data.num_workers=2")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _holder_of(path_suffix: str) -> int | None:
    """The descendant process of this test that has a file ending in ``path_suffix`` open."""
    for pid in _descendants(os.getpid()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(path_suffix):
                    return pid
        except OSError:
            continue
    return None


def test_killed_writer_leaves_no_manifest_and_the_rerun_resumes(run_root: Path) -> None:
    cfg = config(run_root, *KILL_CFG)
    key = stage_key(cfg)
    build = run_root / "ingest" / f".{key}.build"
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(cfg, {})
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    killed = None
    deadline = time.monotonic() + 240
    while t.is_alive() and time.monotonic() < deadline and killed is None:
        partials = list((build / "parts").glob("*.tar.partial")) if (build / "parts").is_dir() else []
        if partials and list((build / "done").glob("*.json")):  # one chunk finished, another mid-write
            pid = _holder_of(".tar.partial")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.002)
    t.join(240)
    if killed is None:
        pytest.skip("the ingest finished before a writer could be caught mid-shard (machine too fast?)")
    assert errors and isinstance(errors[0], RuntimeError) and "worker process died" in str(errors[0])

    out_dir = run_root / "ingest" / key
    assert not out_dir.exists() and not list(run_root.rglob("manifest.json"))
    assert list((build / "parts").glob("*.tar.partial"))  # the killed writer's leftover, never renamed
    with pytest.raises(Exception, match="not a complete ingest output"):
        ShardSet.load(build)
    finished = {p.stat().st_ino for p in (build / "parts").glob("*.tar")}
    done = list((build / "done").glob("*.json"))
    assert done

    out = run(cfg, {})  # resumes
    shards = ShardSet.from_output(out, verify=True)
    assert (out.num_train, out.num_val) == (6000, 6000)
    final = {Path(u).stat().st_ino for s in ("train", "val") for u in shards.urls(s)}
    assert finished & final  # a finished chunk's file was reused, not rebuilt
    assert not build.exists() and not list(out_dir.rglob("*.partial"))
    keys = [s.key for s in shards.iter_samples("val")]
    assert keys == [f"val_{i:08d}" for i in range(6000)]


def test_stray_partials_and_unrecorded_parts_are_ignored(run_root: Path) -> None:
    cfg = config(run_root, "data.max_images=100")
    key = stage_key(cfg)
    build = run_root / "ingest" / f".{key}.build"
    write(build / "parts" / "train-c000000-p000.tar.partial", b"half a shard")
    write(build / "parts" / "train-c000001-p000.tar", b"no done record: not trusted")
    write(build / "train-000000.tar", b"left by a killed finalize")
    atomic_write_json(build / "done" / "train-000002.json", {"job_id": "train-000002", "parts": "garbage"})
    out = run(cfg, {})
    shards = ShardSet.from_output(out, verify=True)
    assert shards.num_samples("train") == 100
    assert not build.exists() and not list(Path(out.path).rglob("*.partial"))


def test_a_writer_that_fails_mid_chunk_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.ingest import writer as shards
    from tasks.ingest.sources import ArrayChunk, Good, ImageSpec

    def broken(chunk, spec):  # two good samples, then the decoder blows up
        yield Good("train", "train_00000000", b"\x89PNG fake", 1)
        yield Good("train", "train_00000001", b"\x89PNG fake", 2)
        raise MemoryError("simulated")

    monkeypatch.setattr(shards, "iter_chunk", broken)
    import numpy as np

    chunk = ArrayChunk("train", 0, 0, np.zeros((2, 4, 4), np.uint8), None, "pad", "x")
    with pytest.raises(MemoryError):
        shards.build_chunk(shards.ChunkJob(chunk, ImageSpec(size=4, channels=1), str(tmp_path), 10, 1 << 20))
    assert list(tmp_path.iterdir()) == []
