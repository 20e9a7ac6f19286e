"""A grid's stage executions run as Ray tasks whose own progress lines never reach the console: the grid says
how many are done and where the running ones are (real Prefect task futures, a real progress record)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task

from infra.console import ProgressFile


def test_a_grid_stage_reports_its_running_executions_while_it_waits(prefect_api, tmp_path: Path, capsys) -> None:
    from flows.grid import watch_stage

    record = ProgressFile(tmp_path / "train_tokenizer" / "abc123" / "progress.json", interval_s=0)

    @task
    def execution(seconds: float, writes: bool) -> int:
        if writes:
            record.write(force=True, done=120, total=400, unit="steps", elapsed=12.0, start=0)
        time.sleep(seconds)
        return 1

    @flow
    def stage() -> list[int]:
        submitted = time.time()  # the record may be written before the watch begins: it counts all the same
        futures = [execution.submit(0.1, False), execution.submit(2.5, True)]
        watch_stage("train_tokenizer", futures, str(tmp_path), interval_s=0.5, submitted=submitted)
        return [f.result() for f in futures]

    assert stage() == [1, 1]
    lines = [line for line in capsys.readouterr().err.splitlines() if "train_tokenizer:" in line]
    assert lines, "no progress line while an execution ran"
    assert any("1/2 executions done" in line and "abc123  120/400 steps (30%)" in line for line in lines), lines
