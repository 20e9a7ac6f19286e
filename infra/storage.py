"""File-system primitives every stage uses: atomic writes, sha256, stage directories, safe checkpoints.

Rules (see docs/architecture.md): every output is written under a temporary name and renamed; a commit
marker is written last; readers trust only marked outputs; anything loaded from disk that may hold a
pickle is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from infra.errors import PermanentError

CHUNK = 1 << 20
T = TypeVar("T")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on clean exit fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    with atomic_target(path, sync=False) as tmp, open(tmp, mode) as f:
        yield f  # type: ignore[misc]
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_target(path: str | Path, *, sync: bool = True) -> Iterator[Path]:
    """A unique temporary path beside ``path`` for a writer that wants a file name (safetensors, LMDB exports);
    on clean exit it is fsynced (``sync``) and renamed over ``path``, on an exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def stage_dir(root: str | Path, stage: str, key: str) -> Path:
    """``<root>/<stage>/<key>``: where a stage writes everything for one stage key."""
    return Path(root) / stage / key


# --------------------------------------------------------------------------------------------- references


def load_weights_ref(marker: str | Path, cls: type) -> Any:
    """A stage reference (``cls``, with ``weights`` and ``sha256`` fields) read from its success marker,
    or None when the marker is missing or unreadable, or the weights file is gone or altered."""
    marker = Path(marker)
    if not marker.is_file():
        return None
    try:
        ref = cls.from_dict(read_json(marker))
    except (ValueError, TypeError, KeyError):
        return None
    if not Path(ref.weights).is_file() or sha256_file(ref.weights) != ref.sha256:
        return None
    return ref


# --------------------------------------------------------------------------------------------- checkpoints


class UnsafeCheckpointError(PermanentError, RuntimeError):
    """A checkpoint file failed verification (hash mismatch, unexpected content, pickled code)."""


def load_state_file(path: str | Path, expected_sha256: str | None = None) -> Any:
    """Load a ``torch.save`` file with the restricted unpickler (``weights_only=True``).

    A file holding arbitrary pickled objects (code execution on load) raises
    :class:`UnsafeCheckpointError`; so does a sha256 mismatch when ``expected_sha256`` is given.
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` in the environment cannot weaken this: the argument is explicit.
    """
    import pickle

    import torch

    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise UnsafeCheckpointError(f"{path}: sha256 {actual} does not match the manifest ({expected_sha256})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refused to load (not a plain tensor/state file): {e}") from e


def save_state_file(path: str | Path, obj: Any) -> str:
    """``torch.save`` atomically; returns the sha256 of the written file."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return sha256_file(path)


# --------------------------------------------------------------------------------------------- staged outputs

PARTIAL_SUFFIX = ".partial"


class HashingWriter:
    """A write-only file wrapper that keeps the sha256 and byte count of everything written through it."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._h = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self._h.update(data)
        self.num_bytes += len(data)
        return self._f.write(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextlib.contextmanager
def partial_open(path: str | Path) -> Iterator[BinaryIO]:
    """Write ``<path>.partial``; on clean exit fsync it and rename it to ``path``.

    A process killed mid-write leaves only the ``.partial`` name, which no reader trusts; an exception
    removes it. Unlike :func:`atomic_open` the temporary name is predictable, so a later run can find and
    delete leftovers (``remove_partials``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_partials(directory: str | Path) -> list[Path]:
    """Delete every ``*.partial`` file below ``directory`` (leftovers of killed writers); returns them."""
    removed = []
    for p in sorted(Path(directory).rglob(f"*{PARTIAL_SUFFIX}")):
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


def remove_tree(path: str | Path) -> None:
    """``rm -rf path`` (no error when it does not exist); never follows a symlink out of the tree."""
    import shutil

    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing any previous ``dst``.

    ``dst`` is first renamed aside, then ``src`` renamed into place, then the old copy deleted: readers see
    either the old complete directory, no directory, or the new complete one, never a mixture.
    """
    import uuid

    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        remove_tree(old)


def lock_holder_text() -> str:
    """Who takes a lock, as written into the lock file: host, pid, start time and the command line."""
    import socket
    import sys
    import time

    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": cmd})


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"process {h['pid']} on {h['host']} (since {h['since']}: {h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def file_lock(path: str | Path, what: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` while the block runs; waits for other holders,
    saying who holds it (``what`` names the work it guards in that message).

    The holder writes who it is into the lock file, for the message a waiter prints. The lock dies with its
    process, so a killed holder never leaves a stale lock behind.
    """
    import fcntl
    import logging
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            log = logging.getLogger("mqgen.lock")
            log.warning("waiting for %s: %s holds it", what or path, holder)
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.warning("%s: free after %.0f s; going on", what or path, time.monotonic() - t0)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, lock_holder_text().encode(), 0)
        except OSError:
            pass  # the message is a courtesy; the lock holds without it
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def cached_run(out_dir: Path, key: str, load: Callable[[], T | None], compute: Callable[[], T], *,
               force: bool = False) -> T:
    """A stage's cache discipline, written once: return the verified output ``load()`` finds, else take
    ``<out_dir.parent>/.<key>.lock`` (a second process on the same key waits here), look again (the holder may
    have finished it), and only then ``compute()``. ``force`` skips both looks."""
    if not force:
        hit = load()
        if hit is not None:
            return hit
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent / f".{key}.lock", what=f"{out_dir.parent.name} {key} (its result is reused)"):
        if not force:
            hit = load()
            if hit is not None:
                return hit
        return compute()
