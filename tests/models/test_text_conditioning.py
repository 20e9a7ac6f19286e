"""Text conditioning of the Stackformer and the full-grid baseline: the caption prefix, guidance identities,
the KV-cached sampler, and that a model actually learns to follow captions."""

from __future__ import annotations

import pytest
import torch

from models.stackformer import FullGridTransformer, SamplingParams, Stackformer, sample_tokens
from models.text import TextEncoder, TextEncoderConfig
from tests.models.test_stackformer import (
    K,
    N,
    P,
    fullgrid_config,
    guide_at_scale_1_too,
    random_tokens,
    scrambled,
    stackformer_config,
    train,
)

V, T = 40, 6  # caption vocabulary and length


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def captions(batch_size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (batch_size, T), generator=g)
    lengths = torch.randint(1, T + 1, (batch_size,), generator=g)
    return ids.masked_fill(torch.arange(T)[None] >= lengths[:, None], 0)  # 0-padded, like infra.text stores


def text_stackformer(**kw) -> Stackformer:
    return Stackformer(stackformer_config(text_vocab_size=V, text_len=T, n_layer_text=1, **kw))


def text_fullgrid(**kw) -> FullGridTransformer:
    return FullGridTransformer(fullgrid_config(text_vocab_size=V, text_len=T, n_layer_text=1, **kw))


def test_text_encoder_ignores_padding_and_encodes_the_empty_caption():
    enc = TextEncoder(TextEncoderConfig(vocab_size=V, max_len=T, n_layer=2, n_embd=32, n_head=2)).eval()
    ids = captions(4)
    ids[:, -1] = 0
    base = enc(ids)
    # states of real tokens do not depend on the padded slots (their keys are masked out): changing the
    # padding embedding moves only the padded positions' states...
    real = ids != 0
    assert real[:, 0].all() and (~real).any()
    with torch.no_grad():
        enc.tok_emb.weight[0].add_(1.0)
    other = enc(ids)
    assert torch.allclose(base[real], other[real], atol=1e-6)
    assert not torch.allclose(base[~real], other[~real])
    # ...and change when a real token changes
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] % (V - 1)) + 1
    assert not torch.allclose(enc(changed)[:, 1], base[:, 1])
    empty = enc(torch.zeros(2, T, dtype=torch.long))
    assert torch.isfinite(empty).all() and torch.allclose(empty[0], empty[1])
    with pytest.raises(ValueError, match="caption ids"):
        enc(torch.zeros(2, T + 1, dtype=torch.long))


@pytest.mark.parametrize("make", [text_stackformer, text_fullgrid])
def test_forward_needs_captions_and_depends_on_them(make):
    model = make().eval()
    codes, positions = random_tokens(4)
    text = captions(4)

    def logits(t):
        if isinstance(model, Stackformer):
            return model(codes, positions, text=t).code_logits
        return model(torch.randint(K, (4, P)), text=t).logits

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="caption ids"):
        logits(None)
    a, b = logits(text), logits(captions(4, seed=2))
    assert not torch.allclose(a, b)  # the caption reaches every step
    assert not torch.allclose(a[:, -1], b[:, -1])
    with pytest.raises(ValueError, match="without text conditioning"):
        Stackformer(stackformer_config()).eval()(codes, positions, text=text)


@pytest.mark.parametrize("make", [text_stackformer, text_fullgrid])
@pytest.mark.parametrize("scale", [1.0, 0.0, 3.0])
def test_cached_sampling_equals_uncached_with_captions(make, scale):
    model = scrambled(make(cond_dropout=0.1))
    text = captions(5)
    sp = SamplingParams()

    def draw(use_cache):
        g = torch.Generator().manual_seed(7)
        if isinstance(model, Stackformer):
            return model.sample(5, None, sp, sp, use_cache=use_cache, generator=g, guidance_scale=scale, text=text)
        return (model.sample(5, None, sp, use_cache=use_cache, generator=g, guidance_scale=scale, text=text),)

    for a, b in zip(draw(True), draw(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [text_stackformer, text_fullgrid])
def test_guidance_scale_0_is_the_empty_caption_and_1_is_plain_conditional(make, monkeypatch):
    model = scrambled(make(cond_dropout=0.1))
    text = captions(6)
    null = torch.zeros_like(text)

    def draw(scale, t):
        g = torch.Generator().manual_seed(3)
        codes, positions, _ = sample_tokens(model, 6, None, SamplingParams(), SamplingParams(), generator=g,
                                            guidance_scale=scale, text=t)
        return codes, positions

    with pytest.raises(ValueError, match="classifier-free guidance"):
        draw_model = scrambled(make())  # no cond_dropout: not trained for guidance
        sample_tokens(draw_model, 2, None, SamplingParams(), SamplingParams(), guidance_scale=2.0, text=text[:2])
    plain, empty = draw(1.0, text), draw(1.0, null)  # one plain pass each: no empty-caption rows, no mixing
    for a, b in zip(draw(0.0, text), empty):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(plain, draw(4.0, text)))  # guidance changes what is drawn
    calls = guide_at_scale_1_too(monkeypatch)
    for a, b in zip(draw(1.0, text), plain):
        assert torch.equal(a, b)
    assert set(calls) == {(12, 1.0)}  # scale 1 ran on the captions stacked over empty ones, through the mixing


def test_training_drops_captions_to_the_empty_one():
    model = text_stackformer(cond_dropout=0.5)
    codes, positions = random_tokens(2000)
    text = captions(2000)
    model.eval()
    ref = model(codes[:, :1], positions[:, :1], text=text).code_logits
    null_ref = model(codes[:, :1], positions[:, :1], text=torch.zeros_like(text)).code_logits
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    got = model(codes[:, :1], positions[:, :1], text=text).code_logits
    dropped = ~torch.isclose(got, ref, atol=1e-5).all(dim=-1).squeeze(1)
    assert 0.45 < dropped.float().mean() < 0.55
    assert torch.allclose(got[dropped], null_ref[dropped], atol=1e-5)


def test_a_text_stackformer_learns_to_follow_its_caption():
    """Two captions, two fixed token sequences: after training, sampling with each caption gives its sequence
    (a model ignoring the text could at best mix them)."""
    torch.set_num_threads(1)
    model = text_stackformer(cond_dropout=0.1)
    seqs, cells = random_tokens(2, seed=5)
    text = captions(2, seed=9)
    batch = torch.arange(64) % 2

    def loss():
        return model(seqs[batch], cells[batch], text=text[batch]).loss

    first, last = train(model, loss, 150)
    assert last < 0.2 * first
    g = torch.Generator().manual_seed(0)
    codes, positions = model.sample(20, None, SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
                                    raster_order=True, generator=g, text=text[torch.arange(20) % 2])
    want = torch.arange(20) % 2
    assert torch.equal(codes, seqs[want]) and torch.equal(positions, cells[want])


def test_text_config_validation():
    with pytest.raises(ValueError, match="both 0"):
        stackformer_config(text_vocab_size=V, text_len=0)
    assert stackformer_config(text_vocab_size=V, text_len=T, cond_dropout=0.1).guided
    assert stackformer_config(text_vocab_size=V, text_len=T).prefix_len == T
    assert stackformer_config().prefix_len == 0 and N > 0
