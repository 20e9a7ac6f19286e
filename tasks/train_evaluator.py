"""train_evaluator stage: the classifier behind the default FID/KID/IS (``evaluate.extractor=classifier``).

A small CNN (:class:`models.classifier.ClassifierNet`) is trained in-process on the ingested train shards' labels
for ``evaluate.classifier.max_steps`` steps, its held-out accuracy is measured on the val split and logged,
and its weights are written as safetensors (architecture in the header). The ``evaluate`` stage registers it
with torch-fidelity under :attr:`EvaluatorOutput.extractor_name` (``classifier-fashion-mnist`` for the
embedded data) and reports every classifier-based figure under that name.

Output: ``<run.root>/train_evaluator/<key>/{model.safetensors, val_per_class.json, _SUCCESS.json}``; the key
hashes :data:`VERSION`, the ingest manifest's sha256, the seed and ``evaluate.classifier``. A complete output
is a cache hit. Training takes a minute or two on a CPU and is not checkpointed: a killed run starts over.

Unlabelled data (``num_classes == 0``) cannot train a classifier: the flow skips the stage
(:func:`skip_reason`), :func:`run` raises :class:`ClassifierUnavailable` if called anyway, and ``evaluate``
reports the classifier-based metrics as unavailable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from infra.config import PipelineConfig, stable_hash, to_dict
from infra.metrics import (
    CAPTION_GRAMMARS,
    ClassifierUnavailable,
    attribute_heads,
    attribute_targets,
    caption_alignment,
    classifier_unavailable_reason,
    extractor_name,
    save_classifier,
)
from infra.orchestration import lazy_stage_task
from infra.refs import EvaluatorInputs, EvaluatorOutput
from infra.storage import atomic_write_json, cached_run, load_weights_ref, stage_dir
from infra.training import purpose_seed
from models.classifier import ClassifierNet, ClassifierNetConfig, to_classifier_input

STAGE = "train_evaluator"
VERSION = "1"  # bump when the training code changes what a given config produces
# Evaluators with attribute heads (captioned data) train on degraded copies too (:func:`degrade`): version of that
# recipe, in their key only (the key of an evaluator without attribute heads is what it was).
ROBUST_VERSION = "1"
DEGRADE_P, BLUR_SIGMA, NOISE_STD = 0.5, (0.4, 1.4), 0.04
SUCCESS = "_SUCCESS.json"
WEIGHTS = "model.safetensors"

log = logging.getLogger("mqgen.train_evaluator")


# --------------------------------------------------------------------------------------------- training


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Classifier inputs ``x`` ``[B, C, H, W]`` in [-1, 1], each row with probability ``DEGRADE_P`` Gaussian-blurred
    (sigma uniform in ``BLUR_SIGMA`` pixels) and given Gaussian noise (std ``NOISE_STD``): the softness of decoded
    images. An attribute classifier trained on crisp renders only reads edges a tokenizer's reconstruction no
    longer has (on ``shapes-text``: shape accuracy 88 % on real images, chance on unmasked reconstructions); with
    these copies in training it judges what a caption names, not the rendering's sharpness."""
    b, c, h, w = x.shape
    pick = torch.rand(b, generator=generator) < DEGRADE_P
    sigmas = torch.empty(b).uniform_(*BLUR_SIGMA, generator=generator)
    noise = torch.randn(x.shape, generator=generator) * NOISE_STD
    # one separable Gaussian per row (radius ceil(2 sigma), as torchvision's gaussian_blur with kernel size
    # 2 ceil(2 sigma) + 1), all rows in one grouped convolution padded for the largest radius
    r = math.ceil(2 * BLUR_SIGMA[1])
    k = torch.arange(-r, r + 1, dtype=torch.float32)[None]
    taps = torch.exp(-0.5 * (k / sigmas[:, None]) ** 2) * (k.abs() <= torch.ceil(2 * sigmas)[:, None])
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x)  # [b * c, 2r + 1]
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, taps[:, None, None, :], groups=b * c)
    y = F.conv2d(y, taps[:, None, :, None], groups=b * c).reshape(b, c, h, w)
    soft = (y + noise.to(x)).clamp(-1, 1)
    return torch.where(pick.to(x.device)[:, None, None, None], soft, x)


def train_steps(net: ClassifierNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, max_steps: int,
                lr: float, weight_decay: float, device: torch.device,
                on_log: Any = None, log_every: int = 50, degrade_seed: int | None = None) -> dict[str, float]:
    """Train ``net`` for ``max_steps`` steps of ``(uint8 images, labels)``: AdamW, one-cycle LR, cross-entropy.

    ``on_log(step, {"train_loss", "train_accuracy", "lr", "images_per_s"})`` is called every ``log_every``
    steps and at the last one (running means since the previous call). Returns the last logged figures.
    ``degrade_seed``: train on :func:`degrade` copies drawn from a generator with this seed (None: as they are).
    """
    degrader = torch.Generator().manual_seed(degrade_seed) if degrade_seed is not None else None
    net.train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max_steps, pct_start=0.15)
    num_classes = net.cfg.num_classes
    loss_sum = correct = seen = 0.0
    t0 = time.perf_counter()
    logs: dict[str, float] = {}
    data = iter(batches)
    for step in range(1, max_steps + 1):
        images, labels, *attrs = next(data)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"labels outside [0, {num_classes}) in a training batch "
                             f"(min {int(labels.min())}, max {int(labels.max())}): some samples are unlabelled")
        x = to_classifier_input(images.to(device), net.cfg)
        if degrader is not None:
            x = degrade(x, degrader)
        y = labels.to(device)
        features, logits = net(x)
        loss = F.cross_entropy(logits, y)
        if attrs:  # attribute heads: targets [B, heads], -1 where an attribute does not apply
            targets = attrs[0].to(device)
            for h, head_logits in enumerate(net.attribute_logits(features)):
                if (targets[:, h] >= 0).any():
                    loss = loss + F.cross_entropy(head_logits, targets[:, h], ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach()) * y.shape[0]
        correct += float((logits.detach().argmax(1) == y).sum())
        seen += y.shape[0]
        if step % log_every == 0 or step == max_steps:
            elapsed = time.perf_counter() - t0
            logs = {"train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                    "lr": sched.get_last_lr()[0], "images_per_s": seen / max(elapsed, 1e-9)}
            if on_log is not None:
                on_log(step, logs)
            loss_sum = correct = seen = 0.0
            t0 = time.perf_counter()
    return logs


@torch.no_grad()
def evaluate_accuracy(net: ClassifierNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device) -> dict[str, Any]:
    """Top-1 accuracy, mean cross-entropy and per-class accuracy of ``net`` over labelled uint8 batches."""
    net.eval().to(device)
    k = net.cfg.num_classes
    hits = torch.zeros(k, dtype=torch.float64)
    totals = torch.zeros(k, dtype=torch.float64)
    loss_sum = 0.0
    for images, labels in batches:
        keep = (labels >= 0) & (labels < k)
        if not bool(keep.all()):
            raise ValueError(f"val labels outside [0, {k}): some held-out samples are unlabelled")
        _, logits = net(to_classifier_input(images.to(device), net.cfg))
        y = labels.to(device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1).cpu()
        totals += torch.bincount(labels, minlength=k).double()
        hits += torch.bincount(labels[pred == labels], minlength=k).double()
    n = float(totals.sum())
    if n == 0:
        raise ClassifierUnavailable("the val split is empty: the evaluator's held-out accuracy cannot be measured")
    per_class = [float(h / t) if t > 0 else math.nan for h, t in zip(hits, totals)]
    return {"val_accuracy": float(hits.sum()) / n, "val_loss": loss_sum / n, "num_val": int(n),
            "per_class": per_class}


# --------------------------------------------------------------------------------------------- stage


def stage_key(cfg: PipelineConfig, ingest_manifest_sha256: str, caption_grammar: str | None = None) -> str:
    """``caption_grammar``: the ingest output's (an evaluator with attribute heads, trained robust to softness)."""
    return stable_hash(_key_doc(cfg, ingest_manifest_sha256, caption_grammar))


def key_doc(cfg: PipelineConfig, inputs: EvaluatorInputs) -> dict[str, Any]:
    """What the stage key of ``cfg`` on ``inputs`` hashes."""
    return _key_doc(cfg, inputs.ingest.manifest_sha256, inputs.ingest.caption_grammar)


def _key_doc(cfg: PipelineConfig, ingest_manifest_sha256: str, caption_grammar: str | None) -> dict[str, Any]:
    d = {"stage": STAGE, "version": VERSION, "ingest": ingest_manifest_sha256, "seed": cfg.seed,
         "classifier": to_dict(cfg.evaluate.classifier)}
    if _grammar(caption_grammar):
        d["robust"] = ROBUST_VERSION
    return d


def _grammar(caption_grammar: str | None) -> str | None:
    return caption_grammar if caption_grammar in CAPTION_GRAMMARS else None


def load_output(out_dir: Path) -> EvaluatorOutput | None:
    """The stage output if ``out_dir`` holds a complete, verified result; None otherwise."""
    return load_weights_ref(out_dir / SUCCESS, EvaluatorOutput)


def skip_reason(cfg: PipelineConfig, inputs: EvaluatorInputs) -> str | None:
    """Why this stage has nothing to do for ``cfg`` (its output is then None), or None when it applies."""
    if cfg.evaluate.extractor != "classifier":
        return f"not used: evaluate.extractor={cfg.evaluate.extractor}"
    return classifier_unavailable_reason(inputs.ingest.num_classes, cfg.data.source)


def cached(cfg: PipelineConfig, inputs: EvaluatorInputs) -> EvaluatorOutput | None:
    """The complete output for ``cfg`` if it exists (None otherwise, also for unlabelled data)."""
    if inputs.ingest.num_classes < 2:
        return None
    return load_output(stage_dir(cfg.run.root, STAGE, stage_key(cfg, inputs.ingest.manifest_sha256,
                                                                  inputs.ingest.caption_grammar)))


def run(cfg: PipelineConfig, inputs: EvaluatorInputs, *, force: bool = False, parent_run_id: str | None = None
        ) -> EvaluatorOutput:
    """Train (or reuse) the evaluator classifier for ``cfg`` on the ingest output in ``inputs``.

    Raises :class:`ClassifierUnavailable` at once for unlabelled or single-class data.
    """
    ingest = inputs.ingest
    why = classifier_unavailable_reason(ingest.num_classes, cfg.data.source)
    if why:
        raise ClassifierUnavailable(why)
    doc = key_doc(cfg, inputs)
    key = stable_hash(doc)
    out_dir = stage_dir(cfg.run.root, STAGE, key)
    return cached_run(out_dir, key, lambda: load_output(out_dir),
                      lambda: _train(cfg, parent_run_id, ingest, key, out_dir), force=force, key_doc=doc)


def _train(cfg: PipelineConfig, parent_run_id: str | None, ingest: Any, key: str, out_dir: Path) -> EvaluatorOutput:
    from infra.console import Progress
    from infra.shards import ShardSet
    from infra.stream import TrainStream, iter_eval_batches
    from infra.tracking import Tracker

    c = cfg.evaluate.classifier
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / SUCCESS
    if marker.exists():
        marker.unlink()  # a forced rerun: the old output stops being valid before anything is rewritten
    shards = ShardSet.from_output(ingest)
    name = extractor_name(cfg.data.source, cfg.data.path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grammar = _grammar(ingest.caption_grammar)
    heads = attribute_heads(grammar) if grammar else ()
    net_cfg = ClassifierNetConfig(in_channels=ingest.channels, image_size=ingest.image_size,
                                  num_classes=ingest.num_classes, width=c.width,
                                  attribute_heads=tuple(n for _, n in heads))
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    srun = tracker.stage_run(STAGE, key, params={"classifier": to_dict(c), "seed": cfg.seed,
                                                 "extractor_name": name, "num_classes": ingest.num_classes,
                                                 "image_size": ingest.image_size, "channels": ingest.channels},
                             tags={"mqgen.ingest_manifest_sha256": ingest.manifest_sha256,
                                   "mqgen.ingest_run_id": ingest.mlflow_run_id},
                             parent_run_id=parent_run_id)
    with srun:
        t0 = time.perf_counter()
        torch.manual_seed(purpose_seed(cfg.seed, STAGE))
        net = ClassifierNet(net_cfg)
        stream = TrainStream([(s.path, s.num_samples) for s in shards.shards("train")], rank=0, world_size=1,
                             batch_size=c.batch_size, channels=ingest.channels, seed=purpose_seed(cfg.seed, STAGE),
                             targets=(lambda caps: attribute_targets(grammar, caps)) if grammar else None)
        progress = Progress(STAGE, c.max_steps)
        first_step = srun.last_step("train_loss") + 1  # a rerun under the same key logs after the old points

        def on_log(step: int, logs: dict[str, float]) -> None:
            srun.log_metrics(logs, step=first_step + step)
            progress.update(step, loss=logs["train_loss"], acc=logs["train_accuracy"], img_s=logs["images_per_s"])

        train_logs = train_steps(net, stream, max_steps=c.max_steps, lr=c.lr, weight_decay=c.weight_decay,
                                 device=device, on_log=on_log, log_every=max(1, min(50, c.max_steps // 20)),
                                 degrade_seed=purpose_seed(cfg.seed, f"{STAGE}-degrade") if grammar else None)
        train_seconds = time.perf_counter() - t0
        val_shards = [(s.path, s.num_samples) for s in shards.shards("val")]
        val = evaluate_accuracy(net, ((x, y) for x, y, _ in iter_eval_batches(val_shards, 500, ingest.channels,
                                                                              limit=c.num_val_images)), device)
        classes = shards.classes
        per_class = {classes[i] if i < len(classes) else str(i): (None if math.isnan(a) else a)  # None: no val image
                     for i, a in enumerate(val["per_class"])}
        metrics = {"val_accuracy": val["val_accuracy"], "val_loss": val["val_loss"],
                   "train_loss": train_logs.get("train_loss", math.nan),
                   "train_accuracy": train_logs.get("train_accuracy", math.nan), "train_seconds": train_seconds}
        if grammar:  # the alignment of real val images with their own captions: what samples can reach
            batches = list(iter_eval_batches(val_shards, 500, ingest.channels, limit=c.num_val_images,
                                             with_captions=True))
            align = caption_alignment(net.to(device).eval(), torch.cat([b[0] for b in batches]),
                                      [cap for b in batches for cap in b[3]], grammar)
            metrics.update({f"val_{k}": v for k, v in align.items()})
        weights = out_dir / WEIGHTS
        sha = save_classifier(net.cpu(), weights, meta={"stage": STAGE, "key": key, "extractor_name": name,
                                                        "source": cfg.data.source, "classes": classes,
                                                        "val_accuracy": val["val_accuracy"], "step": c.max_steps})
        atomic_write_json(out_dir / "val_per_class.json", {"val_accuracy": val["val_accuracy"],
                                                           "num_val": val["num_val"], "per_class": per_class})
        ref = EvaluatorOutput(path=str(out_dir), key=key, weights=str(weights), sha256=sha, extractor_name=name,
                              num_classes=ingest.num_classes, val_accuracy=val["val_accuracy"],
                              image_size=ingest.image_size, channels=ingest.channels, mlflow_run_id=srun.run_id,
                              source=cfg.data.source, step=c.max_steps, num_val=val["num_val"], classes=classes,
                              metrics=metrics, caption_grammar=grammar)
        final_step = first_step + c.max_steps
        srun.log_metrics({"val_accuracy": val["val_accuracy"], "val_loss": val["val_loss"],
                          "num_val": float(val["num_val"]), "train_seconds": train_seconds,
                          **{k: v for k, v in metrics.items() if k.startswith("val_caption")}}, step=final_step)
        srun.log_metrics({f"val_accuracy_class_{i}": a for i, a in enumerate(val["per_class"])
                          if not math.isnan(a)}, step=final_step)
        srun.log_artifact(weights, "model")
        srun.log_artifact(out_dir / "val_per_class.json")
        srun.set_tags({"mqgen.weights_sha256": sha, "mqgen.extractor_name": name})
        atomic_write_json(marker, ref.to_dict())
    log.info("%s %s: %s, val accuracy %.4f on %d images, %.0f s -> %s", STAGE, key, name, val["val_accuracy"],
             val["num_val"], train_seconds, out_dir)
    return ref


__getattr__ = lazy_stage_task(__name__, "train_evaluator_task", run, name=STAGE)
