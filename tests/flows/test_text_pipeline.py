"""Text-conditional generation end to end on the generated shapes data, through the real stages (Prefect, Ray with
2 CPUs, MLflow, LMDB): captions in the shards, caption ids in the token databases, a text-conditional Stackformer
trained for guidance, its caption tokenizer shipped beside its weights, the evaluation's caption alignment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from infra import shapes
from infra.config import resolve

pytestmark = pytest.mark.slow


def _cfg_overrides() -> list[str]:
    return ["data.shapes_train=256", "data.shapes_val=64", "tokenizer.max_steps=12", "tokenizer.eval_every=12",
            "tokenizer.checkpoint_every=12", "stackformer.max_steps=12", "stackformer.eval_every=12",
            "stackformer.checkpoint_every=12", "evaluate.num_samples=32"]


def _cfg(root: Path, *extra: str):
    return resolve("tiny-text", overrides=[f"run.root={root}", *_cfg_overrides(), *extra])


@pytest.fixture(scope="module")
def text_run(prefect_api, tmp_path_factory: pytest.TempPathFactory):
    from flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("text")
    cfg = _cfg(root)
    return root, cfg, run_pipeline(cfg)


def test_captions_reach_the_token_databases_and_the_model(text_run) -> None:
    from infra.refs import load_generator
    from infra.shards import ShardSet, read_shard
    from infra.storage import sha256_file
    from infra.text import CaptionTokenizer
    from infra.tokens import TokenDataset

    _, cfg, refs = text_run
    ingest, tokens, model = refs["ingest"], refs["tokenize"], refs["train_stackformer"]
    assert ingest.captioned and ingest.caption_grammar == "shapes"
    assert tokens.text_len == cfg.text.max_len and 256 < tokens.text_vocab_size <= cfg.text.vocab_size
    tok = CaptionTokenizer.load(tokens.text_tokenizer, tokens.text_tokenizer_sha256)
    # the first train record's ids are the first train sample's caption
    shards = ShardSet.from_output(ingest)
    first = next(read_shard(shards.shards("train")[0].path))
    ds = TokenDataset(tokens.train_db)
    assert tok.decode(ds[0]["text"].tolist()) == first.caption
    assert ds[0]["text"].shape == (cfg.text.max_len,)
    # the model is text-conditional (not class-conditional, although shapes have labels) and guided
    assert model.model_config["text_vocab_size"] == tokens.text_vocab_size and model.num_classes == 0
    assert model.model_config["cond_dropout"] == 0.1 and model.text_len == cfg.text.max_len
    # its caption tokenizer travels beside its weights, with the same bytes
    assert Path(model.text_tokenizer).parent == Path(model.path)
    assert sha256_file(model.text_tokenizer) == model.text_tokenizer_sha256 == tokens.text_tokenizer_sha256
    net = load_generator(model)
    ids, _ = tok.encode(["a small red circle above a large blue square"] * 2, model.text_len)
    codes, positions = net.sample(2, None, text=torch.from_numpy(ids.astype(np.int64)), guidance_scale=3.0)
    assert codes.shape == positions.shape == (2, net.config.seq_len)


def test_the_evaluation_scores_caption_alignment_and_guidance_reaches_it(text_run) -> None:
    from flows.pipeline import run_pipeline

    root, _, refs = text_run
    report = json.loads(Path(refs["evaluate"].evaluation_json).read_text())
    m = report["metrics"]
    for name in ("caption_alignment", "caption_alignment_seen", "caption_alignment_count",
                 "reference_caption_alignment", "recon_caption_alignment"):
        assert 0.0 <= m[name] <= 1.0, name
    assert m["fid"] > 0 and report["prompts"][0] and len(report["prompts"]) == 32
    # prompts holding a colour-shape pair held out of training are scored apart from the seen ones; the overall
    # figure is the two weighted by their counts
    scenes = [shapes.parse_caption(p) for p in report["prompts"]]
    held = sum(1 for sc in scenes if sc is not None and shapes.is_heldout(sc))
    seen = sum(1 for sc in scenes if sc is not None) - held
    assert seen > 0 and 0.0 <= m["caption_alignment_seen"] <= 1.0
    if held:
        assert 0.0 <= m["caption_alignment_heldout"] <= 1.0
        mixed = (seen * m["caption_alignment_seen"] + held * m["caption_alignment_heldout"]) / (seen + held)
        assert math.isclose(m["caption_alignment"], mixed, abs_tol=1e-9)
    else:  # none drawn: named as unavailable, not a made-up number
        assert "caption_alignment_heldout" not in m and "caption_alignment_heldout" in report["unavailable"]
        assert math.isclose(m["caption_alignment"], m["caption_alignment_seen"], abs_tol=1e-9)
    assert (Path(refs["evaluate"].path) / report["pictures"]["captioned_samples"]).is_file()
    assert "per_class_grid" in report["pictures_missing"]
    ev = refs["train_evaluator"]
    assert ev.caption_grammar == "shapes" and 0.0 <= ev.metrics["val_caption_alignment"] <= 1.0
    # a guidance scale: only the evaluation runs again, and records it
    guided = run_pipeline(_cfg(root, "evaluate.sampling.guidance_scale=3.0"))
    for stage in ("ingest", "train_tokenizer", "tokenize", "train_stackformer", "train_evaluator"):
        assert guided[stage] == refs[stage], stage
    again = json.loads(Path(guided["evaluate"].evaluation_json).read_text())
    assert again["sampling"]["guidance_scale"] == 3.0 and report["sampling"]["guidance_scale"] == 1.0
    assert again["prompts"] == report["prompts"] and again["seeds"] == report["seeds"]
    assert 0.0 <= again["metrics"]["caption_alignment"] <= 1.0
    # ...and the sampler used it: the same seeds and captions drew other tokens
    from safetensors.torch import load_file

    def codes(ref, doc):
        return load_file(str(Path(ref.path) / doc["artifacts"]["samples"]))["codes"]

    plain_codes, guided_codes = codes(refs["evaluate"], report), codes(guided["evaluate"], again)
    assert plain_codes.shape == guided_codes.shape and not torch.equal(plain_codes, guided_codes)


def test_mqgen_sample_with_a_prompt_from_the_registry_champion(text_run, tmp_path) -> None:
    """The user's path: `mqgen sample --model champion --prompt ... --guidance 3` in a subprocess, the registry's
    bundle carrying the caption tokenizer; a prompt for a model without text, or none for a text model, is refused."""
    import os
    import subprocess
    import sys

    from PIL import Image

    root, _, _ = text_run
    env = dict(os.environ)
    base = [str(Path(sys.executable).parent / "mqgen"), "sample", "--preset", "tiny-text", f"run.root={root}"]
    out = tmp_path / "grid.png"
    done = subprocess.run([*base, "--model", "champion", "--prompt", "a small red circle above a large blue square",
                           "--n", "8", "--guidance", "3", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prompt 'a small red circle above a large blue square', guidance 3" in done.stdout
    with Image.open(out) as im:
        assert im.size[0] > 64
    missing = subprocess.run([*base, "--model", "champion", "--n", "2", "--out", str(tmp_path / "x.png")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "text-conditional: give --prompt" in missing.stderr
    # without --model: the finished model of the preset and overrides given (the README's form), which is the
    # champion here, so the same seed draws the same picture
    by_config = tmp_path / "by_config.png"
    done = subprocess.run([*base, *_cfg_overrides(), "--prompt", "a small red circle above a large blue square",
                           "--n", "8", "--guidance", "3", "--out", str(by_config)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert by_config.read_bytes() == out.read_bytes()


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_a_frozen_pretrained_encoder_from_a_local_folder_end_to_end(text_run, tmp_path) -> None:
    """`text.pretrained=DIR` (a tiny random CLIP text model saved by the real libraries): the tokenize stage stores
    the folder tokenizer's ids, the Stackformer reads the frozen encoder's states, the evaluation scores captions,
    and the exported bundle carries the encoder, so `mqgen sample --model DIR --prompt` works after the original
    folder is gone. Upstream stages are the shared text run's (cache hits)."""
    import os
    import shutil
    import subprocess
    import sys

    try:
        import transformers  # noqa: F401
    except ImportError:
        pytest.fail("transformers is missing: it is part of the set-up (make setup installs mqgen with its dev "
                    "extra, pip install -e '.[dev]')")
    from flows.pipeline import run_pipeline
    from infra.refs import caption_tokenizer, load_generator
    from infra.shards import ShardSet, read_shard
    from infra.text import CaptionTokenizer, pretrained_digest
    from infra.tokens import TokenDataset
    from tests.fixtures.pretrained_text import tiny_clip_folder

    root, _, refs = text_run
    folder = tiny_clip_folder(tmp_path / "clip-tiny")
    overrides = [f"text.pretrained={folder}", "registry.name=tiny-text-clip"]
    cfg = _cfg(root, *overrides)
    out = run_pipeline(cfg)
    for stage in ("ingest", "train_tokenizer", "train_evaluator"):
        assert out[stage] == refs[stage], stage
    tokens, model = out["tokenize"], out["train_stackformer"]
    assert tokens.key != refs["tokenize"].key and tokens.text_encoder_digest == pretrained_digest(folder)
    # the records hold the folder tokenizer's ids (start and end tokens included), shifted past padding
    first = next(read_shard(ShardSet.from_output(refs["ingest"]).shards("train")[0].path))
    expected, _ = CaptionTokenizer.from_pretrained(folder).encode([first.caption], cfg.text.max_len)
    assert np.array_equal(TokenDataset(tokens.train_db)[0]["text"].numpy(), expected[0].astype(np.int64))
    # the generator reads the frozen encoder's 32-wide states; its weights file holds no encoder weights
    assert model.model_config["text_width"] == 32 and model.text_encoder == str(folder)
    assert model.metrics["num_params"] < refs["train_stackformer"].metrics["num_params"]  # no trained encoder
    net = load_generator(model)
    ids, _ = caption_tokenizer(model).encode(["a small red circle above a large blue square"] * 2, model.text_len)
    codes, _ = net.sample(2, None, text=torch.from_numpy(ids.astype(np.int64)), guidance_scale=3.0)
    assert codes.shape == (2, net.config.seq_len)
    m = json.loads(Path(out["evaluate"].evaluation_json).read_text())["metrics"]
    assert 0.0 <= m["caption_alignment"] <= 1.0 and m["fid"] > 0
    # the registered MLflow model asks for the transformers extra its encoder needs (explicit tracking URI: the
    # process-wide one is never set by a test, later tests' stages would log into this root)
    import mlflow.artifacts

    from infra.tracking import Tracker

    tracker = Tracker(root, cfg.run.experiment)
    mv = tracker.client.get_model_version_by_alias(cfg.registry.model_name("stackformer", cfg.preset), "champion")
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp_path / "mlmodel"),
                                                         tracking_uri=tracker.uri))
    assert "mqgen[hf]" in (model_dir / "requirements.txt").read_text()
    # ... and MLflow's own loader samples it from a prompt per row (the caption changes the images)
    import pandas as pd

    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    prompts = ["a large green triangle", "a small red circle above a large blue square"]
    images = pyfunc.predict(pd.DataFrame({"n": [2, 2], "seed": [0, 0], "prompt": prompts}))
    assert images.shape == (4, 3, 16, 16) and str(images.dtype) == "uint8"
    assert not (images[:2] == images[2:]).all()
    with pytest.raises(Exception, match="give each row a 'prompt'"):
        pyfunc.predict(pd.DataFrame({"n": [1], "seed": [0]}))
    # the registry pins the caption tokenizer and the encoder: one swapped in the artifact store (its bundle index
    # rewritten to match) is refused when the version is loaded
    from infra.bundle import BundleError
    from infra.registry import load_bundle
    from infra.storage import sha256_file

    with load_bundle("champion", cfg) as (bundle, version):
        assert version.tags["mqgen.text_sha256"].split() == [bundle.generator.text_tokenizer_sha256,
                                                             model.text_encoder_digest]
    [stored] = [p.parent for p in (root / "mlartifacts").rglob("bundle/model_index.json")
                if model.text_encoder_digest in p.read_text()]
    index_file, tok_file = stored / "model_index.json", stored / "generator" / "text_tokenizer.json"
    index_bytes, tok_bytes = index_file.read_bytes(), tok_file.read_bytes()
    try:
        tok_file.write_bytes(tok_bytes.replace(b'"<|endoftext|>"', b'"<|endoftexT|>"', 1))
        index_file.write_text(index_bytes.decode().replace(json.loads(index_bytes)["components"]["generator"][
            "text_tokenizer_sha256"], sha256_file(tok_file)))
        with pytest.raises(BundleError, match="not the one registered"), load_bundle("champion", cfg):
            pass
    finally:
        index_file.write_bytes(index_bytes)
        tok_file.write_bytes(tok_bytes)
    # the folder moved: the keys hold its digest, not its path; the finished stages are found and read it there
    moved = folder.rename(tmp_path / "moved-clip")
    again = run_pipeline(_cfg(root, f"text.pretrained={moved}", "registry.name=tiny-text-clip"))
    assert again["train_stackformer"].key == model.key and again["tokenize"].key == tokens.key
    assert again["train_stackformer"].text_encoder == again["tokenize"].text_encoder == str(moved)
    assert load_generator(again["train_stackformer"]).config.text_width == 32
    moved.rename(folder)
    # the user's path: export, remove the original folder, sample from the bundle with a prompt
    mqgen = str(Path(sys.executable).parent / "mqgen")
    base = ["--preset", "tiny-text", f"run.root={root}", *overrides, *_cfg_overrides()]
    bundle = tmp_path / "bundle"
    done = subprocess.run([mqgen, "export", str(bundle), *base], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert pretrained_digest(bundle / "generator" / "text_encoder") == model.text_encoder_digest
    shutil.rmtree(folder)
    grid = tmp_path / "grid.png"
    done = subprocess.run([mqgen, "sample", "--model", str(bundle), "--prompt", "a large green triangle", "--n", "4",
                           "--guidance", "2", "--out", str(grid)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert grid.is_file() and "Loading weights" not in done.stderr
    # a bundle whose encoder file is a link out of the bundle is refused, even with the same bytes (same digest)
    from infra.bundle import BundleError, read_bundle

    config = bundle / "generator" / "text_encoder" / "config.json"
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to(outside)
    assert pretrained_digest(bundle / "generator" / "text_encoder") == model.text_encoder_digest
    with pytest.raises(BundleError, match="config.json points outside the bundle"):
        read_bundle(bundle)
