"""train_stackformer with real Ray Train (CPU workers), real MLflow (sqlite), real LMDB and the tiny preset.

The inputs are made once per module by the real upstream stages: ingest (scikit-learn digits, 16 px),
train_tokenizer (tiny MQ-VAE, 8 steps, 2 workers) and tokenize, which give a class-conditional token set of
256 train / 179 val images with 32 of 64 cells kept. The full-grid baseline needs a ``keep_ratio=1.0``
tokenisation: a random-init tokenizer at that ratio, tokenized by the real tokenize stage.

Three Ray Train fits in all (the tokenizer, the Stackformer with an injected failure, the baseline); the
rest runs in-process.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from flows.stages import MissingInput, inputs_for
from infra.config import ConfigError, fullgrid_config, resolve, stackformer_config, token_layout
from infra.refs import TokenizeInputs, TokenizerInputs, load_generator, load_tokenizer
from infra.tokens import TokenDataset, TokenFormatError, iter_records, read_meta, record_dtype
from infra.tracking import Tracker
from models.stackformer import FullGridTransformer, SamplingParams, Stackformer
from tasks import train_stackformer as ts
from tests.fixtures.hooks import FailOnce, RecordBatches
from tests.fixtures.tokenize_data import make_tokenizer, ray_cluster  # noqa: F401

CPU = torch.device("cpu")
MAX_STEPS, CKPT_EVERY, EVAL_EVERY, FAIL_AT = 48, 12, 24, 30


def _cfg(root: Path, *extra: str):
    return resolve("tiny", overrides=[
        f"run.root={root}", "data.source=digits", "data.min_shards=1", "ray.num_workers=2",
        "ray.max_failures=1",
        "tokenizer.max_steps=8", "tokenizer.eval_every=8", "tokenizer.checkpoint_every=8",
        "stackformer.lr=0.005", f"stackformer.max_steps={MAX_STEPS}", f"stackformer.eval_every={EVAL_EVERY}",
        f"stackformer.checkpoint_every={CKPT_EVERY}", "stackformer.keep_checkpoints=3", *extra])


def _fullgrid_cfg(root: Path, *extra: str):
    return _cfg(root, "tokenizer.keep_ratio=1.0", "stackformer.model=fullgrid", *extra)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path, ray_cluster: str  # noqa: F811
           ) -> dict[str, Any]:
    """Ingest, train_tokenizer and tokenize outputs (keep_ratio 0.5), plus a keep_ratio 1.0 tokenisation."""
    from tasks import ingest, tokenize, train_tokenizer

    root = tmp_path_factory.mktemp("stackformer")
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")  # skip the schema migrations
    cfg = _cfg(root)
    ing = ingest.run(cfg)
    tok = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    tokens = tokenize.run(cfg, TokenizeInputs(ingest=ing, train_tokenizer=tok))
    full_cfg = _fullgrid_cfg(root)
    full_tok = make_tokenizer(full_cfg)
    full_tokens = tokenize.run(full_cfg, TokenizeInputs(ingest=ing, train_tokenizer=full_tok))
    return {"root": root, "cfg": cfg, "ingest": ing, "upstream": {"ingest": ing, "train_tokenizer": tok,
                                                                 "tokenize": tokens},
            "full_cfg": full_cfg, "full_upstream": {"ingest": ing, "train_tokenizer": full_tok,
                                                    "tokenize": full_tokens}}


def _codes(db: str) -> np.ndarray:
    meta = read_meta(db)
    rec = np.frombuffer(b"".join(v for _, v in iter_records(db)), dtype=record_dtype(meta.seq_len))
    return rec["codes"].astype(np.int64)


def _unigram_entropy(codes: np.ndarray) -> float:
    """Entropy (nats) of the code frequencies: the code CE of the best model that ignores all context."""
    counts = np.bincount(codes.ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _expected_order(num_records: int, rank: int, world: int, batch: int, seed: int, steps: int
                    ) -> dict[int, list[int]]:
    """Indices of the batch each step reads, straight from torch's DistributedSampler (step n is 1-based)."""
    sampler = DistributedSampler(range(num_records), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    per_epoch = len(sampler) // batch
    out: dict[int, list[int]] = {}
    for step in range(1, steps + 1):
        epoch, b = divmod(step - 1, per_epoch)
        sampler.set_epoch(epoch)
        out[step] = list(sampler)[b * batch:(b + 1) * batch]
    return out


# --------------------------------------------------------------------------------------------- Ray Train


@pytest.mark.slow
def test_stackformer_learns_resumes_in_order_and_logs(inputs: dict[str, Any], tmp_path: Path) -> None:
    root, cfg, upstream = inputs["root"], inputs["cfg"], inputs["upstream"]
    tokens = upstream["tokenize"]
    marker, record = tmp_path / "failed-once", tmp_path / "batches"
    record.mkdir()
    ref = ts.run(cfg, inputs_for(ts.STAGE, upstream), on_step=FailOnce(FAIL_AT, marker, then=RecordBatches(record)))
    assert marker.read_text() == str(FAIL_AT), "the injected failure did not happen"
    assert ref.step == MAX_STEPS and ref.model == "stackformer"
    assert ref.num_classes == inputs["ingest"].num_classes == 10  # class-conditional: the digits have labels
    assert ref.tokenizer_sha256 == upstream["train_tokenizer"].sha256

    # it learned: the val code CE is below the entropy of the code frequencies (a context-free model's best)
    unigram = _unigram_entropy(_codes(tokens.train_db))
    assert ref.metrics["val_code_ce"] < unigram - 0.3, (ref.metrics["val_code_ce"], unigram)
    assert ref.metrics["val_bits_per_image"] == pytest.approx(
        (ref.metrics["val_code_ce"] + ref.metrics["val_pos_ce"]) * 32 / math.log(2), rel=1e-6)
    assert 0.0 <= ref.metrics["val_sample_raster_share"] <= 1.0

    # resume: continued at the checkpoint's step and read exactly the batches an uninterrupted run reads
    resumed_from = (FAIL_AT // CKPT_EVERY) * CKPT_EVERY
    num_train = read_meta(tokens.train_db).num_records
    for rank in range(2):
        lines = [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
        steps = [line["step"] for line in lines]
        restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
        assert steps[restart] == resumed_from + 1, steps
        assert sorted(set(steps)) == list(range(1, MAX_STEPS + 1))
        seen: dict[int, list[list[int]]] = collections.defaultdict(list)
        for line in lines:
            seen[line["step"]].append(line["indices"])
        expected = _expected_order(num_train, rank, 2, 8, cfg.seed, MAX_STEPS)
        for step, batches in seen.items():
            assert all(b == expected[step] for b in batches), f"rank {rank} step {step}"

    client = Tracker(root, "mqgen").client
    run = client.get_run(ref.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mqgen.resumed_from_step"] == str(resumed_from)
    assert run.data.params["model"] == "stackformer" and run.data.params["stackformer.lr"] == "0.005"
    for key in ("train_loss", "train_code_loss", "train_pos_loss", "lr", "tokens_per_s", "val_code_ce",
                "val_pos_ce", "val_bits_per_image", "val_sample_raster_share"):
        hist = _history(client, ref.mlflow_run_id, key)
        steps = [s for s, _ in hist]
        # no duplicate steps although steps 25..30 ran twice
        assert hist and len(steps) == len(set(steps)) and steps == sorted(steps), key
    assert all(v > 0 for _, v in _history(client, ref.mlflow_run_id, "tokens_per_s"))
    loss = _history(client, ref.mlflow_run_id, "train_loss")
    assert loss[-1][1] < 0.8 * loss[0][1], loss
    assert _history(client, ref.mlflow_run_id, "rank_weight_divergence")[-1][1] == 0.0  # DDP replicas in sync
    samples = {a.path for a in client.list_artifacts(ref.mlflow_run_id, "samples")}
    assert samples == {f"samples/step_{s:08d}.png" for s in range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY)}
    # the model is a registered version whose bundle holds these weights and the tokenizer that decodes them
    [version] = client.search_model_versions(f"run_id = '{ref.mlflow_run_id}'")
    assert version.name == f"mqgen-stackformer-{cfg.preset}"
    assert version.tags["mqgen.weights_sha256"] == ref.sha256
    assert version.tags["mqgen.tokenizer_sha256"] == ref.tokenizer_sha256

    # a second call is a cache hit
    t0 = time.perf_counter()
    assert ts.run(cfg, inputs_for(ts.STAGE, upstream)) == ref
    assert time.perf_counter() - t0 < 10
    assert ts.cached(cfg, inputs_for(ts.STAGE, upstream)) == ref

    # the weights rebuild into a working class-conditional sampler whose tokens the tokenizer decodes
    model = load_generator(ref)
    assert isinstance(model, Stackformer) and not model.training
    codes, positions, labels, _ = ts.sample_sequences(
        model, 4, num_classes=ref.num_classes, code_params=SamplingParams(), pos_params=SamplingParams(),
        generator=torch.Generator().manual_seed(0))
    assert labels is not None and labels.tolist() == [0, 1, 2, 3]
    assert (positions.diff(dim=1) > 0).all()
    with torch.no_grad():
        images = load_tokenizer(upstream["train_tokenizer"]).decode(codes, positions)
    assert images.shape == (4, 1, 16, 16)


@pytest.mark.slow
def test_fullgrid_baseline_trains_through_the_same_stage(inputs: dict[str, Any]) -> None:
    root = inputs["root"]
    cfg = _fullgrid_cfg(root, "ray.num_workers=1", "stackformer.max_steps=12", "stackformer.eval_every=12",
                        "stackformer.checkpoint_every=12")
    ref = ts.run(cfg, inputs_for(ts.STAGE, inputs["full_upstream"]))
    assert ref.model == "fullgrid" and ref.step == 12
    s = cfg.stackformer
    assert ref.model_config["n_layer"] == s.n_layer_code + s.n_layer_pos
    assert (ref.model_config["n_embd"], ref.model_config["n_head"]) == (s.n_embd, s.n_head)
    assert ref.model_config["num_classes"] == 10
    assert ref.metrics["val_bits_per_image"] == pytest.approx(ref.metrics["val_code_ce"] * 64 / math.log(2),
                                                              rel=1e-6)
    assert "val_pos_ce" not in ref.metrics and "val_sample_raster_share" not in ref.metrics
    model = load_generator(ref)
    assert isinstance(model, FullGridTransformer) and model.config.seq_len == 64
    client = Tracker(root, "mqgen").client
    samples = [a.path for a in client.list_artifacts(ref.mlflow_run_id, "samples")]
    assert samples == ["samples/step_00000012.png"]
    assert ref.key != ts.stage_key(inputs["cfg"], inputs["upstream"]["tokenize"])


# ------------------------------------------------------------------------------------------ before training


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_fields, overrides, message", [
    ({"codebook_size": 64}, [], r"codebook_size=32 in the token database, but the model expects 64"),
    ({"resolution": 32}, [], r"grid_size=8 in the token database, but the model expects 16"),
    ({"keep_ratio": 0.75}, [], r"seq_len=32 in the token database, but the model expects 48"),
    # the config asks for the full grid (so keep 1.0), the tokens come from a keep-0.5 tokenizer
    ({}, ["tokenizer.keep_ratio=1.0", "stackformer.model=fullgrid"],
     r"\(fullgrid, .*seq_len=32 in the token database, but the model expects 64"),
])
def test_reader_model_mismatch_fails_before_training(inputs: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, tokenizer_fields: dict,
                                                     overrides: list[str], message: str) -> None:
    """The token databases are checked against the tokenizer input they are said to come from (its codebook,
    grid and kept positions are read from it, never recomputed from the config)."""
    import dataclasses

    from infra import ray as rayx

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray training started despite the mismatch")

    monkeypatch.setattr(rayx, "fit", no_training)
    cfg = _cfg(tmp_path, *overrides)
    upstream = dict(inputs["upstream"])
    tok = upstream["train_tokenizer"]
    upstream["train_tokenizer"] = dataclasses.replace(tok, model_config={**tok.model_config, **tokenizer_fields})
    with pytest.raises(TokenFormatError, match=message):
        ts.run(cfg, inputs_for(ts.STAGE, upstream))
    assert not (tmp_path / ts.STAGE).exists()


@pytest.mark.slow
def test_wrong_tokenizer_or_batch_layout_fails_before_training(inputs: dict[str, Any], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from infra import ray as rayx

    monkeypatch.setattr(rayx, "fit", lambda *a, **k: pytest.fail("Ray training started"))
    cfg = _cfg(tmp_path)
    other = make_tokenizer(cfg, seed=1)
    with pytest.raises(ValueError, match="made by the tokenizer with weights sha256"):
        ts.run(cfg, inputs_for(ts.STAGE, {**inputs["upstream"], "train_tokenizer": other}))
    with pytest.raises(ValueError, match=r"stackformer.batch_size=15 must be divisible by ray.num_workers=2"):
        ts.run(_cfg(tmp_path, "stackformer.batch_size=15"), inputs_for(ts.STAGE, inputs["upstream"]))
    with pytest.raises(ValueError, match=r"256 records, 128 per worker: fewer than one batch of 256"):
        ts.run(_cfg(tmp_path, "stackformer.batch_size=512"), inputs_for(ts.STAGE, inputs["upstream"]))
    with pytest.raises(MissingInput, match="run the tokenize stage first"):  # the graph names the missing stage
        inputs_for(ts.STAGE, {"ingest": inputs["ingest"], "train_tokenizer": other})


@pytest.mark.slow
def test_resumed_batches_continue_the_uninterrupted_order(inputs: dict[str, Any]) -> None:
    db = inputs["upstream"]["tokenize"].train_db
    data = ts.TrainBatches(ts.IndexedTokens(TokenDataset(db)), rank=1, world_size=2, batch_size=8, seed=3,
                           num_workers=2)  # loader processes, each opening the LMDB itself
    assert data.steps_per_epoch == 16
    full = data.iterate(0)
    uninterrupted = [next(full)[1] for _ in range(40)]
    full.close()
    resumed = data.iterate(21)
    tail = [next(resumed)[1] for _ in range(19)]
    resumed.close()
    for a, b in zip(uninterrupted[21:], tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["codes"], b["codes"])
    expected = _expected_order(256, 1, 2, 8, 3, 40)
    assert [b["index"].tolist() for b in uninterrupted] == [expected[s] for s in range(1, 41)]
    assert data.epoch_indices(2)[0] == expected[33]
    assert [data.position(s) for s in (0, 15, 16, 37)] == [(0, 0), (0, 15), (1, 0), (2, 5)]


# --------------------------------------------------------------------------------------------- in-process


def test_class_conditional_model_overfit_on_two_classes_samples_each_class() -> None:
    torch.manual_seed(0)
    cfg = resolve("tiny", overrides=["stackformer.lr=0.01", "stackformer.warmup_steps=10",
                                     "stackformer.max_steps=150"])
    mc = stackformer_config(cfg.stackformer, token_layout(cfg), num_classes=2)
    model = ts.new_model("stackformer", asdict(mc))
    g = torch.Generator().manual_seed(1)
    cells = mc.grid_size ** 2
    codes = torch.randint(0, mc.codebook_size, (2, mc.seq_len), generator=g)
    positions = torch.stack([torch.randperm(cells, generator=g)[:mc.seq_len].sort().values for _ in range(2)])
    labels = torch.tensor([0, 1]).repeat(4)
    batch = ts.Batch(codes.repeat(4, 1), positions.repeat(4, 1), labels, torch.arange(8))
    s = cfg.stackformer
    trainer = ts.StackformerTrainer(model, lr=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps,
                                    max_steps=s.max_steps, grad_clip=s.grad_clip, device=CPU)
    for step in range(s.max_steps):
        logs = trainer.step(batch, step)
    assert float(logs["loss"]) < 0.01
    nucleus = SamplingParams(top_p=0.9)
    got, got_pos, labels, share = ts.sample_sequences(model, 16, num_classes=2, code_params=nucleus,
                                                      pos_params=nucleus,
                                                      generator=torch.Generator().manual_seed(0))
    assert labels is not None and labels.tolist() == [0, 1] * 8
    for i, label in enumerate(labels.tolist()):
        assert torch.equal(got[i], codes[label]) and torch.equal(got_pos[i], positions[label]), i
    assert share == 1.0  # the training sequences are in raster order, and so are the samples


def test_baseline_and_stackformer_come_from_one_config_and_train_with_one_trainer() -> None:
    base = resolve("tiny", overrides=["tokenizer.keep_ratio=1.0"])
    full_cfg = resolve("tiny", overrides=["tokenizer.keep_ratio=1.0", "stackformer.model=fullgrid"])
    sf, fg = stackformer_config(base.stackformer, token_layout(base), num_classes=10), fullgrid_config(full_cfg.stackformer, token_layout(full_cfg), num_classes=10)
    assert fg.n_layer == sf.n_layer_code + sf.n_layer_pos and (fg.n_embd, fg.n_head) == (sf.n_embd, sf.n_head)
    assert (fg.codebook_size, fg.grid_size, fg.num_classes) == (sf.codebook_size, sf.grid_size, 10)
    assert fg.seq_len == sf.seq_len
    no_labels = resolve("tiny", overrides=["stackformer.conditional=false"])
    assert stackformer_config(no_labels.stackformer, token_layout(no_labels), num_classes=10).num_classes == 0

    g = torch.Generator().manual_seed(0)
    cells = sf.grid_size ** 2
    codes = torch.randint(0, 4, (16, cells), generator=g).sort(dim=1).values  # learnable: sorted code runs
    batch = ts.Batch(codes, torch.arange(cells).expand(16, -1), torch.arange(16) % 10, torch.arange(16))
    for kind, mc in (("stackformer", sf), ("fullgrid", fg)):
        torch.manual_seed(0)
        model = ts.new_model(kind, asdict(mc))
        trainer = ts.StackformerTrainer(model, lr=3e-3, weight_decay=0.01, warmup_steps=2, max_steps=30,
                                        grad_clip=1.0, device=CPU)
        decay, no_decay = trainer.opt.param_groups
        linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        assert {id(p) for p in decay["params"]} == linear and decay["weight_decay"] == 0.01
        assert no_decay["weight_decay"] == 0.0 and trainer.opt.defaults["betas"] == (0.9, 0.95)
        first = float(trainer.step(batch, 0)["code_loss"])
        for step in range(1, 30):
            logs = trainer.step(batch, step)
        assert float(logs["code_loss"]) < 0.5 * first, kind
        assert logs["lr"] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 27 / 28)))


def test_validation_figures_are_per_token_and_per_image() -> None:
    torch.manual_seed(0)
    cfg = resolve("tiny")
    model = ts.new_model("stackformer", asdict(stackformer_config(cfg.stackformer, token_layout(cfg), num_classes=0)))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (6, 32), generator=g)
    positions = torch.stack([torch.randperm(64, generator=g)[:32].sort().values for _ in range(6)])
    batches = [ts.Batch(codes[:4], positions[:4], None, torch.arange(4)),
               ts.Batch(codes[4:], positions[4:], None, torch.arange(2))]
    vals = ts.validate(model, batches, CPU)
    model.eval()
    with torch.no_grad():
        out = model(codes, positions)
    assert vals["val_code_ce"] == pytest.approx(float(out.code_loss), rel=1e-5)
    assert vals["val_pos_ce"] == pytest.approx(float(out.pos_loss), rel=1e-5)
    assert vals["val_bits_per_image"] == pytest.approx(float(out.code_loss + out.pos_loss) * 32 / math.log(2),
                                                       rel=1e-5)
    assert vals["val_images"] == 6
    assert ts.raster_share(torch.tensor([[0, 2, 1, 5], [3, 4, 6, 7]])) == pytest.approx(5 / 6)


@pytest.mark.parametrize("override, key", [
    ("stackformer.lr=0", "stackformer.lr"),
    ("stackformer.grad_clip=-1", "stackformer.grad_clip"),
    ("stackformer.num_eval_records=0", "stackformer.num_eval_records"),
    ("stackformer.num_loader_workers=-1", "stackformer.num_loader_workers"),
    ("stackformer.dropout=1.0", "stackformer.dropout"),
    ("stackformer.n_layer_pos=0", "stackformer.n_layer_pos"),
    ("evaluate.sampling.top_p=0", "evaluate.sampling.top_p"),
    ("evaluate.sampling.pos_top_k=0", "evaluate.sampling.pos_top_k"),
    ("evaluate.sampling.temperature=-1", "evaluate.sampling.temperature"),
    ("evaluate.sampling.guidance_scale=-0.5", "evaluate.sampling.guidance_scale"),
    ("stackformer.cond_dropout=1.0", "stackformer.cond_dropout"),
    ("stackformer.conditional=false stackformer.cond_dropout=0.1", "stackformer.cond_dropout"),
])
def test_config_refuses_bad_values_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve("tiny", overrides=override.split())


def test_guidance_training_on_unlabeled_data_is_refused_with_the_reason() -> None:
    from types import SimpleNamespace

    from infra.config import fullgrid_config, stackformer_config

    s = resolve("tiny", overrides=["stackformer.cond_dropout=0.1"]).stackformer
    tok = SimpleNamespace(codebook_size=32, grid_size=8, seq_len=32)
    assert stackformer_config(s, tok, num_classes=10).null_class == 10
    assert fullgrid_config(s, tok, num_classes=10).code_vocab_size == 32 + 10 + 1
    with pytest.raises(ConfigError, match="needs class labels or captions, and this data"):
        stackformer_config(s, tok, num_classes=0)
