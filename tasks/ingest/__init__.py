"""Stage 1, ingest: a source (``data.*``) -> train/val WebDataset shards, a manifest, an MLflow run.

Output: ``<run.root>/ingest/<key>/{train,val}-%06d.tar`` (members ``<key>.png``, ``<key>.cls``, ``<key>.txt``),
``samples.png`` and ``manifest.json``, written last. The stage key hashes the data section (minus
``num_workers``), the seed and :data:`INGEST_VERSION`; a complete manifest for the key is a cache hit.

How a run goes:

1. Take ``<run.root>/ingest/.<key>.lock`` (a second ingest of the same key waits, then hits the cache).
2. Plan the source (:mod:`tasks.ingest.sources`): deterministic chunks, each at most one shard's worth of inputs
   (IDX files are decompressed as the chunks are handed out). Meanwhile the MLflow run is opened and the
   worker processes start, both in the background.
3. Build the chunks in ``<run.root>/ingest/.<key>.build/`` with ``data.num_workers`` processes: this one
   plus a pool of ``num_workers - 1`` (forkserver) workers. A builder writes ``*.tar.partial`` and
   renames it when closed; this process records each finished chunk in ``done/<chunk>.json``. A killed
   run resumes from the recorded chunks (re-hashed before reuse). The output never depends on
   ``num_workers``.
4. Count skipped inputs by reason; more than ``data.max_bad_fraction`` fails the stage and removes the
   build directory (no manifest is ever written for it).
5. Rename the shards to their final names, write ``samples.png`` and ``manifest.json``, log to MLflow,
   then swap the build directory into place (``force=True`` replaces an older output only at this point).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import platform
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from infra.config import PipelineConfig, identity, stable_hash, to_dict
from infra.orchestration import lazy_stage_task
from infra.refs import IngestInputs, IngestOutput
from infra.secrets import redact, redact_text
from infra.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SAMPLES_GRID_NAME,
    ShardIntegrityError,
    check_shards,
    load_manifest,
)
from infra.storage import (
    DamagedOutput,
    atomic_write_bytes,
    atomic_write_json,
    cached_run,
    read_json,
    remove_partials,
    remove_tree,
    replace_dir,
    sha256_file,
    stage_dir,
)

from .sources import (
    SPLITS,
    ImageSpec,
    IngestError,
    Plan,
    PlanContext,
    SourceError,
    TarChunk,
    source_from_config,
)
from .writer import (
    ChunkJob,
    ChunkResult,
    build_chunk,
    complete_captions,
    pool_build_chunk,
    pool_init,
    sample_grid,
)

__all__ = ["INGEST_VERSION", "IngestError", "IngestOutput", "SourceError", "run", "stage_key"]

STAGE = "ingest"
INGEST_VERSION = "1"  # bump when the bytes ingest writes for a given config change
CAPTION_READING_SOURCES = ("image-folder", "shards")  # sources that read captions beside their images
# 2: every sample of a captioned dataset has a caption (mixed inputs used to leave some without one, which
# tokenize refused), oversized sidecars are cut instead of skipped. Recorded in a captioned manifest; an older
# captioned output of a caption-reading source with samples lacking a caption is rebuilt under the same key
# (complete ones, and uncaptioned data, keep their output and key).
CAPTIONS_VERSION = 2
PERFORMANCE_FIELDS = ("num_workers",)  # data fields that change speed, never the output
MAX_EXAMPLES = 20  # skipped/ignored examples kept per reason in the manifest

log = logging.getLogger("mqgen.ingest")


def stage_key(cfg: PipelineConfig) -> str:
    """Short stable hash of what determines the output: data section (minus performance fields, local
    paths made absolute), seed and :data:`INGEST_VERSION`."""
    return stable_hash(key_doc(cfg))


def key_doc(cfg: PipelineConfig, inputs: IngestInputs | None = None) -> dict[str, Any]:
    """What the stage key of ``cfg`` hashes."""
    # paths: absolute; a field added later counts only when changed
    # paths without their credentials: a nightly run with freshly signed URLs is the same data (and reuses it)
    data = redact({k: v for k, v in identity("data", to_dict(cfg.data)).items() if k not in PERFORMANCE_FIELDS})
    version = INGEST_VERSION
    if cfg.data.source in CAPTION_READING_SOURCES:
        version += "+captions"  # their output gained the .txt captions of their input (see CAPTIONS_VERSION)
    if cfg.data.captions_file is not None:  # a changed caption file is different data under the same path
        data["captions_file_sha256"] = _file_sha256_or_missing(cfg.data.captions_file)
    return {"stage": STAGE, "version": version, "seed": cfg.seed, "data": data}


def _file_sha256_or_missing(path: str) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return "missing"  # the plan refuses it with a clear message


def run(cfg: PipelineConfig, inputs: IngestInputs | None = None, *, force: bool = False,
        parent_run_id: str | None = None) -> IngestOutput:
    """Ingest ``cfg.data`` into ``<cfg.run.root>/ingest/<key>/``; a cache hit returns at once.

    The first stage has no inputs but the config. ``parent_run_id`` (set by the pipeline flow) makes the
    stage's MLflow run a child of the pipeline run. ``force=True`` rebuilds from scratch and replaces
    the previous output atomically once the new one is complete. Raises :class:`IngestError` (bad or
    missing data, with a message naming the path or config key) and lets other errors through.

    With ``data.num_workers > 1`` the work runs in processes started by multiprocessing's forkserver,
    which imports the calling script's ``__main__`` module: call this from a command, a test or a
    script whose top level is guarded by ``if __name__ == "__main__":``.
    """
    root = _local_root(cfg.run.root)
    doc = key_doc(cfg)
    key = stable_hash(doc)
    out = stage_dir(root, STAGE, key)
    return cached_run(out, key, lambda: _cached(out, key), lambda: _ingest(cfg, root, key, out, force, parent_run_id),
                      force=force, key_doc=doc)


# Retries (run.retries) and the rule that bad data never retries (infra.errors) come from flows/pipeline.py.
__getattr__ = lazy_stage_task(__name__, "ingest_task", run, name=STAGE)


# --------------------------------------------------------------------------------------------- cache


def _local_root(root: str) -> Path:
    if "://" in str(root):
        raise IngestError(f"run.root={root!r}: ingest writes shards with local atomic renames and needs a "
                          "local (or mounted) directory")
    return Path(root).expanduser()


def cached(cfg: PipelineConfig, inputs: IngestInputs | None = None) -> IngestOutput | None:
    """The complete, verified ingest output for ``cfg`` if there is one (no work done otherwise)."""
    key = stage_key(cfg)
    return _cached(stage_dir(_local_root(cfg.run.root), STAGE, key), key)


def _cached(out: Path, key: str) -> IngestOutput | None:
    """The verified output in ``out``; None without a manifest; :class:`DamagedOutput` when the manifest or a
    shard does not verify."""
    if not (out / MANIFEST_NAME).exists():
        return None
    try:
        m = load_manifest(out)
    except ShardIntegrityError as e:
        raise DamagedOutput(out, str(e)) from None
    if m.get("key") != key:
        raise DamagedOutput(out, f"its manifest holds key {m.get('key')!r}")
    if _captions_incomplete(m):
        raise DamagedOutput(out, "its captions were stored by an older mqgen, which left some samples of mixed "
                                 "inputs without one (tokenize would refuse them): built again")
    problems = check_shards(out, m)
    if problems:
        raise DamagedOutput(out, "; ".join(problems[:3]))
    return _output(out, m)


def _captions_incomplete(m: dict[str, Any]) -> bool:
    """Whether a captioned manifest of a caption-reading source, written before :data:`CAPTIONS_VERSION` 2, holds
    samples without a caption (the older rule decided per input shard). One whose every sample has a caption stays
    valid, and so keeps its downstream stages."""
    if not m.get("captioned") or (m.get("config") or {}).get("data", {}).get("source") not in CAPTION_READING_SOURCES:
        return False
    try:
        if int(m.get("captions_version", 1)) >= CAPTIONS_VERSION:
            return False
    except (TypeError, ValueError):
        return True  # an unreadable version: rebuilt rather than trusted
    return any(split.get("num_captioned", 0) < split.get("num_samples", 0) for split in (m.get("splits") or {}).values())


def _output(out: Path, m: dict[str, Any]) -> IngestOutput:
    return IngestOutput(path=str(out.resolve()), key=m["key"], manifest_sha256=sha256_file(out / MANIFEST_NAME),
                        num_train=m["splits"]["train"]["num_samples"], num_val=m["splits"]["val"]["num_samples"],
                        num_classes=len(m["classes"]), image_size=m["image_size"], channels=m["channels"],
                        mlflow_run_id=m["mlflow_run_id"], captioned=bool(m.get("captioned", False)),
                        caption_grammar=m.get("caption_grammar"))


# --------------------------------------------------------------------------------------------- build


def _ingest(cfg: PipelineConfig, root: Path, key: str, out: Path, force: bool,
            parent_run_id: str | None) -> IngestOutput:
    d = cfg.data
    spec = ImageSpec.from_data(d)
    source = source_from_config(d)  # cheap path checks: a typo fails here, before anything starts
    build = out.parent / f".{key}.build"
    if force:
        remove_tree(build)
    _clean_build_dir(build)
    ctx = PlanContext(spec=spec, fit=d.fit, seed=cfg.seed, val_fraction=d.val_fraction, max_images=d.max_images,
                      shard_max_count=d.shard_max_count, min_shards=d.min_shards, download_dir=root / "downloads")
    params = {"data": {k: v for k, v in to_dict(d).items() if k not in PERFORMANCE_FIELDS}, "seed": cfg.seed,
              "ingest_version": INGEST_VERSION, "stage_key": key}
    t0 = time.perf_counter()
    # Opening the MLflow run (import, database, params) and starting the worker processes both overlap the
    # source planning. Capped input shards are read one after another in this process instead (each
    # depends on the counts before it).
    tracked = _BackgroundRun(root, cfg.run.experiment, key, params, parent_run_id)
    sequential = d.source == "shards" and d.max_images is not None
    pool = _WorkerPool(d.num_workers - 1) if d.num_workers > 1 and not sequential else None
    try:
        try:
            plan = source.plan(ctx)
            log.info("ingest %s: %s from %s, %s inputs", key, plan.description["kind"],
                     plan.description.get("path"), plan.num_inputs if plan.num_inputs is not None else "?")
            runner = _Runner(cfg, key, plan, spec, build, pool)
            try:
                runner.run()
                runner.complete_captions()
                results, stopped_early = runner.results, False
            except _EarlyBadStop:
                results, stopped_early = runner.results, True
        finally:
            if pool is not None:
                pool.shutdown()
        seconds = time.perf_counter() - t0
        stats = _Stats.collect(plan, results)
        metrics = stats.metrics(seconds, runner.workers_used)
        sr = tracked.get()
        step = sr.last_step("num_train") + 1  # a forced rebuild logs its figures at the next step
        if stopped_early or stats.bad_fraction > d.max_bad_fraction:
            sr.log_metrics(metrics, step=step)
            remove_tree(build)
            raise IngestError(stats.bad_fraction_message(d.max_bad_fraction, plan, stopped_early))
        if stats.num_samples.get("train", 0) == 0:
            sr.log_metrics(metrics, step=step)
            remove_tree(build)
            raise IngestError(f"no usable training images from {plan.description['kind']} "
                              f"{plan.description.get('path')}: {stats.num_inputs} inputs, "
                              f"{stats.num_skipped} skipped ({_fmt_counts(stats.skipped)})")
        manifest = _finalize(cfg, key, plan, runner.jobs_in_order, results, stats, build, sr.run_id, seconds,
                             runner.workers_used)
        stats.warn_if_lossy(key, d.max_bad_fraction)
        sr.log_metrics(metrics, step=step)
        sr.log_artifact(build / MANIFEST_NAME)
        sr.log_artifact(build / SAMPLES_GRID_NAME)
        sr.set_tags({"mqgen.manifest_sha256": sha256_file(build / MANIFEST_NAME)})
        replace_dir(build, out)
    except BaseException as e:  # KILLED on Ctrl-C / SIGTERM, FAILED otherwise
        from infra.tracking import exit_status

        tracked.finish(exit_status(e))
        raise
    tracked.finish("FINISHED")
    if stats.skipped or stats.ignored:
        log.info("ingest %s: skipped %s; ignored %s (examples in %s)", key, _fmt_counts(stats.skipped),
                 _fmt_counts(stats.ignored), out / MANIFEST_NAME)
    log.info("ingest %s: %d train + %d val samples in %d shards, %d skipped, %.1f s (%.0f images/s) -> %s",
             key, manifest["splits"]["train"]["num_samples"], manifest["splits"]["val"]["num_samples"],
             manifest["totals"]["num_shards"], stats.num_skipped, seconds, metrics["images_per_s"], out)
    return _output(out, manifest)


class _BackgroundRun:
    """Opens (or re-attaches to) the stage's MLflow run in a thread: importing MLflow and opening its
    database take seconds on a small machine, time the data work does not have to wait for."""

    def __init__(self, root: Path, experiment: str, key: str, params: dict[str, Any], parent_run_id: str | None):
        self._run: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, name="ingest-mlflow",
                                        args=(root, experiment, key, params, parent_run_id), daemon=True)
        self._thread.start()

    def _open(self, root: Path, experiment: str, key: str, params: dict[str, Any], parent_run_id: str | None
              ) -> None:
        try:
            from infra.tracking import Tracker

            self._run = Tracker(root, experiment).stage_run(STAGE, key, params=params, parent_run_id=parent_run_id)
        except BaseException as e:  # noqa: BLE001 - handed over to the stage thread by get()
            self._error = e

    def get(self) -> Any:
        """The ``StageRun``; raises what opening it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._run

    def finish(self, status: str) -> None:
        """Mark the run FINISHED or FAILED. On the failure path a tracking error is logged, not raised, so
        that it never hides the error that failed the stage."""
        try:
            self.get().finish(status)
        except Exception as e:
            if status != "FAILED":
                raise
            log.warning("ingest: could not mark the MLflow run FAILED: %s: %s", type(e).__name__, e)


def _clean_build_dir(build: Path) -> None:
    """Keep only what a resume can use (``parts/`` and ``done/``); drop leftovers of a killed finalize."""
    build.mkdir(parents=True, exist_ok=True)
    for p in build.iterdir():
        if p.name not in ("parts", "done"):
            remove_tree(p)
    for p in remove_partials(build):
        log.info("removed %s (left by a killed writer)", p)


class _WorkerPool:
    """Worker processes forked from a forkserver that imported numpy/PIL once; started in the background
    on creation so that their start-up overlaps the source planning."""

    def __init__(self, num_workers: int):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tasks.ingest.writer"])
        self.num_workers = num_workers
        self.queue = ctx.Queue()
        self.executor = ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx, initializer=pool_init,
                                            initargs=(self.queue,))
        # processes are spawned lazily, one per submit while none is idle: one no-op each starts them all
        self._warm = threading.Thread(target=self._start, name="ingest-pool-start", daemon=True)
        self._warm.start()

    def _start(self) -> None:
        for _ in range(self.num_workers):
            self.executor.submit(os.getpid)

    def shutdown(self) -> None:
        self._warm.join()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.queue.close()
        self.queue.join_thread()


class _Runner:
    """Runs the chunk jobs of a plan (resuming recorded ones), with progress and an early bad-input stop."""

    def __init__(self, cfg: PipelineConfig, key: str, plan: Plan, spec: ImageSpec, build: Path,
                 pool: _WorkerPool | None):
        self.cfg, self.key, self.plan, self.spec, self.pool = cfg, key, plan, spec, pool
        self.source_fingerprint = stable_hash(plan.description, length=32)
        self.parts_dir = build / "parts"
        self.done_dir = build / "done"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, ChunkResult] = {}
        self.jobs_in_order: list[ChunkJob] = []
        self.workers_used = 0
        self.bad = len(plan.skipped)

    def job(self, chunk: Any) -> ChunkJob:
        d = self.cfg.data
        return ChunkJob(chunk, self.spec, str(self.parts_dir), d.shard_max_count, d.shard_max_bytes)

    def fingerprint(self, job: ChunkJob) -> str:
        return stable_hash({"key": self.key, "source": self.source_fingerprint, "chunk": job.chunk.describe(),
                            "spec": asdict(job.spec),
                            "shard_max_count": job.shard_max_count, "shard_max_bytes": job.shard_max_bytes,
                            "version": INGEST_VERSION}, length=32)

    def run(self) -> dict[str, ChunkResult]:
        from infra.console import Progress

        recorded = self._load_done()
        self._drop_unreferenced_parts(recorded)
        bar = Progress(STAGE, self.plan.num_inputs, unit="images")
        try:
            if self.plan.sequential:
                self._run_sequential(recorded, bar)
            else:
                self._run_streaming(recorded, bar)
        finally:
            bar.close()
        return self.results

    def complete_captions(self) -> None:
        """A captioned dataset (some stored sample has a caption) stores one with every sample: the chunks
        holding samples without (inputs without captions, or a shard's samples before its first caption) get
        ``data.missing_caption`` applied (:func:`~tasks.ingest.writer.complete_captions`) and their done
        records rewritten, so the manifest's ``captioned`` holds for every shard. A no-op otherwise."""
        parts = [p for r in self.results.values() for p in r.parts]
        if not any(p.num_captioned for p in parts):
            return
        for job in self.jobs_in_order:
            r = self.results.get(job.job_id)
            if r is None or all(p.num_captioned == p.num_samples for p in r.parts):
                continue
            r = complete_captions(r, self.parts_dir, self.spec.missing_caption, getattr(job.chunk, "url", r.job_id))
            atomic_write_json(self.done_dir / f"{r.job_id}.json", r.to_json())
            self.results[r.job_id] = r

    def _reuse(self, job: ChunkJob, fp: str, recorded: dict[str, ChunkResult], bar: Any) -> bool:
        """Accept the recorded result of ``job`` if it was built from the same inputs; drop a stale one."""
        r = recorded.pop(job.job_id, None)
        if r is None:
            return False
        if r.fingerprint == fp:
            self._accept(r, bar, resumed=True)
            return True
        for part in r.parts:
            (self.parts_dir / part.name).unlink(missing_ok=True)
        (self.done_dir / f"{r.job_id}.json").unlink(missing_ok=True)
        return False

    def _run_streaming(self, recorded: dict[str, ChunkResult], bar: Any) -> None:
        """Hand each chunk out as the source produces it (the pool starts on the first chunk while the
        source still decompresses the next ones). This process works too: whenever the pool already has
        two chunks per worker queued, it builds the next chunk itself, so ``data.num_workers`` processes
        share the work (``num_workers - 1`` in the pool, plus this one)."""
        futures: dict[Future, ChunkJob] = {}
        built = inline = 0
        queue_limit = 2 * self.pool.num_workers if self.pool is not None else 0
        try:
            for chunk in self.plan.chunks:
                job = self.job(chunk)
                fp = self.fingerprint(job)
                self.jobs_in_order.append(job)
                if self._reuse(job, fp, recorded, bar):
                    continue
                built += 1
                if self.pool is not None:
                    self._collect(futures, bar, timeout=0)
                    if len(futures) < queue_limit:
                        futures[self.pool.executor.submit(pool_build_chunk, job, fp)] = job
                        continue
                inline += 1
                self._accept(build_chunk(job, fp, progress=bar.advance), None)
            while futures:
                self._collect(futures, bar, timeout=0.25)
        except BaseException as e:
            for f in futures:
                f.cancel()
            if isinstance(e, BrokenProcessPool):  # found by submit() before any result said so
                raise _worker_died("a chunk") from e
            raise
        finally:
            pool_size = self.pool.num_workers if self.pool is not None else 0
            self.workers_used = min(pool_size, built - inline) + (1 if inline else 0)
            if self.pool is not None:
                _drain(self.pool.queue, bar)

    def _collect(self, futures: dict[Future, ChunkJob], bar: Any, timeout: float) -> None:
        assert self.pool is not None
        finished, _ = wait(list(futures), timeout=timeout, return_when=FIRST_COMPLETED)
        _drain(self.pool.queue, bar)
        for f in finished:
            job = futures.pop(f)
            try:
                r = f.result()
            except BrokenProcessPool as e:
                raise _worker_died(f"chunk {job.job_id}") from e
            self._accept(r, None)

    def _run_sequential(self, recorded: dict[str, ChunkResult], bar: Any) -> None:
        """Shards with ``data.max_images``: inputs are read in order until every split has its quota."""
        cap = self.cfg.data.max_images
        assert cap is not None
        written: Counter[str] = Counter()
        self.workers_used = 1
        for chunk in self.plan.chunks:
            assert isinstance(chunk, TarChunk)
            limits = tuple((s, max(0, cap - written[s])) for s in SPLITS)
            if all(dict(limits)[s] <= 0 for s in chunk.possible_splits()):
                continue
            job = self.job(replace(chunk, limits=limits))
            fp = self.fingerprint(job)
            self.jobs_in_order.append(job)
            if not self._reuse(job, fp, recorded, bar):
                self._accept(build_chunk(job, fp, progress=bar.advance), None)
            for p in self.results[job.job_id].parts:
                written[p.split] += p.num_samples

    def _accept(self, r: ChunkResult, bar: Any, resumed: bool = False) -> None:
        self.results[r.job_id] = r
        if not resumed:
            atomic_write_json(self.done_dir / f"{r.job_id}.json", r.to_json())
        elif bar is not None:
            bar.advance(r.num_inputs)
        self.bad += r.num_skipped
        total = self.plan.num_inputs
        limit = self.cfg.data.max_bad_fraction
        if total and self.bad > limit * total:  # already hopeless: stop early
            raise _EarlyBadStop()

    def _load_done(self) -> dict[str, ChunkResult]:
        """Done records whose parts still exist with the recorded size and sha256."""
        out: dict[str, ChunkResult] = {}
        for p in sorted(self.done_dir.glob("*.json")):
            try:
                r = ChunkResult.from_json(read_json(p))
                ok = all(_part_ok(self.parts_dir / part.name, part.num_bytes, part.sha256) for part in r.parts)
            except (ValueError, TypeError, KeyError, OSError):
                ok = False
            if ok:
                out[r.job_id] = r
            else:
                p.unlink()
        if out:
            log.info("ingest %s: resuming, %d chunk(s) already built", self.key, len(out))
        return out

    def _drop_unreferenced_parts(self, recorded: dict[str, ChunkResult]) -> None:
        keep = {part.name for r in recorded.values() for part in r.parts}
        for p in self.parts_dir.iterdir():
            if p.name not in keep:
                p.unlink()


def _worker_died(what: str) -> RuntimeError:
    return RuntimeError(f"an ingest worker process died (killed or crashed) while building {what}; "
                        "rerunning resumes from the finished chunks")


class _EarlyBadStop(Exception):
    """Raised inside the runner once bad inputs exceed the budget of a source with a known size."""


def _part_ok(path: Path, size: int, digest: str) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == digest


def _drain(queue: Any, bar: Any) -> None:
    import queue as queue_mod

    while True:
        try:
            bar.advance(queue.get_nowait())
        except queue_mod.Empty:
            return
        except (OSError, ValueError):  # queue already closed
            return


# --------------------------------------------------------------------------------------------- summary


@dataclass
class _Stats:
    num_inputs: int
    num_skipped: int
    skipped: Counter
    skipped_examples: dict[str, list[str]]
    ignored: Counter
    ignored_examples: dict[str, list[str]]
    damaged: list[dict[str, str]]
    num_samples: Counter
    num_bytes: Counter
    histogram: dict[str, Counter]
    unlabeled: Counter
    captioned: Counter = field(default_factory=Counter)
    chunk_cpu_s: float = 0.0  # CPU time spent building chunks, in any process
    pool_cpu_s: float = 0.0  # the part of it spent in worker processes (not this one)

    @classmethod
    def collect(cls, plan: Plan, results: dict[str, ChunkResult]) -> _Stats:
        skipped: Counter = Counter(s.reason for s in plan.skipped)
        skipped_ex: dict[str, list[str]] = {}
        for s in plan.skipped:
            _add_example(skipped_ex, s.reason, f"{s.ref}: {s.detail}" if s.detail else s.ref)
        ignored: Counter = Counter(i.reason for i in plan.ignored)
        ignored_ex: dict[str, list[str]] = {}
        for i in plan.ignored:
            _add_example(ignored_ex, i.reason, i.ref)
        st = cls(len(plan.skipped), len(plan.skipped), skipped, skipped_ex, ignored, ignored_ex, [], Counter(),
                 Counter(), {s: Counter() for s in SPLITS}, Counter())
        for r in results.values():
            st.num_inputs += r.num_inputs
            st.num_skipped += r.num_skipped
            st.skipped.update(r.skipped)
            for reason, exs in r.skipped_examples.items():
                for e in exs:
                    _add_example(st.skipped_examples, reason, e)
            st.ignored.update(r.ignored)
            for reason, exs in r.ignored_examples.items():
                for e in exs:
                    _add_example(st.ignored_examples, reason, e)
            st.damaged += r.damaged_inputs
            st.chunk_cpu_s += r.cpu_seconds
            if r.pid != os.getpid():
                st.pool_cpu_s += r.cpu_seconds
            for p in r.parts:
                st.num_samples[p.split] += p.num_samples
                st.num_bytes[p.split] += p.num_bytes
                st.histogram[p.split].update({k: v for k, v in p.class_histogram.items()})
                st.unlabeled[p.split] += p.num_unlabeled
                st.captioned[p.split] += p.num_captioned
        return st

    @property
    def bad_fraction(self) -> float:
        return self.num_skipped / self.num_inputs if self.num_inputs else 0.0

    def metrics(self, seconds: float, workers: int) -> dict[str, float]:
        n = sum(self.num_samples.values())
        m = {"num_train": self.num_samples["train"], "num_val": self.num_samples["val"],
             "num_inputs": self.num_inputs, "num_skipped": self.num_skipped, "bad_fraction": self.bad_fraction,
             "num_bytes": sum(self.num_bytes.values()), "seconds": seconds,
             "images_per_s": n / seconds if seconds > 0 else 0.0, "workers": workers,
             "chunk_cpu_s": self.chunk_cpu_s, "pool_cpu_s": self.pool_cpu_s}
        m.update({f"skipped.{k}": v for k, v in self.skipped.items()})
        m["num_damaged_inputs"] = len(self.damaged)
        return m

    def warn_if_lossy(self, key: str, limit: float) -> None:
        """A warning (console and log) when this ingest kept going past bad inputs: the skipped ones by reason, and
        each input shard that ended early, whose samples after the damage are lost without being counted one by
        one (a cut tar cannot say how many it held)."""
        if self.damaged:
            shown = "; ".join(f"{redact_text(d['url'])} ({d['status']}: {d['detail']})" for d in self.damaged[:3])
            more = f" and {len(self.damaged) - 3} more" if len(self.damaged) > 3 else ""
            log.warning("ingest %s: %d input shard(s) ended early; their samples after the damage are lost: %s%s "
                        "(manifest.json, damaged_inputs). Replace the shards and rerun with --from ingest to get "
                        "them back", key, len(self.damaged), shown, more)
        if self.num_skipped:
            log.warning("ingest %s: skipped %d of %d inputs (%.2f%%, data.max_bad_fraction=%s): %s", key,
                        self.num_skipped, self.num_inputs, 100 * self.bad_fraction, limit, _fmt_counts(self.skipped))

    def bad_fraction_message(self, limit: float, plan: Plan, stopped_early: bool) -> str:
        examples = "; ".join(f"{r}: {', '.join(ex[:2])}" for r, ex in sorted(self.skipped_examples.items()))
        if stopped_early and plan.num_inputs:
            counts = (f"{self.num_skipped} of {plan.num_inputs} inputs are bad "
                      f"(>= {self.num_skipped / plan.num_inputs:.2%}; stopped after reading {self.num_inputs})")
        else:
            counts = f"{self.num_skipped} of {self.num_inputs} inputs are bad ({self.bad_fraction:.2%})"
        return (f"ingest of {plan.description['kind']} {plan.description.get('path')} failed: {counts}, "
                f"more than data.max_bad_fraction={limit} allows. By reason: {_fmt_counts(self.skipped)}. "
                f"Examples: {examples}. Fix or remove those inputs, or raise data.max_bad_fraction. "
                "No manifest was written.")


def _add_example(d: dict[str, list[str]], reason: str, example: str) -> None:
    ex = d.setdefault(reason, [])
    if len(ex) < MAX_EXAMPLES:
        ex.append(example)


def _fmt_counts(c: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"


def _finalize(cfg: PipelineConfig, key: str, plan: Plan, jobs: list[ChunkJob],
              results: dict[str, ChunkResult], stats: _Stats, build: Path, run_id: str, seconds: float,
              workers: int) -> dict[str, Any]:
    """Rename the parts to ``<split>-%06d.tar`` in output order, write samples.png, then manifest.json."""
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        shards = []
        for job in jobs:
            r = results.get(job.job_id)
            for part in (r.parts if r is not None else []):
                if part.split != split:
                    continue
                name = f"{split}-{len(shards):06d}.tar"
                replace_dir(build / "parts" / part.name, build / name)  # a file too: renamed, directory fsynced
                shards.append({"name": name, "num_samples": part.num_samples, "num_bytes": part.num_bytes,
                               "sha256": part.sha256, "first_key": part.first_key, "last_key": part.last_key})
        hist = stats.histogram[split]
        splits[split] = {"num_samples": stats.num_samples[split], "num_bytes": stats.num_bytes[split],
                         "num_shards": len(shards), "num_unlabeled": stats.unlabeled[split],
                         "num_captioned": stats.captioned[split],
                         "class_histogram": {k: hist[k] for k in sorted(hist, key=int)}, "shards": shards}
    classes = plan.classes
    if classes is None:
        labels = [int(k) for s in splits.values() for k in s["class_histogram"]]
        classes = [str(i) for i in range(max(labels) + 1)] if labels else []
    if classes and any(s["num_unlabeled"] for s in splits.values()):
        log.warning("ingest %s: %d samples have no label in a labelled dataset (label -1 when read)", key,
                    sum(s["num_unlabeled"] for s in splits.values()))
    train_paths = [build / s["name"] for s in splits["train"]["shards"]]
    buf = io.BytesIO()
    Image.fromarray(sample_grid(train_paths)).save(buf, format="PNG")
    atomic_write_bytes(build / SAMPLES_GRID_NAME, buf.getvalue())
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in PERFORMANCE_FIELDS}
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": STAGE,
        "key": key,
        "config_hash": key,
        "ingest_version": INGEST_VERSION,
        "config": {"data": data, "seed": cfg.seed},
        "source": plan.description,
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "image_format": "png",
        "classes": classes,
        "num_classes": len(classes),
        # captioned: every stored sample has a .txt member (an empty one where the input had none and
        # data.missing_caption=empty; _Runner.complete_captions makes it so across inputs); caption_grammar
        # names a grammar the captions follow (shapes), if any
        "captioned": any(s["num_captioned"] for s in splits.values()),
        "captions_version": CAPTIONS_VERSION,
        "caption_grammar": plan.description.get("caption_grammar"),
        "splits": splits,
        "totals": {"num_samples": sum(s["num_samples"] for s in splits.values()),
                   "num_bytes": sum(s["num_bytes"] for s in splits.values()),
                   "num_shards": sum(s["num_shards"] for s in splits.values()),
                   "num_inputs": stats.num_inputs, "num_skipped": stats.num_skipped,
                   "bad_fraction": stats.bad_fraction},
        "skipped": {"by_reason": dict(sorted(stats.skipped.items())), "examples": stats.skipped_examples},
        "ignored": {"by_reason": dict(sorted(stats.ignored.items())), "examples": stats.ignored_examples},
        "damaged_inputs": stats.damaged,
        "mlflow_run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "workers": workers,
        "software": {"python": platform.python_version(), "numpy": np.__version__,
                     "pillow": PIL.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION},
    }
    remove_tree(build / "parts")
    remove_tree(build / "done")
    manifest = redact(manifest)  # shard URLs, examples of skipped inputs: never their credentials
    atomic_write_json(build / MANIFEST_NAME, manifest)  # the commit marker: last
    return manifest



