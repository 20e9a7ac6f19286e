"""The whole pipeline through real Prefect (test harness), real Ray (local, 2 CPUs) and real MLflow (sqlite)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from infra.config import STAGES, resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _cfg(root: Path, *extra: str):
    return resolve("tiny", overrides=[f"run.root={root}", "tokenizer.max_steps=12", "tokenizer.eval_every=12",
                                      "tokenizer.checkpoint_every=12", "stackformer.max_steps=12",
                                      "stackformer.eval_every=12", "stackformer.checkpoint_every=12",
                                      "evaluate.num_samples=32", *extra])


def test_end_to_end_then_cached_rerun_then_only_and_from(prefect_api, tmp_path: Path) -> None:
    from flows.pipeline import run_pipeline, select_stages
    from infra.tracking import Tracker

    root = tmp_path / "run"
    cfg = _cfg(root)
    refs = run_pipeline(cfg)
    assert list(refs) == list(STAGES)
    for stage, ref in refs.items():
        assert Path(ref.path).is_dir(), stage
        assert ref.mlflow_run_id, stage
    evaluation = json.loads(Path(refs["evaluate"].evaluation_json).read_text())
    assert evaluation["n"] == 32 and "extractor" in evaluation

    client = Tracker(root, "mqgen").client
    exp = client.get_experiment_by_name("mqgen").experiment_id
    pipelines = client.search_runs([exp], filter_string="tags.`mqgen.kind` = 'pipeline'")
    assert len(pipelines) == 1
    for stage, ref in refs.items():
        assert client.get_run(ref.mlflow_run_id).data.tags.get("mlflow.parentRunId") == pipelines[0].info.run_id

    # the same config again: every stage is a cache hit, no model work, same references
    ray_dirs = sorted(p.name for p in (root / "ray").iterdir())
    t0 = time.time()
    again = run_pipeline(cfg)
    assert time.time() - t0 < 60
    assert {k: v.to_dict() for k, v in again.items()} == {k: v.to_dict() for k, v in refs.items()}
    assert sorted(p.name for p in (root / "ray").iterdir()) == ray_dirs  # no new training run

    # --only runs one stage on cached inputs; --from forces a rerun from there on
    only = run_pipeline(cfg, only="tokenize")
    assert list(only) == ["tokenize"] and only["tokenize"] == refs["tokenize"]
    assert select_stages(from_stage="tokenize") == ["tokenize", "train_stackformer", "evaluate"]
