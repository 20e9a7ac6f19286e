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


def _stage_of(path: Path) -> str:
    """The stage a file of tasks/ belongs to: ``tasks/<stage>.py`` or anything in the package ``tasks/<stage>/``."""
    rel = path.relative_to(REPO / "tasks")
    return rel.parts[0] if len(rel.parts) > 1 else path.stem


STAGE_FILES = sorted(p for p in (REPO / "tasks").rglob("*.py") if p != REPO / "tasks" / "__init__.py")


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: str(p.relative_to(REPO / "tasks")))
def test_no_stage_imports_another(path: Path) -> None:
    own = f"tasks.{_stage_of(path)}"
    bad = [(line, name) for line, name in _imports(path)
           if (name == "tasks" or name.startswith("tasks.")) and name != own and not name.startswith(own + ".")]
    assert not bad, f"{path.name} imports {bad}"


def test_ingest_only_code_lives_with_the_ingest_stage() -> None:
    # the sources and the shard writer serve one stage: they are its package, not a shared shelf in infra/
    assert not (REPO / "infra" / "sources.py").exists()
    for path in [*(REPO / "infra").glob("*.py"), *(REPO / "tasks").glob("*.py"), *(REPO / "flows").glob("*.py")]:
        names = {name for _, name in _imports(path)}
        assert not {"tasks.ingest.sources", "tasks.ingest.writer"} & names, path


@pytest.mark.parametrize("path", sorted([*STAGE_FILES, *(REPO / "flows").glob("*.py")]),
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

    modules = {_stage_of(p) for p in STAGE_FILES}
    assert set(GRAPH) == modules and tuple(GRAPH) == STAGES
    assert all(stage.module.__name__ == f"tasks.{name}" for name, stage in GRAPH.items())
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


@pytest.mark.parametrize("package", ["models", "tasks", "flows", "infra"])
def test_only_infra_ray_talks_to_ray(package: str) -> None:
    """Ray is infra's business: the stages and flows reach it through ``infra/ray.py`` (init, fit, map_tasks,
    run_remote), so a cluster address, resources and failure handling are decided in one place."""
    bad = [f"{path.relative_to(REPO)}:{line}" for path in sorted((REPO / package).rglob("*.py"))
           if path != REPO / "infra" / "ray.py"
           for line, name in _imports(path) if name == "ray" or name.startswith("ray.")]
    assert not bad, f"imports of ray outside infra/ray.py: {bad}"
