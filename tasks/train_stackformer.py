"""train_stackformer stage: the Stackformer (or the full-grid baseline), trained with Ray Train on token LMDB.

``run(cfg, inputs: StackformerInputs, *, force=False)`` is the stage (testable without Prefect);
``train_stackformer_task`` wraps it.

How a run goes:

1. Take the inputs the flow resolved (the tokenize output and the tokenizer that made it) and check, before
   anything starts, that the token databases fit that tokenizer: codebook size, latent grid, sequence length,
   labels and its weights (:func:`plan`). A mismatch raises here, naming the field.
2. The stage key hashes :data:`VERSION`, the stackformer section, the seed and the tokenize output's
   checksum; a complete output for the key (``_SUCCESS.json`` whose weights verify) is a cache hit.
3. Ray Train runs :func:`train_loop` on every worker: each reads its ``DistributedSampler`` share of the
   train split (shuffled per epoch, deterministic given the seed) through the LMDB reader, and
   :class:`StackformerTrainer` takes the steps (AdamW with decay on Linear weights only, warmup + cosine,
   gradient clipping, bf16 autocast on CUDA). Rank 0 validates on the val split (code CE, position CE, bits
   per image, and the share of sampled positions that come out in raster order), decodes sampled sequences
   with the tokenizer into an image grid, and logs everything to MLflow. Verified checkpoints are reported to
   Ray; a restarted worker group (``ray.max_failures``) or a rerun of the stage resumes from the newest one,
   at the same step and the same place in the data order.
4. The final weights (safetensors) and model config are written to the stage directory, logged to MLflow,
   and ``_SUCCESS.json`` is written last.

``stackformer.model=fullgrid`` trains :class:`~models.stackformer.FullGridTransformer` on a
``tokenizer.keep_ratio=1.0`` tokenisation through the same code, data reader, optimiser and budget.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from infra.config import (
    PipelineConfig,
    TextShape,
    from_dict,
    fullgrid_config,
    identity,
    sampling_params,
    stable_hash,
    stackformer_config,
    to_dict,
)
from infra.orchestration import lazy_stage_task
from infra.refs import (
    StackformerInputs,
    StackformerOutput,
    TokenizeOutput,
    TokenizerOutput,
    at_configured_encoder,
    frozen_text_encoder,
    load_tokenizer,
    new_generator,
)
from infra.storage import atomic_copy, atomic_write_json, cached_run, load_weights_ref, stage_dir
from infra.tokens import TokenDataset, TokenFormatError
from infra.training import StepEvent, Throughput, TrainClock, autocast, warmup_cosine
from models.stackformer import (
    FullGridTransformer,
    SamplingParams,
    Stackformer,
    sort_by_position,
)
from models.transformer import param_groups

STAGE = "train_stackformer"
VERSION = "1"  # bump when the training code changes what a given config produces
SUCCESS = "_SUCCESS.json"
ADAMW_BETAS = (0.9, 0.95)  # spec section 6 (released configs)
TransformerModel = Stackformer | FullGridTransformer


def new_model(kind: str, model_config: dict[str, Any], text_encoder: Any = None) -> TransformerModel:
    """A freshly initialised model of ``kind`` from its config fields (draws from the global torch RNG);
    ``text_encoder``: the frozen pretrained encoder of a config with ``text_width > 0``."""
    return new_generator(kind, model_config, text_encoder)


def own_num_params(kind: str, model_config: dict[str, Any]) -> int:
    """The parameters the generator trains and saves (a frozen text encoder's are not among them), counted on
    the meta device: no memory, no initialisation, no encoder loaded."""
    from types import SimpleNamespace

    width = int(model_config.get("text_width", 0))
    stand_in = SimpleNamespace(width=width, module=torch.nn.Module()) if width else None  # shapes only
    with torch.device("meta"):
        return sum(t.numel() for t in new_model(kind, model_config, stand_in).parameters())


# --------------------------------------------------------------------------------------------- data


class Batch(NamedTuple):
    """One batch on the training device: ``codes``/``positions`` ``[B, L]`` long (raster order), ``labels``
    ``[B]`` long for a class-conditional model (else None), ``index`` ``[B]``: the records' dataset
    indices."""

    codes: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor
    text: torch.Tensor | None = None  # [B, text_len] caption ids for a text-conditional model


def to_batch(items: dict[str, torch.Tensor], device: torch.device, conditional: bool, text: bool = False) -> Batch:
    """A collated reader batch -> :class:`Batch` on ``device`` (labels kept only for a class-conditional model,
    caption ids only for a text-conditional one)."""
    labels = None
    if text:
        codes = items["codes"].to(device, non_blocking=True)
        return Batch(codes, items["positions"].to(device, non_blocking=True), None, items["index"],
                     items["text"].to(device, non_blocking=True))
    if conditional:
        labels = items["label"]
        if (labels < 0).any():
            raise TokenFormatError("a class-conditional model got a record without a label (label -1); "
                                   "train it unconditionally (stackformer.conditional=false)")
        labels = labels.to(device, non_blocking=True)
    codes = items["codes"].to(device, non_blocking=True)
    return Batch(codes, items["positions"].to(device, non_blocking=True), labels, items["index"])


class IndexedTokens(Dataset):
    """A :class:`~infra.tokens.TokenDataset` whose items also carry ``"index"`` (their dataset index), so the
    training loop can log and check the data order. Reads whole batches in one LMDB transaction."""

    def __init__(self, base: TokenDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        items = self.base.__getitems__(indices)
        for i, item in zip(indices, items):
            item["index"] = torch.tensor(i, dtype=torch.long)
        return items

    def close(self) -> None:
        self.base.close()


class _EpochWindow(Sampler[int]):
    """The :class:`DistributedSampler` order of one epoch from a given offset (resume skips batches by
    slicing the index order, without reading them)."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.start:])

    def __len__(self) -> int:
        return len(self.sampler) - self.start


class TrainBatches:
    """Endless training batches of one rank, positioned by the global step.

    Epoch ``e`` is the rank's :class:`DistributedSampler` share (``shuffle=True``, ``seed``, ``set_epoch(e)``;
    the split is padded by repetition to a multiple of the world size) cut into ``batch_size`` batches, the
    last partial batch dropped, so every rank takes ``steps_per_epoch`` steps per epoch. Step ``n`` reads
    batch ``n % steps_per_epoch`` of epoch ``n // steps_per_epoch``: a run resumed at step ``n`` continues
    the data order exactly where an uninterrupted run would be.
    """

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed)
        self.batch_size = batch_size
        self.steps_per_epoch = len(self.sampler) // batch_size
        if self.steps_per_epoch < 1:
            records = len(self.sampler.dataset)  # type: ignore[arg-type]
            raise ValueError(f"the train split has {records} records: {len(self.sampler)} per worker, fewer "
                             f"than one batch of {batch_size}; lower stackformer.batch_size or "
                             "ray.num_workers")
        self._window = _EpochWindow(self.sampler)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self._window, drop_last=True,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 pin_memory=pin_memory)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within the epoch)`` that step ``step`` reads."""
        return divmod(step, self.steps_per_epoch)

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        """The dataset indices of every batch of ``epoch``, in order (what the loader will read)."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.steps_per_epoch)]

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(epoch, batch)`` for steps ``start_step``, ``start_step + 1``, ... forever."""
        step = start_step
        while True:
            epoch, batch_in_epoch = self.position(step)
            self._window.set_position(epoch, batch_in_epoch * self.batch_size)
            for items in self.loader:
                yield epoch, items
                step += 1


# --------------------------------------------------------------------------------------------- one step


class StackformerTrainer:
    """The optimisation logic of one step (no Ray, no I/O), shared by the stage and the benchmarks.

    AdamW (betas :data:`ADAMW_BETAS`) with ``weight_decay`` on Linear weights only, a warmup + cosine
    schedule that is a pure function of the step (nothing to restore on resume), gradient-norm clipping
    (``grad_clip`` 0 = off) and bf16 autocast on CUDA. Works for :class:`Stackformer` and
    :class:`FullGridTransformer` alike.
    """

    def __init__(self, model: TransformerModel, *, lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, grad_clip: float, device: torch.device, ddp_model: nn.Module | None = None):
        self.model, self.device = model, device
        self.forward_model = ddp_model if ddp_model is not None else model
        self.is_stackformer = isinstance(model, Stackformer)
        self.base_lr, self.warmup_steps, self.max_steps = lr, warmup_steps, max_steps
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAMW_BETAS,
                                     fused=device.type == "cuda")

    def lr_at(self, step: int) -> float:
        return self.base_lr * warmup_cosine(step, self.warmup_steps, self.max_steps)

    def losses(self, batch: Batch, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced mean losses of ``batch``: ``loss`` and ``code_loss`` (+ ``pos_loss``)."""
        m = self.forward_model if model is None else model
        if self.is_stackformer:
            out = m(batch.codes, batch.positions, batch.labels, text=batch.text)
            return {"loss": out.loss, "code_loss": out.code_loss, "pos_loss": out.pos_loss}
        out = m(batch.codes, batch.labels, text=batch.text)
        return {"loss": out.loss, "code_loss": out.loss}

    def step(self, batch: Batch, step: int) -> dict[str, torch.Tensor | float]:
        """One optimiser step at global step ``step``; returns detached logs.

        The losses and the gradient norm stay tensors (no device synchronisation); ``float()`` them when
        logging.
        """
        self.model.train()
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with autocast(self.device):
            losses = self.losses(batch)
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.opt.step()
        return {**{k: v.detach() for k, v in losses.items()}, "grad_norm": grad_norm.detach(), "lr": lr}

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validate(model: TransformerModel, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Validation figures of ``model`` (in eval mode) over ``batches``.

    ``val_code_ce`` / ``val_pos_ce``: mean cross-entropy per token (nats; positions only for the Stackformer);
    ``val_bits_per_image``: the summed cross-entropy of a whole sequence in bits, codes plus positions (what
    the model needs to describe one image); split into ``val_code_bits_per_image`` /
    ``val_pos_bits_per_image``.
    """
    was_training = model.training
    model.eval()
    is_stackformer = isinstance(model, Stackformer)
    code_nll = pos_nll = 0.0
    images = tokens = 0
    for b in batches:
        with autocast(device):
            if is_stackformer:
                out = model(b.codes, b.positions, b.labels, text=b.text)
                code_logits = out.code_logits
                pos_nll += float(F.cross_entropy(out.pos_logits.float().flatten(0, 1), b.positions.flatten(),
                                                 reduction="sum"))
            else:
                code_logits = model(b.codes, b.labels, text=b.text).logits
        code_nll += float(F.cross_entropy(code_logits.float().flatten(0, 1), b.codes.flatten(),
                                          reduction="sum"))
        images += b.codes.shape[0]
        tokens += b.codes.numel()
    model.train(was_training)
    if images == 0:
        raise ValueError("validation set is empty")
    ln2 = math.log(2.0)
    metrics = {"val_code_ce": code_nll / tokens, "val_code_bits_per_image": code_nll / images / ln2,
               "val_bits_per_image": (code_nll + pos_nll) / images / ln2, "val_images": float(images)}
    if is_stackformer:
        metrics.update(val_pos_ce=pos_nll / tokens, val_pos_bits_per_image=pos_nll / images / ln2)
    return metrics


def raster_share(positions: torch.Tensor) -> float:
    """Share of consecutive sampled positions (``[B, N]``, in sampling order) that increase (1.0: raster)."""
    if positions.shape[1] < 2:
        return 1.0
    return float((positions[:, 1:] > positions[:, :-1]).double().mean())


@torch.no_grad()
def sample_sequences(model: TransformerModel, num: int, *, num_classes: int, code_params: SamplingParams,
                     pos_params: SamplingParams, generator: torch.Generator | None = None,
                     text: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """Sample ``num`` sequences (eval mode, free position order: ``raster_order=False``).

    Class-conditional models get labels ``0, 1, ..., num_classes - 1, 0, ...``; text-conditional ones the
    caption ids ``text`` ``[num, text_len]``. Returns codes and positions
    ``[num, N]`` sorted into raster order (ready to decode), the labels, and the raster share of the
    positions as sampled (None for the full-grid model, whose order is fixed).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = torch.arange(num, device=device) % num_classes if num_classes else None
    try:
        if isinstance(model, Stackformer):
            codes, positions = model.sample(num, labels, code_params, pos_params, raster_order=False,
                                            generator=generator, text=text)
            share = raster_share(positions)
            codes, positions = sort_by_position(codes, positions)
            return codes, positions, labels, share
        codes = model.sample(num, labels, code_params, generator=generator, text=text)
        positions = torch.arange(codes.shape[1], device=device).expand_as(codes)
        return codes, positions, labels, None
    finally:
        model.train(was_training)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (global seed, stage, purpose, rank, step, ...)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TrainPlan:
    """Everything the workers need to know about the model and the data, checked before training starts."""

    model: str  # "stackformer" | "fullgrid"
    model_config: dict[str, Any]
    num_classes: int  # the model's (0 = unconditional)
    data_num_classes: int  # the token databases' label count
    codebook_size: int
    grid_size: int
    seq_len: int  # tokens per image
    tokenizer_sha256: str
    train_db: str
    val_db: str
    num_train: int
    num_val: int
    world_size: int
    local_batch: int
    steps_per_epoch: int
    text_len: int = 0  # caption ids per record the model reads (0: not text-conditional)
    text_encoder: str = ""  # a frozen pretrained encoder's folder (text.pretrained), and its digest
    text_encoder_digest: str = ""

    def open(self, split: str) -> TokenDataset:
        """The split's reader; refuses a database that no longer matches the plan."""
        return TokenDataset(self.train_db if split == "train" else self.val_db,
                            expect_codebook_size=self.codebook_size, expect_grid_size=self.grid_size,
                            expect_seq_len=self.seq_len, expect_tokenizer_sha256=self.tokenizer_sha256,
                            expect_num_classes=self.data_num_classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(cfg: PipelineConfig, tokens: TokenizeOutput, tokenizer: TokenizerOutput) -> TrainPlan:
    """Check the token databases against the trained tokenizer they came from and size the run; raises before
    training.

    :class:`~infra.tokens.TokenFormatError` names every field (codebook size, grid, sequence length) where a
    database differs from the tokenizer; ``ValueError`` covers the tokenizer and the batch layout.
    """
    s = cfg.stackformer
    # the full-grid baseline reads every cell, so it needs a tokenizer that keeps them all (keep_ratio 1.0)
    seq_len = tokenizer.grid_size ** 2 if s.model == "fullgrid" else tokenizer.seq_len
    metas = {}
    for split in ("train", "val"):
        try:
            ds = TokenDataset(tokens.db(split), expect_codebook_size=tokenizer.codebook_size,
                              expect_grid_size=tokenizer.grid_size, expect_seq_len=seq_len)
        except TokenFormatError as e:
            raise TokenFormatError(f"{STAGE} ({s.model}, on the tokenizer {tokenizer.key}): {e}") from e
        metas[split] = ds.meta
    train, val = metas["train"], metas["val"]
    if val.num_classes != train.num_classes or val.tokenizer_sha256 != train.tokenizer_sha256:
        raise TokenFormatError(f"{STAGE}: the train and val token databases disagree (num_classes "
                               f"{train.num_classes} vs {val.num_classes}, tokenizer "
                               f"{train.tokenizer_sha256[:12]} vs {val.tokenizer_sha256[:12]}); rerun the "
                               "tokenize stage")
    if train.tokenizer_sha256 != tokenizer.sha256:
        raise ValueError(f"{STAGE}: the token databases were made by the tokenizer with weights sha256 "
                         f"{train.tokenizer_sha256[:12]}, but the upstream train_tokenizer output is "
                         f"{tokenizer.sha256[:12]} ({tokenizer.weights}); rerun the tokenize stage with it")
    if train.num_records < 1 or val.num_records < 1:
        raise ValueError(f"{STAGE}: empty token split (train {train.num_records}, val {val.num_records} "
                         "records)")
    world = cfg.ray.num_workers
    if s.batch_size % world:
        raise ValueError(f"stackformer.batch_size={s.batch_size} must be divisible by "
                         f"ray.num_workers={world} (it is the global batch, split evenly over the workers)")
    local_batch = s.batch_size // world
    per_worker = -(-train.num_records // world)  # DistributedSampler pads to a multiple of the world size
    if per_worker < local_batch:
        raise ValueError(f"{STAGE}: the train split has {train.num_records} records, {per_worker} per "
                         f"worker: fewer than one batch of {local_batch}; lower stackformer.batch_size or "
                         "ray.num_workers")
    # The vocabulary and the sequence come from the tokenizer that made the tokens (checked against the
    # databases above), the network from the stackformer section.
    build = stackformer_config if s.model == "stackformer" else fullgrid_config
    if val.text_tokenizer_sha256 != train.text_tokenizer_sha256:
        raise TokenFormatError(f"{STAGE}: the train and val token databases hold ids of different caption "
                               "tokenizers; rerun the tokenize stage")
    text = TextShape(train.text_len, train.text_vocab_size, cfg.text.n_layer) if train.text_len else None
    if text is not None and tokens.text_encoder and s.conditional:  # ids of a pretrained tokenizer: its encoder
        encoder = frozen_text_encoder(tokens.text_encoder, tokens.text_encoder_digest)
        if train.text_vocab_size - 1 > encoder.vocab_size:
            raise TokenFormatError(f"{STAGE}: the caption ids reach {train.text_vocab_size - 1}, beyond the "
                                   f"{encoder.vocab_size} embeddings of the text encoder {tokens.text_encoder}: its "
                                   "tokenizer.json and weights do not belong together")
        text = replace(text, width=encoder.width)
    model_cfg = build(s, tokenizer, num_classes=train.num_classes, text=text)
    return TrainPlan(model=s.model, model_config=asdict(model_cfg), num_classes=model_cfg.num_classes,
                     data_num_classes=train.num_classes, codebook_size=tokenizer.codebook_size,
                     grid_size=tokenizer.grid_size, seq_len=tokenizer.seq_len, tokenizer_sha256=train.tokenizer_sha256,
                     train_db=tokens.db("train"), val_db=tokens.db("val"), num_train=train.num_records,
                     num_val=val.num_records, world_size=world, local_batch=local_batch,
                     steps_per_epoch=per_worker // local_batch,
                     text_len=int(model_cfg.text_len) if model_cfg.has_text else 0,
                     text_encoder=tokens.text_encoder if model_cfg.text_width else "",
                     text_encoder_digest=tokens.text_encoder_digest if model_cfg.text_width else "")


# --------------------------------------------------------------------------------------------- Ray loop


@dataclass(frozen=True, kw_only=True)
class StackformerLoop:
    """Everything a Ray Train worker of this stage needs, built and checked once by :func:`run` (Ray pickles it
    to the workers as it is; ``to_dict``/``from_dict`` round-trip it through plain JSON data)."""

    cfg: PipelineConfig
    plan: TrainPlan
    tokenizer: TokenizerOutput  # decodes the samples logged at each evaluation
    key: str
    tracking_uri: str
    mlflow_run_id: str
    metric_step_offset: int
    progress_file: str
    log_every: int = 20
    on_step: Callable[[StepEvent], None] | None = None  # called after every step on every rank (tests)

    def to_dict(self) -> dict[str, Any]:
        return {"cfg": self.cfg.to_dict(), "plan": self.plan.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                "key": self.key, "tracking_uri": self.tracking_uri, "mlflow_run_id": self.mlflow_run_id,
                "metric_step_offset": self.metric_step_offset, "progress_file": self.progress_file,
                "log_every": self.log_every}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, on_step: Callable[[StepEvent], None] | None = None) -> StackformerLoop:
        """The loop :meth:`to_dict` wrote (plain JSON data), with the test callback ``on_step`` if any."""
        return cls(**{**d, "cfg": from_dict(PipelineConfig, d["cfg"]), "plan": TrainPlan(**d["plan"]),
                      "tokenizer": TokenizerOutput.from_dict(d["tokenizer"]), "on_step": on_step})


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: everything it needs arrives as one :class:`StackformerLoop` (``config["loop"]``)."""
    from infra import ray as rayx
    from infra.checkpoint import write_checkpoint
    from infra.console import Progress
    from infra.viz import grid

    lc: StackformerLoop = config["loop"]
    cfg = lc.cfg
    s = cfg.stackformer
    p = lc.plan
    w = rayx.worker()
    if w.world_size != p.world_size:
        raise RuntimeError(f"{STAGE}: planned for {p.world_size} workers, running on {w.world_size}")
    encoder = frozen_text_encoder(p.text_encoder, p.text_encoder_digest)  # loaded before seeding: no RNG effect
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    model = new_model(p.model, p.model_config, encoder).to(w.device)
    restored = w.restore()
    start_step = 0
    if restored is not None:
        model.load_state_dict(restored.weights["model"], strict=True)
        start_step = restored.step
    ddp_model = w.prepare_model(model) if w.world_size > 1 else None
    trainer = StackformerTrainer(model, lr=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps,
                                 max_steps=s.max_steps, grad_clip=s.grad_clip, device=w.device,
                                 ddp_model=ddp_model)
    if restored is not None:
        trainer.load_state_dict(restored.state["trainer"])
    conditional = p.num_classes > 0
    has_text = p.text_len > 0
    data = TrainBatches(IndexedTokens(p.open("train")), rank=w.rank, world_size=w.world_size,
                        batch_size=p.local_batch, seed=cfg.seed, num_workers=s.num_loader_workers,
                        pin_memory=w.device.type == "cuda")

    val_ds: TokenDataset | None = None
    decoder = None
    code_params, pos_params = sampling_params(cfg.evaluate.sampling)
    run = w.stage_run(cfg, STAGE, lc, restored)
    if run is not None:
        if restored is not None:
            was = restored.state.get("data", {}).get("world_size", w.world_size)
            if was != w.world_size:  # same steps and epochs, but each epoch's order is cut differently
                run.set_tags({"mqgen.resumed_world_size": f"{was} -> {w.world_size}"})
        val_ds = p.open("val")
        if s.num_eval_samples:
            decoder = load_tokenizer(lc.tokenizer, w.device)
    num_val = p.num_val if s.num_eval_records is None else min(p.num_val, s.num_eval_records)

    def val_batches() -> Iterator[Batch]:
        assert val_ds is not None
        loader = DataLoader(IndexedTokens(val_ds), batch_size=p.local_batch, sampler=range(num_val))
        for items in loader:
            yield to_batch(items, w.device, conditional, has_text)

    progress = Progress(STAGE, s.max_steps, start=start_step, file=lc.progress_file, enabled=w.is_main)
    clock = TrainClock(restored.state if restored is not None else None)
    speed = Throughput()
    step = start_step
    logs: dict[str, float] = {}
    batches = data.iterate(start_step)
    while step < s.max_steps:
        epoch, items = next(batches)
        batch = to_batch(items, w.device, conditional, has_text)
        # Dropout draws from a seed of (seed, rank, step): a resumed run repeats an uninterrupted one exactly.
        torch.manual_seed(derive_seed(cfg.seed, STAGE, "train", w.rank, step))
        raw = trainer.step(batch, step)
        step += 1
        speed.add(batch.codes.numel() * w.world_size)
        is_log = step % lc.log_every == 0 or step == s.max_steps
        is_eval = step % s.eval_every == 0 or step == s.max_steps
        is_ckpt = step % s.checkpoint_every == 0 or step == s.max_steps
        if is_log or is_ckpt:
            logs = {k: float(v) for k, v in raw.items()}
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"{STAGE}: the training loss is {logs['loss']} at step {step} "
                                         f"(rank {w.rank}); lower stackformer.lr or raise "
                                         "stackformer.warmup_steps")
        if w.is_main and is_log:
            rate = speed.rate()
            assert run is not None
            run.log_metrics({**{f"train_{k}": v for k, v in logs.items() if k != "lr"}, "lr": logs["lr"],
                             "tokens_per_s": rate, "epoch": epoch}, step=step)
            progress.update(step, loss=logs["loss"], tok_s=rate)
        metrics: dict[str, float] = {"step": step, "epoch": epoch, **logs, TrainClock.STATE_KEY: clock()}
        if is_eval and w.is_main:
            assert run is not None
            vals = validate(model, val_batches(), w.device)
            if decoder is not None:
                gen = torch.Generator(device=w.device)
                gen.manual_seed(derive_seed(cfg.seed, STAGE, "samples", step))
                prompts = None
                if has_text:  # the first val records' captions
                    assert val_ds is not None
                    prompts = torch.stack([val_ds[i]["text"] for i in range(min(s.num_eval_samples, len(val_ds)))])
                    prompts = prompts[torch.arange(s.num_eval_samples) % len(prompts)].to(w.device)
                codes, positions, _, share = sample_sequences(
                    model, s.num_eval_samples, num_classes=p.num_classes, code_params=code_params,
                    pos_params=pos_params, generator=gen, text=prompts)
                if share is not None:
                    vals["val_sample_raster_share"] = share
                with torch.no_grad():
                    images = decoder.decode(codes, positions).float()
                nrow = p.num_classes if 0 < p.num_classes <= 16 else 8
                run.log_image(grid(images, nrow=min(nrow, s.num_eval_samples), scale=2),
                              f"samples/step_{step:08d}.png")
            metrics.update(vals)
            run.log_metrics(vals, step=step)
        if is_ckpt:
            ckpt_dir = None
            if w.is_main:
                epoch_next, batch_next = data.position(step)
                ckpt_dir = rayx.scratch_dir()
                write_checkpoint(ckpt_dir, step, {"model": model.state_dict()},
                                 {"trainer": trainer.state_dict(),
                                  "data": {"epoch": epoch_next, "batch_in_epoch": batch_next,
                                           "steps_per_epoch": data.steps_per_epoch,
                                           "local_batch": p.local_batch, "world_size": w.world_size},
                                  TrainClock.STATE_KEY: metrics[TrainClock.STATE_KEY]},
                                 meta={"stage": STAGE, "key": lc.key, "model": p.model,
                                       "model_config": p.model_config, "metrics": metrics})
            w.report(metrics, checkpoint_dir=ckpt_dir)
        if is_eval or is_ckpt:
            speed = Throughput()  # tokens/s measures training steps, not evaluation or checkpointing
        if lc.on_step is not None:
            lc.on_step(StepEvent(step=step, rank=w.rank, epoch=epoch, indices=tuple(batch.index.tolist())))
    batches.close()  # releases the loader (and its worker processes, if any)
    divergence = w.weight_divergence(model)  # a collective: every rank calls it
    if w.is_main and run is not None:
        run.log_metrics({"final_step": step, "rank_weight_divergence": divergence}, step=step)
        run.flush()  # metrics waiting for an unreachable tracking server: sent before the worker goes


# --------------------------------------------------------------------------------------------- stage


def stage_key(cfg: PipelineConfig, tokens: Any) -> str:
    """Hash of the stage, :data:`VERSION`, the stackformer section, the seed and the tokenize output (and the text
    encoder's depth when the tokens carry captions)."""
    return stable_hash(_key_doc(cfg, tokens))


def key_doc(cfg: PipelineConfig, inputs: StackformerInputs) -> dict[str, Any]:
    """What the stage key of ``cfg`` on ``inputs`` hashes."""
    return _key_doc(cfg, inputs.tokenize)


def _key_doc(cfg: PipelineConfig, tokens: Any) -> dict[str, Any]:
    d = {"stage": STAGE, "version": VERSION,
         "stackformer": identity("stackformer", to_dict(cfg.stackformer)),  # added fields at default: out
         "seed": cfg.seed, "tokenize": tokens.checksum, "tokenize_key": tokens.key}
    if getattr(tokens, "text_len", 0) and cfg.stackformer.conditional and not getattr(tokens, "text_encoder", ""):
        d["text_n_layer"] = cfg.text.n_layer  # the trained encoder's depth (a pretrained one is in the tokens' key)
    return d


def load_output(out_dir: Path) -> StackformerOutput | None:
    """The stage output if ``out_dir`` holds a complete, verified result; None otherwise."""
    return load_weights_ref(out_dir / SUCCESS, StackformerOutput)


def cached(cfg: PipelineConfig, inputs: StackformerInputs) -> StackformerOutput | None:
    """The complete output for ``cfg`` on ``inputs`` if it exists (no computation), else None."""
    out_dir = stage_dir(cfg.run.root, STAGE, stage_key(cfg, inputs.tokenize))
    return at_configured_encoder(load_output(out_dir), cfg.text.pretrained)


def run(cfg: PipelineConfig, inputs: StackformerInputs, *, force: bool = False, parent_run_id: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None) -> StackformerOutput:
    """Train (or resume, or reuse) the Stackformer / full-grid baseline for ``cfg`` on the tokenize output.

    ``force=True`` trains from scratch under a new Ray run name. ``on_step(event)`` runs in every training
    worker after every step (a seam for tests: faults, recording the data order).
    """
    p = plan(cfg, inputs.tokenize, inputs.train_tokenizer)  # every data/model check happens before any training
    doc = key_doc(cfg, inputs)
    key = stable_hash(doc)
    out_dir = stage_dir(cfg.run.root, STAGE, key)
    return cached_run(out_dir, key, lambda: at_configured_encoder(load_output(out_dir), cfg.text.pretrained),
                      lambda: _train(cfg, inputs, p, key, out_dir, force, parent_run_id, on_step), force=force,
                      key_doc=doc)


def _train(cfg: PipelineConfig, inputs: StackformerInputs, p: TrainPlan, key: str, out_dir: Path, force: bool,
           parent_run_id: str | None, on_step: Callable[[StepEvent], None] | None) -> StackformerOutput:
    from infra import ray as rayx
    from infra.console import watch_progress
    from infra.registry import register_trained
    from infra.tracking import Tracker, open_training_attempt
    from infra.training import export_final_weights

    tokens, tokenizer = inputs.tokenize, inputs.train_tokenizer
    s = cfg.stackformer
    num_params = own_num_params(p.model, p.model_config)
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    srun, ray_name, step_offset = open_training_attempt(
        tracker, STAGE, key, out_dir, force=force, done=load_output(out_dir) is not None, success_name=SUCCESS,
        params={"stackformer": to_dict(s), "seed": cfg.seed, "model": p.model, "model_config": p.model_config,
                "num_params": num_params, "num_classes": p.num_classes, "tokens_per_image": p.seq_len,
                "num_train": p.num_train, "num_val": p.num_val, "tokenize_key": tokens.key,
                "tokens_checksum": tokens.checksum, "tokenizer_sha256": p.tokenizer_sha256},
        tags={"mqgen.tokenize_run_id": tokens.mlflow_run_id,
              "mqgen.tokenizer_run_id": tokenizer.mlflow_run_id,
              "mqgen.num_workers": p.world_size, "mqgen.local_batch": p.local_batch,
              "mqgen.sampling": json.dumps(to_dict(cfg.evaluate.sampling), sort_keys=True)},
        parent_run_id=parent_run_id)
    loop = StackformerLoop(cfg=cfg, plan=p, tokenizer=tokenizer, key=key, tracking_uri=tracker.uri,
                           mlflow_run_id=srun.run_id, metric_step_offset=step_offset,
                           log_every=max(1, min(50, s.max_steps // 20)),
                           progress_file=str(out_dir / "progress.json"), on_step=on_step)
    with srun:  # the run ends FAILED on an error (KILLED on Ctrl-C / SIGTERM), FINISHED otherwise
        with watch_progress(out_dir / "progress.json", STAGE):
            result = rayx.fit(train_loop, {"loop": loop}, name=ray_name, storage_path=str(Path(cfg.run.root) / "ray"),
                              num_workers=p.world_size, use_gpu=cfg.ray.use_gpu,
                              cpus_per_worker=cfg.ray.cpus_per_worker, max_failures=cfg.ray.max_failures,
                              num_to_keep=s.keep_checkpoints)
        if result.checkpoint_path is None:
            raise RuntimeError(f"{STAGE}: training reported no checkpoint")
        model_doc = {"model": p.model, "model_config": p.model_config}
        weights, digest, step = export_final_weights(result.checkpoint_path, out_dir, stage=STAGE, key=key,
                                                     model_doc=model_doc, header={"model": p.model}, loaded=result.final)
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        metrics["num_params"] = float(num_params)
        text_tok, text_sha = "", ""
        if p.text_len:  # the caption tokenizer travels with the model that reads its ids
            text_tok = str(out_dir / Path(tokens.text_tokenizer).name)
            atomic_copy(tokens.text_tokenizer, text_tok)
            text_sha = tokens.text_tokenizer_sha256
            srun.log_artifact(Path(text_tok), "model")
        ref = StackformerOutput(path=str(out_dir), key=key, weights=str(weights), sha256=digest, step=step,
                                model=p.model, model_config=p.model_config, metrics=metrics, mlflow_run_id=srun.run_id,
                                tokenizer_sha256=p.tokenizer_sha256, num_classes=p.num_classes,
                                text_tokenizer=text_tok, text_tokenizer_sha256=text_sha,
                                text_encoder=p.text_encoder, text_encoder_digest=p.text_encoder_digest)
        srun.log_dict(cfg.to_dict(), "config.json")
        srun.log_dataset(f"tokens-{tokens.key}", tokens.checksum, tokens.path, "training", num_train=tokens.num_train,
                         num_val=tokens.num_val, tokens_per_image=p.seq_len)
        mc = tokenizer.mqvae_config
        register_trained(tracker, cfg, srun, kind="stackformer", tokenizer=tokenizer, generator=ref, data={
            "source": cfg.data.source, "image_size": mc.resolution, "channels": mc.in_channels,
            "num_classes": p.num_classes})
        srun.set_tags({"mqgen.weights_sha256": ref.sha256})
        atomic_write_json(out_dir / SUCCESS, ref.to_dict())
    return ref


# The stage caches and resumes on its own (stage key, _SUCCESS.json, Ray checkpoints): no Prefect cache.
__getattr__ = lazy_stage_task(__name__, "train_stackformer_task", run, name=STAGE)
