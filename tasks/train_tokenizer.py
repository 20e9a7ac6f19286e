"""train_tokenizer stage: MQ-VAE trained with Ray Train, checkpointed, resumable, tracked in MLflow.

``run(cfg, upstream)`` is the stage (testable without Prefect); ``train_tokenizer_task`` wraps it.
The Ray Train loop (:func:`train_loop`) runs on every worker: it streams the ingest shards for its
rank, trains MQ-VAE and the PatchGAN discriminator, validates, and reports verified checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from infra.orchestration import lazy_stage_task
from infra.config import PipelineConfig, from_dict, loss_config, mqvae_config, stable_hash, to_dict
from infra.storage import Ref, atomic_write_json, sha256_file, stage_dir, load_weights_ref
from infra.training import Throughput, autocast, warmup_cosine
from models.losses import VQGANLoss
from models.mqvae import MQVAE

STAGE = "train_tokenizer"
VERSION = "1"  # bump when the training code changes what a given config produces
SUCCESS = "_SUCCESS.json"


@dataclass(frozen=True)
class TokenizerOutput(Ref):
    """Reference to a trained MQ-VAE: weights (safetensors) + the model config needed to rebuild it."""

    path: str
    key: str
    weights: str
    sha256: str
    step: int
    model_config: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str = ""


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


def to_model_input(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


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
        mse = ((x - recon) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnr_sum += float((10 * torch.log10(1.0 / mse)).sum())
        counts += torch.bincount(out.codes.flatten().cpu(), minlength=k).double()
        n += x.shape[0]
        if not first:
            first = {"inputs": x[:32].cpu(), "recon": recon[:32].cpu(), "keep_mask": out.keep_mask[:32].cpu()}
    model.train()
    if n == 0:
        raise ValueError("validation set is empty")
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    used = float((counts > 0).double().mean())
    return ({"val_l1": l1_sum / n, "val_psnr": psnr_sum / n, "val_perplexity": perplexity,
             "val_code_usage": used, "val_dead_code_fraction": 1.0 - used, "val_images": float(n)},
            {**first, "counts": counts})


# --------------------------------------------------------------------------------------------- Ray loop


def train_loop(lc: dict[str, Any]) -> None:
    """``train_loop_per_worker``: everything it needs arrives in the JSON-able dict ``lc``."""
    from infra import ray as rayx
    from infra.checkpoint import rng_state, set_rng_state, write_checkpoint
    from infra.stream import TrainStream, iter_eval_batches
    from infra.tracking import StageRun, Tracker
    from infra.console import Progress
    from infra.viz import grid, mask_overlay, side_by_side

    cfg: PipelineConfig = from_dict(PipelineConfig, lc["config"])
    t = cfg.tokenizer
    w = rayx.worker()
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    model = MQVAE(mqvae_config(cfg)).to(w.device)
    loss = VQGANLoss(loss_config(cfg), in_channels=cfg.data.channels).to(w.device)
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
    local_batch = max(1, t.batch_size // w.world_size)
    # Per-rank randomness (dead-code restarts draw from it): deterministic in (seed, rank, step); rank 0
    # continues exactly from its saved RNG state.
    torch.manual_seed(cfg.seed * 1000 + w.rank + start_step)
    if restored is not None:
        trainer.load_state_dict(restored.state["trainer"])
        if w.is_main:
            set_rng_state(restored.state["rng"])

    stream = TrainStream([tuple(s) for s in lc["train_shards"]], rank=w.rank, world_size=w.world_size,
                         batch_size=local_batch, channels=cfg.data.channels, seed=cfg.seed,
                         start_sample=start_step * local_batch)
    run: StageRun | None = None
    if w.is_main:
        run = Tracker(cfg.run.root, cfg.run.experiment, tracking_uri=lc["tracking_uri"]).stage_run(
            STAGE, lc["key"], run_id=lc["mlflow_run_id"])
        run.step_offset = int(lc.get("metric_step_offset", 0))
        if restored is not None:
            run.set_tags({"mqgen.resumed_from_step": restored.step})
            if w.skipped_checkpoints:
                run.set_tags({"mqgen.skipped_checkpoints": " | ".join(w.skipped_checkpoints)[:4000]})
    progress = Progress(STAGE, t.max_steps, start=start_step, file=lc["progress_file"], enabled=w.is_main)
    speed = Throughput()
    step = start_step
    logs: dict[str, float] = {}
    data = iter(stream)
    grid_size = model.cfg.grid_size

    def val_batches() -> Iterable[torch.Tensor]:
        for images, _, _ in iter_eval_batches([tuple(s) for s in lc["val_shards"]], 256, cfg.data.channels,
                                              limit=lc["val_limit"]):
            yield images

    while step < t.max_steps:
        images, _ = next(data)
        x = to_model_input(images, w.device)
        logs = trainer.step(x, step)
        step += 1
        speed.add(x.shape[0] * w.world_size)
        if w.is_main and (step % lc["log_every"] == 0 or step == t.max_steps):
            rate = speed.rate()
            assert run is not None
            run.log_metrics({**{f"train_{k}": v for k, v in logs.items()}, "images_per_s": rate}, step=step)
            progress.update(step, loss=logs["total"], l1=logs["l1"], img_s=rate)
        is_eval = step % t.eval_every == 0 or step == t.max_steps
        is_ckpt = step % t.checkpoint_every == 0 or step == t.max_steps
        metrics: dict[str, float] = {"step": step, **logs}
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
                                  "samples_per_rank": stream.consumed},
                                 meta={"stage": STAGE, "key": lc["key"], "model_config": lc["model_config"]})
            w.report(metrics, checkpoint_dir=ckpt_dir)
        if lc.get("fail_at_step") == step and not Path(lc["fail_marker"]).exists():
            Path(lc["fail_marker"]).write_text(str(step))  # fault injection for the tests: fail once
            raise RuntimeError(f"injected failure at step {step}")
        if lc.get("sleep_after_step"):
            time.sleep(lc["sleep_after_step"])
    w.sync_buffers(model)
    w.sync_buffers(loss.discriminator)
    divergence = max(w.weight_divergence(model), w.weight_divergence(loss.discriminator))  # collectives
    if w.is_main and run is not None:
        run.log_metrics({"final_step": step, "rank_weight_divergence": divergence}, step=step)


# --------------------------------------------------------------------------------------------- stage


def stage_key(cfg: PipelineConfig, ingest_manifest_sha256: str) -> str:
    return stable_hash({"stage": STAGE, "version": VERSION, "tokenizer": to_dict(cfg.tokenizer),
                        "image_size": cfg.data.image_size, "channels": cfg.data.channels, "seed": cfg.seed,
                        "ingest": ingest_manifest_sha256})


def load_output(out_dir: Path) -> TokenizerOutput | None:
    """The stage output if ``out_dir`` holds a complete, verified result; None otherwise."""
    return load_weights_ref(out_dir / SUCCESS, TokenizerOutput)


def cached(cfg: PipelineConfig, upstream: dict[str, Any]) -> TokenizerOutput | None:
    ingest = _ingest_ref(cfg, upstream)
    return load_output(stage_dir(cfg.run.root, STAGE, stage_key(cfg, ingest.manifest_sha256)))


def _ingest_ref(cfg: PipelineConfig, upstream: dict[str, Any]) -> Any:
    from tasks import ingest as ingest_stage

    ref = upstream.get("ingest") or ingest_stage.cached(cfg)
    if ref is None:
        raise RuntimeError("train_tokenizer needs the ingest output for this config: run the ingest stage first "
                           "(mqgen run --only ingest ...) or run the whole pipeline")
    return ref


def run(cfg: PipelineConfig, upstream: dict[str, Any], force: bool = False,
        _test_hooks: dict[str, Any] | None = None) -> TokenizerOutput:
    """Train (or resume, or reuse) the tokenizer for ``cfg`` on the ingest output in ``upstream``."""
    from infra import ray as rayx
    from infra.checkpoint import read_checkpoint
    from infra.console import watch_progress
    from infra.shards import ShardSet
    from infra.storage import atomic_open
    from infra.tracking import Tracker, exit_status, open_training_attempt
    from safetensors.torch import save_file

    ingest = _ingest_ref(cfg, upstream)
    key = stage_key(cfg, ingest.manifest_sha256)
    out_dir = stage_dir(cfg.run.root, STAGE, key)
    done = load_output(out_dir)
    if done is not None and not force:
        return done

    shards = ShardSet.from_output(ingest)
    model_cfg = mqvae_config(cfg)
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    parent = upstream.get("_parent_run_id")
    srun, ray_name, step_offset = open_training_attempt(
        tracker, STAGE, key, out_dir, force=force, done=done is not None, success_name=SUCCESS,
        params={"tokenizer": to_dict(cfg.tokenizer), "seed": cfg.seed, "image_size": cfg.data.image_size,
                "channels": cfg.data.channels},
        tags={"mqgen.num_workers": str(cfg.ray.num_workers), "mqgen.ingest_manifest_sha256": ingest.manifest_sha256,
              "mqgen.ingest_run_id": ingest.mlflow_run_id},
        parent_run_id=parent)
    lc = {"config": cfg.to_dict(), "key": key, "tracking_uri": tracker.uri, "mlflow_run_id": srun.run_id,
          "metric_step_offset": step_offset,
          "train_shards": [(s.path, s.num_samples) for s in shards.shards("train")],
          "val_shards": [(s.path, s.num_samples) for s in shards.shards("val")],
          "val_limit": 2048, "log_every": max(1, min(50, cfg.tokenizer.max_steps // 20)),
          "model_config": _model_config_dict(model_cfg), "progress_file": str(out_dir / "progress.json"),
          **(_test_hooks or {})}
    try:
        with watch_progress(out_dir / "progress.json", STAGE):
            result = rayx.fit(train_loop, lc, name=ray_name, storage_path=str(Path(cfg.run.root) / "ray"),
                              num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                              cpus_per_worker=cfg.ray.cpus_per_worker, max_failures=cfg.ray.max_failures,
                              num_to_keep=cfg.tokenizer.keep_checkpoints)
    except BaseException as e:  # KILLED on Ctrl-C / SIGTERM, FAILED otherwise
        srun.finish(exit_status(e))
        raise
    if result.checkpoint_path is None:
        srun.finish("FAILED")
        raise RuntimeError(f"{STAGE}: training reported no checkpoint")
    final = read_checkpoint(result.checkpoint_path)
    weights_path = out_dir / "model.safetensors"
    tmp = out_dir / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in final.weights["model"].items()}, str(tmp),
              metadata={"stage": STAGE, "key": key, "step": str(final.step)})
    tmp.replace(weights_path)
    with atomic_open(out_dir / "model_config.json", "w") as f:  # type: ignore[call-overload]
        json.dump(_model_config_dict(model_cfg), f, indent=2)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    ref = TokenizerOutput(path=str(out_dir), key=key, weights=str(weights_path), sha256=sha256_file(weights_path),
                          step=final.step, model_config=_model_config_dict(model_cfg), metrics=metrics,
                          mlflow_run_id=srun.run_id)
    srun.log_artifact(weights_path, "model")
    srun.log_artifact(out_dir / "model_config.json", "model")
    srun.log_dict(cfg.to_dict(), "config.json")
    srun.set_tags({"mqgen.weights_sha256": ref.sha256})
    atomic_write_json(out_dir / SUCCESS, ref.to_dict())
    srun.finish("FINISHED")
    return ref


def _model_config_dict(model_cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(model_cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def build_model(ref: TokenizerOutput, device: torch.device | str = "cpu") -> MQVAE:
    """Rebuild the trained MQ-VAE from its reference, verifying the weights' sha256 first."""
    from safetensors.torch import load_file

    from infra.storage import UnsafeCheckpointError
    from models.mqvae import MQVAEConfig

    actual = sha256_file(ref.weights)
    if actual != ref.sha256:
        raise UnsafeCheckpointError(f"{ref.weights}: sha256 {actual[:12]} != reference {ref.sha256[:12]}")
    mc = dict(ref.model_config)
    mc["ch_mult"] = tuple(mc["ch_mult"])
    mc["attn_resolutions"] = tuple(mc["attn_resolutions"])
    model = MQVAE(MQVAEConfig(**mc))
    model.load_state_dict(load_file(ref.weights), strict=True)
    return model.to(device).eval()


__getattr__ = lazy_stage_task(__name__, "train_tokenizer_task", run, name=STAGE)
