"""Reclaiming disk on a run root (``mqgen gc``): what a scheduled retrain leaves behind, found, shown, removed.

A nightly retrain on growing data makes a new ingest key every night (a new copy of every shard), a new
tokenizer, token database and generator; each training stage also leaves its Ray Train run folder, whose
checkpoints (weights, discriminator and optimiser state, several of them) outweigh the exported weights many
times over. Nothing of that is needed once a stage is done, but nothing removed it.

:func:`plan` lists every removable thing under the root with its size and age, and the reason for everything it
keeps; :func:`remove` removes the removable ones. What is kept:

- the outputs of the config given (``mqgen status`` of it: the chain the next ``mqgen run`` of it reuses);
- the outputs of every pipeline or grid execution recorded in MLflow in the last ``keep_days`` days, or still
  RUNNING, and of the last ``keep_last`` pipeline runs whatever their age (their stage keys are tags of the
  pipeline and grid-variant runs); whole chains, since one removed upstream output (a new ingest manifest) gives
  every stage after it new keys anyway;
- any output, log folder or damaged copy changed in the last ``keep_days`` days (lineage unknown, or just made);
- a Ray Train run folder while its stage is unfinished and the folder is its current attempt (a rerun resumes from
  its checkpoints); a finished stage's (its weights are exported) and a superseded attempt's are removable;
- anything whose stage lock another process holds at removal time (reported as in use, left for the next gc).

The model registry is not touched: a registered version carries its own copy of the weights and configs in the
MLflow artifact store, so ``mqgen sample --model champion`` works after its stage outputs are gone. The MLflow runs
stay (the history and the comparison reports read them); a stage run whose output was removed is tagged
``mqgen.output_removed``. Removal first renames a folder to ``.gc-trash-<name>-<random>`` beside it (one atomic
step on the same file system, also where a stage folder is a link to another disk, so no half-removed output ever
looks like an output), then deletes it; a gc killed midway leaves only such folders, which the next one clears.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.config import STAGES, PipelineConfig

log = logging.getLogger("mqgen.gc")

SUCCESS = "_SUCCESS.json"  # the training stages' success marker (their attempt.json says which attempt)
TRASH = ".gc-trash-"  # the prefix of a folder being removed
_RAY_DIR = re.compile(r"^(?P<stage>[a-z_]+)-(?P<key>[0-9a-f]+)-a(?P<attempt>\d+)$")
_DAMAGED = re.compile(r"^\.(?P<key>[0-9a-f]+)\.damaged-")
_LOG_DIR = re.compile(r"-run-(?P<pid>\d+)$")


@dataclass
class Item:
    """One folder under the run root that gc looked at."""

    what: str  # "output", "ray run", "damaged copy", "logs", "trash"
    stage: str  # the stage it belongs to ("" for logs and trash)
    key: str  # the stage key ("" for logs and trash)
    path: Path
    size: int  # bytes
    age_days: float  # since it last changed
    keep: str | None = None  # why it is kept; None: removable

    @property
    def removable(self) -> bool:
        return self.keep is None


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _changed(path: Path) -> float:
    """The newest modification time of ``path`` and of what it directly holds."""
    newest = path.stat().st_mtime
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def recent_chains(cfg: PipelineConfig, keep_days: float, now: float, keep_last: int = 3
                  ) -> dict[tuple[str, str], str]:
    """``(stage, key) -> why`` for the stage keys of every pipeline / grid-variant run in the root's MLflow store
    started in the last ``keep_days`` days or still running, and of the last ``keep_last`` pipeline runs whatever
    their age (a nightly schedule whose nights are all cache hits records no new run, yet uses its chain)."""
    from infra.tracking import Tracker

    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    client = tracker.client
    ids = [e.experiment_id for e in client.search_experiments()]
    since_ms = int((now - keep_days * 86400) * 1000)
    kept: dict[tuple[str, str], str] = {}
    pipelines = 0
    token = None
    while True:
        page = client.search_runs(ids, filter_string="tags.`mqgen.kind` != 'stage'", max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        for run in page:
            kind = run.data.tags.get("mqgen.kind", "run")
            pipelines += kind == "pipeline"
            when = time.strftime("%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
            if run.info.start_time >= since_ms:
                why = f"used by {kind} {when}"
            elif run.info.status == "RUNNING":
                why = f"running {kind} {when}"
            elif kind == "pipeline" and pipelines <= keep_last:
                why = f"last {keep_last} pipelines ({when})"
            else:
                continue
            for stage in STAGES:
                key = run.data.tags.get(f"mqgen.{stage}.key")
                if key:
                    kept.setdefault((stage, key), why)
        token = page.token
        if not token:
            return kept


def _attempt(out_dir: Path) -> int | None:
    from infra.storage import read_json

    try:
        return int(read_json(out_dir / "attempt.json")["attempt"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan(cfg: PipelineConfig, *, keep_days: float = 7.0, keep_last: int = 3, now: float | None = None
         ) -> list[Item]:
    """Everything gc found under ``cfg.run.root``, each removable or with the reason it is kept."""
    from flows.pipeline import stage_status

    now = time.time() if now is None else now
    root = Path(cfg.run.root)
    if not root.is_dir():
        return []
    current = {(r["stage"], r["key"]): "this config"
               for r in stage_status(cfg) if r["key"]}
    chains = recent_chains(cfg, keep_days, now, keep_last)
    items: list[Item] = []

    def item(what: str, stage: str, key: str, path: Path) -> Item:
        it = Item(what, stage, key, path, _size(path), max(0.0, (now - _changed(path)) / 86400))
        items.append(it)
        return it

    for stage in STAGES:
        folder = root / stage
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith(TRASH):
                item("trash", stage, "", path)
                continue
            damaged = _DAMAGED.match(path.name)
            if damaged:
                it = item("damaged copy", stage, damaged["key"], path)
                if it.age_days < keep_days:
                    it.keep = "recent"
                continue
            if path.name.startswith("."):
                continue
            it = item("output", stage, path.name, path)
            it.keep = current.get((stage, path.name)) or chains.get((stage, path.name))
            if it.keep is None and it.age_days < keep_days:
                it.keep = "recent"

    outputs = {(i.stage, i.key): i for i in items if i.what == "output"}
    ray_root = root / "ray"
    if ray_root.is_dir():
        for path in sorted(ray_root.iterdir()):
            if path.is_dir() and path.name.startswith(TRASH):
                item("trash", "", "", path)
                continue
            m = _RAY_DIR.match(path.name)
            if not path.is_dir() or not m or m["stage"] not in STAGES:
                continue
            it = item("ray run", m["stage"], m["key"], path)
            out = outputs.get((m["stage"], m["key"]))
            attempt, current_attempt = int(m["attempt"]), _attempt(root / m["stage"] / m["key"])
            if out is None or out.removable:
                pass  # its output is gone or goes: nothing can resume from it
            elif current_attempt is not None and attempt < current_attempt:
                pass  # a superseded attempt (``--from`` retrained the stage under a new attempt)
            elif (out.path / SUCCESS).is_file():
                pass  # finished: the stage exported its weights, the checkpoints are spent
            else:
                it.keep = "resume state"

    if (root / "logs").is_dir():
        for path in sorted((root / "logs").iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith(TRASH):
                item("trash", "", "", path)
                continue
            it = item("logs", "", "", path)
            pid = _LOG_DIR.search(path.name)
            from infra.storage import pid_alive

            if pid and pid_alive(int(pid["pid"])):
                it.keep = f"process {pid['pid']} running"
            elif it.age_days < keep_days:
                it.keep = "recent"
    return items


@contextlib.contextmanager
def _stage_lock(root: Path, stage: str, key: str) -> Iterator[bool]:
    """The lock a stage holds while it computes ``key`` (:func:`infra.storage.cached_run`), taken without
    waiting: yields False when another process holds it."""
    import fcntl

    lock = root / stage / f".{key}.lock"
    if not lock.exists():
        yield True
        return
    fd = os.open(str(lock), os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Rename ``path`` to a ``.gc-trash-`` folder beside it (atomic), then delete that."""
    target = path.with_name(f"{TRASH}{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
    os.rename(path, target)
    shutil.rmtree(target)


@dataclass
class Removed:
    count: int
    size: int
    in_use: list[Item]


def remove(cfg: PipelineConfig, items: list[Item]) -> Removed:
    """Remove the removable ``items`` (of :func:`plan`); an output or Ray run whose stage lock is held is left."""
    root = Path(cfg.run.root)
    count = size = 0
    in_use: list[Item] = []
    gone: list[Item] = []
    for it in items:
        if not it.removable or not it.path.exists():
            continue
        if it.what == "trash":
            shutil.rmtree(it.path, ignore_errors=True)
        elif it.stage and it.what != "damaged copy":
            with _stage_lock(root, it.stage, it.key) as free:
                if not free:
                    in_use.append(it)
                    continue
                _discard(it.path)
        else:
            _discard(it.path)
        count += 1
        size += it.size
        if it.what == "output":
            gone.append(it)
    if gone:
        _tag_removed(cfg, gone)
    return Removed(count, size, in_use)


def _tag_removed(cfg: PipelineConfig, gone: list[Item]) -> None:
    """Tag the stage runs of removed outputs (``mqgen.output_removed``), so MLflow says why their paths are gone."""
    from infra.tracking import Tracker

    client = Tracker(cfg.run.root, cfg.run.experiment).client
    ids = [e.experiment_id for e in client.search_experiments()]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S") + " by mqgen gc"
    for it in gone:
        try:
            runs = client.search_runs(ids, filter_string=f"tags.`mqgen.stage` = '{it.stage}' and "
                                      f"tags.`mqgen.stage_key` = '{it.key}'", max_results=100)
            for run in runs:
                client.set_tag(run.info.run_id, "mqgen.output_removed", stamp)
        except Exception as e:  # noqa: BLE001 - a courtesy to the MLflow history: never fail the removal on it
            log.warning("could not tag the MLflow run of %s %s: %s", it.stage, it.key, e)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary(items: list[Item]) -> dict[str, Any]:
    """Counts and sizes: removable and kept, per kind."""
    out: dict[str, Any] = {"removable": 0, "removable_bytes": 0, "kept": 0, "kept_bytes": 0}
    for it in items:
        k = "removable" if it.removable else "kept"
        out[k] += 1
        out[f"{k}_bytes"] += it.size
    return out
