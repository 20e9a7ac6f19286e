"""A finished output damaged by hand (truncated marker, truncated shard, altered weights, records deleted from a
token database) is reported as ``damaged`` by ``mqgen status`` (never a traceback), set aside (kept, not deleted)
and built again by the next run; a reader never lets an altered token index an embedding out of range."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lmdb
import pytest

from flows.pipeline import stage_status
from flows.stages import cached_refs
from infra.refs import TokenizerInputs
from infra.storage import DamagedOutput, sha256_file
from infra.tokens import TokenDataset, TokenFormatError, record_key
from tasks import ingest, train_tokenizer
from tasks import tokenize as tk
from tests.fixtures import tokenize_data as fx

ray_cluster, tokenize_run = fx.ray_cluster, fx.tokenize_run  # the session's shared fixtures


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
    assert tk.cached(cfg, upstream) == out
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


def test_a_code_altered_after_verification_never_reaches_the_model(tokenize_run: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    out = tokenize_run["out"]
    db = tmp_path / "train.lmdb"
    shutil.copytree(out.train_db, db, ignore=shutil.ignore_patterns("lock.mdb"))
    env = lmdb.open(str(db), subdir=True)
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(record_key(0, 2)))
        value[0:2] = (60000).to_bytes(2, "little")  # the first code (codes come first), far outside the codebook
        txn.put(record_key(0, 2), bytes(value))
    env.close()
    ds = TokenDataset(db)
    with pytest.raises(TokenFormatError, match=r"code outside \[0, "):
        ds.__getitems__(list(range(len(ds))))
