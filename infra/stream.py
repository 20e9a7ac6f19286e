"""Deterministic, resumable training stream over ingested WebDataset shards.

Each rank reads its own shards (round-robin by rank; when there are fewer shards than ranks every rank
reads all shards and keeps every ``world_size``-th sample), reshuffles shard order and samples through
a seeded buffer each epoch, and never ends: the training loop decides how many steps to take, so all
ranks always take the same number of steps (no DDP hang on uneven shards).

The stream's position is a single number, the samples this rank has consumed, and
``TrainStream(..., start_sample=n)`` continues exactly where a stream that had yielded ``n`` samples
stopped: the skipped part is replayed from the tar headers without decoding images.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class RawSample:
    key: str
    png: bytes
    label: int  # -1 when unlabeled
    caption: str | None = None  # None when the sample has no caption


def iter_shard(path: str) -> Iterator[RawSample]:
    """Samples of one of our verified ingest shards, in file order (see ``infra.shards.read_shard``)."""
    from infra.shards import read_shard

    for key, png, label, caption in read_shard(path):
        yield RawSample(key, png, label, caption)


def decode_png(data: bytes, channels: int) -> torch.Tensor:
    """PNG bytes -> ``[C, H, W]`` uint8 tensor with ``channels`` channels."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


class TrainStream:
    """Endless batches ``(images uint8 [B, C, H, W], labels long [B])`` for one rank."""

    def __init__(self, shards: Sequence[tuple[str, int]], *, rank: int, world_size: int, batch_size: int,
                 channels: int, seed: int, shuffle_buffer: int = 2048, start_sample: int = 0,
                 targets: Callable[[list[str | None]], torch.Tensor] | None = None):
        self.targets = targets
        if not shards:
            raise ValueError("no shards to train on")
        ordered = sorted(shards)
        if len(ordered) >= world_size:
            self.shards = ordered[rank::world_size]
            self.sample_stride, self.sample_offset = 1, 0
        else:
            self.shards = ordered
            self.sample_stride, self.sample_offset = world_size, rank
        per_epoch = sum(self._count(n) for _, n in self.shards)
        if per_epoch < 1:
            raise ValueError(f"rank {rank} has no samples (shards: {[p for p, _ in self.shards]})")
        self.samples_per_epoch = per_epoch
        self.rank, self.batch_size, self.channels = rank, batch_size, channels
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.consumed = start_sample

    def _count(self, n: int) -> int:
        if self.sample_stride == 1:
            return n
        return len(range(self.sample_offset, n, self.sample_stride))

    def _epoch(self, epoch: int) -> Iterator[RawSample]:
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        order = list(self.shards)
        rng.shuffle(order)
        buf: list[RawSample] = []
        for path, _ in order:
            for i, s in enumerate(iter_shard(path)):
                if self.sample_stride > 1 and i % self.sample_stride != self.sample_offset:
                    continue
                if len(buf) < self.shuffle_buffer:
                    buf.append(s)
                    continue
                j = rng.randrange(len(buf))
                yield buf[j]
                buf[j] = s
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(images, labels)`` batches, plus ``targets(captions)`` (a ``[B, ...]`` tensor) when the stream has a
        ``targets`` function."""
        epoch, skip = divmod(self.consumed, self.samples_per_epoch)
        images: list[torch.Tensor] = []
        labels: list[int] = []
        captions: list[str | None] = []
        while True:
            for s in self._epoch(epoch):
                if skip:
                    skip -= 1
                    continue
                images.append(decode_png(s.png, self.channels))
                labels.append(s.label)
                captions.append(s.caption)
                if len(images) == self.batch_size:
                    self.consumed += self.batch_size
                    batch = (torch.stack(images), torch.tensor(labels, dtype=torch.long))
                    yield batch if self.targets is None else (*batch, self.targets(captions))
                    images, labels, captions = [], [], []
            epoch += 1


def iter_eval_batches(shards: Sequence[tuple[str, int]], batch_size: int, channels: int, limit: int | None = None,
                      with_captions: bool = False) -> Iterator[tuple[Any, ...]]:
    """Every sample once (the first ``limit``), in shard order: ``(images uint8, labels, keys)`` batches (and
    the captions, a list with None for an uncaptioned sample, when ``with_captions``)."""

    def samples() -> Iterator[RawSample]:
        seen = 0
        for path, _ in sorted(shards):
            for s in iter_shard(path):
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield s

    batch: list[RawSample] = []
    for s in samples():
        batch.append(s)
        if len(batch) == batch_size:
            yield _collate(batch, channels, with_captions)
            batch = []
    if batch:
        yield _collate(batch, channels, with_captions)


def _collate(batch: list[RawSample], channels: int, with_captions: bool = False) -> tuple[Any, ...]:
    out = (torch.stack([decode_png(s.png, channels) for s in batch]),
           torch.tensor([s.label for s in batch], dtype=torch.long), [s.key for s in batch])
    return (*out, [s.caption for s in batch]) if with_captions else out
