"""train_tokenizer with real Ray Train (2 CPU workers), real MLflow (sqlite) and the tiny preset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from infra.config import resolve
from infra.refs import TokenizerInputs, load_tokenizer
from infra.tracking import Tracker
from tests.fixtures.hooks import KillOnce
from tests.fixtures.ray_runs import stored_checkpoints

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _cfg(root: Path, *extra: str):
    return resolve("tiny", overrides=[f"run.root={root}", "ray.num_workers=2", "tokenizer.max_steps=24",
                                      "tokenizer.eval_every=8", "tokenizer.checkpoint_every=8",
                                      "tokenizer.keep_checkpoints=3", *extra])


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    from tasks import ingest

    root = tmp_path_factory.mktemp("tok")
    cfg = _cfg(root)
    return root, ingest.run(cfg)


def _history(root: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = Tracker(root, "mqgen").client
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_two_workers_recover_from_a_sigkilled_rank_and_stay_in_sync(ingested, tmp_path: Path) -> None:
    from tasks import train_tokenizer

    root, ing = ingested
    cfg = _cfg(root, "ray.max_failures=1")
    marker = tmp_path / "killed-once"
    ref = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing), on_step=KillOnce(12, marker, rank=1))
    assert marker.read_text().split()[0] == "12", "the injected kill did not happen"
    assert ref.step == 24
    assert Path(ref.weights).is_file()

    # the loss falls (train L1 over the run)
    l1 = _history(root, ref.mlflow_run_id, "train_l1")
    assert l1[-1][1] < 0.8 * l1[0][1], l1
    # metric steps are unique although steps 9..12 ran twice (restart from the step-8 checkpoint)
    steps = [s for s, _ in l1]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    # both DDP replicas (and their EMA codebooks) ended identical
    div = _history(root, ref.mlflow_run_id, "rank_weight_divergence")
    assert div and div[-1][1] == 0.0
    client = Tracker(root, "mqgen").client
    run = client.get_run(ref.mlflow_run_id)
    assert run.data.tags["mqgen.resumed_from_step"] == "8"
    arts = {a.path for a in client.list_artifacts(ref.mlflow_run_id, "mask_overlays")}
    assert any(p.endswith(".png") for p in arts)

    # a second call is a cache hit: same reference, no new training
    t0 = time.time()
    again = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    assert again == ref and time.time() - t0 < 10

    # the weights rebuild into a working tokenizer
    model = load_tokenizer(ref)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    seq = model.encode(x)
    assert seq.codes.shape == (2, round(0.5 * 64))


def test_without_restarts_a_killed_rank_fails_the_stage_and_its_run(ingested, tmp_path: Path) -> None:
    from infra.ray import TrainingFailed
    from tasks import train_tokenizer

    root, ing = ingested
    cfg = _cfg(root, "ray.max_failures=0", "seed=7", "tokenizer.max_steps=8")
    with pytest.raises(TrainingFailed) as failed:
        train_tokenizer.run(cfg, TokenizerInputs(ingest=ing), on_step=KillOnce(2, tmp_path / "killed", rank=1))
    # one line for the console (the CLI prints str()); the workers' tracebacks ride along for the log file
    assert "\n" not in str(failed.value) and "ray.max_failures=0" in str(failed.value), str(failed.value)
    assert any(n.startswith("worker tracebacks:") for n in getattr(failed.value, "__notes__", [])), failed.value
    out = Path(root) / "train_tokenizer" / train_tokenizer.stage_key(cfg, ing.manifest_sha256)
    assert not (out / train_tokenizer.SUCCESS).exists()
    client = Tracker(root, "mqgen").client
    [run] = client.search_runs([client.get_experiment_by_name("mqgen").experiment_id],
                               filter_string=f"tags.`mqgen.stage_key` = '{out.name}'")
    assert run.info.status == "FAILED"


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_killed_stage_resumes_from_latest_valid_checkpoint(ingested, tmp_path: Path) -> None:
    from tasks import train_tokenizer

    root, ing = ingested
    cfg = _cfg(root, "tokenizer.lr=0.0003")  # its own stage key, same ingest
    script = textwrap.dedent(f"""
        import json, sys
        from infra.config import resolve
        from infra.refs import TokenizerInputs
        from tasks import ingest, train_tokenizer
        from tests.fixtures.hooks import SlowDown
        cfg = resolve("tiny", overrides={json.dumps([f"run.root={root}", "ray.num_workers=2",
                      "tokenizer.max_steps=24", "tokenizer.eval_every=8", "tokenizer.checkpoint_every=8",
                      "tokenizer.keep_checkpoints=3", "tokenizer.lr=0.0003"])})
        ing = ingest.run(cfg)
        train_tokenizer.run(cfg, TokenizerInputs(ingest=ing), on_step=SlowDown(0.4))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = train_tokenizer.stage_key(cfg, ing.manifest_sha256)
    ray_dir = root / "ray" / f"train_tokenizer-{key}-a0"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if len(stored_checkpoints(ray_dir)) >= 2:  # stored and verified, so restorable
                break
            assert proc.poll() is None, "the stage ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("no two checkpoints within the deadline")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert not (root / "train_tokenizer" / key / "_SUCCESS.json").exists()

    stored = stored_checkpoints(ray_dir)
    steps = [step for _, step in stored]
    assert steps[:2] == [8, 16]
    # bit rot in the newest checkpoint Ray will restore: it must be skipped and the one before it used
    newest = ray_dir / stored[-1][0]
    blob = bytearray((newest / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(blob))

    ref = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    assert ref.step == 24
    client = Tracker(root, "mqgen").client
    tags = client.get_run(ref.mlflow_run_id).data.tags
    expected_resume = steps[-2]
    assert tags["mqgen.resumed_from_step"] == str(expected_resume)
    assert "sha256" in tags["mqgen.skipped_checkpoints"]
    # one MLflow run for the stage key, its history continuous and without duplicate steps
    runs = client.search_runs([client.get_run(ref.mlflow_run_id).info.experiment_id],
                              filter_string=f"tags.`mqgen.stage_key` = '{key}'")
    assert len(runs) == 1
    hist = [s for s, _ in _history(root, ref.mlflow_run_id, "train_l1")]
    assert len(hist) == len(set(hist)) and hist[-1] == 24

    # killed after the final checkpoint was stored but before Ray recorded it (and before the stage's output):
    # the rerun restores that stored checkpoint, trains nothing, and must export it, not Ray's older record
    snapshot = ray_dir / "checkpoint_manager_snapshot.json"
    doc = json.loads(snapshot.read_text())
    kept = [i for i, r in enumerate(doc["checkpoint_results"]) if (r.get("metrics") or {}).get("step") != 24]
    assert kept and len(kept) < len(doc["checkpoint_results"])
    doc["checkpoint_results"] = [doc["checkpoint_results"][i] for i in kept]
    doc["checkpoint_report_indices"] = [doc["checkpoint_report_indices"][i] for i in kept]
    doc["latest_checkpoint_result"] = doc["checkpoint_results"][-1]
    snapshot.write_text(json.dumps(doc))
    out_dir = root / "train_tokenizer" / key
    (out_dir / train_tokenizer.SUCCESS).unlink()
    (out_dir / "model.safetensors").unlink()
    again = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    assert again.step == 24 and again.sha256 == ref.sha256
    assert "val_psnr" in again.metrics and again.metrics["step"] == 24


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_not_restarted_from_step_0(ingested) -> None:
    from infra.checkpoint import write_checkpoint
    from infra.storage import UnsafeCheckpointError
    from tasks import train_tokenizer

    root, ing = ingested
    cfg = _cfg(root, "seed=11")  # its own stage key
    key = train_tokenizer.stage_key(cfg, ing.manifest_sha256)
    ray_dir = root / "ray" / f"train_tokenizer-{key}-a0"
    damaged = []
    for step in (8, 16):  # what a killed run left, then bit rot in both of its committed checkpoints
        d = ray_dir / f"checkpoint_2026-12-07_00-00-{step:02d}.000000"
        write_checkpoint(d, step, {"model": {"w": torch.zeros(16)}}, {"step": step})
        blob = bytearray((d / "model.safetensors").read_bytes())
        blob[-3] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(blob))
        damaged.append(d)
    with pytest.raises(UnsafeCheckpointError, match="restart training from step 0") as refused:
        train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    message = str(refused.value)
    assert all(d.name in message for d in damaged) and "sha256" in message and "delete" in message, message
    # nothing was trained over them or deleted, and the stage has no output
    assert all((d / "model.safetensors").is_file() for d in damaged)
    assert not (root / "train_tokenizer" / key / train_tokenizer.SUCCESS).exists()


def test_a_failure_after_training_ends_the_run_failed_and_the_rerun_resumes_at_the_last_step(
        ingested, monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.registry
    from tasks import train_tokenizer

    root, ing = ingested
    cfg = _cfg(root, "seed=13", "tokenizer.max_steps=8")
    key = train_tokenizer.stage_key(cfg, ing.manifest_sha256)

    def refuse(*args, **kwargs):
        raise RuntimeError("the model registry refused the version")

    monkeypatch.setattr(infra.registry, "register", refuse)
    with pytest.raises(RuntimeError, match="registry refused"):
        train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    assert not (root / "train_tokenizer" / key / train_tokenizer.SUCCESS).exists()
    client = Tracker(root, "mqgen").client
    experiment = client.get_experiment_by_name("mqgen").experiment_id
    [failed] = client.search_runs([experiment], filter_string=f"tags.`mqgen.stage_key` = '{key}'")
    assert failed.info.status == "FAILED", failed.info.status  # not left RUNNING for the next sweep to guess at

    monkeypatch.undo()
    ref = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    assert ref.step == 8 and Path(ref.weights).is_file()
    resumed = client.get_run(ref.mlflow_run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags.get("mqgen.resumed_from_step") == "8", resumed.data.tags  # nothing trained twice
