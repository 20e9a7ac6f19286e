"""Token databases: the LMDB format the tokenize stage writes, its single writer, and the training reader.

One LMDB environment per split (``train.lmdb/``, ``val.lmdb/``), one main database holding (see
``docs/lmdb_format.md`` for the byte-level description):

* records ``{shard:06d}/{index:08d}`` -> ``codes <u2[N] | positions <u2[N] | label <i4`` (``4 N + 4`` bytes,
  little-endian, no header; ``N`` = ``seq_len`` from the metadata; label -1 = unlabeled), followed for captioned
  data by ``text <u2[T]>`` (the caption's token ids, 0-padded; ``T`` = ``text_len`` from the metadata);
* ``!done/{shard:06d}`` -> JSON ``{"count", "records_sha256"}``, written in the same transaction as the
  shard's records, so a shard is either entirely present with its done key or entirely absent;
* ``!meta`` -> JSON :class:`TokenMeta` (format version, codebook size, grid, keep_ratio, seq_len, tokenizer
  and input hashes, per-shard counts; ``complete``, ``num_records`` and ``records_sha256`` once finished).

Reserved keys start with ``!``, which sorts before every digit, so records always sit at the end of the
key space and a shard written after its predecessors is a pure append (full pages, no splits).

Roles: :class:`TokenWriter` is the single writer of a split (one write transaction per shard, the map
doubles when full); :class:`TokenDataset` is the training reader (read-only, lock-free, opened lazily in
the process that reads, never used across ``fork``) and refuses a database that does not match the model.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import operator
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from infra.errors import PermanentError, is_no_space, looks_full
from infra.storage import atomic_copy, fsync_dir, remove_tree

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only (postponed evaluation)

FORMAT = "mqgen.tokens"
FORMAT_VERSION = 1
META_KEY = b"!meta"
DONE_PREFIX = b"!done/"
RECORD_KEY_BYTES = 15  # b"%06d/%08d"
DEFAULT_MAP_SIZE = 64 << 20  # initial map; it doubles whenever a shard does not fit
log = logging.getLogger("mqgen.tokens")
MAX_MAP_SIZE = 1 << 40
MAX_SHARD = 999_999
MAX_INDEX = 99_999_999

# File systems on which LMDB's locking and memory-map coherence cannot be trusted ("Do not use LMDB
# databases on remote filesystems", lmdb.h).
REMOTE_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.goofys", "fuse.juicefs", "fuse.glusterfs",
    "fuse.ceph", "fuse.mountpoint-s3",
})


class TokenFormatError(PermanentError, ValueError):
    """A token database is malformed, incomplete, or does not match what its reader expects."""


# --------------------------------------------------------------------------------------------- format


def record_key(shard: int, index: int) -> bytes:
    """``b"{shard:06d}/{index:08d}"``: the key of record ``index`` of input shard ``shard``."""
    if not (0 <= shard <= MAX_SHARD and 0 <= index <= MAX_INDEX):
        raise ValueError(f"record key out of range: shard {shard} (max {MAX_SHARD}), index {index} "
                         f"(max {MAX_INDEX})")
    return b"%06d/%08d" % (shard, index)


def done_key(shard: int) -> bytes:
    return DONE_PREFIX + b"%06d" % shard


def record_dtype(seq_len: int, text_len: int = 0) -> np.dtype:
    """The packed, little-endian record: ``codes <u2[N]``, ``positions <u2[N]``, ``label <i4`` and, for captioned
    data (``text_len > 0``), ``text <u2[T]`` (the caption's token ids, padded with 0)."""
    fields = [("codes", "<u2", (seq_len,)), ("positions", "<u2", (seq_len,)), ("label", "<i4")]
    if text_len:
        fields.append(("text", "<u2", (text_len,)))
    return np.dtype(fields)


@dataclass(frozen=True, kw_only=True)
class TokenMeta:
    """The ``!meta`` record of one split; everything a reader needs to check the data fits its model."""

    split: str
    codebook_size: int  # codes are < codebook_size
    grid_size: int  # positions are < grid_size ** 2 (row-major cells of the latent grid)
    seq_len: int  # N kept tokens per record
    keep_ratio: float
    num_classes: int  # labels are in [0, num_classes), or -1 when the data is unlabeled
    tokenizer_sha256: str  # sha256 of the MQ-VAE weights that produced the tokens
    source_sha256: str  # sha256 of the ingest manifest the images came from
    shards: tuple[tuple[int, int], ...]  # (input shard id, record count), ascending shard id
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    record_layout: str = "codes <u2[seq_len] | positions <u2[seq_len] | label <i4"
    # set once every shard is written (the last transaction)
    complete: bool = False
    num_records: int = 0
    records_sha256: str = ""  # sha256 over key + value of every record, in key order
    encoder_devices: tuple[str, ...] = ()  # the devices whose encoder produced the records (provenance)
    # captioned data: T caption token ids per record (0 = padding), ids < text_vocab_size, from the caption
    # tokenizer whose tokenizer.json has this sha256; all 0 / "" for data without captions
    text_len: int = 0
    text_vocab_size: int = 0
    text_tokenizer_sha256: str = ""

    COMPLETION_FIELDS = ("complete", "num_records", "records_sha256", "encoder_devices")

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple((int(s), int(n)) for s, n in self.shards))
        object.__setattr__(self, "encoder_devices", tuple(self.encoder_devices))
        if not 1 <= self.codebook_size <= 65535:
            raise TokenFormatError(f"codebook_size={self.codebook_size} does not fit uint16 codes")
        if not 1 <= self.grid_size ** 2 <= 65535:
            raise TokenFormatError(f"grid_size={self.grid_size} has cells that do not fit uint16 positions")
        if not 1 <= self.seq_len <= self.grid_size ** 2:
            raise TokenFormatError(f"seq_len={self.seq_len} must be in [1, grid_size ** 2 = {self.grid_size ** 2}]")
        if self.text_len < 0 or (self.text_len > 0) != (self.text_vocab_size > 0) or self.text_vocab_size > 65535:
            raise TokenFormatError(f"text_len={self.text_len} / text_vocab_size={self.text_vocab_size}: both 0 "
                                   "(no captions) or both positive, with ids fitting uint16")
        if self.text_len and "text <u2[text_len]>" not in self.record_layout:
            object.__setattr__(self, "record_layout", self.record_layout + " | text <u2[text_len]>")
        ids = [s for s, _ in self.shards]
        if ids != sorted(set(ids)):
            raise TokenFormatError(f"shard ids must be unique and ascending, got {ids[:10]}...")

    @property
    def record_size(self) -> int:
        return 4 * self.seq_len + 4 + 2 * self.text_len

    @property
    def num_expected(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2

    def identity(self) -> dict[str, Any]:
        """Every field except the completion fields: two writers of one database must agree on these."""
        d = self.to_dict()
        for k in self.COMPLETION_FIELDS:
            d.pop(k)
        return d

    TEXT_FIELDS = ("text_len", "text_vocab_size", "text_tokenizer_sha256")

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; data without captions leaves the caption fields out, so its metadata is
        exactly what it was before captions existed (the same ``!meta`` bytes, the same stage markers)."""
        d = dataclasses.asdict(self)
        d["shards"] = [list(p) for p in self.shards]
        d["encoder_devices"] = list(self.encoder_devices)
        if not self.text_len:
            for k in self.TEXT_FIELDS:
                d.pop(k)
        return d

    @classmethod
    def normalized(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``d`` (stored metadata, from any version) as :meth:`to_dict` writes it now."""
        return cls(**d).to_dict()

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = "") -> TokenMeta:
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise TokenFormatError(f"{where}: metadata record is not JSON: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TokenFormatError(f"{where}: not an {FORMAT} database (metadata format "
                                   f"{d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise TokenFormatError(f"{where}: format_version is {d.get('format_version')} in the database but this "
                                   f"reader reads version {FORMAT_VERSION}; rerun the tokenize stage")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(d) - names, {f.name for f in dataclasses.fields(cls)
                                            if f.default is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise TokenFormatError(f"{where}: metadata has unknown fields {sorted(unknown)} / lacks "
                                   f"{sorted(missing)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise TokenFormatError(f"{where}: invalid metadata: {e}") from e


def check_tokens(codes: np.ndarray, positions: np.ndarray, *, codebook_size: int, num_positions: int,
                 where: str = "") -> None:
    """Raise :class:`TokenFormatError` unless ``codes`` / ``positions`` ``[n, N]`` are valid records.

    Valid: codes in ``[0, codebook_size)``; positions in ``[0, num_positions)`` and strictly increasing
    along each row (unique, raster order).
    """
    if codes.shape != positions.shape or codes.ndim != 2:
        raise TokenFormatError(f"{where}: codes {codes.shape} and positions {positions.shape} must both be [n, N]")
    if codes.size == 0:
        return
    checks = (("code", (codes < 0) | (codes >= codebook_size), f"outside [0, {codebook_size})"),
              ("position", (positions < 0) | (positions >= num_positions), f"outside [0, {num_positions})"))
    for what, bad, why in checks:
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise TokenFormatError(f"{where}: record {row} has a {what} {why}: {bad[row].nonzero()[0][:5]} -> "
                                   f"{(codes if what == 'code' else positions)[row][bad[row]][:5]}")
    unsorted = (np.diff(positions.astype(np.int64), axis=1) <= 0).any(axis=1)
    if unsorted.any():
        row = int(np.flatnonzero(unsorted)[0])
        raise TokenFormatError(f"{where}: record {row} has positions that are not strictly increasing: "
                               f"{positions[row][:16]}")


def pack_records(codes: np.ndarray, positions: np.ndarray, labels: np.ndarray, meta: TokenMeta,
                 where: str = "", text: np.ndarray | None = None) -> np.ndarray:
    """Validate and pack ``[n, N]`` codes / positions, ``[n]`` labels and, for captioned data, ``[n, T]`` caption
    token ids into ``n`` records."""
    codes, positions, labels = np.asarray(codes), np.asarray(positions), np.asarray(labels)
    if codes.ndim != 2 or codes.shape[1] != meta.seq_len:
        raise TokenFormatError(f"{where}: codes have shape {codes.shape}, expected [n, seq_len={meta.seq_len}]")
    check_tokens(codes, positions, codebook_size=meta.codebook_size, num_positions=meta.num_positions,
                 where=where)
    if labels.shape != codes.shape[:1]:
        raise TokenFormatError(f"{where}: labels have shape {labels.shape}, expected ({codes.shape[0]},)")
    bad = (labels < -1) | ((labels != -1) & (labels >= meta.num_classes))
    if bad.any():
        raise TokenFormatError(f"{where}: labels {np.unique(labels[bad])[:5]} are outside [0, {meta.num_classes}) "
                               "and not -1 (unlabeled)")
    if (text is not None) != (meta.text_len > 0):
        raise TokenFormatError(f"{where}: caption token ids {'given' if text is not None else 'missing'} but the "
                               f"database has text_len={meta.text_len}")
    if text is not None:
        text = np.asarray(text)
        if text.shape != (codes.shape[0], meta.text_len):
            raise TokenFormatError(f"{where}: caption ids have shape {text.shape}, expected "
                                   f"({codes.shape[0]}, {meta.text_len})")
        if text.size and (text.min() < 0 or text.max() >= meta.text_vocab_size):
            raise TokenFormatError(f"{where}: caption ids outside [0, {meta.text_vocab_size})")
    rec = np.empty(codes.shape[0], dtype=record_dtype(meta.seq_len, meta.text_len))
    rec["codes"] = codes
    rec["positions"] = positions
    rec["label"] = labels
    if text is not None:
        rec["text"] = text
    return rec


def unpack_records(values: bytes, meta: TokenMeta, where: str = "") -> np.ndarray:
    """Concatenated record values -> structured array (length-checked)."""
    if len(values) % meta.record_size:
        raise TokenFormatError(f"{where}: {len(values)} bytes is not a multiple of the record size "
                               f"{meta.record_size} (4 * seq_len + 4 + 2 * text_len)")
    return np.frombuffer(values, dtype=record_dtype(meta.seq_len, meta.text_len))


# --------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class ScanResult:
    """What a full pass over a split's records found."""

    num_records: int
    records_sha256: str
    shard_counts: dict[int, int]
    code_counts: np.ndarray  # [codebook_size] int64: how often each code occurs
    position_counts: np.ndarray  # [grid_size ** 2] int64: how often each cell is kept


def scan_records(txn: lmdb.Transaction, meta: TokenMeta, done: dict[int, dict[str, Any]], where: str = ""
                 ) -> ScanResult:
    """Read every record in key order: validate it, hash it, count codes; compare with the done keys.

    Raises :class:`TokenFormatError` on a malformed key or value, a shard whose records differ from what
    its done key says (count or sha256), or records of a shard that is not done.
    """
    total = hashlib.sha256()
    code_counts = np.zeros(meta.codebook_size, np.int64)
    position_counts = np.zeros(meta.num_positions, np.int64)
    shard_counts: dict[int, int] = {}
    state: dict[str, Any] = {"shard": None, "hash": None, "values": []}

    def close_shard() -> None:
        shard = state["shard"]
        if shard is None:
            return
        values = b"".join(state["values"])
        rec = unpack_records(values, meta, f"{where} shard {shard}")
        check_tokens(rec["codes"], rec["positions"], codebook_size=meta.codebook_size,
                     num_positions=meta.num_positions, where=f"{where} shard {shard}")
        code_counts[:] += np.bincount(rec["codes"].ravel(), minlength=meta.codebook_size)
        position_counts[:] += np.bincount(rec["positions"].ravel(), minlength=meta.num_positions)
        info = done.get(shard)
        if info is None:
            raise TokenFormatError(f"{where}: records of shard {shard} exist without its done key")
        digest = state["hash"].hexdigest()
        if len(rec) != info["count"] or digest != info["records_sha256"]:
            raise TokenFormatError(f"{where}: shard {shard} holds {len(rec)} records (sha256 {digest[:12]}) but its "
                                   f"done key says {info['count']} (sha256 {info['records_sha256'][:12]})")
        shard_counts[shard] = len(rec)

    cursor = txn.cursor()
    if cursor.set_range(b"0"):
        for key, value in cursor.iternext(keys=True, values=True):
            if len(key) != RECORD_KEY_BYTES or key[6:7] != b"/" or not (key[:6] + key[7:]).isdigit():
                raise TokenFormatError(f"{where}: unexpected key {key[:40]!r}")
            if len(value) != meta.record_size:
                raise TokenFormatError(f"{where}: record {key.decode()} has {len(value)} bytes, expected "
                                       f"{meta.record_size} (4 * seq_len + 4 + 2 * text_len)")
            shard = int(key[:6])
            if shard != state["shard"]:
                close_shard()
                state.update(shard=shard, hash=hashlib.sha256(), values=[])
                expected_index = 0
            if int(key[7:]) != expected_index:
                raise TokenFormatError(f"{where}: shard {shard} skips from index {expected_index - 1} to "
                                       f"{int(key[7:])}")
            expected_index += 1
            total.update(key)
            total.update(value)
            state["hash"].update(key)
            state["hash"].update(value)
            state["values"].append(value)
    close_shard()
    for shard, info in done.items():
        if shard not in shard_counts and info["count"]:
            raise TokenFormatError(f"{where}: shard {shard} is marked done with {info['count']} records but has none")
    return ScanResult(num_records=sum(shard_counts.values()), records_sha256=total.hexdigest(),
                      shard_counts=shard_counts, code_counts=code_counts, position_counts=position_counts)


def _read_done(txn: lmdb.Transaction, where: str = "") -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    cursor = txn.cursor()
    if not cursor.set_range(DONE_PREFIX):
        return done
    for key, value in cursor.iternext(keys=True, values=True):
        if not key.startswith(DONE_PREFIX):
            break
        try:
            done[int(key[len(DONE_PREFIX):])] = json.loads(value)
        except ValueError as e:
            raise TokenFormatError(f"{where}: malformed done key {key!r}: {e}") from e
    return done


def _read_meta(txn: lmdb.Transaction, where: str) -> TokenMeta:
    raw = txn.get(META_KEY)
    if raw is None:
        raise TokenFormatError(f"{where}: no metadata record ({META_KEY.decode()}); not a token database")
    return TokenMeta.from_json(raw, where)


MOUNTS_FILE = "/proc/mounts"


def network_filesystem(path: str | Path, mounts_file: str | None = None) -> tuple[str, str] | None:
    """``(file system type, mount point)`` when ``path`` is on a network file system, else None."""
    try:
        lines = Path(mounts_file or MOUNTS_FILE).read_text().splitlines()
    except OSError:
        return None  # not Linux: nothing to check against
    p = Path(path).resolve()  # symlinks resolved; the path itself need not exist yet
    best, best_type = "", ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # "\040" = space
        if (str(p) == mount or str(p).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, best_type = mount, parts[2]
    return (best_type, best) if best_type in REMOTE_FS_TYPES else None


def check_local_filesystem(path: str | Path, mounts_file: str | None = None, fix: str = "set run.root to a local path"
                           ) -> None:
    """Refuse a path on a network file system, where LMDB's locks and memory map are not coherent."""
    remote = network_filesystem(path, mounts_file)
    if remote is not None:
        raise ValueError(f"{path} is on a {remote[0]} file system (mount point {remote[1]}); LMDB needs a local disk "
                         f"(its locks and memory map are not coherent over the network): {fix}")


def staging_dir(path: str | Path) -> Path:
    """Where the writer of a database bound for a network file system works: a local folder under ``TMPDIR``,
    the same for the same target, so that a rerun on the same node resumes it."""
    import tempfile

    target = Path(path).resolve()
    tag = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "mqgen-lmdb" / f"{tag}-{target.name}"


# --------------------------------------------------------------------------------------------- writer


class TokenWriter:
    """The single writer of one split's token database.

    ``write_shard`` commits one input shard's records and its done key in one transaction; when the map
    is full the transaction is aborted, the map doubled and the shard written again. Opening an existing
    database resumes it: :meth:`done_shards` says what is already there, and the stored metadata must
    match ``meta`` (same tokenizer, inputs and format), else :class:`TokenFormatError`.
    """

    def __init__(self, path: str | Path, meta: TokenMeta, *, map_size: int = DEFAULT_MAP_SIZE):
        self.path = Path(path)
        self.meta = meta
        self.map_grows = 0
        self._counts = dict(meta.shards)
        self.path.mkdir(parents=True, exist_ok=True)
        remove_tree(self._compact_dir)  # left by a run killed while compacting
        # On a network file system (a cluster's shared run root) LMDB must not be written in place: the writer
        # works in a local staging folder and finalize() moves the finished, compacted file to the target, where
        # readers open it read-only without locks.
        self.remote = network_filesystem(self.path.parent)
        self._work = self.path if self.remote is None else staging_dir(self.path)
        if self.remote is not None:
            check_local_filesystem(self._work.parent, fix="set TMPDIR to a local disk for the token databases")
            self._work.mkdir(parents=True, exist_ok=True)
            if (self.path / "data.mdb").is_file() and not (self._work / "data.mdb").is_file():
                atomic_copy(self.path / "data.mdb", self._work / "data.mdb")  # finished here before: resume it
            log.info("%s is on a %s file system: writing it in %s and moving it there when finished", self.path,
                     self.remote[0], self._work)
        # sync=True + writemap=False: every commit is durable and a crash can never corrupt committed data.
        self._env: lmdb.Environment | None = lmdb.open(
            str(self._work), map_size=max(int(map_size), 32 << 10), subdir=True, readonly=False, sync=True,
            metasync=True, writemap=False, map_async=False, max_dbs=0, lock=True)
        self.stale_readers_cleared = 0
        with self.env.begin() as txn:
            raw = txn.get(META_KEY)
        if raw is None:
            self._write(lambda txn: txn.put(META_KEY, meta.to_json()))
        else:
            stored = TokenMeta.from_json(raw, str(self.path))
            diff = {k: (v, meta.identity()[k]) for k, v in stored.identity().items() if v != meta.identity()[k]}
            if diff:
                raise TokenFormatError(f"{self.path}: the database was started for different inputs; "
                                       + "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
                                       + " (delete it or rerun with force=True)")

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise RuntimeError(f"TokenWriter({self.path}) is closed")
        return self._env

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    @property
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def done_shards(self) -> dict[int, dict[str, Any]]:
        """Shards already committed: ``{shard: {"count", "records_sha256"}}``."""
        with self.env.begin() as txn:
            return _read_done(txn, str(self.path))

    def write_shard(self, shard: int, codes: np.ndarray, positions: np.ndarray, labels: np.ndarray, *,
                    device: str = "", text: np.ndarray | None = None) -> None:
        """Validate, pack and commit shard ``shard`` (its records and done key) in one transaction.

        ``device`` names the hardware whose encoder produced the tokens (kept in the done key: encoders
        on different device kinds can round differently, so a database resumed elsewhere says so).
        """
        where = f"{self.path} shard {shard}"
        if shard not in self._counts:
            raise TokenFormatError(f"{where}: not one of the database's shards ({len(self._counts)} listed)")
        rec = pack_records(codes, positions, labels, self.meta, where, text)
        if len(rec) != self._counts[shard]:
            raise TokenFormatError(f"{where}: {len(rec)} records, but the input manifest lists {self._counts[shard]}")
        raw, size = rec.tobytes(), self.meta.record_size
        keys = [record_key(shard, i) for i in range(len(rec))]
        values = [raw[i * size:(i + 1) * size] for i in range(len(rec))]
        digest = hashlib.sha256()
        for k, v in zip(keys, values):
            digest.update(k)
            digest.update(v)
        done_value = json.dumps({"count": len(rec), "records_sha256": digest.hexdigest(), "device": device},
                                sort_keys=True).encode()

        def put(txn: lmdb.Transaction) -> None:
            cursor = txn.cursor()
            # Appending (keys above every existing key) fills pages completely; otherwise clear whatever a
            # foreign writer may have left under this shard's prefix and insert normally.
            append = not keys or not cursor.last() or cursor.key() < keys[0]
            if not append:
                _delete_prefix(cursor, b"%06d/" % shard)
            consumed, _ = cursor.putmulti(self._items(keys, values), append=append)
            if consumed != len(keys):
                raise RuntimeError(f"{where}: LMDB stored {consumed} of {len(keys)} records")
            txn.put(done_key(shard), done_value)

        self._clear_dead_readers()
        self._write(put)

    def _clear_dead_readers(self) -> None:
        """A reader killed inside a read transaction while the writer runs (a progress monitor, a DataLoader
        worker) leaves its slot in the lock table, and LMDB keeps every page that reader could see, so the file
        grows with each commit. Clear the slots of dead processes before each commit (LMDB resets the table
        itself only when the first process opens the database)."""
        cleared = self.env.reader_check()
        if cleared:
            self.stale_readers_cleared += cleared
            log.info("%s: cleared %d reader slot(s) of dead processes", self.path, cleared)

    def _items(self, keys: list[bytes], values: list[bytes]) -> Iterable[tuple[bytes, bytes]]:
        return zip(keys, values)

    def finalize(self) -> tuple[TokenMeta, ScanResult]:
        """Check every shard is done and every record verifies; mark the database complete; compact it.

        Compaction (LMDB's ``mdb_copy -c``) drops the free pages the per-shard transactions leave behind
        and renumbers the pages in key order; the compacted file replaces ``data.mdb`` by one atomic
        rename (a crash before it leaves the complete, uncompacted file). The writer is closed afterwards.
        """
        done = self.done_shards()
        missing = [s for s in self._counts if s not in done]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} shard(s) not written yet: {missing[:10]}")
        try:
            with self.env.begin() as txn:
                scan = scan_records(txn, self.meta, done, str(self.path))
            if scan.num_records != self.meta.num_expected:
                raise TokenFormatError(f"{self.path}: {scan.num_records} records, expected {self.meta.num_expected}")
        except TokenFormatError as e:
            raise TokenFormatError(f"{e}. The database is damaged: rerun the tokenize stage with force "
                                   "(mqgen run --from tokenize) to rebuild it") from e
        final = dataclasses.replace(self.meta, complete=True, num_records=scan.num_records,
                                    records_sha256=scan.records_sha256,
                                    encoder_devices=tuple(sorted({d.get("device", "") for d in done.values()} - {""})))
        self._write(lambda txn: txn.put(META_KEY, final.to_json()))
        try:
            self._compact()
        except (OSError, lmdb.Error) as e:
            if self.remote is not None or not (is_no_space(e) or looks_full(str(self.path), e) is not None):
                raise  # a staged database must reach its target
            # the database is complete as it is; compaction only saves space, and needs a full copy's worth
            remove_tree(self._compact_dir)
            self.close()
            log.warning("%s: not compacted (no space for the compacted copy beside it: %s); it is complete and "
                        "readable as it is", self.path, e)
        return final, scan

    @property
    def _compact_dir(self) -> Path:
        return self.path.with_name(f".{self.path.name}.compact")

    def _compact(self) -> None:
        tmp = self._compact_dir
        remove_tree(tmp)
        tmp.mkdir()
        self.env.copy(str(tmp), compact=True)
        self.close()
        data = tmp / "data.mdb"
        with open(data, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(data, self.path / "data.mdb")
        (self.path / "lock.mdb").unlink(missing_ok=True)  # reader table of the old file; recreated on open
        fsync_dir(self.path)
        remove_tree(tmp)
        if self._work != self.path:
            remove_tree(self._work)  # the staged copy: the target now holds the finished database

    def _write(self, fn: Callable[[lmdb.Transaction], None]) -> None:
        """Run ``fn`` in one write transaction; on a full map abort, double the map and run it again. A full file
        system (which LMDB reports as an I/O error) raises :class:`~infra.errors.NoSpaceLeft`."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                new_size = self.map_size * 2
                if new_size > MAX_MAP_SIZE:
                    raise
                self.env.set_mapsize(new_size)  # no transaction is open here: the failed one was aborted
                self.map_grows += 1
            except lmdb.Error as e:
                full = looks_full(str(self.path), e)
                if full is not None:
                    raise full from e
                raise


def _delete_prefix(cursor: lmdb.Cursor, prefix: bytes) -> None:
    if cursor.set_range(prefix):
        while cursor.key().startswith(prefix):
            if not cursor.delete():
                break


# --------------------------------------------------------------------------------------------- readers


def open_readonly(path: str | Path, lock: bool = False) -> lmdb.Environment:
    """Open a token database for reading. ``lock=False`` only for databases nobody writes any more; on a network
    file system always (a database there is only ever a finished file moved in whole, see :class:`TokenWriter`)."""
    p = Path(path)
    if not (p / "data.mdb").is_file():
        raise FileNotFoundError(f"no token database at {p} (expected {p / 'data.mdb'}); run the tokenize stage")
    if lock and network_filesystem(p) is not None:
        lock = False
    try:
        env = lmdb.open(str(p), readonly=True, lock=lock, readahead=False, meminit=False, subdir=True, max_dbs=0)
    except lmdb.Error as e:  # not an LMDB file any more (overwritten, a half-copied root)
        raise TokenFormatError(f"{p}: not a readable LMDB database ({type(e).__name__}: {e})") from None
    # A file cut short (an interrupted copy of a run root) still opens, but reading a page past its end through
    # the memory map kills the process with SIGBUS: compare the pages its metadata claims with the file's size.
    need = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    have = (p / "data.mdb").stat().st_size
    if have < need:
        env.close()
        raise TokenFormatError(f"{p}: data.mdb is truncated ({have} bytes, its pages need {need})")
    return env


def read_meta(path: str | Path) -> TokenMeta:
    env = open_readonly(path, lock=True)
    try:
        with env.begin() as txn:
            return _read_meta(txn, str(path))
    finally:
        env.close()


def read_progress(path: str | Path) -> dict[int, int]:
    """``{shard: count}`` of the shards committed so far; safe while the writer is running."""
    env = open_readonly(path, lock=True)
    try:
        with env.begin() as txn:
            return {s: int(d["count"]) for s, d in _read_done(txn, str(path)).items()}
    finally:
        env.close()


def verify(path: str | Path, require_complete: bool = True) -> tuple[TokenMeta, ScanResult]:
    """Full check of a split: every record valid, every shard whole (records match its done key), and,
    with ``require_complete``, the database finished and its hashes equal to the metadata's.

    ``require_complete=False`` checks a database that is being written or whose writer was killed.
    """
    where = str(path)
    env = open_readonly(path, lock=True)
    try:
        with env.begin() as txn:
            meta = _read_meta(txn, where)
            scan = scan_records(txn, meta, _read_done(txn, where), where)
    finally:
        env.close()
    if not require_complete:
        return meta, scan
    if not meta.complete:
        raise TokenFormatError(f"{where}: incomplete ({len(scan.shard_counts)} of {len(meta.shards)} shards "
                               "written); rerun the tokenize stage")
    if scan.num_records != meta.num_records or scan.records_sha256 != meta.records_sha256:
        raise TokenFormatError(f"{where}: records ({scan.num_records}, sha256 {scan.records_sha256[:12]}) differ "
                               f"from the metadata ({meta.num_records}, {meta.records_sha256[:12]})")
    return meta, scan


def iter_records(path: str | Path) -> Iterator[tuple[bytes, bytes]]:
    """Every ``(key, value)`` record in key order (raw bytes), for checks and exports."""
    env = open_readonly(path, lock=True)
    try:
        with env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(b"0"):
                yield from cursor.iternext(keys=True, values=True)
    finally:
        env.close()


def check_meta(meta: TokenMeta, where: str = "", **expect: Any) -> None:
    """Raise :class:`TokenFormatError` naming every field of ``meta`` that differs from ``expect``.

    ``expect`` keys are metadata fields (``codebook_size``, ``grid_size``, ``seq_len``, ``keep_ratio``,
    ``num_classes``, ``tokenizer_sha256``, ...); ``None`` values are not checked.
    """
    unknown = [k for k in expect if k not in {f.name for f in dataclasses.fields(TokenMeta)}]
    if unknown:
        raise TypeError(f"check_meta: unknown metadata fields {unknown}")
    diffs = [f"{k}={getattr(meta, k)!r} in the token database, but the model expects {v!r}"
             for k, v in expect.items() if v is not None and getattr(meta, k) != v]
    if diffs:
        raise TokenFormatError(f"{where}: token database does not match the model: " + "; ".join(diffs)
                               + " (retokenize with the tokenizer this model was built for)")


_OPEN_DATASETS: weakref.WeakSet[TokenDataset] = weakref.WeakSet()


def _close_before_fork() -> None:
    for ds in list(_OPEN_DATASETS):
        ds.close()


os.register_at_fork(before=_close_before_fork)


class TokenDataset(Dataset):
    """A finished token split as a map-style dataset: ``{"codes": long [N], "positions": long [N],
    "label": long []}`` per image (label -1 when the data is unlabeled), in key order.

    The constructor reads the metadata once, checks the database is complete and matches the model
    (``expect_*``; :class:`TokenFormatError` names each mismatched field), and closes it again. The
    environment is opened lazily, read-only and lock-free, by the process that reads (each DataLoader
    worker opens its own). An environment is never used across ``fork``: an open one is closed just before
    the process forks (and reopened on the next read), and a handle that was inherited anyway is refused.
    """

    def __init__(self, path: str | Path, *, expect_codebook_size: int | None = None,
                 expect_grid_size: int | None = None, expect_seq_len: int | None = None,
                 expect_tokenizer_sha256: str | None = None, expect_num_classes: int | None = None):
        self.path = str(path)
        meta = read_meta(path)
        if not meta.complete:
            raise TokenFormatError(f"{self.path}: the token database is incomplete (the tokenize stage did not "
                                   "finish); rerun the tokenize stage")
        check_meta(meta, self.path, codebook_size=expect_codebook_size, grid_size=expect_grid_size,
                   seq_len=expect_seq_len, tokenizer_sha256=expect_tokenizer_sha256,
                   num_classes=expect_num_classes)
        self.meta = meta
        self._shard_ids = [s for s, n in meta.shards if n]
        self._starts = np.cumsum([0] + [n for _, n in meta.shards if n]).tolist()
        self._dtype = record_dtype(meta.seq_len, meta.text_len)
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def key(self, index: int) -> bytes:
        """The record key of item ``index``."""
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        j = bisect.bisect_right(self._starts, i) - 1
        return record_key(self._shard_ids[j], i - self._starts[j])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch of items read in one transaction (DataLoader calls this when it exists)."""
        keys = [self.key(i) for i in indices]
        with self._lock:
            env = self._environment()
            with env.begin() as txn:
                values = [txn.get(k) for k in keys]
        recs = np.frombuffer(b"".join(self._decode(k, v) for k, v in zip(keys, values)), dtype=self._dtype)
        # a record altered after the database was verified must not index an embedding table out of range
        try:
            check_tokens(recs["codes"], recs["positions"], codebook_size=self.meta.codebook_size,
                         num_positions=self.meta.num_positions, where=str(self.path))
        except TokenFormatError as e:
            raise TokenFormatError(f"{e} (batch keys {keys[0].decode()}..{keys[-1].decode()}; the database was "
                                   "altered after it was written: delete it and rerun the tokenize stage)") from None
        labels = recs["label"]
        if ((labels < -1) | ((labels != -1) & (labels >= self.meta.num_classes))).any():
            raise TokenFormatError(f"{self.path}: labels outside [-1, {self.meta.num_classes}) in keys "
                                   f"{keys[0].decode()}..{keys[-1].decode()} (the database was altered after it "
                                   "was written): delete it and rerun the tokenize stage")
        codes, positions = recs["codes"].astype(np.int64), recs["positions"].astype(np.int64)
        items = [{"codes": torch.from_numpy(codes[i]), "positions": torch.from_numpy(positions[i]),
                  "label": torch.tensor(int(recs["label"][i]), dtype=torch.long)} for i in range(len(recs))]
        if self.meta.text_len:
            text = recs["text"].astype(np.int64)
            if text.max(initial=0) >= self.meta.text_vocab_size:
                raise TokenFormatError(f"{self.path}: caption ids outside [0, {self.meta.text_vocab_size}) in keys "
                                       f"{keys[0].decode()}..{keys[-1].decode()}: delete the database and rerun "
                                       "the tokenize stage")
            for i, item in enumerate(items):
                item["text"] = torch.from_numpy(text[i])
        return items

    def _decode(self, key: bytes, value: bytes | None) -> bytes:
        """``value`` when it is one whole record (:class:`TokenFormatError` naming ``key`` otherwise)."""
        if value is None:
            raise TokenFormatError(f"{self.path}: record {key.decode()} is listed in the metadata but missing")
        if len(value) != self.meta.record_size:
            raise TokenFormatError(f"{self.path}: record {key.decode()} has {len(value)} bytes, expected "
                                   f"{self.meta.record_size}")
        return value

    def _environment(self) -> lmdb.Environment:
        pid = os.getpid()
        if self._env is not None and self._pid != pid:
            raise RuntimeError(f"TokenDataset({self.path}): the LMDB environment was opened in process {self._pid} "
                               f"and inherited by process {pid} across fork; LMDB handles must not cross fork. "
                               "Call dataset.close() before forking (DataLoader workers open their own)")
        if self._env is None:
            self._env = open_readonly(self.path, lock=False)
            self._pid = pid
            _OPEN_DATASETS.add(self)
        return self._env

    def close(self) -> None:
        """Close this process's environment (it reopens on the next read)."""
        with self._lock:
            if self._env is not None and self._pid == os.getpid():
                self._env.close()
            self._env = None
            self._pid = None
        _OPEN_DATASETS.discard(self)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_env=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
