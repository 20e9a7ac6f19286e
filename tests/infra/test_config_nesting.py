"""The tokenizer section nests the configs the models define (``models.mqvae.MQVAEConfig``,
``models.losses.LossConfig``): one set of defaults, one validation. The flat keys users already write
(``tokenizer.keep_ratio``) stay aliases, and every preset resolves to the values it had before the nesting
(``golden/resolved_configs.json``, written by the code before it), so stage keys and MLflow parameters of existing
runs do not move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from infra.config import ADDED_FIELDS, ConfigError, PipelineConfig, from_dict, resolve

GOLDEN = json.loads((Path(__file__).parents[1] / "flows" / "golden" / "resolved_configs.json").read_text())
# Deliberate changes of a preset's values, with the reason. The released architecture normalises with
# GroupNorm(32); the flat section's default of 8 (sized for the tiny CPU models) leaked into the paper presets.
# paper presets: GroupNorm 32 as released; the tokenizer's batch is the global one, 30 per GPU x 8 (it was 30 in
# all, 3 per worker, with 6 images a step silently dropped), and its warm-up the official 0.1 epoch (533 steps of
# 240 ImageNet images; it was the 20-step default of the tiny CPU models)
CHANGED = {p: {"tokenizer.norm_groups": (8, 32), "tokenizer.batch_size": (30, 240), "tokenizer.warmup_steps": (20, 533)}
           for p in ("paper-f8", "paper-f16")}


def _diff(before: dict, after: dict, prefix: str = "") -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for k in set(before) | set(after):
        a, b = before.get(k), after.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_every_preset_resolves_to_the_values_it_had_before(case: str) -> None:
    g = GOLDEN[case]
    cfg = resolve(case.split("+")[0], overrides=["run.root=/r", *g["overrides"]])
    # fields that did not exist, at their default (a None default reads as absent)
    added = {k: (None, v) for k, v in ADDED_FIELDS.items() if v is not None}
    for k, v in ADDED_FIELDS.items():  # a field added later to a section itself added later: inside its dict
        parent, _, name = k.rpartition(".")
        if parent in added:
            added[parent] = (None, {**added[parent][1], name: v})
    assert _diff(g["resolved"], cfg.flat_dict()) == {**CHANGED.get(case, {}), **added}
    if case not in CHANGED:
        assert cfg.hash() == g["hash"]  # the config hash MLflow and Prefect deployments are named by


def test_flat_and_nested_spellings_are_one_config(tmp_path: Path) -> None:
    flat = resolve("tiny", overrides=["tokenizer.keep_ratio=0.75", "tokenizer.disc_start=3", "tokenizer.lr=1e-3"])
    nested = resolve("tiny", overrides=["tokenizer.model.keep_ratio=0.75", "tokenizer.loss.disc_start=3",
                                        "tokenizer.lr=1e-3"])
    assert flat == nested and flat.hash() == nested.hash()
    assert flat.tokenizer.model.keep_ratio == 0.75 and flat.tokenizer.loss.disc_start == 3
    doc = tmp_path / "flat.yaml"
    doc.write_text(yaml.safe_dump({"tokenizer": {"keep_ratio": 0.75, "disc_start": 3, "lr": 1e-3}}))
    assert resolve("tiny", file=doc) == flat
    # a later override of either spelling wins over a file or preset value of the other
    assert resolve("tiny", file=doc, overrides=["tokenizer.model.keep_ratio=0.25"]).tokenizer.model.keep_ratio == 0.25


def test_one_value_named_twice_in_one_document_is_an_error(tmp_path: Path) -> None:
    doc = tmp_path / "both.yaml"
    doc.write_text(yaml.safe_dump({"tokenizer": {"keep_ratio": 0.5, "model": {"keep_ratio": 0.75}}}))
    with pytest.raises(ConfigError, match=r"tokenizer\.keep_ratio=0\.5 and tokenizer\.model\.keep_ratio=0\.75"):
        resolve("tiny", file=doc)


def test_config_show_output_reads_back_to_the_same_config(tmp_path: Path) -> None:
    cfg = resolve("tiny", overrides=["tokenizer.scorer=random", "data.image_size=32"])
    doc = tmp_path / "shown.yaml"
    doc.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "preset"}))
    assert resolve("tiny", file=doc) == cfg
    assert from_dict(PipelineConfig, cfg.to_dict()) == cfg


def test_a_stored_flat_config_dict_still_loads() -> None:
    # what an existing Prefect deployment or a grid payload written before the nesting holds
    cfg = resolve("tiny", overrides=["tokenizer.keep_ratio=0.75"])
    assert from_dict(PipelineConfig, cfg.flat_dict()) == cfg


def test_the_model_geometry_follows_the_data_section() -> None:
    cfg = resolve("tiny", overrides=["data.image_size=32", "data.channels=3"])
    assert (cfg.tokenizer.model.resolution, cfg.tokenizer.model.in_channels) == (32, 3)
    with pytest.raises(ConfigError, match=r"tokenizer\.model\.resolution=64 differs from data\.image_size=16"):
        resolve("tiny", overrides=["tokenizer.model.resolution=64"])
    with pytest.raises(ConfigError, match=r"^data\.image_size \(17\) must be divisible by the downsample factor 2"):
        resolve("tiny", overrides=["data.image_size=17"])


@pytest.mark.parametrize("override, key", [
    ("tokenizer.keep_ratio=1.5", r"^tokenizer\.keep_ratio .*must be in \(0, 1\]"),
    ("tokenizer.model.keep_ratio=0.001", r"^tokenizer\.keep_ratio 0\.001 keeps .* = 0 positions"),
    ("tokenizer.norm_groups=5", r"^tokenizer\.norm_groups=5 does not divide"),
    ("tokenizer.disc_layers=0", r"^tokenizer\.disc_layers must be >= 1"),
    ("tokenizer.codebook_size=70000", r"tokenizer\.codebook_size"),
    ("tokenizer.keep_ratoi=0.5", r"did you mean tokenizer\.keep_ratio"),
    ("tokenizer.model.scorer=best", r"^tokenizer\.scorer='best' is not allowed"),
    ("tokenizer.ch_mult=[1,x]", r"^tokenizer\.ch_mult\[1\]='x' must be an integer"),
])
def test_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        resolve("tiny", overrides=[override])


def test_the_model_defaults_are_the_released_architecture_and_presets_set_only_what_differs() -> None:
    from models.mqvae import MQVAEConfig

    paper = resolve("paper-f16").tokenizer.model
    assert paper == MQVAEConfig()  # the released f16 model is the model's own default
    assert (paper.norm_groups, paper.grid_size, paper.num_kept) == (32, 16, 192)
    f8 = resolve("paper-f8").tokenizer.model
    assert (f8.grid_size, f8.num_kept) == (32, 256)


def test_an_edited_config_show_output_follows_the_new_data_geometry(tmp_path: Path) -> None:
    d = resolve("tiny").to_dict()
    assert "resolution" not in d["tokenizer"]["model"]  # shown once, as data.image_size
    d["data"]["image_size"] = 32
    del d["preset"]
    doc = tmp_path / "edited.yaml"
    doc.write_text(yaml.safe_dump(d))
    assert resolve("tiny", file=doc).tokenizer.model.resolution == 32


def test_the_tokenizer_batch_is_global_and_must_split_over_the_workers() -> None:
    ok = resolve("paper-f16", overrides=["run.root=/r"])
    assert ok.tokenizer.batch_size == 240 and ok.ray.num_workers == 8  # 30 images on each of 8 GPUs
    with pytest.raises(ConfigError, match=r"tokenizer.batch_size=30 is the global batch .* use 24 or 32"):
        resolve("paper-f16", overrides=["run.root=/r", "tokenizer.batch_size=30"])
    assert resolve("tiny", overrides=["tokenizer.batch_size=15", "ray.num_workers=3"]).tokenizer.batch_size == 15


def test_a_perceptual_weight_is_refused_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="perceptual_weight=0.5: mqgen has no perceptual network"):
        resolve("tiny", overrides=["tokenizer.perceptual_weight=0.5"])
