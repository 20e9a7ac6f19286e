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
    assert task.fn.__wrapped__ is module.run and task.name == stage  # wrapped: its failures are redacted
    assert task.persist_result is True and task.result_serializer == "json" and task.cache_policy is NO_CACHE
    with pytest.raises(AttributeError):
        module.no_such_task


def test_training_loop_configs_round_trip_through_plain_json(tmp_path: Path) -> None:
    """What a Ray Train worker receives is typed and serialisable: ``to_dict`` gives JSON data and
    ``from_dict`` rebuilds an equal loop (nested config, model and loss configs, plan and references typed
    again, shard lists as tuples), with the test callback passed separately."""
    import json

    from infra.config import resolve
    from infra.refs import TokenizerOutput
    from tasks.train_stackformer import StackformerLoop, TrainPlan
    from tasks.train_tokenizer import TokenizerLoop, _model_config_dict

    cfg = resolve("tiny", overrides=[f"run.root={tmp_path}", "tokenizer.keep_ratio=0.5", "tokenizer.disc_start=7"])
    tok = TokenizerLoop(cfg=cfg, model_config=cfg.tokenizer.model, loss_config=cfg.tokenizer.loss, key="k1",
                        tracking_uri="sqlite:///x.db", mlflow_run_id="r1", metric_step_offset=3,
                        train_shards=(("/s/train-000000.tar", 10), ("/s/train-000001.tar", 4)),
                        val_shards=(("/s/val-000000.tar", 5),), progress_file="/p.json", log_every=7)
    doc = json.loads(json.dumps(tok.to_dict()))
    back = TokenizerLoop.from_dict(doc)
    assert back == tok
    assert back.model_config.keep_ratio == 0.5 and back.loss_config.disc_start == 7
    assert isinstance(back.train_shards[0], tuple) and isinstance(back.model_config.ch_mult, tuple)
    marker = []
    assert TokenizerLoop.from_dict(doc, on_step=marker.append).on_step == marker.append

    ref = TokenizerOutput(path="/t", key="k1", weights="/t/model.safetensors", sha256="ab" * 32, step=9,
                          model_config=_model_config_dict(cfg.tokenizer.model), metrics={"psnr": 20.0}, mlflow_run_id="r1")
    plan = TrainPlan(model="stackformer", model_config={"n_layer": 2}, num_classes=10, data_num_classes=10,
                     codebook_size=64, grid_size=8, seq_len=32, tokenizer_sha256="ab" * 32, train_db="/db/train",
                     val_db="/db/val", num_train=100, num_val=20, world_size=2, local_batch=8, steps_per_epoch=6)
    sf = StackformerLoop(cfg=cfg, plan=plan, tokenizer=ref, key="k2", tracking_uri="sqlite:///x.db",
                         mlflow_run_id="r2", metric_step_offset=0, progress_file="/q.json", log_every=5)
    back2 = StackformerLoop.from_dict(json.loads(json.dumps(sf.to_dict())))
    assert back2 == sf
    assert back2.tokenizer.mqvae_config == cfg.tokenizer.model and back2.plan.local_batch == 8
    with pytest.raises(TypeError, match="unexpected keyword"):
        StackformerLoop.from_dict({**sf.to_dict(), "max_stepz": 3})
