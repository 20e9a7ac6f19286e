"""Training-step benchmarks: each stage's step inside a Ray Train worker against the bare step in one process.

Not a timed test: it measures and prints, then prints one JSON line last. Figures are recorded in
``docs/benchmarks.md``. Each part is a function in :data:`PARTS` that returns the keys it adds to that line;
``--only`` picks parts.

``stackformer`` (``tasks.train_stackformer``):

1. Data: a synthetic token database (LMDB, written with ``infra.tokens.TokenWriter``) with the preset's
   codebook, grid and sequence length, uniform random codes, random raster-sorted positions and labels.
2. The timed step is the stage's: the next batch from :class:`tasks.train_stackformer.TrainBatches` (the
   DistributedSampler order over the LMDB reader), ``to_batch``, the per-step seed, and
   :meth:`tasks.train_stackformer.StackformerTrainer.step` (AdamW, clipping, bf16 autocast on CUDA), with
   a device synchronisation after each step. ``--warmup`` untimed steps first; the figure is the median
   over ``--steps`` timed steps.
3. Bare: in this process. Ray: the same function inside a 1-worker Ray Train run (``infra.ray.fit``), timed
   inside the worker (Ray start-up and worker creation excluded). Bare runs before and after the Ray run
   (the machine's load drifts) and their mean is the baseline. Both use ``--threads`` torch threads (the
   Ray worker reserves as many CPUs).
4. ``stackformer_ray_overhead`` = Ray step time / bare step time - 1 (target <= 0.10). Also tokens/s of
   both and the model FLOPs utilisation ``stackformer_mfu`` = 6 * parameters * tokens/s / peak FLOP/s
   (``--peak-tflops``; the default 989 is an H200's dense bf16 peak, meaningful only with ``--device cuda``).

Usage (CPU, the figures in docs/benchmarks.md)::

    .venv/bin/python benchmarks/train.py

On a GPU, the paper Stackformer (12 + 12 layers, width 1024, 256 tokens, 1000 classes) at bf16::

    .venv/bin/python benchmarks/train.py --device cuda --preset paper-f8 --no-ray
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python benchmarks/train.py``, Python puts benchmarks/ first on sys.path, where sibling scripts
# (benchmarks/models.py, benchmarks/tokenize.py) would shadow the ``models`` package and standard-library
# modules: import from the repository root instead.
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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from infra.config import PRESETS, PipelineConfig, from_dict, mqvae_config, resolve

H200_BF16_DENSE_TFLOPS = 989.0
STACKFORMER_RAY_OVERHEAD_TARGET = 0.10


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


# --------------------------------------------------------------------------------------------- stackformer


def synthetic_tokens(path: Path, cfg: PipelineConfig, *, num_classes: int, num_records: int, seed: int = 0
                     ) -> str:
    """A complete token database of ``num_records`` random records shaped for ``cfg``'s tokenizer."""
    from infra.tokens import TokenMeta, TokenWriter

    tok = mqvae_config(cfg)
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


class StepBench:
    """The stage's model, trainer and data path built from the JSON-able ``lc``, timing its steps.

    Used in this process (bare) and inside the Ray worker. :meth:`run` takes ``n`` more steps and returns
    the seconds of each (device synchronised before and after).
    """

    def __init__(self, lc: dict[str, Any], device: torch.device) -> None:
        from infra.config import fullgrid_config, stackformer_config
        from infra.tokens import TokenDataset
        from tasks.train_stackformer import IndexedTokens, StackformerTrainer, TrainBatches, new_model

        if device.type == "cpu":
            torch.set_num_threads(lc["threads"])
        self.cfg: PipelineConfig = from_dict(PipelineConfig, lc["config"])
        s = self.cfg.stackformer
        self.device = device
        self.dataset = TokenDataset(lc["db"])
        build = stackformer_config if s.model == "stackformer" else fullgrid_config
        model_cfg = build(self.cfg, num_classes=self.dataset.meta.num_classes)
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

    def run(self, n: int) -> list[tuple[float, float]]:
        """``n`` more steps; ``(wall seconds, CPU seconds of this thread)`` of each."""
        from tasks.train_stackformer import STAGE, derive_seed, to_batch

        times = []
        for _ in range(n):
            sync(self.device)
            t0, c0 = time.perf_counter(), time.thread_time()
            _, items = next(self.batches)
            batch = to_batch(items, self.device, self.conditional)
            torch.manual_seed(derive_seed(self.cfg.seed, STAGE, "train", 0, self.step))
            logs = self.trainer.step(batch, self.step)
            sync(self.device)
            times.append((time.perf_counter() - t0, time.thread_time() - c0))
            self.step += 1
        self.loss = float(logs["loss"]) if n else self.loss
        if not math.isfinite(self.loss):
            raise FloatingPointError(f"benchmark loss is {self.loss} at step {self.step}")
        return times

    def close(self) -> None:
        self.batches.close()
        self.dataset.close()


def _wait_for(path: Path, alive: Callable[[], bool], what: str, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if not alive():
            raise RuntimeError(f"the Ray measurement ended before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f}s")
        time.sleep(0.05)


def _medians(times: list[list[float]] | list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall and median CPU seconds per step of one round."""
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def _ms(medians: tuple[float, float]) -> str:
    return f"{medians[0] * 1e3:.1f} ms/step (CPU {medians[1] * 1e3:.1f})"


def ray_rounds(lc: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the Ray measurement: warm up, then one round of timed steps each time the
    driver writes ``go-<r>`` into ``lc["turns"]``, answering with the step times in ``done-<r>.json``."""
    from infra import ray as rayx

    w = rayx.worker()
    bench = StepBench(lc, w.device)
    turns = Path(lc["turns"])
    bench.run(lc["warmup"])
    (turns / "ready").write_text(str(bench.num_params))
    for r in range(lc["rounds"]):
        _wait_for(turns / f"go-{r}", turns.exists, f"the driver's turn {r}")
        times = bench.run(lc["steps"])
        tmp = turns / f".done-{r}.json"
        tmp.write_text(json.dumps(times))
        tmp.replace(turns / f"done-{r}.json")
    bench.close()
    summary = {"ray_steps": float(lc["rounds"] * lc["steps"]), "final_loss": bench.loss}
    ckpt = rayx.scratch_dir()  # Ray Train keeps the metrics of reports that carry a checkpoint
    Path(ckpt, "summary.json").write_text(json.dumps(summary))
    w.report(summary, checkpoint_dir=ckpt)


def bench_stackformer(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    preset = "paper-f8" if args.preset == "paper" else args.preset
    overrides = list(args.set or [])
    if args.batch is not None:
        overrides.append(f"stackformer.batch_size={args.batch}")
    cfg = resolve(preset, overrides=overrides)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = 1000 if preset.startswith("paper") else 10
    work = Path(tempfile.mkdtemp(prefix="mqgen-bench-train-"))
    try:
        records = max(4 * cfg.stackformer.batch_size, 256)
        db = synthetic_tokens(work / "train.lmdb", cfg, num_classes=num_classes, num_records=records)
        turns = work / "turns"
        turns.mkdir()
        lc = {"config": cfg.to_dict(), "db": db, "warmup": args.warmup, "steps": args.steps,
              "rounds": args.rounds, "threads": args.threads, "turns": str(turns)}
        tok = mqvae_config(cfg)
        log(f"stackformer ({cfg.stackformer.model}): preset {preset}, batch {cfg.stackformer.batch_size}, "
            f"{num_classes} classes, K={tok.codebook_size}, grid {tok.grid_size}, device {device}, "
            f"{args.warmup} warm-up + {args.rounds} x {args.steps} timed steps per side")
        bare = StepBench(lc, device)
        bare.run(args.warmup)
        log(f"  {bare.num_params / 1e6:.2f}M params, {bare.tokens_per_step} tokens/step")
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-fit")
        fit: Future | None = None
        if args.ray:
            from infra import ray as rayx

            t0 = time.perf_counter()
            fit = pool.submit(rayx.fit, ray_rounds, lc, name=f"bench-stackformer-{uuid.uuid4().hex[:8]}",
                              storage_path=str(work / "ray"), num_workers=1, use_gpu=device.type == "cuda",
                              cpus_per_worker=args.threads, max_failures=0)
            _wait_for(turns / "ready", lambda: not fit.done(), "the Ray worker was ready")
            log(f"  Ray worker ready after {time.perf_counter() - t0:.0f}s (start-up, not timed)")
        bare_rounds: list[tuple[float, float]] = []  # per round: median wall, median CPU seconds per step
        ray_rounds_: list[tuple[float, float]] = []
        for r in range(args.rounds):
            bare_rounds.append(_medians(bare.run(args.steps)))
            line = f"  round {r + 1}/{args.rounds}: bare {_ms(bare_rounds[-1])}"
            if fit is not None:
                (turns / f"go-{r}").write_text("")
                _wait_for(turns / f"done-{r}.json", lambda: not fit.done(), f"Ray round {r}")
                ray_rounds_.append(_medians(json.loads((turns / f"done-{r}.json").read_text())))
                line += f", ray {_ms(ray_rounds_[-1])}"
            log(line)
        bare.close()
        if fit is not None:
            fit.result()  # re-raises a failed Ray run
        pool.shutdown()
        bare_s = statistics.median(w for w, _ in bare_rounds)
        out: dict[str, Any] = {
            "preset": preset, "model": cfg.stackformer.model, "num_classes": num_classes,
            "batch": cfg.stackformer.batch_size, "threads": args.threads,
            "dtype": "bf16-autocast" if device.type == "cuda" else "fp32", "num_params": bare.num_params,
            "tokens_per_step": bare.tokens_per_step, "rounds": args.rounds, "steps_per_round": args.steps,
            "bare_step_ms": bare_s * 1e3, "bare_step_ms_rounds": [round(w * 1e3, 2) for w, _ in bare_rounds],
            "bare_step_cpu_ms_rounds": [round(c * 1e3, 2) for _, c in bare_rounds],
            "bare_tokens_per_s": bare.tokens_per_step / bare_s, "final_loss": bare.loss,
            "peak_tflops": args.peak_tflops}
        flops_per_s = 6 * bare.num_params * out["bare_tokens_per_s"]
        out["model_tflops_per_s"] = flops_per_s / 1e12
        keys: dict[str, Any] = {"stackformer_tokens_per_s": out["bare_tokens_per_s"],
                                "stackformer_mfu": flops_per_s / (args.peak_tflops * 1e12)}
        if ray_rounds_:
            ray_s = statistics.median(w for w, _ in ray_rounds_)
            pairs = list(zip(ray_rounds_, bare_rounds))
            overhead = statistics.median(rw / bw for (rw, _), (bw, _) in pairs) - 1
            cpu_overhead = statistics.median(rc / bc for (_, rc), (_, bc) in pairs) - 1
            out.update(ray_step_ms=ray_s * 1e3,
                       ray_step_ms_rounds=[round(w * 1e3, 2) for w, _ in ray_rounds_],
                       ray_step_cpu_ms_rounds=[round(c * 1e3, 2) for _, c in ray_rounds_],
                       ray_tokens_per_s=bare.tokens_per_step / ray_s, ray_cpu_overhead=cpu_overhead)
            passed = overhead <= STACKFORMER_RAY_OVERHEAD_TARGET
            keys.update(stackformer_ray_overhead=overhead,
                        stackformer_ray_overhead_target=STACKFORMER_RAY_OVERHEAD_TARGET,
                        stackformer_ray_overhead_pass=passed)
            log(f"  stackformer_ray_overhead {overhead:+.3f} (median of per-round wall-time ratios; target "
                f"<= {STACKFORMER_RAY_OVERHEAD_TARGET:g}: {'PASS' if passed else 'FAIL'}); CPU time of the "
                f"training thread {cpu_overhead:+.3f}")
        log(f"  bare {out['bare_tokens_per_s']:.0f} tokens/s, {out['model_tflops_per_s']:.3g} model TFLOP/s, "
            f"MFU {keys['stackformer_mfu']:.3g} of {args.peak_tflops:g} TFLOP/s")
        return {**keys, "stackformer": out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------- main

PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "stackformer": bench_stackformer,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", choices=tuple(PARTS), action="append",
                   help="run only these parts (repeatable); the JSON then lacks the other keys")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU, in this process and in the Ray worker (which "
                   "reserves as many CPUs)")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the step inside a Ray Train worker too (default: on for CPU, off for CUDA)")
    g = p.add_argument_group("Stackformer step")
    g.add_argument("--preset", default="fmnist", choices=(*PRESETS, "paper"),
                   help="config preset of the model and batch ('paper' = paper-f8)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. --set stackformer.model=fullgrid "
                   "--set tokenizer.keep_ratio=1.0")
    g.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="labels in the synthetic data (0 = unconditional; default: 1000 for paper presets, "
                   "else 10)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps on each side before the rounds")
    g.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    g.add_argument("--rounds", type=int, default=6, help="rounds; bare and Ray take turns, one round each")
    g.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="peak FLOP/s of the device for the MFU figure (default: H200 dense bf16)")
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
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
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
