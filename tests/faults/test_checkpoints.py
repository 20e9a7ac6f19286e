"""Checkpoints: interrupted writes, bit rot and malicious pickles are refused; the previous one is used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from infra.checkpoint import DONE, latest_valid, read_checkpoint, write_checkpoint
from infra.storage import UnsafeCheckpointError, load_state_file, sha256_file


def _write(d: Path, step: int) -> None:
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.nn.init.constant_(lin.weight, float(step))
    write_checkpoint(d, step, {"model": lin.state_dict()}, {"opt": opt.state_dict(), "rng": torch.get_rng_state()},
                     meta={"note": "test"})


def test_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    _write(tmp_path / "c", 5)
    ck = read_checkpoint(tmp_path / "c")
    assert ck.step == 5
    assert torch.equal(ck.weights["model"]["weight"], torch.full((2, 3), 5.0))
    assert "state" in ck.state["opt"] and ck.meta == {"note": "test"}


def test_missing_done_marker_or_bad_hash_falls_back_to_previous(tmp_path: Path) -> None:
    for s in (10, 20, 30):
        _write(tmp_path / f"c{s}", s)
    (tmp_path / "c30" / DONE).unlink()  # killed while writing step 30
    blob = bytearray((tmp_path / "c20" / "train_state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one flipped bit in step 20
    (tmp_path / "c20" / "train_state.pt").write_bytes(bytes(blob))
    ck, skipped = latest_valid([tmp_path / "c10", tmp_path / "c20", tmp_path / "c30"])
    assert ck is not None and ck.step == 10
    assert any("incomplete" in s for s in skipped) and any("sha256" in s for s in skipped)
    with pytest.raises(UnsafeCheckpointError, match="DONE"):
        read_checkpoint(tmp_path / "c30")


class _Evil:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused_even_with_the_override_env(tmp_path: Path, monkeypatch) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "train_state.pt"
    torch.save({"step": 1, "payload": _Evil(str(sentinel))}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state_file(evil)
    assert not sentinel.exists()

    # the same file inside an otherwise well-formed checkpoint, with a manifest that matches it
    _write(tmp_path / "ck", 3)
    (tmp_path / "ck" / "train_state.pt").write_bytes(evil.read_bytes())
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    manifest["files"]["train_state.pt"] = sha256_file(evil)
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(tmp_path / "ck")
    assert not sentinel.exists()


def test_manifest_cannot_point_outside_the_checkpoint(tmp_path: Path) -> None:
    _write(tmp_path / "ck", 1)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    manifest["files"]["../outside.safetensors"] = "0" * 64
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError, match="unexpected file"):
        read_checkpoint(tmp_path / "ck")


def test_resuming_starts_over_only_when_no_checkpoint_is_known_to_have_been_stored_whole(tmp_path: Path) -> None:
    from infra.checkpoint import restore_point

    for s in (10, 20, 30):
        _write(tmp_path / f"c{s}", s)
    (tmp_path / "c30" / DONE).unlink()  # an interrupted write: never a checkpoint
    assert restore_point([tmp_path / "c30"]) == (None, [f"{tmp_path / 'c30'}: incomplete (no {DONE} or manifest)"])
    # the newest checkpoint cut short while Ray copied it (a kill, a full disk; DONE may already be there) and
    # nothing before it: there was no progress to lose, the run starts over
    (tmp_path / "c20" / "model.safetensors").write_bytes(b"cut")
    loaded, skipped = restore_point([tmp_path / "c20", tmp_path / "c30"])
    assert loaded is None and any("sha256" in r for r in skipped)
    # ... unless Ray recorded it: its copy was whole, so the damage came later (bit rot, a hand edit)
    with pytest.raises(UnsafeCheckpointError, match="step 0"):
        restore_point([tmp_path / "c20", tmp_path / "c30"], recorded={"c20"})
    # a damaged checkpoint with a newer one after it was stored whole too; when nothing newer verifies: refused
    (tmp_path / "c10" / "model.safetensors").write_bytes(b"rotted")
    with pytest.raises(UnsafeCheckpointError, match="step 0") as refused:
        restore_point([tmp_path / "c10", tmp_path / "c20", tmp_path / "c30"])
    assert "c10" in str(refused.value) and "c20" in str(refused.value) and "1 of them stored whole" in str(refused.value)
