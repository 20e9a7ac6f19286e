"""WebDataset shards of an ingested dataset: writing, the manifest, verification and the streaming reader.

Layout of one ingest output (``<run.root>/ingest/<key>/``)::

    train-000000.tar ... val-000000.tar ...   members <key>.png (+ <key>.cls when labelled, <key>.txt when
                                                captioned: UTF-8, one line)
    samples.png                                 an 8x8 grid of training images
    manifest.json                               written last: its presence marks the output complete

Reading (training, tokenisation)::

    from infra.shards import ShardSet, ShardDataset

    shards = ShardSet.load(ingest_output.path, expected_sha256=ingest_output.manifest_sha256)
    ds = ShardDataset(shards, "train", rank=rank, world_size=world_size)   # or rank=None: torch.distributed
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2)
    for images, labels, keys in loader: ...   # uint8 (B, C, H, W), int64 (B,) with -1 = unlabelled, keys

Shards are split between ranks (``split_by_node`` semantics) and then between DataLoader workers
(``split_by_worker``), so each sample is read exactly once per pass across all ranks and workers; a
consumer gets whole shards, so the split is exact-once but can be uneven. Only ``.png`` and ``.cls``
members are ever read, and they are decoded explicitly (PIL, PNG only; ASCII integer): no pickle-based
decoder can run, whatever else a shard contains.

``ShardDataset`` subclasses torch's ``IterableDataset`` and is defined on first access: ingest worker
processes import this module to write shards and never pay for importing torch.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from infra.errors import PermanentError
from infra.storage import sha256_file
from infra.tar import Ignore, TarReader

if TYPE_CHECKING:
    import torch

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mqgen.ingest/1"
SAMPLES_GRID_NAME = "samples.png"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


class ShardIntegrityError(PermanentError, RuntimeError):
    """A shard or manifest does not match what the manifest promises (missing, size, sha256, content)."""


# --------------------------------------------------------------------------------------------- writing


# --------------------------------------------------------------------------------------------- manifest


def load_manifest(stage_dir: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Read and validate ``<stage_dir>/manifest.json``; a missing manifest means an incomplete output."""
    path = Path(stage_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ShardIntegrityError(f"{stage_dir}: no {MANIFEST_NAME}, so this is not a complete ingest output "
                                  "(an ingest that was interrupted, or the wrong directory)")
    raw = path.read_bytes()
    if expected_sha256 is not None:
        from infra.storage import sha256_bytes

        actual = sha256_bytes(raw)
        if actual != expected_sha256:
            raise ShardIntegrityError(f"{path}: sha256 {actual} differs from the expected {expected_sha256} "
                                      "(the dataset changed since the upstream reference was made)")
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise ShardIntegrityError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ShardIntegrityError(f"{path}: format {m.get('format') if isinstance(m, dict) else None!r}, "
                                  f"expected {MANIFEST_FORMAT!r}")
    for s in m.get("splits", {}).values():
        for sh in s.get("shards", []):
            name = sh.get("name", "")
            if "/" in name or name.startswith(".") or not name.endswith(".tar"):
                raise ShardIntegrityError(f"{path}: shard name {name!r} is not a file in the stage directory")
    return m


def check_shards(stage_dir: str | Path, manifest: dict[str, Any], rehash: bool = False) -> list[str]:
    """Problems with the shard files: missing, wrong size, and (``rehash``) wrong sha256. Empty = fine."""
    problems = []
    for s in manifest["splits"].values():
        for sh in s["shards"]:
            p = Path(stage_dir) / sh["name"]
            if not p.is_file():
                problems.append(f"{p}: missing")
                continue
            size = p.stat().st_size
            if size != sh["num_bytes"]:
                problems.append(f"{p}: {size} bytes, manifest says {sh['num_bytes']}")
            elif rehash:
                digest = sha256_file(p)
                if digest != sh["sha256"]:
                    problems.append(f"{p}: sha256 {digest}, manifest says {sh['sha256']}")
    return problems


# --------------------------------------------------------------------------------------------- reading


class Sample(NamedTuple):
    """One decoded sample: ``image`` uint8 ``(C, H, W)``, ``label`` (-1 when unlabelled), ``key``."""

    image: torch.Tensor
    label: int
    key: str


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass
class ShardSet:
    """A complete ingest output, loaded from its manifest."""

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str = ""
    _shards: dict[str, list[ShardInfo]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path, *, expected_sha256: str | None = None, verify: bool = False) -> ShardSet:
        """Load ``<path>/manifest.json``; check every shard's presence and size, and with ``verify=True``
        re-hash every shard (reads the whole dataset once). ``expected_sha256`` pins the manifest itself."""
        from infra.storage import sha256_bytes

        path = Path(path)
        m = load_manifest(path, expected_sha256)
        digest = sha256_bytes((path / MANIFEST_NAME).read_bytes())
        shards = {split: [ShardInfo(str(path / sh["name"]), sh["num_samples"], sh["num_bytes"], sh["sha256"])
                          for sh in s["shards"]] for split, s in m["splits"].items()}
        ss = cls(path, m, digest, shards)
        problems = check_shards(path, m, rehash=verify)
        if problems:
            raise ShardIntegrityError(f"{path}: {len(problems)} shard problem(s): " + "; ".join(problems[:5]))
        return ss

    @classmethod
    def from_output(cls, ref: Any, *, verify: bool = False) -> ShardSet:
        """From an upstream ``IngestOutput`` (anything with ``path`` and ``manifest_sha256``)."""
        return cls.load(ref.path, expected_sha256=ref.manifest_sha256, verify=verify)

    def verify(self) -> None:
        """Re-hash every shard against the manifest; raises :class:`ShardIntegrityError` on any mismatch."""
        problems = check_shards(self.path, self.manifest, rehash=True)
        if problems:
            raise ShardIntegrityError(f"{self.path}: {len(problems)} shard problem(s): " + "; ".join(problems[:5]))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._shards)

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self._shards:
            raise KeyError(f"{self.path}: no split {split!r}; splits: {', '.join(self._shards)}")
        return list(self._shards[split])

    def urls(self, split: str) -> list[str]:
        return [s.path for s in self.shards(split)]

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or [])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    def iter_samples(self, split: str, **kwargs: Any) -> Iterator[Sample]:
        kwargs.setdefault("image_size", self.image_size)
        kwargs.setdefault("channels", self.channels)
        return iter_samples(self.urls(split), **kwargs)


def decode_sample(sample: dict[str, Any], image_size: int | None = None, channels: int | None = None) -> Sample:
    """WebDataset sample dict (``png`` bytes, optional ``cls`` bytes) -> :class:`Sample`. PNG only."""
    import torch
    from PIL import Image

    key = sample["__key__"]
    url = sample.get("__url__", "?")
    if not KEY_PATTERN.match(key):
        raise ShardIntegrityError(f"{url}: sample key {key!r} does not match {KEY_PATTERN.pattern}")
    if "png" not in sample:
        raise ShardIntegrityError(f"{url}: sample {key!r} has no .png member")
    img = Image.open(io.BytesIO(sample["png"]), formats=("PNG",))
    img.load()
    if img.mode not in ("L", "RGB"):
        raise ShardIntegrityError(f"{url}: sample {key!r} has PNG mode {img.mode}, expected L or RGB")
    arr = np.array(img)  # a writable copy: torch tensors must not alias read-only PIL memory
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if image_size is not None and arr.shape[:2] != (image_size, image_size):
        raise ShardIntegrityError(f"{url}: sample {key!r} is {arr.shape[1]}x{arr.shape[0]}, "
                                  f"manifest says {image_size}x{image_size}")
    if channels is not None and arr.shape[2] != channels:
        raise ShardIntegrityError(f"{url}: sample {key!r} has {arr.shape[2]} channels, manifest says {channels}")
    label = -1
    if "cls" in sample:
        text = sample["cls"].strip()
        if not text.isdigit():
            raise ShardIntegrityError(f"{url}: sample {key!r} has label {text[:20]!r}")
        label = int(text)
    return Sample(torch.from_numpy(arr.transpose(2, 0, 1).copy()), label, key)


def _select_member(name: str) -> bool:
    return name.endswith((".png", ".cls"))


def iter_samples(shards: Sequence[str], *, rank: int | None = 0, world_size: int | None = 1,
                 worker: int | None = 0, num_workers: int | None = 1, image_size: int | None = None,
                 channels: int | None = None, shuffle_seed: int | None = None,
                 handler: Callable[[Exception], bool] | None = None) -> Iterator[Sample]:
    """Stream the samples of this consumer's shards: shard ``i`` goes to rank ``i % world_size``, then,
    within the rank, to worker ``j % num_workers`` of its shards. ``rank=None``/``world_size=None`` take
    them from ``torch.distributed`` or ``RANK``/``WORLD_SIZE`` (``webdataset.split_by_node``);
    ``worker=None`` from the DataLoader worker (``webdataset.split_by_worker``). ``shuffle_seed`` permutes the
    shard list first (the same permutation on every rank, so the split stays exact-once).
    ``handler`` is WebDataset's error handler (default: raise)."""
    import webdataset as wds

    urls = list(shards)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(urls)
    node_split = wds.split_by_node if rank is None or world_size is None else _take(rank, world_size, "rank")
    worker_split = wds.split_by_worker if worker is None or num_workers is None else _take(worker, num_workers,
                                                                                            "worker")
    handler = handler or wds.reraise_exception
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        node_split,
        worker_split,
        wds.tarfile_to_samples(handler=handler, select_files=_select_member),
        wds.map(lambda s: decode_sample(s, image_size, channels), handler=handler),
    )
    return iter(pipeline)


def _take(index: int, count: int, what: str) -> Callable[[Iterable[Any]], Iterator[Any]]:
    if not 0 <= index < count:
        raise ValueError(f"{what} {index} is outside 0..{count - 1}")

    def split(src: Iterable[Any]) -> Iterator[Any]:
        yield from islice(src, index, None, count)

    return split


def _define_shard_dataset() -> type:
    import torch.utils.data

    class ShardDataset(torch.utils.data.IterableDataset):
        """A torch ``IterableDataset`` over one split of a :class:`ShardSet` (or a list of shard paths).

        ``rank``/``world_size`` default to ``torch.distributed`` (or ``RANK``/``WORLD_SIZE``); the
        DataLoader worker split is automatic. With ``shuffle=True`` the shard order is permuted per epoch
        (seed ``seed + epoch``, identical on every rank) and samples pass through a ``shuffle_buffer``-sized
        buffer seeded per (seed, epoch, rank, worker); call :meth:`set_epoch` each epoch.
        """

        def __init__(self, shards: ShardSet | Sequence[str], split: str = "train", *, rank: int | None = None,
                     world_size: int | None = None, shuffle: bool = False, shuffle_buffer: int = 1000,
                     seed: int = 0, image_size: int | None = None, channels: int | None = None):
            super().__init__()
            if isinstance(shards, ShardSet):
                self.urls = shards.urls(split)
                image_size = image_size or shards.image_size
                channels = channels or shards.channels
            else:
                self.urls = list(shards)
            self.rank, self.world_size = rank, world_size
            self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
            self.image_size, self.channels = image_size, channels
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self) -> Iterator[Sample]:
            it = iter_samples(self.urls, rank=self.rank, world_size=self.world_size, worker=None,
                              num_workers=None, image_size=self.image_size, channels=self.channels,
                              shuffle_seed=(self.seed + self.epoch) if self.shuffle else None)
            if not self.shuffle or self.shuffle_buffer <= 1:
                return it
            import torch.utils.data

            info = torch.utils.data.get_worker_info()
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{info.id if info else 0}")
            return _buffer_shuffle(it, self.shuffle_buffer, rng)

    return ShardDataset


def _buffer_shuffle(it: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    buf: list[Sample] = []
    for s in it:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def __getattr__(name: str) -> Any:
    """``ShardDataset`` subclasses torch's ``IterableDataset``; it is defined on first access so that
    ingest workers, which import this module to write shards, never pay for importing torch."""
    if name == "ShardDataset":
        cls = _define_shard_dataset()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------- inspection


class ShardRecord(NamedTuple):
    """One sample of one of our shards, undecoded: ``caption`` is None when the sample has no ``.txt``."""

    key: str
    png: bytes
    label: int
    caption: str | None = None


def read_shard(path: str | Path) -> Iterator[ShardRecord]:
    """Each sample of one of *our* shards (no torch, no webdataset); the caption is decoded as UTF-8 (our
    writer stores valid UTF-8; anything else is a damaged shard)."""
    with open(path, "rb") as f:
        reader = TarReader(f, max_member_bytes=1 << 30)
        for item in reader.samples():
            if isinstance(item, Ignore):
                continue
            if item.reject is not None or "png" not in item.members:
                raise ShardIntegrityError(f"{path}: sample {item.key!r}: {item.reject or 'no png'} {item.detail}")
            cls = item.members.get("cls")
            try:
                label = int(cls) if cls is not None else -1
            except ValueError:
                raise ShardIntegrityError(f"{path}: sample {item.key!r}: label {cls[:20]!r} is not an integer") from None
            txt = item.members.get("txt")
            try:
                caption = txt.decode("utf-8") if txt is not None else None
            except UnicodeDecodeError:
                raise ShardIntegrityError(f"{path}: sample {item.key!r}: caption is not UTF-8") from None
            yield ShardRecord(item.key, item.members["png"], label, caption)
        if reader.status != "ok":
            raise ShardIntegrityError(f"{path}: {reader.status}: {reader.detail}")
