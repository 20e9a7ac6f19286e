"""evaluate stage: samples from the trained model, FID/KID/IS, reconstruction metrics, speed, pictures.

``run(cfg, inputs)`` is the stage (testable without Prefect); ``evaluate_task`` wraps it. It is the last
stage of the pipeline.

How a run goes:

1. The inputs (``ingest``, ``train_tokenizer``, ``train_stackformer``, ``train_evaluator``) arrive from the
   flow's stage graph; the feature extractor is resolved from them. ``evaluate.extractor=classifier`` uses the
   ``train_evaluator`` stage's classifier (trained on the data's labels; for unlabelled data that stage is
   skipped and the classifier-based metrics are *unavailable*, reported as such). ``inception-v3-compat``
   checks its weights file here and fails fast, before any sampling, when it is missing.
2. The stage key hashes :data:`VERSION`, the evaluate section, the seed, the weights of the model, the
   tokenizer and the extractor, and the ingest manifest (the reference set); a complete output for the key
   (``_SUCCESS.json``) is a cache hit.
3. Sample ``evaluate.num_samples`` token sequences in batches of ``evaluate.batch_size`` with KV caches (labels
   balanced over the classes for a class-conditional model: sample ``i`` has class ``i mod C``), batch ``b``
   drawn from a ``torch.Generator`` seeded with ``sampling_seed + b``; decode them with the tokenizer. Each
   finished batch is kept in ``batches/`` (named by a hash of what it depends on), so a killed run resumes
   at the next batch. The samples go to ``samples.safetensors`` with ``samples_manifest.json`` (sha256,
   seeds, counts).
4. Reconstruct the first ``evaluate.num_recon_images`` val images (L1, PSNR, SSIM, rFID, code usage).
5. FID/KID/IS of the samples against the val images (``evaluate.num_reference_images``) through
   ``torch_fidelity.calculate_metrics`` (:mod:`infra.metrics`); the reference statistics are cached under
   ``<run.root>/fidelity_cache`` by the reference set's hash and the extractor weights' sha256.
6. Pictures (``pictures/*.png``), ``evaluation.json`` (every figure, its definition, the extractor, n, seeds)
   and the MLflow run (metrics, pictures, evaluation.json); ``_SUCCESS.json`` last.

Every FID/KID/IS figure is reported with the extractor's name (``classifier-fashion-mnist`` by default) and
never called an Inception figure unless the extractor is ``inception-v3-compat``.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from infra.config import ConfigError, PipelineConfig, identity, sampling_params, stable_hash, to_dict
from infra.metrics import Extractor, classifier_unavailable_reason
from infra.orchestration import lazy_stage_task
from infra.refs import (
    EvaluateInputs,
    EvaluateOutput,
    EvaluatorOutput,
    IngestOutput,
    StackformerOutput,
    TokenizerOutput,
    caption_tokenizer,
    load_generator,
    load_tokenizer,
)
from infra.storage import (
    DamagedOutput,
    atomic_write_bytes,
    atomic_write_json,
    cached_run,
    file_lock,
    read_json,
    read_marker,
    remove_tree,
    save_tensors,
    sha256_file,
    stage_dir,
)
from infra.training import purpose_seed
from models.metrics import code_stats

STAGE = "evaluate"
VERSION = "2"  # bump when the code changes what a given config produces
SUCCESS = "_SUCCESS.json"
ARTIFACT_SHA256_TAG = "mqgen.sha256."  # + the artifact's path: its sha256, as logged
EVALUATION = "evaluation.json"
FORMAT = "mqgen.evaluation/1"
SAMPLES = "samples.safetensors"
SAMPLES_MANIFEST = "samples_manifest.json"
REFERENCE_SPLIT = "val"
READ_BATCH = 500  # images per PNG-decoding batch when reading the val split

log = logging.getLogger("mqgen.evaluate")


# --------------------------------------------------------------------------------------------- upstream


@dataclass(frozen=True)
class Inputs:
    """The stage's inputs with the feature extractor resolved and every check done, before any work."""

    ingest: IngestOutput
    tokenizer: TokenizerOutput
    model: StackformerOutput
    extractor: Extractor | None
    extractor_unavailable: str  # why there is no extractor ("" when there is one)
    evaluator: EvaluatorOutput | None  # None: no classifier (another extractor, or unlabelled data)


def resolve_extractor(cfg: PipelineConfig, inputs: EvaluateInputs) -> tuple[Extractor | None, str]:
    """``(extractor, why unavailable)`` for ``cfg.evaluate.extractor``.

    ``inception-v3-compat`` raises :class:`~infra.metrics.InceptionWeightsMissing` at once without weights.
    ``classifier`` uses the ``train_evaluator`` input; without one the classifier figures are unavailable
    (unlabelled data), or the stage was not run (a ``ValueError`` naming it).
    """
    from infra import metrics

    e = cfg.evaluate
    if e.extractor == metrics.INCEPTION:
        return metrics.inception_extractor(e.inception_weights, e.inception_download), ""
    why = classifier_unavailable_reason(inputs.ingest.num_classes, cfg.data.source)
    if why:
        return None, why
    ev = inputs.train_evaluator
    if ev is None:
        raise ValueError(f"{STAGE} with evaluate.extractor=classifier needs the train_evaluator output: run that "
                         "stage first (mqgen run --only train_evaluator ...) or the whole pipeline")
    ext = metrics.classifier_extractor(ev.extractor_name, ev.weights, ev.sha256, source=ev.source or cfg.data.source,
                                       val_accuracy=ev.val_accuracy)
    return ext, ""


def stage_key(cfg: PipelineConfig, inputs: Inputs) -> str:
    return stable_hash(_key_doc(cfg, inputs))


def _key_doc(cfg: PipelineConfig, inputs: Inputs) -> dict[str, Any]:
    # fid_bootstrap came with VERSION 2 and is hashed; fields added since count only away from their default
    e = {k: v for k, v in {**identity("evaluate", to_dict(cfg.evaluate)),
                           "fid_bootstrap": cfg.evaluate.fid_bootstrap}.items()
         if k not in ("inception_weights", "inception_download")}
    return {"stage": STAGE, "version": VERSION, "evaluate": e, "seed": cfg.seed,
            "model": inputs.model.sha256, "tokenizer": inputs.tokenizer.sha256,
            "extractor": inputs.extractor.weights_sha256 if inputs.extractor else "none",
            "ingest": inputs.ingest.manifest_sha256}


def key_doc(cfg: PipelineConfig, inputs: EvaluateInputs) -> dict[str, Any]:
    """What the stage key of ``cfg`` on ``inputs`` hashes (raises like :func:`run` when the inputs do not fit or
    the extractor is unavailable)."""
    return _key_doc(cfg, _resolve(cfg, inputs))


def load_output(out_dir: Path) -> EvaluateOutput | None:
    """The stage output if ``out_dir`` holds a complete result whose files are intact; None without a commit
    marker; :class:`~infra.storage.DamagedOutput` when the marker is unreadable or a listed file is gone or
    altered."""
    ref = read_marker(out_dir / SUCCESS, EvaluateOutput, "output")
    if ref is None:
        return None
    try:
        files = read_json(out_dir / SUCCESS).get("files", {})
    except (OSError, ValueError, AttributeError) as e:
        raise DamagedOutput(out_dir, f"{SUCCESS} is unreadable ({e})") from None
    for name, digest in files.items():
        p = out_dir / name
        if not p.is_file():
            raise DamagedOutput(out_dir, f"{name} is missing")
        if sha256_file(p) != digest:
            raise DamagedOutput(out_dir, f"{name} does not match the sha256 in {SUCCESS}")
    return ref


def _resolve(cfg: PipelineConfig, inputs: EvaluateInputs) -> Inputs:
    model, tokenizer = inputs.train_stackformer, inputs.train_tokenizer
    check_compatible(model, tokenizer)
    extractor, why = resolve_extractor(cfg, inputs)
    return Inputs(inputs.ingest, tokenizer, model, extractor, why, inputs.train_evaluator)


def cached(cfg: PipelineConfig, inputs: EvaluateInputs) -> EvaluateOutput | None:
    """The complete output for ``cfg`` on ``inputs`` if it exists (no computation), else None."""
    try:
        resolved = _resolve(cfg, inputs)
    except (ValueError, FileNotFoundError):  # mismatched models, no evaluator yet, no Inception weights
        return None
    return load_output(stage_dir(cfg.run.root, STAGE, stage_key(cfg, resolved)))


def run(cfg: PipelineConfig, inputs: EvaluateInputs, *, force: bool = False, parent_run_id: str | None = None
        ) -> EvaluateOutput:
    """Evaluate the trained model of ``cfg`` (or reuse a complete evaluation); see the module docstring."""
    resolved = _resolve(cfg, inputs)  # fails fast: mismatched models, missing evaluator or Inception weights
    doc = _key_doc(cfg, resolved)
    key = stable_hash(doc)
    out_dir = stage_dir(cfg.run.root, STAGE, key)
    return cached_run(out_dir, key, lambda: load_output(out_dir),
                      lambda: _evaluate(cfg, parent_run_id, resolved, key, out_dir, force), force=force, key_doc=doc)


__getattr__ = lazy_stage_task(__name__, "evaluate_task", run, name=STAGE)


# --------------------------------------------------------------------------------------------- models


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_compatible(model_ref: StackformerOutput, tokenizer_ref: TokenizerOutput) -> None:
    """Raise ``ValueError`` when the generator's tokens cannot be decoded by the tokenizer."""
    mc, tok_cfg = model_ref.model_config, tokenizer_ref.mqvae_config
    if model_ref.tokenizer_sha256 and model_ref.tokenizer_sha256 != tokenizer_ref.sha256:
        raise ValueError(f"{STAGE}: the {model_ref.model} model was trained on tokens of the tokenizer with weights "
                         f"sha256 {model_ref.tokenizer_sha256[:12]}, but the train_tokenizer output is "
                         f"{tokenizer_ref.sha256[:12]}; retrain train_stackformer on this tokenizer's tokens")
    problems = []
    if mc["codebook_size"] != tok_cfg.codebook_size:
        problems.append(f"codebook_size {mc['codebook_size']} vs {tok_cfg.codebook_size}")
    if mc["grid_size"] != tok_cfg.grid_size:
        problems.append(f"grid_size {mc['grid_size']} vs {tok_cfg.grid_size}")
    seq_len = model_ref.tokens_per_image
    if model_ref.model == "fullgrid" and tok_cfg.num_kept != tok_cfg.num_positions:
        problems.append(f"the full-grid model needs a keep_ratio=1.0 tokenizer (it keeps {tok_cfg.num_kept} of "
                        f"{tok_cfg.num_positions} positions)")
    elif seq_len != tok_cfg.num_kept:
        problems.append(f"tokens per image {seq_len} vs {tok_cfg.num_kept}")
    if problems:
        raise ValueError(f"{STAGE}: the {model_ref.model} model does not match the tokenizer: {'; '.join(problems)}")


# --------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleBatch:
    images: torch.Tensor  # uint8 [B, C, H, W]
    codes: torch.Tensor  # long [B, N], raster order
    positions: torch.Tensor  # long [B, N], increasing
    labels: torch.Tensor  # long [B]; -1 when unconditional
    raster_share: float  # share of consecutive positions sampled in increasing order (1.0 for full grid)
    sample_seconds: float  # wall clock
    decode_seconds: float
    sample_cpu_seconds: float = 0.0  # this process's CPU time (all threads); not kept in resumed batches
    decode_cpu_seconds: float = 0.0


def balanced_labels(num: int, num_classes: int) -> torch.Tensor | None:
    """Sample ``i`` gets class ``i mod num_classes`` (None for an unconditional model)."""
    return torch.arange(num) % num_classes if num_classes > 0 else None


def sample_batch(model: Any, tokenizer: Any, n: int, labels: torch.Tensor | None, cfg: PipelineConfig,
                 generator: torch.Generator, device: torch.device, text: torch.Tensor | None = None) -> SampleBatch:
    """Sample ``n`` token sequences (KV caches on; ``text``: caption ids for a text model), decode them; time
    both phases separately."""
    from infra.viz import to_uint8
    from models.stackformer import sample_tokens

    s = cfg.evaluate.sampling
    if s.guidance_scale != 1.0 and not getattr(model.config, "guided", False):
        raise ConfigError(f"evaluate.sampling.guidance_scale={s.guidance_scale}: this model was not trained for "
                          "classifier-free guidance (it needs a class- or text-conditional model trained with "
                          "stackformer.cond_dropout > 0); use guidance_scale=1")
    code_params, pos_params = sampling_params(s)
    lab = labels.to(device) if labels is not None else None
    txt = text.to(device) if text is not None else None
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        codes, positions, share = sample_tokens(model, n, lab, code_params, pos_params, raster_order=s.raster_order,
                                                generator=generator, guidance_scale=s.guidance_scale, text=txt)
        _sync(device)
        c1, t1 = time.process_time(), time.perf_counter()
        images = to_uint8(tokenizer.decode(codes, positions))
        _sync(device)
        c2, t2 = time.process_time(), time.perf_counter()
    return SampleBatch(images.cpu(), codes.cpu(), positions.contiguous().cpu(),
                       labels.clone() if labels is not None else torch.full((n,), -1, dtype=torch.long),
                       share, t1 - t0, t2 - t1, c1 - c0, c2 - c1)


def _batch_file(batch_dir: Path, key: str, index: int, seed: int, n: int) -> tuple[Path, str]:
    fingerprint = stable_hash({"key": key, "index": index, "seed": seed, "n": n}, length=16)
    return batch_dir / f"batch-{index:05d}-{fingerprint}.safetensors", fingerprint


def _load_batch(path: Path, fingerprint: str, n: int) -> SampleBatch | None:
    """A finished batch written by an earlier (killed) run of the same key; None when absent or unusable."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        if meta.get("fingerprint") != fingerprint or t["images"].shape[0] != n:
            return None
        return SampleBatch(t["images"], t["codes"], t["positions"], t["labels"], float(meta["raster_share"]),
                           float(meta["sample_seconds"]), float(meta["decode_seconds"]))
    except (SafetensorError, OSError, KeyError, ValueError):
        log.warning("%s: unreadable sample batch %s; sampling it again", STAGE, path.name)
        return None


def _save_batch(path: Path, fingerprint: str, b: SampleBatch) -> None:
    save_tensors(path, {"images": b.images, "codes": b.codes, "positions": b.positions, "labels": b.labels},
                 {"fingerprint": fingerprint, "raster_share": repr(b.raster_share),
                  "sample_seconds": repr(b.sample_seconds), "decode_seconds": repr(b.decode_seconds)})


def generate(model: Any, tokenizer: Any, cfg: PipelineConfig, *, key: str, num_classes: int, sampling_seed: int,
             batch_dir: Path, device: torch.device, text: torch.Tensor | None = None) -> tuple[SampleBatch, int]:
    """All ``evaluate.num_samples`` samples (resuming finished batches; sample ``i`` of a text model reads the
    caption ids ``text[i]``); returns them and the resumed count."""
    from infra.console import Progress

    e = cfg.evaluate
    labels = balanced_labels(e.num_samples, num_classes)
    batch_dir.mkdir(parents=True, exist_ok=True)
    batches: list[SampleBatch] = []
    resumed = 0
    num_batches = math.ceil(e.num_samples / e.batch_size)
    progress = Progress(f"{STAGE} sampling", num_batches, unit="batches")
    warmed = False
    for index in range(num_batches):
        begin = index * e.batch_size
        n = min(e.batch_size, e.num_samples - begin)
        seed = sampling_seed + index
        path, fingerprint = _batch_file(batch_dir, key, index, seed, n)
        b = _load_batch(path, fingerprint, n)
        if b is not None:
            resumed += 1
        else:
            if not warmed:  # one small untimed batch first: lazy initialisation must not count as speed
                g = torch.Generator(device=device).manual_seed(sampling_seed - 1)
                warm_labels = None if labels is None else labels[:min(n, 8)]
                sample_batch(model, tokenizer, min(n, 8), warm_labels, cfg, g, device,
                             None if text is None else text[:min(n, 8)])
                warmed = True
            g = torch.Generator(device=device).manual_seed(seed)
            b = sample_batch(model, tokenizer, n, None if labels is None else labels[begin:begin + n], cfg, g,
                             device, None if text is None else text[begin:begin + n])
            _save_batch(path, fingerprint, b)
        batches.append(b)
        progress.update(index + 1, img_s=b.images.shape[0] / max(b.sample_seconds + b.decode_seconds, 1e-9))
    total = SampleBatch(
        images=torch.cat([b.images for b in batches]), codes=torch.cat([b.codes for b in batches]),
        positions=torch.cat([b.positions for b in batches]), labels=torch.cat([b.labels for b in batches]),
        raster_share=sum(b.raster_share * b.images.shape[0] for b in batches) / e.num_samples,
        sample_seconds=sum(b.sample_seconds for b in batches), decode_seconds=sum(b.decode_seconds for b in batches))
    return total, resumed


def val_captions(shards: Any, n: int) -> list[str]:
    """The captions of the first ``n`` reference images, in shard order ("" for an uncaptioned one)."""
    from infra.stream import iter_eval_batches

    return [c or "" for b in iter_eval_batches([(s.path, s.num_samples) for s in shards.shards(REFERENCE_SPLIT)],
                                               READ_BATCH, shards.channels, limit=n, with_captions=True)
            for c in b[3]]


def prompts(model_ref: StackformerOutput, shards: Any, n: int) -> tuple[list[str], torch.Tensor] | None:
    """For a text model: the captions sample ``i`` is drawn from (val caption ``i mod num_val``, shard order) and
    their ids under the model's caption tokenizer; None for other models."""
    if not model_ref.text_len:
        return None
    captions = val_captions(shards, n)
    if not captions:
        raise ValueError(f"{STAGE}: a text-conditional model needs captions to sample from, and the "
                         f"{REFERENCE_SPLIT} split is empty")
    captions = [captions[i % len(captions)] for i in range(n)]
    ids, _ = caption_tokenizer(model_ref).encode(captions, model_ref.text_len)
    return captions, torch.from_numpy(ids.astype("int64"))


# --------------------------------------------------------------------------------------------- real images


def read_split(shards: Any, split: str, limit: int | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of ``split`` (uint8 ``[N, C, H, W]``) and labels, in shard order."""
    from infra.stream import iter_eval_batches

    images, labels = [], []
    for x, y, _ in iter_eval_batches([(s.path, s.num_samples) for s in shards.shards(split)], READ_BATCH, channels,
                                     limit=limit):
        images.append(x)
        labels.append(y)
    if not images:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels)


def reference_hash(ingest: Any, num_images: int) -> str:
    """Identity of the reference set: the ingest manifest (which pins every shard's sha256), split and count."""
    return stable_hash({"ingest_manifest_sha256": ingest.manifest_sha256, "split": REFERENCE_SPLIT,
                        "num_images": num_images, "image_size": ingest.image_size, "channels": ingest.channels,
                        "order": "shard order"}, length=16)


@torch.no_grad()
def reconstruct(tokenizer: Any, images: torch.Tensor, batch_size: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Eval-mode reconstructions (uint8), keep masks, code counts and pixel metrics of uint8 ``images``."""
    from infra.viz import to_uint8
    from models.metrics import l1_per_image, psnr_per_image, ssim_per_image

    k = tokenizer.cfg.codebook_size
    counts = torch.zeros(k, dtype=torch.float64)
    recons, masks = [], []
    l1 = psnr = ssim = 0.0
    for i in range(0, images.shape[0], batch_size):
        x_u8 = images[i:i + batch_size]
        x = x_u8.to(device).float().div(127.5).sub(1.0)
        out = tokenizer(x, update_codebook=False)
        rec = out.reconstruction.float().clamp(-1, 1)
        unit_x, unit_r = (x + 1) / 2, (rec + 1) / 2
        l1 += float(l1_per_image(unit_x, unit_r).sum())
        psnr += float(psnr_per_image(unit_x, unit_r).sum())
        ssim += float(ssim_per_image(unit_x, unit_r).sum())
        counts += torch.bincount(out.codes.flatten().cpu(), minlength=k).double()
        recons.append(to_uint8(rec).cpu())
        masks.append(out.keep_mask.cpu())
    n = images.shape[0]
    return (torch.cat(recons), torch.cat(masks), counts,
            {"recon_l1": l1 / n, "recon_psnr": psnr / n, "recon_ssim": ssim / n})


# --------------------------------------------------------------------------------------------- pictures


def _scale(image_size: int) -> int:
    return max(1, 64 // image_size)


def make_pictures(out_dir: Path, *, samples: SampleBatch, num_classes: int, grid_size: int,
                  inputs: torch.Tensor | None, recons: torch.Tensor | None, keep_mask: torch.Tensor | None,
                  sample_counts: torch.Tensor, val_counts: torch.Tensor | None, model_kind: str,
                  captions: list[str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Write the PNGs under ``out_dir/pictures``; returns ``{name: relative path}`` and ``{name: why missing}``."""
    from infra.viz import grid, histogram_png, mask_overlay, png_bytes, side_by_side

    pics: dict[str, str] = {}
    missing: dict[str, str] = {}
    pdir = out_dir / "pictures"
    pdir.mkdir(parents=True, exist_ok=True)
    size = samples.images.shape[-1]
    scale = _scale(size)

    def put(name: str, data: bytes) -> None:
        atomic_write_bytes(pdir / f"{name}.png", data)
        pics[name] = f"pictures/{name}.png"

    n = samples.images.shape[0]
    nrow = num_classes if 0 < num_classes <= 16 else 8
    put("samples_grid", png_bytes(grid(samples.images[:64], nrow=min(nrow, n), scale=scale)))
    if num_classes > 0:
        per_row = min(10, max(int((samples.labels == c).sum()) for c in range(num_classes)))
        rows = []
        for c in range(num_classes):
            idx = (samples.labels == c).nonzero().flatten()[:per_row]
            row = samples.images[idx]
            if row.shape[0] < per_row:  # fewer samples than columns: pad with white cells
                pad = torch.full((per_row - row.shape[0], *row.shape[1:]), 255, dtype=torch.uint8)
                row = torch.cat([row, pad])
            rows.append(row)
        put("per_class_grid", png_bytes(grid(torch.cat(rows), nrow=per_row, scale=scale)))
    elif captions is not None:
        from infra.viz import captioned_grid

        put("captioned_samples", png_bytes(captioned_grid(samples.images[:16], captions[:16])))
        missing["per_class_grid"] = "the model is text-conditional (see captioned_samples)"
    else:
        missing["per_class_grid"] = "the model is unconditional (no class labels to sample per class)"
    if inputs is not None and recons is not None and keep_mask is not None and inputs.shape[0] > 0:
        m = min(32, inputs.shape[0])
        put("reconstructions", png_bytes(grid(side_by_side(inputs[:m], recons[:m]), nrow=8, scale=scale)))
        put("mask_overlay_val", png_bytes(grid(mask_overlay(inputs[:m], keep_mask[:m], grid_size), nrow=8,
                                               scale=scale)))
    else:
        for name in ("reconstructions", "mask_overlay_val"):
            missing[name] = "the val split is empty"
    if model_kind == "stackformer":
        m = min(32, n)
        mask = torch.zeros(m, grid_size * grid_size, dtype=torch.bool)
        mask.scatter_(1, samples.positions[:m], True)
        put("mask_overlay_samples", png_bytes(grid(mask_overlay(samples.images[:m], mask, grid_size), nrow=8,
                                                   scale=scale)))
    else:
        missing["mask_overlay_samples"] = "the full-grid baseline codes every position (no mask)"
    put("code_usage_samples", histogram_png(sample_counts.numpy(), f"code usage of {n} samples"))
    if val_counts is not None:
        put("code_usage_val", histogram_png(val_counts.numpy(), "code usage of the reconstructed val images"))
    else:
        missing["code_usage_val"] = "the val split is empty"
    return pics, missing


# --------------------------------------------------------------------------------------------- the run


CAPTION_FIGURES = ("caption_alignment", "caption_alignment_seen", "caption_alignment_heldout",
                   "caption_alignment_count", "caption_alignment_a_colour", "caption_alignment_a_shape",
                   "caption_alignment_axis")


def _definitions(ext: Extractor | None, *, n: int, n_ref: int, n_recon: int, model_kind: str, batch_size: int,
                 device: str, val_accuracy: float | None, text: bool = False) -> dict[str, str]:
    """One sentence per figure of evaluation.json, naming the feature extractor (never "Inception" unless it is)."""
    name = ext.name if ext is not None else "the feature extractor"
    if ext is None:
        feats = f"{name}'s features"
    elif ext.kind == "classifier":
        feats = f"{name} penultimate features ({ext.feature_dim}-d)"
    else:
        feats = f"{name} pool features ({ext.feature_dim}-d)"
    acc = f" (the classifier's own held-out accuracy is {val_accuracy:.3f})" if val_accuracy is not None else ""
    defs = {
        "fid": f"Frechet distance between Gaussian fits of the {feats} of the {n} samples and of the first {n_ref} "
               "val images (lower is better; 0 = same statistics).",
        "fid_boot_std": "Standard error of the FID from sampling: standard deviation of the FIDs of bootstrap "
                        "resamples of the samples (evaluate.fid_bootstrap; reference statistics fixed).",
        "fid_low": "Lower end of the FID's 95% interval: fid - 1.96 x fid_boot_std (at least 0).",
        "fid_high": "Upper end of the FID's 95% interval: fid + 1.96 x fid_boot_std.",
        "kid_mean": f"Kernel distance (unbiased MMD^2, cubic polynomial kernel) between the {feats} of the samples "
                    f"and of the val images, mean over 100 random subsets of min(1000, n) (lower is better).",
        "kid_std": "Standard deviation of the kernel distance over its 100 subsets.",
        "isc_mean": f"exp(E_x KL(p(y|x) || p(y))) from the {name} logits of the samples, mean over min(10, n) splits "
                    "(higher is better: confident and diverse classes; at most the number of classes).",
        "isc_std": "Standard deviation of that score over its splits.",
        "reference_isc_mean": "The same score on the reference val images themselves: what real data reaches "
                              f"under {name}.",
        "sample_class_accuracy": f"Share of class-conditional samples that {name} assigns to their conditioning "
                                 f"class{acc}.",
        "rfid": f"Frechet distance between the {feats} of the tokenizer's reconstructions of the first {n_recon} val "
                f"images and of the first {n_ref} val images (lower is better).",
        "recon_l1": f"Mean absolute pixel error of the tokenizer's reconstructions of the first {n_recon} val images, "
                    "pixels in [0, 1] (lower is better).",
        "recon_psnr": "Mean PSNR of those reconstructions in dB, peak 1 on [0, 1] pixels (higher is better).",
        "recon_ssim": "Mean SSIM of those reconstructions (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, per "
                      "channel; 1 = identical).",
        "val_code_perplexity": "exp(entropy) of the code histogram of the reconstructed val images (effective "
                               "number of codes used).",
        "val_code_usage": "Share of the codebook used at least once by the reconstructed val images.",
        "sample_code_perplexity": "exp(entropy) of the code histogram of the sampled token sequences.",
        "sample_code_usage": "Share of the codebook used at least once by the samples.",
        "sample_raster_share": "Share of consecutive sampled positions that increase (1.0 = raster order; the "
                               "Stackformer learns the order, the full-grid model follows it by construction).",
        "tokens_per_image": f"Tokens the {model_kind} model generates per image (each a code; the Stackformer "
                            "also picks its position).",
        "sampling_images_per_s": f"Images per second of token sampling alone ({model_kind}, KV caches, batches of "
                                 f"{batch_size}, {device}; one untimed warm-up batch first).",
        "decode_images_per_s": f"Images per second of decoding sampled tokens with the tokenizer (batches of "
                               f"{batch_size}, {device}).",
        "generation_images_per_s": "Images per second of sampling plus decoding.",
        "sampling_seconds": "Seconds spent sampling tokens for all samples.",
        "decode_seconds": "Seconds spent decoding all samples.",
        "evaluator_val_accuracy": f"Held-out top-1 accuracy of the {name} classifier on the val split.",
        "caption_alignment": f"Share of samples (text-conditional) whose every attribute the {name} classifier's "
                             "attribute heads read (count, each object's shape, colour and size, the layout) is "
                             "the one their caption asks for (higher is better).",
        "caption_alignment_seen": "The same over captions whose colour-shape pairs all occur in training.",
        "caption_alignment_heldout": "The same over captions holding a colour-shape pair held out of training "
                                     "(composition).",
        "caption_alignment_count": "Share of samples with as many objects as their caption says.",
        "caption_alignment_a_colour": "Share of samples whose first object (top or left) has the caption's colour.",
        "caption_alignment_a_shape": "Share of samples whose first object has the caption's shape.",
        "caption_alignment_axis": "Share of two-object samples laid out as the caption says (above/below or "
                                  "left/right).",
        "reference_caption_alignment": "caption_alignment of the real val images with their own captions: what the "
                                       "attribute heads score on real data (the ceiling).",
        "recon_caption_alignment": f"caption_alignment of the tokenizer's reconstructions of the first {n_recon} val "
                                   "images with those images' captions: what survives tokenisation (the ceiling of "
                                   "any generator on these tokens).",
    }
    if not text:  # the caption figures exist only for text-conditional models
        for name in (*CAPTION_FIGURES, "reference_caption_alignment", "recon_caption_alignment"):
            defs.pop(name)
    return defs


def _evaluate(cfg: PipelineConfig, parent_run_id: str | None, inputs: Inputs, key: str, out_dir: Path,
              force: bool) -> EvaluateOutput:
    from infra import metrics as mx
    from infra.shards import ShardSet
    from infra.tracking import Tracker

    e = cfg.evaluate
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / SUCCESS
    if marker.exists():
        marker.unlink()  # a forced rerun: the old output stops being valid before anything is rewritten
    batch_dir = out_dir / "batches"
    if force:
        remove_tree(batch_dir)
    device = _device()
    ext = inputs.extractor
    ext_name = ext.name if ext is not None else ""
    model_ref, tok_ref, ingest = inputs.model, inputs.tokenizer, inputs.ingest
    sampling_seed = purpose_seed(cfg.seed, f"{STAGE}/sampling")

    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    params = {"evaluate": to_dict(e), "seed": cfg.seed, "sampling_seed": sampling_seed, "extractor": ext_name or "none",
              "model": model_ref.model}
    tags = {"mqgen.extractor": ext_name or "none", "mqgen.device": device.type, "mqgen.model_sha256": model_ref.sha256,
            "mqgen.tokenizer_sha256": tok_ref.sha256, "mqgen.stackformer_run_id": model_ref.mlflow_run_id,
            "mqgen.tokenizer_run_id": tok_ref.mlflow_run_id}
    if ext is not None:
        tags["mqgen.extractor_sha256"] = ext.weights_sha256
    srun = tracker.stage_run(STAGE, key, params=params, tags=tags, parent_run_id=parent_run_id)
    with srun:
        t_start = time.perf_counter()
        tokenizer = load_tokenizer(tok_ref, device)
        model = load_generator(model_ref, device)
        num_classes = int(model_ref.model_config.get("num_classes", 0))
        shards = ShardSet.from_output(ingest)
        class_names = shards.classes

        if ext is not None and ext.kind == mx.INCEPTION and device.type == "cpu":
            n_img = e.num_samples + e.num_recon_images + (e.num_reference_images or shards.num_samples(REFERENCE_SPLIT))
            log.warning("%s: inception-v3-compat on a CPU runs at about 2-9 images/s: up to %d images to featurize "
                        "(%d-%d min on a cold reference cache); lower evaluate.num_samples, num_recon_images or "
                        "num_reference_images for a quick look", STAGE, n_img, n_img // 540, n_img // 120 + 1)

        # 1. samples (a text model: one val caption each)
        prompt = prompts(model_ref, shards, e.num_samples)
        # one evaluation of a run root samples at a time: the grid's concurrent variants would otherwise time
        # their sampling against each other (about +/-25 % on a 2-core CPU)
        with file_lock(Path(cfg.run.root) / STAGE / ".sampling-timer.lock", "the sampling timer"):
            samples, resumed = generate(model, tokenizer, cfg, key=key, num_classes=num_classes,
                                        sampling_seed=sampling_seed, batch_dir=batch_dir, device=device,
                                        text=None if prompt is None else prompt[1])
        del model
        samples_sha = _write_samples(out_dir, samples, cfg, model_ref, tok_ref, sampling_seed, num_classes)

        # 2. reconstructions of val images
        num_val = shards.num_samples(REFERENCE_SPLIT)
        n_ref = num_val if e.num_reference_images is None else min(e.num_reference_images, num_val)
        n_recon = min(e.num_recon_images, num_val)
        values: dict[str, float | None] = {}
        unavailable: dict[str, str] = {}
        provenance: dict[str, Any] = {}
        inputs_u8 = recons = keep_mask = val_counts = None
        if n_recon >= 2:
            inputs_u8, _ = read_split(shards, REFERENCE_SPLIT, n_recon, ingest.channels)
            recons, keep_mask, val_counts, pix = reconstruct(tokenizer, inputs_u8, e.batch_size, device)
            values.update(pix)
            values.update({f"val_code_{k}": v for k, v in code_stats(val_counts).items()})
        else:
            for k in ("recon_l1", "recon_psnr", "recon_ssim", "val_code_perplexity", "val_code_usage", "rfid"):
                unavailable[k] = f"the {REFERENCE_SPLIT} split has {num_val} images (reconstructions need >= 2)"
        del tokenizer
        k = tok_ref.model_config["codebook_size"]
        sample_counts = torch.bincount(samples.codes.flatten(), minlength=k).double()
        values.update({f"sample_code_{name}": v for name, v in code_stats(sample_counts).items()})
        if model_ref.model == "stackformer":
            values["sample_raster_share"] = samples.raster_share
        else:
            unavailable["sample_raster_share"] = "not applicable: the full-grid model samples in raster order"
        n = samples.images.shape[0]
        values["tokens_per_image"] = float(model_ref.tokens_per_image)
        values["sampling_seconds"] = samples.sample_seconds
        values["decode_seconds"] = samples.decode_seconds
        values["sampling_images_per_s"] = n / max(samples.sample_seconds, 1e-9)
        values["decode_images_per_s"] = n / max(samples.decode_seconds, 1e-9)
        values["generation_images_per_s"] = n / max(samples.sample_seconds + samples.decode_seconds, 1e-9)

        # 3. FID / KID / IS
        extractor_figures = ("fid", "fid_boot_std", "fid_low", "fid_high", "kid_mean", "kid_std", "isc_mean", "isc_std", "reference_isc_mean", "rfid",
                             "sample_class_accuracy", "evaluator_val_accuracy")
        if ext is None:
            why = inputs.extractor_unavailable or "no feature extractor"
            for name in extractor_figures:
                unavailable.setdefault(name, why)
        elif n_ref < 2:
            for name in extractor_figures:
                unavailable.setdefault(name, f"the {REFERENCE_SPLIT} split has {num_val} images (FID needs >= 2)")
        else:
            values.update(_fidelity(cfg, ext, inputs, shards, n_ref, samples, recons, num_classes, unavailable,
                                    device, provenance))
        if e.fid_bootstrap == 0:
            for name in ("fid_boot_std", "fid_low", "fid_high"):
                unavailable.setdefault(name, "evaluate.fid_bootstrap=0 (no interval asked for)")
        if ext is not None and not ext.has_logits:
            for name in ("isc_mean", "isc_std", "reference_isc_mean"):
                unavailable[name] = (f"{ext.name} weights hold pool features only (no logits): the Inception "
                                     "Score is unavailable")
        ev = inputs.evaluator
        if prompt is not None:
            if ev is not None and ev.caption_grammar:
                net, _ = mx.load_classifier(ev.weights, ev.sha256)
                align = mx.caption_alignment(net.to(device), samples.images, prompt[0], ev.caption_grammar)
                values.update({k: v for k, v in align.items() if k in CAPTION_FIGURES})
                values["reference_caption_alignment"] = ev.metrics.get("val_caption_alignment")
                if recons is not None:  # what the tokenizer keeps of the captioned attributes: the generator's ceiling
                    rec = mx.caption_alignment(net, recons, val_captions(shards, recons.shape[0]), ev.caption_grammar)
                    values["recon_caption_alignment"] = rec["caption_alignment"]
                else:
                    unavailable["recon_caption_alignment"] = f"the {REFERENCE_SPLIT} split is empty"
            else:
                for name in CAPTION_FIGURES + ("reference_caption_alignment", "recon_caption_alignment"):
                    unavailable[name] = ("no caption grammar: the evaluator can score how samples match their "
                                         "captions only for data whose captions it can parse (data.source=shapes)")

        for name, value in list(values.items()):
            if value is not None and not math.isfinite(value):
                unavailable.setdefault(name, f"the computation gave {value}")
        for name in unavailable:
            values.pop(name, None)

        # 4. pictures
        pics, missing_pics = make_pictures(
            out_dir, samples=samples, num_classes=num_classes, grid_size=int(model_ref.model_config["grid_size"]), inputs=inputs_u8, recons=recons, keep_mask=keep_mask,
            sample_counts=sample_counts, val_counts=val_counts, model_kind=model_ref.model,
            captions=None if prompt is None else prompt[0])

        # 5. evaluation.json
        definitions = _definitions(ext, n=n, n_ref=n_ref, n_recon=n_recon, model_kind=model_ref.model,
                                   batch_size=e.batch_size, device=device.type,
                                   val_accuracy=ev.val_accuracy if ev is not None else None, text=prompt is not None)
        figures = {name: values.get(name) for name in definitions}
        report = {
            "format": FORMAT,
            "stage_key": key,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "extractor": ext_name or None,
            "extractor_info": ext.to_dict() if ext is not None else {"unavailable": inputs.extractor_unavailable},
            "fid_interval": ({"method": f"fid -/+ 1.96 x the standard deviation of the FIDs of {e.fid_bootstrap} "
                              "bootstrap resamples of the samples (with replacement, seed 2020; reference "
                              "statistics fixed)", "level": 0.95,
                              "low": values["fid_low"], "high": values["fid_high"], "std": values["fid_boot_std"],
                              "resamples": e.fid_bootstrap} if values.get("fid_low") is not None else None),
            "reference_statistics": provenance or None,
            "n": n,  # generated images behind the sample figures
            "set_sizes": {"samples": n, "reference": n_ref, "reconstructions": n_recon,
                          "evaluator_val": ev.num_val if ev is not None else 0},
            "seeds": {"global": cfg.seed, "sampling": sampling_seed,
                      "rule": f"batch b (of {e.batch_size} samples) draws from torch.Generator seeded with "
                              "sampling + b; one untimed warm-up batch uses sampling - 1",
                      "labels": ("sample i has class i mod num_classes" if num_classes else
                                 f"sample i has the caption of {REFERENCE_SPLIT} image i mod "
                                 f"{shards.num_samples(REFERENCE_SPLIT)}" if prompt is not None else "unconditional"),
                      "torch_fidelity_rng_seed": 2020},
            "metrics": figures,
            "unavailable": {k2: v for k2, v in sorted(unavailable.items()) if k2 in definitions},
            "definitions": definitions,
            "model": {"kind": model_ref.model, "sha256": model_ref.sha256, "step": model_ref.step,
                      "num_classes": num_classes, "model_config": model_ref.model_config,
                      "mlflow_run_id": model_ref.mlflow_run_id},
            "tokenizer": {"sha256": tok_ref.sha256, "step": tok_ref.step, "keep_ratio":
                          tok_ref.model_config.get("keep_ratio"), "mlflow_run_id": tok_ref.mlflow_run_id},
            "data": {"source": cfg.data.source, "ingest_key": ingest.key,
                     "ingest_manifest_sha256": ingest.manifest_sha256, "reference_split": REFERENCE_SPLIT,
                     "reference_set_hash": reference_hash(ingest, n_ref), "classes": class_names,
                     "image_size": ingest.image_size, "channels": ingest.channels},
            "sampling": {**to_dict(e.sampling), "kv_cache": True, "batch_size": e.batch_size,
                         "resumed_batches": resumed},
            "environment": {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "python": platform.python_version(), "machine": platform.machine()},
            "prompts": prompt[0][:64] if prompt is not None else None,
            "pictures": pics,
            "pictures_missing": missing_pics,
            "artifacts": {"samples": SAMPLES, "samples_manifest": SAMPLES_MANIFEST, "samples_sha256": samples_sha},
            "seconds": time.perf_counter() - t_start,
        }
        if num_classes and "per_class_grid" in pics:
            report["pictures_info"] = {"per_class_grid": "one row per class, in this order: " + ", ".join(
                class_names[i] if i < len(class_names) else str(i) for i in range(num_classes))}
        atomic_write_json(out_dir / EVALUATION, report)

        step = srun.last_step("generation_images_per_s") + 1  # a forced rerun logs after the earlier points
        srun.log_metrics({name: float(v) for name, v in figures.items() if v is not None and math.isfinite(v)},
                         step=step)
        if unavailable:
            srun.set_tags({f"mqgen.unavailable.{name}": why[:4000] for name, why in unavailable.items()})
        for rel in pics.values():
            srun.log_artifact(out_dir / rel, "pictures")
        srun.log_artifact(out_dir / EVALUATION)
        srun.log_dataset(f"ingest-{ingest.key}", ingest.manifest_sha256, Path(ingest.path) / "manifest.json",
                         "evaluation", split=REFERENCE_SPLIT)
        srun.log_dataset(f"reference-{REFERENCE_SPLIT}-{n_ref}", report["data"]["reference_set_hash"],
                         Path(ingest.path) / "manifest.json", "reference", images=n_ref, **provenance)
        srun.log_artifact(out_dir / SAMPLES_MANIFEST)
        files = {name: sha256_file(out_dir / name) for name in (EVALUATION, SAMPLES, SAMPLES_MANIFEST,
                                                                 *pics.values())}
        srun.set_tags({f"{ARTIFACT_SHA256_TAG}{EVALUATION}": files[EVALUATION]})  # checked where it is downloaded
        ref = EvaluateOutput(path=str(out_dir), key=key, evaluation_json=str(out_dir / EVALUATION), metrics=figures,
                             mlflow_run_id=srun.run_id, extractor=ext_name, num_samples=n)
        atomic_write_json(marker, {"output": ref.to_dict(), "files": files})
        remove_tree(batch_dir)  # samples.safetensors now holds every batch
    log.info("%s %s: %d samples, extractor %s, fid %s -> %s", STAGE, key, n, ext_name or "none",
             figures.get("fid"), out_dir)
    return ref


def _write_samples(out_dir: Path, s: SampleBatch, cfg: PipelineConfig, model_ref: Any, tok_ref: Any,
                   sampling_seed: int, num_classes: int) -> str:
    path = out_dir / SAMPLES
    digest = save_tensors(path, {"images": s.images, "labels": s.labels, "codes": s.codes, "positions": s.positions},
                          {"format": "mqgen.samples/1", "model_sha256": model_ref.sha256})
    atomic_write_json(out_dir / SAMPLES_MANIFEST, {
        "format": "mqgen.samples/1", "file": SAMPLES, "sha256": digest, "num_images": int(s.images.shape[0]),
        "tensors": {"images": f"uint8 {list(s.images.shape)} (N, C, H, W)",
                    "labels": f"int64 [{s.images.shape[0]}] (-1 = unconditional)",
                    "codes": f"int64 {list(s.codes.shape)} (raster order)",
                    "positions": f"int64 {list(s.positions.shape)} (flat latent cells, increasing)"},
        "model": {"kind": model_ref.model, "sha256": model_ref.sha256}, "tokenizer_sha256": tok_ref.sha256,
        "seeds": {"global": cfg.seed, "sampling": sampling_seed, "batch_size": cfg.evaluate.batch_size,
                  "rule": "batch b draws from torch.Generator seeded with sampling + b"},
        "labels": "sample i has class i mod num_classes" if num_classes else "unconditional",
        "sampling": to_dict(cfg.evaluate.sampling)})
    return digest


def _fidelity(cfg: PipelineConfig, ext: Extractor, inputs: Inputs, shards: Any, n_ref: int, samples: SampleBatch,
              recons: torch.Tensor | None, num_classes: int, unavailable: dict[str, str], device: torch.device,
              provenance: dict[str, Any]) -> dict[str, float]:
    """FID/KID/IS of the samples (with the FID's bootstrap interval), IS of the reference, rFID, and the
    classifier's sample accuracy; ``provenance`` receives the reference features file's sha256 and size."""
    from infra import metrics as mx

    ingest = inputs.ingest
    cache_root = Path(cfg.run.root) / "fidelity_cache"
    ref = mx.Reference(set_hash=reference_hash(ingest, n_ref),
                       images=mx.LazyImageSet(lambda: read_split(shards, REFERENCE_SPLIT, n_ref, ingest.channels)[0]),
                       num_images=n_ref)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    out.update(mx.compute_metrics(samples.images, ext, reference=ref, fid=True, kid=True, isc=True,
                                  cache_root=cache_root, fid_bootstrap=cfg.evaluate.fid_bootstrap,
                                  provenance=provenance))
    if ext.has_logits:
        r = mx.compute_metrics(ref.images, ext, isc=True, fid=False, kid=False, cache_root=cache_root,
                               input1_cache_name=ref.cache_name(ext))
        out["reference_isc_mean"] = r["isc_mean"]
    if recons is not None and recons.shape[0] >= 2:
        out["rfid"] = mx.compute_metrics(recons, ext, reference=ref, fid=True, kid=False, isc=False,
                                         cache_root=cache_root)["fid"]
    log.info("%s: %s metrics in %.1f s (reference %s)", STAGE, ext.name, time.perf_counter() - t0,
             "computed" if isinstance(ref.images, mx.LazyImageSet) and ref.images.loaded else "from cache")
    if ext.kind == "classifier":
        ev = inputs.evaluator
        out["evaluator_val_accuracy"] = ev.val_accuracy
        if num_classes > 0:
            net, _ = mx.load_classifier(ext.weights_path, expected_sha256=ext.weights_sha256)
            pred = mx.classify(net.to(device), samples.images)
            out["sample_class_accuracy"] = float((pred == samples.labels).double().mean())
        else:
            unavailable["sample_class_accuracy"] = "the model is not class-conditional"
    else:
        unavailable["sample_class_accuracy"] = "needs the classifier extractor (evaluate.extractor=classifier)"
        unavailable["evaluator_val_accuracy"] = "no classifier with extractor inception-v3-compat"
    return out
