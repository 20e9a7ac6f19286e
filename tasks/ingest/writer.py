"""The ingest stage's shard writer: deterministic ustar tars of normalised samples, written by chunk (in this
process or in a pool of worker processes), and the sample grid of a finished output.

Worker processes import this module (not the stage): it stays free of torch, MLflow and Prefect.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from infra.shards import KEY_PATTERN, read_shard
from infra.storage import HashingWriter, partial_open
from infra.tar import Ignore

from .sources import EMPTY_CAPTION, MISSING_CAPTION, Chunk, Good, ImageSpec, InputDamage, Skip, iter_chunk

_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")  # KEY_PATTERN, fast
_BLOCK = 512
_EXAMPLES_PER_REASON = 5
_HDR_IDS = b"0000444\0" + b"0000000\0" + b"0000000\0"  # mode, uid, gid (bytes 100-124)
_HDR_MTIME = b"00000000000\0"  # bytes 136-148
_HDR_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(_BLOCK - 265)  # type, linkname, magic, version, rest
_HDR_SUM = sum(_HDR_IDS) + sum(_HDR_MTIME) + sum(_HDR_TAIL) + 8 * 32  # checksum field counts as spaces
_PADDING = [bytes(n) for n in range(_BLOCK)]
_PNG_EXT_SUM, _CLS_EXT_SUM, _TXT_EXT_SUM = sum(b".png"), sum(b".cls"), sum(b".txt")


_HDR = struct.Struct("100s24s12s12s8s356s")  # name, mode+uid+gid, size, mtime, checksum, the rest


def ustar_header(name: bytes, size: int, name_sum: int | None = None) -> bytes:
    """A deterministic POSIX ustar header for a regular file (mode 0444, uid/gid 0, mtime 0).

    ``name_sum`` (``sum(name)``) may be passed in when the caller already has it.
    """
    if len(name) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    size_field = b"%011o\0" % size
    checksum = _HDR_SUM + (sum(name) if name_sum is None else name_sum) + sum(size_field)
    return _HDR.pack(name, _HDR_IDS, size_field, _HDR_MTIME, b"%06o\0 " % checksum, _HDR_TAIL)


def encode_sample(key: str, png: bytes, label: int, caption: str | None) -> tuple[list[bytes], int]:
    """The tar bytes of one sample (``<key>.png``, ``<key>.cls`` when ``label >= 0``, ``<key>.txt`` in UTF-8 when
    ``caption`` is not None) as pieces to write, and their total size."""
    if not key or not _KEY_CHARS.issuperset(key):
        raise ValueError(f"sample key {key!r} does not match {KEY_PATTERN.pattern}")
    k = key.encode("ascii")
    k_sum = sum(k)
    pad = -len(png) % _BLOCK
    pieces = [ustar_header(k + b".png", len(png), k_sum + _PNG_EXT_SUM), png, _PADDING[pad]]
    size = _BLOCK + len(png) + pad
    if label >= 0:
        cls = b"%d" % label
        pieces += (ustar_header(k + b".cls", len(cls), k_sum + _CLS_EXT_SUM), cls, _PADDING[-len(cls) % _BLOCK])
        size += 2 * _BLOCK
    if caption is not None:
        txt = caption.encode("utf-8")
        pad = -len(txt) % _BLOCK
        pieces += (ustar_header(k + b".txt", len(txt), k_sum + _TXT_EXT_SUM), txt, _PADDING[pad])
        size += _BLOCK + len(txt) + pad
    return pieces, size


@dataclass
class PartInfo:
    """One finished tar written by a worker (name relative to the parts directory)."""

    split: str
    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    first_key: str
    last_key: str
    class_histogram: dict[str, int]
    num_unlabeled: int
    num_captioned: int = 0


class _OpenPart:
    _FLUSH_BYTES = 1 << 20

    def __init__(self, path: Path):
        self.path = path
        self._cm = partial_open(path)
        self._f = HashingWriter(self._cm.__enter__())
        self._buf: list[bytes] = []
        self._buffered = 0
        self.num_bytes = 0
        self.count = 0
        self.first_key = ""
        self.last_key = ""
        self.hist: Counter[int] = Counter()
        self.unlabeled = 0
        self.captioned = 0

    def add(self, key: str, pieces: Sequence[bytes], size: int, label: int, caption: str | None) -> None:
        """Append one sample's :func:`encode_sample` and count it."""
        self.write(pieces, size)
        if label >= 0:
            self.hist[label] += 1
        else:
            self.unlabeled += 1
        self.captioned += caption is not None
        self.first_key = self.first_key or key
        self.last_key = key
        self.count += 1

    def write(self, pieces: Sequence[bytes], size: int) -> None:
        self._buf.extend(pieces)
        self._buffered += size
        self.num_bytes += size
        if self._buffered >= self._FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._f.write(b"".join(self._buf))
            self._buf.clear()
            self._buffered = 0

    def close(self, split: str) -> PartInfo:
        self.write((bytes(2 * _BLOCK),), 2 * _BLOCK)  # end-of-archive marker
        self._flush()
        self._cm.__exit__(None, None, None)  # fsync, rename .partial -> .tar
        return PartInfo(split, self.path.name, self.count, self._f.num_bytes, self._f.hexdigest(),
                        self.first_key, self.last_key, {str(k): v for k, v in sorted(self.hist.items())},
                        self.unlabeled, self.captioned)

    def abort(self) -> None:
        """Close and delete the unfinished ``.partial`` file (``partial_open``'s error path)."""
        err = RuntimeError(f"aborted writing {self.path}")
        with contextlib.suppress(RuntimeError):
            self._cm.__exit__(RuntimeError, err, None)


class ShardWriter:
    """Writes the samples of one (split, chunk) as ``<split>-c<chunk>-p<part>.tar``, rolling over to a new
    part before ``max_count`` samples or ``max_bytes`` bytes would be exceeded. Each part is written as
    ``*.tar.partial`` and renamed when closed, so a killed writer never leaves a ``*.tar`` behind."""

    def __init__(self, directory: str | Path, split: str, chunk_index: int, max_count: int, max_bytes: int):
        self.directory = Path(directory)
        self.split = split
        self.chunk_index = chunk_index
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.parts: list[PartInfo] = []
        self._open: _OpenPart | None = None

    def add(self, key: str, png: bytes, label: int, caption: str | None = None) -> None:
        """Append one sample: ``<key>.png``, ``<key>.cls`` when ``label >= 0``, ``<key>.txt`` (UTF-8) when
        ``caption`` is not None."""
        pieces, size = encode_sample(key, png, label, caption)
        part = self._open
        if part is not None and (part.count >= self.max_count
                                 or part.num_bytes + size + 2 * _BLOCK > self.max_bytes):
            self.parts.append(part.close(self.split))
            part = self._open = None
        if part is None:
            name = f"{self.split}-c{self.chunk_index:06d}-p{len(self.parts):03d}.tar"
            part = self._open = _OpenPart(self.directory / name)
        part.add(key, pieces, size, label, caption)

    def close(self) -> list[PartInfo]:
        if self._open is not None:
            self.parts.append(self._open.close(self.split))
            self._open = None
        return self.parts

    def abort(self) -> None:
        if self._open is not None:
            self._open.abort()
            self._open = None


# --------------------------------------------------------------------------------------------- ingest workers


@dataclass(frozen=True)
class ChunkJob:
    """One unit of parallel ingest work: a source chunk and where/how to write its shards."""

    chunk: Chunk
    spec: ImageSpec
    parts_dir: str
    shard_max_count: int
    shard_max_bytes: int

    @property
    def job_id(self) -> str:
        return self.chunk.chunk_id


@dataclass
class ChunkResult:
    """What a worker reports for one chunk; also stored as the chunk's done record (JSON) for resume."""

    job_id: str
    fingerprint: str
    parts: list[PartInfo]
    num_inputs: int
    skipped: dict[str, int]
    skipped_examples: dict[str, list[str]]
    ignored: dict[str, int]
    ignored_examples: dict[str, list[str]]
    damaged_inputs: list[dict[str, str]]
    seconds: float
    cpu_seconds: float = 0.0  # CPU time of the thread that built the chunk
    pid: int = 0  # the process that built it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkResult:
        d = dict(d)
        d["parts"] = [PartInfo(**p) for p in d["parts"]]
        return cls(**d)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def build_chunk(job: ChunkJob, fingerprint: str = "", progress: Callable[[int], None] | None = None
                ) -> ChunkResult:
    """Decode, normalise and write one chunk (runs in a worker process, or inline)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    writers: dict[str, ShardWriter] = {}
    skipped: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    skipped_ex: dict[str, list[str]] = {}
    ignored_ex: dict[str, list[str]] = {}
    damaged: list[dict[str, str]] = []
    n_inputs = 0
    pending = 0
    index = getattr(job.chunk, "index", 0)
    try:
        for item in iter_chunk(job.chunk, job.spec):
            if isinstance(item, Good):
                w = writers.get(item.split)
                if w is None:
                    w = writers[item.split] = ShardWriter(job.parts_dir, item.split, index, job.shard_max_count,
                                                          job.shard_max_bytes)
                w.add(item.key, item.png, item.label, item.caption)
                n_inputs += 1
                pending += 1
            elif isinstance(item, Skip):
                skipped[item.reason] += 1
                ex = skipped_ex.setdefault(item.reason, [])
                if len(ex) < _EXAMPLES_PER_REASON:
                    ex.append(f"{item.ref}: {item.detail}" if item.detail else item.ref)
                n_inputs += 1
                pending += 1
            elif isinstance(item, Ignore):
                ignored[item.reason] += 1
                ex = ignored_ex.setdefault(item.reason, [])
                if len(ex) < _EXAMPLES_PER_REASON:
                    ex.append(item.ref)
            elif isinstance(item, InputDamage):
                damaged.append({"url": item.url, "status": item.status, "detail": item.detail})
            if progress is not None and pending >= 256:
                progress(pending)
                pending = 0
        parts = [p for split in sorted(writers, key=_split_order) for p in writers[split].close()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if progress is not None and pending:
        progress(pending)
    return ChunkResult(job.job_id, fingerprint, parts, n_inputs, dict(skipped), skipped_ex, dict(ignored),
                       ignored_ex, damaged, time.perf_counter() - t0, time.thread_time() - c0, os.getpid())


def complete_captions(result: ChunkResult, parts_dir: str | Path, missing_caption: str, ref: str) -> ChunkResult:
    """``result`` once every sample it stored has a caption, for a dataset that turned out captioned (another of
    its inputs has captions): a sample stored without one gets an empty ``.txt`` (``data.missing_caption=empty``,
    counted as ``empty_caption``) or is dropped (``skip``: a counted ``missing_caption`` skip, as when a shard
    already known to be captioned lacks one). Each part concerned is rewritten under its own name (``.partial``,
    then renamed over it; a part left empty is deleted); ``ref`` names the chunk's input in the examples."""
    skip = missing_caption == "skip"
    counts = Counter(result.skipped if skip else result.ignored)
    examples = {k: list(v) for k, v in (result.skipped_examples if skip else result.ignored_examples).items()}
    reason = MISSING_CAPTION if skip else EMPTY_CAPTION
    parts: list[PartInfo] = []
    for info in result.parts:
        if info.num_captioned == info.num_samples:
            parts.append(info)
            continue
        path = Path(parts_dir) / info.name
        part = _OpenPart(path)
        try:
            for r in read_shard(path):
                caption = r.caption
                if caption is None:
                    counts[reason] += 1
                    ex = examples.setdefault(reason, [])
                    if len(ex) < _EXAMPLES_PER_REASON:
                        where = f"{ref} (output key {r.key})"
                        ex.append(f"{where}: no caption in a captioned dataset" if skip else where)
                    if skip:
                        continue
                    caption = ""
                part.add(r.key, *encode_sample(r.key, r.png, r.label, caption), r.label, caption)
        except BaseException:
            part.abort()
            raise
        if part.count:
            parts.append(part.close(info.split))
        else:
            part.abort()
            path.unlink()
    if skip:
        return replace(result, parts=parts, skipped=dict(counts), skipped_examples=examples)
    return replace(result, parts=parts, ignored=dict(counts), ignored_examples=examples)


def _split_order(split: str) -> int:
    return {"train": 0, "val": 1}.get(split, 2)


_progress_queue: Any = None


def pool_init(queue: Any) -> None:
    """ProcessPoolExecutor initializer: progress goes to the parent through ``queue``."""
    global _progress_queue
    _progress_queue = queue


def pool_build_chunk(job: ChunkJob, fingerprint: str) -> ChunkResult:
    q = _progress_queue
    return build_chunk(job, fingerprint, progress=(lambda n: q.put(n)) if q is not None else None)


def sample_grid(paths: Sequence[str | Path], rows: int = 8, cols: int = 8, max_cell: int = 128) -> np.ndarray:
    """An ``rows x cols`` grid (uint8 HxWxC) of the first samples of ``paths``, cells upscaled to >= 64 px
    with nearest neighbour (small images) or capped at ``max_cell`` px."""
    from PIL import Image

    cells: list[np.ndarray] = []
    for p in paths:
        for _, png, *_ in read_shard(p):
            img = Image.open(io.BytesIO(png), formats=("PNG",)).convert("RGB")
            s = img.size[0]
            if s < 64:
                img = img.resize((s * (64 // s + (64 % s > 0)),) * 2, Image.Resampling.NEAREST)
            elif s > max_cell:
                img = img.resize((max_cell, max_cell), Image.Resampling.LANCZOS)
            cells.append(np.asarray(img))
            if len(cells) == rows * cols:
                break
        if len(cells) == rows * cols:
            break
    if not cells:
        return np.zeros((8, 8, 3), np.uint8)
    c = cells[0].shape[0]
    grid = np.zeros((rows * c, cols * c, 3), np.uint8)
    for i, cell in enumerate(cells):
        r, k = divmod(i, cols)
        grid[r * c:(r + 1) * c, k * c:(k + 1) * c] = cell
    return grid

