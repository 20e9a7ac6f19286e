"""Ingest sources: typed source configs, input listing, hardened decoding and normalisation to PNG.

A source turns ``data.*`` into a :class:`Plan`: ordered, deterministic chunks of inputs per split. A chunk
is small and picklable; :func:`iter_chunk` (run in an ingest worker) turns it into normalised samples
(:class:`Good`), skipped inputs counted by reason (:class:`Skip`) and ignored files (:class:`Ignore`).

Sources (``data.source``):

- ``fashion-mnist``: the four IDX files from ``data.path``, else the Debian package's directory
  (:data:`FASHION_MNIST_DEBIAN_DIR`), else a download into ``<run.root>/downloads`` checked by sha256.
  Official split: 60k train, 10k validation (t10k).
- ``mnist``: the same IDX reader on ``data.path`` (or the download code).
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images).
- ``image-folder``: ``data.path/<class>/**/*.{jpg,jpeg,png,webp}`` (one sub-folder per class) or a flat
  folder of images (unlabelled). Hidden files are ignored.
- ``shards``: existing WebDataset tars (local paths, directories, globs, ``{a..b}`` ranges or fsspec
  URLs, whitespace-separated), read by our own streaming tar parser: only regular members with safe
  names, a size cap per member, never extracted. Their samples are re-encoded and re-keyed.

Every image is decoded with Pillow restricted to JPEG/PNG/WebP, never with truncated-image padding, and
normalised to ``image_size`` x ``image_size`` x ``channels`` uint8, then stored as lossless PNG.
Output keys are ``<split>_<index:08d>`` (index in the split's deterministic order) for list sources and
``<split>_<input shard:06d>_<position:06d>`` for the shards source.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import io
import math
import os
import re
import stat
import struct
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from infra.errors import PermanentError
from infra.tar import (  # noqa: F401  (re-exported: one table of skip reasons)
    DUPLICATE_KEY,
    DUPLICATE_MEMBER,
    IMAGE_MEMBER_EXTS,
    KEPT_MEMBER_EXTS,
    LINK_MEMBER,
    SPECIAL_MEMBER,
    TOO_LARGE,
    TRUNCATED_SHARD,
    UNSAFE_NAME,
    Ignore,
    TarReader,
    TarSample,
    safe_member_name,
    split_member_name,
)

if TYPE_CHECKING:
    from typing import Self

SPLITS: tuple[str, ...] = ("train", "val")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")  # the only decoders Pillow may use on our inputs
MIN_SHARD_SAMPLES = 256  # data.min_shards never makes shards smaller than this
SPLIT_SALT = 0x1A6E57  # mixes the global seed into the split permutation

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))

# IDX file stems per split; a file may be stored gzipped (<stem>.gz) or raw (<stem>).
IDX_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official download locations and the sha256 of the upstream .gz files (as published by the dataset
# authors' mirrors; Debian's package recompresses them, so its .gz hashes differ while the content matches).
DOWNLOADS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
        "sha256": {
            "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
        },
    },
    "mnist": {
        "mirrors": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        "sha256": {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    },
}

# Skip reasons (bad inputs: they count towards data.max_bad_fraction). The tar reader's own reasons
# (too_large, unsafe_name, link_member, special_member, duplicate_key, duplicate_member, truncated_shard)
# live in infra/tar.py and are imported above.
CORRUPT_IMAGE = "corrupt_image"          # not a decodable JPEG/PNG/WebP
TRUNCATED_IMAGE = "truncated_image"      # the image data ends early
UNSUPPORTED_MODE = "unsupported_mode"    # a pixel format we cannot map to L/RGB (e.g. float)
UNREADABLE = "unreadable"                # I/O error, permission, dangling link
NOT_REGULAR_FILE = "not_regular_file"    # FIFO, socket or device in an image folder
NO_IMAGE = "no_image"                    # a sample without a jpg/jpeg/png/webp member
MULTIPLE_IMAGES = "multiple_images"      # a sample with more than one image member
BAD_LABEL = "bad_label"                  # a .cls member that is not a non-negative integer
MISSING_LABEL = "missing_label"          # no .cls in a shard whose first sample has one
UNEXPECTED_LABEL = "unexpected_label"    # a .cls in a shard whose first sample has none
CORRUPT_SHARD = "corrupt_shard"          # an input that is not a readable tar (bad header, bad gzip)
MISSING_CAPTION = "missing_caption"      # no caption in a captioned dataset (data.missing_caption=skip)
# Caption notes (counted with the ignored parts: the sample itself is kept)
CAPTION_TRUNCATED = "caption_truncated"  # longer than data.max_caption_bytes: cut at a character boundary
CAPTION_UTF8_ERRORS = "caption_utf8_errors"  # not valid UTF-8: the bad bytes became U+FFFD
CAPTION_BAD_JSON = "caption_bad_json"    # a .json member that is not JSON or has no string "caption" field
CAPTION_BAD_LINE = "caption_bad_line"    # a captions-file row without a path and a string caption, or too long
EMPTY_CAPTION = "empty_caption"          # no caption in a captioned dataset: stored empty (data.missing_caption)
MAX_CAPTION_ROW_CHARS = 131072  # a data.captions_file row (CSV field, JSONL line) longer than this is a bad line
MAX_CAPTIONS_FILE_BYTES = 1 << 30  # a larger data.captions_file is refused (it is read row by row)


class IngestError(PermanentError, RuntimeError):
    """The ingest stage cannot produce a trustworthy dataset; the message says why and what to change."""


class SourceError(IngestError):
    """A source cannot be read: missing or empty path, malformed file, unknown layout. Names the path."""


class BadInput(Exception):
    """One input is unusable; ``reason`` is one of the skip reasons above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------- chunk output


@dataclass(slots=True)
class Good:
    """One normalised sample: ``png`` holds the final image, ``label`` is -1 when unlabelled, ``caption`` is
    None for an uncaptioned sample (stored as the ``.txt`` member otherwise)."""

    split: str
    key: str
    png: bytes
    label: int
    caption: str | None = None


@dataclass(slots=True)
class Skip:
    """One bad input (counted by reason; ``ref`` names it for the manifest's examples)."""

    reason: str
    ref: str
    detail: str = ""


@dataclass(slots=True)
class InputDamage:
    """An input shard that did not end cleanly (``status``: truncated, corrupt, empty)."""

    url: str
    status: str
    detail: str


ChunkItem = Good | Skip | Ignore | InputDamage


# --------------------------------------------------------------------------------------------- image codec


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """What every stored image looks like, plus the decoder limits."""

    size: int
    channels: int
    alpha_background: str = "white"
    max_input_bytes: int = 64 * 1024 * 1024
    png_compress_level: int = 1
    max_decode_bytes: int = 256 << 20
    max_caption_bytes: int = 1024
    missing_caption: str = "empty"  # or "skip"

    @classmethod
    def from_data(cls, data: Any) -> ImageSpec:
        return cls(size=data.image_size, channels=data.channels, alpha_background=data.alpha_background,
                   max_input_bytes=data.max_input_bytes, png_compress_level=data.png_compress_level,
                   max_decode_bytes=data.max_decode_mb << 20, max_caption_bytes=data.max_caption_bytes,
                   missing_caption=data.missing_caption)


# --------------------------------------------------------------------------------------------- captions


_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_ESCAPED_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # surrogates that surrogateescape never makes


def decode_caption(data: bytes | str, max_bytes: int) -> tuple[str, list[str]]:
    """A caption as stored: UTF-8 (invalid bytes replaced), whitespace runs (newlines included) folded to one
    space, control characters dropped, cut to ``max_bytes`` at a character boundary. Returns the text and the
    notes to count (:data:`CAPTION_UTF8_ERRORS`, :data:`CAPTION_TRUNCATED`). Never evaluates anything.

    A ``str`` may carry the bytes its reader could not decode as surrogates (``errors="surrogateescape"``, as
    the captions-file and ``.json`` readers decode); they, and any other lone surrogate, count as invalid UTF-8
    exactly as in ``bytes``, so every layout reports the same notes for the same caption bytes."""
    notes: list[str] = []
    if isinstance(data, str) and _SURROGATE.search(data):
        data = _NOT_ESCAPED_BYTE.sub("\udcff", data).encode("utf-8", "surrogateescape")
    if isinstance(data, bytes):
        limit = 4 * max_bytes + 4  # bounded work on a huge member; the cut is made below anyway
        final = len(data) <= limit  # a cut prefix may end inside a character: not an error
        try:
            text = codecs.getincrementaldecoder("utf-8")("strict").decode(data[:limit], final=final)
        except UnicodeDecodeError:
            notes.append(CAPTION_UTF8_ERRORS)
            text = codecs.getincrementaldecoder("utf-8")("replace").decode(data[:limit], final=final)
        if not final:
            notes.append(CAPTION_TRUNCATED)
    else:
        text = data
    text = " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())
    raw = text.encode("utf-8")
    if len(raw) > max_bytes:
        text = raw[:max_bytes].decode("utf-8", errors="ignore").rstrip()
        if CAPTION_TRUNCATED not in notes:
            notes.append(CAPTION_TRUNCATED)
    return text, notes


def caption_from_json(data: bytes, max_bytes: int) -> tuple[str | None, list[str]]:
    """The ``caption`` field of a ``.json`` member (img2dataset's layout), or None and a note. Invalid UTF-8 in
    the caption is counted as in a ``.txt`` member (the bytes reach :func:`decode_caption` undecoded)."""
    import json

    if len(data) > 64 * max_bytes + 1024:
        return None, [CAPTION_BAD_JSON]
    try:
        obj = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except (ValueError, RecursionError):
        return None, [CAPTION_BAD_JSON]
    value = obj.get("caption") if isinstance(obj, dict) else None
    if not isinstance(value, str):
        return None, [CAPTION_BAD_JSON]
    return decode_caption(value, max_bytes)


def sample_caption(members: dict[str, bytes], max_bytes: int) -> tuple[str | None, list[str]]:
    """The caption of a tar sample: its ``.txt`` member, else the ``caption`` of its ``.json``, else None."""
    if "txt" in members:
        return decode_caption(members["txt"], max_bytes)
    if "json" in members:
        return caption_from_json(members["json"], max_bytes)
    return None, []


# Bytes per pixel of a decoded Pillow image, by mode.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
               "I": 4, "F": 4, "RGB": 3, "YCbCr": 3, "HSV": 3, "LAB": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4}


def decode_cost(width: int, height: int, mode: str, has_transparency: bool = False) -> int:
    """Peak bytes :func:`decode_image` takes for a ``width x height`` image in Pillow ``mode``: the decoded
    pixels plus the copies its conversion to 8-bit grey/RGB makes (alpha compositing makes three RGBA-sized
    ones)."""
    px = width * height
    cost = px * _MODE_BYTES.get(mode, 4)
    if mode in _ALPHA_MODES or (mode == "P" and has_transparency):
        return cost + px * (4 + 4 + 4 + 3)
    if mode in _SIXTEEN_BIT_MODES:
        return cost + px * 3  # a 16-bit copy and the 8-bit result (converted in bands of rows)
    return cost + px * 3


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")


def decode_image(data: bytes, spec: ImageSpec, fit: str) -> np.ndarray:
    """Encoded JPEG/PNG/WebP bytes -> ``(size, size)`` or ``(size, size, 3)`` uint8; raises :class:`BadInput`."""
    if len(data) > spec.max_input_bytes:
        raise BadInput(TOO_LARGE, f"{len(data)} bytes > data.max_input_bytes={spec.max_input_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError:
        raise BadInput(CORRUPT_IMAGE, "not a JPEG, PNG or WebP image") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on malformed data (SyntaxError, ...)
        raise BadInput(_decode_reason(e), f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadInput(CORRUPT_IMAGE, f"empty image {w}x{h}")
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise BadInput(TOO_LARGE, f"{w}x{h} pixels > {Image.MAX_IMAGE_PIXELS} (decompression-bomb limit)")
    try:
        if img.format in ("JPEG", "MPO") and min(w, h) >= 4 * spec.size:
            # decode at 1/2, 1/4 or 1/8 scale while staying >= 2x the target (as Image.thumbnail does)
            img.draft(img.mode, (2 * spec.size, 2 * spec.size))
        cost = decode_cost(*img.size, img.mode, "transparency" in img.info)
        if cost > spec.max_decode_bytes:
            raise BadInput(TOO_LARGE, f"{img.size[0]}x{img.size[1]} {img.mode} takes about {cost >> 20} MB to "
                                      f"decode > data.max_decode_mb={spec.max_decode_bytes >> 20}")
        img.load()
        if img.getexif().get(0x0112, 1) in (2, 3, 4, 5, 6, 7, 8):  # EXIF orientation: upright it
            img = ImageOps.exif_transpose(img)
        return fit_image(to_target_mode(img, spec), spec, fit)
    except (BadInput, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - same: any decoder failure is a bad input, never a crash
        raise BadInput(_decode_reason(e), f"{type(e).__name__}: {e}") from None


def _decode_reason(e: BaseException) -> str:
    msg = str(e).lower()
    if "truncat" in msg or isinstance(e, EOFError):
        return TRUNCATED_IMAGE
    if isinstance(e, Image.DecompressionBombError):
        return TOO_LARGE
    return CORRUPT_IMAGE


def to_target_mode(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Any 8/16-bit grey, palette, RGB(A), CMYK or YCbCr image -> mode ``L`` (channels=1) or ``RGB`` (3).

    16-bit grey is scaled (not clipped) to 8 bits; transparency is composited onto
    ``data.alpha_background``; float images are rejected (their range is unknown).
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img)
        out = np.empty(a.shape, np.uint8)
        for r in range(0, a.shape[0], 256):  # in bands of rows: no full-size wide temporaries
            band = np.clip(a[r:r + 256], 0, 65535).astype(np.uint32)
            out[r:r + 256] = (band * 255 + 32767) // 65535
        img = Image.fromarray(out, "L")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "RGBX", "HSV"):
        img = img.convert("RGB")
    elif mode not in ("L", "RGB") + _ALPHA_MODES:
        raise BadInput(UNSUPPORTED_MODE, f"pixel mode {mode!r} cannot be mapped to 8-bit grey/RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        colour = (255, 255, 255, 255) if spec.alpha_background == "white" else (0, 0, 0, 255)
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, colour), rgba).convert("RGB")
    want = "L" if spec.channels == 1 else "RGB"
    return img if img.mode == want else img.convert(want)


def fit_image(img: Image.Image, spec: ImageSpec, fit: str) -> np.ndarray:
    """``L``/``RGB`` image -> ``size x size`` array by centre crop (``crop``) or centred black canvas (``pad``)."""
    s = spec.size
    w, h = img.size
    if fit == "pad":
        if w > s or h > s:
            scale = s / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
            w, h = nw, nh
        if (w, h) != (s, s):
            canvas = Image.new(img.mode, (s, s), 0)
            canvas.paste(img, ((s - w) // 2, (s - h) // 2))
            img = canvas
    elif fit == "crop":
        if (w, h) != (s, s):
            m = min(w, h)
            left, top = (w - m) / 2, (h - m) / 2
            resample = Image.Resampling.LANCZOS if m >= s else Image.Resampling.BICUBIC
            img = img.resize((s, s), resample, box=(left, top, left + m, top + m), reducing_gap=3.0)
    else:
        raise ValueError(f"fit must be 'crop' or 'pad' here, got {fit!r}")
    arr = np.asarray(img)
    if spec.channels == 3 and arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def auto_fit_for_grid(fit: str, side: int, size: int) -> str:
    """``data.fit=auto`` for MNIST-style square sources: pad when the image fits with even margins."""
    if fit != "auto":
        return fit
    return "pad" if size >= side and (size - side) % 2 == 0 else "crop"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SMALL_PNG_PIXELS = 64 * 64  # below this, Pillow's per-call overhead dominates: write the PNG directly


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


_PNG_IEND = _png_chunk(b"IEND", b"")


def encode_png(arr: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` -> PNG bytes (8-bit grey or RGB, lossless, deterministic).

    Small images are written directly (no row filter, one IDAT chunk: 3x faster than Pillow at 32x32
    with equal or smaller files for MNIST-like content); larger ones go through Pillow's encoder, whose
    adaptive row filters pay off there.
    """
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"encode_png needs uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    if h * w > _SMALL_PNG_PIXELS:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
        return buf.getvalue()
    c = 1 if arr.ndim == 2 else 3
    raw = np.zeros((h, w * c + 1), np.uint8)  # column 0: filter type "None" on every row
    raw[:, 1:] = arr.reshape(h, w * c)
    return _png_head(w, h, c) + _png_chunk(b"IDAT", zlib.compress(raw, compress_level)) + _PNG_IEND


@functools.lru_cache(maxsize=64)
def _png_head(w: int, h: int, c: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr)


# --------------------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class ArrayChunk:
    """In-memory images (IDX, digits): ``images`` is ``(n, h, w)`` uint8; keys start at ``start``."""

    split: str
    index: int
    start: int
    images: np.ndarray
    labels: np.ndarray | None
    fit: str  # "crop" or "pad" (resolved)
    source_ref: str  # for skip examples

    @property
    def chunk_id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def describe(self) -> dict[str, Any]:
        # the content is fixed by the source files, whose sha256 the plan description holds
        return {"type": "array", "split": self.split, "index": self.index, "start": self.start,
                "count": len(self.images), "fit": self.fit}

    def size_hint(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class FileChunk:
    """Image files under ``root``: ``files`` holds ``(relative path, label or -1, index in split, caption or
    None)`` (captions are read when the source is planned)."""

    split: str
    index: int
    root: str
    files: tuple[tuple[str, int, int, str | None], ...]

    @property
    def chunk_id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def describe(self) -> dict[str, Any]:
        listing = hashlib.sha256("\n".join(f"{p}\t{lab}\t{i}" + ("" if c is None else f"\t{c}")
                                           for p, lab, i, c in self.files).encode())
        return {"type": "files", "split": self.split, "index": self.index, "root": self.root,
                "count": len(self.files), "listing": listing.hexdigest()}

    def size_hint(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class TarChunk:
    """One input shard. ``split`` is fixed when the shard's name says it, else ``None``: each sample then
    goes to validation with probability ``val_fraction`` (a seeded hash of shard name and key).
    ``limits`` caps the samples written per split (``data.max_images`` across chunks)."""

    index: int
    url: str
    split: str | None
    val_fraction: float
    seed: int
    limits: tuple[tuple[str, int], ...] | None = None

    @property
    def chunk_id(self) -> str:
        return f"input-{self.index:06d}"

    def describe(self) -> dict[str, Any]:
        return {"type": "tar", "index": self.index, "url": self.url, "split": self.split,
                "val_fraction": self.val_fraction, "seed": self.seed,
                "limits": [list(x) for x in self.limits] if self.limits is not None else None}

    def size_hint(self) -> int:
        return 0

    def possible_splits(self) -> tuple[str, ...]:
        if self.split is not None:
            return (self.split,)
        return tuple(s for s, ok in (("train", self.val_fraction < 1.0), ("val", self.val_fraction > 0.0)) if ok)


@dataclass(frozen=True)
class ShapesChunk:
    """Generated ``shapes`` scenes ``start .. start + count - 1`` of a split (each drawn from its own seeded
    generator, so the images do not depend on how the split is chunked)."""

    split: str
    index: int
    start: int
    count: int
    seed: int

    @property
    def chunk_id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def describe(self) -> dict[str, Any]:
        return {"type": "shapes", "split": self.split, "index": self.index, "start": self.start,
                "count": self.count, "seed": self.seed}

    def size_hint(self) -> int:
        return self.count


Chunk = ArrayChunk | FileChunk | TarChunk | ShapesChunk


def iter_chunk(chunk: Chunk, spec: ImageSpec) -> Iterator[ChunkItem]:
    """Decode and normalise one chunk, in its deterministic order (run inside an ingest worker)."""
    if isinstance(chunk, ArrayChunk):
        yield from _iter_array_chunk(chunk, spec)
    elif isinstance(chunk, FileChunk):
        yield from _iter_file_chunk(chunk, spec)
    elif isinstance(chunk, TarChunk):
        yield from _iter_tar_chunk(chunk, spec)
    elif isinstance(chunk, ShapesChunk):
        yield from _iter_shapes_chunk(chunk, spec)
    else:
        raise TypeError(f"unknown chunk type {type(chunk).__name__}")


def _iter_array_chunk(chunk: ArrayChunk, spec: ImageSpec) -> Iterator[ChunkItem]:
    imgs = chunk.images
    n, h, w = imgs.shape[:3]
    s = spec.size
    if chunk.fit == "pad" and h <= s and w <= s:  # the common MNIST case, vectorised
        out = np.zeros((n, s, s), np.uint8)
        top, left = (s - h) // 2, (s - w) // 2
        out[:, top:top + h, left:left + w] = imgs
        if spec.channels == 3:
            out = np.repeat(out[..., None], 3, axis=3)
        arrays: Sequence[np.ndarray] = out
    else:
        arrays = [fit_image(Image.fromarray(imgs[i], "L"), spec, chunk.fit) for i in range(n)]
    labels = chunk.labels
    for i in range(n):
        yield Good(chunk.split, f"{chunk.split}_{chunk.start + i:08d}",
                   encode_png(arrays[i], spec.png_compress_level),
                   int(labels[i]) if labels is not None else -1)


def _iter_shapes_chunk(chunk: ShapesChunk, spec: ImageSpec) -> Iterator[ChunkItem]:
    from infra import shapes

    split_id = SPLITS.index(chunk.split)
    for i in range(chunk.start, chunk.start + chunk.count):
        rng = np.random.default_rng([chunk.seed, split_id, i])
        scene = shapes.draw_scene(rng, allow_heldout=chunk.split != "train")
        arr = shapes.render(scene, rng, spec.size)
        if spec.channels == 1:
            arr = np.asarray(Image.fromarray(arr, "RGB").convert("L"))
        yield Good(chunk.split, f"{chunk.split}_{i:08d}", encode_png(arr, spec.png_compress_level), scene.label,
                   shapes.caption(scene, rng))


def _iter_file_chunk(chunk: FileChunk, spec: ImageSpec) -> Iterator[ChunkItem]:
    root = Path(chunk.root)
    for rel, label, index, caption in chunk.files:
        try:
            data = read_regular_file(root / rel, spec.max_input_bytes)
            arr = decode_image(data, spec, "crop")
        except BadInput as e:
            yield Skip(e.reason, rel, e.detail)
            continue
        yield Good(chunk.split, f"{chunk.split}_{index:08d}", encode_png(arr, spec.png_compress_level), label,
                   caption)


def read_regular_file(path: Path, max_bytes: int, *, prefix: bool = False) -> bytes:
    """Read a whole regular file (following file symlinks); FIFOs/devices are refused without blocking.

    A file over ``max_bytes`` is a :data:`TOO_LARGE` input (``data.max_input_bytes``), or with ``prefix`` read
    only up to ``max_bytes + 1`` bytes (the caller cuts it and sees that it was longer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadInput(UNREADABLE, f"{e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(NOT_REGULAR_FILE, "not a regular file (FIFO, socket or device)")
        if st.st_size > max_bytes and not prefix:
            raise BadInput(TOO_LARGE, f"{st.st_size} bytes > data.max_input_bytes={max_bytes}")
        chunks = []
        # one extra byte detects a file that grew past the cap meanwhile
        remaining = min(st.st_size, max_bytes) + 1
        while remaining > 0:
            b = os.read(fd, min(remaining, 1 << 22))
            if not b:
                break
            chunks.append(b)
            remaining -= len(b)
        data = b"".join(chunks)
        if len(data) > max_bytes and not prefix:
            raise BadInput(TOO_LARGE, f"more than data.max_input_bytes={max_bytes} bytes")
        return data
    except OSError as e:
        raise BadInput(UNREADABLE, f"{e.strerror or e}") from None
    finally:
        os.close(fd)


def _open_url(url: str) -> BinaryIO:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _hash_unit(*parts: Any) -> float:
    h = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _iter_tar_chunk(chunk: TarChunk, spec: ImageSpec) -> Iterator[ChunkItem]:
    remaining = dict(chunk.limits) if chunk.limits is not None else None
    possible = chunk.possible_splits()
    labelled: bool | None = None  # decided by the shard's first well-formed sample
    # Captions are decided per sample. Once an image of this shard had a usable caption, a later one without
    # gets data.missing_caption here; one before it (or in a shard without any) is stored with caption None,
    # and the stage completes those once it knows whether any input had captions (writer.complete_captions).
    captioned = False
    shard_name = chunk.url.rstrip("/").rsplit("/", 1)[-1]
    try:
        f = _open_url(chunk.url)
    except (OSError, ValueError) as e:
        yield Skip(CORRUPT_SHARD, chunk.url, f"cannot open: {e}")
        return
    with f:
        reader = TarReader(f, spec.max_input_bytes)
        for item in reader.samples():
            if isinstance(item, Ignore):
                yield Ignore(item.reason, f"{chunk.url}#{item.ref}")
                continue
            ref = f"{chunk.url}#{item.key}"
            for name in item.ignored:
                yield Ignore("other_member", f"{chunk.url}#{name}")
            if item.reject is not None:
                yield Skip(item.reject, ref, item.detail)
                continue
            if labelled is None and any(e in item.members for e in IMAGE_MEMBER_EXTS):
                labelled = "cls" in item.members
            if labelled is True and "cls" not in item.members:
                # a half-sample (e.g. its .cls comes later, non-adjacent) must not pass as unlabelled
                yield Skip(MISSING_LABEL, ref, "no .cls member in a labelled shard")
                continue
            if labelled is False and "cls" in item.members:
                yield Skip(UNEXPECTED_LABEL, ref, "a .cls member in a shard whose first sample has none")
                continue
            caption, notes = sample_caption(item.members, spec.max_caption_bytes)
            if not captioned and caption is not None:
                captioned = any(e in item.members for e in IMAGE_MEMBER_EXTS)
            for note in notes:
                yield Ignore(note, ref)
            empty = captioned and caption is None
            if empty:
                if spec.missing_caption == "skip":
                    yield Skip(MISSING_CAPTION, ref, "no usable .txt/.json caption in a captioned dataset")
                    continue
                caption = ""
            split = chunk.split
            if split is None:
                split = "val" if _hash_unit(chunk.seed, shard_name, item.key) < chunk.val_fraction else "train"
            if remaining is not None and remaining.get(split, 0) <= 0:
                if all(remaining.get(s, 0) <= 0 for s in possible):
                    return
                continue  # over this split's data.max_images: not an input at all
            try:
                good = _tar_sample_to_good(item, split, chunk.index, spec)
                good.caption = caption
            except BadInput as e:
                yield Skip(e.reason, ref, e.detail)
                continue
            if remaining is not None:
                remaining[split] -= 1
            if empty:
                yield Ignore(EMPTY_CAPTION, ref)
            yield good
        if reader.status != "ok":
            yield InputDamage(chunk.url, reader.status, reader.detail or "empty file (no tar header)")
            if reader.status == "empty" or (reader.status == "corrupt" and reader.offset <= 512):  # 1st header
                yield Skip(CORRUPT_SHARD, chunk.url, reader.detail or "empty file (no tar header)")


def _tar_sample_to_good(sample: TarSample, split: str, shard_index: int, spec: ImageSpec) -> Good:
    images = [e for e in IMAGE_MEMBER_EXTS if e in sample.members]
    if not images:
        raise BadInput(NO_IMAGE, f"members: {sorted(sample.members) or 'none kept'}")
    if len(images) > 1:
        raise BadInput(MULTIPLE_IMAGES, f"members: {sorted(images)}")
    label = -1
    if "cls" in sample.members:
        text = sample.members["cls"].strip()
        if not text.isdigit() or len(text) > 9:
            raise BadInput(BAD_LABEL, f".cls is {text[:20]!r}, expected a non-negative integer")
        label = int(text)
    arr = decode_image(sample.members[images[0]], spec, "crop")
    return Good(split, f"{split}_{shard_index:06d}_{sample.position:06d}", encode_png(arr, spec.png_compress_level),
                label)


# --------------------------------------------------------------------------------------------- IDX files


class IdxReader:
    """Streaming reader of an unsigned-byte IDX file (MNIST format, gzipped or raw).

    ``count`` and ``shape`` (per item) come from the header; :meth:`read` returns the next ``n`` items.
    Every malformation raises :class:`SourceError` naming the file.
    """

    def __init__(self, path: str | Path, expect_ndim: int | None = None):
        self.path = Path(path)
        opener: Any = gzip.open if self.path.suffix == ".gz" else open
        try:
            self._f = opener(self.path, "rb")
            head = self._f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                raise SourceError(f"{self.path}: not an IDX file (bad magic {head!r})")
            if head[2] != 0x08:
                raise SourceError(f"{self.path}: IDX element type 0x{head[2]:02x} is not unsigned byte (0x08)")
            ndim = head[3]
            if expect_ndim is not None and ndim != expect_ndim:
                raise SourceError(f"{self.path}: IDX has {ndim} dimensions, expected {expect_ndim}")
            dims_raw = self._f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise SourceError(f"{self.path}: truncated IDX header")
        except (OSError, EOFError, zlib.error) as e:
            self.close()
            raise SourceError(f"{self.path}: cannot read IDX file: {e}") from e
        except SourceError:
            self.close()
            raise
        dims = struct.unpack(f">{ndim}I", dims_raw)
        self.count = dims[0]
        self.shape = tuple(dims[1:])
        self.item_bytes = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self._read_items = 0

    def read(self, n: int) -> np.ndarray:
        if self._read_items + n > self.count:
            raise ValueError(f"{self.path}: asked for items past the {self.count} in the file")
        need = n * self.item_bytes
        try:
            data = self._f.read(need)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceError(f"{self.path}: cannot read IDX data: {e}") from e
        if len(data) < need:
            raise SourceError(f"{self.path}: truncated IDX data ({len(data)} of {need} bytes for items "
                              f"{self._read_items}..{self._read_items + n - 1})")
        self._read_items += n
        return np.frombuffer(data, np.uint8).reshape((n, *self.shape))

    def check_end(self) -> None:
        """After reading every item: the file must end here."""
        try:
            extra = self._f.read(1)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceError(f"{self.path}: cannot read IDX data: {e}") from e
        if extra:
            raise SourceError(f"{self.path}: trailing bytes after {self.count} items")

    def close(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_idx(path: str | Path, limit: int | None = None, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or raw) of unsigned bytes; ``limit`` reads only the first items."""
    with IdxReader(path, expect_ndim) as r:
        n = r.count if limit is None else min(r.count, limit)
        items = r.read(n)
        if limit is None:
            r.check_end()
    return items


def find_idx_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The four IDX files in ``directory`` (``.gz`` or raw) and the names still missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for stems in IDX_STEMS.values():
        for stem in stems:
            for name in (stem + ".gz", stem):
                if (directory / name).is_file():
                    found[stem] = directory / name
                    break
            else:
                missing.append(stem + ".gz")
    return found, missing


def download_verified(urls: Sequence[str], sha256: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download the first URL that works to ``dest`` (temp file, sha256 check, rename); raise with all errors."""
    from infra.storage import atomic_open

    errors = []
    for url in urls:
        try:
            h = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=timeout) as r, atomic_open(dest, "wb") as out:
                while True:
                    block = r.read(1 << 20)
                    if not block:
                        break
                    h.update(block)
                    out.write(block)
                if h.hexdigest() != sha256:
                    raise ValueError(f"sha256 {h.hexdigest()} != expected {sha256}")
            return dest
        except (OSError, ValueError) as e:  # URLError is an OSError
            errors.append(f"{url}: {e}")
    raise SourceError(f"could not download {dest.name}: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True, kw_only=True)
class PlanContext:
    """What a source needs besides its own config."""

    spec: ImageSpec
    fit: str  # data.fit
    seed: int
    val_fraction: float
    max_images: int | None
    shard_max_count: int
    min_shards: int
    download_dir: Path  # <run.root>/downloads


@dataclass
class Plan:
    """Everything the ingest stage needs to run a source: chunks in output order and the manifest facts."""

    chunks: Iterable[Chunk]  # in output order; may be a generator (IDX files decompress as they go): iterate once
    classes: list[str] | None  # None: unlabelled
    description: dict[str, Any]
    num_inputs: int | None  # None when unknown before reading (shards)
    sequential: bool = False  # chunks must run one after another (shards with data.max_images)
    skipped: list[Skip] = field(default_factory=list)  # bad inputs found while listing
    ignored: list[Ignore] = field(default_factory=list)


def samples_per_shard(n: int, shard_max_count: int, min_shards: int) -> int:
    """Shard size for a split of ``n`` inputs: at most ``shard_max_count``, at least ``min_shards`` shards
    when that leaves >= :data:`MIN_SHARD_SAMPLES` per shard (parallel ingest, every rank x worker busy)."""
    return max(1, min(shard_max_count, max(MIN_SHARD_SAMPLES, math.ceil(n / min_shards))))


def split_permutation(n: int, labels: np.ndarray | None, val_fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index orders; stratified per class when labels exist. Both orders are shuffled
    so that every shard mixes classes."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_SALT]))
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, val = [], []
    for g in groups:
        p = rng.permutation(g)
        k = math.floor(len(p) * val_fraction + 0.5)
        val.append(p[:k])
        train.append(p[k:])
    tr = rng.permutation(np.concatenate(train)) if train else np.arange(0)
    va = rng.permutation(np.concatenate(val)) if val else np.arange(0)
    return tr.astype(np.int64), va.astype(np.int64)


def _array_chunks(split: str, images: np.ndarray, labels: np.ndarray | None, ctx: PlanContext, fit: str,
                  ref: str) -> list[Chunk]:
    n = len(images)
    per = samples_per_shard(n, ctx.shard_max_count, ctx.min_shards)
    return [ArrayChunk(split, i, start, np.ascontiguousarray(images[start:start + per]),
                       None if labels is None else np.ascontiguousarray(labels[start:start + per]), fit, ref)
            for i, start in enumerate(range(0, n, per))]


@dataclass(frozen=True, kw_only=True)
class IdxSource:
    """MNIST-format IDX files (``fashion-mnist``, ``mnist``): official 60k/10k split, 28x28 grey."""

    kind: str
    path: str | None = None
    kinds: ClassVar[tuple[str, ...]] = ("fashion-mnist", "mnist")

    def locate(self, ctx: PlanContext) -> tuple[Path, str]:
        """The directory holding the four files, and how it was found."""
        if self.path is not None:
            d = Path(self.path).expanduser()
            if not d.is_dir():
                raise SourceError(f"data.path={self.path}: directory {d.resolve()} does not exist")
            _, missing = find_idx_files(d)
            if missing:
                raise SourceError(f"data.path={self.path}: {d.resolve()} lacks the {self.kind} IDX files "
                                  f"{', '.join(missing)} (gzipped or not)")
            return d, "data.path"
        if self.kind == "fashion-mnist":
            deb = Path(FASHION_MNIST_DEBIAN_DIR)
            if deb.is_dir() and not find_idx_files(deb)[1]:
                return deb, "debian package dataset-fashion-mnist"
        cache = ctx.download_dir / self.kind
        if cache.is_dir() and not find_idx_files(cache)[1]:
            return cache, "download cache"
        info = DOWNLOADS[self.kind]
        try:
            for name, digest in info["sha256"].items():
                target = cache / name
                if not target.is_file():
                    download_verified([m + name for m in info["mirrors"]], digest, target)
        except SourceError as e:
            hint = ("install the Debian package (apt-get install dataset-fashion-mnist, files in "
                    f"{FASHION_MNIST_DEBIAN_DIR}) or " if self.kind == "fashion-mnist" else "")
            raise SourceError(f"{self.kind}: no local copy found and the download failed ({e}). To fix: {hint}"
                              f"pass data.path=DIR with {', '.join(info['sha256'])}") from None
        return cache, "downloaded"

    def plan(self, ctx: PlanContext) -> Plan:
        from infra.storage import sha256_file

        directory, how = self.locate(ctx)
        files, _ = find_idx_files(directory)
        splits: dict[str, tuple[Path, int, np.ndarray, str]] = {}
        for split, (img_stem, lab_stem) in IDX_STEMS.items():
            with IdxReader(files[img_stem], expect_ndim=3) as r:
                count, (h, w) = r.count, r.shape
            with IdxReader(files[lab_stem], expect_ndim=1) as r:
                if r.count != count:
                    raise SourceError(f"{files[img_stem]} has {count} images but {files[lab_stem]} has "
                                      f"{r.count} labels")
            n = count if ctx.max_images is None else min(count, ctx.max_images)
            labels = read_idx(files[lab_stem], None if n == count else n, expect_ndim=1)
            if len(labels) and labels.max() >= 10:
                raise SourceError(f"{files[lab_stem]}: label {int(labels.max())} outside 0..9")
            fit = auto_fit_for_grid(ctx.fit, h, ctx.spec.size) if h == w else ("crop" if ctx.fit == "auto" else ctx.fit)
            splits[split] = (files[img_stem], n, labels, fit)
        if not splits["train"][1]:
            raise SourceError(f"{directory}: the {self.kind} training file holds no images")
        desc = {"kind": self.kind, "path": str(directory.resolve()), "found_by": how,
                "files": {p.name: sha256_file(p) for p in files.values()},
                "split": "official (train / t10k)", "fit": splits["train"][3]}
        classes = list(FASHION_MNIST_CLASSES if self.kind == "fashion-mnist" else MNIST_CLASSES)
        return Plan(chunks=self._chunks(splits, ctx), classes=classes, description=desc,
                    num_inputs=sum(v[1] for v in splits.values()))

    @staticmethod
    def _chunks(splits: dict[str, tuple[Path, int, np.ndarray, str]], ctx: PlanContext) -> Iterator[Chunk]:
        """Decompress progressively: the first chunk is ready (and being encoded) long before the last."""
        for split, (path, n, labels, fit) in splits.items():
            per = samples_per_shard(n, ctx.shard_max_count, ctx.min_shards)
            with IdxReader(path, expect_ndim=3) as r:
                for i, start in enumerate(range(0, n, per)):
                    k = min(per, n - start)
                    yield ArrayChunk(split, i, start, r.read(k), labels[start:start + k].copy(), fit, str(path))
                if n == r.count:
                    r.check_end()


@dataclass(frozen=True, kw_only=True)
class DigitsSource:
    """scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255), split by ``data.val_fraction``."""

    kind: str = "digits"

    def plan(self, ctx: PlanContext) -> Plan:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        labels = d.target.astype(np.int64)
        tr, va = split_permutation(len(images), labels, ctx.val_fraction, ctx.seed)
        fit = "crop" if ctx.fit == "auto" else ctx.fit  # a square 8x8 grid: crop == resize
        chunks: list[Chunk] = []
        for split, idx in (("train", tr), ("val", va)):
            idx = idx[:ctx.max_images] if ctx.max_images is not None else idx
            chunks += _array_chunks(split, images[idx], labels[idx], ctx, fit, "sklearn.datasets.load_digits")
        n = sum(c.size_hint() for c in chunks)
        import sklearn

        desc = {"kind": "digits", "path": "sklearn.datasets.load_digits()", "num_images": len(images),
                "sklearn": sklearn.__version__,
                "split": f"seeded, stratified (data.val_fraction={ctx.val_fraction})", "fit": fit}
        return Plan(chunks=chunks, classes=[str(i) for i in range(10)], description=desc, num_inputs=n)


@dataclass(frozen=True, kw_only=True)
class ShapesSource:
    """Generated captioned scenes (:mod:`infra.shapes`): ``data.shapes_train`` / ``data.shapes_val`` images,
    training scenes never holding a held-out colour-shape pair, validation scenes from the full distribution."""

    num_train: int
    num_val: int
    kind: str = "shapes"

    def plan(self, ctx: PlanContext) -> Plan:
        from infra import shapes

        chunks: list[Chunk] = []
        for split, n in (("train", self.num_train), ("val", self.num_val)):
            n = min(n, ctx.max_images) if ctx.max_images is not None else n
            per = samples_per_shard(n, ctx.shard_max_count, ctx.min_shards)
            chunks += [ShapesChunk(split, ci, start, min(per, n - start), ctx.seed)
                       for ci, start in enumerate(range(0, n, per))]
        desc = {"kind": "shapes", "generator": "infra.shapes", "num_train": self.num_train, "num_val": self.num_val,
                "heldout_pairs": sorted(" ".join(p) for p in shapes.HELDOUT_PAIRS),
                "caption_grammar": "shapes", "split": "train: no held-out pair; val: the full distribution"}
        return Plan(chunks=chunks, classes=list(shapes.CLASSES), description=desc,
                    num_inputs=sum(c.size_hint() for c in chunks))


@dataclass(frozen=True, kw_only=True)
class ImageFolderSource:
    """``<path>/<class>/**/*.{jpg,jpeg,png,webp}`` (labelled, classes = sorted sub-folder names) or a flat
    folder of images (unlabelled). Images are scaled and cropped (``data.fit``) to the configured size."""

    path: str
    captions_file: str | None = None
    kind: str = "image-folder"

    def plan(self, ctx: PlanContext) -> Plan:
        root = Path(self.path).expanduser()
        if not root.exists():
            raise SourceError(f"data.path={self.path}: directory {root.resolve()} does not exist")
        if not root.is_dir():
            raise SourceError(f"data.path={self.path}: {root.resolve()} is not a directory")
        root = root.resolve()
        skipped: list[Skip] = []
        ignored: list[Ignore] = []
        top_files: list[str] = []
        class_files: dict[str, list[str]] = {}
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:
            raise SourceError(f"data.path={self.path}: cannot list {root}: {e}") from e
        for e in entries:
            if e.name.startswith("."):
                ignored.append(Ignore("hidden", e.name))
            elif e.is_dir(follow_symlinks=False):
                files: list[str] = []
                _walk(root, e.name, files, skipped, ignored)
                if files:
                    class_files[e.name] = files
            else:
                _consider_file(e, e.name, top_files, skipped, ignored)
        if class_files:
            classes: list[str] | None = sorted(class_files)
            for rel in top_files:
                ignored.append(Ignore("outside_class_dir", rel))
            items = [(rel, ci) for ci, c in enumerate(classes) for rel in class_files[c]]
        else:
            classes = None
            items = [(rel, -1) for rel in top_files]
        if not items and not skipped:
            raise SourceError(f"data.path={self.path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                              f"{root}")
        items.sort()
        captions = _folder_captions(root, [rel for rel, _ in items], self.captions_file, ctx.spec, skipped, ignored)
        if captions is not None and ctx.spec.missing_caption == "skip":
            items = [it for it in items if captions[it[0]] is not None]
        labels = np.array([lab for _, lab in items], np.int64) if classes else None
        tr, va = split_permutation(len(items), labels, ctx.val_fraction, ctx.seed)
        chunks: list[Chunk] = []
        for split, idx in (("train", tr), ("val", va)):
            if ctx.max_images is not None:
                idx = idx[:ctx.max_images]
            per = samples_per_shard(len(idx), ctx.shard_max_count, ctx.min_shards)
            for ci, start in enumerate(range(0, len(idx), per)):
                files_t = tuple((items[j][0], items[j][1], start + k,
                                 None if captions is None else (captions[items[j][0]] or ""))
                                for k, j in enumerate(idx[start:start + per].tolist()))
                chunks.append(FileChunk(split, ci, str(root), files_t))
        listing = hashlib.sha256("\n".join(rel for rel, _ in items).encode()).hexdigest()
        desc = {"kind": "image-folder", "path": str(root), "layout": "class sub-folders" if classes else "flat",
                "num_files": len(items), "listing_sha256": listing,
                "captions": ("none" if captions is None else
                             f"{sum(c is not None for c in captions.values())} of {len(captions)} images "
                             f"({'data.captions_file' if self.captions_file else 'sidecar .txt files'})"),
                "split": f"seeded{', stratified' if classes else ''} (data.val_fraction={ctx.val_fraction})",
                "fit": "crop" if ctx.fit == "auto" else ctx.fit}
        n = sum(c.size_hint() for c in chunks) + len(skipped)
        return Plan(chunks=chunks, classes=classes, description=desc, num_inputs=n, skipped=skipped,
                    ignored=ignored)


def _folder_captions(root: Path, images: list[str], captions_file: str | None, spec: ImageSpec,
                     skipped: list[Skip], ignored: list[Ignore]) -> dict[str, str | None] | None:
    """Captions of folder images: from ``captions_file`` (CSV with ``path`` and ``caption`` columns, or JSONL
    of ``{"path", "caption"}``; paths relative to the folder) or from sidecar ``<name>.txt`` files beside the
    images. None when the folder has no captions at all. Sidecars used move out of ``ignored``; an image
    without a caption is skipped (``data.missing_caption=skip``) or gets an empty one, counted either way."""
    found: dict[str, str] = {}
    if captions_file is not None:
        found = _read_captions_file(Path(captions_file), set(images), spec, ignored)
    else:
        sidecars = {i.ref for i in ignored if i.reason == "not_an_image_extension" and i.ref.lower().endswith(".txt")}
        if not sidecars:
            return None
        used: set[str] = set()
        notes_of: dict[str, list[str]] = {}
        for rel in images:
            side = rel.rsplit(".", 1)[0] + ".txt"
            if side in sidecars:
                used.add(side)
                try:  # a longer sidecar is cut like a long .txt member (decode_caption sees the extra byte)
                    data = read_regular_file(root / side, 4 * spec.max_caption_bytes + 4, prefix=True)
                except BadInput as e:
                    skipped.append(Skip(e.reason, side, e.detail))
                    continue
                found[rel], notes = decode_caption(data, spec.max_caption_bytes)
                notes_of[side] = notes
        if not used:
            return None
        ignored[:] = [i for i in ignored if i.ref not in used]
        ignored.extend(Ignore(n, side) for side, notes in notes_of.items() for n in notes)
    out: dict[str, str | None] = {rel: found.get(rel) for rel in images}
    for rel, text in out.items():
        if text is None and spec.missing_caption == "skip":
            skipped.append(Skip(MISSING_CAPTION, rel, "no caption for this image"))
        elif text is None:
            ignored.append(Ignore(EMPTY_CAPTION, rel))
    return out


def _read_captions_file(path: Path, images: set[str], spec: ImageSpec, ignored: list[Ignore]) -> dict[str, str]:
    """``path,caption`` rows of a CSV (header with ``path`` and ``caption``; ``.tsv``: tab-separated) or a JSONL
    file, read row by row as UTF-8 (a byte-order mark is dropped; invalid bytes reach :func:`decode_caption`
    undecoded and are counted there).
    A row without a path and a string caption, or longer than :data:`MAX_CAPTION_ROW_CHARS`, is a counted
    :data:`CAPTION_BAD_LINE`; a file over :data:`MAX_CAPTIONS_FILE_BYTES` is refused."""
    import csv

    if not path.is_file():
        raise SourceError(f"data.captions_file={path}: no such file")
    found: dict[str, str] = {}

    def add(rel: Any, text: Any, where: str) -> None:
        if not isinstance(rel, str) or not rel:
            ignored.append(Ignore(CAPTION_BAD_LINE, where))
            return
        rel = os.path.normpath(rel.replace("\\", "/")).lstrip("/")
        if rel not in images:
            ignored.append(Ignore("caption_without_image", rel[:200]))
        elif not isinstance(text, str):
            ignored.append(Ignore(CAPTION_BAD_LINE, rel))
        else:
            found[rel], notes = decode_caption(text, spec.max_caption_bytes)
            ignored.extend(Ignore(n, rel) for n in notes)

    try:
        with open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                                       newline="") as f:
            size = os.fstat(raw.fileno()).st_size
            if size > MAX_CAPTIONS_FILE_BYTES:
                raise SourceError(f"data.captions_file={path}: {size} bytes, more than the {MAX_CAPTIONS_FILE_BYTES} "
                                  "a captions file may have; keep only the rows of the images under data.path")
            if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
                _read_captions_jsonl(f, path.name, add, ignored)
            else:
                reader = csv.reader(f, dialect=csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel)
                header = next(reader, None)
                if not header or not {"path", "caption"} <= set(header):
                    raise SourceError(f"data.captions_file={path}: the header must name the columns 'path' and "
                                      f"'caption' (found {header})")
                col_path, col_caption = header.index("path"), header.index("caption")
                while True:
                    try:
                        row = next(reader)
                    except StopIteration:
                        break
                    except csv.Error:  # e.g. a field over csv's limit: the reader goes on after that row
                        ignored.append(Ignore(CAPTION_BAD_LINE, f"{path.name}:{reader.line_num}"))
                        continue
                    if row:  # blank lines are no rows
                        add(row[col_path] if col_path < len(row) else None,
                            row[col_caption] if col_caption < len(row) else None, f"{path.name}:{reader.line_num}")
    except (OSError, csv.Error) as e:
        raise SourceError(f"data.captions_file={path}: cannot read it: {e}") from e
    return found


def _read_captions_jsonl(f: io.TextIOWrapper, name: str, add: Callable[[Any, Any, str], None],
                         ignored: list[Ignore]) -> None:
    """The ``{"path", "caption"}`` lines of a JSONL captions file, each read with a bounded length."""
    import json

    n = 0
    while line := f.readline(MAX_CAPTION_ROW_CHARS + 1):
        n += 1
        if len(line) > MAX_CAPTION_ROW_CHARS and not line.endswith(("\n", "\r")):
            while line and not line.endswith(("\n", "\r")):  # skip the rest of the overlong line
                line = f.readline(MAX_CAPTION_ROW_CHARS)
            ignored.append(Ignore(CAPTION_BAD_LINE, f"{name}:{n}"))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            ignored.append(Ignore(CAPTION_BAD_LINE, f"{name}:{n}"))
            continue
        if not isinstance(obj, dict):
            ignored.append(Ignore(CAPTION_BAD_LINE, f"{name}:{n}"))
            continue
        add(obj.get("path"), obj.get("caption"), f"{name}:{n}")


def _walk(root: Path, rel_dir: str, out: list[str], skipped: list[Skip], ignored: list[Ignore]) -> None:
    try:
        entries = sorted(os.scandir(root / rel_dir), key=lambda e: e.name)
    except OSError as e:
        skipped.append(Skip(UNREADABLE, rel_dir + "/", str(e)))
        return
    for e in entries:
        rel = f"{rel_dir}/{e.name}"
        if e.name.startswith("."):
            ignored.append(Ignore("hidden", rel))
        elif e.is_dir(follow_symlinks=False):
            _walk(root, rel, out, skipped, ignored)
        elif e.is_symlink() and e.is_dir():
            ignored.append(Ignore("symlinked_directory", rel))
        else:
            _consider_file(e, rel, out, skipped, ignored)


def _consider_file(e: os.DirEntry, rel: str, out: list[str], skipped: list[Skip], ignored: list[Ignore]) -> None:
    if not e.name.lower().endswith(IMAGE_EXTENSIONS):
        ignored.append(Ignore("not_an_image_extension", rel))
    elif e.is_file():  # follows a file symlink
        out.append(rel)
    elif e.is_symlink():
        skipped.append(Skip(UNREADABLE, rel, "dangling symlink"))
    else:
        skipped.append(Skip(NOT_REGULAR_FILE, rel, "not a regular file (FIFO, socket or device)"))


_SPLIT_NAME = re.compile(r"^(?:(train|training)|(val|valid|validation|test|t10k))[-_.]", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class ShardsSource:
    """Existing WebDataset tars, read by :class:`TarReader` and re-encoded (never copied as they are).

    When every shard name starts with ``train``/``val`` (``validation``, ``test``, ``t10k``), that split is
    kept; otherwise each sample goes to validation with probability ``data.val_fraction`` (a seeded hash of
    shard name and key). A sample is one image member (png/jpg/jpeg/webp) plus an optional ``.cls``
    (ASCII integer); other members are ignored and never decoded. A shard's first sample decides whether
    it is labelled: later samples that disagree are skipped (``missing_label`` / ``unexpected_label``), so
    a sample whose ``.cls`` arrives non-adjacent can never pass as unlabelled. Captions (``.txt``, or the
    ``caption`` of a ``.json``) are decided per sample: once any input has one, every stored sample has one
    (``data.missing_caption`` for the others, applied by the stage after all inputs are read)."""

    urls: tuple[str, ...]
    spec_text: str
    kind: str = "shards"

    def plan(self, ctx: PlanContext) -> Plan:
        names = [u.rstrip("/").rsplit("/", 1)[-1] for u in self.urls]
        matches = [_SPLIT_NAME.match(n) for n in names]
        named = all(m is not None for m in matches)
        chunks: list[Chunk] = []
        for i, (url, m) in enumerate(zip(self.urls, matches)):
            split = ("train" if m.group(1) else "val") if named and m is not None else None
            chunks.append(TarChunk(i, url, split, ctx.val_fraction, ctx.seed))
        desc = {"kind": "shards", "path": self.spec_text, "num_shards": len(self.urls), "urls": list(self.urls),
                "split": "from shard names" if named else
                f"seeded hash of shard name and key (data.val_fraction={ctx.val_fraction})",
                "fit": "crop" if ctx.fit == "auto" else ctx.fit}
        return Plan(chunks=chunks, classes=None, description=desc, num_inputs=None,
                    sequential=ctx.max_images is not None)


def expand_shard_spec(spec: str) -> list[str]:
    """Whitespace-separated local paths, directories (their ``*.tar``/``*.tar.gz``/``*.tgz``), globs,
    ``{000..009}`` ranges or fsspec URLs -> the ordered list of shard URLs; errors name the missing one."""
    from braceexpand import braceexpand

    out: list[str] = []
    for token in spec.split():
        for item in braceexpand(token):
            out += _expand_one(item)
    if not out:
        raise SourceError(f"data.path={spec!r}: no shards found")
    dupes = [u for u, n in Counter(out).items() if n > 1]
    if dupes:
        raise SourceError(f"data.path={spec!r}: shard {dupes[0]} is listed more than once")
    return out


_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _expand_one(item: str) -> list[str]:
    if item.lower().startswith(("http://", "https://")):
        # one URL, read as given: '?' starts a query (a signed URL's signature), not a glob, and a URL signed
        # for GET refuses the HEAD an existence check would send; a missing shard fails when it is read
        return [item]
    if "://" in item:
        import fsspec

        fs, path = fsspec.core.url_to_fs(item)
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(_SHARD_SUFFIXES))
        elif fs.exists(path):
            return [item]
        else:
            raise SourceError(f"data.path: shard {item} does not exist")
        if not found:
            raise SourceError(f"data.path: no shards match {item}")
        return [fs.unstrip_protocol(p) for p in found]
    p = Path(item).expanduser()
    if any(ch in item for ch in "*?["):
        import glob

        found = sorted(glob.glob(str(p)))
        if not found:
            raise SourceError(f"data.path: no shards match {item}")
        return [str(Path(f).resolve()) for f in found]
    if p.is_dir():
        found = sorted(str(x.resolve()) for x in p.iterdir() if x.name.endswith(_SHARD_SUFFIXES) and x.is_file())
        if not found:
            raise SourceError(f"data.path: directory {p.resolve()} holds no .tar/.tar.gz/.tgz shards")
        return found
    if not p.exists():
        raise SourceError(f"data.path: shard {p.resolve()} does not exist")
    return [str(p.resolve())]


SourceConfig = IdxSource | DigitsSource | ImageFolderSource | ShardsSource | ShapesSource


def source_from_config(data: Any) -> SourceConfig:
    """The typed source config for ``data.source``; checks what can be checked without reading images."""
    if data.source in IdxSource.kinds:
        if data.path is not None and not Path(data.path).expanduser().is_dir():
            raise SourceError(f"data.path={data.path}: directory {Path(data.path).expanduser().resolve()} "
                              "does not exist")
        return IdxSource(kind=data.source, path=data.path)
    if data.source == "digits":
        return DigitsSource()
    if data.source == "shapes":
        return ShapesSource(num_train=data.shapes_train, num_val=data.shapes_val)
    if data.source == "image-folder":
        if data.path is None:
            raise SourceError("data.source=image-folder needs data.path=DIR (one sub-folder per class, or a "
                              "flat folder of .jpg/.jpeg/.png/.webp images)")
        root = Path(data.path).expanduser()
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise SourceError(f"data.path={data.path}: directory {root.resolve()} {what}")
        return ImageFolderSource(path=data.path, captions_file=data.captions_file)
    if data.source == "shards":
        if data.path is None:
            raise SourceError("data.source=shards needs data.path (tar paths, a directory, a glob, "
                              "a {000..009} range or fsspec URLs)")
        return ShardsSource(urls=tuple(expand_shard_spec(data.path)), spec_text=data.path)
    raise SourceError(f"unknown data.source={data.source!r}")
