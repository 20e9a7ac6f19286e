"""Stage keys name users' existing outputs: a change of code layout must not change them. These values were
computed by the code before the stage contract (``infra/refs.py``, ``flows/stages.py``) moved things around; a
deliberate change of what a stage computes bumps that stage's ``VERSION`` and updates this table."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from flows.stages import GRAPH
from infra.config import resolve

EXPECTED = {
    "tiny": {"ingest": "6e013cc3aaa5", "train_tokenizer": "c656bc718b68", "tokenize": "d6a282d01903",
             "train_evaluator": "eaba06dd509d", "train_stackformer": "29c17108cabb", "evaluate": "26bad12377f9"},
    "fmnist": {"ingest": "6dc8d3e3c8a0", "train_tokenizer": "d7d7121fa5e4", "tokenize": "d6a282d01903",
               "train_evaluator": "5a61bc3657e7", "train_stackformer": "377285275d0a", "evaluate": "460cfdfc5eaf"},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_stage_keys_of_the_presets_are_unchanged(preset: str, tmp_path) -> None:
    cfg = resolve(preset, overrides=[f"run.root={tmp_path}"])  # the root is not part of any key
    m = "a" * 64
    tokens = NS(checksum="b" * 64, key="c" * 12)
    resolved = NS(model=NS(sha256="d" * 64), tokenizer=NS(sha256="e" * 64), extractor=NS(weights_sha256="f" * 64),
                  ingest=NS(manifest_sha256=m))
    mod = {name: stage.module for name, stage in GRAPH.items()}
    keys = {"ingest": mod["ingest"].stage_key(cfg), "train_tokenizer": mod["train_tokenizer"].stage_key(cfg, m),
            "tokenize": mod["tokenize"].stage_key("e" * 64, m), "train_evaluator": mod["train_evaluator"].stage_key(cfg, m),
            "train_stackformer": mod["train_stackformer"].stage_key(cfg, tokens),
            "evaluate": mod["evaluate"].stage_key(cfg, resolved)}
    assert keys == EXPECTED[preset]


def test_guidance_fields_change_only_their_stages_keys_away_from_their_defaults(tmp_path) -> None:
    """``stackformer.cond_dropout`` and the nested ``evaluate.sampling.guidance_scale`` came later: at their
    defaults the keys above hold; set, they change exactly the stages that read them."""
    base = resolve("fmnist", overrides=[f"run.root={tmp_path}"])
    guided = resolve("fmnist", overrides=[f"run.root={tmp_path}", "stackformer.cond_dropout=0.1",
                                          "evaluate.sampling.guidance_scale=2.5"])
    tokens = NS(checksum="b" * 64, key="c" * 12)
    resolved = NS(model=NS(sha256="d" * 64), tokenizer=NS(sha256="e" * 64), extractor=NS(weights_sha256="f" * 64),
                  ingest=NS(manifest_sha256="a" * 64))
    mod = {name: stage.module for name, stage in GRAPH.items()}
    assert mod["train_stackformer"].stage_key(base, tokens) == EXPECTED["fmnist"]["train_stackformer"]
    assert mod["train_stackformer"].stage_key(guided, tokens) != EXPECTED["fmnist"]["train_stackformer"]
    assert mod["evaluate"].stage_key(guided, resolved) != EXPECTED["fmnist"]["evaluate"]
    assert mod["train_tokenizer"].stage_key(guided, "a" * 64) == EXPECTED["fmnist"]["train_tokenizer"]
    assert base.hash() != guided.hash() and base.hash("tokenizer") == guided.hash("tokenizer")
    scale_only = resolve("fmnist", overrides=[f"run.root={tmp_path}", "evaluate.sampling.guidance_scale=1.0"])
    assert scale_only.hash() == base.hash()


def test_text_settings_change_keys_only_for_captioned_data(tmp_path) -> None:
    """``text.*`` came with captions: for data without captions no key moves; for captioned data the caption
    tokenizer's settings move the tokenize key and the encoder depth the Stackformer's, nothing upstream."""
    from tasks.tokenize import text_settings

    mod = {name: stage.module for name, stage in GRAPH.items()}
    m = "a" * 64
    plain = resolve("fmnist", overrides=[f"run.root={tmp_path}", "text.vocab_size=2048", "text.n_layer=4"])
    uncaptioned = NS(captioned=False)
    assert text_settings(plain, uncaptioned) is None
    assert mod["tokenize"].stage_key("e" * 64, m, text_settings(plain, uncaptioned)) == EXPECTED["fmnist"]["tokenize"]
    assert mod["train_stackformer"].stage_key(plain, NS(checksum="b" * 64, key="c" * 12, text_len=0)) == \
        EXPECTED["fmnist"]["train_stackformer"]
    captioned = NS(captioned=True)
    a = resolve("shapes-text", overrides=[f"run.root={tmp_path}"])
    b = resolve("shapes-text", overrides=[f"run.root={tmp_path}", "text.vocab_size=1024"])
    c = resolve("shapes-text", overrides=[f"run.root={tmp_path}", "text.n_layer=3"])
    key = lambda cfg: mod["tokenize"].stage_key("e" * 64, m, text_settings(cfg, captioned))
    assert key(a) != key(b) and key(a) == key(c)
    tokens = NS(checksum="b" * 64, key="c" * 12, text_len=16)
    assert mod["train_stackformer"].stage_key(a, tokens) != mod["train_stackformer"].stage_key(c, tokens)
    assert mod["ingest"].stage_key(a) == mod["ingest"].stage_key(c)
