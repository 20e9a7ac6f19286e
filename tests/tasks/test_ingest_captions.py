"""Captions through ingest, in the three layouts users have, and the generated ``shapes`` source.

- WebDataset shards: ``.txt`` members, or ``.json`` members with a ``caption`` field (img2dataset's layout),
  decided per sample: in a captioned dataset every stored sample has a ``.txt`` member, whichever input shard it
  came from (a sample without a caption gets an empty one or is a counted skip, ``data.missing_caption``), so
  tokenize reads a caption from every sample.
- Image folders: sidecar ``<name>.txt`` files, or a CSV / JSONL ``data.captions_file`` of ``path,caption``.
- Captions are UTF-8 with invalid bytes counted in every layout, cut at ``data.max_caption_bytes`` (counted; an
  oversized sidecar too), and stored as our shards' ``.txt`` members; the manifest counts the captioned samples;
  a JSON member is parsed, never evaluated; a captions-file row too long for its reader is a counted bad line.
- ``shapes``: deterministic, training scenes never hold a held-out pair, every caption parses back to its scene.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from infra import shapes
from infra.shards import ShardSet, read_shard
from tasks.ingest import IngestError, run, stage_key
from tasks.ingest import sources as src
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
    # the val shard has no caption member anywhere, but the dataset is captioned: empty captions, counted
    assert [v for k, v in caps.items() if k.startswith("val")] == ["", ""]
    m = _manifest(out)
    assert m["captioned"] is True
    assert m["splits"]["train"]["num_captioned"] == 6 and m["splits"]["val"]["num_captioned"] == 2
    assert m["ignored"]["by_reason"] == {"caption_bad_json": 1, "caption_truncated": 2, "caption_utf8_errors": 1,
                                         "empty_caption": 4}


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


def _captioned(start: int, pattern: str) -> list[tuple[str, bytes]]:
    """Unlabelled samples ``s<start>...``, one per character of ``pattern``: ``c`` with a ``.txt`` caption,
    ``j`` with a ``.json`` one, ``-`` without."""
    members = []
    for i, kind in enumerate(pattern):
        (name, data), = sample_members(1, start=start + i, labelled=False)
        members.append((name, data))
        stem = name.split(".")[0]
        if kind == "c":
            members.append((f"{stem}.txt", f"caption {stem}".encode()))
        elif kind == "j":
            members.append((f"{stem}.json", json.dumps({"caption": f"caption {stem}"}).encode()))
    return members


@pytest.mark.parametrize("missing", ["empty", "skip"])
def test_mixed_captioned_and_uncaptioned_shards_give_every_sample_a_caption(run_root: Path, tmp_path: Path,
                                                                            missing: str) -> None:
    import torch

    from infra.shards import ShardIntegrityError
    from models.mqvae import MQVAE
    from tasks import tokenize as tk
    from tests.fixtures.tokenize_data import make_tokenizer

    # a shard without captions; one whose first sample has none (the old rule judged it uncaptioned); a val
    # shard whose captioned sample comes after uncaptioned ones
    shards = [write_tar(tmp_path / "in" / "train-000000.tar", _captioned(0, "----")),
              write_tar(tmp_path / "in" / "train-000001.tar", _captioned(10, "-cjc-")),
              write_tar(tmp_path / "in" / "val-000000.tar", _captioned(20, "--c"))]
    cfg = config(run_root, "data.source=shards", f"data.path={' '.join(map(str, shards))}",
                 f"data.missing_caption={missing}", "data.max_bad_fraction=0.9")
    out = run(cfg)
    ss = ShardSet.from_output(out, verify=True)
    m = ss.manifest
    records = {split: [r for sh in ss.shards(split) for r in read_shard(sh.path)] for split in ("train", "val")}
    # the invariant the manifest's "captioned" claims: every stored sample has a .txt member
    assert m["captioned"] is True and out.captioned
    assert all(r.caption is not None for recs in records.values() for r in recs)
    captioned = {f"caption s{i:05d}" for i in (11, 12, 13, 22)}
    if missing == "empty":
        assert {split: len(recs) for split, recs in records.items()} == {"train": 9, "val": 3}
        assert sorted(r.caption for recs in records.values() for r in recs) == [""] * 8 + sorted(captioned)
        assert m["ignored"]["by_reason"] == {"empty_caption": 8}
        assert m["skipped"]["by_reason"] == {}
    else:
        assert {r.caption for recs in records.values() for r in recs} == captioned
        assert m["skipped"]["by_reason"] == {"missing_caption": 8}
        assert "empty_caption" not in m["ignored"]["by_reason"]
        assert m["totals"]["num_skipped"] == 8 and m["totals"]["num_inputs"] == 12
    for split, recs in records.items():
        assert m["splits"][split]["num_samples"] == m["splits"][split]["num_captioned"] == len(recs)
        assert [s.num_samples for s in ss.shards(split)] == [s["num_samples"] for s in m["splits"][split]["shards"]]
    # tokenize's caption reader takes a caption from every sample (an untrained model encodes the images)
    tokenizer = make_tokenizer(cfg)
    torch.manual_seed(0)
    model = MQVAE(cfg.tokenizer.model).eval()
    for split in ("train", "val"):
        for i, sh in enumerate(ss.shards(split)):
            job = tk.ShardJob(split=split, shard=i, path=sh.path, count=sh.num_samples, sha256=sh.sha256,
                              tokenizer=tokenizer, image_size=out.image_size, channels=out.channels, captioned=True)
            try:
                enc = tk.encode_shard(job, model)
            except ShardIntegrityError as e:  # what the first-sample rule led to
                pytest.fail(f"tokenize refused {sh.path}: {e}")
            assert enc.captions == [r.caption for r in read_shard(sh.path)]


def test_invalid_utf8_in_a_json_member_is_counted(run_root: Path, tmp_path: Path) -> None:
    members = sample_members(3, labelled=False)
    members.insert(1, ("s00000.json", b'{"caption": "caf\xc3\xa9 \xff!", "url": "x"}'))
    members.insert(3, ("s00001.json", b'{"caption": "fine", "note": "\xfe"}'))  # outside the caption: not counted
    members.append(("s00002.json", b'{"caption": "lone \\ud83d surrogate"}'))  # escaped, not UTF-8 either
    shard = write_tar(tmp_path / "train-000000.tar", members)
    out = run(config(run_root, "data.source=shards", f"data.path={shard}"))
    assert sorted(_captions(out).values()) == sorted(["café \ufffd!", "fine", "lone \ufffd surrogate"])
    assert _manifest(out)["ignored"]["by_reason"] == {"caption_utf8_errors": 2}


def test_a_cut_inside_a_character_is_not_a_utf8_error() -> None:
    # the bounded prefix decode_caption reads ends inside an "é": only a cut, no invalid byte
    text, notes = src.decode_caption(b"a" + "é".encode() * 100, 16)
    assert (text, notes) == ("a" + "é" * 7, [src.CAPTION_TRUNCATED])
    # a str reader keeps undecodable bytes as surrogates (surrogateescape): counted as in bytes
    assert src.decode_caption("ok \udcff", 16) == ("ok \ufffd", [src.CAPTION_UTF8_ERRORS])
    assert src.decode_caption(b"ok \xff", 16) == ("ok \ufffd", [src.CAPTION_UTF8_ERRORS])
    assert src.decode_caption("a real \ufffd", 16) == ("a real \ufffd", [])


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


def test_a_captioned_output_of_an_older_mqgen_is_rebuilt_under_its_key_and_uncaptioned_data_kept(
        run_root: Path, tmp_path: Path) -> None:
    """Captions handling changed (mixed inputs, cut sidecars): an older captioned output is damaged, never reused
    with samples tokenize refuses; an uncaptioned output of the same source keeps its key and stays a cache hit."""
    from infra.storage import atomic_write_json, sha256_file
    from tasks.ingest import MANIFEST_NAME

    root = _folder(tmp_path / "imgs")
    for p in sorted(root.rglob("*.png")):
        p.with_suffix(".txt").write_text(f"photo of {p.stem}\n")
    cfg = config(run_root, "data.source=image-folder", f"data.path={root}")
    out = run(cfg)
    manifest = json.loads((Path(out.path) / MANIFEST_NAME).read_text())
    assert manifest["captioned"] and manifest["captions_version"] == 2
    del manifest["captions_version"]  # as an older mqgen wrote it: every sample has a caption, so still valid
    atomic_write_json(Path(out.path) / MANIFEST_NAME, manifest)
    assert run(cfg).manifest_sha256 == sha256_file(Path(out.path) / MANIFEST_NAME)  # a hit
    manifest["splits"]["train"]["num_captioned"] -= 1  # ...but one that left a sample without a caption
    atomic_write_json(Path(out.path) / MANIFEST_NAME, manifest)
    rebuilt = run(cfg)
    assert rebuilt.key == out.key and rebuilt.manifest_sha256 != out.manifest_sha256
    assert json.loads((Path(rebuilt.path) / MANIFEST_NAME).read_text())["captions_version"] == 2
    assert list(Path(out.path).parent.glob(f".{out.key}.damaged-*"))  # the old one set aside, not deleted

    plain_root = _folder(tmp_path / "plain")  # no captions at all
    plain_cfg = config(run_root, "data.source=image-folder", f"data.path={plain_root}")
    plain = run(plain_cfg)
    plain_manifest = json.loads((Path(plain.path) / MANIFEST_NAME).read_text())
    del plain_manifest["captions_version"]
    atomic_write_json(Path(plain.path) / MANIFEST_NAME, plain_manifest)
    again = run(plain_cfg)
    assert again.path == plain.path and (Path(plain.path) / MANIFEST_NAME).read_text() == \
        (Path(again.path) / MANIFEST_NAME).read_text()  # a hit: not rebuilt


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


def _caption_rows(fmt: str, rows: list[tuple[str, bytes]]) -> bytes:
    """A captions file of ``(path, caption bytes)`` rows, the caption bytes written as they are (even invalid)."""
    if fmt == "csv":
        return b"path,caption\n" + b"".join(p.encode() + b',"' + c.replace(b'"', b'""') + b'"\n' for p, c in rows)
    return b"".join(b'{"path": "' + p.encode() + b'", "caption": "' + c + b'"}\n' for p, c in rows)


@pytest.mark.parametrize("layout", ["sidecar", "csv", "jsonl"])
def test_invalid_utf8_is_counted_in_every_folder_layout(run_root: Path, tmp_path: Path, layout: str) -> None:
    root = _folder(tmp_path / "imgs", 4)
    rels = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    captions = [b"caf\xc3\xa9 \xff one", b"two \xfe\xfe", b"three", b"four \xef\xbf\xbd"]  # the last: a real U+FFFD
    extra: list[str] = []
    if layout == "sidecar":
        for rel, c in zip(rels, captions):
            (root / rel).with_suffix(".txt").write_bytes(c)
    else:
        f = tmp_path / f"captions.{layout}"
        f.write_bytes(_caption_rows(layout, list(zip(rels, captions))))
        extra.append(f"data.captions_file={f}")
    out = run(config(run_root, "data.source=image-folder", f"data.path={root}", *extra))
    assert sorted(_captions(out).values()) == sorted(["café \ufffd one", "two \ufffd\ufffd", "three", "four \ufffd"])
    assert _manifest(out)["ignored"]["by_reason"] == {"caption_utf8_errors": 2}


def test_an_oversized_sidecar_is_cut_like_the_other_layouts(run_root: Path, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", 4)
    pngs = sorted(root.rglob("*.png"))
    for i, p in enumerate(pngs):
        p.with_suffix(".txt").write_text(f"caption {i}")
    pngs[0].with_suffix(".txt").write_bytes(("é" * 5000).encode())  # far over 4 x data.max_caption_bytes
    out = run(config(run_root, "data.source=image-folder", f"data.path={root}", "data.max_caption_bytes=16"))
    assert sorted(_captions(out).values()) == sorted(["é" * 8, "caption 1", "caption 2", "caption 3"])
    m = _manifest(out)
    assert m["skipped"]["by_reason"] == {} and m["ignored"]["by_reason"] == {"caption_truncated": 1}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_overlong_captions_file_row_is_a_counted_bad_line(run_root: Path, tmp_path: Path, fmt: str) -> None:
    root = _folder(tmp_path / "imgs", 4)
    rels = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    huge = b"x" * (src.MAX_CAPTION_ROW_CHARS + 10)  # over csv's field limit: csv.Error aborted the ingest before
    f = tmp_path / f"captions.{fmt}"
    f.write_bytes(_caption_rows(fmt, [(rels[0], b"first"), (rels[1], huge), (rels[2], b"third"), (rels[3], b"last")]))
    out = run(config(run_root, "data.source=image-folder", f"data.path={root}", f"data.captions_file={f}"))
    assert sorted(_captions(out).values()) == ["", "first", "last", "third"]  # the rows after it are read
    m = _manifest(out)
    assert m["ignored"]["by_reason"] == {"caption_bad_line": 1, "empty_caption": 1}
    assert m["ignored"]["examples"]["caption_bad_line"] == [f"{f.name}:{3 if fmt == 'csv' else 2}"]  # its line


def test_a_captions_file_over_the_size_limit_is_refused(run_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path / "imgs", 4)
    f = tmp_path / "captions.csv"
    f.write_text("path,caption\n" + "".join(f"{p.relative_to(root)},hello\n" for p in root.rglob("*.png")))
    monkeypatch.setattr(src, "MAX_CAPTIONS_FILE_BYTES", 64)
    with pytest.raises(IngestError, match=r"data\.captions_file=.*captions\.csv: \d+ bytes, more than the 64"):
        run(config(run_root, "data.source=image-folder", f"data.path={root}", f"data.captions_file={f}"))


def test_captions_file_without_the_columns_is_refused(run_root: Path, tmp_path: Path) -> None:
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
