"""Throughput and size of the tokenize stage against its ceilings.

    .venv/bin/python benchmarks/tokenize_stage.py [--images 2048] [--root /tmp/mqgen-bench-tokenize]

1. Inputs: the real ingest stage on the first ``--images`` Fashion-MNIST images per split (the
   ``fmnist`` preset: 32x32, 1 channel, an 8x8 latent grid keeping 32 tokens) and a random-init MQ-VAE
   of the ``fmnist`` architecture (the same FLOPs as a trained one).
2. Ceiling: the bare ``model.encode`` forward, in this process (torch's default threads), over the very
   batches the stage encodes (per shard, ``ENCODE_BATCH_SIZE`` images, then the remainder), images
   decoded beforehand. Measured on ``--ceiling-shards`` shards before and after the stage (the machine's
   load drifts), and the mean is the ceiling.
3. Stage: ``tasks.tokenize.run(force=True)`` end to end (shard hashing, PNG decoding, encoding in Ray
   workers, LMDB writes, verification pass, compaction, MLflow), Ray already started as it is in the
   pipeline; the Ray start-up is reported separately. The Ray workers start cold (imports, model build:
   ``first_shard_seconds``). Besides wall-clock rates, images per CPU second (the stage: its driver plus
   its shard tasks; the ceiling: this process) compare the work done, which other load on a shared
   machine distorts less than wall time (a 2-process stage gets a larger share of a busy machine than a
   1-process ceiling).
4. Size: ``data.mdb`` bytes per image against the raw uint16 payload (codes + positions, 4 bytes per
   kept token), for databases of the full Fashion-MNIST size (60k + 10k records of this run's format,
   synthetic tokens, through the same writer: ``bytes_per_image_ratio``) and for this run's small
   databases, where each database's ~5 fixed pages (2 meta, root, the page holding the reserved keys)
   weigh more (``bytes_per_image_ratio_this_run``).

The last line printed is JSON with ``ratio_to_encoder_ceiling`` (target >= 0.85) and
``bytes_per_image_ratio`` (target <= 1.3).
"""

from __future__ import annotations

import os
import sys

# Run as ``python benchmarks/tokenize_stage.py``, Python puts benchmarks/ first on sys.path, where sibling
# scripts (benchmarks/models.py) would shadow the repository's packages: import from the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from infra.config import resolve
from infra.refs import TokenizeInputs, TokenizerOutput, load_tokenizer
from infra.shards import ShardSet, iter_samples
from infra.storage import sha256_file
from infra.tokens import TokenMeta, TokenWriter
from models.mqvae import to_model_input
from tasks import tokenize as tk
from tasks.train_tokenizer import _model_config_dict


def make_tokenizer(cfg, out: Path) -> TokenizerOutput:
    from safetensors.torch import save_file

    from models.mqvae import MQVAE

    torch.manual_seed(0)
    model_cfg = cfg.tokenizer.model
    model = MQVAE(model_cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return TokenizerOutput(path=str(out), key="bench", weights=str(weights), sha256=sha256_file(weights), step=0,
                           model_config=_model_config_dict(model_cfg))


def stage_batches(shards: ShardSet, split: str, limit: int, image_size: int, channels: int) -> list[torch.Tensor]:
    """The uint8 batches the stage encodes for the first ``limit`` shards of ``split``."""
    batches = []
    for info in shards.shards(split)[:limit]:
        images = [s.image for s in iter_samples([info.path], image_size=image_size, channels=channels)]
        for i in range(0, len(images), tk.ENCODE_BATCH_SIZE):
            batches.append(torch.stack(images[i:i + tk.ENCODE_BATCH_SIZE]))
    return batches


def encoder_ceiling(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Images per wall second and per CPU second of the bare encode forward over ``batches``."""
    device = torch.device("cpu")
    with torch.inference_mode():
        model.encode(to_model_input(batches[0], device))  # warm-up
        n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        for b in batches:
            model.encode(to_model_input(b, device))
            n += len(b)
        return n / (time.perf_counter() - t0), n / (time.process_time() - cpu0)


def full_scale_bytes(seq_len: int, grid_size: int, codebook_size: int, counts: dict[str, int]) -> float:
    """Bytes per record of complete databases with ``counts`` records (synthetic tokens, 10k per shard)."""
    rng = np.random.default_rng(0)
    total_bytes = total = 0
    with tempfile.TemporaryDirectory() as d:
        for split, n in counts.items():
            shards = [(i, min(10_000, n - 10_000 * i)) for i in range(-(-n // 10_000))]
            meta = TokenMeta(split=split, codebook_size=codebook_size, grid_size=grid_size, seq_len=seq_len,
                             keep_ratio=seq_len / grid_size ** 2, num_classes=10, tokenizer_sha256="-",
                             source_sha256="-", shards=tuple(shards))
            with TokenWriter(Path(d) / split, meta) as w:
                for s, m in shards:
                    codes = rng.integers(0, codebook_size, (m, seq_len)).astype(np.uint16)
                    positions = np.sort(rng.random((m, grid_size ** 2)).argsort(1)[:, :seq_len], 1).astype(np.uint16)
                    w.write_shard(s, codes, positions, rng.integers(0, 10, m).astype(np.int32))
                w.finalize()
            total_bytes += (Path(d) / split / "data.mdb").stat().st_size
            total += n
    return total_bytes / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048, help="Fashion-MNIST images per split (train, val)")
    ap.add_argument("--ceiling-shards", type=int, default=4, help="shards whose batches time the ceiling")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "mqgen-bench-tokenize"))
    args = ap.parse_args()

    from infra import ray as rayx
    from tasks import ingest

    root = Path(args.root)
    cfg = resolve("fmnist", overrides=[f"run.root={root}", f"data.max_images={args.images}"])
    t0 = time.perf_counter()
    ingest_out = ingest.run(cfg)  # cached across runs of the benchmark
    print(f"ingest: {ingest_out.num_train} train + {ingest_out.num_val} val images "
          f"({time.perf_counter() - t0:.1f} s, cached after the first run)", flush=True)
    tokenizer = make_tokenizer(cfg, root / "bench-tokenizer")
    upstream = TokenizeInputs(ingest=ingest_out, train_tokenizer=tokenizer)
    model = load_tokenizer(tokenizer)
    shards = ShardSet.from_output(ingest_out)
    batches = stage_batches(shards, "train", args.ceiling_shards, ingest_out.image_size, ingest_out.channels)
    print(f"ceiling batches: {len(batches)} ({sum(len(b) for b in batches)} images, "
          f"{torch.get_num_threads()} torch threads)", flush=True)

    ceiling_before, ceiling_cpu_before = encoder_ceiling(model, batches)
    print(f"encoder ceiling (before): {ceiling_before:.1f} images/s", flush=True)
    t0 = time.perf_counter()
    rayx.init_ray()
    ray_start = time.perf_counter() - t0
    print(f"ray start: {ray_start:.1f} s", flush=True)
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = tk.run(cfg, upstream, force=True)
    stage_seconds, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    num_images = out.num_train + out.num_val
    stage_rate = num_images / stage_seconds
    print(f"stage: {num_images} images in {stage_seconds:.1f} s = {stage_rate:.1f} images/s "
          f"(encode loop {out.metrics['images_per_s']:.1f} images/s)", flush=True)
    ceiling_after, ceiling_cpu_after = encoder_ceiling(model, batches)
    print(f"encoder ceiling (after): {ceiling_after:.1f} images/s", flush=True)
    ceiling = (ceiling_before + ceiling_after) / 2
    ceiling_cpu = (ceiling_cpu_before + ceiling_cpu_after) / 2
    stage_cpu_rate = num_images / (out.metrics["worker_cpu_s"] + driver_cpu)
    rayx.shutdown_ray()

    meta = TokenMeta(**out.metadata["train"])
    raw = 4 * meta.seq_len  # uint16 code + uint16 position per kept token
    db_bytes = sum((Path(out.db(s)) / "data.mdb").stat().st_size for s in tk.SPLITS)
    per_image = db_bytes / num_images
    # The databases of the full Fashion-MNIST (60k + 10k images): small databases pay ~5 fixed pages each
    full = full_scale_bytes(meta.seq_len, meta.grid_size, meta.codebook_size, {"train": 60_000, "val": 10_000})
    result = {
        "images": num_images,
        "stage_images_per_s": round(stage_rate, 1),
        "stage_seconds": round(stage_seconds, 2),
        "encode_loop_images_per_s": round(out.metrics["images_per_s"], 1),
        "first_shard_seconds": round(out.metrics["first_shard_s"], 1),
        "encoder_ceiling_images_per_s": round(ceiling, 1),
        "encoder_ceiling_before_after": [round(ceiling_before, 1), round(ceiling_after, 1)],
        "ratio_to_encoder_ceiling": round(stage_rate / ceiling, 3),
        "ray_start_seconds": round(ray_start, 1),
        # per CPU second (driver + shard tasks; workers' start-up excluded): insensitive to other load
        "stage_images_per_cpu_s": round(stage_cpu_rate, 1),
        "encoder_ceiling_images_per_cpu_s": round(ceiling_cpu, 1),
        "cpu_ratio_to_encoder_ceiling": round(stage_cpu_rate / ceiling_cpu, 3),
        "ratio_including_ray_start": round(num_images / (stage_seconds + ray_start) / ceiling, 3),
        "seq_len": meta.seq_len,
        "raw_uint16_bytes_per_image": raw,
        "record_value_bytes": meta.record_size,
        "bytes_per_image": round(full, 1),
        "bytes_per_image_ratio": round(full / raw, 3),
        "bytes_per_image_this_run": round(per_image, 1),
        "bytes_per_image_ratio_this_run": round(per_image / raw, 3),
        "load_average_1min": round(load_before, 2),
        "cpus": os.cpu_count(),
    }
    if root.name == "mqgen-bench-tokenize":
        shutil.rmtree(root / "tokenize", ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
