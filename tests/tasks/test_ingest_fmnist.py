"""Ingest of the embedded default (Debian's Fashion-MNIST) end to end: manifest, shards, reader, cache.

One ingest of 300 + 300 images (2 worker processes, 5 + 5 shards of 64) is shared by the module.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infra.refs import IngestOutput
from infra.shards import MANIFEST_NAME, ShardIntegrityError, ShardSet, iter_samples, read_shard
from infra.storage import KEY_DOC, sha256_file
from tasks.ingest import run, stage_key
from tasks.ingest.sources import read_idx
from tests.fixtures.ingest_data import FMNIST_DIR, config

pytestmark = pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist missing")

N = 300
OVERRIDES = ("data.image_size=32", f"data.max_images={N}", "data.num_workers=2")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fmnist") / "run"
    root.mkdir()
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")
    cfg = config(root, *OVERRIDES)
    out = run(cfg, {})
    return {"cfg": cfg, "out": out, "root": root, "manifest": ShardSet.load(out.path).manifest}


def _idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    stem = "train" if split == "train" else "t10k"
    return (read_idx(FMNIST_DIR / f"{stem}-images-idx3-ubyte.gz", N),
            read_idx(FMNIST_DIR / f"{stem}-labels-idx1-ubyte.gz", N))


def test_output_reference_and_manifest_counts(ingested: dict[str, Any]) -> None:
    out: IngestOutput = ingested["out"]
    m = ingested["manifest"]
    assert (out.num_train, out.num_val, out.num_classes, out.image_size, out.channels) == (N, N, 10, 32, 1)
    assert out.key == stage_key(ingested["cfg"]) and Path(out.path).name == out.key
    assert Path(out.path).parent == ingested["root"] / "ingest"
    assert out.manifest_sha256 == sha256_file(Path(out.path) / MANIFEST_NAME)
    assert IngestOutput.from_dict(out.to_dict()) == out
    assert m["key"] == m["config_hash"] == out.key and m["mlflow_run_id"] == out.mlflow_run_id
    assert m["source"]["kind"] == "fashion-mnist" and m["source"]["path"] == str(FMNIST_DIR)
    assert set(m["source"]["files"]) == {p.name for p in FMNIST_DIR.glob("*.gz")}
    assert m["totals"]["num_skipped"] == 0 and m["skipped"]["by_reason"] == {}
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["num_samples"] == N == sum(sh["num_samples"] for sh in s["shards"])
        assert [sh["name"] for sh in s["shards"]] == [f"{split}-{i:06d}.tar" for i in range(5)]
        assert [sh["num_samples"] for sh in s["shards"]] == [64, 64, 64, 64, 44]  # data.shard_max_count=64
        _, labels = _idx(split)
        assert s["class_histogram"] == {str(k): int(v) for k, v in enumerate(np.bincount(labels, minlength=10))}
        for sh in s["shards"]:
            p = Path(out.path) / sh["name"]
            assert p.stat().st_size == sh["num_bytes"] and sha256_file(p) == sh["sha256"]
    assert sorted(p.name for p in Path(out.path).iterdir()) == sorted(
        [MANIFEST_NAME, "samples.png", KEY_DOC] + [sh["name"] for s in m["splits"].values() for sh in s["shards"]])
    assert not list(Path(out.path).parent.glob("*.partial")) and not list(Path(out.path).rglob("*.partial"))


def test_pixels_and_labels_match_the_idx_files(ingested: dict[str, Any]) -> None:
    shards = ShardSet.from_output(ingested["out"], verify=True)
    for split in ("train", "val"):
        images, labels = _idx(split)
        samples = list(shards.iter_samples(split))
        assert [s.key for s in samples] == [f"{split}_{i:08d}" for i in range(N)]
        got = np.stack([s.image.numpy() for s in samples])
        assert got.shape == (N, 1, 32, 32) and got.dtype == np.uint8
        assert np.array_equal(got[:, 0, 2:30, 2:30], images)  # 28x28 zero-padded to 32x32, not resized
        assert not got[:, 0, :2].any() and not got[:, 0, 30:].any()
        assert [s.label for s in samples] == labels.tolist()


def test_tar_members_are_png_and_cls_only(ingested: dict[str, Any]) -> None:
    import tarfile

    path = ShardSet.from_output(ingested["out"]).urls("train")[0]
    with tarfile.open(path) as tf:
        names = tf.getnames()
        assert all(ti.isreg() and ti.mtime == 0 and ti.mode == 0o444 for ti in tf.getmembers())
    assert names[:4] == ["train_00000000.png", "train_00000000.cls", "train_00000001.png", "train_00000001.cls"]
    key, png, label, _ = next(read_shard(path))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and key == "train_00000000" and label >= 0


def test_two_ranks_two_workers_read_each_sample_exactly_once(ingested: dict[str, Any]) -> None:
    shards = ShardSet.from_output(ingested["out"])
    urls = shards.urls("train") + shards.urls("val")  # 10 shards over 4 consumers
    seen: Counter[str] = Counter()
    per_consumer = []
    for rank in range(2):
        for worker in range(2):
            keys = [s.key for s in iter_samples(urls, rank=rank, world_size=2, worker=worker, num_workers=2)]
            per_consumer.append(len(keys))
            seen.update(keys)
    assert len(seen) == 2 * N and set(seen.values()) == {1}
    assert all(n > 0 for n in per_consumer)


def test_torch_dataloader_workers_split_a_rank_exactly_once(ingested: dict[str, Any]) -> None:
    import torch.utils.data

    from infra.shards import ShardDataset

    shards = ShardSet.from_output(ingested["out"])
    keys: list[str] = []
    for rank in range(2):
        ds = ShardDataset(shards, "train", rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2)
        for images, labels, batch_keys in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (1, 32, 32)
            assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 10)).all()
            keys += list(batch_keys)
    assert sorted(keys) == [f"train_{i:08d}" for i in range(N)]


def test_shuffled_epochs_still_cover_each_sample_once(ingested: dict[str, Any]) -> None:
    from infra.shards import ShardDataset

    shards = ShardSet.from_output(ingested["out"])
    orders = []
    for epoch in (0, 1):
        keys = []
        for rank in range(2):
            ds = ShardDataset(shards, "train", rank=rank, world_size=2, shuffle=True, shuffle_buffer=50, seed=3)
            ds.set_epoch(epoch)
            keys += [s.key for s in ds]
        assert sorted(keys) == [f"train_{i:08d}" for i in range(N)]
        orders.append(keys)
    assert orders[0] != orders[1]


def test_second_run_is_a_cache_hit_that_touches_nothing(ingested: dict[str, Any]) -> None:
    out_dir = Path(ingested["out"].path)
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    again = run(ingested["cfg"], {})
    assert again == ingested["out"]
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before
    assert sorted(p.name for p in out_dir.parent.iterdir()) == sorted([out_dir.name, f".{out_dir.name}.lock"])


def test_same_source_and_seed_give_identical_shards_with_any_worker_count(ingested: dict[str, Any],
                                                                          run_root: Path) -> None:
    cfg = config(run_root, *OVERRIDES[:-1], "data.num_workers=1")
    assert stage_key(cfg) == ingested["out"].key  # num_workers is not part of the key
    other = run(cfg, {})
    a = ShardSet.from_output(ingested["out"]).manifest["splits"]
    b = ShardSet.from_output(other).manifest["splits"]
    assert [[(s["name"], s["sha256"]) for s in a[x]["shards"]] for x in a] == \
        [[(s["name"], s["sha256"]) for s in b[x]["shards"]] for x in b]


def test_mlflow_run_has_params_metrics_manifest_and_sample_grid(ingested: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ingested['root'] / 'mlflow.db'}")
    r = client.get_run(ingested["out"].mlflow_run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["data.source"] == "fashion-mnist" and r.data.params["stage_key"] == ingested["out"].key
    assert "data.num_workers" not in r.data.params
    assert r.data.metrics["num_train"] == N and r.data.metrics["num_skipped"] == 0
    assert r.data.metrics["images_per_s"] > 0 and r.data.metrics["workers"] == 2
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"manifest.json", "samples.png"} <= names
    from PIL import Image

    grid = Image.open(Path(client.download_artifacts(r.info.run_id, "samples.png")))
    assert grid.size == (8 * 64, 8 * 64)  # 8x8 cells of 32 px upscaled x2


def test_force_rebuilds_and_swaps_in_a_complete_output(ingested: dict[str, Any], run_root: Path) -> None:
    cfg = config(run_root, *OVERRIDES[:-1], "data.num_workers=1")
    first = run(cfg, {})
    old_manifest = (Path(first.path) / MANIFEST_NAME).read_bytes()
    second = run(cfg, {}, force=True)
    assert second.path == first.path and second.mlflow_run_id == first.mlflow_run_id
    assert (Path(second.path) / MANIFEST_NAME).read_bytes() != old_manifest  # new timings / timestamp
    with pytest.raises(ShardIntegrityError, match="sha256"):
        ShardSet.from_output(first)  # the old reference pins the old manifest
    shards = ShardSet.from_output(second, verify=True)
    assert shards.num_samples("train") == N
    assert sorted(p.name for p in Path(second.path).parent.iterdir()) == sorted(
        [second.key, f".{second.key}.lock"])  # no build or old directory left behind


def test_tiny_preset_resizes_and_replicates_channels(run_root: Path) -> None:
    out = run(config(run_root, "data.max_images=20", "data.channels=3"), {})
    assert (out.image_size, out.channels, out.num_train) == (16, 3, 20)
    s = next(ShardSet.from_output(out).iter_samples("train"))
    assert s.image.shape == (3, 16, 16)
    assert (s.image[0] == s.image[1]).all() and (s.image[1] == s.image[2]).all()
    images, _ = _idx("train")
    assert s.image[0].float().mean() == pytest.approx(images[0].astype(float).mean(), abs=12)
