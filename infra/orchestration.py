"""The Prefect task of a stage module, created on first use so that the module imports without Prefect.

A stage module (``tasks/<stage>.py``) ends with one line::

    __getattr__ = lazy_stage_task(__name__, "train_tokenizer_task", run, name=STAGE, retries=0)

and ``tasks.train_tokenizer.train_tokenizer_task`` is then an ordinary Prefect task, built (and cached on the
module) the first time anything reads it. Importing the stage for its trainer or its ``run()`` needs only
torch and the repository: a GPU box that runs ``benchmarks/train.py`` without Prefect installed. Every stage
task persists its result with the JSON serializer (the stage's small reference, never a pickle) and has no
Prefect cache policy: whether a stage is done is decided by its own verified output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def lazy_stage_task(module: str, attr: str, fn: Callable[..., Any], *, name: str, retries: int = 0,
                    retry_delay_seconds: float = 0, retry_condition_fn: Callable[..., bool] | None = None
                    ) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) that builds the Prefect task ``attr`` wrapping ``fn``."""

    def __getattr__(key: str) -> Any:
        if key != attr:
            raise AttributeError(f"module {module!r} has no attribute {key!r}")
        import functools

        from prefect import task
        from prefect.cache_policies import NO_CACHE

        from infra.secrets import redact_exception

        @functools.wraps(fn)
        def redacted_failures(*args: Any, **kwargs: Any) -> Any:
            """The stage, with credentials taken out of its exception before Prefect records it."""
            try:
                return fn(*args, **kwargs)
            except BaseException as e:
                redact_exception(e)
                raise

        built = task(redacted_failures, name=name, retries=retries, retry_delay_seconds=retry_delay_seconds,
                     retry_condition_fn=retry_condition_fn, persist_result=True, result_serializer="json",
                     cache_policy=NO_CACHE)
        setattr(sys.modules[module], attr, built)
        return built

    return __getattr__


def start_local_api() -> None:
    """Start this process's temporary Prefect API server now, holding a lock in ``PREFECT_HOME``.

    Two ``mqgen`` processes on one run root share ``<run.root>/.prefect/prefect.db``; started at once, both
    would create and migrate that SQLite database together (and one fail). Under the lock the second waits
    until the first server is up, then starts its own on the migrated database. Prefect's flows then reuse
    the server started here. A no-op when ``PREFECT_API_URL`` names a server.
    """
    import os
    from pathlib import Path

    if os.environ.get("PREFECT_API_URL"):
        return
    import signal

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME

    from infra.storage import file_lock

    with file_lock(Path(PREFECT_HOME.value()) / ".mqgen-start.lock", what="Prefect's local database"):
        # The server process inherits SIGINT blocked: a terminal's Ctrl-C reaches the whole process group, and a
        # server gone first would turn the interruption into "connection refused" errors while mqgen records it
        # (mqgen stops the server itself at exit, with SIGTERM). It also gets SIGTERM when mqgen dies without
        # stopping it (SIGKILL, the OOM killer): no server is left behind holding the port and the database.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with children_die_with_this_thread():
                SubprocessASGIServer().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the thread that started it ends, however it ends (SIGKILL
    included). Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere nothing changes."""
    if _PRCTL is not None:
        _PRCTL(1, 15)  # PR_SET_PDEATHSIG = 1, SIGTERM = 15 (kept across exec)


def _libc_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


@contextmanager
def children_die_with_this_thread() -> Iterator[None]:
    """Every ``subprocess.Popen`` started meanwhile by a library (Prefect's temporary API server) without a
    ``preexec_fn`` of its own gets :func:`die_with_parent`. Call it from a thread that lives as long as the
    children should (the main thread)."""
    import subprocess

    real = subprocess.Popen

    class Popen(real):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("preexec_fn") is None:
                kwargs["preexec_fn"] = die_with_parent
            super().__init__(*args, **kwargs)

    subprocess.Popen = Popen  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = real  # type: ignore[misc]
