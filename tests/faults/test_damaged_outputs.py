"""A finished output damaged by hand (truncated marker, truncated shard, altered weights, records deleted from a
token database, a missing picture) is reported as ``damaged`` by ``mqgen status`` (never a traceback), set aside
(kept, not deleted) and built again by the next ``mqgen run``, with the stages that read it; a reader never lets an
altered token index an embedding out of range."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest

from flows.pipeline import stage_status
from flows.stages import GRAPH, cached_refs, inputs_for
from infra.config import STAGES, resolve
from infra.refs import TokenizerInputs
from infra.storage import DamagedOutput, read_json, sha256_file
from infra.tokens import TokenDataset, TokenFormatError, record_key
from tasks import ingest, train_tokenizer
from tasks import tokenize as tk
from tests.fixtures import tokenize_data as fx

ray_cluster, tokenize_run = fx.ray_cluster, fx.tokenize_run  # the session's shared fixtures

MQGEN = Path(sys.executable).parent / "mqgen"
# The stages after tokenize, kept small (test_evaluate's sizes): with the shared fixture's data settings these make
# the config of the finished pipeline below.
LATER = ["ray.num_workers=1", "stackformer.max_steps=6", "stackformer.eval_every=6",
         "stackformer.checkpoint_every=6", "evaluate.num_samples=32", "evaluate.batch_size=16",
         "evaluate.num_recon_images=32", "evaluate.classifier.max_steps=20", "evaluate.classifier.width=8",
         "evaluate.classifier.batch_size=64"]


def _states(cfg: Any) -> dict[str, tuple[str, str]]:
    return {r["stage"]: (r["state"], r["path"]) for r in stage_status(cfg)}


def _set_aside(stage_root: Path, key: str) -> list[Path]:
    return sorted(stage_root.glob(f".{key}.damaged-*"))


def test_a_truncated_shard_is_reported_and_the_ingest_output_rebuilt(run_root: Path) -> None:
    cfg = fx.tiny_config(run_root)
    first = ingest.run(cfg)
    shards = {p.name: sha256_file(p) for p in Path(first.path).glob("*.tar")}
    shard = min(Path(first.path).glob("train-*.tar"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    state, why = _states(cfg)["ingest"]
    assert state == "damaged" and shard.name in why, why
    assert "ingest" not in cached_refs(cfg)
    with pytest.raises(DamagedOutput):
        ingest.cached(cfg)

    again = ingest.run(cfg)
    assert {p.name: sha256_file(p) for p in Path(again.path).glob("*.tar")} == shards  # the same shards again
    assert shard.stat().st_size == size
    [aside] = _set_aside(Path(first.path).parent, first.key)
    assert (aside / shard.name).stat().st_size == size // 2  # the damaged copy is kept for a look, not deleted
    assert _states(cfg)["ingest"][0] == "done"


def test_a_damaged_training_output_is_reported_not_raised(run_root: Path) -> None:
    cfg = fx.tiny_config(run_root)
    ing = ingest.run(cfg)
    tok = fx.make_tokenizer(cfg, ingest=ing)  # a train_tokenizer output with its commit marker
    marker = Path(tok.path) / train_tokenizer.SUCCESS
    assert _states(cfg)["train_tokenizer"][0] == "done"

    weights = Path(tok.weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    state, why = _states(cfg)["train_tokenizer"]
    assert state == "damaged" and "model.safetensors does not match the sha256" in why
    assert _states(cfg)["tokenize"][0] == "waiting"

    marker.write_text(marker.read_text()[:40])  # a marker cut short by a full disk or an editor
    state, why = _states(cfg)["train_tokenizer"]
    assert state == "damaged" and "_SUCCESS.json is unreadable" in why
    with pytest.raises(DamagedOutput, match="unreadable"):
        train_tokenizer.cached(cfg, TokenizerInputs(ingest=ing))


def test_a_marker_written_by_another_version_with_the_same_metadata_is_a_cache_hit(tokenize_run: dict[str, Any]
                                                                                 ) -> None:
    """Metadata fields added later (the caption fields, at their defaults) are no change: the output stays a cache
    hit instead of being set aside and rebuilt."""
    import json

    cfg, upstream, out = tokenize_run["cfg"], tokenize_run["upstream"], tokenize_run["out"]
    marker = Path(out.path) / tk.SUCCESS
    original = marker.read_text()
    doc = json.loads(original)
    for split in ("train", "val"):
        doc["metadata"][split].update(text_len=0, text_vocab_size=0, text_tokenizer_sha256="")
    try:
        marker.write_text(json.dumps(doc))
        assert tk.cached(cfg, upstream) is not None
        assert _set_aside(Path(out.path).parent, out.key) == []
    finally:
        marker.write_text(original)


def test_records_deleted_by_hand_are_found_and_the_databases_rebuilt(tokenize_run: dict[str, Any]) -> None:
    cfg, upstream, out = tokenize_run["cfg"], tokenize_run["upstream"], tokenize_run["out"]
    before = tk.cached(cfg, upstream)  # the shared output (another test may have rebuilt it: same records)
    assert before is not None and (before.checksum, before.metadata) == (out.checksum, out.metadata)
    env = lmdb.open(out.train_db, subdir=True, lock=True)
    with env.begin(write=True) as txn:
        assert txn.delete(record_key(0, 1))
    env.close()
    with pytest.raises(DamagedOutput, match="train.lmdb"):
        tk.cached(cfg, upstream)

    again = tk.run(cfg, upstream)
    assert (again.checksum, again.metadata) == (out.checksum, out.metadata)
    assert tk.cached(cfg, upstream) == again
    assert len(_set_aside(Path(out.path).parent, out.key)) == 1

    marker = Path(out.path) / tk.SUCCESS
    marker.write_text(marker.read_text()[:-30])
    with pytest.raises(DamagedOutput, match="unreadable"):
        tk.cached(cfg, upstream)
    assert tk.run(cfg, upstream).checksum == out.checksum
    assert len(_set_aside(Path(out.path).parent, out.key)) == 2


def _read_altered(out: Any, tmp_path: Path, index: int, patch: Any, match: str) -> None:
    """Copy the shared train database, rewrite record ``(0, index)`` with ``patch(bytearray, seq_len)`` (after its
    verification, as a hand edit would), and check that reading every batch refuses it with ``match``."""
    seq_len = out.metadata["train"]["seq_len"]
    db = tmp_path / "train.lmdb"
    shutil.copytree(out.train_db, db, ignore=shutil.ignore_patterns("lock.mdb"))
    env = lmdb.open(str(db), subdir=True)
    with env.begin(write=True) as txn:
        record = bytearray(txn.get(record_key(0, index)))
        patch(record, seq_len)
        txn.put(record_key(0, index), bytes(record))
    env.close()
    ds = TokenDataset(db)
    with pytest.raises(TokenFormatError, match=match):
        ds.__getitems__(list(range(len(ds))))


def test_a_code_altered_after_verification_never_reaches_the_model(tokenize_run: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    def patch(record: bytearray, seq_len: int) -> None:
        record[0:2] = (60000).to_bytes(2, "little")  # the first code (codes come first), far outside the codebook

    _read_altered(tokenize_run["out"], tmp_path, 2, patch, r"code outside \[0, ")


def test_a_label_altered_after_verification_never_reaches_the_model(tokenize_run: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    """A label past the class count would index the class embedding out of range (or pick another class)."""
    def patch(record: bytearray, seq_len: int) -> None:
        at = 4 * seq_len  # the <i4 label follows the codes and positions (<u2 each)
        record[at:at + 4] = (1000).to_bytes(4, "little", signed=True)

    _read_altered(tokenize_run["out"], tmp_path, 1, patch, r"labels outside \[-1, ")


@pytest.mark.parametrize("cell, value, match", [
    (-1, 64, r"position outside \[0, 64\)"),  # the 8x8 grid has cells 0..63
    (1, None, "positions that are not strictly increasing"),  # the first position again: a cell read twice
], ids=["outside-the-grid", "a-cell-twice"])
def test_a_position_altered_after_verification_never_reaches_the_model(tokenize_run: dict[str, Any], tmp_path: Path,
                                                                       cell: int, value: int | None, match: str
                                                                       ) -> None:
    def patch(record: bytearray, seq_len: int) -> None:
        positions = 2 * seq_len  # positions follow the codes, both <u2
        at = positions + 2 * (cell % seq_len)
        new = value if value is not None else int.from_bytes(record[positions:positions + 2], "little")
        record[at:at + 2] = new.to_bytes(2, "little")

    _read_altered(tokenize_run["out"], tmp_path, 3, patch, match)


# --------------------------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def finished(tokenize_run: dict[str, Any]) -> dict[str, Any]:
    """The shared tokenize fixture's root carried to the end: train_stackformer, train_evaluator and evaluate run
    in-process on its ingest, tokenizer and tokens (the command line's config: ``args``)."""
    root = tokenize_run["root"]
    args = ["--preset", "tiny", f"run.root={root}", "data.source=digits", f"data.max_images={fx.NUM_IMAGES}",
            f"data.shard_max_count={fx.SHARD_SIZE}", "data.min_shards=1", *LATER]
    cfg = fx.tiny_config(root, fx.NUM_IMAGES, fx.SHARD_SIZE, *LATER)
    assert resolve("tiny", overrides=args[2:]).hash() == cfg.hash()  # the command line means the same config
    refs = cached_refs(cfg)
    for stage in ("train_stackformer", "train_evaluator", "evaluate"):
        refs[stage] = GRAPH[stage].module.run(cfg, inputs_for(stage, refs))
    return {"cfg": cfg, "args": args, "refs": refs}


def _cli(ray_address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``mqgen`` as a user runs it (its own Prefect server, MLflow under the run root), joining this session's Ray;
    a wide console, so that the status table is not cut."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    env.update(RAY_ADDRESS=ray_address, COLUMNS="250")
    return subprocess.run([str(MQGEN), *args], env=env, capture_output=True, text=True, timeout=480,
                          stdin=subprocess.DEVNULL, check=False)


def _table(stdout: str) -> dict[str, str]:
    """Stage -> state, read from the rows of ``mqgen status``'s table."""
    names = "|".join(STAGES)
    return {m[1]: m[2] for m in re.finditer(rf"^\W*({names})\s*\W\s*(done|damaged|waiting|not done|skipped)\s",
                                             stdout, re.MULTILINE)}


def _mtime(path: str | Path) -> int:
    return Path(path).stat().st_mtime_ns


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
@pytest.mark.slow  # two real `mqgen` processes (status, then run with its own Prefect server) on a finished pipeline
def test_damaged_training_and_evaluation_outputs_through_mqgen_status_and_run(finished: dict[str, Any],
                                                                              ray_cluster: str) -> None:
    from tasks import evaluate, train_evaluator, train_stackformer

    cfg, args, before = finished["cfg"], finished["args"], finished["refs"]
    assert list(before) == list(STAGES)
    upstream = {"ingest": Path(before["ingest"].path) / "manifest.json",
                "train_tokenizer": Path(before["train_tokenizer"].path) / train_tokenizer.SUCCESS,
                "tokenize": Path(before["tokenize"].path) / tk.SUCCESS}
    upstream_mtimes = {stage: _mtime(p) for stage, p in upstream.items()}

    # a Stackformer marker cut short, the stage run again (in-process): restored from its last checkpoint, the
    # same weights, so evaluate, whose key holds their sha256, keeps its evaluation: dependents follow by key
    marker = Path(before["train_stackformer"].path) / train_stackformer.SUCCESS
    marker.write_text(marker.read_text()[:40])
    state, why = _states(cfg)["train_stackformer"]
    assert state == "damaged" and "_SUCCESS.json is unreadable" in why, why
    evaluated_at = _mtime(before["evaluate"].evaluation_json)
    rebuilt = train_stackformer.run(cfg, inputs_for("train_stackformer", before))
    assert rebuilt.sha256 == before["train_stackformer"].sha256
    assert evaluate.cached(cfg, inputs_for("evaluate", {**before, "train_stackformer": rebuilt})) == before["evaluate"]
    assert _mtime(before["evaluate"].evaluation_json) == evaluated_at

    # a picture deleted from the evaluation: evaluate alone is damaged, and says which file
    picture = Path(before["evaluate"].path) / read_json(before["evaluate"].evaluation_json)["pictures"]["samples_grid"]
    picture.unlink()
    state, why = _states(cfg)["evaluate"]
    assert state == "damaged" and f"{picture.relative_to(before['evaluate'].path)} is missing" in why, why

    # truncated Stackformer weights, one flipped byte in the classifier's
    generator = Path(before["train_stackformer"].weights)
    size = generator.stat().st_size
    with open(generator, "r+b") as f:
        f.truncate(size // 2)
    classifier = bytearray(Path(before["train_evaluator"].weights).read_bytes())
    classifier[-1] ^= 0xFF
    Path(before["train_evaluator"].weights).write_bytes(bytes(classifier))
    damaged_at = time.time_ns()

    status = _cli(ray_cluster, "status", *args)
    shown = status.stdout + status.stderr
    assert status.returncode == 0 and "Traceback" not in shown, shown[-3000:]
    assert _table(status.stdout) == {"ingest": "done", "train_tokenizer": "done", "tokenize": "done",
                                     "train_stackformer": "damaged", "train_evaluator": "damaged",
                                     "evaluate": "waiting"}, status.stdout
    damaged = dict(re.findall(r"^damaged: (\w+): (.+)$", status.stdout, re.MULTILINE))
    assert set(damaged) == {"train_stackformer", "train_evaluator"}, status.stdout
    for stage, text in damaged.items():  # the folder and what is wrong with it, in full
        assert text == f"{before[stage].path}: model.safetensors does not match the sha256 in _SUCCESS.json", text

    run = _cli(ray_cluster, "run", *args)
    shown = run.stdout + run.stderr
    assert run.returncode == 0 and "Traceback" not in shown, shown[-3000:]
    after = cached_refs(cfg)
    assert [row["state"] for row in stage_status(cfg)] == ["done"] * len(STAGES)
    for stage, path in upstream.items():  # upstream of the damage: reused, not rewritten
        assert after[stage] == before[stage] and _mtime(path) == upstream_mtimes[stage], stage

    # the damaged copies, kept for a look (the Stackformer's: the cut marker's, then the cut weights')
    for stage, module, sizes in (("train_stackformer", train_stackformer, [size, size // 2]),
                                 ("train_evaluator", train_evaluator, [len(classifier)])):
        new, old = after[stage], before[stage]
        assert new.key == old.key and new.path == old.path  # built again in its own place
        assert sha256_file(new.weights) == new.sha256 == read_json(Path(new.path) / module.SUCCESS)["sha256"]
        aside = _set_aside(Path(old.path).parent, old.key)
        assert [(a / "model.safetensors").stat().st_size for a in aside] == sizes, aside
    assert (aside[0] / "model.safetensors").read_bytes() == classifier
    # the Stackformer was restored from its last checkpoint, not trained again: the same model
    assert after["train_stackformer"].sha256 == before["train_stackformer"].sha256

    # evaluate, which reads both, was built again on the rebuilt outputs; its damaged copy is kept too
    report = read_json(after["evaluate"].evaluation_json)
    assert report["model"]["sha256"] == after["train_stackformer"].sha256
    assert report["extractor_info"]["weights_sha256"] == after["train_evaluator"].sha256
    assert _mtime(after["evaluate"].evaluation_json) > damaged_at
    assert (Path(after["evaluate"].path) / picture.relative_to(before["evaluate"].path)).is_file()
    assert evaluate.load_output(Path(after["evaluate"].path)) == after["evaluate"]
    if after["evaluate"].key == before["evaluate"].key:  # the same inputs byte for byte: the same folder
        [aside] = _set_aside(Path(before["evaluate"].path).parent, before["evaluate"].key)
        assert not (aside / picture.relative_to(before["evaluate"].path)).exists()
    else:  # a retrained classifier with other bytes: another key, and the damaged folder is left as it was
        assert not picture.exists() and Path(before["evaluate"].evaluation_json).is_file()
