"""A real Prefect retry: a transient fault injected once into the ingest stage, late (after every chunk was
built), makes Prefect run the task a second time; that attempt reuses the finished chunks, and every side effect
happens once: one MLflow stage run, one output, each shard written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.config import resolve

pytestmark = pytest.mark.slow


def test_a_transient_fault_is_retried_by_prefect_and_its_work_is_done_once(prefect_api, run_root: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.ingest as ingest_stage
    from flows.pipeline import run_pipeline
    from infra.tracking import Tracker

    cfg = resolve("tiny", overrides=[f"run.root={run_root}", "data.source=digits", "data.min_shards=1",
                                     "run.retries=1", "run.retry_delay_s=0"])
    real = ingest_stage._finalize
    calls: list[int] = []

    def flaky_finalize(*args, **kwargs):  # the seam this test owns: the stage's last step, failing once
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("injected: a lost connection while finishing (transient)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_stage, "_finalize", flaky_finalize)
    built: list[str] = []
    real_accept = ingest_stage._Runner._accept

    def count_accept(self, r, bar, resumed: bool = False):
        if not resumed:
            built.append(r.job_id)
        return real_accept(self, r, bar, resumed)

    monkeypatch.setattr(ingest_stage._Runner, "_accept", count_accept)

    refs = run_pipeline(cfg, only="ingest")
    assert len(calls) == 2  # failed once, then Prefect ran the task again
    assert len(built) == len(set(built)) and built  # every chunk built once: the retry reused them all
    out = refs["ingest"]
    assert Path(out.path, "manifest.json").is_file()
    client = Tracker(run_root, "mqgen").client
    exp = client.get_experiment_by_name("mqgen").experiment_id
    stage_runs = client.search_runs([exp], filter_string="tags.`mqgen.stage` = 'ingest'")
    assert [r.info.status for r in stage_runs] == ["FINISHED"]  # one MLflow run for the stage, finished

    from prefect import get_client

    with get_client(sync_client=True) as pc:
        task_runs = [t for t in pc.read_task_runs() if t.name.startswith("ingest")]
    assert len(task_runs) >= 1 and any(t.run_count == 2 and t.state.is_completed() for t in task_runs), \
        [(t.name, t.run_count, t.state.type) for t in task_runs]
