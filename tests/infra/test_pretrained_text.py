"""A frozen pretrained caption encoder (``text.pretrained``): a tiny random CLIP text model that the test saves
with the real libraries and mqgen loads back from the folder, offline. Covers the stored ids (shifted, with the
model's special tokens), the states (equal to the Hugging Face model's own), that the generator neither trains nor
saves the encoder yet reloads exactly, the learned null prefix of guidance, and the folder checks (digest,
pickles refused and never unpickled)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.text import (
    PRETRAINED_ID_OFFSET,
    CaptionTokenizer,
    TextTokenizerError,
    load_pretrained_encoder,
    pretrained_digest,
)
from models.stackformer import (
    FullGridConfig,
    FullGridTransformer,
    SamplingParams,
    Stackformer,
    StackformerConfig,
)
from tests.fixtures.pretrained_text import BOS, CAPTIONS, EOS, tiny_clip_folder

T = 16


@pytest.fixture(autouse=True, scope="module")
def transformers_installed() -> None:
    """transformers is part of the set-up (mqgen's dev extra): without it every test here fails, none skips."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        pytest.fail("transformers is missing: it is part of the set-up (make setup installs mqgen with its dev "
                    "extra, pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip-tiny")


@pytest.fixture(scope="module")
def tok(folder: Path) -> CaptionTokenizer:
    return CaptionTokenizer.from_pretrained(folder)


def _ids(tok: CaptionTokenizer, captions: list[str]) -> torch.Tensor:
    ids, _ = tok.encode(captions, T)
    return torch.from_numpy(ids.astype(np.int64))


def _generator(kind: str, tok: CaptionTokenizer, encoder, **kw):
    common = dict(codebook_size=16, grid_size=4, num_classes=0, n_embd=32, n_head=2, cond_dropout=0.1,
                  text_vocab_size=tok.vocab_size, text_len=T, text_width=encoder.width, **kw)
    if kind == "stackformer":
        return Stackformer(StackformerConfig(seq_len=8, n_layer_code=1, n_layer_pos=1, **common), encoder)
    return FullGridTransformer(FullGridConfig(n_layer=2, **common), encoder)


def test_the_pretrained_tokenizer_stores_shifted_ids_with_its_model_special_tokens(folder: Path, tok) -> None:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    caption = CAPTIONS[0]
    own = hf.encode(caption).ids  # with the post-processor's start and end tokens
    assert own[0] == hf.token_to_id(BOS) and own[-1] == hf.token_to_id(EOS)
    ids, cut = tok.encode([caption, ""], T)
    assert cut == 0 and ids.dtype == np.uint16
    assert ids[0, :len(own)].tolist() == [i + PRETRAINED_ID_OFFSET for i in own]
    assert (ids[0, len(own):] == 0).all()  # padding stays 0
    assert ids[1, :2].tolist() == [hf.token_to_id(BOS) + 1, hf.token_to_id(EOS) + 1]  # "" is not the null caption
    assert tok.vocab_size == hf.get_vocab_size() + 1
    assert tok.decode(ids[0].tolist()) == caption
    # saved and loaded back as the token databases' copy: the same ids
    tok.save(folder.parent / "copy.json")
    again = CaptionTokenizer.load(folder.parent / "copy.json", offset=PRETRAINED_ID_OFFSET)
    assert np.array_equal(again.encode([caption], T)[0], ids[:1])


def test_a_saved_padding_and_truncation_do_not_change_the_ids(folder: Path, tok, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf.enable_padding(pad_id=hf.token_to_id(EOS), pad_token=EOS)  # as many Hub tokenizer.json files are saved
    hf.enable_truncation(max_length=6)
    hf.save(str(tmp_path / "tokenizer.json"))
    padded = CaptionTokenizer.load(tmp_path / "tokenizer.json", offset=PRETRAINED_ID_OFFSET)
    short, long = "a large green triangle", CAPTIONS[0]
    alone, _ = padded.encode([short], T)
    batch, cut = padded.encode([short, long], T)
    assert np.array_equal(alone[0], batch[0])  # a caption's ids do not depend on the others in its batch
    assert np.array_equal(batch, tok.encode([short, long], T)[0])  # the same ids as the folder's own tokenizer
    assert cut == 0 and (batch[0, len(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(short).ids):] == 0).all()
    assert int((batch[1] != 0).sum()) > 6  # not cut at the saved truncation length


def test_the_frozen_encoder_states_are_the_hugging_face_model_states(folder: Path, tok) -> None:
    import transformers

    encoder = load_pretrained_encoder(folder, pretrained_digest(folder))
    ids = _ids(tok, CAPTIONS[:3])
    states = encoder(ids)
    assert states.shape == (3, T, 32) and not states.requires_grad
    reference = transformers.CLIPTextModel.from_pretrained(str(folder), use_safetensors=True).eval()
    with torch.no_grad():
        for i, caption in enumerate(CAPTIONS[:3]):  # each caption alone, unpadded, through the library's model
            n = int((ids[i] != 0).sum())
            own = reference(input_ids=(ids[i, :n] - PRETRAINED_ID_OFFSET)[None]).last_hidden_state[0]
            assert torch.allclose(states[i, :n], own, atol=1e-5), caption
    with pytest.raises(ValueError, match="do not belong together"):
        encoder(torch.full((1, T), encoder.vocab_size + 5))


def test_the_state_width_is_the_hidden_size_when_the_embeddings_are_narrower() -> None:
    import transformers

    from infra.text import PretrainedTextEncoder

    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=40, embedding_size=8, hidden_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=T)
    encoder = PretrainedTextEncoder(transformers.AlbertModel(config))
    assert (encoder.width, encoder.vocab_size) == (24, 40)
    ids = torch.tensor([[3, 9, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert encoder(ids).shape == (1, T, encoder.width)
    generator = Stackformer(StackformerConfig(seq_len=8, n_layer_code=1, n_layer_pos=1, codebook_size=16, grid_size=4,
                                              num_classes=0, n_embd=32, n_head=2, text_vocab_size=41, text_len=T,
                                              text_width=encoder.width), encoder)
    codes, positions = torch.randint(0, 16, (1, 8)), torch.arange(8)[None] * 2
    out = generator(codes, positions, text=ids)
    assert out.code_logits.shape[:2] == (1, 8) and torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", ["stackformer", "fullgrid"])
def test_the_generator_neither_trains_nor_saves_the_frozen_encoder_and_reloads_exactly(folder: Path, tok,
                                                                                      kind: str) -> None:
    digest = pretrained_digest(folder)
    encoder = load_pretrained_encoder(folder, digest)
    before = {k: v.clone() for k, v in encoder.module.state_dict().items()}
    torch.manual_seed(0)
    model = _generator(kind, tok, encoder)
    state = model.state_dict()
    assert not any(k.startswith("text.encoder") for k in state)  # the folder is the encoder's record, not this
    assert "text.null" in state
    assert not any(p is q for p in model.parameters() for q in encoder.module.parameters())
    ids = _ids(tok, CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    maps_before = model.text.maps[0].weight.detach().clone()
    for _ in range(3):
        codes = torch.randint(0, 16, (4, 8 if kind == "stackformer" else 16))
        if kind == "stackformer":
            out = model(codes, torch.arange(8).expand(4, -1) * 2, None, text=ids)
        else:
            out = model(codes, None, text=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert not torch.equal(model.text.maps[0].weight, maps_before)  # the prefix maps learn
    for k, v in encoder.module.state_dict().items():  # the encoder does not
        assert torch.equal(v, before[k]), k
    # a fresh generator with a freshly loaded encoder: strict load, the same samples
    torch.manual_seed(1)
    again = _generator(kind, tok, load_pretrained_encoder(folder, digest))
    again.load_state_dict(model.state_dict(), strict=True)
    model.eval(), again.eval()

    def draw(m):
        g = torch.Generator().manual_seed(5)
        if kind == "stackformer":
            return m.sample(4, None, SamplingParams(), SamplingParams(), generator=g, guidance_scale=2.0, text=ids)[0]
        return m.sample(4, None, SamplingParams(), generator=g, guidance_scale=2.0, text=ids)

    assert torch.equal(draw(model), draw(again))
    # moving the generator moves the encoder it holds
    model.to(torch.float64)
    assert next(encoder.module.parameters()).dtype == torch.float64


def test_the_null_caption_reads_the_learned_null_prefix_and_guidance_scale_0_samples_it(folder: Path, tok) -> None:
    encoder = load_pretrained_encoder(folder)
    model = _generator("stackformer", tok, encoder).eval()
    with torch.no_grad():
        model.text.null.normal_()
        null = torch.zeros(2, T, dtype=torch.long)
        prefixes = model.text(null)
        assert torch.allclose(prefixes[0], model.text.maps[0](model.text.null).expand(2, -1, -1))
        caption = model.text(_ids(tok, CAPTIONS[:2]))
        assert not torch.allclose(caption[0], prefixes[0])

    def draw(scale, text):
        g = torch.Generator().manual_seed(3)
        return model.sample(2, None, SamplingParams(), SamplingParams(), generator=g, guidance_scale=scale, text=text)

    for a, b in zip(draw(0.0, _ids(tok, CAPTIONS[:2])), draw(1.0, null)):
        assert torch.equal(a, b)


def test_a_generator_refuses_a_missing_or_wrong_width_encoder(folder: Path, tok) -> None:
    encoder = load_pretrained_encoder(folder)
    cfg = StackformerConfig(codebook_size=16, grid_size=4, seq_len=8, num_classes=0, n_layer_code=1, n_layer_pos=1,
                            n_embd=32, n_head=2, text_vocab_size=tok.vocab_size, text_len=T, text_width=64)
    with pytest.raises(ValueError, match="frozen text encoder of width 64"):
        Stackformer(cfg, encoder)
    with pytest.raises(ValueError, match="frozen text encoder of width 64"):
        Stackformer(cfg)
    with pytest.raises(ValueError, match="its own"):
        Stackformer(StackformerConfig(**{**cfg.__dict__, "text_width": 0}), encoder)
    with pytest.raises(ValueError, match="text_width"):
        StackformerConfig(**{**cfg.__dict__, "text_vocab_size": 0, "text_len": 0})


def test_the_folder_is_checked_by_digest_and_pickled_weights_are_refused_unread(folder: Path, tmp_path: Path) -> None:
    import shutil

    digest = pretrained_digest(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / ".cache").mkdir()  # dot files (a hub client's cache) are not part of the folder
    (copy / ".cache" / "x").write_text("x")
    assert pretrained_digest(copy) == digest
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace('"hidden_act"', ' "hidden_act"'))  # same model, other bytes
    assert pretrained_digest(copy) != digest
    with pytest.raises(TextTokenizerError, match="changed since the model was trained"):
        load_pretrained_encoder(copy, digest)
    # a folder of pickled weights only: refused, and the pickle never runs
    sentinel = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad)
    shutil.copy(folder / "tokenizer.json", bad)
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    for call in (lambda: load_pretrained_encoder(bad), lambda: pretrained_digest(bad)):
        with pytest.raises(TextTokenizerError, match="pytorch_model.bin are pickles and are never loaded"):
            call()
    assert not sentinel.exists()
    with pytest.raises(TextTokenizerError, match="no such directory"):
        CaptionTokenizer.from_pretrained(tmp_path / "absent")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(TextTokenizerError, match="tokenizer.json"):
        CaptionTokenizer.from_pretrained(copy)


def test_an_unusable_folder_is_a_config_error_when_the_config_is_resolved(folder: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Refused at once (the CLI's config error, exit 2), not minutes later in the tokenize stage."""
    from infra.config import ConfigError, resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no such directory"):
        resolve("tiny-text", overrides=["text.pretrained=absent"])
    with pytest.raises(ConfigError, match="tokenizer.json, \\*.safetensors weights missing"):
        resolve("tiny-text", overrides=["text.pretrained=half"])
    with pytest.raises(ConfigError, match="text.max_len=64 is longer than the 32 positions"):
        resolve("tiny-text", overrides=[f"text.pretrained={folder}", "text.max_len=64"])
    cfg = resolve("tiny-text", overrides=[f"text.pretrained={folder}"])
    assert cfg.text.pretrained == str(folder)
    monkeypatch.chdir(folder.parent)  # a relative path is made absolute against the caller's directory
    assert resolve("tiny-text", overrides=[f"text.pretrained={folder.name}"]).text.pretrained == str(folder)
    assert resolve("tiny-text").hash() != cfg.hash()


def test_the_positions_of_a_text_model_are_read_from_its_config(tmp_path: Path) -> None:
    from infra.text import pretrained_max_positions

    cases = {"text.json": ('{"max_position_embeddings": 77, "hidden_size": 512}', 77),
             "dual.json": ('{"text_config": {"max_position_embeddings": 64}, "vision_config": {}}', 64),
             "t5.json": ('{"d_model": 512, "relative_attention_num_buckets": 32}', None)}
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert pretrained_max_positions(tmp_path / name) == expected, name
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TextTokenizerError, match="cannot be read as JSON"):
        pretrained_max_positions(tmp_path / "bad.json")


def test_a_file_rewritten_in_place_with_its_old_modification_time_changes_the_digest(folder: Path,
                                                                                     tmp_path: Path) -> None:
    """The digest's per-process sha256 cache is not fooled by a tool that restores modification times
    (``rsync -t --inplace``, ``tar x``): same inode, same size, same mtime, other bytes."""
    import os
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = pretrained_digest(copy)
    config = copy / "config.json"
    st = config.stat()
    text = config.read_text()
    with open(config, "r+") as f:  # in place: the inode stays
        f.write(text.replace('"hidden_act"', '"hidden_acT"', 1))
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = config.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert pretrained_digest(copy) != before
