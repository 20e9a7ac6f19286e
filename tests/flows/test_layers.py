"""The layering of docs/architecture.md, checked on the source: no stage imports another, nothing loads code by
name, the graph covers every stage, and derived model configs are built once per config."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
            if node.module == "tasks":
                out += [(node.lineno, f"tasks.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("path", sorted((REPO / "tasks").glob("*.py")), ids=lambda p: p.name)
def test_no_stage_imports_another(path: Path) -> None:
    bad = [(line, name) for line, name in _imports(path) if name == "tasks" or name.startswith("tasks.")]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted([*(REPO / "tasks").glob("*.py"), *(REPO / "flows").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_code_is_loaded_by_name(path: Path) -> None:
    tree = ast.parse(path.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    names = {getattr(c.func, "attr", getattr(c.func, "id", "")) for c in calls}
    assert not names & {"import_module", "__import__", "find_spec"}, path
    assert "importlib" not in {name.split(".")[0] for _, name in _imports(path)}, path


def test_the_graph_holds_every_stage_module_once_in_run_order() -> None:
    from flows.stages import GRAPH
    from infra.config import STAGES

    modules = {p.stem for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__"}
    assert set(GRAPH) == modules and tuple(GRAPH) == STAGES
    assert "train_evaluator" in GRAPH["evaluate"].needs  # every model trained is a stage


def test_the_model_config_is_built_once_per_resolution_and_travels_as_is(monkeypatch) -> None:
    from infra.config import resolve
    from models.mqvae import MQVAEConfig

    built = []
    original = MQVAEConfig.__post_init__
    monkeypatch.setattr(MQVAEConfig, "__post_init__", lambda self: (built.append(self), original(self))[1])
    cfg = resolve("tiny", overrides=["tokenizer.keep_ratio=0.75"])
    assert len(built) == 1 and built[0] is cfg.tokenizer.model  # one construction, one validation
    m = cfg.tokenizer.model
    assert m.keep_ratio == 0.75 and m.num_kept == 48 and (m.in_channels, m.resolution) == (1, 16)
    shipped = pickle.loads(pickle.dumps(cfg))  # what a Ray worker receives: not rebuilt, not re-validated
    assert shipped.tokenizer.model == m and len(built) == 1
