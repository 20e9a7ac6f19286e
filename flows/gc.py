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
- an unfinished output (no completion marker: a training killed or failed midway, a partial token database, an
  ingest build folder with no finished output beside it), whatever its age, and the Ray Train run folder of its current attempt (a rerun resumes
  from them), unless ``drop_unfinished``; a finished stage's Ray run folder (its weights are exported) and a
  superseded attempt's are removable;
- anything whose stage lock another process holds at removal time (reported as in use, left for the next gc).

It refuses (:class:`GcRefused`) when the MLflow store it reads knows none of the runs that made the outputs it
would remove (``MLFLOW_TRACKING_URI`` set for the runs but not for gc, or the other way round): the chains of
recent runs would then look unused. Two gcs on one root take turns (``<root>/.gc.lock``).

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
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.config import STAGES, PipelineConfig
from infra.storage import pid_alive, read_json, remove_tree, try_file_lock

log = logging.getLogger("mqgen.gc")

SUCCESS = "_SUCCESS.json"  # the completion marker of every stage but ingest (training stages: attempt.json too)
MARKERS = {"ingest": "manifest.json"}  # the others: SUCCESS
TRASH = ".gc-trash-"  # the prefix of a folder being removed
_RAY_DIR = re.compile(r"^(?P<stage>[a-z_]+)-(?P<key>[0-9a-f]+)-a(?P<attempt>\d+)$")
_DAMAGED = re.compile(r"^\.(?P<key>[0-9a-f]+)\.damaged-")
_LEFTOVER = re.compile(r"^\.(?P<key>[0-9a-f]+)\.(?P<kind>build|old-[0-9a-f]+)$")
_LOG_DIR = re.compile(r"-(?P<pid>\d+)$")  # <time>-<command>-<pid> (run, grid, serve)


@dataclass
class Item:
    """One folder under the run root that gc looked at."""

    what: str  # "output", "ray run", "damaged copy", "leftover", "logs", "trash"
    stage: str  # the stage it belongs to ("" for logs and trash)
    key: str  # the stage key ("" for logs and trash)
    path: Path
    size: int  # bytes
    age_days: float  # since it last changed
    keep: str | None = None  # why it is kept; None: removable
    link: bool = False  # a symbolic link (removing it removes the link, not what it points to)

    @property
    def removable(self) -> bool:
        return self.keep is None


class GcRefused(RuntimeError):
    """gc cannot tell safely what is in use on this root."""


def _size(path: Path) -> int:
    if path.is_symlink():
        return 0
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _changed(path: Path) -> float:
    """The newest modification time of ``path`` and of what it directly holds."""
    newest = path.lstat().st_mtime
    if path.is_symlink():
        return newest
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _client(cfg: PipelineConfig) -> Any | None:
    """The MLflow client of the root's tracking store, or None when it is the root's own SQLite file and that
    does not exist (nothing was tracked there; gc does not create it)."""
    from infra.tracking import Tracker, tracking_uri_for

    uri = tracking_uri_for(cfg.run.root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    return Tracker(cfg.run.root, cfg.run.experiment).client


def _experiment_ids(client: Any) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def recent_chains(cfg: PipelineConfig, client: Any | None, keep_days: float, now: float, keep_last: int = 3
                  ) -> dict[tuple[str, str], str]:
    """``(stage, key) -> why`` for the stage keys of every pipeline / grid-variant run on this run root (its
    ``run.root`` param) started in the last ``keep_days`` days or still running, and of the last ``keep_last``
    pipeline runs whatever their age (a nightly schedule whose nights are all cache hits records no new run, yet
    uses its chain). ``client``: :func:`_client`'s."""
    if client is None:
        return {}
    ids = _experiment_ids(client)
    since_ms = int((now - keep_days * 86400) * 1000)
    real_root = os.path.realpath(cfg.run.root)
    kept: dict[tuple[str, str], str] = {}
    pipelines = 0
    token = None
    while True:
        page = client.search_runs(ids, filter_string="tags.`mqgen.kind` != 'stage'", max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        for run in page:
            their_root = run.data.params.get("run.root")
            if their_root and os.path.realpath(their_root) != real_root:
                continue  # a tracking server shared by several roots: only this root's runs count
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


def _run_id(out_dir: Path, stage: str) -> str | None:
    """The MLflow run that made an output, from its completion marker."""
    try:
        run_id = read_json(out_dir / MARKERS.get(stage, SUCCESS)).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def _check_store_knows(cfg: PipelineConfig, client: Any | None, items: list[Item]) -> None:
    """Refuse when the removable outputs name MLflow runs and this store (``client``) knows none of them."""
    from infra.tracking import tracking_uri_for

    run_ids = [r for it in items if it.what == "output" and it.removable if (r := _run_id(it.path, it.stage))][:20]
    if not run_ids:
        return
    for run_id in run_ids if client is not None else []:
        try:
            client.get_run(run_id)
            return
        except Exception:  # noqa: BLE001, S112 - MLflow says "not found" in several ways; try the next one
            continue
    raise GcRefused(f"the MLflow store {tracking_uri_for(cfg.run.root)} knows none of the runs that made the "
                    f"outputs gc would remove under {cfg.run.root} (e.g. run {run_ids[0]}), so it cannot tell which of them recent runs used: "
                    "point gc at the tracking store those runs used (MLFLOW_TRACKING_URI) and run it again")


def _attempt(out_dir: Path) -> int | None:
    try:
        return int(read_json(out_dir / "attempt.json")["attempt"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finished(out_dir: Path, stage: str) -> bool:
    return (out_dir / MARKERS.get(stage, SUCCESS)).is_file()


def plan(cfg: PipelineConfig, *, keep_days: float = 7.0, keep_last: int = 3, drop_unfinished: bool = False,
         now: float | None = None) -> list[Item]:
    """Everything gc found under ``cfg.run.root``, each removable or with the reason it is kept. Raises
    :class:`GcRefused` when the MLflow store cannot tell what recent runs used."""
    from flows.pipeline import stage_status
    now = time.time() if now is None else now
    root = Path(cfg.run.root)
    if not root.is_dir():
        return []
    current = {(r["stage"], r["key"]): "this config" for r in stage_status(cfg) if r["key"]}
    client = _client(cfg)
    chains = recent_chains(cfg, client, keep_days, now, keep_last)
    items: list[Item] = []
    unfinished_kept = "unfinished (resume state)"

    def item(what: str, stage: str, key: str, path: Path) -> Item | None:
        try:  # (a stage or another gc may move it meanwhile)
            it = Item(what, stage, key, path, _size(path), max(0.0, (now - _changed(path)) / 86400),
                      link=path.is_symlink())
        except FileNotFoundError:
            return None
        items.append(it)
        return it

    def by_age(it: Item | None) -> None:
        if it is not None and it.keep is None and it.age_days < keep_days:
            it.keep = "recent"

    for stage in STAGES:
        folder = root / stage
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not (path.is_dir() or path.is_symlink()):
                continue
            if path.name.startswith(TRASH):
                item("trash", stage, "", path)
                continue
            if damaged := _DAMAGED.match(path.name):
                by_age(item("damaged copy", stage, damaged["key"], path))
                continue
            if leftover := _LEFTOVER.match(path.name):
                it = item("leftover", stage, leftover["key"], path)
                if (it is not None and leftover["kind"] == "build" and not drop_unfinished
                        and not _finished(folder / leftover["key"], stage)):
                    it.keep = unfinished_kept  # an ingest that resumes from its finished chunks
                # (a build beside its finished output is spent: a killed ``--force`` rebuild; a rerun is a hit)
                by_age(it)
                continue
            if path.name.startswith("."):
                continue
            it = item("output", stage, path.name, path)
            if it is None:
                continue
            it.keep = current.get((stage, path.name)) or chains.get((stage, path.name))
            if it.keep is None and not drop_unfinished and not _finished(path, stage):
                it.keep = unfinished_kept
            by_age(it)

    outputs = {(i.stage, i.key): i for i in items if i.what == "output"}
    ray_root = root / "ray"
    if ray_root.is_dir():
        for path in sorted(ray_root.iterdir()):
            if path.name.startswith(TRASH):
                item("trash", "", "", path)
                continue
            m = _RAY_DIR.match(path.name)
            if not path.is_dir() or not m or m["stage"] not in STAGES:
                continue
            it = item("ray run", m["stage"], m["key"], path)
            out = outputs.get((m["stage"], m["key"]))
            if it is None:
                continue
            attempt, current_attempt = int(m["attempt"]), _attempt(root / m["stage"] / m["key"])
            if out is None or out.removable:
                pass  # its output is gone or goes: nothing can resume from it
            elif current_attempt is not None and attempt < current_attempt:
                pass  # a superseded attempt (``--from`` retrained the stage under a new attempt)
            elif _finished(out.path, out.stage):
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
            if it is not None and pid and pid_alive(int(pid["pid"])):
                it.keep = f"process {pid['pid']} running"
            by_age(it)
    _check_store_knows(cfg, client, items)
    return items


def _discard(path: Path) -> None:
    """Rename ``path`` to a ``.gc-trash-`` entry beside it (atomic), then delete that (a link: the link only)."""
    target = path.with_name(f"{TRASH}{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
    os.rename(path, target)
    remove_tree(target)


@dataclass
class Removed:
    count: int
    size: int
    in_use: list[Item]
    failed: list[str]


def remove(cfg: PipelineConfig, items: list[Item]) -> Removed:
    """Remove the removable ``items`` (of :func:`plan`); an output or Ray run whose stage lock is held is left,
    and so is one that cannot be removed (counted in ``failed``, with the reason)."""
    root = Path(cfg.run.root)
    done = Removed(0, 0, [], [])
    gone: list[str] = []
    try:
        for it in items:
            if not it.removable or not (it.path.exists() or it.path.is_symlink()):
                continue
            try:
                if it.what == "trash":
                    remove_tree(it.path)
                elif it.what in ("output", "ray run"):  # the lock its stage holds while computing it (cached_run)
                    with try_file_lock(root / it.stage / f".{it.key}.lock") as free:
                        if not free:
                            done.in_use.append(it)
                            continue
                        run_id = _run_id(it.path, it.stage) if it.what == "output" else None
                        _discard(it.path)
                        if run_id:
                            gone.append(run_id)
                else:
                    _discard(it.path)
            except FileNotFoundError:
                continue  # another gc (or the stage) removed it meanwhile
            except OSError as e:
                done.failed.append(f"{it.path}: {e.strerror or e}")
                continue
            done.count += 1
            done.size += it.size
    finally:
        if gone:
            _tag_removed(cfg, gone)
    return done


def collect(cfg: PipelineConfig, *, keep_days: float, keep_last: int = 3, drop_unfinished: bool = False
            ) -> tuple[list[Item], Removed]:
    """:func:`plan` then :func:`remove`, one gc at a time on a root (``<root>/.gc.lock``)."""
    from infra.storage import file_lock

    with file_lock(Path(cfg.run.root) / ".gc.lock", what="another gc on this root"):
        items = plan(cfg, keep_days=keep_days, keep_last=keep_last, drop_unfinished=drop_unfinished)
        return items, remove(cfg, items)


def _tag_removed(cfg: PipelineConfig, run_ids: list[str]) -> None:
    """Tag the stage runs that made the removed outputs (``mqgen.output_removed``), so MLflow says why their paths
    are gone."""
    from infra.tracking import Tracker

    client = Tracker(cfg.run.root, cfg.run.experiment).client
    stamp = time.strftime("%Y-%m-%d %H:%M:%S") + " by mqgen gc"
    for run_id in run_ids:
        try:
            client.set_tag(run_id, "mqgen.output_removed", stamp)
        except Exception as e:  # noqa: BLE001 - a courtesy to the MLflow history: never fail the removal on it
            log.warning("could not tag MLflow run %s: %s", run_id, e)


def summary(items: list[Item]) -> dict[str, Any]:
    """How many items and bytes are removable and how many kept."""
    out: dict[str, Any] = {"removable": 0, "removable_bytes": 0, "kept": 0, "kept_bytes": 0}
    for it in items:
        k = "removable" if it.removable else "kept"
        out[k] += 1
        out[f"{k}_bytes"] += it.size
    return out
