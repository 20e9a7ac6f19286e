"""Training-step benchmarks: each stage's step inside Ray Train workers against the bare step in one process.

Not a timed test: it measures and prints, then prints one JSON line last. Figures are recorded in
``docs/benchmarks.md``. Each part is a function in :data:`PARTS` that returns the keys it adds to that line;
``--only`` picks parts. Both parts share the measurement (:func:`take_turns`, :class:`RayRun`,
:func:`ray_rounds`):

- Bare: the step in this process. Ray: the same step inside a Ray Train run (``infra.ray.fit``), timed inside
  the workers (Ray start-up and worker creation excluded). Bare and Ray take turns, one round of ``--steps``
  timed steps each, ``--rounds`` rounds, after ``--warmup`` untimed steps on each side, so load drift on a
  shared machine hits both. A round's figure is the median over its steps; a time is the median over rounds
  and an overhead the median of the per-round ratios (Ray / bare) minus 1. Each step is timed from fetching
  its batch to the end of the optimiser step, with a device synchronisation before and after; the batch
  fetch alone is reported beside it (``*_data_ms``). Both sides use ``--threads`` torch threads per process
  on CPU (each Ray worker reserves as many CPUs). With several workers a step's time is the slowest rank's.
- The CPU time of the training thread is reported beside the wall clock: it separates work Ray adds to the
  step from wall-clock noise of a shared machine.

``stackformer`` (``tasks.train_stackformer``):

1. Data: a synthetic token database (LMDB, written with ``infra.tokens.TokenWriter``) with the preset's
   codebook, grid and sequence length, uniform random codes, random raster-sorted positions and labels.
2. The timed step is the stage's: the next batch from :class:`tasks.train_stackformer.TrainBatches` (the
   DistributedSampler order over the LMDB reader), ``to_batch``, the per-step seed, and
   :meth:`tasks.train_stackformer.StackformerTrainer.step` (AdamW, clipping, bf16 autocast on CUDA).
3. Ray: 1 worker. ``stackformer_ray_overhead`` = Ray step time / bare step time - 1 (target <= 0.10). Also
   tokens/s of both and the model FLOPs utilisation ``stackformer_mfu`` = 6 * parameters * tokens/s / peak
   FLOP/s (``--peak-tflops``; the default 989 is an H200's dense bf16 peak, meaningful only with ``--device
   cuda``).

``tokenizer`` (``tasks.train_tokenizer``):

1. Data: synthetic ingest shards (``tasks.ingest.writer.ShardWriter``, the ingest stage's tar writer, PNGs from
   ``tasks.ingest.sources.encode_png``) at the preset's image size and channels: smooth random images (random
   low-resolution pixels, bilinear upscaling, light noise, so PNG decoding costs about what it costs on
   photos) with random labels, in 4 shards.
2. The timed step is the stage's (``train_loop``): the next batch of :class:`infra.stream.TrainStream`
   (the rank's shards, seeded shuffle buffer, PNG decoding), ``to_model_input``, and
   :meth:`tasks.train_tokenizer.TokenizerTrainer.step`, the full GAN step: MQ-VAE forward with the EMA
   codebook update, autoencoder loss with the adaptive GAN weight, Adam step, discriminator step. The steps
   are numbered from ``tokenizer.disc_start`` on, so the discriminator is active in every timed step. The
   model and trainer are built as ``train_loop`` builds them (codebook collectives, DDP with more than one
   worker, discriminator gradient averaging). Not timed: the stage's MLflow logging every ``log_every``
   steps, validation and checkpoints.
3. Ray: a 1-worker run, then a 2-worker run (``--tokenizer-workers``). Every worker takes the bare step's
   batch (``--tokenizer-batch``; weak scaling: the 2-worker run's global batch is twice the bare one, so
   each worker does exactly the bare step's work plus the collectives). ``tokenizer_ray_overhead`` =
   1-worker Ray step time / bare step time - 1 (target <= 0.10); ``tokenizer_ray_overhead_2w`` the same for
   2 workers; images/s of the bare step, 1 worker and 2 workers (total over workers).
4. On CUDA (``--no-ray``): images/s and ``tokenizer_peak_memory_gib`` (``torch.cuda.max_memory_allocated``
   of the bare step: model, discriminator, both Adam states, activations), bf16 autocast as in the stage.

Usage (CPU, the figures in docs/benchmarks.md)::

    .venv/bin/python benchmarks/train.py

On a GPU, the paper Stackformer (12 + 12 layers, width 1024, 256 tokens, 1000 classes) and the paper
MQ-VAE (256 px, f8, batch 8) at bf16::

    .venv/bin/python benchmarks/train.py --device cuda --preset paper-f8 --no-ray
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python benchmarks/train.py``, Python puts benchmarks/ first on sys.path, where sibling scripts
# (benchmarks/models.py) would shadow the ``models`` package: import from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import torch

from infra.config import PRESETS, PipelineConfig, from_dict, resolve

H200_BF16_DENSE_TFLOPS = 989.0
STACKFORMER_RAY_OVERHEAD_TARGET = 0.10
TOKENIZER_RAY_OVERHEAD_TARGET = 0.10


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def preset_config(args: argparse.Namespace, overrides: Sequence[str] = ()) -> tuple[str, PipelineConfig]:
    preset = "paper-f8" if args.preset == "paper" else args.preset
    return preset, resolve(preset, overrides=[*(args.set or []), *overrides])


# --------------------------------------------------------------------------------------------- measurement


class Round(NamedTuple):
    """Medians over one round's steps: wall seconds, CPU seconds of the training thread, batch-fetch seconds."""

    wall: float
    cpu: float
    data: float


def _medians(times: Sequence[Sequence[float]]) -> Round:
    return Round(*(statistics.median(t[i] for t in times) for i in range(3)))


def _ms(r: Round) -> str:
    return f"{r.wall * 1e3:.1f} ms/step (CPU {r.cpu * 1e3:.1f}, data {r.data * 1e3:.1f})"


def timed_step(device: torch.device, fetch: Callable[[], Any], step: Callable[[Any], dict]
               ) -> tuple[tuple[float, float, float], dict]:
    """``step(fetch())`` between device synchronisations: ``((wall s, thread CPU s, fetch wall s), logs)``."""
    sync(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    batch = fetch()
    data = time.perf_counter() - t0
    logs = step(batch)
    sync(device)
    return (time.perf_counter() - t0, time.thread_time() - c0, data), logs


def _check_loss(loss: float, step: int) -> float:
    if not math.isfinite(loss):
        raise FloatingPointError(f"benchmark loss is {loss} at step {step}")
    return loss


def _wait_for(path: Path, alive: Callable[[], bool], what: str, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if not alive():
            raise RuntimeError(f"the Ray measurement ended before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f}s")
        time.sleep(0.05)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def ray_rounds(lc: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of a Ray measurement: build the bench ``lc["bench"]``, warm up, then one round
    of timed steps each time the driver writes ``go-<r>`` into ``lc["turns"]``, answering with this rank's
    step times in ``done-<r>-<rank>.json``."""
    from infra import ray as rayx

    w = rayx.worker()
    bench = BENCHES[lc["bench"]](lc, w.device, w)
    turns = Path(lc["turns"])
    bench.run(lc["warmup"])
    _write_atomic(turns / f"ready-{w.rank}", str(bench.num_params))
    for r in range(lc["rounds"]):
        _wait_for(turns / f"go-{r}", turns.exists, f"the driver's turn {r}")
        _write_atomic(turns / f"done-{r}-{w.rank}.json", json.dumps(bench.run(lc["steps"])))
    bench.close()
    summary = {"ray_steps": float(lc["rounds"] * lc["steps"]), "final_loss": bench.loss}
    ckpt = None
    if w.is_main:
        ckpt = rayx.scratch_dir()  # Ray Train keeps the metrics of reports that carry a checkpoint
        Path(ckpt, "summary.json").write_text(json.dumps(summary))
    w.report(summary, checkpoint_dir=ckpt)


class RayRun:
    """A Ray Train run of :func:`ray_rounds` on ``num_workers`` workers, driven one round at a time.

    Starting it returns once every worker has built its bench and taken its warm-up steps.
    """

    def __init__(self, lc: dict[str, Any], work: Path, tag: str, *, num_workers: int, device: torch.device,
                 threads: int) -> None:
        from infra import ray as rayx

        # Start Ray from this (the main) thread: its daemons die with the thread that spawned them
        # (PR_SET_PDEATHSIG), and the fit thread ends with each run.
        rayx.init_ray()
        self.num_workers = num_workers
        self.turns = work / f"turns-{tag}"
        self.turns.mkdir()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-fit")
        t0 = time.perf_counter()
        self.fit = self.pool.submit(rayx.fit, ray_rounds, {**lc, "turns": str(self.turns)},
                                    name=f"bench-{tag}-{uuid.uuid4().hex[:8]}", storage_path=str(work / "ray"),
                                    num_workers=num_workers, use_gpu=device.type == "cuda",
                                    cpus_per_worker=threads, max_failures=0)
        for rank in range(num_workers):
            _wait_for(self.turns / f"ready-{rank}", self.alive, f"Ray worker {rank} was ready")
        self.startup_s = time.perf_counter() - t0

    def alive(self) -> bool:
        return not self.fit.done()

    def round(self, r: int) -> Round:
        """Round ``r`` in the workers; per step the slowest rank's figures, then the medians."""
        (self.turns / f"go-{r}").write_text("")
        per_rank = []
        for rank in range(self.num_workers):
            done = self.turns / f"done-{r}-{rank}.json"
            _wait_for(done, self.alive, f"Ray round {r} of worker {rank}")
            per_rank.append(json.loads(done.read_text()))
        return _medians([[max(col) for col in zip(*step)] for step in zip(*per_rank)])

    def close(self) -> None:
        try:
            self.fit.result()  # re-raises a failed Ray run
        finally:
            self.pool.shutdown()


def take_turns(args: argparse.Namespace, bare: Any, lc: dict[str, Any], work: Path, tag: str, *,
               num_workers: int = 1) -> tuple[list[Round], list[Round], float | None]:
    """``args.rounds`` rounds of ``bare`` (warmed up already) and, with ``args.ray``, of the same bench in a
    ``num_workers``-worker Ray run, taking turns; returns the per-round medians of both and Ray's start-up
    seconds."""
    device = torch.device(args.device)
    run = None
    if args.ray:
        run = RayRun(lc, work, tag, num_workers=num_workers, device=device, threads=args.threads)
        log(f"  {tag}: Ray ready after {run.startup_s:.0f}s (start-up and warm-up, not timed)")
    bare_rounds: list[Round] = []
    ray_rounds_: list[Round] = []
    try:
        for r in range(args.rounds):
            bare_rounds.append(_medians(bare.run(args.steps)))
            line = f"  {tag} round {r + 1}/{args.rounds}: bare {_ms(bare_rounds[-1])}"
            if run is not None:
                ray_rounds_.append(run.round(r))
                line += f", ray {_ms(ray_rounds_[-1])}"
            log(line)
    finally:
        if run is not None:
            run.close()
    return bare_rounds, ray_rounds_, run.startup_s if run is not None else None


def rounds_out(prefix: str, rounds: Sequence[Round]) -> dict[str, Any]:
    """``<prefix>_step_ms`` (median over rounds) and the per-round medians on each clock."""
    return {f"{prefix}_step_ms": statistics.median(r.wall for r in rounds) * 1e3,
            f"{prefix}_step_ms_rounds": [round(r.wall * 1e3, 2) for r in rounds],
            f"{prefix}_step_cpu_ms_rounds": [round(r.cpu * 1e3, 2) for r in rounds],
            f"{prefix}_data_ms_rounds": [round(r.data * 1e3, 2) for r in rounds]}


def overheads(ray: Sequence[Round], bare: Sequence[Round]) -> tuple[float, float]:
    """Medians over paired rounds of Ray / bare - 1: wall clock, and CPU time of the training thread."""
    pairs = list(zip(ray, bare))
    return (statistics.median(r.wall / b.wall for r, b in pairs) - 1,
            statistics.median(r.cpu / b.cpu for r, b in pairs) - 1)


def report_overhead(key: str, overhead: float, cpu_overhead: float, target: float | None) -> bool | None:
    verdict = ""
    passed = None
    if target is not None:
        passed = overhead <= target
        verdict = f"; target <= {target:g}: {'PASS' if passed else 'FAIL'}"
    log(f"  {key} {overhead:+.3f} (median of per-round wall-time ratios{verdict}); CPU time of the training "
        f"thread {cpu_overhead:+.3f}")
    return passed


# --------------------------------------------------------------------------------------------- stackformer


def synthetic_tokens(path: Path, cfg: PipelineConfig, *, num_classes: int, num_records: int, seed: int = 0
                     ) -> str:
    """A complete token database of ``num_records`` random records shaped for ``cfg``'s tokenizer."""
    from infra.tokens import TokenMeta, TokenWriter

    tok = cfg.tokenizer.model
    cells = tok.grid_size ** 2
    seq_len = cells if cfg.stackformer.model == "fullgrid" else tok.num_kept
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, tok.codebook_size, (num_records, seq_len), dtype=np.uint16)
    kept = np.argsort(rng.random((num_records, cells)), axis=1)[:, :seq_len]  # a random subset of cells
    positions = np.sort(kept, axis=1).astype(np.uint16)
    labels = rng.integers(0, num_classes, num_records) if num_classes else np.full(num_records, -1)
    labels = labels.astype(np.int32)
    meta = TokenMeta(split="train", codebook_size=tok.codebook_size, grid_size=tok.grid_size, seq_len=seq_len,
                     keep_ratio=tok.keep_ratio, num_classes=num_classes, tokenizer_sha256="benchmark",
                     source_sha256="benchmark", shards=((0, num_records),))
    writer = TokenWriter(path, meta)
    try:
        writer.write_shard(0, codes, positions, labels)
        writer.finalize()
    finally:
        writer.close()
    return str(path)


class _StepBench:
    """Shared timing loop of a part: ``_fetch`` the next batch, ``_step`` the trainer, check the loss."""

    LOSS_KEY = "loss"

    def run(self, n: int) -> list[tuple[float, float, float]]:
        times = []
        for _ in range(n):
            t, logs = timed_step(self.device, self._fetch, self._step)
            times.append(t)
            self.step += 1
            self.loss = _check_loss(float(logs[self.LOSS_KEY]), self.step)
        return times


class StackformerBench(_StepBench):
    """The Stackformer stage's model, trainer and data path built from the JSON-able ``lc``, timing its steps.

    Used in this process (bare) and inside the Ray worker (one worker: ``worker`` is not needed).
    :meth:`run` takes ``n`` more steps and returns the ``(wall, CPU, data)`` seconds of each.
    """

    def __init__(self, lc: dict[str, Any], device: torch.device, worker: Any = None) -> None:
        from infra.config import TokenLayout, fullgrid_config, stackformer_config
        from infra.tokens import TokenDataset
        from tasks.train_stackformer import IndexedTokens, StackformerTrainer, TrainBatches, new_model

        if device.type == "cpu":
            torch.set_num_threads(lc["threads"])
        self.cfg: PipelineConfig = from_dict(PipelineConfig, lc["config"])
        s = self.cfg.stackformer
        self.device = device
        self.dataset = TokenDataset(lc["db"])
        build = stackformer_config if s.model == "stackformer" else fullgrid_config
        meta = self.dataset.meta  # the layout of the tokens timed, as the stage reads it from its inputs
        model_cfg = build(s, TokenLayout(meta.codebook_size, meta.grid_size, meta.seq_len), num_classes=meta.num_classes)
        torch.manual_seed(self.cfg.seed)
        self.model = new_model(s.model, asdict(model_cfg)).to(device)
        self.trainer = StackformerTrainer(self.model, lr=s.lr, weight_decay=s.weight_decay,
                                          warmup_steps=s.warmup_steps, max_steps=s.max_steps,
                                          grad_clip=s.grad_clip, device=device)
        data = TrainBatches(IndexedTokens(self.dataset), rank=0, world_size=1, batch_size=s.batch_size,
                            seed=self.cfg.seed, pin_memory=device.type == "cuda")
        self.batches = data.iterate(0)
        self.conditional = model_cfg.num_classes > 0
        self.tokens_per_step = s.batch_size * self.dataset.meta.seq_len
        self.num_params = self.model.num_params()
        self.step = 0
        self.loss = float("nan")

    def _fetch(self) -> Any:
        from tasks.train_stackformer import to_batch

        _, items = next(self.batches)
        return to_batch(items, self.device, self.conditional)

    def _step(self, batch: Any) -> dict:
        from tasks.train_stackformer import STAGE, derive_seed

        torch.manual_seed(derive_seed(self.cfg.seed, STAGE, "train", 0, self.step))
        return self.trainer.step(batch, self.step)

    def close(self) -> None:
        self.batches.close()
        self.dataset.close()


def bench_stackformer(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    preset, cfg = preset_config(args, [f"stackformer.batch_size={args.batch}"] if args.batch is not None else [])
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = 1000 if preset.startswith("paper") else 10
    work = Path(tempfile.mkdtemp(prefix="mqgen-bench-train-"))
    try:
        records = max(4 * cfg.stackformer.batch_size, 256)
        db = synthetic_tokens(work / "train.lmdb", cfg, num_classes=num_classes, num_records=records)
        lc = {"bench": "stackformer", "config": cfg.to_dict(), "db": db, "warmup": args.warmup,
              "steps": args.steps, "rounds": args.rounds, "threads": args.threads}
        tok = cfg.tokenizer.model
        log(f"stackformer ({cfg.stackformer.model}): preset {preset}, batch {cfg.stackformer.batch_size}, "
            f"{num_classes} classes, K={tok.codebook_size}, grid {tok.grid_size}, device {device}, "
            f"{args.warmup} warm-up + {args.rounds} x {args.steps} timed steps per side")
        bare = StackformerBench(lc, device)
        bare.run(args.warmup)
        log(f"  {bare.num_params / 1e6:.2f}M params, {bare.tokens_per_step} tokens/step")
        bare_rounds, ray_rounds_, _ = take_turns(args, bare, lc, work, "stackformer")
        bare.close()
        bare_s = statistics.median(r.wall for r in bare_rounds)
        out: dict[str, Any] = {
            "preset": preset, "model": cfg.stackformer.model, "num_classes": num_classes,
            "batch": cfg.stackformer.batch_size, "threads": args.threads,
            "dtype": "bf16-autocast" if device.type == "cuda" else "fp32", "num_params": bare.num_params,
            "tokens_per_step": bare.tokens_per_step, "rounds": args.rounds, "steps_per_round": args.steps,
            **rounds_out("bare", bare_rounds),
            "bare_tokens_per_s": bare.tokens_per_step / bare_s, "final_loss": bare.loss,
            "peak_tflops": args.peak_tflops}
        flops_per_s = 6 * bare.num_params * out["bare_tokens_per_s"]
        out["model_tflops_per_s"] = flops_per_s / 1e12
        keys: dict[str, Any] = {"stackformer_tokens_per_s": out["bare_tokens_per_s"],
                                "stackformer_mfu": flops_per_s / (args.peak_tflops * 1e12)}
        if ray_rounds_:
            overhead, cpu_overhead = overheads(ray_rounds_, bare_rounds)
            out.update(rounds_out("ray", ray_rounds_), ray_cpu_overhead=cpu_overhead)
            out["ray_tokens_per_s"] = bare.tokens_per_step / (out["ray_step_ms"] / 1e3)
            passed = report_overhead("stackformer_ray_overhead", overhead, cpu_overhead,
                                     STACKFORMER_RAY_OVERHEAD_TARGET)
            keys.update(stackformer_ray_overhead=overhead,
                        stackformer_ray_overhead_target=STACKFORMER_RAY_OVERHEAD_TARGET,
                        stackformer_ray_overhead_pass=passed)
        log(f"  bare {out['bare_tokens_per_s']:.0f} tokens/s, {out['model_tflops_per_s']:.3g} model TFLOP/s, "
            f"MFU {keys['stackformer_mfu']:.3g} of {args.peak_tflops:g} TFLOP/s")
        return {**keys, "stackformer": out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------- tokenizer


def synthetic_shards(directory: Path, cfg: PipelineConfig, *, num_images: int, num_shards: int = 4,
                     seed: int = 0) -> list[tuple[str, int]]:
    """``num_images`` smooth random images at ``cfg``'s size and channels in ``num_shards`` ingest-format
    train shards (random labels 0-9); returns ``(path, samples)`` per shard, as the stage passes them."""
    from PIL import Image

    from tasks.ingest.sources import encode_png
    from tasks.ingest.writer import ShardWriter

    size, channels = cfg.data.image_size, cfg.data.channels
    rng = np.random.default_rng(seed)
    low = max(2, size // 8)
    directory.mkdir(parents=True)
    shards = []
    per_shard = math.ceil(num_images / num_shards)
    for c in range(num_shards):
        count = min(per_shard, num_images - c * per_shard)
        writer = ShardWriter(directory, "train", c, max_count=count, max_bytes=1 << 40)
        for i in range(c * per_shard, c * per_shard + count):
            coarse = rng.integers(0, 256, (low, low, channels), dtype=np.uint8)
            img = Image.fromarray(coarse[..., 0] if channels == 1 else coarse)
            smooth = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.int16)
            noisy = np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255).astype(np.uint8)
            writer.add(f"bench{i:07d}", encode_png(noisy), int(rng.integers(0, 10)))
        (part,) = writer.close()
        shards.append((str(directory / part.name), part.num_samples))
    return shards


class TokenizerBench(_StepBench):
    """The tokenizer stage's model, discriminator, trainer and data stream, built as ``train_loop`` builds them
    from the JSON-able ``lc``; timing its steps.

    In this process ``worker`` is None (as a 1-worker run, without collectives); inside Ray it is the
    :class:`infra.ray.Worker`. Every rank takes ``lc["batch"]`` images per step. :meth:`run` takes ``n``
    more steps and returns the ``(wall, CPU, data)`` seconds of each.
    """

    LOSS_KEY = "total"

    def __init__(self, lc: dict[str, Any], device: torch.device, worker: Any = None) -> None:
        from infra.stream import TrainStream
        from models.losses import VQGANLoss
        from models.mqvae import MQVAE
        from tasks.train_tokenizer import TokenizerTrainer

        if device.type == "cpu":
            torch.set_num_threads(lc["threads"])
        self.cfg: PipelineConfig = from_dict(PipelineConfig, lc["config"])
        t = self.cfg.tokenizer
        self.device = device
        rank, world_size = (worker.rank, worker.world_size) if worker is not None else (0, 1)
        torch.manual_seed(self.cfg.seed)
        self.model = MQVAE(self.cfg.tokenizer.model).to(device)
        loss = VQGANLoss(self.cfg.tokenizer.loss, in_channels=self.cfg.data.channels).to(device)
        self.step = t.loss.disc_start  # from here on the GAN is active: every step is the full GAN step
        if not loss.is_gan_active(self.step):
            raise SystemExit("the GAN never becomes active with this config (tokenizer.disc_factor 0?)")
        ddp_model = None
        sync_disc: Callable[[torch.nn.Module], None] = lambda m: None
        if worker is not None:
            self.model.set_codebook_sync(worker.all_reduce_sum, worker.broadcast_from_rank0)
            ddp_model = worker.prepare_model(self.model) if world_size > 1 else None
            sync_disc = worker.average_gradients
        self.trainer = TokenizerTrainer(self.model, loss, lr=t.lr, warmup_steps=t.warmup_steps,
                                        max_steps=max(t.max_steps, t.loss.disc_start + 10_000), device=device,
                                        ddp_model=ddp_model, grad_accum=t.grad_accum, sync_disc_grads=sync_disc)
        torch.manual_seed(self.cfg.seed * 1000 + rank + self.step)  # the stage's per-rank randomness
        stream = TrainStream([tuple(s) for s in lc["shards"]], rank=rank, world_size=world_size,
                             batch_size=lc["batch"], channels=self.cfg.data.channels, seed=self.cfg.seed)
        self.data = iter(stream)
        self.images_per_step = lc["batch"]
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.disc_params = sum(p.numel() for p in loss.discriminator.parameters())
        self.loss = float("nan")

    def _fetch(self) -> torch.Tensor:
        from models.mqvae import to_model_input

        images, _ = next(self.data)
        return to_model_input(images, self.device)

    def _step(self, x: torch.Tensor) -> dict:
        return self.trainer.step(x, self.step)

    def close(self) -> None:
        self.data.close()  # type: ignore[attr-defined]


def bench_tokenizer(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    preset, cfg = preset_config(args)
    t = cfg.tokenizer
    batch = args.tokenizer_batch or (8 if preset.startswith("paper") else t.batch_size)
    work = Path(tempfile.mkdtemp(prefix="mqgen-bench-train-tokenizer-"))
    try:
        t0 = time.perf_counter()
        shards = synthetic_shards(work / "shards", cfg, num_images=max(16 * batch, 256))
        lc = {"bench": "tokenizer", "config": cfg.to_dict(), "shards": shards, "batch": batch,
              "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "threads": args.threads}
        tok = cfg.tokenizer.model
        log(f"tokenizer: preset {preset}, {cfg.data.image_size} px x {cfg.data.channels} ch, batch {batch} per "
            f"process, grid {tok.grid_size}, keep {tok.keep_ratio:g}, K={tok.codebook_size}, device {device}, "
            f"{args.warmup} warm-up + {args.rounds} x {args.steps} timed steps per side and run; "
            f"{sum(n for _, n in shards)} images in {len(shards)} shards written in "
            f"{time.perf_counter() - t0:.1f}s")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bare = TokenizerBench(lc, device)
        bare.run(args.warmup)
        log(f"  MQ-VAE {bare.num_params / 1e6:.2f}M params, discriminator {bare.disc_params / 1e6:.2f}M, "
            f"GAN active from step {t.loss.disc_start} (timed steps start there)")
        workers = [w for w in args.tokenizer_workers if w * args.threads <= (os.cpu_count() or 1)]
        if args.ray and workers != args.tokenizer_workers:
            log(f"  skipping {sorted(set(args.tokenizer_workers) - set(workers))} workers: more CPUs than "
                f"this machine's {os.cpu_count()} at {args.threads} threads each")
        phases: dict[int, tuple[list[Round], list[Round], float | None]] = {}
        for n in workers if args.ray else [1]:
            phases[n] = take_turns(args, bare, lc, work, f"tokenizer-{n}w" if args.ray else "tokenizer",
                                   num_workers=n)
        bare.close()
        all_bare = [r for b, _, _ in phases.values() for r in b]
        bare_s = statistics.median(r.wall for r in all_bare)
        out: dict[str, Any] = {
            "preset": preset, "image_size": cfg.data.image_size, "channels": cfg.data.channels,
            "grid": tok.grid_size, "keep_ratio": tok.keep_ratio, "codebook_size": tok.codebook_size,
            "batch_per_process": batch, "threads": args.threads,
            "dtype": "bf16-autocast" if device.type == "cuda" else "fp32", "num_params": bare.num_params,
            "disc_params": bare.disc_params, "gan_active": True, "first_timed_step": t.loss.disc_start + args.warmup,
            "rounds": args.rounds, "steps_per_round": args.steps, **rounds_out("bare", all_bare),
            "bare_images_per_s": batch / bare_s, "final_loss": bare.loss}
        keys: dict[str, Any] = {"tokenizer_images_per_s": out["bare_images_per_s"]}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
            out["peak_memory_gib"] = keys["tokenizer_peak_memory_gib"] = peak
            log(f"  peak memory {peak:.2f} GiB (torch.cuda.max_memory_allocated)")
        for n, (bare_rounds, ray_rounds_, startup) in phases.items():
            if not ray_rounds_:
                continue
            suffix = "" if n == 1 else f"_{n}w"
            overhead, cpu_overhead = overheads(ray_rounds_, bare_rounds)
            ray_s = statistics.median(r.wall for r in ray_rounds_)
            out[f"ray_{n}w"] = {"workers": n, "global_batch": n * batch, "startup_s": startup,
                                **rounds_out("bare", bare_rounds), **rounds_out("ray", ray_rounds_),
                                "ray_images_per_s": n * batch / ray_s, "ray_overhead": overhead,
                                "ray_cpu_overhead": cpu_overhead}
            passed = report_overhead(f"tokenizer_ray_overhead{suffix}", overhead, cpu_overhead,
                                     TOKENIZER_RAY_OVERHEAD_TARGET if n == 1 else None)
            keys[f"tokenizer_ray_overhead{suffix}"] = overhead
            keys[f"tokenizer_ray_images_per_s{suffix}"] = n * batch / ray_s
            if n == 1:
                keys.update(tokenizer_ray_overhead_target=TOKENIZER_RAY_OVERHEAD_TARGET,
                            tokenizer_ray_overhead_pass=passed)
            log(f"  {n} Ray worker(s): {n * batch / ray_s:.1f} images/s in total "
                f"({n} x {batch} images per {ray_s * 1e3:.0f} ms step)")
        log(f"  bare {out['bare_images_per_s']:.1f} images/s ({batch} images per {bare_s * 1e3:.0f} ms step)")
        return {**keys, "tokenizer": out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------- main

BENCHES: dict[str, type] = {"stackformer": StackformerBench, "tokenizer": TokenizerBench}

PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "stackformer": bench_stackformer,
    "tokenizer": bench_tokenizer,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", choices=tuple(PARTS), action="append",
                   help="run only these parts (repeatable); the JSON then lacks the other keys")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU, in this process and in each Ray worker (which "
                   "reserves as many CPUs)")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the step inside Ray Train workers too (default: on for CPU, off for CUDA)")
    p.add_argument("--preset", default="fmnist", choices=(*PRESETS, "paper"),
                   help="config preset of the models and batches ('paper' = paper-f8)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. --set stackformer.model=fullgrid "
                   "--set tokenizer.keep_ratio=1.0")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps on each side before the rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=6,
                   help="rounds per Ray run; bare and Ray take turns, one round each")
    g = p.add_argument_group("Stackformer step")
    g.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="labels in the synthetic data (0 = unconditional; default: 1000 for paper presets, "
                   "else 10)")
    g.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="peak FLOP/s of the device for the MFU figure (default: H200 dense bf16)")
    g = p.add_argument_group("Tokenizer step")
    g.add_argument("--tokenizer-batch", type=int, default=None,
                   help="images per step in each process (default: 8 for paper presets, else the preset's "
                   "tokenizer.batch_size)")
    g.add_argument("--tokenizer-workers", type=int, nargs="+", default=[1, 2],
                   help="Ray runs to measure, by worker count (each worker takes --tokenizer-batch images)")
    args = p.parse_args(argv)
    if args.ray is None:
        args.ray = not args.device.startswith("cuda")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = load_average()
    log(f"mqgen training-step benchmarks: torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {args.threads} threads, {os.cpu_count()} CPUs, load average {load_start}"))
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "argv": sys.argv[1:] if argv is None else argv}
    for name in args.only or list(PARTS):
        result.update(PARTS[name](args))
    result["load_average"] = {"start": load_start, "end": load_average()}
    result["total_s"] = round(time.perf_counter() - started, 1)
    log(f"total {result['total_s']:.0f}s")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
