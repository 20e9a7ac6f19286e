"""``mqgen gc`` on a hand-made run root (no training; the pipeline case is in test_pipeline.py): the age rule,
damaged copies, the leftovers of a killed gc, a stage folder that links to another disk, the unfinished stage's
resume state, and a live run's log folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

from infra.config import resolve


def _touch_tree(path: Path, age_days: float) -> None:
    """Files under ``path`` and ``path`` itself changed ``age_days`` ago."""
    t = time.time() - age_days * 86400
    for dirpath, _, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))
        os.utime(dirpath, (t, t))


def _output(folder: Path, size: int, age_days: float, *files: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"x" * size)
    for name in files:
        (folder / name).write_text("{}")
    _touch_tree(folder, age_days)
    return folder


def test_gc_by_age_with_trash_damaged_copies_links_resume_state_and_live_logs(run_root: Path, tmp_path: Path) -> None:
    from flows import gc

    cfg = resolve("tiny", overrides=[f"run.root={run_root}"])
    old = _output(run_root / "train_tokenizer" / "aaaa00000001", 1000, 30, "_SUCCESS.json", "attempt.json")
    (old / "attempt.json").write_text('{"attempt": 0}')
    _touch_tree(old, 30)
    new = _output(run_root / "train_tokenizer" / "aaaa00000002", 10, 1)
    unfinished = _output(run_root / "train_stackformer" / "bbbb00000001", 10, 1, "attempt.json")
    (unfinished / "attempt.json").write_text('{"attempt": 1}')
    resume = _output(run_root / "ray" / "train_stackformer-bbbb00000001-a1", 500, 1)
    superseded = _output(run_root / "ray" / "train_stackformer-bbbb00000001-a0", 500, 1)
    spent = _output(run_root / "ray" / "train_tokenizer-aaaa00000001-a0", 700, 30)
    damaged = _output(run_root / "train_tokenizer" / ".aaaa00000003.damaged-20261101-000000", 10, 30)
    leftover = _output(run_root / "ray" / ".gc-trash-train_tokenizer-aaaa00000009-a0-0123abcd", 10, 0)
    # the ingest folder is a link to another disk: a removed output is renamed inside it, not across
    disk = tmp_path / "other-disk" / "ingest"
    disk.mkdir(parents=True)
    (run_root / "ingest").symlink_to(disk)
    linked = _output(disk / "cccc00000001", 10, 30, "manifest.json")
    live_logs = _output(run_root / "logs" / f"20261101-000000-run-{os.getpid()}", 10, 30)
    dead_logs = _output(run_root / "logs" / "20261101-000000-run-999999999", 10, 30)

    items = {i.path: i for i in gc.plan(cfg, keep_days=7)}
    decisions = {p: (i.what, i.removable) for p, i in items.items()}
    assert decisions[old] == ("output", True) and items[old].size == 1000 + len("{}") + len('{"attempt": 0}')
    assert decisions[new] == ("output", False) and items[new].keep == "recent"
    assert decisions[unfinished] == ("output", False)
    assert decisions[resume] == ("ray run", False) and items[resume].keep == "resume state"
    assert decisions[superseded] == ("ray run", True)  # attempt 0 of a stage now at attempt 1
    assert decisions[spent] == ("ray run", True)  # its output goes (and it was finished anyway)
    assert decisions[damaged] == ("damaged copy", True)
    assert decisions[leftover] == ("trash", True)
    assert decisions[run_root / "ingest" / "cccc00000001"] == ("output", True)
    assert decisions[live_logs] == ("logs", False) and "running" in items[live_logs].keep
    assert decisions[dead_logs] == ("logs", True)

    done = gc.remove(cfg, list(items.values()))
    assert done.count == 7 and not done.in_use
    assert done.size == sum(i.size for i in items.values() if i.removable)
    for path in (old, superseded, spent, damaged, leftover, linked, dead_logs):
        assert not path.exists(), path
    for path in (new, unfinished, resume, live_logs):
        assert path.is_dir(), path
    assert disk.is_dir() and not list(disk.iterdir())  # removed inside the other disk, nothing left there
    assert not [p for p in run_root.rglob(".gc-trash-*")]
    assert not [i for i in gc.plan(cfg, keep_days=7) if i.removable]
