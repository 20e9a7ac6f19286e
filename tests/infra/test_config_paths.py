"""Paths in a config are made absolute once, when it is resolved: stage keys and stored references do not depend
on the directory a process starts in, and two spellings of one directory give one key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.config import PipelineConfig, from_dict, resolve
from tasks import ingest


@pytest.fixture
def in_dir(monkeypatch: pytest.MonkeyPatch):
    def chdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(path)
        return path

    return chdir


def test_default_relative_root_is_made_absolute_against_the_callers_directory(tmp_path: Path, in_dir) -> None:
    in_dir(tmp_path / "a")
    cfg = resolve("tiny")
    assert cfg.run.root == str(tmp_path / "a" / "runs")
    assert os.path.isabs(cfg.to_dict()["run"]["root"])


def test_two_spellings_of_one_root_give_one_config_hash(tmp_path: Path, in_dir) -> None:
    in_dir(tmp_path / "a")
    here = resolve("tiny")
    in_dir(tmp_path / "b" / "c")
    there = resolve("tiny", overrides=["run.root=../../a/./runs"])
    assert there.run.root == here.run.root
    assert there.hash() == here.hash()


def test_a_config_dict_travels_to_another_directory_unchanged(tmp_path: Path, in_dir) -> None:
    """What a Ray worker or a Prefect worker rebuilds from the dict, wherever it runs."""
    in_dir(tmp_path / "a")
    cfg = resolve("tiny", overrides=["data.source=image-folder", "data.path=imgs", "evaluate.extractor=inception-v3-compat",
                                     "evaluate.inception_weights=~/w.pth"])
    in_dir(tmp_path / "elsewhere")
    again = from_dict(PipelineConfig, cfg.to_dict())
    assert again == cfg
    assert again.data.path == str(tmp_path / "a" / "imgs")
    assert again.evaluate.inception_weights == str(Path("~/w.pth").expanduser())


def test_relative_shard_lists_from_two_directories_give_two_ingest_keys(tmp_path: Path, in_dir) -> None:
    in_dir(tmp_path / "one")
    first = resolve("tiny", overrides=["data.source=shards", "data.path=data/train-{000..003}.tar data/x.tar"])
    in_dir(tmp_path / "two")
    second = resolve("tiny", overrides=["data.source=shards", "data.path=data/train-{000..003}.tar data/x.tar"])
    assert first.data.path == f"{tmp_path}/one/data/train-{{000..003}}.tar {tmp_path}/one/data/x.tar"
    assert ingest.stage_key(first) != ingest.stage_key(second)
    # ... while one directory spelled two ways is one key
    in_dir(tmp_path / "two" / "sub")
    same = resolve("tiny", overrides=["data.source=shards", "data.path=../data/train-{000..003}.tar ../data/x.tar"])
    assert ingest.stage_key(same) == ingest.stage_key(second)


def test_urls_are_left_alone(tmp_path: Path, in_dir) -> None:
    in_dir(tmp_path)
    cfg = resolve("tiny", overrides=["data.source=shards", "data.path=s3://bucket/a.tar file:///x/b.tar"])
    assert cfg.data.path == "s3://bucket/a.tar file:///x/b.tar"
