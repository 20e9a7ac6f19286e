"""The evaluate stage (and train_evaluator) on a tiny *trained* pipeline with the real torch-fidelity.

The upstream outputs are made once per module: ingest (scikit-learn digits, 16 px, labelled), a random-init
tiny MQ-VAE (the shared tokenize fixture: a legitimate tokenizer, only a poor one; it saves a Ray Train fit),
the real tokenize stage and the real train_stackformer stage (a few Ray Train steps). The full-grid baseline
on unlabelled data is hand-built (random-init models on an image-folder ingest): what is tested there is
the stage's reporting, not the model's quality.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from flows.stages import MissingInput, cached_refs, inputs_for
from infra.config import fullgrid_config, resolve, token_layout
from infra.metrics import InceptionWeightsMissing
from infra.refs import load_generator, load_tokenizer
from infra.storage import read_json, sha256_file
from infra.tracking import Tracker
from tasks import evaluate
from tests.fixtures.ingest_data import gradient
from tests.fixtures.tokenize_data import make_tokenizer, ray_cluster  # noqa: F401

pytestmark = pytest.mark.slow

EVAL = ["evaluate.num_samples=40", "evaluate.batch_size=16", "evaluate.num_recon_images=48",
        "evaluate.classifier.max_steps=40", "evaluate.classifier.width=8", "evaluate.classifier.batch_size=64"]


def _cfg(root: Path, *extra: str):
    return resolve("tiny", overrides=[
        f"run.root={root}", "data.source=digits", "data.min_shards=1", "ray.num_workers=1",
        "stackformer.max_steps=6", "stackformer.eval_every=6", "stackformer.checkpoint_every=6", *EVAL, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path, ray_cluster: str  # noqa: F811
            ) -> dict[str, Any]:
    """A tiny pipeline: real ingest, tokenize and train_stackformer stages on a random-init tokenizer."""
    from tasks import ingest, tokenize, train_evaluator, train_stackformer

    root = tmp_path_factory.mktemp("evaluate")
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")  # skip the schema migrations
    cfg = _cfg(root)
    up: dict[str, Any] = {"ingest": ingest.run(cfg)}
    up["train_tokenizer"] = make_tokenizer(cfg)
    up["tokenize"] = tokenize.run(cfg, inputs_for("tokenize", up))
    up["train_stackformer"] = train_stackformer.run(cfg, inputs_for("train_stackformer", up))
    up["train_evaluator"] = train_evaluator.run(cfg, inputs_for("train_evaluator", up))
    return {"root": root, "cfg": cfg, "upstream": up}


@pytest.fixture(scope="module")
def evaluated(trained: dict[str, Any]) -> evaluate.EvaluateOutput:
    return evaluate.run(trained["cfg"], inputs_for("evaluate", trained["upstream"]))


def _png(path: Path) -> Image.Image:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
        im.load()
        return im


def test_evaluation_of_a_tiny_trained_pipeline_writes_a_complete_evaluation_json_and_grids(
        trained: dict[str, Any], evaluated: evaluate.EvaluateOutput) -> None:
    from safetensors.torch import load_file

    cfg, up = trained["cfg"], trained["upstream"]
    out = evaluated
    report = read_json(out.evaluation_json)
    assert Path(out.evaluation_json) == Path(cfg.run.root) / "evaluate" / out.key / "evaluation.json"
    assert report["format"] == "mqgen.evaluation/1" and report["stage_key"] == out.key
    # the extractor is named everywhere, and is never called Inception
    assert report["extractor"] == out.extractor == "classifier-digits"
    assert report["extractor_info"]["kind"] == "classifier"
    text = json.dumps({"definitions": report["definitions"], "extractor": report["extractor_info"]})
    assert "Inception" not in text.replace("Not Inception", "")
    assert "classifier-digits" in report["definitions"]["fid"]
    assert report["n"] == 40
    assert report["set_sizes"] == {"samples": 40, "reference": up["ingest"].num_val, "reconstructions": 48,
                                   "evaluator_val": up["ingest"].num_val}
    assert report["seeds"]["global"] == cfg.seed and isinstance(report["seeds"]["sampling"], int)
    # every figure has a definition and a value, or a reason it is unavailable
    metrics, unavailable = report["metrics"], report["unavailable"]
    assert set(metrics) == set(report["definitions"])
    for name, value in metrics.items():
        assert (value is not None) != (name in unavailable), name
    assert unavailable == {}, unavailable  # a labelled, class-conditional Stackformer: everything computed
    assert metrics["fid"] > 0 and metrics["rfid"] > 0 and metrics["kid_std"] >= 0
    assert 1.0 <= metrics["isc_mean"] <= 10 and 1.0 <= metrics["reference_isc_mean"] <= 10
    assert 0 <= metrics["sample_class_accuracy"] <= 1 and 0 < metrics["evaluator_val_accuracy"] <= 1
    assert 0 < metrics["recon_l1"] < 1 and metrics["recon_psnr"] > 0 and -1 <= metrics["recon_ssim"] <= 1
    assert metrics["tokens_per_image"] == 32  # 8x8 grid, keep_ratio 0.5
    assert metrics["sampling_images_per_s"] > 0 and metrics["decode_images_per_s"] > 0
    assert 0 <= metrics["sample_raster_share"] <= 1 and 0 < metrics["sample_code_usage"] <= 1
    assert out.metrics == metrics
    # pictures: PNGs of the promised shapes
    expected = {"samples_grid", "per_class_grid", "reconstructions", "mask_overlay_val", "mask_overlay_samples",
                "code_usage_samples", "code_usage_val"}
    assert set(report["pictures"]) == expected and report["pictures_missing"] == {}
    for rel in report["pictures"].values():
        assert _png(Path(out.path) / rel).mode in ("RGB", "RGBA")
    per_class = _png(Path(out.path) / report["pictures"]["per_class_grid"])
    cell = 16 * 4 + 1  # 16 px images scaled 4x, 1 px padding
    assert per_class.size[1] == 10 * cell + 1  # one row per class
    # the samples: a tensor file matching its manifest, labels balanced over the classes
    manifest = read_json(Path(out.path) / "samples_manifest.json")
    assert manifest["sha256"] == sha256_file(Path(out.path) / "samples.safetensors") == \
        report["artifacts"]["samples_sha256"]
    samples = load_file(str(Path(out.path) / "samples.safetensors"))
    assert samples["images"].dtype == torch.uint8 and samples["images"].shape == (40, 1, 16, 16)
    assert torch.equal(samples["labels"], torch.arange(40) % 10)
    assert samples["codes"].shape == samples["positions"].shape == (40, 32)
    assert (samples["positions"][:, 1:] > samples["positions"][:, :-1]).all()
    assert not (Path(out.path) / "batches").exists()  # folded into samples.safetensors
    # MLflow: metrics, pictures and evaluation.json on the evaluate run; the evaluator's accuracy on its own
    client = Tracker(cfg.run.root, cfg.run.experiment).client
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mqgen.extractor"] == "classifier-digits"
    assert run.data.metrics["fid"] == pytest.approx(metrics["fid"])
    assert {"evaluation.json", "samples_manifest.json", "pictures"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(client.list_artifacts(run.info.run_id, "pictures")) == len(expected)
    from tasks import train_evaluator

    ev = train_evaluator.cached(cfg, inputs_for("train_evaluator", up))
    assert ev is not None and ev.extractor_name == "classifier-digits" and ev.num_classes == 10
    assert client.get_run(ev.mlflow_run_id).data.metrics["val_accuracy"] == pytest.approx(ev.val_accuracy)
    # the reference statistics are cached under the run root, named by the set's hash and the weights
    cache = sorted(p.name for p in (Path(cfg.run.root) / "fidelity_cache").iterdir())
    assert cache and all(n.startswith(f"ref-{report['data']['reference_set_hash']}-w{ev.sha256[:12]}-") for n in cache)


def test_a_complete_evaluation_is_a_cache_hit(trained: dict[str, Any], evaluated: evaluate.EvaluateOutput) -> None:
    import time

    t0 = time.perf_counter()
    again = evaluate.run(trained["cfg"], inputs_for("evaluate", trained["upstream"]))
    assert again == evaluated and time.perf_counter() - t0 < 10
    assert evaluate.cached(trained["cfg"], inputs_for("evaluate", trained["upstream"])) == evaluated


def test_a_killed_evaluation_resumes_at_the_next_sample_batch(trained: dict[str, Any], monkeypatch) -> None:
    cfg = _cfg(trained["root"], "evaluate.sampling.temperature=0.9")  # another key than the default run
    real = evaluate.sample_batch
    calls = []

    def dies_on_the_third_batch(*args: Any, **kwargs: Any):
        calls.append(args[2])
        if len(calls) == 3:  # warm-up, batch 0, then batch 1 dies
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "sample_batch", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(cfg, inputs_for("evaluate", trained["upstream"]))
    monkeypatch.setattr(evaluate, "sample_batch", real)
    out = evaluate.run(cfg, inputs_for("evaluate", trained["upstream"]))
    report = read_json(out.evaluation_json)
    assert report["sampling"]["resumed_batches"] == 1
    # the resumed samples are exactly those an uninterrupted run draws: batch b from seed sampling + b
    from safetensors.torch import load_file

    up = trained["upstream"]
    model = load_generator(up["train_stackformer"])
    tok = load_tokenizer(up["train_tokenizer"])
    images = load_file(str(Path(out.path) / "samples.safetensors"))["images"]
    seed = report["seeds"]["sampling"]
    for b in (0, 1):
        g = torch.Generator().manual_seed(seed + b)
        fresh = evaluate.sample_batch(model, tok, 16, torch.arange(16 * b, 16 * b + 16) % 10, cfg, g,
                                      torch.device("cpu"))
        assert torch.equal(fresh.images, images[16 * b:16 * (b + 1)]), b


def test_inception_opt_in_without_weights_fails_before_sampling(trained: dict[str, Any], tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cfg = _cfg(trained["root"], "evaluate.extractor=inception-v3-compat",
               f"evaluate.inception_weights={tmp_path / 'missing.pth'}")
    before = set((Path(trained["root"]) / "evaluate").iterdir())
    with pytest.raises(InceptionWeightsMissing, match="evaluate.inception_weights=.*missing.pth does not exist"):
        evaluate.run(cfg, inputs_for("evaluate", trained["upstream"]))
    assert set((Path(trained["root"]) / "evaluate").iterdir()) == before  # nothing sampled, nothing written


def test_missing_upstream_stages_are_named(make_run_root) -> None:
    root = make_run_root("empty")
    with pytest.raises(MissingInput, match="needs the ingest output.*run the ingest stage first"):
        inputs_for("evaluate", cached_refs(_cfg(root)))


def test_full_grid_baseline_on_unlabelled_data_reports_the_same_figures_and_classifier_metrics_unavailable(
        make_run_root) -> None:
    """Hand-built: random-init keep_ratio=1.0 tokenizer and unconditional full-grid model on a flat image folder."""
    from safetensors.torch import save_file

    from infra.refs import EvaluateInputs, EvaluatorInputs, StackformerOutput
    from models.stackformer import FullGridTransformer
    from tasks import ingest, train_evaluator

    root = make_run_root("unlabelled")
    folder = root.parent / "images"
    folder.mkdir()
    for i in range(60):
        gradient((20, 20), seed=i).save(folder / f"img{i:03d}.png")
    cfg = _cfg(root, "data.source=image-folder", f"data.path={folder}", "data.val_fraction=0.4",
               "tokenizer.keep_ratio=1.0", "stackformer.model=fullgrid", "stackformer.conditional=false",
               "evaluate.num_recon_images=16")
    ing = ingest.run(cfg)
    assert ing.num_classes == 0
    assert "has no labels" in train_evaluator.skip_reason(cfg, EvaluatorInputs(ingest=ing))  # the flow skips it
    with pytest.raises(train_evaluator.ClassifierUnavailable, match="has no labels"):
        train_evaluator.run(cfg, EvaluatorInputs(ingest=ing))
    tok = make_tokenizer(cfg)
    mc = fullgrid_config(cfg.stackformer, token_layout(cfg), num_classes=0)
    torch.manual_seed(0)
    weights = root / "fullgrid" / "model.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in FullGridTransformer(mc).state_dict().items()}, str(weights))
    model = StackformerOutput(path=str(weights.parent), key="hand-built", weights=str(weights),
                              sha256=sha256_file(weights), step=0, model="fullgrid", model_config=asdict(mc),
                              tokenizer_sha256=tok.sha256, num_classes=0)
    out = evaluate.run(cfg, EvaluateInputs(ingest=ing, train_tokenizer=tok, train_stackformer=model))
    report = read_json(out.evaluation_json)
    assert report["extractor"] is None and out.extractor == ""
    m, why = report["metrics"], report["unavailable"]
    for name in ("fid", "kid_mean", "isc_mean", "rfid", "reference_isc_mean", "sample_class_accuracy"):
        assert m[name] is None and "has no labels" in why[name], name
    assert m["tokens_per_image"] == 64 and m["sampling_images_per_s"] > 0 and m["decode_images_per_s"] > 0
    assert m["recon_psnr"] > 0 and m["sample_code_usage"] > 0
    assert m["sample_raster_share"] is None and "raster order" in why["sample_raster_share"]
    assert set(report["pictures_missing"]) == {"per_class_grid", "mask_overlay_samples"}
    assert {"samples_grid", "reconstructions", "mask_overlay_val", "code_usage_samples"} <= set(report["pictures"])
