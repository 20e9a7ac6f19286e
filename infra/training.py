"""Pieces shared by both training stages: schedules, autocast, throughput, console progress."""

from __future__ import annotations

import contextlib
import math
import sys
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


class ConsoleProgress:
    """A one-line progress report for training loops inside Ray workers (stderr, no ANSI tricks).

    tqdm's carriage returns are mangled by Ray's log forwarding; a line every ``every`` steps reads
    cleanly in the driver's console and in log files.
    """

    def __init__(self, name: str, total: int, start: int = 0, every: int = 10, enabled: bool = True):
        self.name, self.total, self.every, self.enabled = name, total, max(1, every), enabled
        self.start_time = time.perf_counter()
        self.start = start

    def update(self, step: int, **fields: float) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
        pct = 100.0 * step / max(self.total, 1)
        print(f"[{self.name}] step {step}/{self.total} ({pct:5.1f}%) {parts} eta {eta:5.0f}s",
              file=sys.stderr, flush=True)


def cycle(it_factory: Any) -> Iterator[Any]:
    """Iterate ``it_factory(epoch)`` for epoch 0, 1, 2, ... forever."""
    epoch = 0
    while True:
        yield from it_factory(epoch)
        epoch += 1
