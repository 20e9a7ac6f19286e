"""The stage graph as mqgen status / --only / --from see it: states per stage, a skipped evaluator, descendants."""

from __future__ import annotations

from pathlib import Path

from flows.pipeline import select_stages, stage_status
from flows.stages import GRAPH, descendants
from infra.config import resolve


def _cfg(root: Path, *extra: str):
    return resolve("tiny", overrides=[f"run.root={root}", "data.source=digits", "data.min_shards=1", *extra])


def test_from_selects_the_stage_and_everything_that_reads_it() -> None:
    assert select_stages(from_stage="train_tokenizer") == ["train_tokenizer", "tokenize", "train_stackformer",
                                                          "evaluate"]
    assert select_stages(from_stage="train_evaluator") == ["train_evaluator", "evaluate"]
    assert select_stages(only="train_evaluator") == ["train_evaluator"]
    assert descendants("ingest") == set(GRAPH)


def test_status_after_ingest_shows_what_can_run_next_and_a_skipped_evaluator(run_root: Path) -> None:
    from tasks import ingest

    cfg = _cfg(run_root)
    fresh = {row["stage"]: row["state"] for row in stage_status(cfg)}
    assert fresh == {"ingest": "not done", **{s: "waiting" for s in GRAPH if s != "ingest"}}
    ingest.run(cfg)
    after = {row["stage"]: row["state"] for row in stage_status(cfg)}
    assert after == {"ingest": "done", "train_tokenizer": "not done", "tokenize": "waiting",
                     "train_stackformer": "waiting", "train_evaluator": "not done", "evaluate": "waiting"}
    inception = _cfg(run_root, "evaluate.extractor=inception-v3-compat")
    rows = {row["stage"]: row for row in stage_status(inception)}
    assert rows["train_evaluator"]["state"] == "skipped"
    assert "evaluate.extractor=inception-v3-compat" in rows["train_evaluator"]["path"]
