"""A grid shares one execution of a stage between the variants that agree on what the stage reads
(``flows.grid.STAGE_READS``). The table is checked here against the stages' own keys, so that it cannot fall behind
them: every config field of the presets below is changed in turn, and whenever that moves the key of a stage (or
of a stage upstream of it, whose output it reads) the two variants must not share that stage's execution."""

from __future__ import annotations

import dataclasses
import types
import typing
from types import SimpleNamespace as NS
from typing import Any, Literal

import pytest

from flows.grid import STAGE_READS, group_key
from flows.stages import GRAPH
from infra.config import GEOMETRY, ConfigError, PipelineConfig, from_dict, resolve

PRESETS = ("tiny", "tiny-text")
# A field that no change validates on its own is changed on top of these settings, held by both variants.
COMPANIONS: dict[str, dict[str, Any]] = {
    "tokenizer.model.architecture": {"tokenizer.model.keep_ratio": 1.0},  # vqgan codes every position
    "stackformer.model": {"tokenizer.model.keep_ratio": 1.0},  # fullgrid models the whole grid
    "stackformer.conditional": {"stackformer.cond_dropout": 0.0},  # guidance needs a conditional model
    "evaluate.inception_weights": {"evaluate.extractor": "inception-v3-compat"},
    "evaluate.inception_download": {"evaluate.extractor": "inception-v3-compat"},
    "data.captions_file": {"data.source": "image-folder"},
    "data.path": {"data.source": "image-folder"},  # tiny-text: shapes are generated, they have no path
}
# Fields that no change validates here, and why.
FIXED = {
    "tokenizer.loss.perceptual_weight": "must be 0: no perceptual network ships",
    "text.pretrained": "needs a Hugging Face model folder (checked by name in the text-axis test below)",
}


def _leaves(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Every config field as (dotted path, type); the tokenizer model's geometry is the data section's."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        elif not (prefix == "tokenizer.model." and f.name in GEOMETRY):
            yield f"{prefix}{f.name}", tp


def _alternatives(tp: Any, value: Any) -> list[Any]:
    """Values of type ``tp`` other than ``value`` to try, likeliest to validate first."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return [a for a in args if a != value]
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return ([None] if value is not None else []) + _alternatives(inner, value)
    if tp is bool:
        return [not value]
    if tp is int:
        return [1, 2, 64, 1000] if value is None else [value + 1, value * 2, value - 1, 1, 0]
    if tp is float:
        return [0.5, 0.9] if value is None else [value * 0.5, value + 0.1, 0.5, 0.0, 1.0]
    if tp is str:
        return ["other"] if value is None else [value + "x", "x"]
    if origin is tuple:
        return [[n] for n in (1, 2, 4, 8, 16)] if not value else [[*value, value[-1]], list(value[:-1])]
    raise AssertionError(f"no alternatives for config type {tp!r}: teach _alternatives")


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for part in parents:
        doc = doc[part]
    doc[name] = value


def _get(doc: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        doc = doc[part]
    return doc


def _changed(base: PipelineConfig, path: str, tp: Any) -> tuple[PipelineConfig, PipelineConfig] | None:
    """Two valid configs that differ in ``path`` only (the first may carry the field's companions), or None."""
    for companion in ({}, COMPANIONS.get(path)):
        if companion is None:
            break
        doc = base.to_dict()
        for k, v in companion.items():
            _set(doc, k, v)
        try:
            a = from_dict(PipelineConfig, doc)
        except ConfigError:
            continue
        for value in _alternatives(tp, _get(doc, path)):
            _set(doc, path, value)
            try:
                b = from_dict(PipelineConfig, doc)
            except ConfigError:
                continue
            if b.to_dict() != a.to_dict():
                return a, b
    return None


def _keys(cfg: PipelineConfig, captioned: bool) -> dict[str, str]:
    """Every stage's key for ``cfg`` on fixed upstream outputs (the configuration's part of each key)."""
    mod = {name: stage.module for name, stage in GRAPH.items()}
    ingest = NS(manifest_sha256="a" * 64, captioned=captioned, caption_grammar="shapes" if captioned else None)
    tokens = NS(checksum="b" * 64, key="c" * 12, text_len=16 if captioned else 0, text_encoder="")
    resolved = NS(model=NS(sha256="d" * 64), tokenizer=NS(sha256="e" * 64), extractor=NS(weights_sha256="f" * 64),
                  ingest=ingest)
    keys = {"ingest": mod["ingest"].stage_key(cfg),
            "train_tokenizer": mod["train_tokenizer"].stage_key(cfg, ingest.manifest_sha256),
            "tokenize": mod["tokenize"].stage_key("e" * 64, ingest.manifest_sha256,
                                                  mod["tokenize"].text_settings(cfg, ingest)),
            "train_evaluator": mod["train_evaluator"].stage_key(cfg, ingest.manifest_sha256, ingest.caption_grammar),
            "train_stackformer": mod["train_stackformer"].stage_key(cfg, tokens),
            "evaluate": mod["evaluate"].stage_key(cfg, resolved)}
    assert set(keys) == set(GRAPH), "a stage was added: compute its key here"
    return keys


def _moved(a: dict[str, str], b: dict[str, str]) -> set[str]:
    """The stages whose output differs: their own key moved, or an output they read differs."""
    out: set[str] = set()
    for name, stage in GRAPH.items():  # topological order
        if a[name] != b[name] or any(n in out for n in stage.needs):
            out.add(name)
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_variants_that_differ_in_what_a_stage_reads_never_share_its_execution(preset: str, tmp_path) -> None:
    base = resolve(preset, overrides=[f"run.root={tmp_path}"])
    captioned = base.data.source == "shapes"
    wrong: list[str] = []
    unchanged: list[str] = []
    for path, tp in _leaves(PipelineConfig):
        pair = _changed(base, path, tp)
        if pair is None:
            if path not in FIXED:
                unchanged.append(path)
            continue
        a, b = pair
        split = {s for s in GRAPH if group_key(s, a) != group_key(s, b)}
        wrong += [f"{path} moves the {s} key but the grid shares {s}"
                  for s in sorted(_moved(_keys(a, captioned), _keys(b, captioned)) - split)]
        # the members of a group hand over the first member's upstream outputs: they must have shared those too
        wrong += [f"{path} splits {n} but not {s}, which reads it"
                  for s, stage in GRAPH.items() for n in stage.needs if n in split and s not in split]
    assert not unchanged, f"no valid change found for {unchanged}: add a companion (COMPANIONS) or a reason (FIXED)"
    assert not wrong, "\n".join(wrong)


def test_a_text_axis_splits_exactly_the_stages_that_read_the_captions_settings(tmp_path) -> None:
    """The audit's case: text.* was missing from the table, so a grid over it ran one Stackformer for all."""
    base = resolve("tiny-text", overrides=[f"run.root={tmp_path}"])
    depth = resolve("tiny-text", overrides=[f"run.root={tmp_path}", "text.n_layer=2"])
    vocab = resolve("tiny-text", overrides=[f"run.root={tmp_path}", "text.vocab_size=400"])
    split = lambda a, b: [s for s in GRAPH if group_key(s, a) != group_key(s, b)]
    assert split(base, depth) == ["train_stackformer", "evaluate"]
    assert split(base, vocab) == ["tokenize", "train_stackformer", "evaluate"]
    assert "text.pretrained" in STAGE_READS["tokenize"]  # its folder's digest is in the key (no folder here)
    assert all("text" not in ".".join(STAGE_READS[s]) for s in ("ingest", "train_tokenizer", "train_evaluator"))
