"""Faults of the tokenize stage and its LMDB writer (reference/faults.md section 1).

* kill -9 of the stage (a subprocess) after a seeded random number of shard commits, then a rerun:
  exactly N records, no duplicates, bytes identical to an uninterrupted run;
* kill -9 of a writer in the middle of a shard's transaction: nothing of that shard is visible;
* an exception after some puts: nothing of that shard is visible, the done key is absent;
* a full map grows and the write continues; the grown database opens read-only;
* corrupted or foreign data, and databases on network file systems, are refused with clear errors.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infra import ray as rayx
from infra.config import replace
from infra.shards import ShardSet
from infra.tokens import (
    RECORD_KEY_BYTES,
    TokenDataset,
    TokenFormatError,
    TokenMeta,
    TokenWriter,
    check_local_filesystem,
    iter_records,
    open_readonly,
    read_progress,
    record_key,
    verify,
)
from tasks import tokenize as tk
from tests.fixtures import tokenize_data as fx

ray_cluster, tokenize_run = fx.ray_cluster, fx.tokenize_run  # the session's shared fixtures

REPO = Path(__file__).resolve().parents[2]
SEED = 20231


def _meta(shards: Iterable[tuple[int, int]], **kw: Any) -> TokenMeta:
    base = {"split": "train", "codebook_size": 16, "grid_size": 4, "seq_len": 6, "keep_ratio": 0.375,
            "num_classes": 3, "tokenizer_sha256": "a" * 64, "source_sha256": "b" * 64, "shards": tuple(shards)}
    return TokenMeta(**{**base, **kw})


def _tokens(meta: TokenMeta, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, meta.codebook_size, (n, meta.seq_len)).astype(np.uint16)
    positions = np.sort(np.stack([rng.choice(meta.num_positions, meta.seq_len, replace=False) for _ in range(n)]),
                        axis=1).astype(np.uint16)
    labels = rng.integers(-1, meta.num_classes, n).astype(np.int32)
    return codes, positions, labels


def _keys(path: Path) -> list[bytes]:
    return [k for k, _ in iter_records(path)]


# --------------------------------------------------------------------------------------------- stage kill -9

KILLED_RUN = textwrap.dedent("""
    import json, sys, time
    from infra.config import PipelineConfig, from_dict
    from infra.tokens import TokenWriter
    from tasks import tokenize as tk
    from infra.refs import IngestOutput, TokenizeInputs, TokenizerOutput

    spec = json.loads(sys.argv[1])
    write_shard = TokenWriter.write_shard

    def slow_write_shard(self, *args, **kwargs):  # leave time to be killed between commits
        write_shard(self, *args, **kwargs)
        time.sleep(0.25)

    TokenWriter.write_shard = slow_write_shard
    tk.run(from_dict(PipelineConfig, spec["cfg"]), TokenizeInputs(ingest=IngestOutput.from_dict(spec["ingest"]),
           train_tokenizer=TokenizerOutput.from_dict(spec["tokenizer"])))
    print("FINISHED")
""")


def test_kill9_midway_then_rerun_gives_exactly_the_uninterrupted_result(tokenize_run: dict[str, Any],
                                                                         ray_cluster: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, ingest, tokenizer = tokenize_run["root"], tokenize_run["ingest"], tokenize_run["tokenizer"]
    upstream, clean = tokenize_run["upstream"], tokenize_run["out"]  # clean: the uninterrupted run
    cfg_killed = replace(tokenize_run["cfg"], run={"root": str(root / "killed")})
    # one MLflow database for both runs (creating another costs seconds)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{Path(root).resolve() / 'mlflow.db'}")
    num_train_shards = len(ShardSet.from_output(ingest).shards("train"))
    kill_after = random.Random(SEED).randint(1, num_train_shards - 2)
    print(f"SIGKILL after {kill_after} committed train shards (seed {SEED})")

    spec = {"cfg": cfg_killed.to_dict(), "ingest": ingest.to_dict(), "tokenizer": tokenizer.to_dict()}
    env = {**os.environ, "RAY_ADDRESS": rayx.cluster_address(), "PYTHONPATH": str(REPO)}  # join this Ray
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = Path(cfg_killed.run.root) / "tokenize" / tk.stage_key(tokenizer.sha256, ingest.manifest_sha256)
    train_db = db / "train.lmdb"
    deadline = time.monotonic() + 90
    committed: dict[int, int] = {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (train_db / "data.mdb").is_file():
                committed = read_progress(train_db)
                if len(committed) >= kill_after:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the stage ended before it could be killed:\n{proc.communicate()[0][-3000:]}"
        assert len(committed) >= kill_after, "no shard was committed in time"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    assert "FINISHED" not in output

    # After the kill: whole shards only, and nothing marks the output complete.
    meta, scan = verify(train_db, require_complete=False)
    committed = read_progress(train_db)
    assert 1 <= len(committed) < num_train_shards
    assert not meta.complete and not (db / tk.SUCCESS).exists()
    assert scan.shard_counts == committed
    assert scan.num_records == sum(committed.values()) == len(_keys(train_db))

    resumed = tk.run(cfg_killed, upstream)
    assert resumed.metrics["shards_resumed"] >= len(committed)
    assert resumed.path != clean.path
    for split in tk.SPLITS:
        killed_records, clean_records = list(iter_records(resumed.db(split))), list(iter_records(clean.db(split)))
        keys = [k for k, _ in killed_records]
        assert len(keys) == len(set(keys)) == getattr(ingest, f"num_{split}")
        assert killed_records == clean_records
    assert resumed.checksum == clean.checksum
    assert resumed.metadata == clean.metadata


# --------------------------------------------------------------------------------------------- writer faults

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from infra.tokens import TokenMeta, TokenWriter

    class StallingWriter(TokenWriter):  # stalls inside shard 1's transaction, after 5 puts
        def _items(self, keys, values):
            for i, kv in enumerate(zip(keys, values)):
                if keys[0].startswith(b"000001/") and i == 5:
                    print("MID-TRANSACTION", flush=True)
                    time.sleep(60)
                yield kv

    meta = TokenMeta(split="train", codebook_size=16, grid_size=4, seq_len=6, keep_ratio=0.375, num_classes=3,
                     tokenizer_sha256="a" * 64, source_sha256="b" * 64, shards=((0, 20), (1, 20)))
    codes = np.zeros((20, 6), np.uint16)
    positions = np.tile(np.arange(6, dtype=np.uint16), (20, 1))
    labels = np.zeros(20, np.int32)
    with StallingWriter(sys.argv[1], meta) as w:
        w.write_shard(0, codes, positions, labels)
        w.write_shard(1, codes, positions, labels)
""")


def _script(script: str, *args: str, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _sigkill_at(script: str, marker: str, *args: str) -> None:
    """Run ``script``, SIGKILL it once it prints a line starting with ``marker``."""
    proc = _script(script, *args, stderr=subprocess.STDOUT)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith(marker):
                break
        assert lines and lines[-1].startswith(marker), "".join(lines)[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill9_inside_a_shard_transaction_leaves_nothing_of_it(tmp_path: Path) -> None:
    db = tmp_path / "db"
    _sigkill_at(KILLED_WRITER, "MID-TRANSACTION", str(db))
    assert read_progress(db) == {0: 20}
    assert [k[:6] for k in _keys(db)] == [b"000000"] * 20
    meta, scan = verify(db, require_complete=False)
    assert scan.num_records == 20
    with TokenWriter(db, meta) as w:  # the next writer gets the lock of the dead one and finishes the job
        w.write_shard(1, np.zeros((20, 6), np.uint16), np.tile(np.arange(6, dtype=np.uint16), (20, 1)),
                      np.zeros(20, np.int32))
        final, _ = w.finalize()
    assert final.num_records == 40


class FailingWriter(TokenWriter):
    """Raises after ``fail_after`` puts of the next shard, inside its transaction."""

    fail_after: int | None = None

    def _items(self, keys: list[bytes], values: list[bytes]) -> Iterable[tuple[bytes, bytes]]:
        for i, kv in enumerate(zip(keys, values)):
            if i == self.fail_after:
                raise RuntimeError(f"injected failure after {i} puts")
            yield kv


def test_exception_after_some_puts_leaves_none_of_the_shard(tmp_path: Path) -> None:
    meta = _meta([(0, 30), (1, 30), (2, 30)])
    shards = {s: _tokens(meta, 30, s) for s in range(3)}
    with FailingWriter(tmp_path / "db", meta) as w:
        w.write_shard(0, *shards[0])
        w.fail_after = 17
        with pytest.raises(RuntimeError, match="after 17 puts"):
            w.write_shard(1, *shards[1])
        assert set(w.done_shards()) == {0}
        with w.env.begin() as txn:
            assert txn.get(record_key(1, 0)) is None and txn.get(record_key(1, 16)) is None
            assert txn.get(record_key(0, 29)) is not None
    assert [k[:6] for k in _keys(tmp_path / "db")] == [b"000000"] * 30
    with TokenWriter(tmp_path / "db", meta) as w:  # a rerun skips shard 0 and writes the others
        assert set(w.done_shards()) == {0}
        w.write_shard(2, *shards[2])  # out of order on purpose: not an append
        w.write_shard(1, *shards[1])
        final, scan = w.finalize()
    assert final.complete and final.num_records == 90 and scan.shard_counts == {0: 30, 1: 30, 2: 30}
    ds = TokenDataset(tmp_path / "db")
    assert ds[45]["codes"].tolist() == shards[1][0][15].tolist()
    ds.close()


def test_full_map_grows_and_the_write_continues(tmp_path: Path) -> None:
    meta = _meta([(s, 400) for s in range(6)])
    with TokenWriter(tmp_path / "db", meta, map_size=32 << 10) as w:
        start = w.map_size
        for s in range(6):
            w.write_shard(s, *_tokens(meta, 400, s))
        assert w.map_grows >= 3 and w.map_size >= start * 8
        final, scan = w.finalize()
    assert scan.num_records == 2400
    meta_back, _ = verify(tmp_path / "db")  # reopened read-only with the default (smaller) map size
    assert meta_back == final
    ds = TokenDataset(tmp_path / "db", expect_seq_len=6)
    assert ds[2399]["positions"].tolist() == _tokens(meta, 400, 5)[1][-1].tolist()
    ds.close()


def test_finished_database_has_full_pages_and_no_free_ones(tmp_path: Path) -> None:
    """Shards are appended in key order (full leaf pages) and the finished file is compacted (no free
    pages), so the file is the records' leaf pages plus the tree's branch pages and the 2 meta pages."""
    meta = _meta([(s, 4000) for s in range(5)], seq_len=32, grid_size=8, keep_ratio=0.5)
    with TokenWriter(tmp_path / "db", meta) as w:
        for s in range(5):
            w.write_shard(s, *_tokens(meta, 4000, s))
        w.finalize()
    env = open_readonly(tmp_path / "db")
    stat, page = env.stat(), env.stat()["psize"]
    env.close()
    node = 8 + RECORD_KEY_BYTES + meta.record_size  # LMDB leaf node: header, key, value; 2-byte aligned
    per_page = (page - 16) // (node + node % 2 + 2)  # page header 16 bytes, 2-byte slot per node
    # + 2: the first leaf also holds !meta and the done keys, and inserting those splits it
    assert stat["leaf_pages"] <= -(-20_000 // per_page) + 2
    file_pages = (tmp_path / "db" / "data.mdb").stat().st_size // page
    assert file_pages == stat["leaf_pages"] + stat["branch_pages"] + 2
    assert file_pages * page / 20_000 <= 1.3 * 4 * meta.seq_len  # against the raw uint16 codes + positions


def test_invalid_tokens_are_refused_before_writing(tmp_path: Path) -> None:
    meta = _meta([(0, 4)])
    codes, positions, labels = _tokens(meta, 4, 0)
    with TokenWriter(tmp_path / "db", meta) as w:
        bad = codes.copy()
        bad[2, 1] = 16
        with pytest.raises(TokenFormatError, match="record 2 has a code outside"):
            w.write_shard(0, bad, positions, labels)
        bad = positions.copy()
        bad[1, [2, 3]] = bad[1, [3, 2]]
        with pytest.raises(TokenFormatError, match="record 1 has positions that are not strictly increasing"):
            w.write_shard(0, codes, bad, labels)
        with pytest.raises(TokenFormatError, match="the input manifest lists 4"):
            w.write_shard(0, codes[:3], positions[:3], labels[:3])
        with pytest.raises(TokenFormatError, match="labels .* outside"):
            w.write_shard(0, codes, positions, np.array([0, 1, 3, -1], np.int32))
        assert w.done_shards() == {}


def test_corrupted_records_are_detected(tmp_path: Path) -> None:
    meta = _meta([(0, 10), (1, 10)])
    with TokenWriter(tmp_path / "db", meta) as w:
        for s in range(2):
            w.write_shard(s, *_tokens(meta, 10, s))
        with w.env.begin(write=True) as txn:  # bit rot in one value
            value = bytearray(txn.get(record_key(1, 4)))
            value[0] ^= 1
            txn.put(record_key(1, 4), bytes(value))
        with pytest.raises(TokenFormatError, match="shard 1 holds 10 records .* but its done key says"):
            w.finalize()
        with w.env.begin(write=True) as txn:  # a truncated value
            txn.put(record_key(1, 4), bytes(value[:-2]))
        with pytest.raises(TokenFormatError, match="has 26 bytes, expected 28"):
            w.finalize()


def test_writer_refuses_a_database_started_for_other_inputs(tmp_path: Path) -> None:
    with TokenWriter(tmp_path / "db", _meta([(0, 1)])):
        pass
    with pytest.raises(TokenFormatError, match=r"tokenizer_sha256: stored 'a+', now 'c+'"):
        TokenWriter(tmp_path / "db", _meta([(0, 1)], tokenizer_sha256="c" * 64))


def test_network_file_systems_are_refused(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    escaped = str(tmp_path / "with space").replace(" ", "\\040")  # how /proc/mounts writes a space
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {tmp_path / 'nfs'} nfs4 rw 0 0\n"
                      f"server:/other {escaped} nfs rw 0 0\n")
    with pytest.raises(ValueError, match="nfs4 file system .* LMDB needs a local disk"):
        check_local_filesystem(tmp_path / "nfs" / "tokenize" / "train.lmdb", mounts_file=str(mounts))
    check_local_filesystem(tmp_path / "local", mounts_file=str(mounts))
    with pytest.raises(ValueError, match="on a nfs file system"):
        check_local_filesystem(tmp_path / "with space" / "x", mounts_file=str(mounts))
    check_local_filesystem(tmp_path)  # the real mount table: the test's tmp dir is local


def test_a_database_bound_for_a_network_file_system_is_written_locally_and_moved_there_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster's shared run root (NFS, Lustre, a FUSE mount): the writer works in a local staging folder under
    TMPDIR (resumable on the same node), and the finished, compacted file is moved to the target, where readers
    open it without locks. No LMDB lock file is ever created on the network file system."""
    import tempfile

    from infra import tokens

    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {shared} nfs4 rw 0 0\n")
    monkeypatch.setattr(tokens, "MOUNTS_FILE", str(mounts))
    monkeypatch.setenv("TMPDIR", str(local))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    meta = _meta([(s, 50) for s in range(3)])
    db = shared / "tokenize" / "k" / "train.lmdb"
    shards = {s: _tokens(meta, 50, s) for s in range(3)}
    with FailingWriter(db, meta) as w:  # killed (here: an error) after one shard
        assert w.remote is not None and w.remote[0] == "nfs4"
        w.write_shard(0, *shards[0])
        w.fail_after = 7
        with pytest.raises(RuntimeError, match="after 7 puts"):
            w.write_shard(1, *shards[1])
    assert not (db / "data.mdb").exists() and not (db / "lock.mdb").exists()  # nothing of it on the share yet
    staged = tokens.staging_dir(db)
    assert staged.is_relative_to(local) and (staged / "data.mdb").is_file()
    with TokenWriter(db, meta) as w:  # the rerun on the same node resumes the staged database
        assert set(w.done_shards()) == {0}
        for s in (1, 2):
            w.write_shard(s, *shards[s])
        final, scan = w.finalize()
    assert final.complete and scan.num_records == 150
    assert sorted(p.name for p in db.iterdir()) == ["data.mdb"] and not staged.exists()
    meta_back, _ = verify(db)  # read without a lock on the share
    assert meta_back == final and not (db / "lock.mdb").exists()
    ds = TokenDataset(db, expect_seq_len=6)
    assert ds[120]["codes"].tolist() == shards[2][0][20].tolist()
    ds.close()
    monkeypatch.setenv("TMPDIR", str(shared))  # staging on the share too: refused with what to set
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(ValueError, match="set TMPDIR to a local disk"):
        TokenWriter(shared / "other.lmdb", meta)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_cut_or_overwritten_database_file_is_a_clear_error_not_a_crash(tmp_path: Path, damage: str) -> None:
    """An interrupted copy of a run root leaves data.mdb cut short; reading past its end through LMDB's memory
    map would kill the reader with SIGBUS (``mqgen status`` dying without a word). Opening it says what is
    wrong instead, as a :class:`TokenFormatError` (the stage then sets the output aside and rebuilds it)."""
    meta = _meta([(s, 400) for s in range(4)])
    db = tmp_path / "db"
    with TokenWriter(db, meta) as w:
        for s in range(4):
            w.write_shard(s, *_tokens(meta, 400, s))
        w.finalize()
    data = db / "data.mdb"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else bytes(len(raw)))
    script = "import sys; from infra.tokens import verify; verify(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", script, str(db)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1, f"exit {out.returncode} (-7 is SIGBUS): {out.stderr[-2000:]}"
    assert "TokenFormatError" in out.stderr
    assert ("is truncated" if damage == "truncated" else "not a readable LMDB database") in out.stderr
    with pytest.raises(TokenFormatError):
        TokenDataset(db)


# --------------------------------------------------------------------------------------------- readers

WATCHER = textwrap.dedent("""
    import collections, json, sys, time
    from infra.tokens import open_readonly

    env = open_readonly(sys.argv[1], lock=True)
    print("READY", flush=True)
    seen = []
    while True:
        with env.begin() as txn:  # one snapshot per look
            counts = collections.Counter()
            cursor = txn.cursor()
            if cursor.set_range(b"0"):
                for key in cursor.iternext(keys=True, values=False):
                    counts[int(key[:6])] += 1
        seen.append(dict(counts))
        if len(counts) == 6 or len(seen) > 20000:  # the first six shards (the seventh is written later)
            break
        time.sleep(0.002)
    print(json.dumps(seen), flush=True)
""")

HOLDER = textwrap.dedent("""
    import sys, time
    from infra.tokens import open_readonly

    env = open_readonly(sys.argv[1], lock=True)
    txn = env.begin()  # a read transaction held until the process is killed
    txn.get(b"!meta")
    print("HOLDING", flush=True)
    time.sleep(300)
""")


def test_a_concurrent_reader_sees_whole_shards_and_a_killed_readers_slot_is_cleared(tmp_path: Path) -> None:
    """Catalogue 1.5: a reader process looking while the writer commits sees each shard whole or not at all,
    and never loses one it saw; a reader SIGKILLed inside a read transaction leaves a stale slot that the next
    writer clears (``reader_check``), so the dead reader does not pin old pages and grow the file."""
    meta = _meta([(s, 300) for s in range(7)])
    db = tmp_path / "db"
    with TokenWriter(db, meta):  # the database exists (meta only) before anyone looks
        pass
    watcher = _script(WATCHER, str(db))
    try:
        assert watcher.stdout.readline().strip() == "READY", watcher.stderr.read()  # type: ignore[union-attr]
        with TokenWriter(db, meta) as w:
            for s in range(6):
                w.write_shard(s, *_tokens(meta, 300, s))
                time.sleep(0.05)
        out, err = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, err[-3000:]
    seen = [{int(k): v for k, v in look.items()} for look in json.loads(out.strip().splitlines()[-1])]
    assert len({tuple(sorted(look)) for look in seen}) >= 3, "the reader never looked between two commits"
    for before, after in itertools.pairwise(seen):
        assert set(before) <= set(after), (before, after)  # a shard once seen stays
    assert all(count == 300 for look in seen for count in look.values()), "a reader saw part of a shard"

    with TokenWriter(db, meta) as w:  # a long-running writer; a monitor dies holding a read transaction
        _sigkill_at(HOLDER, "HOLDING", str(db))
        assert w.stale_readers_cleared == 0
        w.write_shard(6, *_tokens(meta, 300, 6))
        assert w.stale_readers_cleared == 1
        final, scan = w.finalize()
    assert final.complete and scan.num_records == 2100
