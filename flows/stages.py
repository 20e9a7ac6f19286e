"""The stage graph: every stage, what it reads, and how its inputs are resolved. Wiring only.

Each stage module in ``tasks/`` exposes ``run(cfg, inputs, *, force=False, parent_run_id=None) -> Output`` and
``cached(cfg, inputs) -> Output | None`` over the typed references of :mod:`infra.refs`. A stage never imports
another stage and never looks for its own inputs: this graph says which outputs feed which stage, and the
flows (:mod:`flows.pipeline`, :mod:`flows.grid`) hand them over.

::

    ingest ──► train_tokenizer ──► tokenize ──► train_stackformer ──┐
       │              └────────────────────────────────┬────────────┤
       └──────────► train_evaluator ───────────────────┴──────► evaluate
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from infra.config import STAGES, PipelineConfig
from infra.errors import PermanentError
from infra.refs import (
    EvaluateInputs,
    EvaluatorInputs,
    IngestInputs,
    StackformerInputs,
    TokenizeInputs,
    TokenizerInputs,
)
from infra.storage import DamagedOutput
from tasks import evaluate, ingest, tokenize, train_evaluator, train_stackformer, train_tokenizer


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType  # run(cfg, inputs, *, force, parent_run_id), cached(cfg, inputs), STAGE, <name>_task
    inputs: type  # the <Stage>Inputs class; its fields are named after the stages in ``needs``
    needs: tuple[str, ...]
    # Why the stage has nothing to do for a config (its output is then None), or None when it applies.
    skip: Callable[[PipelineConfig, Any], str | None] | None = None

    @property
    def task(self) -> Any:
        """The stage's Prefect task (built on first use: stage modules import without Prefect)."""
        return getattr(self.module, f"{self.name}_task")


GRAPH: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", ingest, IngestInputs, ()),
    Stage("train_tokenizer", train_tokenizer, TokenizerInputs, ("ingest",)),
    Stage("tokenize", tokenize, TokenizeInputs, ("ingest", "train_tokenizer")),
    Stage("train_stackformer", train_stackformer, StackformerInputs, ("tokenize", "train_tokenizer")),
    Stage("train_evaluator", train_evaluator, EvaluatorInputs, ("ingest",), skip=train_evaluator.skip_reason),
    Stage("evaluate", evaluate, EvaluateInputs, ("ingest", "train_tokenizer", "train_stackformer", "train_evaluator")),
)}
assert tuple(GRAPH) == STAGES, "infra.config.STAGES must list the graph's stages in this (topological) order"
for _stage in GRAPH.values():
    assert _stage.module.STAGE == _stage.name
    assert all(STAGES.index(n) < STAGES.index(_stage.name) for n in _stage.needs), _stage.name


class MissingInput(PermanentError):
    """A stage was asked to run but an output it reads does not exist for this config."""


def descendants(stage: str) -> set[str]:
    """``stage`` and every stage that reads its output, directly or not."""
    out = {stage}
    for s in GRAPH.values():  # topological order: one pass suffices
        if any(n in out for n in s.needs):
            out.add(s.name)
    return out


def inputs_for(stage: str, refs: dict[str, Any]) -> Any:
    """The typed inputs of ``stage`` from the outputs in ``refs`` (a skipped stage's output is None)."""
    spec = GRAPH[stage]
    missing = [n for n in spec.needs if n not in refs]
    if missing:
        raise MissingInput(f"{stage} needs the {missing[0]} output for this config: run the {missing[0]} stage "
                           f"first (mqgen run --only {missing[0]} ...) or the whole pipeline")
    return spec.inputs(**{n: refs[n] for n in spec.needs})


def skip_reason(stage: str, cfg: PipelineConfig, inputs: Any) -> str | None:
    spec = GRAPH[stage]
    return spec.skip(cfg, inputs) if spec.skip is not None else None


def cached_refs(cfg: PipelineConfig, skipped: dict[str, str] | None = None,
                damaged: dict[str, DamagedOutput] | None = None) -> dict[str, Any]:
    """The verified outputs of ``cfg``'s stages that exist, in graph order (a stage counts only when all it
    reads exists too); a skipped stage maps to None (its reason goes to ``skipped``); a damaged output counts as
    missing (what is wrong goes to ``damaged``: the next run sets it aside and builds it again). No work is
    done."""
    refs: dict[str, Any] = {}
    for name, spec in GRAPH.items():
        try:
            inputs = inputs_for(name, refs)
        except MissingInput:
            continue
        why = skip_reason(name, cfg, inputs)
        if why is not None:
            refs[name] = None
            if skipped is not None:
                skipped[name] = why
            continue
        try:
            ref = spec.module.cached(cfg, inputs)
        except DamagedOutput as e:
            if damaged is not None:
                damaged[name] = e
            continue
        if ref is not None:
            refs[name] = ref
    return refs
