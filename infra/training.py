"""Pieces shared by both training stages: schedules, autocast, throughput, console progress."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_factor``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; a no-op on CPU (CPU bf16 autocast is slower than fp32 for these models)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Throughput:
    """Items per second over the steps since the last :meth:`rate` call."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._n = 0

    def add(self, n: int) -> None:
        self._n += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return r


class TrainClock:
    """Seconds a training run has spent up to now, across restarts: it starts from the figure saved in the
    checkpoint it resumed from (the time a killed attempt spent after its last checkpoint is not counted, since
    that work was redone). The figure compared between variants trained to an equal budget."""

    STATE_KEY = "train_wall_s"

    def __init__(self, restored_state: dict[str, Any] | None = None) -> None:
        self._base = float((restored_state or {}).get(self.STATE_KEY, 0.0))
        self._t0 = time.perf_counter()

    def __call__(self) -> float:
        return self._base + time.perf_counter() - self._t0


def cycle(it_factory: Any) -> Iterator[Any]:
    """Iterate ``it_factory(epoch)`` for epoch 0, 1, 2, ... forever."""
    epoch = 0
    while True:
        yield from it_factory(epoch)
        epoch += 1


def export_final_weights(checkpoint_path: str, out_dir: Path, *, stage: str, key: str,
                         model_doc: dict[str, Any], header: dict[str, str] | None = None, loaded: Any = None
                         ) -> tuple[Path, str, int]:
    """The end of a training stage, written once: the final checkpoint's model weights -> ``model.safetensors``
    (atomic, with stage/key/step in its header) and ``model_config.json`` beside them. Returns the weights'
    path, their sha256 (of the file as renamed into place) and the step."""
    from infra.checkpoint import read_checkpoint
    from infra.storage import atomic_write_json, save_tensors

    final = loaded if loaded is not None else read_checkpoint(checkpoint_path)  # loaded: verified by fit()
    weights = out_dir / "model.safetensors"
    # the hash of the bytes written (never of another writer's file), stable across processes
    digest = save_tensors(weights, final.weights["model"],
                          {"stage": stage, "key": key, "step": str(final.step), **(header or {})})
    atomic_write_json(out_dir / "model_config.json", model_doc)
    return weights, digest, final.step


@dataclass(frozen=True)
class StepEvent:
    """What a training loop tells its ``on_step`` callback after every optimiser step, on every rank (the seam
    tests use to inject faults or slow training down, and to record the data order)."""

    step: int
    rank: int
    epoch: int = 0
    indices: tuple[int, ...] = ()  # dataset indices of the step's batch, where the loop knows them


def purpose_seed(seed: int, what: str) -> int:
    """A 31-bit seed from the global seed and a purpose such as ``"evaluate/sampling"`` (stable across runs and
    machines)."""
    from infra.config import stable_hash

    return int(stable_hash({"seed": seed, "for": what}, length=8), 16) & 0x7FFFFFFF
