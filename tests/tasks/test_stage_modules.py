"""Stage modules import without Prefect (a GPU box that runs only the trainers) and build their Prefect task,
with JSON results and no Prefect cache, on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra.config import STAGES

REPO = Path(__file__).resolve().parents[2]


def test_stage_modules_import_without_prefect() -> None:
    script = textwrap.dedent("""
        import sys
        sys.modules["prefect"] = None  # any `import prefect` now raises ImportError
        import tasks.train_tokenizer, tasks.train_stackformer, tasks.evaluate
        from tasks.train_tokenizer import TokenizerTrainer
        from tasks.train_stackformer import StackformerTrainer
        try:
            tasks.train_tokenizer.train_tokenizer_task
        except ImportError:
            print("task needs prefect")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "task needs prefect"


@pytest.mark.parametrize("stage", [*STAGES, "train_evaluator"])
def test_each_stage_has_a_json_result_task_wrapping_its_run(stage: str) -> None:
    import importlib

    from prefect.cache_policies import NO_CACHE

    module = importlib.import_module(f"tasks.{stage}")
    task = getattr(module, f"{stage}_task")
    assert task is getattr(module, f"{stage}_task")  # built once, then a plain module attribute
    assert task.fn is module.run and task.name == stage
    assert task.persist_result is True and task.result_serializer == "json" and task.cache_policy is NO_CACHE
    with pytest.raises(AttributeError):
        module.no_such_task
