"""The only module that imports Ray: cluster connection, Ray Train launch, and the in-worker helpers.

Driver side: :func:`init_ray` connects to ``RAY_ADDRESS`` (a real cluster) or starts a local instance
sized to the machine; :func:`fit` runs a ``TorchTrainer`` whose ``RunConfig.name`` is the stage key and
whose ``storage_path`` is under the run root, so rerunning a crashed stage restores from its latest
checkpoint instead of starting over.

Worker side (inside ``train_loop_per_worker``): :func:`worker` returns a :class:`Worker` with the rank,
device, DDP wrapping, the collectives injected into the codebook, verified checkpoint restore and
reporting. Before the loop starts, every worker checks that it sees the run's storage as the launching node
wrote it (:func:`check_shared_storage`): on a cluster, ``run.root`` must be shared by all nodes or a URL.

Tasks: :func:`map_tasks` runs a function over work items as plain Ray tasks (one item per task, resources
per task, bounded in-flight window) and yields results as they arrive, for stages that are embarrassingly
parallel (tokenize: one input shard per task).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import ray
import ray.train
import torch

from infra.checkpoint import MANIFEST, LoadedCheckpoint, read_checkpoint
from infra.errors import PermanentError, is_permanent
from infra.storage import UnsafeCheckpointError, process_temp_dir

if TYPE_CHECKING:
    from infra.tracking import StageRun

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- driver


_INIT_LOCK = threading.Lock()


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start (once) a local Ray sized to this machine."""
    with _INIT_LOCK:
        _init_ray(num_cpus)


def _init_ray(num_cpus: int | None) -> None:
    if ray.is_initialized():
        return
    # Workers' output stays in Ray's session logs (the console gets one progress line per stage, drawn from
    # the progress files the workers write); Ray's driver-side logging goes to the Python log (the log file).
    from infra.console import adopt_library_loggers

    adopt_library_loggers()
    quiet = {"log_to_driver": os.environ.get("MQGEN_RAY_LOG_TO_DRIVER", "0") == "1", "configure_logging": False}
    if quiet["log_to_driver"] is False:
        route_raylet_messages()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        return
    cpus = num_cpus or os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024 * 1024, **quiet)


RAYLET_LOGGER = "ray.raylet_messages"
# Ray's memory monitor ("... killed due to the node running low on memory", OutOfMemoryError). Not a bare "oom":
# every killed worker's message lists "the OOM killer" among the common causes, and words such as "room" hold it.
_MEMORY_KILL = re.compile(r"out of memory|outofmemoryerror|running low on memory", re.IGNORECASE)


def is_memory_kill(text: str) -> bool:
    """Whether a raylet message says a worker was killed for memory (an error the user must see)."""
    return _MEMORY_KILL.search(text) is not None


def route_raylet_messages() -> None:
    """Send the messages the raylet pushes to the driver to the Python log instead of stdout.

    Ray's driver prints them itself (a background thread, whatever ``log_to_driver`` says): "N PYTHON worker
    processes have been started ... Nx the maximum expected startup concurrency" lines arrive in the middle of
    a grid's progress lines. They go to logger :data:`RAYLET_LOGGER` at WARNING (the log file; the console with
    ``--verbose``), except a worker killed for memory, which is an ERROR and stays on the console. Idempotent.
    """
    import ray._private.worker as ray_worker  # the function its listener thread looks up on every message

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "_mqgen_routed", False):
        return
    raylog = logging.getLogger(RAYLET_LOGGER)

    def routed(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for line in data.get("lines") or []:
            text = str(line).strip()
            raylog.log(logging.ERROR if is_memory_kill(text) else logging.WARNING, "%s", text)

    routed._mqgen_routed = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = routed


def train_worker_cpus(requested: int | None, num_workers: int) -> int:
    """CPUs for each Ray Train worker: ``requested``, else (automatic) the local machine's CPUs shared by the
    workers (Ray then gives each worker as many torch threads), or 1 on a cluster (``RAY_ADDRESS``)."""
    if requested:
        return requested
    if os.environ.get("RAY_ADDRESS"):
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


@dataclass(frozen=True)
class FitResult:
    metrics: dict[str, Any]
    checkpoint_path: str | None
    error: str | None
    final: Any = None  # the checkpoint at checkpoint_path, already loaded and verified (local storage)


def fit(train_fn: Callable[[dict], None], loop_config: dict[str, Any], *, name: str, storage_path: str,
        num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: int | None = None, max_failures: int = 0,
        num_to_keep: int = 2) -> FitResult:
    """Run ``train_fn`` on ``num_workers`` Ray Train workers (torch DDP: gloo on CPU, nccl on GPU).

    ``name`` must be deterministic (the stage key): the same name and storage path resume the run. A worker
    failure restarts the worker group from its latest checkpoint up to ``max_failures`` times, except a
    permanent one (:func:`infra.errors.is_permanent`: a missing input, a config error, a refused checkpoint),
    which would fail the same way again: that error is raised at once, as the worker raised it, with the
    workers' tracebacks attached as a note. A failure left after the restarts raises
    :class:`TrainingFailed`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray()
    storage = storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    resources = {"CPU": train_worker_cpus(cpus_per_worker, num_workers)}
    run_dir = f"{storage.rstrip('/')}/{name}"
    shared = (storage, storage_id(storage), _node_description())

    def entry(config: dict[str, Any]) -> None:  # tells Worker.restore where the run's checkpoints are stored
        import infra.ray as this  # noqa: PLW0406 - this function travels by value: set the worker's module, not a copy

        this.check_shared_storage(*config[_SHARED_KEY])
        this._RUN_DIR = config[_RUN_DIR_KEY]
        train_fn({k: v for k, v in config.items() if k not in (_RUN_DIR_KEY, _SHARED_KEY)})

    attempt = 0
    while True:
        # Ray's own restarts are off: this loop restarts, so that a permanent error is never repeated.
        trainer = TorchTrainer(
            entry,
            train_loop_config={**loop_config, _RUN_DIR_KEY: run_dir, _SHARED_KEY: shared},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=0),
                                 checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep)),
        )
        try:
            result = _fit_interruptibly(trainer, name)
        except ray.train.TrainingFailedError as e:
            cause = _worker_cause(e)
            if cause is not None and is_permanent(cause):
                cause.add_note(f"Ray Train run {name!r} (storage {storage}); worker tracebacks:\n{e}")
                raise cause from None
            if attempt >= max_failures:
                failed = TrainingFailed(f"training run {name!r} failed after {attempt} restart(s) "
                                        f"(ray.max_failures={max_failures}): {_first_line(cause or e)}")
                failed.add_note(f"worker tracebacks:\n{e}")  # in the log file's traceback, not the console line
                raise failed from e
            attempt += 1
            log.warning("training run %s failed (%s); restarting from its latest checkpoint (%d/%d)", name,
                        _first_line(cause or e), attempt, max_failures)
            continue
        if result.error is not None:
            raise TrainingFailed(f"training run {name!r} failed: {result.error}")
        final = _newest_stored_checkpoint(run_dir)
        if final is not None:
            return FitResult(metrics=dict(final.meta.get("metrics") or result.metrics or {}),
                             checkpoint_path=final.path, error=None, final=final)
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
        return FitResult(metrics=dict(result.metrics or {}), checkpoint_path=ckpt, error=None)


def _fit_interruptibly(trainer: Any, name: str) -> Any:
    """``trainer.fit()`` where Ctrl-C (SIGINT) stops the run as an interruption, not as an exit.

    Ray Train's own SIGINT handler aborts the controller and may ``sys.exit(0)`` (a ``SystemExit`` no caller
    expects: `mqgen run` then exited 1 and Prefect marked the run Crashed), or lets ``fit`` return the aborted run
    as if it had finished; and it stays installed after ``fit``. Here the first SIGINT aborts the run the same
    graceful way and ``fit`` raises ``KeyboardInterrupt`` (exit 130, the stage run KILLED, the same command
    resumes from the checkpoints); a second one raises at once. The previous handler is restored afterwards."""
    import signal

    interrupted: list[int] = []

    def register(controller: Any) -> None:  # replaces TorchTrainer._register_sigint_handler for this trainer
        def on_sigint(signum: int, frame: Any) -> None:
            interrupted.append(signum)
            if len(interrupted) > 1:
                raise KeyboardInterrupt
            log.warning("interrupted: stopping training run %s (its checkpoints stay; the same command resumes)",
                        name)
            try:
                ray.get(controller.abort.remote())
            except Exception as e:  # noqa: BLE001 - the controller is gone already: nothing left to abort
                log.debug("aborting training run %s: %s", name, e)

        signal.signal(signal.SIGINT, on_sigint)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    if not hasattr(trainer, "_register_sigint_handler"):  # (a Ray release without the hook: its own handler runs)
        log.warning("this Ray release has no TorchTrainer._register_sigint_handler: Ctrl-C during training is "
                    "handled by Ray, which may stop the process (mqgen is tested with Ray 2.60)")
    trainer._register_sigint_handler = register
    try:
        result = trainer.fit()
    except BaseException:  # SystemExit from Ray's handler, or the aborted run's TrainingFailedError: not a restart
        if interrupted or sys.exc_info()[0] is SystemExit:
            raise KeyboardInterrupt(f"training run {name} interrupted") from None
        raise
    finally:
        if main and previous is not None:  # (None: a handler set outside Python, which cannot be restored)
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt(f"training run {name} interrupted")
    return result


def _newest_stored_checkpoint(run_dir: str) -> Any:
    """The newest checkpoint in a local run folder that verifies (the final one of a finished run), or None.

    Ray's result names the last checkpoint *it registered*; a run killed after storing a checkpoint but before
    Ray recorded it resumes from that stored one (:meth:`Worker.restore`) and, when it was the last step,
    reports nothing new, so Ray's result would name an older, possibly damaged, checkpoint."""
    from infra.checkpoint import latest_valid

    if "://" in run_dir or not Path(run_dir).is_dir():
        return None
    loaded, _ = latest_valid(sorted(Path(run_dir).glob("checkpoint_*")))
    return loaded


class TrainingFailed(RuntimeError):
    """Ray Train failed for a reason worth a retry, and the restarts allowed were spent."""


def _worker_cause(e: BaseException) -> BaseException | None:
    """The exception a training worker raised (rank 0's first), or None for a controller failure."""
    failures = getattr(e, "worker_failures", None) or {}
    for rank in sorted(failures):
        exc = failures[rank]
        cause = getattr(exc, "cause", None)  # a RayTaskError wraps the user's exception
        return cause if isinstance(cause, BaseException) else exc
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------------------------- worker


_RUN_DIR_KEY = "__mqgen_run_dir__"
_RUN_DIR: str | None = None  # in a training worker: <storage>/<run name>, where the run's checkpoints are
_SHARED_KEY = "__mqgen_shared_storage__"  # (storage path, its id, the launching node) for check_shared_storage
STORAGE_ID_FILE = ".mqgen-storage-id"


class StorageNotShared(PermanentError):
    """A Ray Train worker's node does not see the run root the driver writes to (another machine's local
    path), or cannot write there. Never retried: it fails the same way on that node every time."""


def storage_id(storage: str) -> str | None:
    """Driver side: the random id kept in ``<storage>/.mqgen-storage-id`` (created on first use; the first
    writer wins, so concurrent launches agree), which the workers read back; None for a URL."""
    if "://" in storage:
        return None
    path = Path(storage) / STORAGE_ID_FILE
    if not path.is_file():
        tmp = path.with_name(f"{STORAGE_ID_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(uuid.uuid4().hex + "\n")
        try:
            os.link(tmp, path)  # atomic and never replaces: an id a worker may already hold stays valid
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def check_shared_storage(storage: str, expected_id: str | None, launcher: str = "the driver") -> None:
    """Worker side, before the training loop: the run's storage path must be the one the launching node
    wrote to (same id file) and writable from this node, else :class:`StorageNotShared` naming this node and
    the path. A worker on another machine would otherwise write its checkpoints to a local directory nobody
    else reads (or fail later on an obscure I/O error). URLs are left to Ray's storage layer."""
    if expected_id is None or "://" in storage:
        return
    hint = ("run.root must be a path shared by every node of the Ray cluster, mounted at the same path "
            "(NFS or another shared file system), or a URL (s3://..., gs://...)")
    node = _node_description()
    marker = Path(storage) / STORAGE_ID_FILE
    try:
        seen: str | None = marker.read_text().strip()
    except OSError:
        seen = None
    if seen != expected_id:
        what = ("does not exist there" if not Path(storage).exists() else
                f"is another directory there ({marker.name} is missing or differs from the one {launcher} wrote)")
        raise StorageNotShared(f"Ray Train worker on node {node}: the run's storage path {storage} {what}; "
                               f"{hint}. The run was launched from {launcher}.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mqgen-write-check-", dir=storage)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StorageNotShared(f"Ray Train worker on node {node}: cannot write to the run's storage path "
                               f"{storage} ({e}); {hint}.") from None


def _node_description() -> str:
    """``hostname (ip, Ray node id prefix)`` of this process's node, for error messages."""
    host = socket.gethostname()
    try:
        ip = ray.util.get_node_ip_address()
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - a description only: never fail on it
        return host
    return f"{host} ({ip}" + (f", Ray node {node_id[:12]})" if node_id else ")")


class Worker:
    """What a training loop needs from its Ray Train worker; create with :func:`worker`."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.is_main = self.rank == 0
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        self.skipped_checkpoints: list[str] = []

    def stage_run(self, cfg: Any, stage: str, lc: Any, restored: LoadedCheckpoint | None) -> StageRun | None:
        """Rank 0: the stage's MLflow run that the driver opened (``lc.mlflow_run_id``, ``lc.key``, metric steps
        shifted by ``lc.metric_step_offset``), tagged with the step it resumed from and the checkpoints skipped on
        the way; None on the other ranks."""
        if not self.is_main:
            return None
        from infra.tracking import StageRun, Tracker

        if lc.tracking_uri.startswith(("http://", "https://")):  # a server: attach without asking it anything, so
            from mlflow.tracking import MlflowClient  # a worker (re)started during an outage still trains

            run = StageRun(MlflowClient(tracking_uri=lc.tracking_uri), lc.mlflow_run_id)
        else:
            run = Tracker(cfg.run.root, cfg.run.experiment, tracking_uri=lc.tracking_uri).stage_run(
                stage, lc.key, run_id=lc.mlflow_run_id)
        run.step_offset = lc.metric_step_offset
        if restored is not None:
            run.set_tags({"mqgen.resumed_from_step": restored.step})
            if self.skipped_checkpoints:
                run.set_tags({"mqgen.skipped_checkpoints": " | ".join(self.skipped_checkpoints)[:4000]})
        return run

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def prepare_model(self, model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        """Move to the device and wrap in DDP when there is more than one worker."""
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if self.world_size > 1 else None,
                                             parallel_strategy_kwargs=ddp_kwargs or None)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def broadcast_from_rank0(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.broadcast(t, src=0)
        return t

    def average_gradients(self, module: torch.nn.Module) -> None:
        """All-reduce (mean) the gradients of a module that is not wrapped in DDP."""
        if not self.distributed:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Broadcast rank 0's buffers (e.g. BatchNorm running statistics, which each rank updates from its
        own data) so every replica holds the same state before a checkpoint or the end of training."""
        if self.distributed:
            for b in module.buffers():
                torch.distributed.broadcast(b.data, src=0)

    def weight_divergence(self, module: torch.nn.Module) -> float:
        """Largest difference across ranks of per-tensor checksums of ``module``'s state (0 = in sync).

        Replicas that drift apart (a missed gradient or codebook sync) show up here long before they
        show up in the loss; every rank must call it.
        """
        sums = [t.detach().double() for t in module.state_dict().values() if t.is_floating_point()]
        if not sums:
            return 0.0
        sig = torch.stack([torch.stack([t.sum(), t.square().sum()]) for t in sums]).flatten()
        if not self.distributed:
            return 0.0
        hi, lo = sig.clone(), sig.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        return float((hi - lo).abs().max())

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def restore(self) -> LoadedCheckpoint | None:
        """The newest stored checkpoint that verifies (DONE marker, sha256), or None to start fresh.

        The run's folder is searched first (:meth:`_restore_from_storage`); then Ray's latest reported checkpoint
        and the older ones kept beside it, newest first. The reasons for every skipped checkpoint are kept in
        ``skipped_checkpoints``.
        """
        stored = self._restore_from_storage()
        if stored is not None:
            return stored
        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        candidates = _sibling_checkpoints(latest)
        for ckpt in candidates:
            with ckpt.as_directory() as d:
                try:
                    return read_checkpoint(d)
                except UnsafeCheckpointError as e:
                    self.skipped_checkpoints.append(str(e))
        raise UnsafeCheckpointError("no valid checkpoint among " + "; ".join(self.skipped_checkpoints)
                                    + " (delete the run's checkpoint directory to start over)")

    def _restore_from_storage(self) -> LoadedCheckpoint | None:
        """The newest checkpoint (by its manifest's step) in the run's own folder that verifies, or None.

        Ray's record of its checkpoints lags behind the reports: after a rank is SIGKILLed it offers an older
        checkpoint than the newest one stored, or none at all, and the run would redo steps it had finished."""
        from infra.checkpoint import restore_point

        if _RUN_DIR is None or "://" in _RUN_DIR or not Path(_RUN_DIR).is_dir():
            return None
        dirs = sorted(Path(_RUN_DIR).glob("checkpoint_*"))
        if not dirs:
            return None
        latest = ray.train.get_checkpoint()  # Ray's record: that one was stored whole
        recorded = {os.path.basename(latest.path.rstrip("/"))} if latest is not None else set()
        loaded, skipped = restore_point(dirs, recorded)
        self.skipped_checkpoints.extend(skipped)
        return loaded

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report metrics from every rank; rank 0 may attach a checkpoint directory (one of
        :func:`scratch_dir`), which Ray copies to the run's storage before this returns and which is then
        removed."""
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and self.is_main else None
        try:
            ray.train.report(metrics, checkpoint=ckpt)
        finally:
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)


def worker() -> Worker:
    return Worker()


def _sibling_checkpoints(latest: Any) -> list[Any]:
    """All checkpoints stored beside ``latest`` (same run): ``latest`` first, then the others by the step their
    manifest records, highest first (Ray names them from local wall-clock time, which a DST or time-zone change
    between two runs reorders). Those without a readable manifest come last; verification refuses them."""
    import pyarrow.fs as pafs

    fs = latest.filesystem
    parent = os.path.dirname(latest.path.rstrip("/"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, recursive=False))
    except OSError:
        return [latest]
    paths = [i.path for i in infos if i.type == pafs.FileType.Directory
             and os.path.basename(i.path).startswith("checkpoint_") and i.path.rstrip("/") != latest.path.rstrip("/")]
    return [latest, *(ray.train.Checkpoint(path=p, filesystem=fs)
                      for p in sorted(paths, key=lambda p: _manifest_step(fs, p), reverse=True))]


def _manifest_step(fs: Any, path: str) -> int:
    """The step in ``<path>/manifest.json`` (see ``infra.checkpoint``), -1 when it cannot be read."""
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{MANIFEST}") as f:
            return int(json.loads(f.read(1 << 20))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


SCRATCH_PREFIX = "mqgen-ckpt-"


def scratch_dir() -> str:
    """A fresh local temporary directory for staging one checkpoint before :meth:`Worker.report` (which
    removes it). Directories that a dead process of this host left behind (killed between writing and
    reporting) are removed first."""
    return str(process_temp_dir(SCRATCH_PREFIX))


# --------------------------------------------------------------------------------------------- tasks


def run_remote(fn: Callable[[Any], Any], arg: Any, *, num_cpus: float = 0, num_gpus: float = 0,
               in_flight: set[Any] | None = None) -> Any:
    """``fn(arg)`` as one Ray task, waited for. For orchestration bodies (a grid's stage execution): by default
    it reserves no CPU, since the Ray Train workers and Ray tasks it starts reserve their own. No retries: the
    caller (a Prefect task) owns them. A failure re-raises here with the original exception type. While it
    runs, its handle is in ``in_flight`` (for :func:`cancel_all`)."""
    init_ray()
    ref = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(fn).remote(arg)
    if in_flight is not None:
        in_flight.add(ref)
    try:
        return ray.get(ref)
    finally:
        if in_flight is not None:
            in_flight.discard(ref)


def cancel_all(in_flight: set[Any]) -> int:
    """Force-cancel the Ray tasks still in ``in_flight`` (their workers are killed); returns how many."""
    refs = list(in_flight)
    for ref in refs:
        try:
            ray.cancel(ref, force=True, recursive=True)
        except Exception:  # noqa: BLE001, S112 - already finished or gone: nothing to cancel
            continue
    return len(refs)


def map_tasks(fn: Callable[[Any], Any], items: Sequence[Any], *, num_cpus: float = 1, num_gpus: float = 0,
              max_in_flight: int | None = None, ordered: bool = False, max_retries: int = 3
              ) -> Iterator[tuple[int, Any]]:
    """Run ``fn(item)`` for every item as a Ray task; yield ``(index, result)`` as results arrive.

    ``fn`` must be importable by the workers (a module-level function). Each task reserves ``num_cpus`` CPUs
    and ``num_gpus`` GPUs. At most ``max_in_flight`` tasks are submitted and not yet yielded (default:
    twice the number of tasks the cluster can run at once), which bounds the results held by the driver.
    ``ordered=False`` yields in completion order; ``ordered=True`` yields in item order, so a slow task holds
    back the ones after it (the window still keeps ``max_in_flight`` tasks running).

    A task that raises re-raises here (an exception of the original type, carrying the remote
    traceback); a worker process that dies is retried up to ``max_retries`` times. Tasks not yet yielded
    are cancelled when the caller stops early or an exception propagates.
    """
    items = list(items)
    if not items:
        return
    init_ray()
    if max_in_flight is None:
        max_in_flight = 2 * _task_slots(num_cpus, num_gpus)
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(fn)
    refs: dict[int, Any] = {}  # item index -> ObjectRef, for submitted tasks not yet yielded
    next_submit = next_yield = 0
    try:
        while refs or next_submit < len(items):
            while next_submit < len(items) and len(refs) < max_in_flight:
                refs[next_submit] = remote.remote(items[next_submit])
                next_submit += 1
            if ordered:
                index = next_yield
                next_yield += 1
            else:
                by_ref = {ref: i for i, ref in refs.items()}
                ready, _ = ray.wait(list(by_ref), num_returns=1)
                index = by_ref[ready[0]]
            result = ray.get(refs[index])
            del refs[index]
            yield index, result
    finally:
        for ref in refs.values():
            ray.cancel(ref)


def _task_slots(num_cpus: float, num_gpus: float) -> int:
    """How many tasks needing ``num_cpus`` / ``num_gpus`` the cluster can run at once (>= 1)."""
    total = ray.cluster_resources()
    slots = []
    for name, need in (("CPU", num_cpus), ("GPU", num_gpus)):
        if need > 0:
            have = total.get(name, 0.0)
            if have < need:
                raise ValueError(f"each task needs {need} {name}(s) but the Ray cluster has {have:g}; "
                                 f"lower the request or add {name} nodes")
            slots.append(int(have // need))
    return max(1, min(slots)) if slots else 1


def cluster_address() -> str:
    """The address of the running Ray instance (for another process to join it with ``RAY_ADDRESS``)."""
    init_ray()
    return ray.get_runtime_context().gcs_address


def shutdown_ray() -> None:
    """Disconnect from (and, when this process started it, stop) the local Ray instance."""
    if ray.is_initialized():
        ray.shutdown()
