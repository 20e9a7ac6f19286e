"""Model benchmarks: MQ-VAE training step, Stackformer KV cache, Stackformer vs the full-grid baseline.

Not a timed test: it measures and prints, then prints one JSON line last. Figures are recorded in
``docs/benchmarks.md`` (section ``## Models``). Every ratio is measured within one run, with the compared
variants interleaved round by round (A, B, C, A, B, C, ...) so that a change in machine load hits all of
them; each ratio is the median of the per-round ratios, each time the median over rounds.

1. ``mqvae_step_ratio``: seconds per :meth:`tasks.train_tokenizer.TokenizerTrainer.step` (the stage's real
   step: MQ-VAE forward + EMA codebook update, autoencoder loss with the adaptive GAN weight, autoencoder
   Adam step, discriminator step) with the GAN active (``step >= disc_start``), at the preset's keep ratio,
   divided by the same at ``keep_ratio = 1.0`` (plain VQ, masker bypassed). Same architecture, same batch.
   Also reported: keep 0.75 and the random scorer. Target <= 1.25.
2. ``kv_cache_speedup``: :meth:`models.stackformer.Stackformer.sample` with ``use_cache=False`` (the
   reference algorithm: re-run the prefix every step) over ``use_cache=True``, same seed, same batch, at
   sequence length ``round(kv_keep * kv_grid**2)`` (256 by default); the tokens must be identical. Target >= 5.
3. ``speedup_vs_fullgrid_keep075`` / ``_keep050``: sampling images/s of a Stackformer at keep 0.75 / 0.5 of a
   ``grid x grid`` latent grid over that of :class:`models.stackformer.FullGridTransformer` with
   ``n_layer = n_layer_code + n_layer_pos`` and the same width, both with KV caches. Target
   >= 0.9 / keep.

Usage (CPU, the figures in docs/benchmarks.md)::

    .venv/bin/python benchmarks/models.py

The paper configuration on a GPU (model sizes from the preset; bf16 autocast in the tokenizer step as in the
stage)::

    .venv/bin/python benchmarks/models.py --device cuda --preset paper-f8 --batch 8 --sample-batch 64

Transformer widths/depths, codebook size and sampling parameters come from the preset (``stackformer`` and
``evaluate.sampling`` sections); the model weights are random (``init_weights``) plus a fixed N(0, 0.3)
perturbation so that the logits are peaked like a trained model's and the step embedding is non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python benchmarks/models.py``, Python puts benchmarks/ first on sys.path, where sibling scripts
# (e.g. benchmarks/tokenize.py) would shadow standard-library modules: import from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import torch  # noqa: E402

from infra.config import loss_config, mqvae_config, replace, resolve  # noqa: E402
from models.losses import VQGANLoss  # noqa: E402
from models.mqvae import MQVAE  # noqa: E402
from models.stackformer import (  # noqa: E402
    FullGridConfig,
    FullGridTransformer,
    SamplingParams,
    Stackformer,
    StackformerConfig,
)
from tasks.train_tokenizer import TokenizerTrainer  # noqa: E402

MQVAE_TARGET = 1.25
KV_TARGET = 5.0
FULLGRID_FACTOR = 0.9  # target speedup = 0.9 / keep


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


class Times:
    """Per-round seconds per call of each variant: wall clock (``wall``) and this process's CPU time (``cpu``)."""

    def __init__(self, names: list[str]) -> None:
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                per_call: dict[str, int] | None = None) -> Times:
    """Time each ``fns[name]`` for ``rounds`` rounds, the variants interleaved within a round.

    ``per_call[name]`` calls are timed together per round (the time is divided by it). CPU time is the
    process's (all threads); with one thread on an otherwise busy machine it is the steadier of the two.
    """
    per_call = per_call or {}
    times = Times(list(fns))
    for r in range(rounds):
        for name, fn in fns.items():
            n = per_call.get(name, 1)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            sync(device)
            times.wall[name].append((time.perf_counter() - t0) / n)
            times.cpu[name].append((time.process_time() - c0) / n)
        log("    round %d: %s" % (r + 1, "  ".join(f"{k}={v[-1]:.3f}s (cpu {times.cpu[k][-1]:.3f}s)"
                                                   for k, v in times.wall.items())))
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- 1. MQ-VAE step


def bench_mqvae(args: argparse.Namespace, device: torch.device) -> dict:
    base = resolve(args.preset)
    keep = base.tokenizer.keep_ratio
    variants: dict[str, dict] = {
        f"keep{keep:g}_learned": {"keep_ratio": keep, "scorer": "learned"},
        f"keep{keep:g}_random": {"keep_ratio": keep, "scorer": "random"},
        "keep0.75_learned": {"keep_ratio": 0.75, "scorer": "learned"},
        "keep1": {"keep_ratio": 1.0, "scorer": "learned"},
    }
    if keep == 0.75:
        del variants["keep0.75_learned"]
    if keep == 1.0:
        raise SystemExit(f"preset {args.preset} has keep_ratio 1.0: nothing to compare")
    x = torch.rand(args.batch, base.data.channels, base.data.image_size, base.data.image_size,
                   generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1).to(device)
    trainers: dict[str, tuple[TokenizerTrainer, int]] = {}
    for name, over in variants.items():
        cfg = replace(base, tokenizer=over)
        torch.manual_seed(0)
        model = MQVAE(mqvae_config(cfg)).to(device)
        loss = VQGANLoss(loss_config(cfg), in_channels=cfg.data.channels).to(device)
        t = cfg.tokenizer
        trainer = TokenizerTrainer(model, loss, lr=t.lr, warmup_steps=t.warmup_steps,
                                   max_steps=max(t.max_steps, t.disc_start + 10_000), device=device)
        if not loss.is_gan_active(t.disc_start):
            raise SystemExit("the GAN never becomes active with this preset (disc_factor 0?)")
        trainers[name] = (trainer, t.disc_start)
    counters = {name: 0 for name in trainers}

    def stepper(name: str) -> Callable[[], object]:
        trainer, disc_start = trainers[name]

        def run() -> object:
            counters[name] += 1
            return trainer.step(x, disc_start + counters[name])  # GAN active

        return run

    fns = {name: stepper(name) for name in trainers}
    log(f"[mqvae] preset {args.preset}, batch {args.batch}, {args.mqvae_rounds} rounds x "
        f"{args.mqvae_steps} steps, warm-up {args.warmup} steps each")
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times = interleaved(fns, args.mqvae_rounds, device, {k: args.mqvae_steps for k in fns})
    others = [k for k in times.wall if k != "keep1"]
    out: dict = {"preset": args.preset, "batch": args.batch, "rounds": args.mqvae_rounds,
                 "steps_per_round": args.mqvae_steps, "keep_ratio": keep,
                 "step_s": {k: round(med(v), 5) for k, v in times.wall.items()},
                 "step_cpu_s": {k: round(med(v), 5) for k, v in times.cpu.items()},
                 "ratio_vs_keep1": {k: round(paired_ratio(times.wall[k], times.wall["keep1"]), 4) for k in others},
                 "cpu_ratio_vs_keep1": {k: round(paired_ratio(times.cpu[k], times.cpu["keep1"]), 4)
                                        for k in others},
                 "params": {k: sum(p.numel() for p in tr.model.parameters()) for k, (tr, _) in trainers.items()}}
    for k, v in out["step_s"].items():
        line = f"  {k:18s} {v * 1000:8.1f} ms/step (cpu {out['step_cpu_s'][k] * 1000:8.1f} ms)"
        if k in out["ratio_vs_keep1"]:
            line += f"   x{out['ratio_vs_keep1'][k]:.3f} vs keep 1.0 (cpu x{out['cpu_ratio_vs_keep1'][k]:.3f})"
        log(line)
    out["mqvae_step_ratio"] = out["ratio_vs_keep1"][f"keep{keep:g}_learned"]
    return out


# --------------------------------------------------------------------------------------------- 2-3. sampling


def perturbed(model: torch.nn.Module, seed: int, device: torch.device) -> torch.nn.Module:
    """``model`` in eval mode on ``device`` with every parameter perturbed by a fixed N(0, 0.3) draw."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.to(device).eval()


def stackformer(args: argparse.Namespace, grid: int, keep: float, device: torch.device) -> Stackformer:
    s, t = resolve(args.preset).stackformer, resolve(args.preset).tokenizer
    torch.manual_seed(0)
    cfg = StackformerConfig(codebook_size=t.codebook_size, grid_size=grid, seq_len=round(keep * grid * grid),
                            num_classes=args.num_classes, n_layer_code=s.n_layer_code, n_layer_pos=s.n_layer_pos,
                            n_embd=s.n_embd, n_head=s.n_head, dropout=s.dropout)
    return perturbed(Stackformer(cfg), 1, device)


def fullgrid(args: argparse.Namespace, grid: int, device: torch.device) -> FullGridTransformer:
    s, t = resolve(args.preset).stackformer, resolve(args.preset).tokenizer
    torch.manual_seed(0)
    cfg = FullGridConfig(codebook_size=t.codebook_size, grid_size=grid, num_classes=args.num_classes,
                         n_layer=s.n_layer_code + s.n_layer_pos, n_embd=s.n_embd, n_head=s.n_head,
                         dropout=s.dropout)
    return perturbed(FullGridTransformer(cfg), 2, device)


def sampling_params(args: argparse.Namespace) -> tuple[SamplingParams, SamplingParams]:
    s = resolve(args.preset).evaluate.sampling
    return (SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
            SamplingParams(temperature=s.pos_temperature, top_k=s.pos_top_k, top_p=s.pos_top_p))


def labels_for(args: argparse.Namespace, batch: int, device: torch.device) -> torch.Tensor | None:
    return None if args.num_classes == 0 else (torch.arange(batch) % args.num_classes).to(device)


def gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1234)


def bench_kv(args: argparse.Namespace, device: torch.device) -> dict:
    model = stackformer(args, args.kv_grid, args.kv_keep, device)
    c = model.config
    code_p, pos_p = sampling_params(args)
    B = args.kv_batch
    labels = labels_for(args, B, device)

    log(f"[kv-cache] Stackformer n_embd {c.n_embd}, {c.n_layer_code}+{c.n_layer_pos} layers, grid "
        f"{c.grid_size}, seq_len {c.seq_len}, batch {B}, {args.kv_rounds} rounds")
    outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"cached": [], "uncached": []}

    def run(use_cache: bool) -> Callable[[], None]:
        name = "cached" if use_cache else "uncached"
        return lambda: outputs[name].append(
            model.sample(B, labels, code_p, pos_p, use_cache=use_cache, generator=gen(device)))

    run(True)()  # warm-up (the uncached sampler's per-step work is large: its first timed call is its warm-up)
    times = interleaved({"cached": run(True), "uncached": run(False)}, args.kv_rounds, device,
                        {"cached": args.kv_cached_calls})
    first = outputs["cached"][0]
    same = all(torch.equal(a, b) for out in outputs["cached"] + outputs["uncached"]
               for a, b in zip(out, first, strict=True))
    if not same:
        raise AssertionError("cached and uncached sampling returned different tokens for the same seed")
    log(f"  tokens identical in all {len(outputs['cached']) + len(outputs['uncached'])} calls with and without "
        "the cache: True")
    speedup = paired_ratio(times.wall["uncached"], times.wall["cached"])
    cpu_speedup = paired_ratio(times.cpu["uncached"], times.cpu["cached"])
    log(f"  cached {med(times.wall['cached']):.3f}s  uncached {med(times.wall['uncached']):.3f}s  speedup "
        f"x{speedup:.1f} (cpu x{cpu_speedup:.1f}; target >= {KV_TARGET:g}: "
        f"{'PASS' if speedup >= KV_TARGET else 'FAIL'})")
    return {"config": {"n_embd": c.n_embd, "n_head": c.n_head, "n_layer_code": c.n_layer_code,
                       "n_layer_pos": c.n_layer_pos, "grid_size": c.grid_size, "seq_len": c.seq_len,
                       "codebook_size": c.codebook_size, "num_classes": c.num_classes},
            "batch": B, "rounds": args.kv_rounds, "tokens_identical": same,
            "cached_s": round(med(times.wall["cached"]), 4), "uncached_s": round(med(times.wall["uncached"]), 4),
            "cached_cpu_s": round(med(times.cpu["cached"]), 4),
            "uncached_cpu_s": round(med(times.cpu["uncached"]), 4),
            "kv_cache_speedup": round(speedup, 3), "kv_cache_speedup_cpu": round(cpu_speedup, 3),
            "target": KV_TARGET, "pass": speedup >= KV_TARGET}


def bench_fullgrid(args: argparse.Namespace, device: torch.device) -> dict:
    G, B = args.grid, args.sample_batch
    code_p, pos_p = sampling_params(args)
    labels = labels_for(args, B, device)
    base = fullgrid(args, G, device)
    keeps = (0.75, 0.5)
    sfs = {k: stackformer(args, G, k, device) for k in keeps}
    fns: dict[str, Callable[[], object]] = {
        "fullgrid": lambda: base.sample(B, labels, code_p, use_cache=True, generator=gen(device))}
    for k, m in sfs.items():
        fns[f"keep{k:g}"] = (lambda m: lambda: m.sample(B, labels, code_p, pos_p, use_cache=True,
                                                        generator=gen(device)))(m)
    s = sfs[0.5].config
    log(f"[vs full grid] grid {G}x{G}, batch {B} images, n_embd {s.n_embd}, full grid {base.config.n_layer} "
        f"layers x {G * G} steps vs Stackformer {s.n_layer_code}+{s.n_layer_pos} layers x "
        + " / ".join(f"{m.config.seq_len} steps (keep {k:g})" for k, m in sfs.items())
        + f", {args.sample_rounds} rounds")
    for fn in fns.values():  # warm-up
        fn()
    times = interleaved(fns, args.sample_rounds, device)
    out: dict = {"grid_size": G, "batch": B, "rounds": args.sample_rounds, "n_embd": s.n_embd, "n_head": s.n_head,
                 "fullgrid_n_layer": base.config.n_layer, "n_layer_code": s.n_layer_code,
                 "n_layer_pos": s.n_layer_pos, "codebook_size": s.codebook_size, "num_classes": s.num_classes,
                 "seconds_per_batch": {k: round(med(v), 4) for k, v in times.wall.items()},
                 "cpu_seconds_per_batch": {k: round(med(v), 4) for k, v in times.cpu.items()},
                 "images_per_s": {k: round(B / med(v), 3) for k, v in times.wall.items()},
                 "seq_len": {"fullgrid": G * G, **{f"keep{k:g}": m.config.seq_len for k, m in sfs.items()}}}
    log(f"  full grid  {out['images_per_s']['fullgrid']:8.2f} images/s")
    for k in keeps:
        name = f"keep{k:g}"
        ratio = paired_ratio(times.wall["fullgrid"], times.wall[name])
        cpu_ratio = paired_ratio(times.cpu["fullgrid"], times.cpu[name])
        target = FULLGRID_FACTOR / k
        key = f"speedup_vs_fullgrid_keep{round(k * 100):03d}"
        out[key] = round(ratio, 3)
        out[key + "_cpu"] = round(cpu_ratio, 3)
        out[f"target_keep{round(k * 100):03d}"] = round(target, 3)
        out[f"pass_keep{round(k * 100):03d}"] = ratio >= target
        log(f"  keep {k:<4g}  {out['images_per_s'][name]:8.2f} images/s  x{ratio:.2f} vs full grid "
            f"(cpu x{cpu_ratio:.2f}; target >= {target:.2f}: {'PASS' if ratio >= target else 'FAIL'})")
    return out


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--preset", default="fmnist", help="config preset for every model (infra.config.PRESETS)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (CPU); 1 by default: on a shared, busy CPU two threads are "
                   "several times slower and far noisier (see docs/benchmarks.md)")
    p.add_argument("--only", choices=("mqvae", "kv", "fullgrid"), action="append",
                   help="run only these parts (repeatable); the JSON then lacks the other keys")
    g = p.add_argument_group("MQ-VAE training step")
    g.add_argument("--batch", type=int, default=32, help="images per TokenizerTrainer.step")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    g.add_argument("--mqvae-rounds", type=int, default=5)
    g.add_argument("--mqvae-steps", type=int, default=2, help="timed steps per variant per round")
    g = p.add_argument_group("Stackformer sampling")
    g.add_argument("--num-classes", type=int, default=10, help="class-conditional with this many classes (0 = "
                   "unconditional)")
    g.add_argument("--kv-grid", type=int, default=16)
    g.add_argument("--kv-keep", type=float, default=1.0, help="seq_len = round(kv_keep * kv_grid**2)")
    g.add_argument("--kv-batch", type=int, default=2)
    g.add_argument("--kv-rounds", type=int, default=2)
    g.add_argument("--kv-cached-calls", type=int, default=3, help="cached calls timed together per round")
    g.add_argument("--grid", type=int, default=16, help="latent grid side of the full-grid comparison")
    g.add_argument("--sample-batch", type=int, default=64, help="images per sample() call in the comparison")
    g.add_argument("--sample-rounds", type=int, default=3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    parts = args.only or ["mqvae", "kv", "fullgrid"]
    started = time.perf_counter()
    load_start = load_average()
    log(f"mqgen model benchmarks: torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load_start}"))
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                    "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                    else platform.processor() or platform.machine()),
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "preset": args.preset,
                    "argv": sys.argv[1:] if argv is None else argv}
    if "mqvae" in parts:
        m = bench_mqvae(args, device)
        result["mqvae_step_ratio"] = m["mqvae_step_ratio"]
        result["mqvae_target"] = MQVAE_TARGET
        result["mqvae_pass"] = m["mqvae_step_ratio"] <= MQVAE_TARGET
        log(f"  mqvae_step_ratio x{m['mqvae_step_ratio']:.3f} (target <= {MQVAE_TARGET:g}: "
            f"{'PASS' if result['mqvae_pass'] else 'FAIL'})")
        result["mqvae"] = m
    if "kv" in parts:
        k = bench_kv(args, device)
        result["kv_cache_speedup"] = k["kv_cache_speedup"]
        result["kv"] = k
    if "fullgrid" in parts:
        f = bench_fullgrid(args, device)
        for key in ("speedup_vs_fullgrid_keep075", "speedup_vs_fullgrid_keep050"):
            result[key] = f[key]
        result["fullgrid"] = f
    result["load_average"] = {"start": load_start, "end": load_average()}
    result["total_s"] = round(time.perf_counter() - started, 1)
    log(f"total {result['total_s']:.0f}s")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
