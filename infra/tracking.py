"""MLflow tracking with explicit run ids (``MlflowClient``, never the thread-local fluent API).

One parent run per pipeline run, one child run per stage. A stage run is found again by its stage
key (tag ``mqgen.stage_key``), so a resumed stage re-attaches to the run it started instead of
opening a second one, and metric steps already logged are never logged twice.

Backend: ``MLFLOW_TRACKING_URI`` when set (any tracking server), else a local SQLite file
``<run.root>/mlflow.db`` with artifacts under ``<run.root>/mlartifacts`` (open it with
``mlflow ui --backend-store-uri sqlite:///<run.root>/mlflow.db``).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from infra.secrets import redact, redact_text

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only (postponed evaluation)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # model downloads: no bars on the console

TAG_STAGE = "mqgen.stage"
TAG_KEY = "mqgen.stage_key"
TAG_KIND = "mqgen.kind"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TAG_PID = "mqgen.pid"  # "<hostname>:<pid>" of the process that owns a RUNNING pipeline run


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (see :func:`sigterm_raises`): unwinds like Ctrl-C, so every open
    run ends KILLED and nothing catches it by accident as an ``Exception``."""


def exit_status(exc: BaseException | None) -> str:
    """MLflow status for a run ended by ``exc``: FINISHED, KILLED (Ctrl-C, SIGTERM, exit: any exception that is
    not an ``Exception``, such as Prefect's TerminationSignal) or FAILED."""
    if exc is None:
        return "FINISHED"
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (a scheduler's stop, ``kill``), so
    runs end KILLED instead of staying RUNNING forever. SIGKILL cannot be caught: the next start finds the
    RUNNING run (:meth:`Tracker.mark_dead_runs_killed`). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:  # Ray may install its own meanwhile: keep that one
            signal.signal(signal.SIGTERM, previous)


TAG_LEASE = "mqgen.lease"  # the owner's lease file under <run.root>/.owners (see owner_lease)
_LEASES: dict[str, tuple[int, str]] = {}  # run root -> (pid that holds it, lease file); the fd stays open


def owner_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_lease(root: str | Path) -> str | None:
    """This process's lease under ``<root>/.owners/``: a file it holds an exclusive ``flock`` on for as long as
    it lives (the kernel drops it when the process dies, however it dies). Another process tells a dead owner
    from a live one by trying that lock, whatever host name the owner had: after a container restart the
    host name changes but the lease is free. None for a remote root."""
    import fcntl
    import uuid

    if "://" in str(root):
        return None
    key = str(Path(root).resolve())
    if key not in _LEASES or _LEASES[key][0] != os.getpid():  # new, or a forked child's own
        directory = Path(key) / ".owners"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lease"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _LEASES[key] = (os.getpid(), str(path))
        atexit.register(_drop_lease, os.getpid(), str(path))
    return _LEASES[key][1]


def _drop_lease(pid: int, path: str) -> None:
    """At a normal exit (every run this process opened is closed by then): its lease file goes, so that
    ``.owners/`` does not grow with every command ever run. A killed process leaves it to the next sweep."""
    if os.getpid() == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _lease_alive(path: str) -> bool | None:
    """Whether the lease file's owner still holds it; None when the file is not here to tell."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this call took
    return False  # its owner is gone: the lease is spent (the sweep removes it once every run is seen)


def close_runs_of_dead_owners(root: str | Path, experiment: str) -> int:
    """What a pipeline start does first (:meth:`Tracker.mark_dead_runs_killed`), for a command that starts none
    (``mqgen run`` with every stage done): runs whose process was killed end KILLED. Cheap when nobody died: only
    the lease files under ``<root>/.owners`` are tried, and MLflow is opened only when one is free. Returns how
    many runs were closed."""
    owners = Path(root) / ".owners"
    if "://" in str(root) or not owners.is_dir():
        return 0
    if not any(_lease_alive(str(p)) is False for p in owners.glob("*.lease")):
        return 0
    return len(Tracker(root, experiment).mark_dead_runs_killed())


def _owner_alive(owner: str, lease: str | None = None, verdicts: dict[str, bool | None] | None = None) -> bool:
    """``verdicts`` (lease -> alive) carries one sweep's answers: an owner holds several runs (a pipeline run and
    its stage run, a grid's), and each must get the same answer."""
    if lease:
        if verdicts is not None and lease in verdicts:
            alive = verdicts[lease]
        else:
            alive = _lease_alive(lease)
            if verdicts is not None:
                verdicts[lease] = alive
        if alive is not None:
            return alive
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's process without a lease we can see: cannot tell, leave its run alone
    from infra.storage import pid_alive

    return pid_alive(int(pid))


def git_commit() -> str:
    """The commit of the mqgen source tree this process runs ("unknown" outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5, check=False)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mqgen_version() -> str:
    """The installed mqgen's version ("unknown" when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mqgen")
    except PackageNotFoundError:
        return "unknown"


def standard_tags() -> dict[str, str]:
    """MLflow's own source tags (the UI's Source and User columns): the command, its type (JOB under a Prefect
    deployment run, else LOCAL), the git commit, the user."""
    import getpass
    import sys

    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    tags = {MLFLOW_SOURCE_NAME: " ".join([argv0, *sys.argv[1:2]]) if argv0 == "mqgen" else argv0,
            MLFLOW_SOURCE_TYPE: "JOB" if os.environ.get("PREFECT__FLOW_RUN_ID") else "LOCAL",
            "mqgen.version": mqgen_version()}
    commit = git_commit()
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    with contextlib.suppress(Exception):
        tags[MLFLOW_USER] = getpass.getuser()
    return tags


WAIT_ENV = "MQGEN_TRACKING_WAIT_S"  # how long a process waits for a tracking server that does not answer
DEFAULT_WAIT_S = 180.0


class TrackingUnavailable(ConnectionError):
    """The tracking server at ``MLFLOW_TRACKING_URI`` did not answer within ``MQGEN_TRACKING_WAIT_S``."""


def wait_for_server(uri: str, wait_s: float | None = None, poll_s: float = 2.0) -> None:
    """Return as soon as the tracking server at ``uri`` (http/https) answers any HTTP request; while it does not
    (restarting, not up yet), say so on the console every 30 s; after ``wait_s`` (default ``MQGEN_TRACKING_WAIT_S``,
    180 s) raise :class:`TrackingUnavailable` naming the server, the reason and what to do. Without this a
    process would sit silently through MLflow's own request retries (about 4 minutes) and then fail with a
    stack of urllib3 messages."""
    import time

    from infra.console import fmt_duration, say

    if wait_s is None:
        try:
            wait_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
        except ValueError:
            raise ValueError(f"{WAIT_ENV}={os.environ[WAIT_ENV]!r} is not a number of seconds") from None
    shown = redact_text(uri)
    t0 = time.monotonic()
    next_say = t0
    while True:
        reason = _unanswered(uri)
        if reason is None:
            if time.monotonic() - t0 > poll_s:
                say(f"MLflow tracking server {shown} answers again after {fmt_duration(time.monotonic() - t0)}")
            return
        waited = time.monotonic() - t0
        if waited >= wait_s:
            raise TrackingUnavailable(
                f"the MLflow tracking server {shown} (MLFLOW_TRACKING_URI) did not answer for {fmt_duration(waited)} "
                f"({reason}). Start it or fix MLFLOW_TRACKING_URI (unset, runs are tracked in <run.root>/mlflow.db), "
                f"then run the same command again; {WAIT_ENV} sets how long to wait")
        if time.monotonic() >= next_say:
            say(f"waiting for the MLflow tracking server {shown} ({reason}); giving up in "
                f"{fmt_duration(wait_s - waited)} ({WAIT_ENV})")
            next_say = time.monotonic() + 30
        time.sleep(min(poll_s, max(0.0, wait_s - waited)))


def _unanswered(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` (http/https) does not answer now; None when it answers any request."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered (a server without /health, or one that wants credentials for it)
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", None) or e)
    return None


def server_answers(uri: str) -> bool:
    return _unanswered(uri) is None


def tracking_uri_for(root: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root_s = str(root)
    if "://" in root_s:
        raise ValueError(f"run.root={root_s!r} is remote: set MLFLOW_TRACKING_URI to a tracking server "
                         "(a local SQLite file cannot live in object storage)")
    path = Path(root_s).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


# Columns of MLflow's SQL store that hold artifact URIs (MLflow 3); a store without one skips it.
ARTIFACT_URI_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                        ("logged_models", "artifact_location"), ("model_versions", "source"),
                        ("model_versions", "storage_location"))


def relocate_artifacts(db: Path, artifact_location: str, root: Path) -> bool:
    """Point a run root's own MLflow store at the artifacts beside it after the root was moved or copied.

    MLflow records absolute artifact URIs (``file:///old/root/mlartifacts/...``) in the experiment, every run,
    logged model and model version; in a moved root they would name a folder that is gone (or, in a copy, the
    original's). When the experiment's location is another root's ``mlartifacts`` and this root has its own,
    those URIs are rewritten in one transaction (the caller holds the store's lock). Returns True if it did."""
    import logging
    import sqlite3
    from urllib.parse import unquote, urlparse

    here = (root / "mlartifacts").as_uri()
    if not artifact_location.startswith("file://") or artifact_location == here:
        return False
    old_dir = Path(unquote(urlparse(artifact_location).path))
    if old_dir.name != "mlartifacts" or not (root / "mlartifacts").is_dir() or old_dir == root / "mlartifacts":
        return False
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        for table, column in ARTIFACT_URI_COLUMNS:
            if table in tables:
                # names from the fixed list above; values bound
                con.execute(f"update {table} set {column} = ? || substr({column}, ?) "
                            f"where {column} = ? or substr({column}, 1, ?) = ?",
                            (here, len(artifact_location) + 1, artifact_location, len(artifact_location) + 1,
                             artifact_location + "/"))
    logging.getLogger("mqgen.tracking").warning(
        "this run root was moved or copied from %s: its MLflow store now points at the artifacts in %s",
        old_dir.parent, root / "mlartifacts")
    return True


_WARNED_NETWORK_DBS: set[str] = set()


def _warn_sqlite_on_network_fs(db: Path) -> None:
    """Say once per process when the MLflow SQLite store lies on a network file system: SQLite's locks are not
    reliable there, so processes on several nodes writing it (a grid on a cluster, a scheduled run beside a manual
    one on another host) can corrupt it. A single node is fine; a tracking server is the fix."""
    from infra.tokens import network_filesystem

    remote = network_filesystem(db.parent)
    if remote is None or str(db) in _WARNED_NETWORK_DBS:
        return
    _WARNED_NETWORK_DBS.add(str(db))
    from infra.console import say

    say(f"warning: the MLflow store {db} is a SQLite file on a {remote[0]} file system (mount point {remote[1]}); "
        "SQLite's locks are not safe there for processes on several nodes: for a cluster, set MLFLOW_TRACKING_URI "
        "to a tracking server (`mlflow server`)")


class Tracker:
    """Entry point: one experiment on one backend."""

    def __init__(self, root: str | Path, experiment: str = "mqgen", tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or tracking_uri_for(root)
        self.root = None if "://" in str(root) else str(root)
        if self.uri.startswith("sqlite:///"):
            # Two processes on a fresh root would create and migrate the same SQLite file at once (alembic:
            # "Online migration expected to match one row"); the first access happens under a lock beside it.
            from infra.storage import file_lock

            db = Path(self.uri[len("sqlite:///"):])
            _warn_sqlite_on_network_fs(db)
            with file_lock(db.parent / f".{db.name}.lock", what="the MLflow database"):
                self.client = MlflowClient(tracking_uri=self.uri)
                exp = self.client.get_experiment_by_name(experiment)
                if exp is not None and self.root is not None and relocate_artifacts(db, exp.artifact_location,
                                                                                  Path(root).resolve()):
                    exp = self.client.get_experiment_by_name(experiment)
        else:
            if self.uri.startswith(("http://", "https://")):
                wait_for_server(self.uri)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///") and "://" not in str(root):
                artifact_location = (Path(root).resolve() / "mlartifacts").as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # created concurrently by another process: read it back
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
            # MLflow 3's UI opens an experiment without this tag on its GenAI traces page; a training experiment
            # opens on its runs table
            with contextlib.suppress(Exception):
                self.client.set_experiment_tag(self.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)

    def _owner_tags(self) -> dict[str, str]:
        """Who owns a run this process opens: ``host:pid`` and, for a local root, its lease file."""
        lease = owner_lease(self.root) if self.root is not None else None
        return {TAG_PID: owner_tag(), **({TAG_LEASE: lease} if lease else {})}

    def find_run(self, tags: Mapping[str, str]) -> str | None:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def mark_dead_runs_killed(self) -> dict[str, dict[str, str]]:
        """Runs (pipeline, grid and stage runs) left RUNNING by a process that no longer exists (SIGKILL, power
        loss, a container restart) end KILLED: its lease is free (:func:`owner_lease`), or, without a lease, it
        was a process of this host that is gone. Returns their ids and tags. A stage run found here is
        re-attached (RUNNING again) by the next attempt of its stage key."""
        dead: dict[str, dict[str, str]] = {}
        verdicts: dict[str, bool | None] = {}
        for run in self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           max_results=1000):
            owner = run.data.tags.get(TAG_PID)
            if owner and not _owner_alive(owner, run.data.tags.get(TAG_LEASE), verdicts):
                self.client.set_tag(run.info.run_id, "mqgen.ended_by", "owner process gone")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                dead[run.info.run_id] = dict(run.data.tags)
        for lease, alive in verdicts.items():
            if alive is False:
                with contextlib.suppress(OSError):
                    os.unlink(lease)  # spent: every run it guarded is closed
        return dead

    def pipeline_run(self, config_hash: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                     kind: str = "pipeline", name: str | None = None) -> StageRun:
        """A new parent run for one pipeline execution (stage runs attach to it as children). A grid makes one
        with ``kind="grid"`` and one ``kind="pipeline"`` run per variant under it (``parent_run_id``)."""
        all_tags = {TAG_KIND: kind, "mqgen.config_hash": config_hash, **standard_tags(), **self._owner_tags(),
                    **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name or f"{kind}-{config_hash}",
                                     tags={k: redact_text(str(v)) for k, v in all_tags.items()})
        sr = StageRun(self.client, run.info.run_id)
        if params:
            sr.log_params(params)
        return sr

    def stage_run(self, stage: str, stage_key: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                  run_id: str | None = None) -> StageRun:
        """Open (or re-attach to) the run of ``stage`` for ``stage_key``; with ``run_id`` (a training worker
        attaching to its driver's run) the run's owner stays the driver."""
        owner = self._owner_tags() if run_id is None else {}
        if run_id is None:
            run_id = self.find_run({TAG_STAGE: stage, TAG_KEY: stage_key})
        all_tags = {TAG_STAGE: stage, TAG_KEY: stage_key, TAG_KIND: "stage", **standard_tags(), **owner,
                    **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=f"{stage}-{stage_key}",
                                         tags={k: redact_text(str(v)) for k, v in all_tags.items()})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            for k, v in all_tags.items():
                self.client.set_tag(run_id, k, redact_text(str(v)))
        sr = StageRun(self.client, run_id)
        if params:
            sr.log_params(params)
        return sr


class _MetricSender:
    """Sends metric batches, tags and artifacts to a tracking *server* from a background thread, so that training
    never waits on MLflow: while the server is unreachable they wait here (at most :attr:`MAX_PENDING` points and
    :attr:`MAX_CALLS` other records, the oldest dropped beyond and counted) and are back-filled when it answers
    again. The gap is logged and recorded on the run as tags (``mqgen.mlflow_gap_s``, ``mqgen.mlflow_backfilled``,
    ``mqgen.mlflow_lost``)."""

    RETRY_S = 2.0
    MAX_PENDING = 500_000
    MAX_CALLS = 10_000
    CHUNK = 1000  # MLflow's log_batch limit for metrics

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: list[Any] = []
        self.calls: list[Callable[[], None]] = []  # tags, artifacts, dataset inputs: sent in order
        self.cond = threading.Condition()
        self.sending = 0
        self.down_since: float | None = None
        self.gap_s = 0.0
        self.backfilled = 0
        self.lost = 0
        self.thread = threading.Thread(target=self._loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self.thread.start()

    def put(self, batch: list[Any]) -> None:
        with self.cond:
            self.pending.extend(batch)
            overflow = len(self.pending) - self.MAX_PENDING
            if overflow > 0:
                del self.pending[:overflow]
                self.lost += overflow
            self.cond.notify_all()

    def call(self, fn: Callable[[], None]) -> None:
        with self.cond:
            self.calls.append(fn)
            if len(self.calls) > self.MAX_CALLS:
                del self.calls[0]
                self.lost += 1
            self.cond.notify_all()

    def _loop(self) -> None:
        import logging
        import time

        log = logging.getLogger("mqgen.tracking")
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.pending or self.calls))
                fn = self.calls[0] if self.calls else None
                batch = [] if fn is not None else self.pending[:self.CHUNK]
                self.sending = len(batch) or 1
            try:
                if fn is not None:
                    fn()
                else:
                    self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - unreachable (or refusing): keep the points, try again
                with self.cond:
                    self.sending = 0
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("MLflow is unreachable (%s: %s); training goes on and its metrics are sent when it "
                                "answers again", type(e).__name__, str(e)[:200])
                time.sleep(self.RETRY_S)
                continue
            with self.cond:
                if fn is not None:
                    self.calls.pop(0)
                del self.pending[:len(batch)]
                self.sending = 0
                if self.down_since is not None:
                    self.backfilled += len(batch) or 1
                    if not self.pending and not self.calls:
                        gap = time.monotonic() - self.down_since
                        self.gap_s += gap
                        self.down_since = None
                        log.warning("MLflow answers again after %.0f s: %d metric points back-filled%s", gap,
                                    self.backfilled, f", {self.lost} lost" if self.lost else "")
                self.cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every point is sent (True) or ``timeout`` seconds passed (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.pending and not self.calls and not self.sending,
                                      timeout=timeout)


class StageRun:
    """A handle on one MLflow run. Use as a context manager: FAILED on exception, FINISHED otherwise.

    With a tracking server (``MLFLOW_TRACKING_URI=http...``) metrics go through a background sender that rides
    out the server's outages (:class:`_MetricSender`); with the local SQLite store they are written at once."""

    FLUSH_TIMEOUT_S = 120.0

    def __init__(self, client: Any, run_id: str, step_offset: int = 0):
        self.client = client
        self.run_id = run_id
        self.step_offset = step_offset  # added to every logged step (a forced rerun's attempt follows the last)
        self._last_step: dict[str, int] = {}
        self._remote = str(getattr(client, "tracking_uri", "") or "").startswith(("http://", "https://"))
        self._sender: _MetricSender | None = None  # started by the first metrics sent to a tracking server

    def flush(self) -> None:
        """Send every metric point still waiting (a training loop calls this before it returns); says what could
        not be sent and records the outage on the run."""
        import logging

        s = self._sender
        if s is None:
            return
        sent = s.flush(self.FLUSH_TIMEOUT_S)
        if not sent:
            logging.getLogger("mqgen.tracking").warning(
                "MLflow run %s: %d metric points and %d tags/artifacts could not be sent (the server did not answer "
                "for %.0f s)", self.run_id, len(s.pending), len(s.calls), self.FLUSH_TIMEOUT_S)
        if s.gap_s or s.backfilled or s.lost or not sent:
            tags = {"mqgen.mlflow_gap_s": round(s.gap_s, 1), "mqgen.mlflow_backfilled": s.backfilled,
                    "mqgen.mlflow_lost": s.lost + (0 if sent else len(s.pending) + len(s.calls))}
            with contextlib.suppress(Exception):
                for k, v in tags.items():
                    self.client.set_tag(self.run_id, k, str(v))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish(exit_status(exc if exc is not None else (exc_type() if exc_type else None)))

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            if not self._remote:
                raise
            import logging  # the work is done; the next pipeline start closes the run (KILLED, owner gone)

            logging.getLogger("mqgen.tracking").warning("MLflow run %s could not be marked %s (%s: %s)", self.run_id,
                                                        status, type(e).__name__, str(e)[:200])

    def _send(self, fn: Callable[[], None]) -> None:
        """``fn()`` now (local store), or through the background sender (a tracking server: never blocks, rides
        out an outage)."""
        if not self._remote:
            fn()
            return
        if self._sender is None:
            self._sender = _MetricSender(self.client, self.run_id)
        self._sender.call(fn)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; a param already logged with the same value is skipped (resume-safe)."""
        existing = self.client.get_run(self.run_id).data.params
        for k, v in flatten(params).items():
            sv = redact_text(str(v))[:6000]
            if k in existing:
                if existing[k] != sv:
                    raise ValueError(f"MLflow run {self.run_id}: param {k} was {existing[k]!r}, now {sv!r}; "
                                     "a stage key must not change its params")
                continue
            self.client.log_param(self.run_id, k, sv)

    def last_step(self, key: str) -> int:
        if key not in self._last_step:
            try:
                hist = self.client.get_metric_history(self.run_id, key)
            except Exception:  # a server outage: nothing known to skip (the sender keeps the points)
                if not self._remote:
                    raise
                hist = []
            self._last_step[key] = max((m.step for m in hist), default=-1)
        return self._last_step[key]

    def max_logged_step(self) -> int:
        """The largest step of any metric in the run (-1 when none)."""
        keys = self.client.get_run(self.run_id).data.metrics.keys()
        return max((self.last_step(k) for k in keys), default=-1)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log metrics at ``step`` (+ :attr:`step_offset`); a (key, step) at or before the last logged step of
        that key is dropped (a resumed stage replays steps after its checkpoint)."""
        import time

        from mlflow.entities import Metric

        step += self.step_offset
        now = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            if step <= self.last_step(k):
                continue
            batch.append(Metric(k, float(v), now, step))
            self._last_step[k] = step
        if batch and self._remote:
            if self._sender is None:
                self._sender = _MetricSender(self.client, self.run_id)
            self._sender.put(batch)
        elif batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        clean = {k: redact_text(str(v)) for k, v in tags.items()}

        def send() -> None:
            for k, v in clean.items():
                self.client.set_tag(self.run_id, k, v)

        self._send(send)

    def log_dataset(self, name: str, digest: str, location: str | Path, context: str, **extra: Any) -> None:
        """Record a dataset this run read (the UI's Datasets column): its name, a content digest, where it is, and
        ``context`` (``training``, ``evaluation``, ``reference``...); ``extra`` goes into its profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        src = str(location)
        ds = Dataset(name=name, digest=digest[:36], source_type="local" if "://" not in src else src.split("://")[0],
                     source=json.dumps({"uri": redact_text(src)}), profile=json.dumps(extra, default=str) if extra
                     else None)
        self.log_inputs([DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_inputs(self, inputs: list[Any]) -> None:
        """Record MLflow ``DatasetInput`` entries (as read from another run's ``inputs.dataset_inputs``)."""
        if inputs:
            self._send(lambda: self.client.log_inputs(self.run_id, datasets=list(inputs)))

    def log_model_outputs(self, steps_by_model_id: Mapping[str, int]) -> None:
        """List logged models as outputs of this run (the runs table's Models column)."""
        from mlflow.entities import LoggedModelOutput

        outputs = [LoggedModelOutput(model_id, int(step)) for model_id, step in steps_by_model_id.items()]
        if outputs:
            self._send(lambda: self.client.log_outputs(self.run_id, outputs))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._remote:  # sent later: a copy of the bytes now (the file may change or go meanwhile)
            p = Path(path)
            if p.is_file():
                self._log_bytes(p.read_bytes(), f"{artifact_path}/{p.name}" if artifact_path else p.name)
                return
        self._send(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, name: str) -> None:
        self._log_bytes(redact_text(text).encode(), name)

    def log_dict(self, obj: Any, name: str) -> None:
        self._log_bytes(json.dumps(redact(obj), indent=2, sort_keys=True, default=str).encode(), name)

    def log_image(self, image: Any, name: str) -> None:
        """Log a PIL image or an HxW / HxWxC uint8 array as PNG."""
        import numpy as np
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self._log_bytes(buf.getvalue(), name)

    def _log_bytes(self, data: bytes, name: str) -> None:
        parent, base = os.path.split(name)

        def send() -> None:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / base
                p.write_bytes(data)
                self.client.log_artifact(self.run_id, str(p), parent or None)

        self._send(send)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def open_training_attempt(tracker: Tracker, stage: str, key: str, out_dir: Path, *, force: bool, done: bool,
                          success_name: str, params: Mapping[str, Any], tags: Mapping[str, Any],
                          parent_run_id: str | None) -> tuple[StageRun, str, int]:
    """Start (or resume) a training stage's attempt: its stage run, its Ray run name and its metric step offset.

    ``<out_dir>/attempt.json`` holds the attempt number and offset. A plain rerun resumes the same attempt (same
    Ray run name: Ray Train restores its latest checkpoint; same offset). ``force`` over a finished output starts
    attempt N+1, which trains from scratch under a new Ray run name and logs its steps after every step already
    in the stage's MLflow run (one run per stage key), so its curves are not dropped as duplicates.
    """
    from infra.storage import atomic_write_json, read_json

    out_dir.mkdir(parents=True, exist_ok=True)
    attempt_file = out_dir / "attempt.json"
    state = read_json(attempt_file) if attempt_file.is_file() else {"attempt": 0}
    if force and done:
        state = {"attempt": int(state["attempt"]) + 1}
        (out_dir / success_name).unlink(missing_ok=True)
    atomic_write_json(attempt_file, state)  # before the run exists: a crash from here on resumes this attempt
    ray_name = f"{stage}-{key}-a{state['attempt']}"
    srun = tracker.stage_run(stage, key, params=params, tags={**tags, "mqgen.ray_run": ray_name,
                                                              "mqgen.attempt": str(state["attempt"])},
                             parent_run_id=parent_run_id)
    if "step_offset" not in state:
        state["step_offset"] = srun.max_logged_step() + 1 if state["attempt"] > 0 else 0
        atomic_write_json(attempt_file, state)
    srun.step_offset = int(state["step_offset"])
    return srun, ray_name, srun.step_offset
