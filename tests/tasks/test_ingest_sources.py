"""Every ingest source end to end on tiny inputs: image folders, digits, MNIST-format IDX, existing shards,
the download path (through file:// URLs), and the ``mqgen run --only ingest`` command line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from infra.config import ConfigError
from infra.shards import ShardSet, read_shard
from tasks.ingest import run
from tasks.ingest.sources import DOWNLOADS, SourceError, download_verified
from tests.fixtures.ingest_data import config, encode, gradient, solid, write, write_mnist_like

REPO = Path(__file__).resolve().parents[2]
RED, BLUE = (230, 20, 20), (20, 20, 230)


def _image_folder(root: Path, per_class: int = 8) -> Path:
    """cat/ (red) and dog/ (blue) with nested folders, three formats, odd sizes, plus files to ignore."""
    fmts = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]
    for c, colour in (("cat", RED), ("dog", BLUE)):
        for i in range(per_class):
            fmt, ext = fmts[i % 3]
            sub = "nested/deeper/" if i % 2 else ""
            size = [(40, 30), (30, 60), (100, 100)][i % 3]
            write(root / c / f"{sub}{c}{i}.{ext.upper() if i == 1 else ext}", encode(solid(colour, size), fmt))
    write(root / "cat" / ".DS_Store", b"\0\1")
    write(root / "cat" / "._cat0.jpg", b"resource fork, not a jpeg")  # macOS junk: hidden, ignored
    write(root / "dog" / "notes.txt", b"not an image")
    write(root / "stray.jpg", encode(solid((0, 255, 0)), "JPEG"))  # outside any class folder
    return root


def test_image_folder_with_nested_class_dirs(run_root: Path, tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "images")
    out = run(config(run_root, "data.source=image-folder", f"data.path={src}", "data.channels=3",
                     "data.val_fraction=0.25"), {})
    assert (out.num_train, out.num_val, out.num_classes, out.channels) == (12, 4, 2, 3)
    shards = ShardSet.from_output(out, verify=True)
    m = shards.manifest
    assert m["classes"] == ["cat", "dog"]
    assert m["splits"]["train"]["class_histogram"] == {"0": 6, "1": 6}  # stratified split
    assert m["splits"]["val"]["class_histogram"] == {"0": 2, "1": 2}
    assert m["ignored"]["by_reason"] == {"hidden": 2, "not_an_image_extension": 1, "outside_class_dir": 1}
    assert m["source"]["layout"] == "class sub-folders" and m["source"]["num_files"] == 16
    assert m["totals"]["num_skipped"] == 0
    for split in ("train", "val"):
        for s in shards.iter_samples(split):
            assert s.image.shape == (3, 16, 16)
            mean = s.image.float().mean(dim=(1, 2))
            expected = RED if s.label == 0 else BLUE
            assert np.allclose(mean.numpy(), expected, atol=12), (s.key, s.label, mean)


def test_flat_image_folder_is_unlabelled(run_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "flat"
    for i in range(10):
        write(src / f"img{i:02d}.png", encode(gradient((50, 20), seed=i), "PNG"))
    out = run(config(run_root, "data.source=image-folder", f"data.path={src}", "data.val_fraction=0.2"), {})
    assert (out.num_train, out.num_val, out.num_classes) == (8, 2, 0)
    shards = ShardSet.from_output(out)
    assert shards.manifest["source"]["layout"] == "flat" and shards.classes == []
    with tarfile.open(shards.urls("train")[0]) as tf:
        assert all(n.endswith(".png") for n in tf.getnames())
    assert {s.label for s in shards.iter_samples("train")} == {-1}


def test_image_folder_split_and_keys_are_seeded(make_run_root, tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "images", per_class=6)

    def keys_and_hashes(root: Path, seed: int) -> tuple[list, list]:
        out = run(config(root, "data.source=image-folder", f"data.path={src}", "data.val_fraction=0.5",
                         f"seed={seed}"), {})
        shards = ShardSet.from_output(out)
        pix = [hashlib.sha256(png).hexdigest() for u in shards.urls("val") for _, png, *_ in read_shard(u)]
        return [s["sha256"] for s in shards.manifest["splits"]["val"]["shards"]], pix

    a = keys_and_hashes(make_run_root("a"), seed=0)
    assert a == keys_and_hashes(make_run_root("b"), seed=0)
    assert a[1] != keys_and_hashes(make_run_root("c"), seed=1)[1]  # another seed, another split


def test_digits_from_scikit_learn(run_root: Path) -> None:
    out = run(config(run_root, "data.source=digits", "data.max_images=40"), {})
    assert (out.num_train, out.num_val, out.num_classes, out.image_size) == (40, 40, 10, 16)
    s = next(ShardSet.from_output(out).iter_samples("train"))
    assert s.image.shape == (1, 16, 16) and s.image.max() > 200 and 0 <= s.label < 10


def test_mnist_format_idx_from_a_user_directory(run_root: Path, tmp_path: Path) -> None:
    _, _, vx, vy = write_mnist_like(tmp_path / "mnist", gz=False)  # raw IDX (torchvision's layout)
    out = run(config(run_root, "data.source=mnist", f"data.path={tmp_path / 'mnist'}", "data.image_size=32"), {})
    assert (out.num_train, out.num_val, out.num_classes) == (40, 20, 10)
    shards = ShardSet.from_output(out)
    val = list(shards.iter_samples("val"))
    assert np.array_equal(np.stack([s.image[0, 2:30, 2:30].numpy() for s in val]), vx)
    assert [s.label for s in val] == vy.tolist()
    assert shards.manifest["source"]["found_by"] == "data.path"


def test_existing_shards_are_validated_and_reindexed(make_run_root) -> None:
    first = run(config(make_run_root("a"), "data.source=digits", "data.max_images=80"), {})
    src = ShardSet.from_output(first)
    out = run(config(make_run_root("b"), "data.source=shards", f"data.path={first.path}"), {})
    assert (out.num_train, out.num_val, out.num_classes) == (80, 80, 10)
    again = ShardSet.from_output(out, verify=True)
    assert again.manifest["source"]["split"] == "from shard names"
    for split in ("train", "val"):
        old = list(src.iter_samples(split))
        new = list(again.iter_samples(split))
        assert [s.label for s in new] == [s.label for s in old]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(old, new))  # lossless, same size: identical
        assert new[0].key == f"{split}_000000_000000" if split == "train" else new[0].key.startswith("val_")


def test_shards_by_fsspec_url_glob_and_seeded_hash_split(make_run_root, tmp_path: Path) -> None:
    first = run(config(make_run_root("a"), "data.source=digits", "data.max_images=60"), {})
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, p in enumerate(sorted(Path(first.path).glob("*.tar"))):
        shutil.copy(p, plain / f"part{i}.tar")  # names without a split: samples are split by a seeded hash
    url = f"file://{plain}/part*.tar"
    out = run(config(make_run_root("b"), "data.source=shards", f"data.path={url}", "data.val_fraction=0.5"), {})
    assert out.num_train + out.num_val == 120 and 30 <= out.num_val <= 90
    m = ShardSet.from_output(out).manifest
    assert m["source"]["num_shards"] == 2 and m["source"]["urls"][0].startswith("file://")
    capped = run(config(make_run_root("c"), "data.source=shards", f"data.path={url}", "data.val_fraction=0.5",
                        "data.max_images=7"), {})
    assert (capped.num_train, capped.num_val) == (7, 7)


def test_shard_lists_that_would_run_commands_or_use_unknown_schemes_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shell command"):
        config(tmp_path, "data.source=shards", "data.path=pipe:curl -s http://x/a.tar")
    with pytest.raises(ConfigError, match="unknown URL scheme 'nope'"):
        config(tmp_path, "data.source=shards", "data.path=nope://bucket/a.tar")
    with pytest.raises(ConfigError, match="data.path is not used by data.source=digits"):
        config(tmp_path, "data.source=digits", f"data.path={tmp_path}")
    with pytest.raises(ConfigError, match="data.png_compress_level"):
        config(tmp_path, "data.png_compress_level=12")


def test_download_checks_sha256_and_renames_only_verified_files(tmp_path: Path) -> None:
    payload = b"idx payload"
    write(tmp_path / "mirror" / "f.gz", payload)
    good = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache" / "f.gz"
    with pytest.raises(SourceError, match="sha256"):
        download_verified([f"file://{tmp_path}/mirror/f.gz"], "0" * 64, dest)
    assert not dest.exists() and not list(dest.parent.glob("*.tmp"))
    download_verified([f"file://{tmp_path}/missing/f.gz", f"file://{tmp_path}/mirror/f.gz"], good, dest)
    assert dest.read_bytes() == payload


def test_fashion_mnist_downloads_when_no_local_copy_exists(make_run_root, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.ingest import sources

    mirror = tmp_path / "mirror"
    write_mnist_like(mirror, gz=True)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setitem(DOWNLOADS, "fashion-mnist", {"mirrors": (f"file://{mirror}/",), "sha256": digests})
    run_root = make_run_root("a")
    out = run(config(run_root, "data.max_images=10"), {})
    m = ShardSet.from_output(out).manifest
    assert m["source"]["found_by"] == "downloaded"
    assert sorted(p.name for p in (run_root / "downloads" / "fashion-mnist").iterdir()) == sorted(digests)

    monkeypatch.setitem(DOWNLOADS, "fashion-mnist", {"mirrors": (f"file://{tmp_path}/offline/",),
                                                     "sha256": digests})
    with pytest.raises(SourceError, match=r"apt-get install dataset-fashion-mnist.*data\.path=DIR"):
        run(config(make_run_root("b"), "data.max_images=10"), {})


@pytest.mark.slow  # a real `mqgen` process: imports, Prefect's ephemeral API, MLflow (most of its minute)
def test_cli_runs_ingest_alone_on_an_image_folder(tmp_path: Path, mlflow_db_template: Path) -> None:
    src = _image_folder(tmp_path / "images", per_class=4)
    root = tmp_path / "run"
    root.mkdir()
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    mqgen = Path(sys.executable).parent / "mqgen"
    proc = subprocess.run([str(mqgen), "run", "--json", "--only", "ingest", "--preset", "tiny", "data.source=image-folder",
                           f"data.path={src}", f"run.root={root}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifests = list((root / "ingest").glob("*/manifest.json"))
    assert len(manifests) == 1
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert printed["ingest"]["path"] == str(manifests[0].parent)
    assert printed["ingest"]["num_classes"] == 2


def test_prefect_task_retries_transient_failures_but_not_bad_data(run_root: Path) -> None:
    from prefect.states import Failed

    from flows.pipeline import stage_task
    from tasks.ingest import IngestError

    task = stage_task("ingest", config(run_root, "run.retries=2"))
    assert task.name == "ingest" and task.retries == 2 and task.fn.__wrapped__ is run
    retry = task.retry_condition_fn
    assert retry(task, None, Failed(data=RuntimeError("worker process died")))
    assert not retry(task, None, Failed(data=IngestError("3 of 4 inputs are bad")))
    assert not retry(task, None, Failed(data=SourceError("data.path missing")))


def test_shards_roll_over_at_the_byte_limit(run_root: Path) -> None:
    out = run(config(run_root, "data.source=digits", "data.max_images=100", "data.shard_max_bytes=65536"), {})
    shards = ShardSet.from_output(out, verify=True)
    train = shards.manifest["splits"]["train"]["shards"]
    assert len(train) > 1 and all(s["num_bytes"] <= 65536 for s in train)
    assert [s["name"] for s in train] == [f"train-{i:06d}.tar" for i in range(len(train))]
    assert sum(s["num_samples"] for s in train) == 100
    keys = [s.key for s in shards.iter_samples("train")]
    assert keys == [f"train_{i:08d}" for i in range(100)]  # in order across the rolled-over parts
