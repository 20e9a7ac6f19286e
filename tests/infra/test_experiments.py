"""Experiment files: a union of grids over one preset (experiments/claims.yaml), each variant validated and
counted once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra.config import ConfigError, expand_experiment, is_experiment_file

REPO = Path(__file__).resolve().parents[2]


def test_the_claims_experiment_expands_to_distinct_valid_variants_on_the_same_data() -> None:
    path = REPO / "experiments" / "claims.yaml"
    assert is_experiment_file(path)
    name, variants = expand_experiment(path, ["run.root=/r"])
    assert name == "claims"
    hashes = [v.config.hash() for v in variants]
    assert len(set(hashes)) == len(hashes) == 30
    assert len({v.label for v in variants}) == len(variants)  # every row can be told apart
    assert len({v.config.hash("data") for v in variants}) == 1  # the same data for every variant
    archs = {(v.config.tokenizer.model.architecture, v.config.tokenizer.model.keep_ratio, v.config.stackformer.model)
             for v in variants}
    assert ("vqgan", 1.0, "fullgrid") in archs and ("mqvae", 1.0, "fullgrid") in archs  # baseline and ablation
    headline = [v for v in variants if v.config.tokenizer.model.keep_ratio == 0.75
                and v.config.tokenizer.model.scorer == "learned" and v.config.stackformer.max_steps == 600
                and v.config.tokenizer.model.grid_size == 8]
    assert sorted(v.config.seed for v in headline) == [0, 1, 2]
    assert {v.config.tokenizer.model.grid_size for v in variants} == {8, 16}


def test_a_variant_in_two_grids_runs_once_and_bad_files_are_refused(tmp_path: Path) -> None:
    doc = {"preset": "tiny", "set": {"stackformer.max_steps": 12},
           "grids": [{"name": "a", "axes": {"tokenizer.keep_ratio": [0.5, 1.0]}},
                     {"name": "b", "set": {"tokenizer.keep_ratio": 1.0}}]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    name, variants = expand_experiment(path)
    assert name == "exp" and [v.config.tokenizer.model.keep_ratio for v in variants] == [0.5, 1.0]
    assert all(v.config.stackformer.max_steps == 12 for v in variants)
    doc["grids"][1]["set"]["tokenizer.keep_rati"] = 1
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="keep_rati"):
        expand_experiment(path)
    path.write_text(yaml.safe_dump({"grids": [], "preset": "tiny"}))
    with pytest.raises(ConfigError, match="non-empty list 'grids'"):
        expand_experiment(path)
    path.write_text(yaml.safe_dump({"grids": [{"axes": {"seed": [0]}}], "sweep": 1}))
    with pytest.raises(ConfigError, match="unknown keys \\['sweep'\\]"):
        expand_experiment(path)
    plain = tmp_path / "values.yaml"  # a file of config values is not an experiment
    plain.write_text(yaml.safe_dump({"tokenizer": {"keep_ratio": 0.5}}))
    assert not is_experiment_file(plain)


def test_the_grid_run_lists_the_union_of_the_experiments_axes() -> None:
    from flows.grid import grid_axes

    _, variants = expand_experiment(REPO / "experiments" / "claims.yaml", ["run.root=/r"])
    axes = grid_axes(variants)
    assert axes["seed"] == [0, 1, 2] and axes["tokenizer.keep_ratio"] == [0.75, 1.0, 0.5, 0.25]
    assert axes["tokenizer.architecture"] == ["vqgan"] and axes["stackformer.max_steps"] == [800, 1200, 2400]


def test_an_experiment_runs_in_parts_whose_variants_are_the_whole_runs() -> None:
    path = REPO / "experiments" / "claims.yaml"
    _, whole = expand_experiment(path, ["run.root=/r"])
    _, part = expand_experiment(path, ["run.root=/r"], parts=["vqgan + full-grid baseline", "16x16 grid"])
    assert len(part) == 3 + 4
    hashes = {v.config.hash() for v in whole}
    assert {v.config.hash() for v in part} <= hashes  # the same variants: the whole run reuses their stages
    with pytest.raises(ConfigError, match=r"no grid named 'vqgan'; its grids: 'headline', 'vqgan \+ full-grid baseline'"):
        expand_experiment(path, parts=["vqgan"])


def test_the_claims_grids_expand_at_the_paper_preset_for_a_cluster(tmp_path) -> None:
    parts = ["headline", "vqgan + full-grid baseline", "masked", "keep-1.0 ablation"]
    _, variants = expand_experiment(REPO / "experiments" / "claims.yaml",
                                    [f"run.root={tmp_path}", f"data.path={tmp_path}"], parts=parts, preset="paper-f16")
    assert len(variants) == 3 + 3 + 10 + 4
    cfg = variants[0].config
    assert cfg.preset == "paper-f16" and cfg.data.image_size == 256 and cfg.ray.use_gpu
    assert {v.config.tokenizer.model.architecture for v in variants} == {"mqvae", "vqgan"}
