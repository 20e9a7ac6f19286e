"""The caption tokenizer (BPE from the tokenizers library) and caption ids in the token databases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infra.storage import sha256_file
from infra.text import PAD_ID, CaptionTokenizer, TextTokenizerError
from infra.tokens import TokenFormatError, TokenMeta, TokenWriter, pack_records, read_meta

CAPTIONS = [f"a {s} {c} {sh}" + (f" above a {c2} circle" if i % 3 == 0 else "")
            for i, (s, c, sh, c2) in enumerate((s, c, sh, c2) for s in ("small", "large")
                                               for c in ("red", "blue", "green") for sh in ("circle", "square")
                                               for c2 in ("cyan", "yellow"))]


def test_training_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    a, b = CaptionTokenizer.train(CAPTIONS, 300), CaptionTokenizer.train(CAPTIONS, 300)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert sha256_file(tmp_path / "a.json") == sha256_file(tmp_path / "b.json")
    ids, cut = a.encode(["A Small  RED circle", "", "x" * 40], 8)
    assert ids.dtype == np.uint16 and ids.shape == (3, 8)
    assert a.decode(ids[0]) == "a small red circle"  # normalised: lower case
    assert (ids[1] == PAD_ID).all() and cut == 1  # the empty caption is all padding; the long one was cut
    assert (ids[0] < a.vocab_size).all() and ids[0, 0] != PAD_ID
    loaded = CaptionTokenizer.load(tmp_path / "a.json", sha256_file(tmp_path / "a.json"))
    assert np.array_equal(loaded.encode(CAPTIONS, 16)[0], a.encode(CAPTIONS, 16)[0])


def test_a_wrong_or_damaged_tokenizer_file_is_refused(tmp_path: Path) -> None:
    tok = CaptionTokenizer.train(CAPTIONS, 300)
    path = tmp_path / "t.json"
    tok.save(path)
    with pytest.raises(TextTokenizerError, match="does not match the sha256"):
        CaptionTokenizer.load(path, "0" * 64)
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TextTokenizerError, match="cannot be read"):
        CaptionTokenizer.load(path)
    with pytest.raises(TextTokenizerError, match="does not exist"):
        CaptionTokenizer.load(tmp_path / "missing.json")


def _meta(**kw) -> TokenMeta:
    base = {"split": "train", "codebook_size": 8, "grid_size": 4, "seq_len": 2, "keep_ratio": 0.125, "num_classes": 0,
            "tokenizer_sha256": "t", "source_sha256": "s", "shards": ((0, 3),)}
    return TokenMeta(**{**base, **kw})


def test_records_carry_caption_ids_and_check_them(tmp_path: Path) -> None:
    meta = _meta(text_len=4, text_vocab_size=10, text_tokenizer_sha256="x")
    assert meta.record_size == 4 * 2 + 4 + 2 * 4 and "text <u2[text_len]>" in meta.record_layout
    codes = np.array([[1, 2], [3, 4], [5, 6]])
    pos = np.array([[0, 1], [2, 3], [4, 5]])
    labels = np.full(3, -1)
    text = np.array([[1, 2, 0, 0], [3, 0, 0, 0], [9, 9, 9, 9]])
    rec = pack_records(codes, pos, labels, meta, "w", text)
    assert rec["text"].tolist() == text.tolist()
    with pytest.raises(TokenFormatError, match="outside"):
        pack_records(codes, pos, labels, meta, "w", text + 1)
    with pytest.raises(TokenFormatError, match="missing"):
        pack_records(codes, pos, labels, meta, "w")
    with pytest.raises(TokenFormatError, match="both 0"):
        _meta(text_len=4)
    # written, finalized and read back through the training reader
    from infra.tokens import TokenDataset

    with TokenWriter(tmp_path / "db", meta) as w:
        w.write_shard(0, codes, pos, labels, text=text)
        w.finalize()
    assert read_meta(tmp_path / "db").text_len == 4
    ds = TokenDataset(tmp_path / "db")
    assert [ds[i]["text"].tolist() for i in range(3)] == text.tolist()
    # a database without captions keeps the old layout and items
    plain = _meta()
    assert plain.record_size == 12 and "text" not in plain.record_layout


def test_metadata_without_captions_is_what_it_was_before_captions() -> None:
    """Outputs written before captions existed must stay cache hits: a caption-less database's metadata has no
    caption fields, and stored metadata of any version normalises to what this version writes."""
    plain = _meta()
    assert not set(TokenMeta.TEXT_FIELDS) & set(plain.to_dict())
    old = plain.to_dict()  # as written before captions: no caption fields
    interim = {**old, "text_len": 0, "text_vocab_size": 0, "text_tokenizer_sha256": ""}
    assert TokenMeta.normalized(old) == TokenMeta.normalized(interim) == plain.to_dict()
    assert TokenMeta.from_json(plain.to_json()) == plain
    captioned = _meta(text_len=4, text_vocab_size=10, text_tokenizer_sha256="x")
    assert captioned.to_dict()["text_len"] == 4 and TokenMeta.normalized(captioned.to_dict()) == captioned.to_dict()
