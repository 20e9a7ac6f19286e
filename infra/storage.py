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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

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


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` durably: into a temporary file beside ``dst``, fsynced, renamed over it."""
    import shutil

    with atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def tensors_bytes(tensors: Any, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of ``tensors`` (name -> tensor) as bytes, identical for identical inputs in every
    process: safetensors writes its ``__metadata__`` entries in hash-map order, which changes from one process
    to the next (the same weights exported twice would hash differently and change every downstream stage
    key); here they are sorted."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return data
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].decode("utf-8")
    body = text.rstrip(" ")
    header = json.loads(body)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    if len(ordered.encode()) != len(body.encode()):
        raise RuntimeError("safetensors header could not be put in a stable order (unexpected formatting)")
    return data[:8] + (ordered + text[len(body):]).encode() + data[8 + n:]


def save_tensors(path: str | Path, tensors: Any, metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file at ``path`` durably (temporary name, fsync, rename, directory
    fsync) with stable bytes (:func:`tensors_bytes`); returns the sha256 of exactly what was written."""
    data = tensors_bytes(tensors, metadata)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_json(path: str | Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def stage_dir(root: str | Path, stage: str, key: str) -> Path:
    """``<root>/<stage>/<key>``: where a stage writes everything for one stage key."""
    return Path(root) / stage / key


# --------------------------------------------------------------------------------------------- references


class DamagedOutput(Exception):
    """A stage output whose commit marker exists but which does not verify (unreadable marker, a file gone,
    truncated or altered). Not an error of the run: the stage sets it aside and builds it again."""

    def __init__(self, out_dir: str | Path, reason: str):
        super().__init__(f"{out_dir}: {reason}")
        self.out_dir = Path(out_dir)
        self.reason = reason


def read_marker(marker: str | Path, cls: type, field: str | None = None) -> Any:
    """The stage reference ``cls`` stored in the commit marker ``marker`` (under ``field`` when given); None
    when there is no marker; :class:`DamagedOutput` when the marker is there but unreadable."""
    marker = Path(marker)
    if not marker.is_file():
        return None
    try:
        doc = read_json(marker)
        return cls.from_dict(rebased(doc[field] if field else doc, marker.parent))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DamagedOutput(marker.parent, f"{marker.name} is unreadable ({type(e).__name__}: {e})") from None


def rebased(ref: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """A stored reference read from ``out_dir`` (``<root>/<stage>/<key>``) as if written there: when its ``path``
    names the same stage and key under another root (the run root was moved or copied), every path inside that
    old root is moved to this one, so a moved root is found complete and a copied one never reads the original's
    files. Paths outside the old root (the user's data, a pretrained encoder) are left as they are."""
    stored = ref.get("path") if isinstance(ref, dict) else None
    if not isinstance(stored, str) or stored == str(out_dir):
        return ref
    old = Path(stored)
    if (old.name, old.parent.name) != (out_dir.name, out_dir.parent.name):
        return ref  # not this output's own directory: nothing to rebase on
    old_root, new_root = str(old.parent.parent), str(out_dir.parent.parent)

    def move(value: Any) -> Any:
        if isinstance(value, str) and (value == old_root or value.startswith(old_root + os.sep)):
            return new_root + value[len(old_root):]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return move(ref)


def load_weights_ref(marker: str | Path, cls: type) -> Any:
    """A stage reference (``cls``, with ``weights`` and ``sha256`` fields) read from its success marker; None
    when there is no marker; :class:`DamagedOutput` when the marker is unreadable or the weights file is gone
    or altered."""
    ref = read_marker(marker, cls)
    if ref is None:
        return None
    weights = Path(ref.weights)
    if not weights.is_file():
        raise DamagedOutput(Path(marker).parent, f"{weights.name} is missing")
    if sha256_file(weights) != ref.sha256:
        raise DamagedOutput(Path(marker).parent, f"{weights.name} does not match the sha256 in {Path(marker).name}")
    return ref


def set_aside(out_dir: str | Path) -> Path:
    """Move a damaged output out of the way (``<stage>/.<key>.damaged-<UTC time>``, kept for inspection; only
    ``mqgen gc`` removes it, once older than its ``--keep-days``) so that the stage builds it again; returns where
    it went."""
    import time

    out_dir = Path(out_dir)
    target = out_dir.parent / f".{out_dir.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 0
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.split('+')[0]}+{n}")
    os.replace(out_dir, target)
    fsync_dir(out_dir.parent)
    return target


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
        fsync_dir(path.parent)
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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_temp_dir(prefix: str) -> Path:
    """A fresh directory ``<temp dir>/<prefix><pid>-<random>`` (mode 0700, from ``mkdtemp``) for this process's
    scratch files. The directories of this prefix that a dead process of this host left behind (killed before
    it could clean up) are removed first, so a crash loop never fills the temp dir."""
    import shutil
    import tempfile

    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{prefix}*-*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def lock_holder_text() -> str:
    """Who takes a lock, as written into the lock file: host, pid, start time and the command line."""
    import socket
    import sys
    import time

    from infra.secrets import redact_text

    cmd = redact_text(" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)))[:200]
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


@contextlib.contextmanager
def try_file_lock(path: str | Path) -> Iterator[bool]:
    """The lock :func:`file_lock` takes on ``path``, without waiting: yields True while holding it, False when
    another process holds it. A missing lock file means nobody holds it (it is not created); the file is opened
    read-only, so a lock file of another user on a shared root can be tested too."""
    import fcntl

    try:
        fd = os.open(str(path), os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def cached_run(out_dir: Path, key: str, load: Callable[[], T | None], compute: Callable[[], T], *,
               force: bool = False, key_doc: dict[str, Any] | None = None) -> T:
    """A stage's cache discipline, written once: return the verified output ``load()`` finds, else take
    ``<out_dir.parent>/.<key>.lock`` (a second process on the same key waits here), look again (the holder may
    have finished it), and only then ``compute()``. ``force`` skips both looks. An output ``load()`` finds
    damaged (:class:`DamagedOutput`) is set aside under the lock and built again. ``key_doc`` (what ``key``
    hashes) is kept beside the finished output (:func:`record_key_doc`)."""
    if not force:
        with contextlib.suppress(DamagedOutput):  # looked at again under the lock
            hit = load()
            if hit is not None:
                record_key_doc(out_dir, key_doc)
                return hit
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent / f".{key}.lock", what=f"{out_dir.parent.name} {key} (its result is reused)"):
        if not force:
            try:
                hit = load()
            except DamagedOutput as e:
                rebuild_damaged(e)
            else:
                if hit is not None:
                    record_key_doc(out_dir, key_doc)
                    return hit
        out = compute()
    record_key_doc(out_dir, key_doc)
    return out


# --------------------------------------------------------------------------------------------- key documents

KEY_DOC = "_key.json"  # beside a finished output: what its stage key hashes (explains a later key change)
_MISSING = object()


def record_key_doc(out_dir: str | Path, doc: dict[str, Any] | None) -> None:
    """Write ``doc`` to ``<out_dir>/_key.json`` once the output is finished (not needed by any stage: a failure
    to write it is logged, never raised)."""
    from infra.secrets import redact

    path = Path(out_dir) / KEY_DOC
    if doc is None or not path.parent.is_dir() or path.exists():
        return
    try:
        atomic_write_json(path, redact(doc))  # a signed URL's signature or a password never lands on disk
    except OSError as e:
        import logging

        logging.getLogger("mqgen.storage").warning("could not record the key document %s: %s", path, e)


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text[:12] + "..." if isinstance(v, str) and len(v) > 20 and v.isalnum() else text


@dataclass(frozen=True)
class KeyChange:
    """How the nearest finished output of a stage on a run root differs from what a config asks for now."""

    key: str  # the earlier output's stage key
    finished: float  # when its key document was written (seconds since the epoch)
    changes: tuple[str, ...]  # "stackformer.warmup_steps: 0 -> 533", one per differing field

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.finished))
        return f"the nearest earlier output {self.key} (finished {when}) differs in " + "; ".join(self.changes)


def nearest_key_change(root: str | Path, stage: str, doc: dict[str, Any], key: str) -> KeyChange | None:
    """Among the finished outputs of ``stage`` under ``root`` with a key document (other than ``key``), the one
    whose document differs from ``doc`` in the fewest fields (the newest of equals), and how; None when none
    has a document. Credentials in URLs are compared (and shown) redacted, as the documents are stored."""
    from infra.secrets import redact
    from infra.tracking import flatten  # dotted keys, lists as JSON: as MLflow params show them

    want = flatten(redact(doc))
    best: tuple[int, float, KeyChange] | None = None
    for path in (Path(root) / stage).glob(f"[!.]*/{KEY_DOC}"):
        if path.parent.name == key:
            continue
        try:
            had = flatten(read_json(path))
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        changes = tuple(f"{name}: {_short(had[name]) if name in had else '(absent)'} -> "
                        f"{_short(want[name]) if name in want else '(absent)'}"
                        for name in sorted(set(want) | set(had)) if want.get(name, _MISSING) != had.get(name, _MISSING))
        rank = (len(changes), -mtime)
        if best is None or rank < best[:2]:
            best = (*rank, KeyChange(path.parent.name, mtime, changes))
    return best[2] if best is not None else None


def rebuild_damaged(e: DamagedOutput) -> None:
    """Set a damaged output aside, saying so (the caller holds the stage key's lock and builds it again)."""
    import logging

    where = set_aside(e.out_dir)
    logging.getLogger("mqgen.storage").warning("%s/%s is damaged (%s): moved to %s and built again",
                                               e.out_dir.parent.name, e.out_dir.name, e.reason, where.name)
