"""train_tokenizer stage: MQ-VAE trained with Ray Train, checkpointed, resumable, tracked in MLflow.

``run(cfg, inputs)`` is the stage (testable without Prefect); ``train_tokenizer_task`` wraps it.
The Ray Train loop (:func:`train_loop`) runs on every worker: it streams the ingest shards for its
rank, trains MQ-VAE and the PatchGAN discriminator, validates, and reports verified checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from infra.config import PipelineConfig, from_dict, identity, stable_hash, to_dict
from infra.orchestration import lazy_stage_task
from infra.refs import TokenizerInputs, TokenizerOutput
from infra.storage import atomic_write_json, cached_run, load_weights_ref, stage_dir
from infra.training import StepEvent, Throughput, TrainClock, autocast, warmup_cosine
from models.losses import LossConfig, VQGANLoss
from models.metrics import code_stats, psnr_per_image
from models.mqvae import MQVAE, MQVAEConfig, to_model_input

STAGE = "train_tokenizer"
VERSION = "1"  # bump when the training code changes what a given config produces
SUCCESS = "_SUCCESS.json"


@dataclass(frozen=True, kw_only=True)
class TokenizerLoop:
    """Everything a Ray Train worker of this stage needs, built and validated once by :func:`run` (Ray pickles
    it to the workers as it is; ``to_dict``/``from_dict`` round-trip it through plain JSON data)."""

    cfg: PipelineConfig
    model_config: MQVAEConfig
    loss_config: LossConfig
    key: str
    tracking_uri: str
    mlflow_run_id: str
    metric_step_offset: int
    train_shards: tuple[tuple[str, int], ...]
    val_shards: tuple[tuple[str, int], ...]
    progress_file: str
    val_limit: int = 2048
    log_every: int = 20
    on_step: Callable[[StepEvent], None] | None = None  # called after every step (tests inject faults here)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "on_step"}
        return to_dict({**d, "cfg": self.cfg.to_dict(), "model_config": asdict(self.model_config),
                        "loss_config": asdict(self.loss_config)})

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, on_step: Callable[[StepEvent], None] | None = None) -> TokenizerLoop:
        """The loop :meth:`to_dict` wrote (plain JSON data), with the test callback ``on_step`` if any."""
        d = dict(d)
        return cls(**{**d, "cfg": from_dict(PipelineConfig, d["cfg"]), "model_config": MQVAEConfig(**d["model_config"]),
                      "loss_config": LossConfig(**d["loss_config"]),
                      "train_shards": tuple((str(p), int(n)) for p, n in d["train_shards"]),
                      "val_shards": tuple((str(p), int(n)) for p, n in d["val_shards"]), "on_step": on_step})


# --------------------------------------------------------------------------------------------- one step


class TokenizerTrainer:
    """The optimisation logic of one step (no Ray, no I/O), shared by the stage and the benchmarks.

    Per micro-batch one model forward (one EMA codebook update), then the autoencoder step, then the
    discriminator step on the detached reconstructions once the GAN is active. With ``grad_accum > 1``
    the batch is split into that many micro-batches whose gradients are accumulated (DDP all-reduces
    only on the last one).
    """

    def __init__(self, model: MQVAE, loss: VQGANLoss, *, lr: float, warmup_steps: int, max_steps: int,
                 device: torch.device, ddp_model: torch.nn.Module | None = None, grad_accum: int = 1,
                 sync_disc_grads: Callable[[torch.nn.Module], None] = lambda m: None):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.model, self.loss, self.device = model, loss, device
        self.forward_model = ddp_model if ddp_model is not None else model
        self.sync_disc_grads = sync_disc_grads
        self.grad_accum = grad_accum
        self.base_lr, self.warmup_steps, self.max_steps = lr, warmup_steps, max_steps
        ae_params = [p for p in model.parameters() if p.requires_grad]
        self.opt_ae = torch.optim.Adam(ae_params, lr=lr, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))

    def lr_at(self, step: int) -> float:
        """Warmup + cosine, a pure function of the step (nothing to restore on resume)."""
        return self.base_lr * warmup_cosine(step, self.warmup_steps, self.max_steps)

    def _no_sync(self, last: bool) -> Any:
        no_sync = getattr(self.forward_model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def step(self, x: torch.Tensor, step: int) -> dict[str, float]:
        """One optimiser step on images ``x`` in [-1, 1]; returns detached float logs (micro-batch means)."""
        self.model.train()
        self.loss.train()
        lr = self.lr_at(step)
        for opt in (self.opt_ae, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        chunks = x.chunk(self.grad_accum)
        n = len(chunks)
        disc = self.loss.discriminator
        disc.requires_grad_(False)  # the generator loss must not produce discriminator gradients
        self.opt_ae.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        recons = []
        for i, xc in enumerate(chunks):
            with self._no_sync(i == n - 1), autocast(self.device):
                out = self.forward_model(xc)
                total, logs = self.loss.generator_loss(xc, out.reconstruction.float(), out.quant_loss,
                                                       self.model.last_layer, step)
                (total / n).backward()
            recons.append(out.reconstruction.detach().float())
            logs["perplexity"] = out.perplexity.detach()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n
        self.opt_ae.step()
        disc.requires_grad_(True)
        if self.loss.is_gan_active(step):
            self.opt_d.zero_grad(set_to_none=True)
            for xc, rc in zip(chunks, recons):
                with autocast(self.device):
                    d_loss, d_logs = self.loss.discriminator_loss(xc, rc, step)
                (d_loss / n).backward()
                for k, v in d_logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / n
            self.sync_disc_grads(disc)
            self.opt_d.step()
        sums["lr"] = lr
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {"opt_ae": self.opt_ae.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.opt_d.load_state_dict(state["opt_d"])


@torch.no_grad()
def validate(model: MQVAE, batches: Iterable[torch.Tensor], device: torch.device) -> tuple[dict[str, float], dict]:
    """Validation figures over ``batches`` of uint8 images, plus tensors for the picture grids.

    L1 and PSNR of the eval-mode reconstruction, codebook usage over the whole set (perplexity,
    fraction of codes used, fraction of dead codes = never selected), and the mean kept fraction.
    """
    model.eval()
    k = model.cfg.codebook_size
    counts = torch.zeros(k, dtype=torch.float64)
    l1_sum = psnr_sum = 0.0
    n = 0
    first: dict[str, torch.Tensor] = {}
    for images in batches:
        x = to_model_input(images, device)
        out = model(x, update_codebook=False)
        recon = out.reconstruction.float().clamp(-1, 1)
        l1_sum += float((x - recon).abs().flatten(1).mean(1).sum())
        psnr_sum += float(psnr_per_image((x + 1) / 2, (recon + 1) / 2).sum())
        counts += torch.bincount(out.codes.flatten().cpu(), minlength=k).double()
        n += x.shape[0]
        if not first:
            first = {"inputs": x[:32].cpu(), "recon": recon[:32].cpu(), "keep_mask": out.keep_mask[:32].cpu()}
    model.train()
    if n == 0:
        raise ValueError("validation set is empty")
    usage = code_stats(counts)
    return ({"val_l1": l1_sum / n, "val_psnr": psnr_sum / n, "val_perplexity": usage["perplexity"],
             "val_code_usage": usage["usage"], "val_dead_code_fraction": 1.0 - usage["usage"],
             "val_images": float(n)},
            {**first, "counts": counts})


# --------------------------------------------------------------------------------------------- Ray loop


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: everything it needs arrives as one :class:`TokenizerLoop` (``config["loop"]``)."""
    from infra import ray as rayx
    from infra.checkpoint import rng_state, set_rng_state, write_checkpoint
    from infra.console import Progress
    from infra.stream import TrainStream, iter_eval_batches
    from infra.viz import grid, mask_overlay, side_by_side

    lc: TokenizerLoop = config["loop"]
    cfg = lc.cfg
    t = cfg.tokenizer
    w = rayx.worker()
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    model = MQVAE(lc.model_config).to(w.device)
    loss = VQGANLoss(lc.loss_config, in_channels=lc.model_config.in_channels).to(w.device)
    model.set_codebook_sync(w.all_reduce_sum, w.broadcast_from_rank0)

    restored = w.restore()
    start_step = 0
    if restored is not None:
        model.load_state_dict(restored.weights["model"])
        loss.discriminator.load_state_dict(restored.weights["discriminator"])
        start_step = restored.step
    ddp_model = w.prepare_model(model) if w.world_size > 1 else None
    trainer = TokenizerTrainer(model, loss, lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                               device=w.device, ddp_model=ddp_model, grad_accum=t.grad_accum,
                               sync_disc_grads=w.average_gradients)
    local_batch = t.batch_size // w.world_size  # the config refuses a global batch the workers cannot split
    # Per-rank randomness (dead-code restarts draw from it): deterministic in (seed, rank, step); rank 0
    # continues exactly from its saved RNG state.
    torch.manual_seed(cfg.seed * 1000 + w.rank + start_step)
    if restored is not None:
        trainer.load_state_dict(restored.state["trainer"])
        if w.is_main:
            set_rng_state(restored.state["rng"])

    clock = TrainClock(restored.state if restored is not None else None)
    stream = TrainStream(list(lc.train_shards), rank=w.rank, world_size=w.world_size,
                         batch_size=local_batch, channels=cfg.data.channels, seed=cfg.seed,
                         start_sample=start_step * local_batch)
    run = w.stage_run(cfg, STAGE, lc, restored)
    progress = Progress(STAGE, t.max_steps, start=start_step, file=lc.progress_file, enabled=w.is_main)
    speed = Throughput()
    step = start_step
    logs: dict[str, float] = {}
    data = iter(stream)
    grid_size = model.cfg.grid_size

    def val_batches() -> Iterable[torch.Tensor]:
        for images, _, _ in iter_eval_batches(list(lc.val_shards), 256, cfg.data.channels, limit=lc.val_limit):
            yield images

    while step < t.max_steps:
        images, _ = next(data)
        x = to_model_input(images, w.device)
        logs = trainer.step(x, step)
        step += 1
        speed.add(x.shape[0] * w.world_size)
        if w.is_main and (step % lc.log_every == 0 or step == t.max_steps):
            rate = speed.rate()
            assert run is not None
            run.log_metrics({**{f"train_{k}": v for k, v in logs.items()}, "images_per_s": rate}, step=step)
            progress.update(step, loss=logs["total"], l1=logs["l1"], img_s=rate)
        is_eval = step % t.eval_every == 0 or step == t.max_steps
        is_ckpt = step % t.checkpoint_every == 0 or step == t.max_steps
        metrics: dict[str, float] = {"step": step, **logs, TrainClock.STATE_KEY: clock()}
        if is_eval and w.is_main:
            vals, pics = validate(model, val_batches(), w.device)
            metrics.update(vals)
            assert run is not None
            run.log_metrics(vals, step=step)
            run.log_image(grid(side_by_side(pics["inputs"], pics["recon"]), nrow=8, scale=2),
                          f"reconstructions/step_{step:08d}.png")
            run.log_image(grid(mask_overlay(pics["inputs"], pics["keep_mask"], grid_size), nrow=8, scale=2),
                          f"mask_overlays/step_{step:08d}.png")
        if is_ckpt:
            w.sync_buffers(model)
            w.sync_buffers(loss.discriminator)
            ckpt_dir = None
            if w.is_main:
                ckpt_dir = rayx.scratch_dir()
                write_checkpoint(ckpt_dir, step, {"model": model.state_dict(),
                                                  "discriminator": loss.discriminator.state_dict()},
                                 {"trainer": trainer.state_dict(), "rng": rng_state(),
                                  "samples_per_rank": stream.consumed,
                                  TrainClock.STATE_KEY: metrics[TrainClock.STATE_KEY]},
                                 meta={"stage": STAGE, "key": lc.key, "metrics": metrics,
                                       "model_config": _model_config_dict(lc.model_config)})
            w.report(metrics, checkpoint_dir=ckpt_dir)
        if lc.on_step is not None:
            lc.on_step(StepEvent(step=step, rank=w.rank))
    w.sync_buffers(model)
    w.sync_buffers(loss.discriminator)
    divergence = max(w.weight_divergence(model), w.weight_divergence(loss.discriminator))  # collectives
    if w.is_main and run is not None:
        run.log_metrics({"final_step": step, "rank_weight_divergence": divergence}, step=step)
        run.flush()  # metrics waiting for an unreachable tracking server: sent before the worker goes


# --------------------------------------------------------------------------------------------- stage


def _key_doc(cfg: PipelineConfig, ingest_manifest_sha256: str) -> dict[str, Any]:
    return {"stage": STAGE, "version": VERSION, "tokenizer": identity("tokenizer", cfg.tokenizer.flat()),
            "image_size": cfg.data.image_size, "channels": cfg.data.channels, "seed": cfg.seed,
            "ingest": ingest_manifest_sha256}


def stage_key(cfg: PipelineConfig, ingest_manifest_sha256: str) -> str:
    return stable_hash(_key_doc(cfg, ingest_manifest_sha256))


def key_doc(cfg: PipelineConfig, inputs: TokenizerInputs) -> dict[str, Any]:
    """What the stage key of ``cfg`` on ``inputs`` hashes."""
    return _key_doc(cfg, inputs.ingest.manifest_sha256)


def load_output(out_dir: Path) -> TokenizerOutput | None:
    """The stage output if ``out_dir`` holds a complete, verified result; None otherwise."""
    return load_weights_ref(out_dir / SUCCESS, TokenizerOutput)


def cached(cfg: PipelineConfig, inputs: TokenizerInputs) -> TokenizerOutput | None:
    """The complete, verified output for ``cfg`` on ``inputs`` if it exists (no computation), else None."""
    return load_output(stage_dir(cfg.run.root, STAGE, stage_key(cfg, inputs.ingest.manifest_sha256)))


def run(cfg: PipelineConfig, inputs: TokenizerInputs, *, force: bool = False, parent_run_id: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None) -> TokenizerOutput:
    """Train (or resume, or reuse) the tokenizer for ``cfg`` on the ingest output in ``inputs``.

    ``on_step(event)`` runs in every training worker after every step (a seam for tests: faults, slowdowns).
    """
    doc = key_doc(cfg, inputs)
    key = stable_hash(doc)
    out_dir = stage_dir(cfg.run.root, STAGE, key)
    return cached_run(out_dir, key, lambda: load_output(out_dir),
                      lambda: _train(cfg, inputs, key, out_dir, force, parent_run_id, on_step), force=force,
                      key_doc=doc)


def _train(cfg: PipelineConfig, inputs: TokenizerInputs, key: str, out_dir: Path, force: bool,
           parent_run_id: str | None, on_step: Callable[[StepEvent], None] | None) -> TokenizerOutput:
    from infra import ray as rayx
    from infra.console import watch_progress
    from infra.registry import register_trained
    from infra.shards import ShardSet
    from infra.tracking import Tracker, open_training_attempt
    from infra.training import export_final_weights

    ingest = inputs.ingest
    shards = ShardSet.from_output(ingest)
    model_cfg = cfg.tokenizer.model
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    srun, ray_name, step_offset = open_training_attempt(
        tracker, STAGE, key, out_dir, force=force, done=load_output(out_dir) is not None, success_name=SUCCESS,
        params={"tokenizer": cfg.tokenizer.flat(), "seed": cfg.seed, "image_size": cfg.data.image_size,
                "channels": cfg.data.channels},
        tags={"mqgen.num_workers": str(cfg.ray.num_workers), "mqgen.ingest_manifest_sha256": ingest.manifest_sha256,
              "mqgen.ingest_run_id": ingest.mlflow_run_id},
        parent_run_id=parent_run_id)
    loop = TokenizerLoop(
        cfg=cfg, model_config=model_cfg, loss_config=cfg.tokenizer.loss, key=key, tracking_uri=tracker.uri,
        mlflow_run_id=srun.run_id, metric_step_offset=step_offset,
        train_shards=tuple((s.path, s.num_samples) for s in shards.shards("train")),
        val_shards=tuple((s.path, s.num_samples) for s in shards.shards("val")),
        log_every=max(1, min(50, cfg.tokenizer.max_steps // 20)), progress_file=str(out_dir / "progress.json"),
        on_step=on_step)
    with srun:  # the run ends FAILED on an error (KILLED on Ctrl-C / SIGTERM), FINISHED otherwise
        with watch_progress(out_dir / "progress.json", STAGE):
            result = rayx.fit(train_loop, {"loop": loop}, name=ray_name, storage_path=str(Path(cfg.run.root) / "ray"),
                              num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                              cpus_per_worker=cfg.ray.cpus_per_worker, max_failures=cfg.ray.max_failures,
                              num_to_keep=cfg.tokenizer.keep_checkpoints)
        if result.checkpoint_path is None:
            raise RuntimeError(f"{STAGE}: training reported no checkpoint")
        model_doc = _model_config_dict(model_cfg)
        weights, digest, step = export_final_weights(result.checkpoint_path, out_dir, stage=STAGE, key=key,
                                                     model_doc=model_doc, loaded=result.final)
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        with torch.device("meta"):  # shapes only
            metrics["num_params"] = float(sum(t.numel() for t in MQVAE(model_cfg).parameters()))
        ref = TokenizerOutput(path=str(out_dir), key=key, weights=str(weights), sha256=digest, step=step,
                              model_config=model_doc, metrics=metrics, mlflow_run_id=srun.run_id)
        srun.log_dict(cfg.to_dict(), "config.json")
        srun.log_dataset(f"ingest-{ingest.key}", ingest.manifest_sha256, Path(ingest.path) / "manifest.json", "training",
                         data_source=cfg.data.source, num_train=ingest.num_train, num_val=ingest.num_val)
        register_trained(tracker, cfg, srun, kind="tokenizer", tokenizer=ref, data={
            "source": cfg.data.source, "image_size": ingest.image_size, "channels": ingest.channels,
            "num_classes": ingest.num_classes, "classes": shards.classes})
        srun.set_tags({"mqgen.weights_sha256": ref.sha256})
        atomic_write_json(out_dir / SUCCESS, ref.to_dict())
    return ref


def _model_config_dict(model_cfg: MQVAEConfig) -> dict[str, Any]:
    d = asdict(model_cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__getattr__ = lazy_stage_task(__name__, "train_tokenizer_task", run, name=STAGE)
