"""The tokenize stage end to end on a tiny real ingest output, with 2 Ray CPU workers.

One module-scoped stage run (and one Ray instance for the session) feeds most tests; each test checks
one promise of the stage: counts, record validity, agreement with the encoder and decoder, caching,
MLflow output, and the reader (metadata checks, fork safety, DataLoader workers).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infra.shards import ShardSet, read_shard
from infra.tokens import (
    TokenDataset,
    TokenFormatError,
    TokenMeta,
    TokenWriter,
    iter_records,
    read_meta,
    record_dtype,
    verify,
)
from tasks import tokenize as tk
from tasks.train_tokenizer import to_model_input
from tests.fixtures import tokenize_data as fx
from tests.fixtures.tokenize_data import tiny_config

ray_cluster, tokenize_run = fx.ray_cluster, fx.tokenize_run  # the session's shared fixtures


@pytest.fixture
def stage(tokenize_run: dict[str, Any]) -> dict[str, Any]:
    return tokenize_run


def _records(path: str) -> list[tuple[bytes, np.void]]:
    meta = read_meta(path)
    return [(k, np.frombuffer(v, dtype=record_dtype(meta.seq_len))[0]) for k, v in iter_records(path)]


def test_record_counts_equal_the_ingest_manifest(stage: dict[str, Any]) -> None:
    out, shards = stage["out"], ShardSet.from_output(stage["ingest"])
    for split in tk.SPLITS:
        manifest_counts = [s.num_samples for s in shards.shards(split)]
        meta, scan = verify(out.db(split))
        assert meta.num_records == sum(manifest_counts) == getattr(out, f"num_{split}")
        assert [n for _, n in meta.shards] == manifest_counts
        assert scan.shard_counts == dict(enumerate(manifest_counts))
        keys = [k for k, _ in iter_records(out.db(split))]
        assert len(keys) == len(set(keys)) == sum(manifest_counts)
        assert keys == sorted(keys)
        assert keys[0] == b"000000/00000000"


def test_every_record_is_valid_and_carries_its_label(stage: dict[str, Any]) -> None:
    out, model = stage["out"], stage["model"]
    k, n_cells = model.cfg.codebook_size, model.cfg.num_positions
    shards = ShardSet.from_output(stage["ingest"])
    for split in tk.SPLITS:
        meta = read_meta(out.db(split))
        assert (meta.codebook_size, meta.grid_size, meta.seq_len) == (k, model.cfg.grid_size, model.cfg.num_kept)
        assert meta.tokenizer_sha256 == stage["tokenizer"].sha256
        assert meta.source_sha256 == stage["ingest"].manifest_sha256
        labels = [label for s in shards.shards(split) for _, _, label, _ in read_shard(s.path)]
        records = _records(out.db(split))
        assert [int(r["label"]) for _, r in records] == labels
        for key, r in records:
            assert len(r["codes"]) == meta.seq_len
            assert (r["codes"] < k).all(), key
            pos = r["positions"].astype(np.int64)
            assert (pos < n_cells).all() and (np.diff(pos) > 0).all(), key  # unique and raster-sorted


def _shard_images(ingest: Any, split: str, shard: int) -> torch.Tensor:
    from infra.shards import iter_samples

    path = ShardSet.from_output(ingest).shards(split)[shard].path
    return torch.stack([s.image for s in iter_samples([path], image_size=ingest.image_size,
                                                      channels=ingest.channels)])


def test_records_are_the_encoders_tokens_and_decode_to_its_reconstruction(stage: dict[str, Any]) -> None:
    out, model = stage["out"], stage["model"]
    ds = TokenDataset(out.val_db)
    shard = 1
    images = _shard_images(stage["ingest"], "val", shard)
    x = to_model_input(images, torch.device("cpu"))
    with torch.no_grad():
        tokens = model.encode(x)
        recon = model(x, update_codebook=False).reconstruction
    start = sum(n for s, n in ds.meta.shards if s < shard)
    items = [ds[start + i] for i in range(len(images))]
    codes = torch.stack([it["codes"] for it in items])
    positions = torch.stack([it["positions"] for it in items])
    assert torch.equal(positions, tokens.positions)
    assert torch.equal(codes, tokens.codes)
    with torch.no_grad():
        decoded = model.decode(codes, positions)
    torch.testing.assert_close(decoded, recon, atol=1e-4, rtol=1e-4)
    ds.close()


def test_in_process_encode_matches_the_ray_workers(stage: dict[str, Any]) -> None:
    ingest, tokenizer = stage["ingest"], stage["tokenizer"]
    info = ShardSet.from_output(ingest).shards("train")[2]
    job = tk.ShardJob(split="train", shard=2, path=info.path, count=info.num_samples, sha256=info.sha256,
                      tokenizer=tokenizer, image_size=ingest.image_size, channels=ingest.channels)
    enc = tk.encode_shard(job, stage["model"])
    ds = TokenDataset(stage["out"].train_db)
    start = sum(n for s, n in ds.meta.shards if s < 2)
    for i in range(info.num_samples):
        item = ds[start + i]
        assert item["codes"].tolist() == enc.codes[i].tolist()
        assert item["positions"].tolist() == enc.positions[i].tolist()
        assert int(item["label"]) == enc.labels[i]
    ds.close()


def test_threaded_decoding_gives_the_same_tokens(stage: dict[str, Any]) -> None:
    ingest, tokenizer = stage["ingest"], stage["tokenizer"]
    info = ShardSet.from_output(ingest).shards("val")[0]
    jobs = [tk.ShardJob(split="val", shard=0, path=info.path, count=info.num_samples, sha256=info.sha256,
                        tokenizer=tokenizer, image_size=ingest.image_size, channels=ingest.channels, batch_size=3,
                        decode_threads=threads) for threads in (1, 3)]
    serial, threaded = (tk.encode_shard(job, stage["model"]) for job in jobs)
    for field in ("codes", "positions", "labels"):
        assert np.array_equal(getattr(serial, field), getattr(threaded, field)), field


def test_encode_shard_refuses_a_changed_shard(stage: dict[str, Any], tmp_path: Path) -> None:
    from infra.shards import ShardIntegrityError

    ingest = stage["ingest"]
    info = ShardSet.from_output(ingest).shards("train")[0]
    job = tk.ShardJob(split="train", shard=0, path=info.path, count=info.num_samples, sha256="0" * 64,
                      tokenizer=stage["tokenizer"], image_size=ingest.image_size, channels=ingest.channels)
    with pytest.raises(ShardIntegrityError, match="sha256"):
        tk.encode_shard(job, stage["model"])
    job = tk.ShardJob(split="train", shard=0, path=info.path, count=info.num_samples + 1, sha256=info.sha256,
                      tokenizer=stage["tokenizer"], image_size=ingest.image_size, channels=ingest.channels)
    with pytest.raises(ShardIntegrityError, match="manifest lists"):
        tk.encode_shard(job, stage["model"])


def test_complete_output_is_a_cache_hit(stage: dict[str, Any]) -> None:
    out = stage["out"]
    marker = tk.TokenizeOutput.from_dict(json.loads((Path(out.path) / tk.SUCCESS).read_text()))
    mtime = os.stat(Path(out.train_db) / "data.mdb").st_mtime_ns
    t0 = time.perf_counter()
    again = tk.run(stage["cfg"], stage["upstream"])
    assert time.perf_counter() - t0 < 2.0
    assert again == marker == tk.cached(stage["cfg"], stage["upstream"])
    assert (again.checksum, again.metadata) == (out.checksum, out.metadata)
    assert os.stat(Path(out.train_db) / "data.mdb").st_mtime_ns == mtime


def test_forced_rerun_is_byte_identical(stage: dict[str, Any]) -> None:
    out = stage["out"]
    before = {s: list(iter_records(out.db(s))) for s in tk.SPLITS}
    again = tk.run(stage["cfg"], stage["upstream"], force=True)
    assert again.checksum == out.checksum
    assert again.metadata == out.metadata
    for s in tk.SPLITS:
        assert list(iter_records(again.db(s))) == before[s]


def test_map_grew_from_a_small_start(stage: dict[str, Any]) -> None:
    assert stage["out"].metrics["map_grows"] >= 1
    for s in tk.SPLITS:
        verify(stage["out"].db(s))


def test_mlflow_run_has_counts_throughput_and_artifacts(stage: dict[str, Any]) -> None:
    from infra.tracking import Tracker

    out, cfg = stage["out"], stage["cfg"]
    client = Tracker(cfg.run.root, cfg.run.experiment).client
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["num_train"] == out.num_train
    assert run.data.metrics["num_val"] == out.num_val
    assert run.data.metrics["images_per_s"] > 0
    assert run.data.params["tokenizer_sha256"] == stage["tokenizer"].sha256
    names = {a.path for a in client.list_artifacts(out.mlflow_run_id, "tokens")}
    assert {"tokens/metadata.json", "tokens/checksum.json", "tokens/code_usage.png", "tokens/kept_cells.png"} <= names
    d = Path(client.download_artifacts(out.mlflow_run_id, "tokens/checksum.json"))
    assert out.checksum in d.read_text()
    from PIL import Image

    png = Path(client.download_artifacts(out.mlflow_run_id, "tokens/code_usage.png")).read_bytes()
    assert Image.open(io.BytesIO(png)).size[0] > 100


def test_upstream_outputs_are_found_in_the_run_root(stage: dict[str, Any]) -> None:
    """``mqgen run --only tokenize``: the stage graph finds the cached ingest and tokenizer outputs."""
    from flows.stages import cached_refs, inputs_for

    out = stage["out"]
    refs = cached_refs(stage["cfg"])
    assert (refs["tokenize"].path, refs["tokenize"].checksum) == (out.path, out.checksum)
    inputs = inputs_for("tokenize", {k: v for k, v in refs.items() if k != "tokenize"})
    for found in (tk.cached(stage["cfg"], inputs), tk.run(stage["cfg"], inputs)):
        assert found is not None
        assert (found.path, found.checksum, found.metadata) == (out.path, out.checksum, out.metadata)


def test_missing_upstream_names_the_stage_to_run(stage: dict[str, Any], tmp_path: Path) -> None:
    from flows.stages import MissingInput, cached_refs, inputs_for

    cfg = tiny_config(tmp_path)
    with pytest.raises(MissingInput, match="run the ingest stage first"):
        inputs_for("tokenize", cached_refs(cfg))
    with pytest.raises(MissingInput, match="run the train_tokenizer stage first"):
        inputs_for("tokenize", {"ingest": stage["ingest"]})


# --------------------------------------------------------------------------------------------- reader


def test_reader_refuses_mismatched_metadata(stage: dict[str, Any]) -> None:
    db, model = stage["out"].train_db, stage["model"]
    ok = TokenDataset(db, expect_codebook_size=model.cfg.codebook_size, expect_grid_size=model.cfg.grid_size,
                      expect_seq_len=model.cfg.num_kept)
    assert len(ok) == stage["out"].num_train
    with pytest.raises(TokenFormatError, match=r"codebook_size=32 in the token database.*expects 1024"):
        TokenDataset(db, expect_codebook_size=1024)
    with pytest.raises(TokenFormatError, match=r"grid_size=8 .*expects 16"):
        TokenDataset(db, expect_grid_size=16)
    with pytest.raises(TokenFormatError, match=r"seq_len=32 .*expects 48"):
        TokenDataset(db, expect_seq_len=48)


def test_reader_refuses_an_incomplete_database(tmp_path: Path) -> None:
    meta = TokenMeta(split="train", codebook_size=8, grid_size=4, seq_len=4, keep_ratio=0.25, num_classes=0,
                     tokenizer_sha256="t", source_sha256="s", shards=((0, 2), (1, 2)))
    with TokenWriter(tmp_path / "db", meta) as w:
        w.write_shard(0, np.zeros((2, 4), np.uint16), np.tile(np.arange(4, dtype=np.uint16), (2, 1)),
                      np.full(2, -1, np.int32))
    with pytest.raises(TokenFormatError, match="incomplete"):
        TokenDataset(tmp_path / "db")
    with pytest.raises(FileNotFoundError, match="run the tokenize stage"):
        TokenDataset(tmp_path / "nothing-here")


def _read_all(loader: Any) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {k: torch.cat([b[k].reshape(len(b[k]), -1) for b in batches]) for k in ("codes", "positions", "label")}


def test_two_dataloader_workers_read_every_record_once(stage: dict[str, Any]) -> None:
    ds = TokenDataset(stage["out"].train_db)
    expected = {k: torch.stack([ds[i][k] for i in range(len(ds))]).reshape(len(ds), -1)
                for k in ("codes", "positions", "label")}
    assert ds._env is not None  # opened in the parent by the reads above ...
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork")
    got = _read_all(loader)  # ... and closed before the workers fork, which open their own
    for k, want in expected.items():
        assert torch.equal(got[k], want), k
    assert got["codes"].dtype == torch.long and got["label"].shape == (len(ds), 1)
    ds.close()


def test_dataset_pickles_without_its_environment(stage: dict[str, Any]) -> None:
    """What a spawn/forkserver DataLoader worker receives: the dataset without the parent's handle."""
    import pickle

    ds = TokenDataset(stage["out"].train_db)
    first = ds[3]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._env is None
    ds.close()  # lmdb refuses a second handle on one path in one process
    assert torch.equal(clone[3]["codes"], first["codes"])
    clone.close()


def test_reader_refuses_an_environment_inherited_across_fork(stage: dict[str, Any]) -> None:
    ds = TokenDataset(stage["out"].train_db)
    ds[0]
    real_pid = ds._pid
    ds._pid = real_pid + 1  # what a forked child that skipped the at-fork close would see
    try:
        with pytest.raises(RuntimeError, match="inherited .* across fork"):
            ds[1]
    finally:
        ds._pid = real_pid
        ds.close()


def test_reader_checks_record_length(stage: dict[str, Any], tmp_path: Path) -> None:
    ds = TokenDataset(stage["out"].train_db)
    with pytest.raises(TokenFormatError, match="has 7 bytes, expected 132"):
        ds._decode(b"000000/00000000", b"\0" * 7)
    ds.close()
