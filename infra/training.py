"""Pieces shared by both training stages: schedules, autocast, throughput, console progress."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator

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


def cycle(it_factory: Any) -> Iterator[Any]:
    """Iterate ``it_factory(epoch)`` for epoch 0, 1, 2, ... forever."""
    epoch = 0
    while True:
        yield from it_factory(epoch)
        epoch += 1
