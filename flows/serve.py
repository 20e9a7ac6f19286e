"""Scheduled retraining: the pipeline flow served as a Prefect deployment on a cron schedule.

Wiring only. :func:`serve_pipeline` turns a resolved config and a cron expression into a deployment of
:func:`flows.pipeline.pipeline_flow` (parameters: the config dict, plus ``from_stage`` when given) and serves
it: this process polls the Prefect API and executes each scheduled run in a subprocess, until Ctrl-C or
SIGTERM, which stop it cleanly (an in-flight run is cancelled; the schedule is paused until served again).

A scheduled run is an ordinary pipeline run: every stage whose key is unchanged (same config section, same
upstream outputs, same stage code version) is a cache hit, so a nightly run of an unchanged config costs
seconds, and a new stage code version or an edited deployment parameter reruns only what depends on it.
``from_stage`` forces that stage and every later one on each run (``ingest`` re-reads the data source).

Schedules need a Prefect server with its scheduler running; Prefect's temporary (ephemeral) API never
creates scheduled runs. When ``PREFECT_API_URL`` is not set, :func:`local_server` starts
``prefect server start`` for the duration of the serve, its database under ``PREFECT_HOME`` (the run root's
``.prefect`` folder, shared with ``mqgen run``). Prefect reads its settings once, at import: set the
environment (``PREFECT_HOME``, ``PREFECT_API_URL``) before calling anything here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.config import PipelineConfig
from infra.orchestration import die_with_parent

DEFAULT_PORT = 4200
FLOW_NAME = "mqgen-pipeline"


class ScheduleError(ValueError):
    """A cron expression or timezone that Prefect would refuse."""


class ServerError(RuntimeError):
    """The local Prefect server did not start."""


def deployment_name(cfg: PipelineConfig) -> str:
    """Default deployment name: preset and config hash, so each config gets its own deployment."""
    return f"mqgen-{cfg.preset}-{cfg.hash()}"


def cron_schedule(cron: str, timezone: str | None = None) -> Any:
    """Prefect's ``CronSchedule`` (five fields: minute hour day-of-month month day-of-week; default UTC).
    Raises :class:`ScheduleError` naming the bad expression or timezone."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        bad = {str(err["loc"][0]) if err.get("loc") else "cron" for err in e.errors()}
        reasons = "; ".join(str(err.get("msg", "")).removeprefix("Value error, ") for err in e.errors())
        hint = (" A cron expression has five fields (minute hour day-of-month month day-of-week), e.g. "
                "'0 3 * * *' = every day at 03:00." if "cron" in bad else "")
        what = f"--cron {cron!r}" if "cron" in bad else f"--timezone {timezone!r}"
        raise ScheduleError(f"invalid schedule {what}: {reasons}.{hint}") from None


def free_port(preferred: int = DEFAULT_PORT) -> int:
    """``preferred`` when nothing listens on it on 127.0.0.1, else a free port chosen by the system."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ServerError("no free TCP port on 127.0.0.1")


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def reachable(api_url: str) -> bool:
    """Whether anything answers HTTP at ``api_url`` (an error status counts: Prefect Cloud wants a key)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=10):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def local_server(api_url: str, home: Path, timeout_s: float = 300.0) -> Iterator[subprocess.Popen]:
    """``prefect server start`` (API, UI and services, scheduler included) on ``api_url``'s port, logging to
    ``home/server.log``; yields once its health check answers, stops it (SIGTERM, then SIGKILL) on exit.
    It runs in its own session so that a Ctrl-C reaches this process first, which still needs the API to
    pause its schedule."""
    from urllib.parse import urlparse

    from infra.storage import file_lock

    port = urlparse(api_url).port
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    # the lock `mqgen run` takes around its own server's start (infra.orchestration.start_local_api): a run and
    # a serve started together on a fresh root would both create and migrate <run.root>/.prefect/prefect.db
    with file_lock(home / ".mqgen-start.lock", what="Prefect's local database"), open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PREFECT_HOME": str(home)}, start_new_session=True,
                                preexec_fn=die_with_parent)  # noqa: PLW1509 - one prctl call: SIGTERM if we are killed
        try:
            _wait_healthy(proc, api_url, log_path, timeout_s)
        except BaseException:
            stop(proc)
            raise
    try:
        yield proc
    finally:
        stop(proc)


def _wait_healthy(proc: subprocess.Popen, api_url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _healthy(api_url):
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerError(f"`prefect server start` exited with code {proc.returncode}; "
                              f"its log ({log_path}) ends with:\n{tail}")
        if time.monotonic() > deadline:
            raise ServerError(f"the Prefect server on {api_url} was not healthy after {timeout_s:.0f} s; "
                              f"see {log_path}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM ``proc``, then SIGKILL it if it has not exited after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build_deployment(cfg: PipelineConfig, cron: str, *, timezone: str | None = None, name: str | None = None,
                     from_stage: str | None = None, gc_keep_days: float | None = None) -> Any:
    """The ``RunnerDeployment`` of ``pipeline_flow`` for this config on this cron schedule. Its entrypoint is
    the module path ``flows.pipeline.pipeline_flow``, so scheduled runs import the installed package
    whatever the working directory."""
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import pipeline_flow
    from infra.config import ConfigError
    from infra.secrets import has_secret

    if has_secret(cfg.to_dict()):
        raise ConfigError("the config holds a credential in a URL (data.path or run.root: user:password@ or a "
                          "signed query string); a deployment stores its parameters on the Prefect server, so "
                          "give the credentials through the environment of the worker instead (AWS_* variables, "
                          "GOOGLE_APPLICATION_CREDENTIALS, an fsspec config file)")
    parameters: dict[str, Any] = {"config": cfg.to_dict()}
    if from_stage:
        parameters["from_stage"] = from_stage
    if gc_keep_days is not None:
        parameters["gc_keep_days"] = gc_keep_days
    return pipeline_flow.to_deployment(
        name=name or deployment_name(cfg), schedules=[cron_schedule(cron, timezone)], parameters=parameters,
        paused=False, entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["mqgen", f"preset:{cfg.preset}", f"config:{cfg.hash()}"],
        description=f"mqgen pipeline, preset {cfg.preset}, config {cfg.hash()}, run root {cfg.run.root}; "
                    f"cron {cron!r} ({timezone or 'UTC'})" + (f", forced from {from_stage}" if from_stage else "")
                    + (f", then gc keeping {gc_keep_days:g} days" if gc_keep_days is not None else ""))


def serve_pipeline(cfg: PipelineConfig, cron: str, *, timezone: str | None = None, name: str | None = None,
                   from_stage: str | None = None, gc_keep_days: float | None = None) -> None:
    """Create/update the deployment and serve it until Ctrl-C or SIGTERM (blocks). One run at a time: a run
    still going when the next one is due makes that one wait. Needs ``PREFECT_API_URL`` to point at a
    server with its scheduler (see :func:`local_server`)."""
    from prefect import serve

    deployment = build_deployment(cfg, cron, timezone=timezone, name=name, from_stage=from_stage,
                                  gc_keep_days=gc_keep_days)
    serve(deployment, limit=1, pause_on_shutdown=True, print_starting_message=False)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` (so cleanup runs) until Prefect's runner installs its own
    graceful handler; the previous handler is restored on exit."""

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ui_url() -> str | None:
    """The Prefect UI for the current ``PREFECT_API_URL`` (None when Prefect cannot tell)."""
    from prefect.settings import PREFECT_UI_URL

    return PREFECT_UI_URL.value()
