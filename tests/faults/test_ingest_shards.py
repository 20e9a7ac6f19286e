"""Hostile and damaged input shards, and the shard reader's guarantees.

- A tar cut anywhere keeps its complete samples and drops (and counts) the one it was cut in.
- Member names with ``..``, absolute paths, links, devices and FIFOs are rejected; nothing is ever
  written outside the run root (the whole tmp tree is snapshotted before and after).
- Interleaved keys, duplicate members, missing images and bad labels never produce a half-sample.
- The reader decodes only png/cls: a pickle member with a code-executing ``__reduce__`` stays inert.
- A shard that changed after ingest is caught by ``verify``; a directory without a manifest is refused.
"""

from __future__ import annotations

import gzip
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from infra.shards import ShardIntegrityError, ShardSet, iter_samples
from tasks.ingest import run
from tasks.ingest.sources import (
    Good,
    ImageSpec,
    InputDamage,
    Skip,
    TarChunk,
    TarReader,
    iter_chunk,
    safe_member_name,
    split_member_name,
)
from tests.fixtures.ingest_data import (
    config,
    encode,
    evil_pickles,
    gradient,
    member,
    member_offsets,
    sample_members,
    tree,
    write,
    write_tar,
)

SPEC = ImageSpec(size=16, channels=1, max_input_bytes=100_000)


def _chunk_items(path: Path, spec: ImageSpec = SPEC) -> tuple[list[Good], Counter, list[InputDamage]]:
    goods, skips, damage = [], Counter(), []
    for item in iter_chunk(TarChunk(0, str(path), "train", 0.0, 0), spec):
        if isinstance(item, Good):
            goods.append(item)
        elif isinstance(item, Skip):
            skips[item.reason] += 1
        elif isinstance(item, InputDamage):
            damage.append(item)
    return goods, skips, damage


@pytest.mark.parametrize("where", ["inside-data", "inside-header", "at-member-boundary", "inside-cls"])
def test_a_truncated_shard_keeps_complete_samples_and_drops_the_partial_one(where: str, tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", sample_members(10))
    offsets = member_offsets(full)  # (name, header offset, data end) per member; 2 members per sample
    k = 6  # the sample the cut lands in
    png_header = offsets[2 * k][1]
    cls_header = offsets[2 * k + 1][1]
    cut = {"inside-data": png_header + 512 + 40, "inside-header": png_header + 100,
           "at-member-boundary": cls_header, "inside-cls": cls_header + 512}[where]
    cut_tar = write(tmp_path / "cut.tar", full.read_bytes()[:cut])
    goods, skips, damage = _chunk_items(cut_tar)
    # A header cut short hides the next key, so the sample before it may have been incomplete: dropped too.
    kept = k - 1 if where == "inside-header" else k
    assert [g.key for g in goods] == [f"train_000000_{i:06d}" for i in range(kept)]
    assert skips == Counter({"truncated_shard": 1})
    assert len(damage) == 1 and damage[0].status == "truncated"


def test_a_tar_without_its_end_marker_drops_the_last_sample(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", sample_members(4))
    end = member_offsets(full)[-1][2]
    cut = write(tmp_path / "cut.tar", full.read_bytes()[:end + (-end) % 512])  # all data, no zero blocks
    goods, skips, damage = _chunk_items(cut)
    assert len(goods) == 3 and skips["truncated_shard"] == 1 and "end-of-archive" in damage[0].detail


def test_a_corrupt_header_mid_shard_stops_that_shard_and_is_reported(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", sample_members(8))
    data = bytearray(full.read_bytes())
    data[member_offsets(full)[8][1] + 10] ^= 0xFF  # sample 4's png header: checksum now wrong
    goods, skips, damage = _chunk_items(write(tmp_path / "bad.tar", bytes(data)))
    assert len(goods) == 3 and skips == Counter({"truncated_shard": 1})  # sample 3 may be incomplete
    assert damage[0].status == "corrupt" and "checksum" in damage[0].detail


def test_gzipped_shards_are_read_and_a_cut_gzip_is_a_truncation(tmp_path: Path) -> None:
    raw = write_tar(tmp_path / "a.tar", sample_members(5)).read_bytes()
    gz = write(tmp_path / "a.tar.gz", gzip.compress(raw))
    assert len(_chunk_items(gz)[0]) == 5
    packed = gzip.compress(raw)
    goods, skips, damage = _chunk_items(write(tmp_path / "b.tar.gz", packed[: len(packed) // 2]))
    assert len(goods) < 5 and skips["truncated_shard"] == 1 and damage[0].status == "truncated"


def test_malicious_members_are_rejected_and_nothing_lands_outside_the_run_root(run_root: Path,
                                                                           tmp_path: Path) -> None:
    png = encode(gradient((16, 16)), "PNG")
    hostile = [
        *sample_members(3),
        ("../../evil.png", png), ("../../evil.cls", b"1"),
        ("/tmp/abs-evil.png", png),
        ("ok/a..b.png", png),
        member("link.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("hard.png", kind=tarfile.LNKTYPE, linkname="s00000.png"),
        member("fifo.png", kind=tarfile.FIFOTYPE),
        member("dev.png", kind=tarfile.CHRTYPE),
        member("somedir/", kind=tarfile.DIRTYPE),
        ("s00009.png", png), ("s00009.cls", b"9"),
        ("s00010.png", png), ("s00010.json", b"{}"), ("s00010.cls", b"0"),
    ]
    shard = write_tar(tmp_path / "inputs" / "train-000000.tar", hostile)
    before = tree(tmp_path)
    parent_before = tree(tmp_path.parent)
    out = run(config(run_root, "data.source=shards", f"data.path={shard}", "data.max_bad_fraction=1.0"), {})
    m = ShardSet.from_output(out, verify=True).manifest
    assert out.num_train == 5  # s00000-2, s00009, s00010 (its .json holds no caption: counted, ignored)
    assert m["skipped"]["by_reason"] == {"unsafe_name": 3, "link_member": 2, "special_member": 2}
    assert m["ignored"]["by_reason"] == {"directory_member": 1, "caption_bad_json": 1}
    new = tree(tmp_path) - before
    assert new and all(p.startswith("run") for p in new), sorted(p for p in new if not p.startswith("run"))
    assert tree(tmp_path.parent) - parent_before <= {f"{tmp_path.name}/{p}" for p in new}
    assert not Path("/tmp/abs-evil.png").exists() and not (tmp_path.parent / "evil.png").exists()


def test_interleaved_keys_and_malformed_samples_never_yield_half_samples(tmp_path: Path) -> None:
    png = encode(gradient((16, 16)), "PNG")
    shard = write_tar(tmp_path / "x.tar", [
        ("a.png", png), ("a.cls", b"1"),
        ("b.png", png),                                  # its .cls comes later: not adjacent
        ("c.png", png), ("c.cls", b"2"),
        ("b.cls", b"3"),                                 # key b again
        ("d.png", png), ("d.png", png), ("d.cls", b"4"),  # the same member twice
        ("e.cls", b"5"), ("e.json", b"{}"),              # no image
        ("f.png", png), ("f.jpg", encode(gradient((16, 16)), "JPEG")), ("f.cls", b"6"),
        ("g.png", png), ("g.cls", b"seven"),
        ("h.png", b"not a png"), ("h.cls", b"8"),
        ("i.png", png), ("i.cls", b"9"),
    ])
    goods, skips, _ = _chunk_items(shard)
    assert [(g.key[-6:], g.label) for g in goods] == [("000000", 1), ("000002", 2), ("000009", 9)]
    assert skips == Counter({"missing_label": 1, "duplicate_key": 1, "duplicate_member": 1, "no_image": 1,
                             "multiple_images": 1, "bad_label": 1, "corrupt_image": 1})


def test_an_oversized_member_is_skipped_without_being_kept(tmp_path: Path) -> None:
    big = bytes(200_000)
    shard = write_tar(tmp_path / "x.tar", [*sample_members(2), ("big.png", big), ("big.cls", b"1"),
                                           *sample_members(1, start=5)])
    with open(shard, "rb") as f:
        members = list(TarReader(f, max_member_bytes=100_000).members())
    assert [m.kind for m in members if m.name == "big.png"] == ["too_large"]
    assert all(m.data is None for m in members if m.name == "big.png")
    goods, skips, _ = _chunk_items(shard)
    assert len(goods) == 3 and skips == Counter({"too_large": 1})


def test_member_name_rules() -> None:
    assert safe_member_name("a/b-c_d.0.png") and not safe_member_name("../x.png")
    assert not safe_member_name("/x.png") and not safe_member_name("a..b.png") and not safe_member_name("a b.png")
    assert split_member_name("dir/x.seg.png") == ("dir/x", "seg.png")
    assert split_member_name("dir.v2/x.PNG") == ("dir.v2/x", "png") and split_member_name("noext") is None


def test_the_reader_never_unpickles(run_root: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    payloads = evil_pickles(sentinel)
    shard = write_tar(tmp_path / "train-000000.tar", [
        ("k0.png", encode(gradient((16, 16), mode="L"), "PNG")), ("k0.cls", b"3"),
        ("k0.pyd", payloads["pyd"]), ("k0.pth", payloads["pth"]),
    ])
    from infra.shards import ShardDataset

    (sample,) = list(iter_samples([str(shard)], image_size=16, channels=1))
    assert sample.label == 3 and sample.image.shape == (1, 16, 16)
    assert [s.key for s in ShardDataset([str(shard)], rank=0, world_size=1)] == ["k0"]
    out = run(config(run_root, "data.source=shards", f"data.path={shard}"), {})  # ingest reads it too
    assert out.num_train == 1 and not sentinel.exists()
    pickle.loads(payloads["pyd"])  # control: the payload is live
    assert sentinel.read_text() == "unpickled"


def test_verify_catches_a_changed_shard_and_a_missing_manifest_is_refused(run_root: Path,
                                                                        tmp_path: Path) -> None:
    out = run(config(run_root, "data.source=digits", "data.max_images=30"), {})
    shards = ShardSet.from_output(out)
    path = Path(shards.urls("train")[0])
    data = bytearray(path.read_bytes())
    data[700] ^= 1  # same size, different content
    path.write_bytes(bytes(data))
    ShardSet.load(out.path)  # size and manifest still fine: cheap check passes
    with pytest.raises(ShardIntegrityError, match=rf"{path.name}: sha256"):
        ShardSet.load(out.path, verify=True)
    with pytest.raises(ShardIntegrityError, match="not a complete ingest output"):
        ShardSet.load(tmp_path)
    path.unlink()
    with pytest.raises(ShardIntegrityError, match="missing"):
        ShardSet.load(out.path)
    again = run(config(run_root, "data.source=digits", "data.max_images=30"), {})  # damaged: rebuilt
    ShardSet.from_output(again, verify=True)


def test_case_and_unicode_colliding_names_never_overwrite_each_other(run_root: Path, tmp_path: Path) -> None:
    """Catalogue 7.4: ``A.png``/``a.png`` and an NFC/NFD pair spelling the same word. In a shard, names outside
    ``[A-Za-z0-9_./-]`` are rejected (counted) before they become keys, and the case pair stays two samples; in an
    image folder every file is its own sample (the output keys are ingest's own), so nothing is overwritten."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")
    assert nfc != nfd
    png = [encode(gradient((16, 16), seed=i), "PNG") for i in range(4)]
    shard = write_tar(tmp_path / "x.tar", [("A.png", png[0]), ("A.cls", b"1"), ("a.png", png[1]), ("a.cls", b"2"),
                                           (f"{nfc}.png", png[2]), (f"{nfc}.cls", b"3"),
                                           (f"{nfd}.png", png[3]), (f"{nfd}.cls", b"4")])
    goods, skips, _ = _chunk_items(shard)
    assert sorted(g.label for g in goods) == [1, 2] and len({g.key for g in goods}) == 2
    assert skips == Counter({"unsafe_name": 2})

    src = tmp_path / "flat"
    for i, name in enumerate(["A", "a", nfc, nfd]):
        write(src / f"{name}.png", encode(gradient((40, 24), seed=10 + i), "PNG"))
    if len(list(src.iterdir())) < 4:
        pytest.skip(f"the file system under {src} folds case or normalises Unicode: the four files are fewer")
    out = run(config(run_root, "data.source=image-folder", f"data.path={src}", "data.val_fraction=0.25"), {})
    assert out.num_train + out.num_val == 4
    shards = ShardSet.from_output(out)
    images = [bytes(s.image.numpy().tobytes()) for split in ("train", "val") for s in shards.iter_samples(split)]
    keys = [s.key for split in ("train", "val") for s in shards.iter_samples(split)]
    assert len(set(images)) == 4 and len(set(keys)) == 4


def test_an_ingest_that_read_a_cut_shard_says_so_and_records_it(run_root: Path, tmp_path: Path, caplog) -> None:
    """Through the stage: a cut input shard among whole ones keeps its complete samples, counts the cut one
    against data.max_bad_fraction, warns (on the console: mqgen's warnings reach it) naming the shard, and is
    recorded in the manifest and as an MLflow metric."""
    import json
    import logging

    from infra.tracking import Tracker

    src = tmp_path / "src"
    write_tar(src / "a.tar", sample_members(10, prefix="a"))
    write_tar(src / "b.tar", sample_members(10, prefix="b"))
    full = write_tar(tmp_path / "c.tar", sample_members(10, prefix="c"))
    cut = member_offsets(full)[2 * 6][1] + 512 + 40  # inside sample 6's image
    write(src / "c.tar", full.read_bytes()[:cut])
    with caplog.at_level(logging.WARNING, logger="mqgen"):
        out = run(config(run_root, "data.source=shards", f"data.path={src}", "data.val_fraction=0.0",
                         "data.max_bad_fraction=0.1"), {})
    assert out.num_train + out.num_val == 26  # 10 + 10 + the 6 complete samples before the cut
    manifest = json.loads((Path(out.path) / "manifest.json").read_text())
    [damaged] = manifest["damaged_inputs"]
    assert damaged["url"].endswith("c.tar") and damaged["status"] == "truncated"
    assert manifest["skipped"]["by_reason"] == {"truncated_shard": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 input shard(s) ended early" in w and "c.tar" in w for w in warnings), warnings
    metrics = Tracker(run_root, "mqgen").client.get_run(out.mlflow_run_id).data.metrics
    assert metrics["num_damaged_inputs"] == 1 and metrics["skipped.truncated_shard"] == 1
    # the default limit (1%) refuses the same shards: 1 bad input of 27 is too many
    with pytest.raises(Exception, match="truncated_shard=1"):
        run(config(run_root, "data.source=shards", f"data.path={src}", "data.val_fraction=0.0", "seed=1"), {})
