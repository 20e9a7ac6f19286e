"""Faults planted at exact moments of a real ``mqgen`` process, for the kill-point tests.

``python -c "from tests.loop.seams import main; main()" run ...`` is ``mqgen run ...`` (the same command-line
code, Prefect, Ray, MLflow and LMDB) with the seams that ``MQGEN_TEST_SEAMS`` (JSON) asks for:

* ``{"slow": S}``: train_stackformer sleeps S seconds after every step (its ``on_step`` seam), so a test can
  catch it between two checkpoints;
* ``{"store_then_die": N}``: the Ray Train worker stores step N's checkpoint in the run's folder, then SIGKILLs
  itself before ``ray.train.report`` returns: Ray never records it (the driver lives on and restarts the workers);
* ``{"tear_at": N}``: the worker's copy of step N's checkpoint into the run's folder is cut short: its ``DONE``
  marker and manifest have arrived, its weights and state not (the worst order a copy can take), then the power
  goes (every process of the run's session SIGKILLed);
* ``{"compact": {"split": "train", "when": "before"|"after"}}``: the tokenize stage's process SIGKILLs itself
  inside the compaction of that split's LMDB database, just before (the compacted copy is written beside it) or
  just after the compacted file replaced ``data.mdb`` (the stale ``lock.mdb`` and the copy's folder still there).

Before its kill a seam writes what it did (JSON) to ``<marker>.<seam>``, so the test knows it fired; a seam whose
file exists does not fire again (in a restarted worker). The training seams travel to the Ray Train workers inside
the stage's ``on_step`` callable; this module is pickled by value, so the workers need not import the tests package.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle

from infra.training import StepEvent

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ENV = "MQGEN_TEST_SEAMS"


def session_processes(sid: int) -> list[int]:
    """Pids of every live process of session ``sid`` (the run, its Prefect server, its local Ray)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``, this one last when it is one of them: a power cut for the run."""
    me = os.getpid()
    for pid in session_processes(sid):
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(me, signal.SIGKILL)


def _fired(marker: str, seam: str) -> bool:
    return os.path.exists(f"{marker}.{seam}")


def _mark(marker: str, seam: str, **what: Any) -> None:
    with open(f"{marker}.{seam}", "w") as f:
        f.write(json.dumps(what))
        f.flush()
        os.fsync(f.fileno())


class StepSeams:
    """The ``on_step`` callable of train_stackformer: a sleep after every step, and (installed in each process it is
    unpickled in, i.e. every Ray Train worker) the checkpoint-persisting seams."""

    def __init__(self, *, marker: str, slow: float = 0.0, store_then_die: int | None = None,
                 tear_at: int | None = None):
        self.marker, self.slow = marker, slow
        self.store_then_die, self.tear_at = store_then_die, tear_at
        self.session = os.getsid(0)  # the driver's session: the run's processes, its Ray workers included

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.store_then_die is not None or self.tear_at is not None:
            _plant_in_persist(self)

    def __call__(self, event: StepEvent) -> None:
        if self.slow:
            time.sleep(self.slow)


def _plant_in_persist(seams: StepSeams) -> None:
    """Wrap Ray Train's copy of a reported checkpoint into the run's folder (it runs in the worker, inside
    ``ray.train.report``, before Ray's controller records the checkpoint)."""
    import shutil

    from ray.train.v2._internal.execution.storage import StorageContext

    real = StorageContext.persist_current_checkpoint
    if getattr(real, "_mqgen_seam", False):
        return

    def persist(self: Any, checkpoint: Any, checkpoint_dir_name: str) -> Any:
        source = Path(checkpoint.path)
        step = int(json.loads((source / "manifest.json").read_text())["step"])
        if step == seams.tear_at and not _fired(seams.marker, "tear_at"):
            dest = Path(self.build_checkpoint_path_from_name(checkpoint_dir_name))
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("DONE", "manifest.json"):
                shutil.copyfile(source / name, dest / name)
            _mark(seams.marker, "tear_at", step=step, folder=str(dest))
            kill_session(seams.session)
        stored = real(self, checkpoint, checkpoint_dir_name)
        if step == seams.store_then_die and not _fired(seams.marker, "store_then_die"):
            _mark(seams.marker, "store_then_die", step=step, folder=stored.path, pid=os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)
        return stored

    persist._mqgen_seam = True  # type: ignore[attr-defined]
    StorageContext.persist_current_checkpoint = persist


class _CompactionOs:
    """``infra.tokens``' view of ``os``: everything passes through, except the ``os.replace`` that puts the
    compacted copy of one split's database in place, around which the process SIGKILLs itself."""

    def __init__(self, split: str, when: str, marker: str):
        self.split, self.when, self.marker = split, when, marker

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        target = Path(dst)
        if target.name != "data.mdb" or target.parent.name != f"{self.split}.lmdb":
            os.replace(src, dst)
            return
        if self.when == "after":
            os.replace(src, dst)
        _mark(self.marker, "compact", split=self.split, when=self.when)
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    """``mqgen`` (its typer app, exit codes included) with the seams ``MQGEN_TEST_SEAMS`` asks for."""
    spec = json.loads(os.environ.get(ENV, "{}"))
    marker = spec.get("marker", "")
    if {"compact", "store_then_die", "tear_at"} & set(spec) and not marker:
        raise SystemExit(f"{ENV}: a seam that kills needs a marker path")
    if "compact" in spec:
        import infra.tokens

        seam = _CompactionOs(spec["compact"]["split"], spec["compact"]["when"], marker)
        infra.tokens.os = seam  # type: ignore[assignment]
    if {"slow", "store_then_die", "tear_at"} & set(spec):
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        import tasks.train_stackformer as ts

        seams = StepSeams(marker=marker, slow=spec.get("slow", 0.0), store_then_die=spec.get("store_then_die"),
                          tear_at=spec.get("tear_at"))

        def train_stackformer(cfg: Any, inputs: Any, force: bool = False, parent_run_id: str | None = None) -> Any:
            return ts.run(cfg, inputs, force=force, parent_run_id=parent_run_id, on_step=seams)

        ts.train_stackformer_task = task(train_stackformer, name=ts.STAGE, persist_result=True,
                                         result_serializer="json", cache_policy=NO_CACHE)
    from flows.cli import app

    app(args=sys.argv[1:], prog_name="mqgen")
