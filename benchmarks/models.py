"""Model benchmarks: MQ-VAE training step, Stackformer KV cache, Stackformer vs the full-grid baseline.

Not a timed test: it measures, prints human-readable lines, then prints one JSON line last. The figures are
recorded in ``docs/benchmarks.md`` (section ``## Models``).

1. ``mqvae_step_ratio``: time per :meth:`tasks.train_tokenizer.TokenizerTrainer.step` (the stage's own step:
   MQ-VAE forward with the EMA codebook update, autoencoder loss with the adaptive GAN weight, autoencoder
   Adam step, discriminator step) with the GAN active (``step >= disc_start``) at the preset's keep ratio,
   over the same at ``keep_ratio = 1.0`` (the keep-1.0 ablation, masker bypassed): same architecture, same
   batch; target <= 1.25. ``mqvae_step_ratio_vs_vqgan`` is the same step over the plain VQGAN tokenizer
   (``architecture=vqgan``: no masker, no de-masker; the paper's baseline), the cost of the two modules. Keep
   0.75 and the random scorer are reported too.
2. ``kv_cache_speedup``: :meth:`models.stackformer.Stackformer.sample` with ``use_cache=False`` (the
   reference algorithm: re-run the whole prefix every step) over ``use_cache=True``; same model, seed and
   batch, sequence length ``round(kv_keep * kv_grid**2)`` (256 by default). Every call must return the same
   tokens (asserted). Target >= 5.
3. ``speedup_vs_fullgrid_keep075`` / ``_keep050``: sampling images/s of a Stackformer at keep 0.75 / 0.5 of a
   ``grid x grid`` latent grid (``seq_len = round(keep * grid**2)``) over that of
   :class:`models.stackformer.FullGridTransformer` with ``n_layer = n_layer_code + n_layer_pos`` and the same
   width, all with KV caches, same batch. Target >= 0.9 / keep.

Method: the compared variants run interleaved round by round (A, B, C, A, B, C, ...) after a warm-up, so a
change in machine load hits all of them; a time is the median over rounds and a ratio the median of the
per-round ratios. Both the wall clock and this process's CPU time are recorded; the headline figures use
``--clock`` (default: CPU time on a CPU with one thread, wall clock otherwise). With one intra-op thread the
process's CPU time equals its wall time on an idle machine, and it stays steady when other jobs share the
cores, which inflates the wall clock by whatever share of the cores they take.

Weights are random (``init_weights``) plus a fixed N(0, s^2) perturbation, ``s = 0.1 * sqrt(192 / n_embd)``
(0.1 at width 192), so the step embedding is non-zero and the logits are moderately peaked (mean top-1
probability ~0.1 at width 192) like a trained model's. A much larger perturbation (0.3 at width 192) blows up
the residual stream, and float32 rounding then flips a draw between the cached and the uncached sampler
within 256 steps. Widths, depths, codebook size and sampling parameters come from the
preset's ``tokenizer``, ``stackformer`` and ``evaluate.sampling`` sections.

Usage (the figures in docs/benchmarks.md)::

    .venv/bin/python benchmarks/models.py

The paper configuration on a GPU (bf16 autocast in the tokenizer step, as in the stage)::

    .venv/bin/python benchmarks/models.py --device cuda --preset paper-f8 --num-classes 1000 --batch 8 \\
        --kv-grid 32 --kv-keep 0.25 --kv-batch 8 --grid 32 --sample-batch 64
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python benchmarks/models.py``, Python puts benchmarks/ first on sys.path, where this very file
# would shadow the ``models`` package: import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch

from infra.config import PipelineConfig, replace, resolve
from models.losses import VQGANLoss
from models.mqvae import MQVAE
from models.stackformer import (
    FullGridConfig,
    FullGridTransformer,
    SamplingParams,
    Stackformer,
    StackformerConfig,
)
from tasks.train_tokenizer import TokenizerTrainer

MQVAE_TARGET = 1.25  # at most
KV_TARGET = 5.0  # at least
FULLGRID_FACTOR = 0.9  # at least 0.9 / keep
PERTURBATION = 0.1  # std of the weight perturbation at width 192, scaled by sqrt(192 / n_embd)


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


class Timings:
    """Per-round seconds per call of each variant, on both clocks; ``clock`` picks the headline one."""

    def __init__(self, names: list[str], clock: str) -> None:
        self.clock = clock
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}

    def rounds(self, clock: str | None = None) -> dict[str, list[float]]:
        return self.cpu if (clock or self.clock) == "cpu" else self.wall

    def median(self, name: str, clock: str | None = None) -> float:
        return statistics.median(self.rounds(clock)[name])

    def ratio(self, num: str, den: str, clock: str | None = None) -> float:
        """Median over rounds of ``time(num) / time(den)``."""
        r = self.rounds(clock)
        return statistics.median(a / b for a, b in zip(r[num], r[den], strict=True))

    def summary(self) -> dict:
        """Median seconds on the headline clock and on both clocks, and the raw rounds."""
        return {"clock": self.clock,
                "median_s": {n: round(self.median(n), 5) for n in self.wall},
                "median_wall_s": {n: round(self.median(n, "wall"), 5) for n in self.wall},
                "median_cpu_s": {n: round(self.median(n, "cpu"), 5) for n in self.wall},
                "rounds_wall_s": {n: [round(t, 4) for t in v] for n, v in self.wall.items()},
                "rounds_cpu_s": {n: [round(t, 4) for t in v] for n, v in self.cpu.items()}}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, clock: str,
                calls: dict[str, int] | None = None) -> Timings:
    """Time every ``fns[name]`` in each of ``rounds`` rounds, the variants interleaved within a round.

    ``calls[name]`` calls (default 1) are timed together per round and the time divided by it. CPU time is
    the whole process's (every thread).
    """
    calls = calls or {}
    t = Timings(list(fns), clock)
    for r in range(rounds):
        for name, fn in fns.items():
            n = calls.get(name, 1)
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            sync(device)
            t.wall[name].append((time.perf_counter() - w0) / n)
            t.cpu[name].append((time.process_time() - c0) / n)
        log(f"    round {r + 1}: "
            + "  ".join(f"{k} {t.wall[k][-1]:.3f}s (cpu {t.cpu[k][-1]:.3f}s)" for k in fns))
    return t


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- 1. MQ-VAE step


def step_fn(trainer: TokenizerTrainer, x: torch.Tensor, first_step: int) -> Callable[[], object]:
    """``trainer.step(x, step)`` with ``step = first_step, first_step + 1, ...`` on successive calls."""
    steps = iter(range(first_step, first_step + 1_000_000))
    return lambda: trainer.step(x, next(steps))


def bench_mqvae(args: argparse.Namespace, base: PipelineConfig, device: torch.device) -> dict:
    keep = base.tokenizer.model.keep_ratio
    batch = args.batch or base.tokenizer.batch_size
    if keep == 1.0:
        raise SystemExit(f"preset {args.preset} has keep_ratio 1.0: nothing to compare")
    variants = {f"keep{keep:g}": {"keep_ratio": keep, "scorer": "learned"},
                f"keep{keep:g}_random": {"keep_ratio": keep, "scorer": "random"},
                "keep0.75": {"keep_ratio": 0.75, "scorer": "learned"},
                "keep1": {"keep_ratio": 1.0, "scorer": "learned"},
                "vqgan": {"architecture": "vqgan", "keep_ratio": 1.0}}
    x = torch.rand(batch, base.data.channels, base.data.image_size, base.data.image_size,
                   generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1).to(device)
    fns: dict[str, Callable[[], object]] = {}
    params: dict[str, int] = {}
    for name, over in variants.items():
        cfg = replace(base, tokenizer=over)
        t = cfg.tokenizer
        torch.manual_seed(0)
        model = MQVAE(cfg.tokenizer.model).to(device)
        loss = VQGANLoss(cfg.tokenizer.loss, in_channels=cfg.data.channels).to(device)
        if not loss.is_gan_active(t.loss.disc_start):
            raise SystemExit("the GAN never becomes active with this preset (disc_factor 0?)")
        trainer = TokenizerTrainer(model, loss, lr=t.lr, warmup_steps=t.warmup_steps,
                                   max_steps=max(t.max_steps, t.loss.disc_start + 1000), device=device,
                                   grad_accum=t.grad_accum)
        params[name] = sum(p.numel() for p in model.parameters())
        fns[name] = step_fn(trainer, x, t.loss.disc_start)
    log(f"[mqvae] TokenizerTrainer.step, preset {args.preset} ({base.data.image_size}px, "
        f"{base.data.channels} ch, grid {base.tokenizer.model.grid_size}), batch {batch}, GAN active; "
        f"{args.warmup} warm-up + {args.mqvae_rounds} rounds x {args.mqvae_steps} steps per variant")
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    t = interleaved(fns, args.mqvae_rounds, device, args.clock, {k: args.mqvae_steps for k in fns})
    ratios = {k: round(t.ratio(k, "keep1"), 4) for k in fns if k != "keep1"}
    vs_vqgan = {k: round(t.ratio(k, "vqgan"), 4) for k in fns if k != "vqgan"}
    for k in fns:
        line = (f"  {k:13s} {t.median(k) * 1000:8.1f} ms/step ({args.clock})   "
                f"wall {t.median(k, 'wall') * 1000:8.1f}  cpu {t.median(k, 'cpu') * 1000:8.1f}")
        if k in ratios:
            line += (f"   x{ratios[k]:.3f} vs keep 1 (wall x{t.ratio(k, 'keep1', 'wall'):.3f}, "
                     f"cpu x{t.ratio(k, 'keep1', 'cpu'):.3f})")
        if k in vs_vqgan:
            line += f"   x{vs_vqgan[k]:.3f} vs vqgan"
        log(line)
    headline = ratios[f"keep{keep:g}"]
    log(f"  mqvae_step_ratio x{headline:.3f} vs the keep-1.0 ablation "
        f"(target <= {MQVAE_TARGET:g}: {verdict(headline <= MQVAE_TARGET)}); x{vs_vqgan[f'keep{keep:g}']:.3f} vs the "
        "plain VQGAN (masker and de-masker cost)")
    return {"mqvae_step_ratio": headline, "mqvae_step_ratio_vs_vqgan": vs_vqgan[f"keep{keep:g}"],
            "ratio_vs_vqgan": vs_vqgan, "target": MQVAE_TARGET, "pass": headline <= MQVAE_TARGET,
            "batch": batch, "keep_ratio": keep, "variants": variants, "params": params,
            "rounds": args.mqvae_rounds, "steps_per_round": args.mqvae_steps, "warmup_steps": args.warmup,
            "ratio_vs_keep1": ratios,
            "ratio_vs_keep1_wall": {k: round(t.ratio(k, "keep1", "wall"), 4) for k in ratios},
            "ratio_vs_keep1_cpu": {k: round(t.ratio(k, "keep1", "cpu"), 4) for k in ratios},
            "seconds_per_step": t.summary()}


# --------------------------------------------------------------------------------------------- 2-3. sampling


def perturbed(model: torch.nn.Module, seed: int, device: torch.device) -> torch.nn.Module:
    """``model`` in eval mode on ``device``, each parameter plus a fixed N(0, s^2) draw (module docstring)."""
    std = PERTURBATION * math.sqrt(192 / model.config.n_embd)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.to(device).eval()


def stackformer(args: argparse.Namespace, base: PipelineConfig, grid: int, keep: float,
                device: torch.device) -> Stackformer:
    s = base.stackformer
    torch.manual_seed(0)
    cfg = StackformerConfig(codebook_size=base.tokenizer.model.codebook_size, grid_size=grid,
                            seq_len=round(keep * grid * grid), num_classes=args.num_classes,
                            n_layer_code=s.n_layer_code, n_layer_pos=s.n_layer_pos, n_embd=s.n_embd,
                            n_head=s.n_head, dropout=s.dropout)
    return perturbed(Stackformer(cfg), 1, device)


def fullgrid(args: argparse.Namespace, base: PipelineConfig, grid: int, device: torch.device
             ) -> FullGridTransformer:
    s = base.stackformer
    torch.manual_seed(0)
    cfg = FullGridConfig(codebook_size=base.tokenizer.model.codebook_size, grid_size=grid,
                         num_classes=args.num_classes, n_layer=s.n_layer_code + s.n_layer_pos,
                         n_embd=s.n_embd, n_head=s.n_head, dropout=s.dropout)
    return perturbed(FullGridTransformer(cfg), 2, device)


def sampling_params(base: PipelineConfig) -> tuple[SamplingParams, SamplingParams]:
    s = base.evaluate.sampling
    return (SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
            SamplingParams(temperature=s.pos_temperature, top_k=s.pos_top_k, top_p=s.pos_top_p))


def labels_for(args: argparse.Namespace, batch: int, device: torch.device) -> torch.Tensor | None:
    return None if args.num_classes == 0 else (torch.arange(batch) % args.num_classes).to(device)


def seeded(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1234)


def bench_kv(args: argparse.Namespace, base: PipelineConfig, device: torch.device) -> dict:
    model = stackformer(args, base, args.kv_grid, args.kv_keep, device)
    c, B = model.config, args.kv_batch
    code_p, pos_p = sampling_params(base)
    labels = labels_for(args, B, device)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sampler(use_cache: bool) -> Callable[[], object]:
        return lambda: outputs.append(model.sample(B, labels, code_p, pos_p, use_cache=use_cache,
                                                   generator=seeded(device)))

    log(f"[kv-cache] Stackformer.sample, n_embd {c.n_embd}, {c.n_layer_code}+{c.n_layer_pos} layers, grid "
        f"{c.grid_size}, seq_len {c.seq_len}, batch {B}; warm-up + {args.kv_rounds} rounds "
        f"({args.kv_cached_calls} cached calls, 1 uncached call per round)")
    sampler(True)()  # warm-up; the uncached sampler's first (timed) call is long enough to be its own
    t = interleaved({"cached": sampler(True), "uncached": sampler(False)}, args.kv_rounds, device, args.clock,
                    {"cached": args.kv_cached_calls})
    same = all(torch.equal(a, b) for out in outputs for a, b in zip(out, outputs[0], strict=True))
    if not same:
        raise AssertionError("cached and uncached sampling returned different tokens for the same seed")
    log(f"  tokens identical in all {len(outputs)} calls, with and without the cache")
    speedup = t.ratio("uncached", "cached")
    log(f"  cached {t.median('cached'):.3f}s  uncached {t.median('uncached'):.3f}s ({args.clock})  "
        f"speedup x{speedup:.2f} (wall x{t.ratio('uncached', 'cached', 'wall'):.2f}, "
        f"cpu x{t.ratio('uncached', 'cached', 'cpu'):.2f}; "
        f"target >= {KV_TARGET:g}: {verdict(speedup >= KV_TARGET)})")
    return {"kv_cache_speedup": round(speedup, 3), "target": KV_TARGET, "pass": speedup >= KV_TARGET,
            "speedup_wall": round(t.ratio("uncached", "cached", "wall"), 3),
            "speedup_cpu": round(t.ratio("uncached", "cached", "cpu"), 3),
            "tokens_identical": same, "calls_compared": len(outputs), "batch": B, "rounds": args.kv_rounds,
            "config": {"n_embd": c.n_embd, "n_head": c.n_head, "n_layer_code": c.n_layer_code,
                       "n_layer_pos": c.n_layer_pos, "grid_size": c.grid_size, "seq_len": c.seq_len,
                       "codebook_size": c.codebook_size, "num_classes": c.num_classes},
            "seconds_per_call": t.summary()}


def bench_fullgrid(args: argparse.Namespace, base: PipelineConfig, device: torch.device) -> dict:
    G, B = args.grid, args.sample_batch
    code_p, pos_p = sampling_params(base)
    baseline = fullgrid(args, base, G, device)
    keeps = (0.75, 0.5)
    models = {f"keep{k:g}": stackformer(args, base, G, k, device) for k in keeps}

    def sampler(model: torch.nn.Module, batch: int) -> Callable[[], object]:
        labels = labels_for(args, batch, device)
        if isinstance(model, FullGridTransformer):
            return lambda: model.sample(batch, labels, code_p, use_cache=True, generator=seeded(device))
        return lambda: model.sample(batch, labels, code_p, pos_p, use_cache=True, generator=seeded(device))

    all_models = {"fullgrid": baseline, **models}
    s = models["keep0.5"].config
    log(f"[vs full grid] sample() with KV caches, grid {G}x{G}, batch {B} images, n_embd {s.n_embd}: "
        f"full grid {baseline.config.n_layer} layers x {G * G} steps vs Stackformer "
        f"{s.n_layer_code}+{s.n_layer_pos} "
        "layers x " + " / ".join(f"{m.config.seq_len} steps ({k})" for k, m in models.items())
        + f"; warm-up (batch {args.sample_warmup_batch}) + {args.sample_rounds} rounds")
    for m in all_models.values():
        sampler(m, args.sample_warmup_batch)()
    t = interleaved({k: sampler(m, B) for k, m in all_models.items()}, args.sample_rounds, device, args.clock)
    out: dict = {"grid_size": G, "batch": B, "rounds": args.sample_rounds,
                 "seq_len": {"fullgrid": G * G, **{k: m.config.seq_len for k, m in models.items()}},
                 "fullgrid_n_layer": baseline.config.n_layer, "n_layer_code": s.n_layer_code,
                 "n_layer_pos": s.n_layer_pos, "n_embd": s.n_embd, "n_head": s.n_head,
                 "codebook_size": s.codebook_size, "num_classes": s.num_classes,
                 "params": {k: sum(p.numel() for p in m.parameters()) for k, m in all_models.items()},
                 "images_per_s": {k: round(B / t.median(k), 3) for k in all_models},
                 "images_per_s_wall": {k: round(B / t.median(k, "wall"), 3) for k in all_models},
                 "images_per_s_cpu": {k: round(B / t.median(k, "cpu"), 3) for k in all_models},
                 "seconds_per_batch": t.summary()}
    log(f"  full grid  {out['images_per_s']['fullgrid']:8.2f} images/s ({args.clock})  "
        f"wall {out['images_per_s_wall']['fullgrid']:.2f}  cpu {out['images_per_s_cpu']['fullgrid']:.2f}")
    for k in keeps:
        name, tag = f"keep{k:g}", f"keep{round(k * 100):03d}"
        ratio, target = t.ratio("fullgrid", name), FULLGRID_FACTOR / k
        out[f"speedup_vs_fullgrid_{tag}"] = round(ratio, 3)
        out[f"speedup_vs_fullgrid_{tag}_wall"] = round(t.ratio("fullgrid", name, "wall"), 3)
        out[f"speedup_vs_fullgrid_{tag}_cpu"] = round(t.ratio("fullgrid", name, "cpu"), 3)
        out[f"target_{tag}"] = round(target, 3)
        out[f"pass_{tag}"] = ratio >= target
        log(f"  keep {k:<4g}  {out['images_per_s'][name]:8.2f} images/s ({args.clock})  x{ratio:.2f} vs "
            f"full grid (wall x{out[f'speedup_vs_fullgrid_{tag}_wall']:.2f}, "
            f"cpu x{out[f'speedup_vs_fullgrid_{tag}_cpu']:.2f}; "
            f"target >= {target:.2f}: {verdict(ratio >= target)})")
    return out


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MQ-VAE / Stackformer benchmarks (see the module docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--preset", default="fmnist", help="config preset for every model (infra.config.PRESETS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override on top of the preset (repeatable), e.g. stackformer.n_embd=192")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (CPU). 1 by default: on this shared 2-core machine two "
                   "threads ran up to ~30x slower and far noisier (see docs/benchmarks.md)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="headline clock; auto = process CPU time on a CPU with 1 thread, else wall clock")
    p.add_argument("--only", choices=("mqvae", "kv", "fullgrid"), action="append",
                   help="run only these parts (repeatable); the JSON line then lacks the others' keys")
    g = p.add_argument_group("MQ-VAE training step")
    g.add_argument("--batch", type=int, default=None,
                   help="images per TokenizerTrainer.step (default: the preset's tokenizer.batch_size)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    g.add_argument("--mqvae-rounds", type=int, default=12, help="interleaved timing rounds")
    g.add_argument("--mqvae-steps", type=int, default=2, help="timed steps per variant per round")
    g = p.add_argument_group("Stackformer sampling")
    g.add_argument("--num-classes", type=int, default=10, help="classes of the class-conditional models "
                   "(0 = unconditional)")
    g.add_argument("--kv-grid", type=int, default=16, help="latent grid side of the KV-cache comparison")
    g.add_argument("--kv-keep", type=float, default=1.0, help="seq_len = round(kv_keep * kv_grid**2)")
    g.add_argument("--kv-batch", type=int, default=4, help="sequences per sample() call")
    g.add_argument("--kv-rounds", type=int, default=3, help="interleaved timing rounds")
    g.add_argument("--kv-cached-calls", type=int, default=2, help="cached calls timed together per round")
    g.add_argument("--grid", type=int, default=16, help="latent grid side of the full-grid comparison")
    g.add_argument("--sample-batch", type=int, default=64, help="images per sample() call in the comparison")
    g.add_argument("--sample-warmup-batch", type=int, default=2, help="batch of the untimed warm-up calls")
    g.add_argument("--sample-rounds", type=int, default=5, help="interleaved timing rounds")
    args = p.parse_args(argv)
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    base = resolve(args.preset, overrides=args.overrides)
    parts = args.only or ["mqvae", "kv", "fullgrid"]
    started = time.perf_counter()
    load_start = load_average()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                              platform.machine())
    log(f"mqgen model benchmarks: torch {torch.__version__}, device {device} ({name}), "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load_start}, "
        f"headline clock: {args.clock}")
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                    "device_name": name, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "clock": args.clock, "preset": args.preset, "overrides": args.overrides,
                    "argv": sys.argv[1:] if argv is None else argv}
    if "mqvae" in parts:
        result["mqvae"] = bench_mqvae(args, base, device)
        result["mqvae_step_ratio"] = result["mqvae"]["mqvae_step_ratio"]
    if "kv" in parts:
        result["kv"] = bench_kv(args, base, device)
        result["kv_cache_speedup"] = result["kv"]["kv_cache_speedup"]
    if "fullgrid" in parts:
        result["fullgrid"] = bench_fullgrid(args, base, device)
        for key in ("speedup_vs_fullgrid_keep075", "speedup_vs_fullgrid_keep050"):
            result[key] = result["fullgrid"][key]
    result["targets"] = {"mqvae_step_ratio": f"<= {MQVAE_TARGET}", "kv_cache_speedup": f">= {KV_TARGET}",
                         "speedup_vs_fullgrid_keep075": f">= {FULLGRID_FACTOR / 0.75:.3f}",
                         "speedup_vs_fullgrid_keep050": f">= {FULLGRID_FACTOR / 0.5:.3f}"}
    result["all_pass"] = all(result[k]["pass"] for k in ("mqvae", "kv") if k in result) and all(
        result["fullgrid"][f"pass_{t}"] for t in ("keep075", "keep050") if "fullgrid" in result)
    result["load_average"] = {"start": load_start, "end": load_average()}
    result["total_s"] = round(time.perf_counter() - started, 1)
    log(f"all targets met: {result['all_pass']}; total {result['total_s']:.0f}s")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
