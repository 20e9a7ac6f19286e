"""What a user sees on the console, and where everything else goes.

Per stage the console shows a start line, one live progress line (steps, loss, images/s, ETA) and an end
line with the stage's key figures and duration. Library chatter (Ray, Prefect, MLflow, alembic) and full
tracebacks go to the run's log file under ``<run.root>/logs/``; the console shows only errors of those
libraries, one line each (``--verbose``: INFO and above, with tracebacks).

Progress crosses process boundaries through a small JSON file (:class:`ProgressFile`): a Ray Train worker or
Ray task writes it (at most every ``interval_s``), the driver polls it (:func:`watch_progress`) and draws it on
its one live line. The file lives in the stage's output folder under the run root, which every worker can
reach already (checkpoints and the tracking database live there too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only (postponed evaluation)

OUR_LOGGERS = ("mqgen", "flows", "tasks", "infra", "models")
log = logging.getLogger("mqgen")


def fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def fmt_bytes(n: float) -> str:
    """A size for people: ``12 B``, ``3.4 KB``, ``56.7 MB``, ``1.23 GB`` (powers of 1000)."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e5:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} KB"
    return f"{n:.0f} B"


def _fmt_value(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------- live line


class LiveLine:
    """One console line redrawn in place on a terminal; on a pipe or file (CI, ``tee``), a line at most every
    ``every_pct`` percent of progress, so logs stay short."""

    def __init__(self, stream: IO[str] | None = None, every_pct: float = 25.0):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_pct = every_pct
        self._next_pct = 0.0
        self._last = -1e9  # when a line of unknown progress was last printed (at most one per 10 s)
        self._shown = False
        self._lock = threading.Lock()

    def show(self, text: str, pct: float | None = None) -> None:
        with self._lock:
            if self.tty:
                width = max(20, _terminal_width() - 1)
                self.stream.write("\r\033[K" + text[:width])
                self.stream.flush()
                self._shown = True
                return
            now = time.monotonic()
            due = now - self._last >= 10.0 if pct is None else pct + 1e-9 >= self._next_pct
            if due:
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last = now
                if pct is not None:
                    self._next_pct = (pct // self.every_pct + 1) * self.every_pct

    def close(self) -> None:
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\n")
                self.stream.flush()
            self._shown = False


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 120


def progress_text(name: str, done: int, total: int | None, unit: str, elapsed: float, start: int = 0,
                  fields: dict[str, float] | None = None) -> tuple[str, float | None]:
    """``'  train_tokenizer  120/400 steps (30%)  loss 0.41  img/s 250  ETA 1 min 02 s'`` and the percentage
    (None when the total is unknown: then the count and the rate)."""
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    fields_text = [f"{k} {_fmt_value(v)}" for k, v in (fields or {}).items()]
    if not total:
        return "  ".join([f"  {name}  {done} {unit}", *fields_text, f"{rate:.4g} {unit}/s"]), None
    pct = 100.0 * done / total
    eta = (total - done) / rate if rate > 0 else float("nan")
    parts = [f"  {name}  {done}/{total} {unit} ({pct:.0f}%)", *fields_text]
    parts.append("ETA -" if math.isnan(eta) else f"ETA {fmt_duration(eta)}")
    return "  ".join(parts), pct


class Progress:
    """Progress of one piece of work drawn on a :class:`LiveLine` (in the process that owns the console) or
    written to a :class:`ProgressFile` (in a Ray worker); ``update`` is cheap and may be called every step."""

    def __init__(self, name: str, total: int | None, *, unit: str = "steps", start: int = 0,
                 file: str | Path | None = None, enabled: bool = True, line: LiveLine | None = None):
        self.name, self.total, self.unit, self.start = name, total, unit, start
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.file = ProgressFile(file) if file is not None and enabled else None
        self.line = None if self.file is not None or not enabled else (line or LiveLine())
        self.done = start

    def update(self, done: int, **fields: float) -> None:
        if not self.enabled:
            return
        self.done = done
        elapsed = time.perf_counter() - self.t0
        if self.file is not None:
            self.file.write(done=done, total=self.total, unit=self.unit, start=self.start, elapsed=elapsed,
                            fields=fields, force=bool(self.total) and done >= self.total)
        elif self.line is not None:
            text, pct = progress_text(self.name, done, self.total, self.unit, elapsed, self.start, fields)
            self.line.show(text, pct)

    def advance(self, n: int = 1, **fields: float) -> None:
        self.update(self.done + n, **fields)

    def close(self) -> None:
        if self.line is not None:
            self.line.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressFile:
    """A JSON progress record rewritten atomically (rename) at most every ``interval_s`` seconds."""

    def __init__(self, path: str | Path, interval_s: float = 1.0):
        self.path = Path(path)
        self.interval_s = interval_s
        self._last = 0.0

    def write(self, *, force: bool = False, **record: Any) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({**record, "time": time.time()}, default=float))
            os.replace(tmp, self.path)
        except OSError:  # progress is best effort: never fail training over it
            with contextlib.suppress(OSError):
                tmp.unlink()

    @staticmethod
    def read(path: str | Path) -> dict[str, Any] | None:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None


@contextlib.contextmanager
def watch_progress(path: str | Path, name: str, interval_s: float = 0.5) -> Iterator[None]:
    """While the block runs, draw the progress that workers write to ``path`` on the console's live line."""
    path = Path(path)
    with contextlib.suppress(OSError):
        path.unlink()  # a record of an earlier attempt would show stale figures
    line = LiveLine()
    stop = threading.Event()

    def poll() -> None:
        last, logged = None, -100.0
        while not stop.wait(interval_s):
            rec = ProgressFile.read(path)
            if rec is None or rec.get("time") == last:
                continue
            last = rec.get("time")
            text, pct = progress_text(name, int(rec["done"]), rec.get("total"), rec.get("unit", "steps"),
                                      float(rec.get("elapsed", 0.0)), int(rec.get("start", 0)),
                                      rec.get("fields") or {})
            line.show(text, pct)
            if pct is None or pct >= logged + 5 or pct >= 100:  # the history goes to the stage's log file
                logged = pct if pct is not None else logged
                log.info(text.strip(), extra={"file_only": True})

    thread = threading.Thread(target=poll, name=f"progress-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
        line.close()


# --------------------------------------------------------------------------------------------- stage lines


def say(text: str) -> None:
    """A line for the user (stderr: stdout stays free for machine-readable output)."""
    stream = sys.stderr
    stream.write(text + "\n")
    stream.flush()
    log.info(text.strip())


# --------------------------------------------------------------------------------------------- logging


class _OneLine(logging.Formatter):
    """Console format: the message's first line, no traceback (the log file has the rest)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().strip().splitlines()
        first = msg[0] if msg else ""
        return f"{record.levelname.lower()}: {record.name}: {first}"

    def formatException(self, ei: Any) -> str:  # (logging's API spelling)
        return ""


class _ConsoleFilter(logging.Filter):
    """Our own loggers at ``ours`` and above; libraries (Ray, Prefect, MLflow) at ``theirs`` and above.
    Prefect's reports of a failed task or flow run are dropped: the CLI prints one paragraph instead."""

    def __init__(self, ours: int, theirs: int):
        super().__init__()
        self.ours, self.theirs = ours, theirs

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        name = record.name
        if name.split(".", 1)[0] in OUR_LOGGERS:
            return record.levelno >= self.ours
        if name.startswith(("prefect.flow_runs", "prefect.task_runs")) and self.theirs > logging.INFO:
            return False
        return record.levelno >= self.theirs


_LOG_DIR: Path | None = None
_CONFIGURED = False
LIBRARY_LOGGERS = ("mlflow", "alembic", "ray")  # libraries that install their own console handlers


def _drop_console_handlers(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            logger.removeHandler(h)


def adopt_library_loggers() -> None:
    """Once :func:`setup_logging` ran, route libraries' own console handlers (installed when they are first
    imported, which may be later) through ours: the log file gets everything, the console what it should."""
    if not _CONFIGURED:
        return
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        _drop_console_handlers(lib)
        lib.propagate = True


def route_stage_logs_to_prefect() -> None:
    """Inside a Prefect flow run: mqgen's INFO records reach the Prefect API handler that
    ``PREFECT_LOGGING_EXTRA_LOGGERS=mqgen`` attached (the flow run's Logs tab), never a second console handler; the
    level is INFO where nothing set one (a flow-run subprocess of ``mqgen serve`` has no :func:`setup_logging`)."""
    logger = logging.getLogger("mqgen")
    _drop_console_handlers(logger)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    for handler in logger.handlers:  # the API handler stores what it receives on the server: never a credential
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class RedactingFilter(logging.Filter):
    """Replaces a record's message (and its traceback text) by the redacted one, in place, before a handler that
    does not format through :class:`_Redacting` sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from infra.secrets import redact_text

        record.msg, record.args = redact_text(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(threadName)s %(name)s: %(message)s"


class _Redacting(logging.Formatter):
    """Formats with ``inner``, then replaces the credentials of every URL in the line (and its traceback)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        from infra.secrets import redact_text

        return redact_text(self.inner.format(record))


def _file_formatter() -> logging.Formatter:
    return _Redacting(logging.Formatter(_FILE_FORMAT))


def log_path() -> Path | None:
    """The log file of this process (set by :func:`setup_logging`), or None."""
    return _LOG_DIR / "mqgen.log" if _LOG_DIR is not None else None


def stage_log_path(stage: str) -> Path | None:
    """The log file of ``stage`` in this process (records written while it ran), or None."""
    return _LOG_DIR / f"{stage}.log" if _LOG_DIR is not None else None


@contextlib.contextmanager
def stage_log(stage: str) -> Iterator[None]:
    """While the block runs, every log record also goes to ``<log dir>/<stage>.log``."""
    path = stage_log_path(stage)
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_file_formatter())
    rootlog = logging.getLogger()
    rootlog.addHandler(handler)
    try:
        yield
    finally:
        rootlog.removeHandler(handler)
        handler.close()


def setup_logging(root: str, command: str, *, verbose: bool = False) -> Path | None:
    """Route every log record to ``<root>/logs/<time>-<command>-<pid>/mqgen.log`` (INFO and above, full
    tracebacks; each stage also gets ``<stage>.log`` there) and only the useful part to the console. Call
    after importing Prefect (it installs its own console handler on the root logger, which this replaces).
    Returns the log folder (None for a remote root)."""
    global _LOG_DIR
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    global _CONFIGURED
    # A log file on a full disk must not print "--- Logging error ---" with a traceback for every record on top of
    # the one clear "no space left" message (the failure itself is reported by the stage).
    logging.raiseExceptions = False
    rootlog = logging.getLogger()
    _drop_console_handlers(rootlog)
    _CONFIGURED = True
    adopt_library_loggers()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    rootlog.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_Redacting(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose
                                    else _OneLine()))
    console.addFilter(_ConsoleFilter(logging.WARNING, logging.INFO if verbose else logging.ERROR))
    rootlog.addHandler(console)
    _LOG_DIR = None
    if "://" not in root:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        _LOG_DIR = Path(root) / "logs" / f"{stamp}-{command}-{os.getpid()}"
        _LOG_DIR.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(_LOG_DIR / "mqgen.log", encoding="utf-8")
        fh.setFormatter(_file_formatter())
        rootlog.addHandler(fh)
    return _LOG_DIR
