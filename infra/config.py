"""Typed pipeline configuration: sections, presets, YAML files and ``key=value`` overrides.

A configuration is resolved in three layers, each validated against the typed sections below:

1. the preset (``fmnist`` by default; see :data:`PRESETS`),
2. an optional YAML file (values only, nested like the sections),
3. command-line overrides ``section.key=value`` (values parsed as YAML scalars/lists).

Unknown keys, wrong types and values outside an allowed set are errors that name the key and
the allowed values. Nothing here touches the file system except :func:`load_yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from infra.errors import PermanentError
from models.configs import LossConfig, MQVAEConfig

# The pipeline's stages in the order they run (the graph itself, what reads what, is flows/stages.py).
STAGES: tuple[str, ...] = ("ingest", "train_tokenizer", "tokenize", "train_stackformer", "train_evaluator",
                           "evaluate")


class ConfigError(PermanentError, ValueError):
    """A configuration value is unknown, mistyped or out of range; the message names the key."""


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class RunSection:
    root: str = "./runs"  # local path or fsspec URL holding every stage's artifacts
    experiment: str = "mqgen"  # MLflow experiment name
    retries: int = 1  # Prefect retries per stage after a transient failure (bad data and bad configs never retry)
    retry_delay_s: float = 10.0  # seconds between a failed stage attempt and its retry


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: Literal["fashion-mnist", "mnist", "digits", "image-folder", "shards", "shapes"] = "fashion-mnist"
    path: str | None = None  # source directory / shard list; None = the source's default location
    image_size: int = 32  # square side after resize/pad, pixels
    channels: Literal[1, 3] = 1
    val_fraction: float = 0.1  # share of images held out when the source has no official split
    max_images: int | None = None  # cap per split (tests, quick runs); None = all
    shard_max_count: int = 10000  # samples per output shard
    shard_max_bytes: int = 256 * 1024 * 1024  # bytes per output shard
    max_bad_fraction: float = 0.01  # more skipped inputs than this fails the stage
    num_workers: int = 2  # processes building shards: the stage's own + (num_workers - 1) pool workers
    # How an image reaches image_size x image_size. crop: scale the shorter side to image_size, centre-crop;
    # pad: centre on a black canvas without scaling when it fits (scale the longer side down when it does
    # not); auto: pad for MNIST-style sources when image_size >= their side and the margin is even, else crop.
    fit: Literal["auto", "crop", "pad"] = "auto"
    alpha_background: Literal["white", "black"] = "white"  # transparent pixels are composited onto this
    max_input_bytes: int = 64 * 1024 * 1024  # larger input files / tar members are skipped unread
    # memory one image may take to decode and convert (estimated from its header before any pixel is decoded);
    # a larger one is skipped as too_large: a small file can hold a huge image (a decompression bomb)
    max_decode_mb: int = 256
    min_shards: int = 16  # split a split into at least this many shards (>= 256 samples each) when it can
    png_compress_level: int = 1  # zlib level of the stored PNGs (0-9: bigger files <-> slower ingest)
    # Captions (text-conditional data). Read from .txt (or .json with a "caption" field) members beside the image
    # in input shards, sidecar <name>.txt files beside folder images, or captions_file (CSV or JSONL of
    # path,caption; paths relative to data.path). A dataset is captioned when its input has captions.
    captions_file: str | None = None
    missing_caption: Literal["empty", "skip"] = "empty"  # an image without one in a captioned dataset
    max_caption_bytes: int = 1024  # longer captions are cut (at a character boundary) and counted
    # data.source=shapes (generated, captioned): images per split (data.max_images still caps them)
    shapes_train: int = 20000
    shapes_val: int = 2000

    def __post_init__(self) -> None:
        if self.max_caption_bytes < 16:
            raise ConfigError(f"data.max_caption_bytes={self.max_caption_bytes} must be >= 16")
        if self.shapes_train < 1 or self.shapes_val < 1:
            raise ConfigError(f"data.shapes_train={self.shapes_train} and data.shapes_val={self.shapes_val} "
                              "must be >= 1")
        if self.captions_file is not None and self.source != "image-folder":
            raise ConfigError(f"data.captions_file is read only by data.source=image-folder (got "
                              f"data.source={self.source}); shards carry captions as .txt/.json members")
        if self.path is not None and self.source == "shapes":
            raise ConfigError("data.path is not used by data.source=shapes (its images are generated); remove it")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"data.max_images={self.max_images} must be >= 1 (or null for all images)")
        if self.shard_max_bytes < 64 * 1024:
            raise ConfigError(f"data.shard_max_bytes={self.shard_max_bytes} must be >= 65536")
        if self.max_decode_mb < 1:
            raise ConfigError(f"data.max_decode_mb={self.max_decode_mb} must be >= 1")
        if self.max_input_bytes < 1:
            raise ConfigError(f"data.max_input_bytes={self.max_input_bytes} must be >= 1")
        if self.min_shards < 1:
            raise ConfigError(f"data.min_shards={self.min_shards} must be >= 1")
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError(f"data.png_compress_level={self.png_compress_level} must be in [0, 9]")
        if self.path is not None and self.source == "digits":
            raise ConfigError("data.path is not used by data.source=digits (it ships inside scikit-learn); "
                              "remove it")
        if self.path is not None and self.path.strip() == "":
            raise ConfigError("data.path is empty; remove it or give a directory / shard list")
        if self.path is not None and self.source == "shards":
            for url in self.path.split():
                scheme = url.split("://", 1)[0].lower() if "://" in url else ""
                if url.lower().startswith("pipe:") or scheme == "pipe":
                    raise ConfigError(f"data.path: shard URL {url!r} would run a shell command; "
                                      "pass a local path or an fsspec URL")
                if scheme:
                    from fsspec.registry import known_implementations, registry

                    if scheme not in known_implementations and scheme not in registry:
                        raise ConfigError(f"data.path: unknown URL scheme {scheme!r} in {url!r}; use a local "
                                          "path or a scheme fsspec knows (file, s3, gs, http, ...)")


# The model fields the data section fixes (the tokenizer takes the image geometry of the data it trains on).
GEOMETRY: dict[str, str] = {"in_channels": "data.channels", "resolution": "data.image_size"}


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """The tokenizer section (``train_tokenizer``): the MQ-VAE as ``models.mqvae`` defines it (``model``), its
    losses as ``models.losses`` defines them (``loss``) and the training schedule.

    The model and loss defaults are the models' own (the released architecture); the presets set only what
    differs (see :data:`PRESETS`). ``in_channels`` and ``resolution`` of the model follow ``data.channels`` and
    ``data.image_size``. The flat keys of the section before it nested (``tokenizer.keep_ratio``) stay
    aliases of the nested ones (``tokenizer.model.keep_ratio``); :meth:`flat` is that flat view, which the
    stage keys and the MLflow parameters use.
    """

    model: MQVAEConfig = field(default_factory=MQVAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # optimisation. batch_size is the global batch (images per optimiser step over all Ray Train workers: each
    # worker takes batch_size / ray.num_workers); lr is the rate for that global batch, warmup_steps and max_steps
    # count optimiser steps. Scale lr with the global batch when changing either (the official recipe: 4.5e-6
    # per image, 1.08e-3 for 30 images on each of 8 GPUs).
    batch_size: int = 32
    max_steps: int = 400
    lr: float = 5e-4
    warmup_steps: int = 20
    grad_accum: int = 1
    eval_every: int = 200
    checkpoint_every: int = 100
    keep_checkpoints: int = 2

    def flat(self) -> dict[str, Any]:
        """The section as one flat mapping in the alias spelling (``keep_ratio``, ``disc_start``, ``lr``):
        the identity of the section in stage keys and MLflow parameters, unchanged since the section nested.
        Loss fields the flat section never had appear only when they differ from the value they always had."""
        out: dict[str, Any] = {}
        for f in fields(MQVAEConfig):
            if f.name not in GEOMETRY:
                out[f.name] = to_dict(getattr(self.model, f.name))
        for f in fields(LossConfig):
            value = getattr(self.loss, f.name)
            if _FLAT_HIDDEN.get(f.name, object()) != value:
                out[f.name] = value
        for f in fields(self):
            if f.name not in ("model", "loss"):
                out[f.name] = to_dict(getattr(self, f.name))
        return out


# Fields added after users had outputs, with their default: hashes and stage keys include one only when it differs
# from that default, so adding a field never changes the key of an existing output.
ADDED_FIELDS: dict[str, Any] = {"data.max_decode_mb": 256, "data.captions_file": None, "data.missing_caption": "empty",
                                "data.max_caption_bytes": 1024, "data.shapes_train": 20000, "data.shapes_val": 2000,
                                "evaluate.fid_bootstrap": 100,
                                "tokenizer.architecture": "mqvae", "stackformer.cond_dropout": 0.0,
                                "evaluate.sampling.guidance_scale": 1.0}  # + "registry" below


def identity(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a section in its flat spelling) without the fields added later that are at their default
    (nested ones too: ``evaluate.sampling.guidance_scale``): what a stage key hashes, so that adding a field never
    changes the key of an existing output."""
    return _without_added({section: values}).get(section, {})


def _without_added(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``d`` without the :data:`ADDED_FIELDS` that hold their default value."""
    out = dict(d)
    for dotted, default in ADDED_FIELDS.items():
        *parents, name = dotted.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                break
            node[part] = node = dict(child)  # copy on the way down: the caller's dicts stay untouched
        else:
            if name in node and node[name] == default:
                del node[name]
    return out


# Flat spelling -> nested path inside the tokenizer section (``keep_ratio`` -> ``model.keep_ratio``).
TOKENIZER_ALIASES: dict[str, str] = {
    **{f.name: f"model.{f.name}" for f in fields(MQVAEConfig) if f.name not in GEOMETRY},
    **{f.name: f"loss.{f.name}" for f in fields(LossConfig)},
}
# Loss fields the flat section did not have, and the value they had.
_FLAT_HIDDEN: dict[str, Any] = {"disc_factor": 1.0, "codebook_weight": 1.0}


@dataclass(frozen=True, kw_only=True)
class StackformerSection:
    """Stackformer (or the full-grid baseline) architecture and training schedule (``train_stackformer``).

    ``model=fullgrid`` trains the baseline instead: one causal transformer over all ``G*G`` codes of a
    ``tokenizer.keep_ratio=1.0`` tokenisation, ``n_layer_code + n_layer_pos`` blocks deep at the same
    ``n_embd`` / ``n_head``, so both models have the same total depth and width and train through the same
    stage, data reader, optimiser and budget. Its ``pos_loss_weight`` is unused (it predicts no positions).

    Optimiser (spec section 6): AdamW, betas (0.9, 0.95), ``weight_decay`` on Linear weights only, linear
    warmup then cosine decay to 0 at ``max_steps``, gradient-norm clipping at ``grad_clip``.
    ``batch_size`` is the global batch, split evenly over ``ray.num_workers``.
    """

    model: Literal["stackformer", "fullgrid"] = "stackformer"
    # conditional on the captions when the data has them (text.*; labels are then not used), else on the class
    # labels when it has those, else unconditional
    conditional: bool = True
    n_layer_code: int = 3  # Code-Transformer depth (fullgrid: depth = n_layer_code + n_layer_pos)
    n_layer_pos: int = 3  # Position-Transformer depth
    n_embd: int = 128
    n_head: int = 4
    dropout: float = 0.1  # embedding, attention and residual dropout
    pos_loss_weight: float = 1.0  # loss = CE(code) + pos_loss_weight * CE(position)
    # share of training labels replaced by a null class, so that sampling can use classifier-free guidance
    # (evaluate.sampling.guidance_scale); needs a class-conditional model
    cond_dropout: float = 0.0
    batch_size: int = 64  # global batch (sequences per optimiser step over all workers)
    max_steps: int = 600
    lr: float = 5e-4  # peak learning rate (not scaled with the batch)
    weight_decay: float = 0.01  # on Linear weights only
    warmup_steps: int = 30
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    eval_every: int = 300  # steps between validation passes (and sampled image grids)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    num_loader_workers: int = 0  # DataLoader processes per training worker (0 = read in the worker itself)
    num_eval_records: int | None = 2048  # val records scored per evaluation; None = the whole split
    num_eval_samples: int = 16  # sequences sampled, decoded and logged per evaluation; 0 = none

    def __post_init__(self) -> None:
        for name in ("n_layer_code", "n_layer_pos", "n_embd", "n_head", "eval_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"stackformer.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "num_loader_workers", "num_eval_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stackformer.{name}={getattr(self, name)} must be >= 0")
        for name in ("weight_decay", "grad_clip", "pos_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stackformer.{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"stackformer.lr={self.lr} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"stackformer.dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"stackformer.cond_dropout={self.cond_dropout} must be in [0, 1)")
        if self.cond_dropout > 0 and not self.conditional:
            raise ConfigError("stackformer.cond_dropout trains classifier-free guidance of a class- or "
                              "text-conditional model; it needs stackformer.conditional=true")
        if self.num_eval_records is not None and self.num_eval_records < 1:
            raise ConfigError(f"stackformer.num_eval_records={self.num_eval_records} must be >= 1 "
                              "(or null for the whole val split)")


@dataclass(frozen=True, kw_only=True)
class SamplingSection:
    """How sequences are drawn (``evaluate.sampling``): per head, ``logits / temperature``, then top-k, then
    top-p. ``temperature`` / ``top_k`` / ``top_p`` drive the code head, ``pos_*`` the position head."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None = all tokens
    top_p: float | None = None  # None = no nucleus cut
    pos_temperature: float = 1.0
    pos_top_k: int | None = None
    pos_top_p: float | None = None
    raster_order: bool = False  # enforce increasing positions (a variant; the reference learns it)
    # classifier-free guidance for both heads: l_null + s (l_class - l_null); 1 = plain conditional sampling, 0 =
    # unconditional; other values need a model trained with stackformer.cond_dropout > 0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.guidance_scale >= 0 and math.isfinite(self.guidance_scale)):
            raise ConfigError(f"evaluate.sampling.guidance_scale={self.guidance_scale} must be a finite number >= 0 "
                              "(1 = no guidance)")
        for prefix in ("", "pos_"):
            temperature = getattr(self, f"{prefix}temperature")
            top_k, top_p = getattr(self, f"{prefix}top_k"), getattr(self, f"{prefix}top_p")
            if temperature < 0:
                raise ConfigError(f"evaluate.sampling.{prefix}temperature={temperature} must be >= 0 "
                                  "(0 = greedy)")
            if top_k is not None and top_k < 1:
                raise ConfigError(f"evaluate.sampling.{prefix}top_k={top_k} must be >= 1 "
                                  "(or null for all tokens)")
            if top_p is not None and not 0.0 < top_p <= 1.0:
                raise ConfigError(f"evaluate.sampling.{prefix}top_p={top_p} must be in (0, 1] (or null)")


@dataclass(frozen=True, kw_only=True)
class EvaluatorClassifierSection:
    """The evaluator of stage ``train_evaluator``: a small CNN trained on the ingested train labels.

    Its penultimate features back FID/KID and its logits IS when ``evaluate.extractor=classifier``.
    """

    width: int = 32  # channels of the first conv block; the penultimate features have 4 * width dims
    batch_size: int = 128
    max_steps: int = 600  # optimiser steps (AdamW, one-cycle LR); ~1.3 Fashion-MNIST epochs by default
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 5e-4
    num_val_images: int = 5000  # val images for the held-out accuracy (the first ones, in shard order)

    def __post_init__(self) -> None:
        for name in ("width", "batch_size", "max_steps", "num_val_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.classifier.{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"evaluate.classifier.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"evaluate.classifier.weight_decay={self.weight_decay} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Stage ``evaluate``: samples, FID/IS/KID, reconstruction metrics, speed, pictures (``evaluation.json``).

    FID/KID/IS use ``extractor``: ``classifier`` (default; the ``train_evaluator`` classifier, reported under
    its own name, e.g. ``classifier-fashion-mnist``, never as Inception) or ``inception-v3-compat``
    (torch-fidelity's FID-Inception; needs ``inception_weights`` or the file in torch.hub's checkpoint
    directory, or ``inception_download=true`` where the network allows; slow on CPU).
    """

    num_samples: int = 1000  # generated images (balanced over classes when class-conditional)
    batch_size: int = 250  # images per sampling / decoding / reconstruction batch
    num_reference_images: int | None = None  # val images FID/KID compare with; None = the whole val split
    num_recon_images: int = 2000  # val images reconstructed by the tokenizer (rFID, L1, PSNR, SSIM)
    # FID interval: the samples' features resampled with replacement this many times (the reference set fixed);
    # 0 = no interval (the promotion gate then compares point values only)
    fid_bootstrap: int = 100
    extractor: Literal["classifier", "inception-v3-compat"] = "classifier"
    inception_weights: str | None = None  # torch-fidelity FeatureExtractorInceptionV3 state dict (.pth)
    inception_download: bool = False  # let torch.hub fetch the Inception weights (needs network access)
    classifier: EvaluatorClassifierSection = field(default_factory=EvaluatorClassifierSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)

    def __post_init__(self) -> None:
        # FID needs a covariance (>= 2 images per set); IS splits need >= 2 too.
        for name in ("num_samples", "num_recon_images"):
            if getattr(self, name) < 2:
                raise ConfigError(f"evaluate.{name}={getattr(self, name)} must be >= 2 (FID needs a covariance)")
        if self.num_reference_images is not None and self.num_reference_images < 2:
            raise ConfigError(f"evaluate.num_reference_images={self.num_reference_images} must be >= 2 "
                              "(or null for the whole val split)")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate.batch_size={self.batch_size} must be >= 1")
        if self.fid_bootstrap != 0 and not 10 <= self.fid_bootstrap <= 10_000:
            raise ConfigError(f"evaluate.fid_bootstrap={self.fid_bootstrap} must be 0 (no interval) or 10..10000 "
                              "resamples")
        if self.extractor != "inception-v3-compat":
            for name in ("inception_weights", "inception_download"):
                if getattr(self, name):
                    raise ConfigError(f"evaluate.{name} is only used with evaluate.extractor=inception-v3-compat "
                                      f"(extractor is {self.extractor!r}); remove it or switch the extractor")
        if self.inception_weights is not None and self.inception_weights.strip() == "":
            raise ConfigError("evaluate.inception_weights is empty; remove it or give the weights file's path")


@dataclass(frozen=True, kw_only=True)
class RaySection:
    num_workers: int = 1  # Ray Train workers per training stage
    use_gpu: bool = False
    # CPUs reserved (and used as torch threads) by each Ray Train worker and each tokenize task. None: on a local
    # Ray, the machine's CPUs shared by the training workers and 1 per tokenize task; on a cluster, 1.
    cpus_per_worker: int | None = None
    max_failures: int = 1


@dataclass(frozen=True, kw_only=True)
class TextSection:
    """Captions (used only when the ingested data is captioned, ``data.source=shapes`` or captions in the input).

    The ``tokenize`` stage trains a BPE caption tokenizer of at most ``vocab_size`` ids on the training captions and
    stores ``max_len`` ids per image; ``train_stackformer`` conditions on them through a text encoder, an
    ``n_layer``-layer bidirectional transformer of the Stackformer's width trained with it.
    """

    vocab_size: int = 1024
    max_len: int = 32
    n_layer: int = 2
    # A frozen pretrained encoder instead: a local folder in the Hugging Face layout (config.json, *.safetensors,
    # tokenizer.json; e.g. a CLIP text model). Its tokenizer makes the ids (vocab_size unused), its last hidden
    # states are the captions' states (n_layer unused); needs the transformers package (mqgen[hf]). Identified
    # in the stage keys by content (infra.text.pretrained_digest), not by path.
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained.strip()):
            raise ConfigError(f"text.pretrained={self.pretrained!r} must be a folder path (or null for the "
                              "trained encoder)")
        if not 260 <= self.vocab_size <= 65535:
            raise ConfigError(f"text.vocab_size={self.vocab_size} must be in [260, 65535] (256 byte symbols + "
                              "specials + merges; ids are stored as uint16)")
        if not 1 <= self.max_len <= 512:
            raise ConfigError(f"text.max_len={self.max_len} must be in [1, 512]")
        if self.n_layer < 1:
            raise ConfigError(f"text.n_layer={self.n_layer} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RegistrySection:
    """The MLflow model registry and the promotion gate (read after ``evaluate``; never part of a stage key).

    Each training stage registers its model as ``mqgen-tokenizer-<name>`` / ``mqgen-stackformer-<name>``. After an
    evaluation the new Stackformer version is compared with the version holding ``alias`` (same extractor, same
    reference statistics, same number of samples) and takes the alias only when its FID is lower by more than
    ``margin`` plus the noise: with ``rule=interval``, ``z`` standard errors of the difference (each FID's standard
    error from its bootstrap over samples, ``evaluate.fid_bootstrap``); with ``rule=point``, the point values. The
    first version evaluated takes the alias. A holder with no figure on the new evaluation's protocol (new data, a
    retrained evaluator) is first evaluated on it when ``reevaluate_champion`` (the evaluate stage on its registered
    weights); otherwise the gate keeps it ("not comparable").
    """

    enabled: bool = True
    name: str = ""  # registered model names' suffix; "" = the preset's name
    alias: str = "champion"
    rule: Literal["interval", "point"] = "interval"
    margin: float = 0.0  # FID units the new version must win by, beyond the noise
    z: float = 1.96
    reevaluate_champion: bool = True

    def __post_init__(self) -> None:
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name):
            raise ConfigError(f"registry.name={self.name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", self.alias) or re.fullmatch(r"v\d+", self.alias):
            raise ConfigError(f"registry.alias={self.alias!r}: lower-case letters, digits, '_' or '-', starting "
                              "with a letter (and not v<number>, which MLflow keeps for versions)")
        if self.margin < 0 or self.z < 0:
            raise ConfigError("registry.margin and registry.z must be >= 0")

    def model_name(self, kind: str, preset: str) -> str:
        """The registered model name of ``kind`` (``tokenizer`` or ``stackformer``)."""
        return f"mqgen-{kind}-{self.name or preset}"


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    preset: str = "fmnist"
    seed: int = 0
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    stackformer: StackformerSection = field(default_factory=StackformerSection)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RaySection = field(default_factory=RaySection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    text: TextSection = field(default_factory=TextSection)

    def __post_init__(self) -> None:
        _check_semantics(self)
        # Paths are made absolute once, here, against the directory of the process that resolves the config:
        # stage keys, stored references and every later process (Ray workers, Prefect workers, subprocesses,
        # which run elsewhere) then see the same paths whatever directory they start in.
        object.__setattr__(self, "run", dataclasses.replace(self.run, root=absolute_path(self.run.root)))
        if self.data.path is not None:
            paths = " ".join(absolute_path(p) for p in self.data.path.split()) if self.data.source == "shards" \
                else absolute_path(self.data.path)
            object.__setattr__(self, "data", dataclasses.replace(self.data, path=paths))
        if self.data.captions_file is not None:
            object.__setattr__(self, "data", dataclasses.replace(
                self.data, captions_file=absolute_path(self.data.captions_file)))
        if self.text.pretrained is not None:
            object.__setattr__(self, "text", dataclasses.replace(self.text, pretrained=absolute_path(self.text.pretrained)))
            _check_pretrained_text(self.text.pretrained, self.text.max_len)
        if self.evaluate.inception_weights is not None:
            object.__setattr__(self, "evaluate", dataclasses.replace(
                self.evaluate, inception_weights=absolute_path(self.evaluate.inception_weights)))

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain data (what ``config show`` prints and :func:`from_dict` reads back); the
        tokenizer model's geometry is left out: it is the data section's (:data:`GEOMETRY`)."""
        d = to_dict(self)
        for name in GEOMETRY:
            del d["tokenizer"]["model"][name]
        return d

    def flat_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the tokenizer section in its flat spelling (:meth:`TokenizerConfig.flat`): the
        identity of a config (hashes, stage keys, MLflow parameters), unchanged since the section nested."""
        return {**self.to_dict(), "tokenizer": self.tokenizer.flat()}

    def hash(self, *sections: str) -> str:
        """Short sha256 of the whole config or of the named sections (stable across runs and across versions
        of mqgen: a field added later counts only when it differs from its default, see :data:`ADDED_FIELDS`)."""
        d = _without_added(self.flat_dict())
        if sections:
            d = {s: d[s] for s in sections}
        return stable_hash(d)


ADDED_FIELDS["registry"] = dataclasses.asdict(RegistrySection())
ADDED_FIELDS["text.pretrained"] = None  # before "text": the whole section compares without it
ADDED_FIELDS["text"] = {k: v for k, v in dataclasses.asdict(TextSection()).items() if k != "pretrained"}


def _check_pretrained_text(folder: str, max_len: int) -> None:
    """Refuse, when the config is resolved (not minutes later in the tokenize stage), a ``text.pretrained`` folder
    that cannot be used: missing, incomplete, pickled weights only, no transformers package to load it, or
    captions (``text.max_len`` ids) longer than the positions its model has (the training step would fail)."""
    import importlib.util

    from infra.text import TextTokenizerError, pretrained_files, pretrained_max_positions

    try:
        files = pretrained_files(folder)
        positions = pretrained_max_positions(files["config.json"])
    except TextTokenizerError as e:
        raise ConfigError(str(e)) from None
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("text.pretrained needs the transformers package: pip install 'mqgen[hf]'")
    if positions is not None and max_len > positions:
        raise ConfigError(f"text.max_len={max_len} is longer than the {positions} positions of the text encoder in "
                          f"{folder}; set text.max_len={positions} or less")


def absolute_path(path: str) -> str:
    """``path`` made absolute (``~`` expanded, ``..`` folded, symlinks kept) against the current directory;
    URLs (``s3://...``, ``file://...``) unchanged."""
    if "://" in path:
        return path
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


# --------------------------------------------------------------------------------------------- presets


def _preset_fmnist() -> dict[str, Any]:
    # The data, stackformer and evaluate defaults are the embedded default (Fashion-MNIST, 32x32, 1 channel);
    # the tokenizer's model and loss defaults are the released architecture, scaled down here to train in
    # minutes on a 2-core CPU.
    return {"tokenizer": {
        "model": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "dec_num_res_blocks": 1,
                  "attn_resolutions": [], "z_channels": 32, "codebook_size": 256, "codebook_dim": 32,
                  "keep_ratio": 0.5, "demask_layers": 2, "norm_groups": 8},
        "loss": {"disc_start": 250, "disc_layers": 2, "disc_ndf": 16},
    }}


def _preset_tiny() -> dict[str, Any]:
    d = _preset_fmnist()
    _deep_merge(d, {
        "data": {"image_size": 16, "max_images": 256, "shard_max_count": 64, "num_workers": 1},
        "tokenizer": {
            "model": {"ch_mult": [1, 2], "z_channels": 16, "codebook_size": 32, "codebook_dim": 16},
            "loss": {"disc_start": 20, "disc_layers": 1, "disc_ndf": 8},
            "batch_size": 16, "max_steps": 30, "warmup_steps": 5, "eval_every": 10, "checkpoint_every": 10,
        },
        "stackformer": {
            "n_layer_code": 2, "n_layer_pos": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0, "batch_size": 16,
            "max_steps": 40, "warmup_steps": 5, "eval_every": 20, "checkpoint_every": 20,
        },
        "evaluate": {"num_samples": 64, "batch_size": 32, "classifier": {"max_steps": 40, "width": 8}},
    })
    return d


# Text-conditional generation on the generated, captioned shapes data (infra.shapes): 32 px RGB scenes of one or
# two coloured shapes; the Stackformer reads the caption through a text encoder and is trained for guidance.
def _text() -> dict[str, Any]:  # a fresh dict each time: resolving merges overrides into it
    return {"data": {"source": "shapes", "channels": 3}, "stackformer": {"cond_dropout": 0.1},
            "text": {"vocab_size": 512, "max_len": 16}}


def _preset_shapes_text() -> dict[str, Any]:
    d = _preset_fmnist()
    _deep_merge(d, _text())
    # Colour is the hard part for the tokenizer: the fmnist budget (400 steps, GAN from step 250) reconstructed the
    # shapes' colours wrong (16.7 dB val PSNR); 1000 steps without the adversarial term give 20.6 dB. Flat-coloured
    # shapes need no GAN (disc_start beyond max_steps: the discriminator never runs).
    _deep_merge(d, {"tokenizer": {"max_steps": 1000, "loss": {"disc_start": 100000}}})
    return d


def _preset_tiny_text() -> dict[str, Any]:
    d = _preset_tiny()
    _deep_merge(d, _text())
    _deep_merge(d, {"data": {"shapes_train": 512, "shapes_val": 128, "max_images": None},
                    "text": {"vocab_size": 300, "n_layer": 1}})
    return d


def _paper(ch_mult: list[int], attn: int, keep_ratio: float) -> dict[str, Any]:
    # The model and loss defaults are the released f16 architecture; f8 differs in depth, attention and mask.
    return {
        "data": {"source": "image-folder", "image_size": 256, "channels": 3},
        "tokenizer": {
            "model": {"ch_mult": ch_mult, "attn_resolutions": [attn], "keep_ratio": keep_ratio},
            # the official rate: 4.5e-6 per image x the global batch (30 per GPU x 8); its warm-up is 0.1 epoch,
            # about 533 steps of 240 ImageNet images. Another batch: scale both (lr with it, warm-up against it).
            "batch_size": 240, "lr": 1.08e-3, "warmup_steps": 533, "max_steps": 500_000, "eval_every": 5000,
            "checkpoint_every": 5000,
        },
        "stackformer": {
            "n_layer_code": 12, "n_layer_pos": 12, "n_embd": 1024, "n_head": 16, "dropout": 0.1,
            "batch_size": 64, "max_steps": 500_000, "warmup_steps": 0, "eval_every": 5000,
            "checkpoint_every": 5000,
        },
        "evaluate": {"num_samples": 50_000, "batch_size": 100, "extractor": "inception-v3-compat",
                     "sampling": {"top_k": 100, "top_p": 0.95, "pos_top_k": 10, "pos_top_p": 0.95}},
        "ray": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8},
    }


# Released configs: f8 keeps 25% of a 32x32 grid (256 tokens); f16 keeps 75% of 16x16 (192 tokens).
PRESETS: dict[str, typing.Callable[[], dict[str, Any]]] = {
    "fmnist": _preset_fmnist,
    "tiny": _preset_tiny,
    "shapes-text": _preset_shapes_text,
    "tiny-text": _preset_tiny_text,
    "paper-f8": lambda: _paper([1, 1, 2, 2], 32, 0.25),
    "paper-f16": lambda: _paper([1, 1, 2, 2, 4], 16, 0.75),
}


# --------------------------------------------------------------------------------------------- resolution


def resolve(preset: str = "fmnist", file: str | Path | None = None, overrides: list[str] | None = None
            ) -> PipelineConfig:
    """Preset, then YAML file, then ``key=value`` overrides; validated; raises :class:`ConfigError`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    merged: dict[str, Any] = {}
    _deep_merge(merged, PRESETS[preset]())
    if file is not None:
        doc = load_yaml(file)
        if "preset" in doc and doc["preset"] != preset:
            raise ConfigError(f"config file {file} sets preset={doc['preset']!r}; pass it with --preset instead")
        _deep_merge(merged, _nested(doc, str(file)))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(merged, canonical_key(key), value)
    merged["preset"] = preset
    return from_dict(PipelineConfig, merged)


@dataclass(frozen=True)
class GridVariant:
    """One point of an ablation grid: its axis values, the overrides that make it, its validated config."""

    axes: dict[str, Any]
    overrides: list[str]
    config: PipelineConfig

    @property
    def label(self) -> str:
        return ",".join(f"{k}={_grid_value_text(v)}" for k, v in self.axes.items())


def expand_grid(preset: str = "fmnist", file: str | Path | None = None, args: list[str] | None = None
                ) -> list[GridVariant]:
    """Variants of a grid given as ``key=[v1,v2,...]`` axes plus plain ``key=value`` overrides.

    ``tokenizer.keep_ratio=[1.0,0.5] tokenizer.scorer=[learned,random] stackformer.max_steps=300`` gives the
    four points of the 2x2 product, each with ``stackformer.max_steps=300``. For a field whose value is itself a
    list (``tokenizer.ch_mult``) an axis is a list of lists: ``tokenizer.ch_mult=[[1,2],[1,2,2]]``. Every
    variant is validated before anything runs; an error names the variant and the key.
    """
    axes: dict[str, list[Any]] = {}
    fixed: list[str] = []
    for item in args or []:
        key, value = parse_override(item)
        list_field = _is_list_field(key)
        is_axis = isinstance(value, list) and (not list_field or (value and all(isinstance(v, list) for v in value)))
        if not is_axis:
            fixed.append(item)
            continue
        if not value:
            raise ConfigError(f"grid axis {key} has no values")
        if key in axes:
            raise ConfigError(f"grid axis {key} is given twice")
        if len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            raise ConfigError(f"grid axis {key}={value!r} repeats a value")
        axes[key] = value
    if not axes:
        raise ConfigError("a grid needs at least one axis written as key=[v1,v2,...], e.g. tokenizer.keep_ratio=[1.0,0.5]")
    variants: list[GridVariant] = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo))
        overrides = fixed + [f"{k}={json.dumps(v)}" for k, v in point.items()]
        try:
            cfg = resolve(preset, file, overrides)
        except ConfigError as e:
            label = ",".join(f"{k}={_grid_value_text(v)}" for k, v in point.items())
            raise ConfigError(f"grid variant {label}: {e}") from None
        variants.append(GridVariant(axes=point, overrides=overrides, config=cfg))
    return variants


EXPERIMENT_KEYS = {"experiment", "preset", "set", "grids"}


def is_experiment_file(path: str | Path) -> bool:
    """Whether ``path`` is an experiment file (a union of grids, :func:`expand_experiment`) rather than a file of
    config values."""
    doc = load_yaml(path)
    return isinstance(doc, dict) and "grids" in doc


def expand_experiment(path: str | Path, args: list[str] | None = None, parts: list[str] | None = None,
                      preset: str | None = None) -> tuple[str, list[GridVariant]]:
    """The variants of an experiment file: a union of grids over one preset, each variant once.

    ::

        experiment: claims            # the name of the grid's MLflow run
        preset: fmnist
        set: {stackformer.max_steps: 600}        # fixed for every variant
        grids:
          - name: masked
            axes: {tokenizer.keep_ratio: [0.75, 0.5], tokenizer.scorer: [learned, random], seed: [0, 1]}
          - name: vqgan
            set: {tokenizer.architecture: vqgan, tokenizer.keep_ratio: 1.0}
            axes: {seed: [0, 1]}

    A variant's axes are its grid's ``set`` values and axis values (so that rows of different grids are told
    apart); ``args`` are ``KEY=VALUE`` overrides applied to every variant (e.g. ``run.root=...``). Returns the
    experiment's name and the variants; a variant reached by two grids counts once. ``parts`` (grid names) keeps
    only those grids: a long experiment run in parts, whose finished stages the whole run then reuses. ``preset``
    replaces the file's preset (the same grids at another scale)."""
    doc = load_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("grids"), list) or not doc["grids"]:
        raise ConfigError(f"{path}: an experiment file needs a non-empty list 'grids'")
    unknown = set(doc) - EXPERIMENT_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(EXPERIMENT_KEYS)}")
    preset = preset or str(doc.get("preset", "fmnist"))
    common = doc.get("set") or {}
    variants: list[GridVariant] = []
    seen: set[str] = set()
    names = [str(g.get("name", i)) if isinstance(g, dict) else str(i) for i, g in enumerate(doc["grids"])]
    unknown_parts = sorted(set(parts or []) - set(names))
    if unknown_parts:
        raise ConfigError(f"{path}: no grid named {', '.join(map(repr, unknown_parts))}; its grids: "
                          + ", ".join(map(repr, names)))
    for i, grid in enumerate(doc["grids"]):
        if parts and names[i] not in parts:
            continue
        if not isinstance(grid, dict) or set(grid) - {"name", "set", "axes"}:
            raise ConfigError(f"{path}: grids[{i}] must be a mapping with keys name, set, axes")
        fixed = {**common, **(grid.get("set") or {})}
        axes = grid.get("axes") or {}
        if not isinstance(fixed, dict) or not isinstance(axes, dict) or not all(isinstance(v, list) for v in
                                                                                axes.values()):
            raise ConfigError(f"{path}: grids[{i}] ({grid.get('name', '?')}): set is a mapping, axes a mapping of "
                              "lists")
        own = grid.get("set") or {}
        if axes:
            items = [f"{k}={json.dumps(v)}" for k, v in {**fixed, **axes}.items()] + list(args or [])
            try:
                points = expand_grid(preset, None, items)
            except ConfigError as e:
                raise ConfigError(f"{path}: grid {grid.get('name', i)}: {e}") from None
        else:
            items = [f"{k}={json.dumps(v)}" for k, v in fixed.items()] + list(args or [])
            points = [GridVariant(axes={}, overrides=items, config=resolve(preset, None, items))]
        for v in points:
            key = v.config.hash()
            if key not in seen:
                seen.add(key)
                variants.append(GridVariant(axes={**own, **v.axes}, overrides=v.overrides, config=v.config))
    return str(doc.get("experiment") or Path(path).stem), variants


def _grid_value_text(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, list) else str(v)


def _is_list_field(key: str) -> bool:
    """Whether the dotted config key names a list-valued field (unknown keys: False; resolve() reports them)."""
    cls: Any = PipelineConfig
    for part in canonical_key(key).split("."):
        if not is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
        if typing.get_origin(cls) in (typing.Union, types.UnionType):
            cls = next((a for a in typing.get_args(cls) if a is not type(None)), cls)
    return typing.get_origin(cls) in (tuple, list)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(doc).__name__}")
    return doc


def parse_override(item: str) -> tuple[str, Any]:
    """``'tokenizer.keep_ratio=0.75'`` -> ``('tokenizer.keep_ratio', 0.75)``; values are YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def canonical_key(key: str) -> str:
    """A dotted key in its nested spelling: ``tokenizer.keep_ratio`` -> ``tokenizer.model.keep_ratio``."""
    section, _, rest = key.partition(".")
    head, _, tail = rest.partition(".")
    if section == "tokenizer" and head in TOKENIZER_ALIASES:
        return f"tokenizer.{TOKENIZER_ALIASES[head]}" + (f".{tail}" if tail else "")
    return key


def _nested(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """``doc`` (a config document) with the flat tokenizer keys moved to their nested places."""
    tok = doc.get("tokenizer")
    if not isinstance(tok, dict) or not any(k in TOKENIZER_ALIASES for k in tok):
        return doc
    return {**doc, "tokenizer": _nest_tokenizer(tok, where)}


def _nest_tokenizer(tok: dict[str, Any], where: str) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tok.items() if k not in TOKENIZER_ALIASES}
    for k, v in tok.items():
        if k not in TOKENIZER_ALIASES:
            continue
        sub, name = TOKENIZER_ALIASES[k].split(".")
        target = out.setdefault(sub, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{where}: tokenizer.{sub} must be a mapping, got {target!r}")
        if name in target and target[name] != v:
            raise ConfigError(f"{where}: tokenizer.{k}={v!r} and tokenizer.{sub}.{name}={target[name]!r} name one "
                              "value twice; keep one")
        target[name] = v
    return out


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


# --------------------------------------------------------------------------------------------- typing


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys and types; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    if cls is TokenizerConfig:
        data = _nest_tokenizer(data, "config")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for k in data:
        if k not in known:
            spellings = [*known, *(TOKENIZER_ALIASES if cls is TokenizerConfig else ())]
            close = difflib.get_close_matches(str(k), spellings, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            also = " (and every key of model and loss by its own name)" if cls is TokenizerConfig else ""
            raise ConfigError(f"unknown key {prefix}{k}{hint}; allowed keys: {', '.join(known)}{also}")
    if cls is PipelineConfig:
        data = _with_geometry(data)
    # The tokenizer's model and loss report errors under the flat spelling users write (tokenizer.keep_ratio).
    flat = cls is TokenizerConfig and prefix == "tokenizer."
    kwargs = {k: _coerce(hints[k], v, "tokenizer" if flat and k in ("model", "loss") else f"{prefix}{k}")
              for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        # The models' own validation: name the dotted key of the field the message starts with.
        msg, name = str(e), str(e).split(" ", 1)[0].split("=", 1)[0]
        if cls is MQVAEConfig and name in GEOMETRY:  # the model's image geometry is the data section's
            raise ConfigError(GEOMETRY[name] + msg[len(name):]) from e
        if name in known:
            raise ConfigError(f"{prefix}{msg}") from e
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def _with_geometry(data: dict[str, Any]) -> dict[str, Any]:
    """The pipeline document with the data section built and its geometry written into the tokenizer's model
    (which validates against it); a model geometry given explicitly must agree with the data's."""
    section = _coerce(DataConfig, data.get("data"), "data")
    tok = _nest_tokenizer(data.get("tokenizer") or {}, "config")
    if not isinstance(tok, dict):
        return data  # from_dict reports the bad section
    model = dict(tok.get("model") or {})
    for name, source in GEOMETRY.items():
        value = getattr(section, source.split(".", 1)[1])
        if name in model and model[name] != value:
            raise ConfigError(f"tokenizer.model.{name}={model[name]!r} differs from {source}={value!r}: the tokenizer "
                              f"takes the image geometry of its data; set {source} instead")
        model[name] = value
    return {**data, "data": section, "tokenizer": {**tok, "model": model}}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value  # built already (and validated)
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: " + "; ".join(errors))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1,2]")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def stable_hash(obj: Any, length: int = 12) -> str:
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def replace(cfg: PipelineConfig, **sections: Any) -> PipelineConfig:
    """``replace(cfg, tokenizer={"keep_ratio": 0.75})``: a validated copy with some fields changed."""
    d = cfg.to_dict()
    _deep_merge(d, _nested(sections, "replace()"))
    return from_dict(PipelineConfig, d)


# --------------------------------------------------------------------------------------------- semantics


def _check_range(key: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{key}={value} must be in {bracket}{lo}, {hi}]")


def _check_semantics(cfg: PipelineConfig) -> None:
    """Checks across sections (each section validated itself when it was built: the tokenizer's model and loss
    by ``models.mqvae`` and ``models.losses``, once per resolution)."""
    d, t, s, e = cfg.data, cfg.tokenizer, cfg.stackformer, cfg.evaluate
    _check_range("data.val_fraction", d.val_fraction, 0.0, 0.5)
    _check_range("data.max_bad_fraction", d.max_bad_fraction, 0.0, 1.0)
    if t.model.codebook_size > 65535:
        raise ConfigError(f"tokenizer.codebook_size={t.model.codebook_size} must be <= 65535 (uint16 codes)")
    if s.n_embd % s.n_head:
        raise ConfigError(f"stackformer.n_embd={s.n_embd} must be divisible by stackformer.n_head={s.n_head}")
    if t.batch_size % cfg.ray.num_workers:
        raise ConfigError(f"tokenizer.batch_size={t.batch_size} is the global batch and must be divisible by "
                          f"ray.num_workers={cfg.ray.num_workers} (each worker takes batch_size / num_workers "
                          f"images); use {t.batch_size - t.batch_size % cfg.ray.num_workers} or "
                          f"{t.batch_size + cfg.ray.num_workers - t.batch_size % cfg.ray.num_workers}")
    if t.loss.perceptual_weight > 0:
        raise ConfigError(f"tokenizer.perceptual_weight={t.loss.perceptual_weight}: mqgen has no perceptual network "
                          "to load (no LPIPS/VGG weights ship, and none can be downloaded here); set it to 0 "
                          "(L1 + quantizer + GAN losses, the default)")
    if s.model == "fullgrid" and t.model.keep_ratio != 1.0:
        raise ConfigError("stackformer.model=fullgrid models the whole grid: set tokenizer.keep_ratio=1.0")
    for name, value in (("data.image_size", d.image_size), ("data.shard_max_count", d.shard_max_count),
                        ("data.num_workers", d.num_workers), ("tokenizer.batch_size", t.batch_size),
                        ("tokenizer.max_steps", t.max_steps), ("stackformer.batch_size", s.batch_size),
                        ("stackformer.max_steps", s.max_steps), ("evaluate.num_samples", e.num_samples),
                        ("evaluate.batch_size", e.batch_size), ("ray.num_workers", cfg.ray.num_workers)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    if cfg.ray.cpus_per_worker is not None and cfg.ray.cpus_per_worker < 1:
        raise ConfigError(f"ray.cpus_per_worker={cfg.ray.cpus_per_worker} must be >= 1 (or null: automatic)")
    if cfg.run.retries < 0 or cfg.run.retry_delay_s < 0:
        raise ConfigError(f"run.retries={cfg.run.retries} and run.retry_delay_s={cfg.run.retry_delay_s} "
                          "must be >= 0")
    if e.extractor not in ("classifier", "inception-v3-compat"):
        raise ConfigError(f"evaluate.extractor={e.extractor!r}; allowed: 'classifier', 'inception-v3-compat'")
    if (t.model.in_channels, t.model.resolution) != (d.channels, d.image_size):  # built by hand, not by from_dict
        raise ConfigError(f"tokenizer.model has {t.model.in_channels} channels at {t.model.resolution}px, the data "
                          f"{d.channels} at {d.image_size}px; build configs with resolve() or from_dict()")


# --------------------------------------------------------------------------------------------- model configs


@dataclass(frozen=True)
class TokenLayout:
    """Vocabulary and sequence of a tokenisation: what a generator model needs to know about its tokens."""

    codebook_size: int
    grid_size: int
    seq_len: int  # codes per image (the kept positions)


def token_layout(cfg: PipelineConfig) -> TokenLayout:
    """The layout the tokenizer section *asks for*, before any tokenizer exists (benchmarks, tests, planning).
    Stages read the layout of the tokenizer they were given (``TokenizerOutput``) instead."""
    m = cfg.tokenizer.model
    return TokenLayout(codebook_size=m.codebook_size, grid_size=m.grid_size, seq_len=m.num_kept)


def _condition(s: StackformerSection, num_classes: int, text: Any) -> dict[str, Any]:
    """The conditioning fields of a generator config: captions first, else classes, else none."""
    if s.conditional and text is not None and text.text_len > 0:
        fields = {"num_classes": 0, "text_vocab_size": text.text_vocab_size, "text_len": text.text_len,
                  "n_layer_text": text.n_layer}
        if text.width:
            fields["text_width"] = text.width
    else:
        fields = {"num_classes": num_classes if s.conditional else 0}
    if s.cond_dropout > 0 and not fields["num_classes"] and not fields.get("text_len"):
        raise ConfigError(f"stackformer.cond_dropout={s.cond_dropout} needs class labels or captions, and this data "
                          "has neither (an unconditional model has nothing to guide); set it to 0")
    return {**fields, "cond_dropout": s.cond_dropout}


@dataclass(frozen=True)
class TextShape:
    """What the generator's text encoder reads: ``text_len`` ids < ``text_vocab_size``, ``n_layer`` blocks."""

    text_len: int
    text_vocab_size: int
    n_layer: int
    width: int = 0  # a frozen pretrained encoder's state width (0: the generator's own encoder)


def stackformer_config(s: StackformerSection, tokenizer: Any, *, num_classes: int, text: TextShape | None = None
                       ) -> Any:
    """The ``models.stackformer.StackformerConfig`` of section ``s`` on the tokens of ``tokenizer`` (anything with
    ``codebook_size``, ``grid_size`` and ``seq_len``: a ``TokenizerOutput``), which fix the vocabulary and the
    sequence; the section fixes the network.

    ``num_classes`` is the label count of the data (0 = unlabeled) and ``text`` the caption ids of captioned data;
    with ``stackformer.conditional`` the model is text-conditional when there are captions, else class-conditional
    when there are labels.
    """
    from models.stackformer import StackformerConfig

    return StackformerConfig(codebook_size=tokenizer.codebook_size, grid_size=tokenizer.grid_size,
                             seq_len=tokenizer.seq_len, n_layer_code=s.n_layer_code, n_layer_pos=s.n_layer_pos,
                             n_embd=s.n_embd, n_head=s.n_head, dropout=s.dropout, pos_loss_weight=s.pos_loss_weight,
                             **_condition(s, num_classes, text))


def fullgrid_config(s: StackformerSection, tokenizer: Any, *, num_classes: int, text: TextShape | None = None
                    ) -> Any:
    """The ``models.stackformer.FullGridConfig`` of the full-grid baseline: all ``G*G`` codes of ``tokenizer``'s
    grid, ``n_layer_code + n_layer_pos`` blocks of the section's width (same total depth and width)."""
    from models.stackformer import FullGridConfig

    return FullGridConfig(codebook_size=tokenizer.codebook_size, grid_size=tokenizer.grid_size,
                          n_layer=s.n_layer_code + s.n_layer_pos, n_embd=s.n_embd, n_head=s.n_head,
                          dropout=s.dropout, **_condition(s, num_classes, text))


def sampling_params(sampling: SamplingSection) -> tuple[Any, Any]:
    """``(code_params, position_params)``: the ``models.stackformer.SamplingParams`` of each head."""
    from models.stackformer import SamplingParams

    return (SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p),
            SamplingParams(temperature=sampling.pos_temperature, top_k=sampling.pos_top_k,
                           top_p=sampling.pos_top_p))
