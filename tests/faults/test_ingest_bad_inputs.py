"""Bad image inputs: corrupt, truncated, oversized, unreadable and special files are skipped and counted
by reason; too many fail the stage without a manifest; odd pixel modes are converted (or rejected) exactly;
missing or empty sources fail with an error naming the path."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.shards import ShardSet
from tasks.ingest import IngestError, run, stage_key
from tasks.ingest.sources import BadInput, ImageSpec, SourceError, decode_image, read_idx, to_target_mode
from tests.fixtures.ingest_data import config, encode, gradient, png16, truncated, write, write_idx

GOOD = 20


def _noisy(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _bad_folder(root: Path) -> dict[str, int]:
    """A flat folder: GOOD plain images, six odd-mode images (all usable) and seven bad inputs."""
    for i in range(GOOD):
        write(root / f"good{i:02d}.jpg", encode(gradient((48, 40), seed=i), "JPEG"))
    odd = {
        "cmyk.jpg": encode(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG"),
        "gray16.png": png16((30, 30)),
        "palette.png": encode(Image.new("P", (30, 30), 3), "PNG"),
        "rgba.png": encode(Image.new("RGBA", (30, 30), (255, 0, 0, 128)), "PNG"),
        "la.png": encode(Image.new("LA", (30, 30), (80, 200)), "PNG"),
        "bilevel.png": encode(Image.new("1", (30, 30), 1), "PNG"),
    }
    for name, data in odd.items():
        write(root / name, data)
    write(root / "corrupt.jpg", b"\xff\xd8 this is not really a jpeg" * 10)
    write(root / "corrupt.png", encode(gradient((20, 20)), "GIF"))  # a GIF under a .png name
    write(root / "cut.jpg", truncated(encode(_noisy((64, 64), 1), "JPEG"), 0.5))
    write(root / "cut.png", truncated(encode(_noisy((64, 64), 2), "PNG"), 0.5))
    write(root / "huge.png", encode(_noisy((400, 400), 3), "PNG"))  # > data.max_input_bytes below
    os.mkfifo(root / "pipe.png")  # reading it would block forever
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    return {"corrupt_image": 2, "truncated_image": 2, "too_large": 1, "not_regular_file": 1, "unreadable": 1}


LIMITS = ("data.source=image-folder", "data.max_input_bytes=200000", "data.val_fraction=0.2")


def test_bad_inputs_are_skipped_and_counted_by_reason(run_root: Path, tmp_path: Path) -> None:
    expected = _bad_folder(tmp_path / "imgs")
    out = run(config(run_root, *LIMITS, f"data.path={tmp_path / 'imgs'}", "data.max_bad_fraction=0.3",
                     "data.channels=3"), {})
    m = ShardSet.from_output(out, verify=True).manifest
    assert m["skipped"]["by_reason"] == expected
    assert m["totals"]["num_inputs"] == GOOD + 6 + 7 and m["totals"]["num_skipped"] == 7
    assert out.num_train + out.num_val == GOOD + 6  # every odd-mode image was converted, none skipped
    examples = m["skipped"]["examples"]
    assert any(e.startswith("cut.jpg") for e in examples["truncated_image"])
    assert any(e.startswith("pipe.png") for e in examples["not_regular_file"])
    assert examples["too_large"][0].startswith("huge.png")


def test_too_many_bad_inputs_fail_the_stage_and_leave_no_manifest(run_root: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    _bad_folder(tmp_path / "imgs")
    cfg = config(run_root, *LIMITS, f"data.path={tmp_path / 'imgs'}", "data.max_bad_fraction=0.1")
    with pytest.raises(IngestError) as err:
        run(cfg, {})
    msg = str(err.value)
    assert "data.max_bad_fraction=0.1" in msg and "of 33 inputs are bad" in msg and "No manifest" in msg
    assert "truncated_image=" in msg or "corrupt_image=" in msg
    ingest_dir = run_root / "ingest"
    assert not list(ingest_dir.rglob("manifest.json")) and not list(ingest_dir.rglob("*.tar*"))
    assert sorted(p.name for p in ingest_dir.iterdir()) == [f".{stage_key(cfg)}.lock"]  # no output, no build
    client = MlflowClient(tracking_uri=f"sqlite:///{run_root / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("mqgen").experiment_id])
    assert r.info.status == "FAILED" and r.data.metrics["num_skipped"] >= 3


def test_odd_pixel_modes_are_converted_exactly() -> None:
    rgb = ImageSpec(size=16, channels=3)
    grey = ImageSpec(size=16, channels=1)
    cmyk = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100), rgb, "crop")
    assert np.abs(cmyk.astype(int) - [255, 0, 0]).max() <= 2
    g16 = decode_image(png16((16, 16)), grey, "crop")  # 16-bit is scaled to 8 bits, not clipped
    assert g16[0, 0] == 255 and (g16.ravel()[1:] == 64).all()
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    assert (decode_image(encode(pal, "PNG"), rgb, "crop") == [0, 200, 0]).all()
    transparent = decode_image(encode(pal, "PNG", transparency=1), rgb, "crop")
    assert (transparent == 255).all()  # composited onto data.alpha_background=white
    half = decode_image(encode(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG"), rgb, "crop")
    assert np.abs(half.astype(int) - [255, 127, 127]).max() <= 1
    black_bg = ImageSpec(size=16, channels=3, alpha_background="black")
    assert np.abs(decode_image(encode(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG"), black_bg, "crop")
                  .astype(int) - [128, 0, 0]).max() <= 1
    assert (decode_image(encode(Image.new("1", (16, 16), 1), "PNG"), grey, "crop") == 255).all()
    la = decode_image(encode(Image.new("LA", (16, 16), (80, 255)), "PNG"), grey, "crop")
    assert (la == 80).all()
    grey_from_rgb = decode_image(encode(Image.new("RGB", (16, 16), (255, 0, 0)), "PNG"), grey, "crop")
    assert (grey_from_rgb == 76).all()  # ITU-R 601 luma


def test_unmappable_modes_are_rejected_with_the_mode_named() -> None:
    with pytest.raises(BadInput) as e:
        to_target_mode(Image.new("F", (4, 4)), ImageSpec(size=4, channels=1))
    assert e.value.reason == "unsupported_mode" and "'F'" in e.value.detail


def test_exif_orientation_is_applied_and_large_jpegs_are_decoded_reduced() -> None:
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed: red ends up on top
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95), ImageSpec(size=8, channels=3), "pad")
    assert out[1, 4, 0] > 200 and out[6, 4, 2] > 200
    big = decode_image(encode(gradient((1024, 768)), "JPEG"), ImageSpec(size=32, channels=3), "crop")
    assert big.shape == (32, 32, 3)


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "no-images"])
def test_missing_or_empty_image_folder_names_the_path(kind: str, run_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "src"
    if kind == "file":
        write(path, b"x")
    elif kind == "empty":
        path.mkdir()
    elif kind == "no-images":
        write(path / "a.txt", b"text")
        write(path / "sub" / "b.json", b"{}")
    with pytest.raises(SourceError) as err:
        run(config(run_root, "data.source=image-folder", f"data.path={path}"), {})
    assert str(path) in str(err.value)
    assert {"missing": "does not exist", "file": "is not a directory", "empty": "no images",
            "no-images": "no images"}[kind] in str(err.value)
    assert not (run_root / "ingest").exists() or not list((run_root / "ingest").rglob("manifest.json"))


def test_source_path_errors_for_idx_and_shards(run_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=rf"{tmp_path / 'nowhere'}.*does not exist"):
        run(config(run_root, f"data.path={tmp_path / 'nowhere'}"), {})
    (tmp_path / "half").mkdir()
    write_idx(tmp_path / "half", "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(SourceError, match=r"lacks the fashion-mnist IDX files train-labels-idx1-ubyte\.gz"):
        run(config(run_root, f"data.path={tmp_path / 'half'}"), {})
    with pytest.raises(SourceError, match=rf"shard {tmp_path / 'none.tar'} does not exist"):
        run(config(run_root, "data.source=shards", f"data.path={tmp_path / 'none.tar'}"), {})
    with pytest.raises(SourceError, match="no shards match"):
        run(config(run_root, "data.source=shards", f"data.path={tmp_path}/*.tar"), {})


def test_truncated_or_malformed_idx_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    p = write_idx(tmp_path, "x", np.zeros((5, 28, 28), np.uint8), gz=False)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(SourceError, match=rf"{p}: truncated IDX data"):
        read_idx(p)
    q = write(tmp_path / "y", b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(SourceError, match="element type 0x0d"):
        read_idx(q)
    r = write(tmp_path / "z.gz", b"not gzip at all")
    with pytest.raises(SourceError, match="z.gz"):
        read_idx(r)


def test_an_empty_input_shard_fails_clearly(run_root: Path, tmp_path: Path) -> None:
    empty = write(tmp_path / "train-000000.tar", b"")
    with pytest.raises(IngestError, match=r"1 of 1 inputs are bad.*corrupt_shard=1") as err:
        run(config(run_root, "data.source=shards", f"data.path={empty}"), {})
    assert str(empty) in str(err.value)


def test_decoder_errors_never_escape_as_crashes() -> None:
    spec = ImageSpec(size=8, channels=1)
    for data in (b"", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ", bytes(range(256)) * 4,
                 encode(gradient((16, 16)), "PNG")[:60]):
        with pytest.raises(BadInput):
            decode_image(data, spec, "crop")
    img = io.BytesIO()
    Image.new("L", (8, 8)).save(img, "PNG")
    assert decode_image(img.getvalue(), spec, "pad").shape == (8, 8)
