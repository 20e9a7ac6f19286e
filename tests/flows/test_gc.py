"""``mqgen gc`` on a hand-made run root (no training; the pipeline case is in test_pipeline.py): the age rule,
unfinished outputs and their checkpoints, damaged copies and leftovers, the leftovers of a killed gc, links, live
runs' log folders, and the refusal when the MLflow store does not know the runs behind the outputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from infra.config import resolve


def _touch_tree(path: Path, age_days: float) -> None:
    """Files under ``path`` and ``path`` itself changed ``age_days`` ago."""
    t = time.time() - age_days * 86400
    for dirpath, _, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))
        os.utime(dirpath, (t, t))


def _output(folder: Path, size: int, age_days: float, **files: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"x" * size)
    for name, text in files.items():
        (folder / name).write_text(text)
    _touch_tree(folder, age_days)
    return folder


DONE = {"_SUCCESS.json": "{}"}


def test_gc_by_age_keeps_resume_state_and_live_logs_and_removes_links_and_leftovers(run_root: Path,
                                                                                    tmp_path: Path) -> None:
    from flows import gc

    cfg = resolve("tiny", overrides=[f"run.root={run_root}"])
    old = _output(run_root / "train_tokenizer" / "aaaa00000001", 1000, 30, **DONE, **{"attempt.json": '{"attempt": 0}'})
    new = _output(run_root / "train_tokenizer" / "aaaa00000002", 10, 1, **DONE)
    spent = _output(run_root / "ray" / "train_tokenizer-aaaa00000001-a0", 700, 30)
    # a training killed a month ago, never rerun: its output (attempt 1) and that attempt's checkpoints are its
    # resume state; attempt 0's are superseded
    unfinished = _output(run_root / "train_stackformer" / "bbbb00000001", 10, 30, **{"attempt.json": '{"attempt": 1}'})
    resume = _output(run_root / "ray" / "train_stackformer-bbbb00000001-a1", 500, 30)
    superseded = _output(run_root / "ray" / "train_stackformer-bbbb00000001-a0", 500, 30)
    damaged = _output(run_root / "train_tokenizer" / ".aaaa00000003.damaged-20261101T000000Z", 10, 30)
    build = _output(run_root / "ingest" / ".cccc00000002.build", 10, 30)  # an ingest that resumes from its chunks
    # a killed ``--force`` rebuild beside its finished output: a rerun is a cache hit, nothing resumes from it
    spent_build = _output(run_root / "ingest" / ".cccc00000003.build", 10, 30)
    _output(run_root / "ingest" / "cccc00000003", 10, 1, **{"manifest.json": "{}"})
    old_copy = _output(run_root / "tokenize" / ".dddd00000001.old-0123abcd", 10, 30)  # a killed replace_dir
    leftover = _output(run_root / "ray" / ".gc-trash-train_tokenizer-aaaa00000009-a0-0123abcd", 10, 0)
    # an output that is a link to a folder elsewhere: removing it removes the link, never what it points to
    elsewhere = _output(tmp_path / "elsewhere" / "shards", 10, 30, **{"manifest.json": "{}"})
    link = run_root / "ingest" / "cccc00000001"
    link.symlink_to(elsewhere)
    os.utime(link, (time.time() - 30 * 86400,) * 2, follow_symlinks=False)
    live_run = _output(run_root / "logs" / f"20261101-000000-serve-{os.getpid()}", 10, 30)
    dead_run = _output(run_root / "logs" / "20261101-000000-run-999999999", 10, 30)

    items = {i.path: i for i in gc.plan(cfg, keep_days=7)}
    decision = {p: (i.what, i.keep) for p, i in items.items()}
    assert decision[old] == ("output", None) and items[old].size == 1000 + 2 + len('{"attempt": 0}')
    assert decision[new] == ("output", "recent")
    assert decision[spent] == ("ray run", None)  # its output goes (and it was finished anyway)
    assert decision[unfinished] == ("output", "unfinished (resume state)")
    assert decision[resume] == ("ray run", "resume state")
    assert decision[superseded] == ("ray run", None)
    assert decision[damaged] == ("damaged copy", None)
    assert decision[build] == ("leftover", "unfinished (resume state)")
    assert decision[spent_build] == ("leftover", None)
    assert decision[old_copy] == ("leftover", None)
    assert decision[leftover] == ("trash", None)
    assert decision[link] == ("output", None) and items[link].link and items[link].size == 0
    assert decision[live_run] == ("logs", f"process {os.getpid()} running")
    assert decision[dead_run] == ("logs", None)
    # --drop-unfinished: an abandoned run's resume state goes too
    dropping = {i.path: i.keep for i in gc.plan(cfg, keep_days=7, drop_unfinished=True)}
    assert dropping[unfinished] is None and dropping[resume] is None and dropping[build] is None

    done = gc.remove(cfg, list(items.values()))
    removable = [p for p, i in items.items() if i.removable]
    assert done.count == len(removable) == 9 and not done.in_use and not done.failed
    assert done.size == sum(items[p].size for p in removable)
    for path in removable:
        assert not (path.exists() or path.is_symlink()), path
    for path in (new, unfinished, resume, build, live_run):
        assert path.is_dir(), path
    assert (elsewhere / "data.bin").is_file()  # the link went, not the folder it pointed to
    assert not list(run_root.rglob(".gc-trash-*"))
    assert not [i for i in gc.plan(cfg, keep_days=7) if i.removable]


def test_gc_refuses_when_the_mlflow_store_knows_none_of_the_runs_behind_the_outputs(run_root: Path) -> None:
    """The runs were tracked elsewhere (``MLFLOW_TRACKING_URI`` set then, not now): which outputs recent runs used
    cannot be told, so nothing is removed, through the CLI too (exit 1, one line)."""
    import subprocess
    import sys

    from flows import gc

    cfg = resolve("tiny", overrides=[f"run.root={run_root}"])
    marker = {"_SUCCESS.json": json.dumps({"mlflow_run_id": "0123456789abcdef0123456789abcdef"})}
    old = _output(run_root / "train_tokenizer" / "aaaa00000001", 10, 30, **marker)
    with pytest.raises(gc.GcRefused, match="knows none of the runs"):
        gc.plan(cfg, keep_days=7)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([str(Path(sys.executable).parent / "mqgen"), "gc", "--preset", "tiny", f"run.root={run_root}",
                          "--yes"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "gc refused" in out.stderr and "Traceback" not in out.stderr, out
    assert old.is_dir()


def test_gc_on_a_root_without_a_tracking_store_creates_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root whose runs were never tracked here: gc reads what it can, creates no MLflow database (a dry run
    changes nothing), removes an old unnamed output, and refuses where outputs name runs it cannot look up."""
    from flows import gc

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "bare"
    cfg = resolve("tiny", overrides=[f"run.root={root}"])
    old = _output(root / "train_tokenizer" / "aaaa00000001", 10, 30, **DONE)
    items = gc.plan(cfg, keep_days=7)
    assert [(i.path, i.removable) for i in items] == [(old, True)]
    assert not (root / "mlflow.db").exists()
    named = _output(root / "train_tokenizer" / "aaaa00000002", 10, 30,
                    **{"_SUCCESS.json": json.dumps({"mlflow_run_id": "0123456789abcdef0123456789abcdef"})})
    with pytest.raises(gc.GcRefused):
        gc.plan(cfg, keep_days=7)
    assert old.is_dir() and named.is_dir() and not (root / "mlflow.db").exists()
