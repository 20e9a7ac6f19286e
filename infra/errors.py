"""Which failures are worth a retry.

A :class:`PermanentError` (a bad config, a refused checkpoint, bad input data, inputs that do not fit
together) fails the same way every time: neither Prefect's stage retries nor Ray Train's worker restarts
repeat it. Python's own errors of the same nature (a missing file, a wrong value or type, a non-finite loss)
count as permanent too; anything else (a lost worker, a timeout, a crashed process) is retried.
"""

from __future__ import annotations

from collections.abc import Iterator


class PermanentError(Exception):
    """Base of mqgen's errors that a retry cannot fix; the message says what to do instead."""


# Errors that do not go away by running the same code on the same inputs again.
_DETERMINISTIC = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
                  TypeError, KeyError, IndexError, AttributeError, AssertionError, NotImplementedError,
                  FloatingPointError, ImportError)


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying the work that raised ``exc`` would fail the same way (Ctrl-C / SIGTERM included; a full
    file system too: a retry would fill it up again)."""
    return isinstance(exc, (PermanentError, KeyboardInterrupt, *_DETERMINISTIC)) or is_no_space(exc)


class NoSpaceLeft(PermanentError, OSError):
    """A file system filled up (ENOSPC / EDQUOT). Not retried (it would fill up again); the message names the
    file system, what is free there and, where the stage can tell, about how much it needs. Everything already
    finished is kept: after space is freed, the same command resumes. ``path``: where the write failed."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def original_error(exc: BaseException) -> BaseException:
    """The exception a remote task raised, for one re-raised by Ray (``RayTaskError(X)``, whose message carries the
    remote traceback): its ``cause``; ``exc`` itself otherwise."""
    cause = getattr(exc, "cause", None)
    return cause if type(exc).__name__.startswith("RayTaskError") and isinstance(cause, BaseException) else exc


def _free_space(path: str) -> tuple[str, int | None]:
    """The mount point holding ``path`` (or its nearest existing parent) and the bytes free there."""
    import os
    import shutil

    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip("/")) or "/"
    try:
        free: int | None = shutil.disk_usage(probe).free
    except OSError:
        free = None
    mount = probe
    while mount != "/" and not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    return mount, free


def looks_full(path: str, error: BaseException) -> NoSpaceLeft | None:
    """A :class:`NoSpaceLeft` for ``error`` when the file system of ``path`` has (almost) nothing free: for
    libraries that report a full disk as a plain I/O error (LMDB says ``Input/output error``), else None."""
    _, free = _free_space(path)
    if free is None or free > 4 << 20:
        return None
    return NoSpaceLeft(no_space_message(path), path=path)


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full file system: an ``OSError`` with ENOSPC
    or EDQUOT, or an LMDB or SQLite error saying so (they report it only in their message)."""
    import errno

    for e in exception_chain(exc):
        if isinstance(e, NoSpaceLeft):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(e).__module__ == "lmdb" and ("No space left" in str(e) or "Disk quota" in str(e)):
            return True
        # SQLite (MLflow's and Prefect's stores under the run root) says SQLITE_FULL in words only; MLflow and
        # SQLAlchemy wrap it, keeping the text
        if "database or disk is full" in str(e):
            return True
    return False


def no_space_message(path: str, need_bytes: int | None = None) -> str:
    """``no space left on <mount> (writing under <path>): <free> free[, this stage needs about <N> more]; ...``."""
    from infra.console import fmt_bytes

    mount, free = _free_space(path)
    need = f", this stage needs about {fmt_bytes(need_bytes)} more" if need_bytes else ""
    return (f"no space left on {mount} (writing under {path}): "
            f"{fmt_bytes(free) + ' free' if free is not None else 'free space unknown'}{need}; free space there (or point "
            "run.root at a larger disk) and run the same command again: finished work is kept and the stage resumes")
