"""Captions through ingest, in the three layouts users have, and the generated ``shapes`` source.

- WebDataset shards: ``.txt`` members, or ``.json`` members with a ``caption`` field (img2dataset's layout);
  a sample without one in a captioned shard gets an empty caption or is a counted skip (``data.missing_caption``).
- Image folders: sidecar ``<name>.txt`` files, or a CSV / JSONL ``data.captions_file`` of ``path,caption``.
- Captions are UTF-8 with invalid bytes counted, cut at ``data.max_caption_bytes`` (counted), and stored as our
  shards' ``.txt`` members; the manifest counts the captioned samples; a JSON member is parsed, never evaluated.
- ``shapes``: deterministic, training scenes never hold a held-out pair, every caption parses back to its scene.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from infra import shapes
from infra.shards import ShardSet, read_shard
from tasks.ingest import run, stage_key
from tests.fixtures.ingest_data import config, encode, gradient, sample_members, write_tar


def _captions(out) -> dict[str, str | None]:
    m = ShardSet.from_output(out, verify=True).manifest
    return {r.key: r.caption for split in ("train", "val") for sh in m["splits"][split]["shards"]
            for r in read_shard(Path(out.path) / sh["name"])}


def _manifest(out) -> dict:
    return ShardSet.from_output(out).manifest


def test_shard_captions_from_txt_and_json_members(run_root: Path, tmp_path: Path) -> None:
    members = []
    for i, (name, data) in enumerate(sample_members(6, labelled=False)):
        members.append((name, data))
        stem = name.split(".")[0]
        if i == 0:
            members.append((f"{stem}.txt", b"  a red\ncircle  "))
        elif i == 1:
            members.append((f"{stem}.json", json.dumps({"caption": "a blue square", "width": 24}).encode()))
        elif i == 2:
            members.append((f"{stem}.txt", b"caf\xc3\xa9 \xff bad byte"))  # one invalid byte
        elif i == 3:
            members.append((f"{stem}.txt", ("x" * 40).encode()))  # longer than max_caption_bytes=16
        elif i == 4:
            members.append((f"{stem}.json", b'{"__class__": "os.system", "caption": 5}'))  # not a string
        # i == 5: no caption member at all
    shard = write_tar(tmp_path / "in" / "train-000000.tar", members)
    val = write_tar(tmp_path / "in" / "val-000000.tar", sample_members(2, start=10, labelled=False))
    out = run(config(run_root, "data.source=shards", f"data.path={shard} {val}", "data.max_caption_bytes=16"))
    caps = _captions(out)
    train = sorted(v for k, v in caps.items() if k.startswith("train"))
    assert train == sorted(["a red circle", "a blue square", "café \ufffd bad by", "x" * 16, "", ""])
    # the val shard has no caption member anywhere: not captioned, no .txt stored
    assert all(v is None for k, v in caps.items() if k.startswith("val"))
    m = _manifest(out)
    assert m["captioned"] is True
    assert m["splits"]["train"]["num_captioned"] == 6 and m["splits"]["val"]["num_captioned"] == 0
    assert m["ignored"]["by_reason"] == {"caption_bad_json": 1, "caption_truncated": 2, "caption_utf8_errors": 1}


def test_missing_caption_skip_is_counted(run_root: Path, tmp_path: Path) -> None:
    members = []
    for i, (name, data) in enumerate(sample_members(5, labelled=True)):
        members.append((name, data))
        if name.endswith(".cls") and i // 2 != 3:
            members.append((name.replace(".cls", ".txt"), f"caption {i // 2}".encode()))
    shard = write_tar(tmp_path / "train-000000.tar", members)
    out = run(config(run_root, "data.source=shards", f"data.path={shard}", "data.missing_caption=skip",
                     "data.max_bad_fraction=0.5"))
    assert sorted(c for c in _captions(out).values()) == ["caption 0", "caption 1", "caption 2", "caption 4"]
    assert _manifest(out)["skipped"]["by_reason"] == {"missing_caption": 1}


def _folder(root: Path, n: int = 12) -> Path:
    for i in range(n):
        d = root / ("cats" if i % 2 else "dogs")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:02d}.png").write_bytes(encode(gradient((20, 20), seed=i), "PNG"))
    return root


def test_folder_sidecar_captions(run_root: Path, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    for p in sorted(root.rglob("*.png"))[:-1]:  # the last image has no sidecar
        p.with_suffix(".txt").write_text(f"photo of {p.stem}\n")
    out = run(config(run_root, "data.source=image-folder", f"data.path={root}"))
    caps = sorted(_captions(out).values())
    assert caps[0] == "" and caps[1:] == sorted(f"photo of {p.stem}" for p in sorted(root.rglob("*.png"))[:-1])
    m = _manifest(out)
    assert m["ignored"]["by_reason"] == {"empty_caption": 1}  # the sidecars are captions, not ignored files
    assert m["splits"]["train"]["num_captioned"] + m["splits"]["val"]["num_captioned"] == 12
    assert m["num_classes"] == 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_captions_file(run_root: Path, tmp_path: Path, fmt: str) -> None:
    root = _folder(tmp_path / "imgs")
    rels = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    captions = {rel: f'caption, "quoted" {i}' for i, rel in enumerate(rels[:-2])}
    f = tmp_path / f"captions.{fmt}"
    if fmt == "csv":
        import csv

        with open(f, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "caption"])
            w.writerows([*captions.items(), ["nowhere/x.png", "orphan"]])
    else:
        f.write_text("\n".join([*(json.dumps({"path": "./" + k, "caption": v}) for k, v in captions.items()),
                                "not json", json.dumps({"path": "nowhere/x.png", "caption": "orphan"})]) + "\n")
    cfg = config(run_root, "data.source=image-folder", f"data.path={root}", f"data.captions_file={f}",
                 "data.missing_caption=skip", "data.max_bad_fraction=0.5")
    key = stage_key(cfg)
    out = run(cfg)
    assert sorted(_captions(out).values()) == sorted(captions.values())
    m = _manifest(out)
    assert m["skipped"]["by_reason"] == {"missing_caption": 2}
    assert m["ignored"]["by_reason"].get("caption_without_image") == 1
    assert m["ignored"]["by_reason"].get("caption_bad_line", 0) == (1 if fmt == "jsonl" else 0)
    # editing the caption file is new data under the same path: a new stage key
    f.write_text(f.read_text().replace("quoted", "edited"))
    assert stage_key(config(run_root, "data.source=image-folder", f"data.path={root}", f"data.captions_file={f}",
                            "data.missing_caption=skip", "data.max_bad_fraction=0.5")) != key


def test_captions_file_without_the_columns_is_refused(run_root: Path, tmp_path: Path) -> None:
    from tasks.ingest import IngestError

    root = _folder(tmp_path / "imgs", 4)
    f = tmp_path / "c.csv"
    f.write_text("file,text\na.png,hello\n")
    with pytest.raises(IngestError, match="'path' and 'caption'"):
        run(config(run_root, "data.source=image-folder", f"data.path={root}", f"data.captions_file={f}"))


def test_shapes_source_is_deterministic_captioned_and_holds_out_pairs(run_root: Path) -> None:
    cfg = config(run_root, "data.source=shapes", "data.channels=3", "data.shapes_train=300", "data.shapes_val=200",
                 "data.max_images=null")
    out = run(cfg)
    m = _manifest(out)
    assert (out.num_train, out.num_val, out.num_classes) == (300, 200, len(shapes.CLASSES))
    assert m["captioned"] and m["caption_grammar"] == "shapes" and out.caption_grammar == "shapes"
    records = {split: [r for sh in m["splits"][split]["shards"] for r in read_shard(Path(out.path) / sh["name"])]
               for split in ("train", "val")}
    for recs in records.values():
        for r in recs:
            scene = shapes.parse_caption(r.caption)
            assert scene is not None and scene.label == r.label, r
    heldout = {split: np.mean([shapes.is_heldout(shapes.parse_caption(r.caption)) for r in recs])
               for split, recs in records.items()}
    assert heldout["train"] == 0.0 and 0.1 < heldout["val"] < 0.5
    # both phrasings of a two-object scene occur
    words = " ".join(r.caption for r in records["train"])
    assert " above " in words and " below " in words and " left of " in words and " right of " in words
    # a second run elsewhere produces the same bytes
    other = run(config(run_root / "again", "data.source=shapes", "data.channels=3", "data.shapes_train=300",
                       "data.shapes_val=200", "data.max_images=null"))
    assert [s["sha256"] for s in _manifest(other)["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in m["splits"]["train"]["shards"]]


def test_shapes_grammar_round_trip_and_rendering() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = shapes.draw_scene(rng, allow_heldout=True)
        text = shapes.caption(scene, rng)
        assert shapes.parse_caption(text) == scene
        assert shapes.parse_caption(text.upper() + ".") == scene
        img = shapes.render(scene, rng)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        # every object's colour is on the canvas
        for o in scene.objects:
            assert (np.abs(img.astype(int) - shapes.RGB[o.colour]).sum(-1) == 0).any(), text
    assert shapes.parse_caption("a purple circle") is None
    assert shapes.parse_caption("a small red circle beside a large blue square") is None
    t = shapes.attribute_targets(shapes.parse_caption("a small red circle below a large blue square"))
    # canonical: the top object first
    assert t == [1, 1, 2, 1, 0, 0, 0, 0]
    assert shapes.attribute_targets(None) == [-1] * len(shapes.ATTRIBUTE_HEADS)
