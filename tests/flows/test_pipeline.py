"""The whole pipeline through real Prefect (test harness), real Ray (local, 2 CPUs) and real MLflow (sqlite)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from infra.config import STAGES, resolve

pytestmark = pytest.mark.slow


def _cfg(root: Path, *extra: str):
    return resolve("tiny", overrides=[f"run.root={root}", "tokenizer.max_steps=12", "tokenizer.eval_every=12",
                                      "tokenizer.checkpoint_every=12", "stackformer.max_steps=12",
                                      "stackformer.eval_every=12", "stackformer.checkpoint_every=12",
                                      "evaluate.num_samples=32", *extra])


def test_end_to_end_then_cached_rerun_then_only_and_from(finished) -> None:
    from flows.pipeline import run_pipeline, select_stages

    root, cfg, refs = finished
    assert list(refs) == list(STAGES)
    for stage, ref in refs.items():
        assert Path(ref.path).is_dir(), stage
        assert ref.mlflow_run_id, stage
    evaluation = json.loads(Path(refs["evaluate"].evaluation_json).read_text())
    assert evaluation["n"] == 32 and "extractor" in evaluation

    pipelines = _runs(root, "pipeline")
    first = pipelines[0]
    assert first.info.status == "FINISHED" and first.data.tags["mqgen.config_hash"] == cfg.hash()
    client = _client(root)
    for stage, ref in refs.items():
        assert client.get_run(ref.mlflow_run_id).data.tags.get("mlflow.parentRunId") == first.info.run_id

    # the same config again: every stage is a cache hit, no model work, same references
    ray_dirs = sorted(p.name for p in (root / "ray").iterdir())
    t0 = time.time()
    again = run_pipeline(cfg)
    assert time.time() - t0 < 60
    assert {k: v.to_dict() for k, v in again.items()} == {k: v.to_dict() for k, v in refs.items()}
    assert sorted(p.name for p in (root / "ray").iterdir()) == ray_dirs  # no new training run
    # the Prefect table artifact of that run says so, stage by stage (the first run's says computed)
    def cached(run) -> dict:
        return {r["stage"]: r.get("cached") for r in _figures_table(run) if r["stage"] in STAGES}

    assert cached(_runs(root, "pipeline")[-1]) == dict.fromkeys(STAGES, True)
    assert cached(first) == dict.fromkeys(STAGES, False)

    # --only runs one stage on cached inputs; --from forces a rerun of that stage and every later one
    only = run_pipeline(cfg, only="tokenize")
    assert list(only) == ["tokenize"] and only["tokenize"] == refs["tokenize"]
    assert select_stages(from_stage="tokenize") == ["tokenize", "train_stackformer", "evaluate"]
    evaluation_mtime = Path(refs["evaluate"].evaluation_json).stat().st_mtime_ns
    forced = run_pipeline(cfg, from_stage="train_stackformer")
    assert list(forced) == ["train_stackformer", "evaluate"]
    key = refs["train_stackformer"].key
    assert (root / "ray" / f"train_stackformer-{key}-a1").is_dir()  # trained again, as a new attempt
    assert Path(forced["evaluate"].evaluation_json).stat().st_mtime_ns > evaluation_mtime  # evaluated again
    assert forced["train_stackformer"].key == key
    # the new attempt's curves follow the first attempt's in the stage's one MLflow run (not dropped as repeats)
    steps = [m.step for m in client.get_metric_history(refs["train_stackformer"].mlflow_run_id, "train_loss")]
    assert forced["train_stackformer"].mlflow_run_id == refs["train_stackformer"].mlflow_run_id
    assert len(steps) == len(set(steps)) and max(steps) > 12 and min(steps) <= 12


def _figures_table(pipeline_run) -> list[dict]:
    """The rows of the Prefect table artifact the pipeline run published."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[pipeline_run.data.tags["mqgen.prefect_flow_run_id"]])))
    [table] = [a for a in arts if a.type == "table"]
    return json.loads(table.data) if isinstance(table.data, str) else table.data


def _client(root: Path):
    from infra.tracking import Tracker

    return Tracker(root, "mqgen").client


def _runs(root: Path, kind: str) -> list:
    from infra.tracking import Tracker

    client = Tracker(root, "mqgen").client
    exp = client.get_experiment_by_name("mqgen").experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mqgen.kind` = '{kind}'",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def finished(prefect_api, tmp_path_factory: pytest.TempPathFactory):
    """A finished tiny pipeline shared by the tests below (its root, config and references)."""
    from flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("finished")
    cfg = _cfg(root)
    return root, cfg, run_pipeline(cfg)


def test_results_are_json_references_and_the_parent_run_has_the_figures(finished) -> None:
    import importlib
    import pickle

    root, _, refs = finished
    records = sorted((root / "prefect-results").iterdir())
    seen = set()
    for rec in records:
        raw = rec.read_bytes()
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(raw)
        doc = json.loads(raw)
        assert doc["metadata"]["serializer"]["type"] == "json"
        ref = json.loads(doc["result"]) if isinstance(doc["result"], str) else doc["result"]
        module, cls = ref["__class__"].rsplit(".", 1)
        stage = rec.name.split("-", 1)[0]  # records are named <task name>-<task run id>.json
        loaded = getattr(importlib.import_module(module), cls).from_dict(ref["data"])
        assert Path(loaded.path).is_dir() and loaded.mlflow_run_id, rec  # a reference to real output
        seen.add(stage)
        if loaded.key == refs[stage].key and stage not in ("train_stackformer", "evaluate"):  # (--from redid those)
            assert loaded == refs[stage]
    assert seen == set(STAGES)
    parent = _runs(root, "pipeline")[0]  # the run that computed the stages (later ones: reruns, --only)
    assert parent.data.metrics["fid"] == pytest.approx(refs["evaluate"].metrics["fid"])
    assert "recon_psnr" in parent.data.metrics and "tokenizer.val_psnr" in parent.data.metrics
    _check_registry_and_lineage(root, refs, parent)


def _check_registry_and_lineage(root: Path, refs: dict, parent) -> None:
    """Both models registered, the first evaluated version took ``champion`` (its FID interval recorded),
    the datasets each stage read are run inputs, the source tags are set, the experiment opens on its runs, and
    the Prefect flow run has its summary, table and link artifacts."""
    client = _client(root)
    ev = json.loads(Path(refs["evaluate"].evaluation_json).read_text())
    iv = ev["fid_interval"]
    assert iv["low"] <= ev["metrics"]["fid"] <= iv["high"] and iv["std"] > 0 and iv["resamples"] == 100
    assert len(ev["reference_statistics"]["reference_features_sha256"]) == 64
    gen = client.get_model_version_by_alias("mqgen-stackformer-tiny", "champion")
    tok = client.get_model_version_by_alias("mqgen-tokenizer-tiny", "champion")
    assert gen.run_id == refs["train_stackformer"].mlflow_run_id and gen.tags["mqgen.promotion"].startswith("first")
    assert tok.run_id == refs["train_tokenizer"].mlflow_run_id
    assert gen.tags["mqgen.weights_sha256"] == refs["train_stackformer"].sha256
    assert parent.data.tags["mqgen.promotion.decision"] == "first"
    assert float(parent.data.tags["mqgen.promotion.new_fid"]) == pytest.approx(ev["metrics"]["fid"])
    logged = client.search_logged_models([parent.info.experiment_id])
    assert {m.source_run_id for m in logged} >= {gen.run_id, tok.run_id}
    for version in (gen, tok):  # the stage run lists its model as an output (the runs table's Models column)
        outputs = {o.model_id for o in client.get_run(version.run_id).outputs.model_outputs}
        assert outputs and outputs <= {m.model_id for m in logged if m.source_run_id == version.run_id}, outputs
    inputs = {stage: {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
                      for d in client.get_run(refs[stage].mlflow_run_id).inputs.dataset_inputs}
              for stage in ("train_tokenizer", "tokenize", "train_stackformer", "evaluate")}
    ingest = f"ingest-{refs['ingest'].key}"
    assert inputs["train_tokenizer"] == {ingest: "training"} and inputs["tokenize"] == {ingest: "input"}
    assert inputs["train_stackformer"] == {f"tokens-{refs['tokenize'].key}": "training"}
    assert inputs["evaluate"][ingest] == "evaluation" and "reference" in inputs["evaluate"].values()
    # the pipeline run lists them too (its row in the runs table): every dataset once, and both models
    pipeline_run = client.get_run(parent.info.run_id)
    on_parent = {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
                 for d in pipeline_run.inputs.dataset_inputs}
    assert on_parent == {**inputs["evaluate"], **inputs["train_stackformer"], ingest: "training"}, on_parent
    assert len(pipeline_run.inputs.dataset_inputs) == len(on_parent)
    assert {o.model_id for o in pipeline_run.outputs.model_outputs} == {
        o.model_id for v in (gen, tok) for o in client.get_run(v.run_id).outputs.model_outputs}
    run_tags = client.get_run(refs["evaluate"].mlflow_run_id).data.tags
    assert run_tags["mlflow.source.type"] == "LOCAL" and run_tags["mlflow.source.name"]
    from infra.storage import sha256_file

    assert run_tags["mqgen.sha256.evaluation.json"] == sha256_file(refs["evaluate"].evaluation_json)
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[parent.data.tags["mqgen.prefect_flow_run_id"]])))
    by_key = {a.key.rsplit("-", 1)[-1]: a for a in arts}  # <preset>-<hash>, ...-figures, ...-mlflow
    assert {"figures", "mlflow"} <= set(by_key) and len(arts) == 3, [(a.key, a.type) for a in arts]
    summary = next(a for a in arts if a.key not in (by_key["figures"].key, by_key["mlflow"].key))
    assert "## Promotion" in summary.data and f"{ev['metrics']['fid']:.4g}" in summary.data
    assert by_key["figures"].type == "table" and parent.info.run_id in by_key["mlflow"].data  # (a link)


def test_changing_a_tokenizer_field_reruns_exactly_the_downstream_stages(finished) -> None:
    from flows.pipeline import run_pipeline
    from flows.stages import descendants

    root, cfg, refs = finished
    before = _client(root).get_model_version_by_alias("mqgen-stackformer-tiny", "champion")
    ingest_mtime = (Path(refs["ingest"].path) / "manifest.json").stat().st_mtime_ns
    changed = run_pipeline(_cfg(root, "tokenizer.keep_ratio=0.75"))
    assert changed["ingest"] == refs["ingest"]
    assert changed["train_evaluator"] == refs["train_evaluator"]  # reads ingest only: reused
    assert (Path(refs["ingest"].path) / "manifest.json").stat().st_mtime_ns == ingest_mtime
    for stage in sorted(descendants("train_tokenizer")):
        assert changed[stage].key != refs[stage].key, stage
        assert changed[stage].path != refs[stage].path, stage
        assert changed[stage].mlflow_run_id != refs[stage].mlflow_run_id, stage
    # the earlier outputs are untouched and still verified as done for their own config
    from flows.pipeline import stage_status

    assert [row["state"] for row in stage_status(cfg)] == ["done"] * len(STAGES)

    # the second config's Stackformer is version 2 of the same registered model: the gate compared it with the
    # champion on the same evaluation protocol and recorded why it moved the alias or not
    client = _client(root)
    [v2] = client.search_model_versions(f"name = 'mqgen-stackformer-tiny' and run_id = "
                                        f"'{changed['train_stackformer'].mlflow_run_id}'")
    decision = v2.tags["mqgen.promotion"]
    assert decision.startswith(("promoted", "kept")), decision
    champion = client.get_model_version_by_alias("mqgen-stackformer-tiny", "champion")
    assert champion.version == (v2.version if decision.startswith("promoted") else before.version)
    tok_champion = client.get_model_version_by_alias("mqgen-tokenizer-tiny", "champion")
    assert tok_champion.tags["mqgen.weights_sha256"] == champion.tags["mqgen.tokenizer_sha256"]

    # A new evaluation protocol (here another sample count; on a nightly retrain, new data and a new evaluator):
    # the champion has no figure on it, so the gate first evaluates the champion there (the evaluate stage on its
    # registered weights) and then decides, instead of keeping it as "not comparable" for ever.
    from infra import registry

    client.set_registered_model_alias("mqgen-stackformer-tiny", "champion", v2.version)  # (as a user may do)
    before_protocols = {k for k in v2.tags if k.startswith(registry.EVAL_PREFIX) and k.endswith(".fid")}
    other = run_pipeline(_cfg(root, "evaluate.num_samples=24"), only="evaluate")
    tags = client.get_run(other["evaluate"].mlflow_run_id).data.tags
    assert tags["mqgen.promotion.decision"] in ("promoted", "kept"), tags
    assert "re-evaluated on this protocol" in tags["mqgen.promotion.reason"]
    assert tags["mqgen.promotion.champion_version"] == str(v2.version)
    v2_now = client.get_model_version("mqgen-stackformer-tiny", v2.version)
    [new_protocol] = {k for k in v2_now.tags if k.startswith(registry.EVAL_PREFIX) and k.endswith(".fid")} - before_protocols
    assert float(v2_now.tags[new_protocol]) == float(tags["mqgen.promotion.champion_fid"])
    rescored_run = client.get_run(v2_now.tags[new_protocol[:-len("fid")] + "run_id"])
    assert rescored_run.data.tags["mqgen.model_sha256"] == v2.tags[registry.TAG_SHA]  # the champion's weights
    assert json.loads(v2_now.tags[new_protocol[:-len("fid")] + "protocol"])["samples"] == 24
    holder = str(client.get_model_version_by_alias("mqgen-stackformer-tiny", "champion").version)
    assert holder == (str(v2.version) if tags["mqgen.promotion.decision"] == "kept" else
                      tags["mqgen.promotion.model"].rsplit("/", 1)[1])


def test_status_says_why_a_stage_is_not_done_against_its_nearest_earlier_output(finished, monkeypatch) -> None:
    """A changed setting (or a stage version bump after an upgrade) gives a new key: `mqgen status` names the key
    the stage will have and what differs from the nearest finished output of that stage on the root."""
    import subprocess
    import sys

    from flows.pipeline import stage_status
    from infra.storage import KEY_DOC
    from tasks import train_stackformer

    root, cfg, refs = finished
    for stage in STAGES:  # every finished output keeps what its key hashes
        assert (Path(refs[stage].path) / KEY_DOC).is_file(), stage
    overrides = [f"run.root={root}", "tokenizer.max_steps=12", "tokenizer.eval_every=12",
                 "tokenizer.checkpoint_every=12", "stackformer.max_steps=16", "stackformer.eval_every=12",
                 "stackformer.checkpoint_every=12", "evaluate.num_samples=32"]
    out = subprocess.run([sys.executable, "-c", "from flows.cli import app; app()", "status", "--preset", "tiny",
                          *overrides], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["stage"]: r for r in stage_status(resolve("tiny", overrides=overrides))}
    sf = rows["train_stackformer"]
    assert sf["state"] == "not done" and sf["key"] not in ("", refs["train_stackformer"].key)
    assert f"the nearest earlier output {refs['train_stackformer'].key}" in sf["why"], sf
    assert sf["why"].endswith("differs in stackformer.max_steps: 12 -> 16"), sf
    assert f"why train_stackformer is not done (key {sf['key']})" in " ".join(out.stdout.split())
    assert rows["evaluate"]["state"] == "waiting" and rows["evaluate"]["why"] == ""

    monkeypatch.setattr(train_stackformer, "VERSION", "2")  # what a deliberate bump looks like after an upgrade
    [row] = [r for r in stage_status(cfg) if r["stage"] == "train_stackformer"]
    assert row["state"] == "not done" and row["why"].endswith("differs in version: 1 -> 2"), row


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_a_moved_run_root_is_found_complete_and_reads_only_its_own_files(finished, tmp_path) -> None:
    """A user moves (or copies) a finished run root to another disk and runs the same command there: every stage
    is a cache hit whose references point into the new root (never the old one), and the MLflow store's artifact
    locations follow, so the registry's champion still loads by alias."""
    import shutil
    import sqlite3
    import subprocess
    import sys

    from flows.stages import cached_refs

    root, _, refs = finished
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(root, moved, symlinks=True)
    overrides = [f"run.root={moved}", "tokenizer.max_steps=12", "tokenizer.eval_every=12",
                 "tokenizer.checkpoint_every=12", "stackformer.max_steps=12", "stackformer.eval_every=12",
                 "stackformer.checkpoint_every=12", "evaluate.num_samples=32"]
    found = cached_refs(resolve("tiny", overrides=overrides))
    assert sorted(found) == sorted(STAGES)
    for stage, ref in found.items():
        assert ref.key == refs[stage].key, stage
        strings = [v for v in json.dumps(ref.to_dict()).split('"') if v.startswith("/")]
        assert strings and all(v.startswith(str(moved)) for v in strings if str(root) in v or str(moved) in v), \
            (stage, strings)
        assert not any(v.startswith(str(root) + "/") for v in strings), (stage, strings)

    cli = [sys.executable, "-c", "from flows.cli import app; app()"]
    rerun = subprocess.run([*cli, "run", "--preset", "tiny", *overrides], capture_output=True, text=True,
                           timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "are done for config" in rerun.stderr, rerun.stderr[-3000:]
    sample = subprocess.run([*cli, "sample", "--preset", "tiny", "--model", "champion", "--n", "4", "--out",
                             str(tmp_path / "s.png"), *overrides], capture_output=True, text=True, timeout=300,
                            check=False)
    assert sample.returncode == 0, sample.stderr[-3000:]
    with sqlite3.connect(moved / "mlflow.db") as con:
        uris = [u for (u,) in con.execute("select artifact_uri from runs union all select source from model_versions")]
    assert uris and all(u.startswith((moved / "mlartifacts").as_uri()) for u in uris), uris[:3]
    with sqlite3.connect(root / "mlflow.db") as con:  # the original store is untouched
        assert all(u.startswith((root / "mlartifacts").as_uri()) for (u,) in con.execute("select artifact_uri from runs"))


@pytest.mark.long
def test_the_plain_vqgan_baseline_runs_through_every_stage_and_samples_by_preset(finished, tmp_path) -> None:
    """The paper's baseline (a VQGAN tokenizer without masker and de-masker + the autoregressive model over the
    full grid) is trained, tokenized, evaluated and sampled through the same stages as MQ-VAE."""
    import math
    import subprocess
    import sys

    from safetensors import safe_open

    from flows.pipeline import run_pipeline

    root, _, refs = finished
    extra = ("tokenizer.architecture=vqgan", "tokenizer.keep_ratio=1.0", "stackformer.model=fullgrid")
    base = run_pipeline(_cfg(root, *extra))
    assert base["ingest"] == refs["ingest"] and base["train_evaluator"] == refs["train_evaluator"]  # shared
    tok = base["train_tokenizer"]
    assert tok.mqvae_config.architecture == "vqgan" and tok.seq_len == tok.grid_size ** 2
    with safe_open(tok.weights, "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), no iteration
    assert not modules & {"masker", "demasker"}, modules
    assert base["train_stackformer"].tokens_per_image == tok.grid_size ** 2
    metrics = base["evaluate"].metrics
    assert math.isfinite(metrics["fid"]) and metrics["tokens_per_image"] == tok.grid_size ** 2

    overrides = [f"run.root={root}", "tokenizer.max_steps=12", "tokenizer.eval_every=12",
                 "tokenizer.checkpoint_every=12", "stackformer.max_steps=12", "stackformer.eval_every=12",
                 "stackformer.checkpoint_every=12", "evaluate.num_samples=32", *extra]
    out = subprocess.run([sys.executable, "-c", "from flows.cli import app; app()", "sample", "--preset", "tiny",
                          "--n", "4", "--out", str(tmp_path / "vqgan.png"), *overrides], capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "vqgan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_guided_stackformer_trains_and_evaluates_with_classifier_free_guidance(finished) -> None:
    """``stackformer.cond_dropout`` retrains only the Stackformer (and evaluates it); the guidance scale reaches
    the sampler and the evaluation records it. The unguided model refuses a scale with a clear error."""
    from flows.pipeline import run_pipeline
    from infra.config import ConfigError
    from infra.refs import load_generator, load_tokenizer
    from tasks.evaluate import sample_batch

    root, _, refs = finished
    guided = run_pipeline(_cfg(root, "stackformer.cond_dropout=0.2", "evaluate.sampling.guidance_scale=2.0"))
    for stage in ("ingest", "train_tokenizer", "tokenize", "train_evaluator"):
        assert guided[stage] == refs[stage], stage
    assert guided["train_stackformer"].model_config["cond_dropout"] == 0.2
    report = json.loads((Path(guided["evaluate"].path) / "evaluation.json").read_text())
    assert report["sampling"]["guidance_scale"] == 2.0 and report["metrics"]["fid"] > 0
    import torch

    plain = load_generator(refs["train_stackformer"], torch.device("cpu"))
    tok = load_tokenizer(refs["train_tokenizer"], torch.device("cpu"))
    scaled = _cfg(root, "evaluate.sampling.guidance_scale=2.0")
    with pytest.raises(ConfigError, match="not trained for classifier-free guidance"):
        sample_batch(plain, tok, 2, torch.tensor([0, 1]), scaled, torch.Generator(), torch.device("cpu"))


def test_a_2x1_grid_shares_upstream_stages_and_yields_two_child_runs_with_their_figures(finished, tmp_path) -> None:
    from flows.grid import run_grid
    from flows.report import collect, log_report, write_report
    from infra.config import expand_grid
    from infra.tracking import Tracker

    root, _, refs = finished
    args = [f"run.root={root}", "tokenizer.max_steps=12", "tokenizer.eval_every=12", "tokenizer.checkpoint_every=12",
            "stackformer.max_steps=12", "stackformer.eval_every=12", "stackformer.checkpoint_every=12",
            "evaluate.num_samples=24", "tokenizer.keep_ratio=[0.5,0.75]"]
    trained_before = sorted(p.name for p in (root / "ray").iterdir())
    variants = expand_grid("tiny", None, args)
    assert [v.config.tokenizer.model.keep_ratio for v in variants] == [0.5, 0.75]
    result = run_grid(variants, name="test-grid")
    assert result.executions["ingest"] == 1  # shared by both variants
    assert result.executions["train_evaluator"] == 1
    assert result.executions["train_tokenizer"] == 2 and result.executions["evaluate"] == 2
    # the grid reused the finished pipeline's trained models (no new training run for them) and evaluated anew
    new_runs = sorted({p.name for p in (root / "ray").iterdir()} - set(trained_before))
    assert not [n for n in new_runs if refs["train_tokenizer"].key in n or refs["train_stackformer"].key in n], new_runs
    assert result.refs[0]["train_stackformer"]["key"] == refs["train_stackformer"].key
    assert result.refs[0]["evaluate"]["key"] != refs["evaluate"].key
    client = Tracker(root, "mqgen").client
    children = [client.get_run(r) for r in result.variant_run_ids]
    assert [c.data.tags["mlflow.parentRunId"] for c in children] == [result.grid_run_id] * 2
    assert [c.data.params["tokenizer.keep_ratio"] for c in children] == ["0.5", "0.75"]
    assert all(c.info.status == "FINISHED" for c in children)
    fids = [c.data.metrics["fid"] for c in children]
    assert fids[0] != fids[1]
    rows = _figures_table(client.get_run(result.grid_run_id))  # the grid's Prefect table: a row per variant
    assert [(r["variant"], r["tokenizer.keep_ratio"], r["run"]) for r in rows] == [
        (v.label, v.config.tokenizer.model.keep_ratio, run) for v, run in zip(variants, result.variant_run_ids)]
    assert [r["fid"] for r in rows] == pytest.approx(fids, abs=1e-4)
    ingest_run = client.get_run(result.refs[0]["ingest"]["mlflow_run_id"])
    assert result.refs[1]["ingest"]["mlflow_run_id"] == ingest_run.info.run_id

    comp = collect(Tracker(root, "mqgen"))  # the latest grid
    assert comp.parent_run_id == result.grid_run_id and comp.varying == ["tokenizer.keep_ratio"]
    paths = write_report(comp, tmp_path / "report")
    for key in ("html", "md", "fid", "sampling_images_per_s", "recon_psnr"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert paths["fid"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    assert "plots/fid_vs_keep_ratio.png" in html and f"{fids[0]:.4g}" in html
    assert write_report(comp, tmp_path / "report")["html"].is_file()  # an earlier report is replaced
    from flows.results import group_rows, write_results

    # the claims' document on real runs: two keep ratios, one seed, no random scorer nor baseline -> not testable
    assert sorted(g.get("tokenizer.keep_ratio") for g in group_rows(comp)) == ["0.5", "0.75"]
    doc = write_results(comp, tmp_path / "report", tracking_uri=Tracker(root, "mqgen").uri).read_text()
    assert "**not testable**: 1. Adaptive" in doc and f"{fids[0]:.4g}" in doc
    # the cost table's figures come from the training stages, the pictures from each variant's evaluate run
    for c in children:
        m = c.data.metrics
        assert m["tokenizer.num_params"] > 0 and m["stackformer.num_params"] > 0
        assert 0 < m["tokenizer.train_wall_s"] and 0 < m["stackformer.train_wall_s"]
    pictures = [line for line in doc.splitlines() if line.startswith("| keep_ratio=") and "![samples](" in line]
    assert len(pictures) == 2
    rel = pictures[0].split("![samples](")[1].split(")")[0]
    assert (tmp_path / "report" / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not an earlier report"):
        write_report(comp, root)  # never a folder with other things in it (here: the run root)
    (tmp_path / "report" / "notes.txt").write_text("mine")  # an earlier report with a user's file put inside
    with pytest.raises(ValueError, match="also holds notes.txt"):
        write_report(comp, tmp_path / "report")
    assert (tmp_path / "report" / "notes.txt").read_text() == "mine" and (tmp_path / "report" / "results.md").is_file()
    assert (root / "mlflow.db").is_file()
    log_report(Tracker(root, "mqgen"), comp, paths)
    logged = {a.path for a in client.list_artifacts(result.grid_run_id, "compare")}
    assert {"compare/report.html", "compare/report.md", "compare/plots"} <= logged


def test_gc_keeps_the_given_config_and_recent_runs_and_removes_the_rest(finished) -> None:
    """Last in this module: it removes outputs the tests above made. With the default 7 days every output is in
    use by a recent run and only the spent Ray Train runs go; with ``--keep-days 0`` (through the CLI, as a user
    runs it) everything but the given config's chain goes, except an output whose stage lock another process
    holds; the registry's champion still loads, and the MLflow run of a removed output says so."""
    import os
    import subprocess
    import sys

    from flows import gc
    from flows.pipeline import stage_status
    from infra.registry import load_bundle
    from infra.storage import file_lock

    root, _, refs = finished
    extra = ["tokenizer.keep_ratio=0.75"]
    keep = _cfg(root, *extra)
    chain = {(row["stage"], row["key"]) for row in stage_status(keep)}
    assert len(chain) == len(STAGES)

    items = gc.plan(keep)
    outputs = [i for i in items if i.what == "output"]
    assert len(outputs) > len(STAGES) and not any(i.removable for i in outputs)
    ray_runs = [i for i in items if i.what == "ray run"]
    assert ray_runs and all(i.removable for i in ray_runs), [(i.path.name, i.keep) for i in ray_runs]
    # the first test's --from train_stackformer superseded attempt a0 of the first config's Stackformer
    assert {f"train_stackformer-{refs['train_stackformer'].key}-a0",
            f"train_stackformer-{refs['train_stackformer'].key}-a1"} <= {i.path.name for i in ray_runs}

    # --keep-last 3: the chains of the 3 latest pipeline runs (here the grid's two variants and the guided run) are
    # kept however old
    client = _client(root)
    latest = client.search_runs([client.get_experiment_by_name("mqgen").experiment_id],
                                "tags.`mqgen.kind` = 'pipeline'", order_by=["attributes.start_time DESC"])[:3]
    by_latest = {(stage, run.data.tags[f"mqgen.{stage}.key"]) for run in latest for stage in STAGES
                 if f"mqgen.{stage}.key" in run.data.tags} - chain
    assert by_latest
    by_last = {(i.stage, i.key): i for i in gc.plan(keep, keep_days=0, keep_last=3) if i.what == "output"}
    assert all(by_last[k].keep.startswith("last 3 pipelines") for k in by_latest), by_latest
    later = {(i.stage, i.key) for i in gc.plan(keep, keep_days=0, keep_last=0) if i.what == "output" and i.removable}
    assert later == {(i.stage, i.key) for i in outputs} - chain and by_latest <= later
    assert ("train_tokenizer", refs["train_tokenizer"].key) in later and ("ingest", refs["ingest"].key) not in later
    held = refs["evaluate"]
    assert ("evaluate", held.key) in later
    removed_bytes = sum(i.size for i in gc.plan(keep, keep_days=0, keep_last=0)
                        if i.removable and i.key != held.key)

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    overrides = [f"run.root={root}", "tokenizer.max_steps=12", "tokenizer.eval_every=12",
                 "tokenizer.checkpoint_every=12", "stackformer.max_steps=12", "stackformer.eval_every=12",
                 "stackformer.checkpoint_every=12", "evaluate.num_samples=32", *extra]
    assert _cfg(root, *extra).hash() == resolve("tiny", overrides=overrides).hash()
    mqgen = [str(Path(sys.executable).parent / "mqgen"), "gc", "--preset", "tiny", *overrides, "--keep-days", "0",
             "--keep-last", "0"]
    dry = subprocess.run(mqgen, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "nothing removed: run again with --yes" in dry.stdout, dry.stdout + dry.stderr
    assert Path(refs["train_tokenizer"].path).is_dir()  # a dry run removes nothing

    with file_lock(root / "evaluate" / f".{held.key}.lock", what="a test holding it"):  # a run evaluating it
        wet = subprocess.run([*mqgen, "--yes"], env=env, capture_output=True, text=True, timeout=300)
    assert wet.returncode == 0, wet.stdout + wet.stderr
    assert f"in use, left for the next gc: output evaluate {held.key}" in wet.stdout, wet.stdout
    count = int(wet.stdout.split("\nremoved ")[1].split()[0])  # the outputs, Ray runs (and old logs) it removed
    assert count >= len(later) - 1 + len(ray_runs), wet.stdout
    assert Path(held.path).is_dir()
    for stage, key in later - {("evaluate", held.key)}:
        assert not (root / stage / key).exists(), (stage, key)
    assert not [p for p in (root / "ray").iterdir() if p.is_dir()]
    assert not list(root.rglob(".gc-trash-*"))
    # the given config is still done (a rerun would reuse all of it), the shared upstream outputs too
    assert [row["state"] for row in stage_status(keep)] == ["done"] * len(STAGES)
    tags = _client(root).get_run(refs["train_tokenizer"].mlflow_run_id).data.tags
    assert tags["mqgen.output_removed"].endswith("by mqgen gc")
    # the registry is self-contained: the champion (whichever config's it is) loads and verifies
    with load_bundle("champion", keep) as (bundle, version):
        assert version is not None and bundle.generator is not None
    assert removed_bytes > 0

    # the next gc, the lock free: the held output goes, nothing of the chain does
    again = gc.plan(keep, keep_days=0, keep_last=0)
    assert [(i.stage, i.key) for i in again if i.what == "output" and i.removable] == [("evaluate", held.key)]
    assert gc.remove(keep, again).count >= 1 and not Path(held.path).exists()
    assert [row["state"] for row in stage_status(keep)] == ["done"] * len(STAGES)

    # a run with gc_keep_days (what `mqgen serve --gc-keep-days 7` runs each night) reclaims an output a month old
    # after its stages, keeps its own chain, and records what it freed on its pipeline run
    from flows.pipeline import run_pipeline

    stale = root / "tokenize" / "0123456789ab"
    stale.mkdir()
    (stale / "train.lmdb").write_bytes(b"x" * 4096)
    (stale / "_SUCCESS.json").write_text("{}")  # finished (an unfinished one would be kept as resume state)
    month = time.time() - 30 * 86400
    for path in (stale / "train.lmdb", stale / "_SUCCESS.json", stale):
        os.utime(path, (month, month))
    assert run_pipeline(keep, gc_keep_days=7)["evaluate"].key == dict(chain)["evaluate"]
    assert not stale.exists()
    assert [row["state"] for row in stage_status(keep)] == ["done"] * len(STAGES)
    last = client.search_runs([client.get_experiment_by_name("mqgen").experiment_id], "tags.`mqgen.kind` = 'pipeline'",
                              order_by=["attributes.start_time DESC"])[0]
    assert last.data.metrics["gc_removed"] >= 1 and last.data.metrics["gc_freed_bytes"] >= 4096
