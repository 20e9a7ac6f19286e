"""Durable, reproducible writes: a safetensors file is the same bytes in every process (so a re-exported model
keeps its sha256 and every stage key after it), and every rename of a finished file is followed by an fsync of
its directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra import storage

SCRIPT = """
import sys, torch
from infra.storage import tensors_bytes
data = tensors_bytes({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)},
                     {"stage": "train_tokenizer", "key": "abc", "step": "30", "model": "stackformer"})
sys.stdout.buffer.write(data)
"""


def test_the_same_tensors_and_metadata_give_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    outs = {subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, check=True,
                           cwd=Path(__file__).parents[2]).stdout for _ in range(4)}
    assert len(outs) == 1  # plain safetensors writes the metadata in a per-process hash order
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    path.write_bytes(outs.pop())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"stage": "train_tokenizer", "key": "abc", "step": "30", "model": "stackformer"}
        assert f.get_tensor("w").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_save_tensors_returns_the_hash_of_what_it_wrote_and_leaves_no_temporary(tmp_path: Path) -> None:
    import torch

    digest = storage.save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(3)}, {"a": "1", "b": "2"})
    assert digest == storage.sha256_file(tmp_path / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("writer", ["atomic_write_bytes", "partial_open", "save_tensors"])
def test_every_finished_file_is_renamed_then_its_directory_synced(writer: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    synced: list[Path] = []
    real = storage.fsync_dir
    monkeypatch.setattr(storage, "fsync_dir", lambda p: (synced.append(Path(p)), real(p))[1])
    target = tmp_path / "out.bin"
    if writer == "atomic_write_bytes":
        storage.atomic_write_bytes(target, b"x")
    elif writer == "partial_open":
        with storage.partial_open(target) as f:
            f.write(b"x")
    else:
        storage.save_tensors(target, {"x": torch.zeros(1)})
    assert target.is_file() and synced == [tmp_path]
