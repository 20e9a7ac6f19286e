"""Sampling benchmark of the evaluate stage: Stackformer vs the full-grid baseline, images per second.

Not a timed test: it measures, prints human-readable lines, then prints one JSON line last. The figures are
recorded in ``docs/benchmarks.md`` (section ``## Evaluate``).

What is timed is the evaluate stage's own batch, :func:`tasks.evaluate.sample_batch`: token sampling with KV
caches (class-conditional, labels ``i mod 10``), then decoding with the MQ-VAE tokenizer, each phase timed
separately (device synchronised around each). Both pipelines are at the preset's size (``fmnist``: 32x32
images, an 8x8 latent grid, K = 256):

* ``stackformer``: Stackformer (``n_layer_code`` + ``n_layer_pos`` layers) over the ``round(keep_ratio * 64)``
  kept tokens (32 at the default ``keep_ratio`` 0.5), decoded by an MQ-VAE at that keep ratio;
* ``fullgrid``: the baseline of ``stackformer.model=fullgrid``: one transformer of ``n_layer_code +
  n_layer_pos`` layers, same width, over all 64 codes, decoded by the same MQ-VAE at ``keep_ratio`` 1.0.

Weights are random (the models' own initialisation): the work per image does not depend on them (every
sequence has exactly N tokens). Method: after one untimed warm-up batch each, the two pipelines run
interleaved round by round (A, B, A, B, ...), so a change in machine load hits both; a rate is the median
over rounds, a ratio the median of the per-round ratios. The process CPU time of each phase is recorded
beside the wall clock: with one thread on a CPU it equals the wall time on an idle machine and stays steady
when other jobs share the cores (on a GPU only the wall clock means anything).

Usage (the figures in docs/benchmarks.md)::

    .venv/bin/python benchmarks/sampling.py                       # CPU, 1 thread, fmnist preset
    .venv/bin/python benchmarks/sampling.py --device cuda --batch-size 1000 --rounds 5
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python benchmarks/sampling.py``: import from the repository root, not from benchmarks/.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime

import torch

from infra.config import fullgrid_config, replace, resolve, stackformer_config, token_layout
from models.mqvae import MQVAE
from models.stackformer import FullGridTransformer, Stackformer
from tasks.evaluate import balanced_labels, sample_batch


def log(msg: str) -> None:
    print(msg, flush=True)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build(args: argparse.Namespace, device: torch.device) -> dict[str, tuple]:
    """``{name: (config, generator model, tokenizer)}`` for both pipelines, random weights, eval mode."""
    base = resolve(args.preset, overrides=args.set)
    full = replace(base, tokenizer={"keep_ratio": 1.0}, stackformer={"model": "fullgrid"})
    torch.manual_seed(0)
    out = {}
    for name, cfg, model in (
            ("stackformer", base, lambda c: Stackformer(stackformer_config(c.stackformer, token_layout(c), num_classes=args.num_classes))),
            ("fullgrid", full, lambda c: FullGridTransformer(fullgrid_config(c.stackformer, token_layout(c), num_classes=args.num_classes)))):
        out[name] = (cfg, model(cfg).to(device).eval(), MQVAE(cfg.tokenizer.model).to(device).eval())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="evaluate-stage sampling: Stackformer vs full grid (module docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--preset", default="fmnist", help="config preset (infra.config.PRESETS)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU (1: steadiest on a "
                   "shared 2-core machine, where 2 threads ran several times slower)")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch (evaluate.batch_size)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; one batch per pipeline per round")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the conditional models (0 = none)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    load_start = load_average()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                  platform.machine())
    pipelines = build(args, device)
    B = args.batch_size
    labels = balanced_labels(B, args.num_classes)
    info = {}
    for name, (cfg, model, tok) in pipelines.items():
        mc = model.config
        info[name] = {"tokens_per_image": mc.seq_len, "grid_size": mc.grid_size,
                      "layers": (mc.n_layer_code + mc.n_layer_pos) if name == "stackformer" else mc.n_layer,
                      "n_embd": mc.n_embd, "codebook_size": mc.codebook_size, "num_classes": mc.num_classes,
                      "params": sum(t.numel() for t in model.parameters()),
                      "tokenizer_keep_ratio": cfg.tokenizer.model.keep_ratio,
                      "image_size": cfg.data.image_size}
    log(f"evaluate sampling benchmark: torch {torch.__version__}, {device} ({dev_name}), "
        f"{torch.get_num_threads()} threads, load average {load_start}; preset {args.preset}, batch {B}, "
        f"{args.rounds} rounds; " + "; ".join(f"{k}: {v['layers']} layers x {v['tokens_per_image']} tokens, "
                                             f"{v['params'] / 1e6:.2f}M params" for k, v in info.items()))
    for name, (cfg, model, tok) in pipelines.items():  # untimed warm-up
        sample_batch(model, tok, min(B, 8), None if labels is None else labels[:min(B, 8)], cfg,
                     torch.Generator(device=device).manual_seed(1), device)
    rounds: dict[str, dict[str, list[float]]] = {n: {"sample": [], "decode": [], "wall": [], "sample_cpu": [],
                                                     "decode_cpu": [], "cpu": []}
                                                 for n in pipelines}
    started = time.perf_counter()
    for r in range(args.rounds):
        for name, (cfg, model, tok) in pipelines.items():
            c0, w0 = time.process_time(), time.perf_counter()
            b = sample_batch(model, tok, B, labels, cfg, torch.Generator(device=device).manual_seed(100 + r),
                             device)
            rounds[name]["wall"].append(time.perf_counter() - w0)
            rounds[name]["cpu"].append(time.process_time() - c0)
            rounds[name]["sample"].append(b.sample_seconds)
            rounds[name]["decode"].append(b.decode_seconds)
            rounds[name]["sample_cpu"].append(b.sample_cpu_seconds)
            rounds[name]["decode_cpu"].append(b.decode_cpu_seconds)
        log(f"  round {r + 1}: " + "  ".join(
            f"{n} sample {v['sample'][-1]:.2f}s decode {v['decode'][-1]:.2f}s (cpu {v['cpu'][-1]:.2f}s)"
            for n, v in rounds.items()))

    def rate(name: str, key: str) -> float:
        return round(B / statistics.median(rounds[name][key]), 2)

    def ratio(key: str) -> float:  # how many times faster the Stackformer is, median of per-round ratios
        return round(statistics.median(f / s for f, s in zip(rounds["fullgrid"][key], rounds["stackformer"][key],
                                                             strict=True)), 3)

    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
                    "device": str(device), "device_name": dev_name, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "preset": args.preset, "batch_size": B, "rounds": args.rounds,
                    "argv": sys.argv[1:] if argv is None else argv, "models": info}
    for name in pipelines:
        result[name] = {"sampling_images_per_s": rate(name, "sample"), "decode_images_per_s": rate(name, "decode"),
                        "generation_images_per_s": rate(name, "wall"),
                        "sampling_images_per_s_cpu": rate(name, "sample_cpu"),
                        "decode_images_per_s_cpu": rate(name, "decode_cpu"),
                        "generation_images_per_s_cpu": rate(name, "cpu"),
                        "rounds_s": {k: [round(t, 4) for t in v] for k, v in rounds[name].items()}}
        r = result[name]
        log(f"  {name:<11} images/s, wall clock (process CPU clock): sampling {r['sampling_images_per_s']:.2f} "
            f"({r['sampling_images_per_s_cpu']:.2f})   decode {r['decode_images_per_s']:.2f} "
            f"({r['decode_images_per_s_cpu']:.2f})   sampling+decode {r['generation_images_per_s']:.2f} "
            f"({r['generation_images_per_s_cpu']:.2f})")
    result["sampling_speedup"] = ratio("sample")
    result["sampling_speedup_cpu"] = ratio("sample_cpu")
    result["generation_speedup"] = ratio("wall")
    result["generation_speedup_cpu"] = ratio("cpu")
    result["load_average"] = {"start": load_start, "end": load_average()}
    result["total_s"] = round(time.perf_counter() - started, 1)
    log(f"  Stackformer vs full grid: sampling x{result['sampling_speedup']:.2f} (cpu clock "
        f"x{result['sampling_speedup_cpu']:.2f}), sampling+decode x{result['generation_speedup']:.2f} (cpu clock "
        f"x{result['generation_speedup_cpu']:.2f})")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
