"""Training checkpoints: one directory per step, verified before use.

Layout of a checkpoint directory::

    <name>.safetensors   one file per module (weights only; no code can hide in them)
    train_state.pt       optimiser / scheduler / step / RNG / data position (loads with weights_only=True)
    manifest.json        step, sha256 of every file above, free-form metadata
    DONE                 written last: a directory without it is an interrupted write

:func:`read_checkpoint` refuses a directory without ``DONE``, with a file whose sha256 differs from
the manifest, or whose state file holds anything but tensors and plain containers.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from infra.storage import (
    UnsafeCheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_state_file,
    save_tensors,
    sha256_file,
)

DONE = "DONE"
MANIFEST = "manifest.json"
STATE = "train_state.pt"


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    weights: dict[str, dict[str, torch.Tensor]]  # module name -> state dict
    state: dict[str, Any]
    meta: dict[str, Any]
    path: str


def write_checkpoint(directory: str | Path, step: int, weights: Mapping[str, Mapping[str, torch.Tensor]],
                     state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write a complete checkpoint into ``directory`` (created); returns ``{file: sha256}``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / DONE).unlink(missing_ok=True)
    hashes: dict[str, str] = {}
    for name, sd in weights.items():
        fname = f"{name}.safetensors"
        hashes[fname] = save_tensors(d / fname, sd, {"module": name, "step": str(step)})
    from infra.storage import save_state_file

    hashes[STATE] = save_state_file(d / STATE, dict(state))
    atomic_write_json(d / MANIFEST, {"step": int(step), "files": hashes, "meta": dict(meta or {})})
    atomic_write_bytes(d / DONE, b"ok\n")
    return hashes


def read_checkpoint(directory: str | Path) -> LoadedCheckpoint:
    """Load and verify a checkpoint; raises :class:`UnsafeCheckpointError` if it is incomplete or altered."""
    d = Path(directory)
    if not (d / DONE).is_file():
        raise UnsafeCheckpointError(f"{d}: no {DONE} marker (interrupted write)")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnsafeCheckpointError(f"{d}: unreadable {MANIFEST}: {e}") from e
    for fname, expected in files.items():
        if "/" in fname or fname.startswith("."):
            raise UnsafeCheckpointError(f"{d}: manifest names an unexpected file {fname!r}")
        p = d / fname
        if not p.is_file():
            raise UnsafeCheckpointError(f"{d}: {fname} is missing")
        actual = sha256_file(p)
        if actual != expected:
            raise UnsafeCheckpointError(f"{d}: {fname} sha256 {actual[:12]} != manifest {expected[:12]}")
    weights = {f[: -len(".safetensors")]: load_file(str(d / f)) for f in files if f.endswith(".safetensors")}
    state = load_state_file(d / STATE) if STATE in files else {}
    return LoadedCheckpoint(step=step, weights=weights, state=state, meta=manifest.get("meta", {}), path=str(d))


def checkpoint_step(directory: str | Path) -> int | None:
    """The step recorded in a checkpoint's manifest, or None when it is not a complete checkpoint."""
    d = Path(directory)
    try:
        if not (d / DONE).is_file():
            return None
        return int(json.loads((d / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_valid(directories: list[str | Path]) -> tuple[LoadedCheckpoint | None, list[str]]:
    """The newest checkpoint (by manifest step) that verifies; plus a reason for each one skipped."""
    skipped: list[str] = []
    candidates = []
    for d in directories:
        step = checkpoint_step(d)
        if step is None:
            skipped.append(f"{d}: incomplete (no {DONE} or manifest)")
        else:
            candidates.append((step, str(d)))
    for _, d in sorted(candidates, reverse=True):
        try:
            return read_checkpoint(d), skipped
        except UnsafeCheckpointError as e:
            skipped.append(str(e))
    return None, skipped


def restore_point(directories: list[str | Path], recorded: Collection[str] = ()
                  ) -> tuple[LoadedCheckpoint | None, list[str]]:
    """:func:`latest_valid` for resuming a run, which must never throw its progress away without a word.

    None (start at step 0) when no checkpoint verifies and none of them was known to be stored whole: the newest
    one may be a copy cut short (a kill or a full disk while Ray copied it into storage, in any file order, so
    even its ``DONE`` may be there), and interrupted writes are not checkpoints. A checkpoint was stored whole when
    a newer one follows it (Ray copies one at a time) or when Ray recorded it (``recorded``: directory names). When
    such a one fails verification (bit rot, a file deleted or altered by hand) and nothing newer verifies, this
    raises :class:`UnsafeCheckpointError` naming every checkpoint and why, so the user restores a good copy or
    deletes the run's folder to start over on purpose."""
    loaded, skipped = latest_valid(directories)
    if loaded is not None:
        return loaded, skipped
    ordered = sorted((Path(d) for d in directories), key=lambda d: d.name)  # Ray's names: the time they were made
    committed = [d for d in ordered if (d / DONE).is_file()]
    whole = committed[:-1] + [d for d in committed[-1:] if d.name in set(recorded)]
    if whole:
        folder = whole[0].parent
        raise UnsafeCheckpointError(
            f"every checkpoint of the run in {folder} fails verification, {len(whole)} of them stored whole "
            f"earlier, so resuming would silently restart training from step 0: {'; '.join(skipped)}. Restore a "
            f"good copy of a checkpoint there, or delete {folder} to start the run over")
    return None, skipped


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
