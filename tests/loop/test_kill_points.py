"""Kills aimed at the moments the kill -9 loop only hits by chance, each followed by a rerun.

* the ``mqgen run`` driver SIGKILLed mid train_stackformer, once a checkpoint is stored;
* the tokenize stage SIGKILLed inside the compaction of its LMDB databases (before and after the rename);
* a SIGKILL between a training checkpoint's write and its report to Ray Train (a worker dies after storing it,
  never recorded; the power goes with a copy cut short after its ``DONE`` marker);
* Ctrl-C of ``mqgen run`` mid-training: exit code 130.

Real ``mqgen`` processes (the faults are planted by ``tests/loop/seams.py``, a wrapper around the same command
line), real Ray, Prefect, MLflow (SQLite) and LMDB. The stages share one run root, built once: ingest and the
tokenizer, then the tokenize output the compaction test leaves (or builds) for the training tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from infra.config import PipelineConfig, resolve
from infra.storage import sha256_file
from tests.fixtures.ray_runs import stored_checkpoints
from tests.loop.seams import ENV, session_processes

REPO = Path(__file__).resolve().parents[2]
MQGEN = Path(sys.executable).parent / "mqgen"
# small inputs: 4 + 4 shards of 32 images, a 4-step tokenizer; the Stackformer checkpoints every 8 of 32 steps
BASE = ["data.max_images=128", "data.shard_max_count=32", "tokenizer.max_steps=4", "tokenizer.eval_every=4",
        "tokenizer.checkpoint_every=4", "stackformer.max_steps=32", "stackformer.checkpoint_every=8",
        "stackformer.eval_every=32"]
MAX_STEPS = 32


def _env(seams: dict[str, Any] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS", ENV)}
    if seams is not None:
        env[ENV] = json.dumps(seams)
    return env


class Run:
    """``mqgen run --preset tiny`` in its own session (the real command, or with ``seams``), stderr to a file."""

    def __init__(self, root: Path, log: Path, *args: str, seams: dict[str, Any] | None = None):
        command = [sys.executable, "-c", "from tests.loop.seams import main; main()"] if seams else [str(MQGEN)]
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen([*command, "run", "--preset", "tiny", *args, f"run.root={root}", *BASE],
                                         cwd=REPO, env=_env(seams), start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=err)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> int:
        """The exit code; then every process the run left behind (its Prefect server, its local Ray) is killed."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.reap()

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + 30
        while (left := session_processes(self.proc.pid)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


def _cfg(root: Path, *extra: str) -> PipelineConfig:
    return resolve("tiny", overrides=[f"run.root={root}", *BASE, *extra])


def _refs(cfg: PipelineConfig) -> dict[str, Any]:
    from flows.stages import cached_refs

    return cached_refs(cfg)


def _state(cfg: PipelineConfig, stage: str) -> str:
    """The stage's state as ``mqgen status`` shows it."""
    from flows.pipeline import stage_status

    [row] = [r for r in stage_status(cfg) if r["stage"] == stage]
    return row["state"]


def _running(root: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("select r.run_uuid, t.value from runs r left join tags t on t.run_uuid = r.run_uuid "
                          "and t.key = 'mqgen.kind' where r.status = 'RUNNING'").fetchall()


def _client(root: Path) -> Any:
    from infra.tracking import Tracker

    return Tracker(root, "mqgen").client


def _step_history(root: Path, run_id: str, key: str = "train_loss") -> list[int]:
    return [m.step for m in _client(root).get_metric_history(run_id, key)]


def _wait_for_checkpoint(run: Run, ray_dir: Path, above: int, timeout: float = 400) -> int:
    """The newest step stored (and verifying) in ``ray_dir`` once it is above ``above``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [step for _, step in stored_checkpoints(ray_dir)]
        if steps and steps[-1] > above:
            return steps[-1]
        if run.proc.poll() is not None:
            pytest.fail(f"mqgen ended (rc {run.proc.returncode}) before a checkpoint above step {above}:\n"
                        f"{run.stderr[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no checkpoint above step {above} within {timeout} s")


def _sha256s(root: Path, refs: dict[str, Any]) -> dict[str, str]:
    """sha256 of what ingest and train_tokenizer wrote (the shards, the manifest, the weights, the markers)."""
    ingest, tokenizer = Path(refs["ingest"].path), Path(refs["train_tokenizer"].path)
    files = [*sorted(ingest.glob("*.tar")), *sorted(ingest.glob("*/*.tar")), *sorted(ingest.glob("*.json")),
             *sorted(tokenizer.glob("*.safetensors")), *sorted(tokenizer.glob("*.json"))]
    assert len(files) > 5, files
    return {str(p.relative_to(root)): sha256_file(p) for p in files}


def _records_sha256(db: Path) -> str:
    from infra.tokens import iter_records

    h = hashlib.sha256()
    for k, v in iter_records(db):
        h.update(k)
        h.update(v)
    return h.hexdigest()


UPSTREAM = textwrap.dedent("""
    import json, sys
    from infra.config import resolve
    from infra.refs import TokenizeInputs, TokenizerInputs
    from tasks import ingest, tokenize, train_tokenizer

    cfg = resolve("tiny", overrides=json.loads(sys.argv[1]))
    ing = ingest.run(cfg)
    tok = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))
    if sys.argv[2] == "tokenize":
        tokenize.run(cfg, TokenizeInputs(ingest=ing, train_tokenizer=tok))
""")


def _build(root: Path, upto: str) -> None:
    done = subprocess.run([sys.executable, "-c", UPSTREAM, json.dumps([f"run.root={root}", *BASE]), upto],
                          cwd=REPO, env=_env(None), capture_output=True, text=True, timeout=900, check=False,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Path:
    """A run root where ingest and train_tokenizer are done."""
    root = tmp_path_factory.mktemp("kill-points") / "run"
    root.mkdir()
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")
    _build(root, "train_tokenizer")
    return root


@pytest.fixture
def tokenized(upstream: Path) -> Path:
    """The same root with the tokenize output too (the compaction test's, when it ran first)."""
    if "tokenize" not in _refs(_cfg(upstream)):
        _build(upstream, "tokenize")
    return upstream


# --------------------------------------------------------------------------------------------- tokenize


def test_sigkill_inside_lmdb_compaction_never_passes_for_done_and_the_rerun_completes_it(
        upstream: Path, tmp_path: Path) -> None:
    from infra.tokens import read_meta, read_progress, verify
    from tasks import tokenize as tk

    root = upstream
    cfg = _cfg(root)
    refs = _refs(cfg)
    assert "tokenize" not in refs
    ingest, tokenizer = refs["ingest"], refs["train_tokenizer"]
    out = root / "tokenize" / tk.stage_key(tokenizer.sha256, ingest.manifest_sha256, tk.text_settings(cfg, ingest))
    shutil.rmtree(out, ignore_errors=True)
    written_before = _sha256s(root, refs)

    # 1. killed after every shard is committed, inside train.lmdb's compaction: its compacted copy is written
    #    beside it, data.mdb not yet replaced (and the database's metadata already says complete)
    marker, fired = tmp_path / "seam", tmp_path / "seam.compact"
    first = Run(root, tmp_path / "first.err", "--only", "tokenize",
                seams={"compact": {"split": "train", "when": "before"}, "marker": str(marker)})
    assert first.wait() == -signal.SIGKILL, first.stderr[-3000:]
    assert json.loads(fired.read_text()) == {"split": "train", "when": "before"}
    assert (out / ".train.lmdb.compact" / "data.mdb").is_file()
    assert read_meta(out / "train.lmdb").complete
    assert tk.load_output(out) is None and "tokenize" not in _refs(cfg)
    assert _state(cfg, "tokenize") == "not done"
    train_meta, train_scan = verify(out / "train.lmdb", require_complete=False)
    assert train_scan.num_records == ingest.num_train == train_meta.num_expected
    train_records = _records_sha256(out / "train.lmdb")
    assert sum(read_progress(out / "val.lmdb").values()) == ingest.num_val

    # 2. the next run compacts train.lmdb, then is killed right after val.lmdb's compacted file replaced data.mdb
    #    (its folder's lock.mdb and the copy's folder left behind)
    fired.unlink()
    second = Run(root, tmp_path / "second.err", "--only", "tokenize",
                 seams={"compact": {"split": "val", "when": "after"}, "marker": str(marker)})
    assert second.wait() == -signal.SIGKILL, second.stderr[-3000:]
    assert json.loads(fired.read_text()) == {"split": "val", "when": "after"}
    assert not (out / ".train.lmdb.compact").exists() and (out / ".val.lmdb.compact").is_dir()
    assert (out / "val.lmdb" / "lock.mdb").is_file()
    assert tk.load_output(out) is None and _state(cfg, "tokenize") == "not done"

    # 3. the real command finishes the stage: nothing encoded again, the committed records unchanged
    final = Run(root, tmp_path / "final.err", "--only", "tokenize")
    assert final.wait() == 0, final.stderr[-3000:]
    ref = tk.load_output(out)
    assert ref is not None and _state(cfg, "tokenize") == "done"
    assert ref.metrics["shards_resumed"] == ref.metrics["num_shards"] and ref.metrics["images_encoded"] == 0
    for split, count in (("train", ingest.num_train), ("val", ingest.num_val)):
        meta, scan = verify(out / f"{split}.lmdb")
        assert meta.complete and scan.num_records == meta.num_records == count
    assert _records_sha256(out / "train.lmdb") == train_records
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and "compact" in p.name) == []
    assert _sha256s(root, refs) == written_before
    assert _running(root) == []
    assert _client(root).get_run(ref.mlflow_run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------------------------- training


def _stackformer_out(cfg: PipelineConfig) -> tuple[Path, Path]:
    """The stage's output folder and the Ray run folder of its first attempt."""
    from tasks import train_stackformer as ts

    key = ts.stage_key(cfg, _refs(cfg)["tokenize"])
    return Path(cfg.run.root) / ts.STAGE / key, Path(cfg.run.root) / "ray" / f"{ts.STAGE}-{key}-a0"


def _finished_output(cfg: PipelineConfig, out: Path) -> Any:
    """The stage's verified output (weights sha256 checked against its _SUCCESS.json) after a finished run."""
    from tasks import train_stackformer as ts

    ref = ts.load_output(out)
    assert ref is not None and ref.step == MAX_STEPS
    assert sha256_file(ref.weights) == ref.sha256
    assert _refs(cfg)["train_stackformer"] == ref
    return ref


def test_driver_sigkilled_mid_stackformer_resumes_from_its_checkpoint(tokenized: Path, tmp_path: Path) -> None:
    root = tokenized
    cfg = _cfg(root)
    out, ray_dir = _stackformer_out(cfg)

    # the driver (mqgen itself, nothing else) SIGKILLed once training stored a checkpoint, 0.3 s per step
    killed = Run(root, tmp_path / "killed.err", "--only", "train_stackformer", seams={"slow": 0.3})
    try:
        _wait_for_checkpoint(killed, ray_dir, above=0)
        os.kill(killed.proc.pid, signal.SIGKILL)
        rc = killed.proc.wait(timeout=60)
    finally:
        killed.reap()  # what the driver started outlives it: its Ray worker for seconds, Prefect's server for good
    assert rc == -signal.SIGKILL
    on_disk = [step for _, step in stored_checkpoints(ray_dir)]
    assert on_disk and on_disk[-1] < MAX_STEPS, on_disk
    assert not (out / "_SUCCESS.json").exists() and _state(cfg, "train_stackformer") == "not done"
    [(pipeline_run, _)] = [r for r in _running(root) if r[1] == "pipeline"]

    rerun = Run(root, tmp_path / "rerun.err", "--only", "train_stackformer")
    assert rerun.wait() == 0, rerun.stderr[-3000:]
    ref = _finished_output(cfg, out)
    run = _client(root).get_run(ref.mlflow_run_id)
    assert int(run.data.tags["mqgen.resumed_from_step"]) == on_disk[-1]  # the newest one stored, not step 0
    assert run.data.tags["mqgen.ray_run"] == ray_dir.name  # the same Ray run, restored
    # one MLflow run for the stage: every step once, those before the kill logged by the killed run
    assert _step_history(root, ref.mlflow_run_id) == list(range(1, MAX_STEPS + 1))
    assert _running(root) == []
    killed_pipeline = _client(root).get_run(pipeline_run)
    assert killed_pipeline.info.status == "KILLED"
    assert killed_pipeline.data.tags["mqgen.ended_by"] == "owner process gone"


def test_kill_between_checkpoint_write_and_report_resumes_from_a_whole_checkpoint(
        tokenized: Path, tmp_path: Path) -> None:
    from infra.checkpoint import checkpoint_step

    root = tokenized
    lr = ["stackformer.lr=0.0004"]  # its own stage key, beside the driver-kill test's
    cfg = _cfg(root, *lr)
    out, ray_dir = _stackformer_out(cfg)
    marker = tmp_path / "seam"

    # 1. The worker stores step 16's checkpoint in the run's folder and is SIGKILLed inside ray.train.report (Ray
    #    recorded step 8 only); the driver restarts the workers (ray.max_failures=1), which resume from the stored
    #    16. Then the power goes while step 24's checkpoint is copied: DONE and the manifest arrived, the rest not.
    first = Run(root, tmp_path / "first.err", "--only", "train_stackformer", *lr,
                seams={"store_then_die": 16, "tear_at": 24, "marker": str(marker)})
    assert first.wait() == -signal.SIGKILL, first.stderr[-3000:]
    died = json.loads(Path(f"{marker}.store_then_die").read_text())
    torn = Path(json.loads(Path(f"{marker}.tear_at").read_text())["folder"])
    assert died["step"] == 16
    assert _recorded_by_ray(ray_dir) in ([], [8])  # 16 never: its report did not return
    assert [step for _, step in stored_checkpoints(ray_dir)] == [8, 16]
    assert _client(root).get_run(_stage_run_id(root, out.name)).data.tags["mqgen.resumed_from_step"] == "16"
    assert sorted(p.name for p in torn.iterdir()) == ["DONE", "manifest.json"] and checkpoint_step(torn) == 24
    assert _state(cfg, "train_stackformer") == "not done"

    # 2. the real command resumes from 16 again (never the torn 24, though its marker says done) and finishes
    rerun = Run(root, tmp_path / "rerun.err", "--only", "train_stackformer", *lr)
    assert rerun.wait() == 0, rerun.stderr[-3000:]
    ref = _finished_output(cfg, out)
    tags = _client(root).get_run(ref.mlflow_run_id).data.tags
    assert tags["mqgen.resumed_from_step"] == "16"
    assert torn.name in tags["mqgen.skipped_checkpoints"] and "missing" in tags["mqgen.skipped_checkpoints"]
    assert _step_history(root, ref.mlflow_run_id) == list(range(1, MAX_STEPS + 1))
    assert _running(root) == []


def _recorded_by_ray(ray_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray's controller registered (its snapshot lags its reports: none yet, maybe)."""
    snapshot = ray_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    return [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]


def _stage_run_id(root: Path, key: str) -> str:
    with sqlite3.connect(root / "mlflow.db") as db:
        [(run_id,)] = db.execute("select run_uuid from tags where key = 'mqgen.stage_key' and value = ?",
                                 (key,)).fetchall()
    return run_id


# --------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_of_mqgen_run_mid_training_exits_130(tokenized: Path, tmp_path: Path) -> None:
    root = tokenized
    lr = ["stackformer.lr=0.0003"]
    cfg = _cfg(root, *lr)
    out, ray_dir = _stackformer_out(cfg)
    run = Run(root, tmp_path / "run.err", "--only", "train_stackformer", *lr, seams={"slow": 0.3})
    try:
        _wait_for_checkpoint(run, ray_dir, above=0)
        os.killpg(run.proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        rc = run.proc.wait(timeout=300)
    finally:
        run.reap()
    assert rc == 130 and "interrupted: run the same command again to resume" in run.stderr, run.stderr[-3000:]
    assert _running(root) == []
    assert _client(root).get_run(_stage_run_id(root, out.name)).info.status == "KILLED"
