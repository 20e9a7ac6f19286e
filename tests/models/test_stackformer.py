"""Stackformer, full-grid baseline and shared transformer blocks: tiny CPU invariants."""

import math

import pytest
import torch
from torch import nn

from models import stackformer
from models.stackformer import (
    FullGridConfig,
    FullGridTransformer,
    SamplingParams,
    Stackformer,
    StackformerConfig,
    sort_by_position,
)
from models.transformer import TransformerStack, param_groups

K, G, N = 16, 4, 6
P = G * G  # grid cells; also the start position


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state (model init), whatever the test order."""
    torch.manual_seed(0)


def stackformer_config(**overrides) -> StackformerConfig:
    fields = {"codebook_size": K, "grid_size": G, "seq_len": N, "num_classes": 0, "n_layer_code": 2,
              "n_layer_pos": 2, "n_embd": 32, "n_head": 2}
    return StackformerConfig(**(fields | overrides))


def fullgrid_config(**overrides) -> FullGridConfig:
    fields = {"codebook_size": K, "grid_size": G, "num_classes": 0, "n_layer": 2, "n_embd": 32, "n_head": 2}
    return FullGridConfig(**(fields | overrides))


def scrambled(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``model`` in eval mode with every parameter perturbed by N(0, 0.3).

    Makes the zero-initialised step embedding non-zero (so a wrong cache offset shows) and the logits peaked.
    """
    g = torch.Generator().manual_seed(seed)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def random_tokens(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes ``[B, N]`` and raster-sorted distinct positions ``[B, N]``."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(K, (batch_size, N), generator=g)
    rows = [torch.randperm(P, generator=g)[:N].sort().values for _ in range(batch_size)]
    return codes, torch.stack(rows)


def train(model: nn.Module, loss_fn, steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """Adam on ``loss_fn()`` for ``steps`` steps; returns (first loss, last loss)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


# -------------------------------------------------------------------------------------------- config, shapes


@pytest.mark.parametrize("num_classes", [0, 3])
def test_forward_shapes_vocab_and_loss(num_classes):
    model = Stackformer(stackformer_config(num_classes=num_classes, pos_loss_weight=0.5))
    codes, positions = random_tokens(3)
    labels = torch.tensor([0, 2, 1]) if num_classes else None
    out = model(codes, positions, labels)
    assert out.code_logits.shape == (3, N, K + max(1, num_classes))
    assert out.pos_logits.shape == (3, N, P + 1)
    assert model.config.code_vocab_size == K + max(1, num_classes) and model.config.pos_vocab_size == P + 1
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.code_loss + 0.5 * out.pos_loss)
    # A freshly initialised model is close to uniform over both vocabularies.
    assert abs(out.code_loss.item() - math.log(K + max(1, num_classes))) < 0.2
    assert abs(out.pos_loss.item() - math.log(P + 1)) < 0.2


def test_fullgrid_forward_shapes():
    model = FullGridTransformer(fullgrid_config(num_classes=5))
    codes = torch.randint(K, (2, P))
    out = model(codes, torch.tensor([4, 0]))
    assert out.logits.shape == (2, P, K + 5)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("overrides", [
    {"n_embd": 30, "n_head": 4},
    {"seq_len": P + 1},
    {"seq_len": 0},
    {"codebook_size": 65536},
    {"num_classes": -1},
    {"n_layer_pos": 0},
    {"dropout": 1.0},
    {"pos_loss_weight": -1.0},
])
def test_config_validation(overrides):
    with pytest.raises(ValueError):
        stackformer_config(**overrides)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_forward_rejects_bad_inputs():
    uncond = Stackformer(stackformer_config())
    cond = Stackformer(stackformer_config(num_classes=3))
    codes, positions = random_tokens(2)
    with pytest.raises(ValueError, match="codes"):
        uncond(codes.index_fill(1, torch.tensor([2]), K), positions)  # the start token is not a real code
    with pytest.raises(ValueError, match="positions"):
        uncond(codes, positions.index_fill(1, torch.tensor([5]), P))
    with pytest.raises(ValueError, match="labels"):
        uncond(codes, positions, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        cond(codes, positions)
    with pytest.raises(ValueError, match="labels"):
        cond(codes, positions, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        cond.sample(2, labels=torch.tensor([0, -1]))


def test_num_params_matches_paper_count():
    """12 d^2 + 13 d per block plus tables: 307.56M unconditional, 309.6M with 1000 classes (1024 steps)."""
    paper = {"codebook_size": 1024, "grid_size": 32, "seq_len": 1024, "n_layer_code": 12, "n_layer_pos": 12,
             "n_embd": 1024, "n_head": 16}
    with torch.device("meta"):
        assert Stackformer(StackformerConfig(num_classes=0, **paper)).num_params() == 307_560_448
        assert Stackformer(StackformerConfig(num_classes=1000, **paper)).num_params() == 309_606_400


# ------------------------------------------------------------------------------------------------- causality


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_stackformer_causality():
    """Step t reads (codes[t-1], positions[t-1]); the position branch at t also reads codes[t]."""
    model = scrambled(Stackformer(stackformer_config(num_classes=2)), dtype=torch.float64)
    codes, positions = random_tokens(2)
    labels = torch.tensor([0, 1])
    base = model(codes, positions, labels)
    for i in range(N):
        changed = codes.clone()
        changed[:, i] = (changed[:, i] + 1) % K
        out = model(changed, positions, labels)
        assert_same(out.code_logits[:, :i + 1], base.code_logits[:, :i + 1])
        assert_same(out.pos_logits[:, :i], base.pos_logits[:, :i])
        assert (out.pos_logits[:, i] - base.pos_logits[:, i]).abs().max() > 1e-3
        if i + 1 < N:
            assert (out.code_logits[:, i + 1] - base.code_logits[:, i + 1]).abs().max() > 1e-3

        changed = positions.clone()
        changed[:, i] = (changed[:, i] + 1) % P
        out = model(codes, changed, labels)
        assert_same(out.code_logits[:, :i + 1], base.code_logits[:, :i + 1])
        assert_same(out.pos_logits[:, :i + 1], base.pos_logits[:, :i + 1])
        if i + 1 < N:
            assert (out.code_logits[:, i + 1] - base.code_logits[:, i + 1]).abs().max() > 1e-3
            assert (out.pos_logits[:, i + 1] - base.pos_logits[:, i + 1]).abs().max() > 1e-3


def test_fullgrid_causality():
    model = scrambled(FullGridTransformer(fullgrid_config()), dtype=torch.float64)
    codes = torch.randint(K, (2, P), generator=torch.Generator().manual_seed(0))
    base = model(codes).logits
    for i in range(P - 1):
        changed = codes.clone()
        changed[:, i] = (changed[:, i] + 1) % K
        out = model(changed).logits
        assert_same(out[:, :i + 1], base[:, :i + 1])
        assert (out[:, i + 1] - base[:, i + 1]).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------------- KV cache


def test_kv_cache_chunks_match_full_forward():
    stack = scrambled(TransformerStack(n_layer=2, n_embd=32, n_head=2, dropout=0.0), dtype=torch.float64)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = stack(x)
    cache = stack.new_cache(3, 7, dtype=torch.float64)
    chunks = [stack(x[:, a:b], cache) for a, b in [(0, 3), (3, 4), (4, 7)]]
    assert cache.length == 7
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="overflow"):
        stack(x[:, :1], cache)


SAMPLER_CASES = {
    "plain": {"num_classes": 0},
    "class_topk_topp": {"num_classes": 3, "code_params": SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
                        "pos_params": SamplingParams(top_k=4, top_p=0.8)},
    "raster": {"num_classes": 0, "raster_order": True, "pos_params": SamplingParams(top_p=0.7)},
    "class_raster_full_grid": {"num_classes": 3, "raster_order": True, "seq_len": P,
                               "code_params": SamplingParams(temperature=1.5, top_k=3)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_stackformer_cached_sampling_equals_uncached(case, dtype):
    kwargs = dict(SAMPLER_CASES[case])
    num_classes = kwargs.pop("num_classes")
    seq_len = kwargs.pop("seq_len", N)
    model = scrambled(Stackformer(stackformer_config(num_classes=num_classes, seq_len=seq_len)), dtype=dtype)
    labels = torch.arange(8) % num_classes if num_classes else None

    def draw(use_cache, seed=0):
        return model.sample(8, labels, use_cache=use_cache, generator=torch.Generator().manual_seed(seed),
                            **kwargs)

    cached, uncached = draw(True), draw(False)
    assert torch.equal(cached[0], uncached[0]) and torch.equal(cached[1], uncached[1])
    other = draw(True, seed=1)
    assert not (torch.equal(cached[0], other[0]) and torch.equal(cached[1], other[1]))  # the seed matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes, params", [(0, SamplingParams()),
                                                 (3, SamplingParams(temperature=0.9, top_k=6, top_p=0.9))])
def test_fullgrid_cached_sampling_equals_uncached(num_classes, params, dtype):
    model = scrambled(FullGridTransformer(fullgrid_config(num_classes=num_classes)), dtype=dtype)
    labels = torch.arange(8) % num_classes if num_classes else None
    cached = model.sample(8, labels, params, use_cache=True, generator=torch.Generator().manual_seed(0))
    uncached = model.sample(8, labels, params, use_cache=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cached, uncached)
    assert cached.shape == (8, P) and int(cached.max()) < K
    other = model.sample(8, labels, params, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(cached, other)


# ------------------------------------------------------------------------------------------- sample validity


def assert_valid(codes, positions, batch_size, seq_len, raster_order):
    assert codes.shape == positions.shape == (batch_size, seq_len)
    assert codes.dtype == positions.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    assert int(positions.min()) >= 0 and int(positions.max()) < P
    assert bool((positions.sort(dim=1).values.diff(dim=1) > 0).all()), "duplicate positions in a row"
    if raster_order:
        assert bool((positions.diff(dim=1) > 0).all())


@pytest.mark.parametrize("raster_order", [False, True])
@pytest.mark.parametrize("seq_len", [N, P])
def test_samples_are_valid(raster_order, seq_len):
    model = scrambled(Stackformer(stackformer_config(seq_len=seq_len)))
    codes, positions = model.sample(16, raster_order=raster_order, generator=torch.Generator().manual_seed(0))
    assert_valid(codes, positions, 16, seq_len, raster_order)
    if seq_len == P and raster_order:
        assert torch.equal(positions, torch.arange(P).expand(16, -1))


@pytest.mark.parametrize("raster_order", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_masks_start_tokens_and_used_positions(raster_order, temperature):
    """Heads rigged to prefer start/class tokens, the start position and cell 0 must still give valid rows."""
    model = Stackformer(stackformer_config(num_classes=3)).eval()
    with torch.no_grad():
        for ln in (model.code_ln, model.pos_ln):  # LN output = all ones, whatever the input
            ln.weight.zero_()
            ln.bias.fill_(1.0)
        model.code_head.weight.zero_()
        model.code_head.weight[K:] = 1.0  # logit 32 for every start/class token, 0 for real codes
        model.pos_head.weight.zero_()
        model.pos_head.weight[P] = 1.0  # the start position
        model.pos_head.weight[0] = 0.9  # cell 0, wanted again at every step
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    params = SamplingParams(temperature=temperature)
    codes, positions = model.sample(8, labels, code_params=params, pos_params=params,
                                    raster_order=raster_order, generator=torch.Generator().manual_seed(0))
    assert_valid(codes, positions, 8, N, raster_order)
    assert bool((positions[:, 0] == 0).all())  # the preferred cell is taken first, and only once


def test_sort_by_position():
    codes, positions = sort_by_position(torch.tensor([[10, 11, 12], [20, 21, 22]]),
                                        torch.tensor([[5, 1, 3], [0, 9, 4]]))
    assert torch.equal(positions, torch.tensor([[1, 3, 5], [0, 4, 9]]))
    assert torch.equal(codes, torch.tensor([[11, 12, 10], [20, 22, 21]]))


# ------------------------------------------------------------------------------------ conditioning, learning


def test_start_token_depends_on_label():
    model = Stackformer(stackformer_config(num_classes=3)).eval()
    assert torch.equal(model.start_tokens(torch.tensor([0, 2]), 2), torch.tensor([K, K + 2]))
    codes, positions = random_tokens(1)
    out = [model(codes, positions, torch.tensor([label])) for label in (0, 1)]
    assert (out[0].code_logits[:, 0] - out[1].code_logits[:, 0]).abs().max() > 1e-4
    assert (out[0].pos_logits[:, 0] - out[1].pos_logits[:, 0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="labels"):
        model.start_tokens(torch.tensor([3]), 1)


def test_class_conditional_overfit_reproduces_each_class():
    model = Stackformer(stackformer_config(num_classes=2))
    codes = torch.tensor([[1, 5, 5, 9, 0, 3], [7, 7, 2, 15, 4, 4]])
    positions = torch.tensor([[0, 2, 5, 7, 11, 14], [1, 3, 4, 8, 9, 15]])
    labels = torch.tensor([0, 1])
    first, last = train(model, lambda: model(codes, positions, labels).loss, steps=300)
    assert last < 0.05 < first

    sample_labels = torch.tensor([1, 0, 0, 1, 1])
    greedy = SamplingParams(temperature=0.0)
    batches = list(model.sample_many(5, 2, sample_labels, code_params=greedy, pos_params=greedy))
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    got_codes, got_positions = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert torch.equal(got_codes, codes[sample_labels])
    assert torch.equal(got_positions, positions[sample_labels])

    cool = SamplingParams(temperature=0.1)
    got_codes, got_positions = model.sample(4, torch.tensor([0, 1, 0, 1]), code_params=cool, pos_params=cool,
                                            use_cache=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got_codes, codes[[0, 1, 0, 1]]) and torch.equal(got_positions, positions[[0, 1, 0, 1]])


def test_stackformer_overfits_a_few_sequences():
    model = Stackformer(stackformer_config())
    codes, positions = random_tokens(4, seed=1)
    first, last = train(model, lambda: model(codes, positions).loss, steps=300)
    # ~ln(17) + ln(17) = 5.7 at init; the floor is ln(4) / N = 0.23 (the first of 4 codes is unpredictable).
    assert last < first / 10


# ------------------------------------------------------------------------------------------ optimiser groups


def test_param_groups_decay_only_linear_weights():
    model = Stackformer(stackformer_config(num_classes=2))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    everything = [id(p) for p in model.parameters()]
    assert sorted(id(p) for p in decay["params"] + no_decay["params"]) == sorted(everything)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for p in (model.code_emb.weight, model.pos_emb.weight, model.step_emb, model.code_ln.weight,
              model.code_stack.blocks[0].attn.qkv.bias):
        assert id(p) in no_decay_ids
    torch.optim.AdamW([decay, no_decay], lr=1e-3)


# ------------------------------------------------------------------------------- classifier-free guidance


def guide_at_scale_1_too(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float | None]]:
    """From here on the samplers run ``guidance_scale=1.0`` as any other scale (conditions stacked over null
    ones, logits mixed by ``_guided``), not as their one plain conditional pass. Returns the ``(rows, scale)``
    of every ``_guided`` call made from then on, so a test can see that the mixing ran."""
    guidance, guided = stackformer._guidance, stackformer._guided
    calls: list[tuple[int, float | None]] = []

    def stacked(config, labels, text, batch_size, scale):
        run_labels, run_text, _ = guidance(config, labels, text, batch_size, 2.0)  # any scale but 1 stacks
        return run_labels, run_text, float(scale)

    def recorded(logits, batch_size, scale):
        calls.append((logits.shape[0], scale))
        return guided(logits, batch_size, scale)

    monkeypatch.setattr(stackformer, "_guidance", stacked)
    monkeypatch.setattr(stackformer, "_guided", recorded)
    return calls


def test_guided_logits_are_exactly_the_conditional_ones_at_1_and_the_null_ones_at_0():
    g = torch.Generator().manual_seed(0)
    cond, null = 3 * torch.randn(4, 9, generator=g), 3 * torch.randn(4, 9, generator=g)
    stacked = torch.cat([cond, null])
    assert torch.equal(stackformer._guided(stacked, 4, 1.0), cond)
    assert torch.equal(stackformer._guided(stacked, 4, 0.0), null)
    strong = stackformer._guided(stacked, 4, 3.0)
    assert torch.allclose(strong, null + 3 * (cond - null), atol=1e-5) and not torch.allclose(strong, cond)
    assert stackformer._guided(stacked, 4, None) is stacked


def _greedy_first_step_logits(model: Stackformer, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The code logits of step 0 and the position logits after a fixed first code, by teacher forcing."""
    codes = torch.zeros(labels.shape[0], 1, dtype=torch.long)
    positions = torch.zeros(labels.shape[0], 1, dtype=torch.long)
    out = model(codes, positions, labels)
    return out.code_logits[:, 0].double(), out.pos_logits[:, 0].double()


def test_guidance_adds_a_null_class_and_training_drops_labels_to_it():
    plain = stackformer_config(num_classes=3)
    guided = stackformer_config(num_classes=3, cond_dropout=0.2)
    assert plain.null_class is None and guided.null_class == 3
    assert guided.code_vocab_size == plain.code_vocab_size + 1
    with pytest.raises(ValueError, match="needs a class- or text-conditional model"):
        stackformer_config(num_classes=0, cond_dropout=0.1)
    with pytest.raises(ValueError, match="cond_dropout must be in"):
        fullgrid_config(num_classes=3, cond_dropout=1.0)
    model = Stackformer(stackformer_config(num_classes=3, cond_dropout=0.5))
    codes, positions = random_tokens(4000)
    labels = torch.zeros(4000, dtype=torch.long)
    model.eval()
    ref = model(codes[:, :1], positions[:, :1], labels).code_logits
    model.train()
    model.drop.p = 0.0  # only the label dropout differs between the passes
    for block in model.code_stack.modules():
        if isinstance(block, nn.Dropout):
            block.p = 0.0
    got = model(codes[:, :1], positions[:, :1], labels).code_logits
    dropped = ~torch.isclose(got, ref).all(dim=-1).squeeze(1)
    assert 0.45 < dropped.float().mean() < 0.55  # about cond_dropout of the labels went to the null class
    null_ref = model.eval()(codes[:, :1], positions[:, :1], torch.full_like(labels, 3)).code_logits
    assert torch.allclose(got[dropped], null_ref[dropped], atol=1e-5)


@pytest.mark.parametrize("raster_order", [False, True])
def test_guidance_scale_0_is_unconditional_1_is_conditional_and_cached_equals_uncached(raster_order, monkeypatch):
    model = scrambled(Stackformer(stackformer_config(num_classes=3, cond_dropout=0.1)))
    labels = torch.arange(8) % 3
    null = torch.full_like(labels, 3)

    def draw(scale, lab=labels, use_cache=True, seed=0):
        return model.sample(8, lab, raster_order=raster_order, use_cache=use_cache,
                            generator=torch.Generator().manual_seed(seed), guidance_scale=scale)

    conditional, unconditional = draw(1.0), draw(1.0, lab=null)  # one plain pass each: no null rows, no mixing
    calls = guide_at_scale_1_too(monkeypatch)
    for got, want in ((draw(0.0), unconditional), (draw(1.0), conditional)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert set(calls) == {(16, 0.0), (16, 1.0)}  # both ran on stacked rows through the mixing
    strong = draw(4.0)
    assert not torch.equal(strong[0], conditional[0])  # guidance changes what is drawn
    uncached = draw(4.0, use_cache=False)
    assert torch.equal(strong[0], uncached[0]) and torch.equal(strong[1], uncached[1])
    assert_valid(strong[0], strong[1], 8, N, raster_order)


def test_guidance_extrapolates_both_heads_logits_greedily():
    """Greedy (temperature 0) first token of a guided sample = argmax of l_null + s (l_class - l_null), for the
    code head and, given that code, for the position head."""
    model = scrambled(Stackformer(stackformer_config(num_classes=3, cond_dropout=0.1, seq_len=1)))
    labels = torch.tensor([0, 1, 2])
    greedy = SamplingParams(temperature=0.0)
    s = 3.0
    codes, positions = model.sample(3, labels, greedy, greedy, guidance_scale=s)
    cond_code, _ = _greedy_first_step_logits(model, labels)
    null_code, _ = _greedy_first_step_logits(model, torch.full_like(labels, 3))
    assert torch.equal(codes[:, 0], (null_code + s * (cond_code - null_code))[:, :K].argmax(-1))
    out_c = model(codes, torch.zeros_like(codes), labels).pos_logits[:, 0].double()
    out_n = model(codes, torch.zeros_like(codes), torch.full_like(labels, 3)).pos_logits[:, 0].double()
    assert torch.equal(positions[:, 0], (out_n + s * (out_c - out_n))[:, :P].argmax(-1))


def test_fullgrid_guidance_and_refusals(monkeypatch):
    model = scrambled(FullGridTransformer(fullgrid_config(num_classes=3, cond_dropout=0.1)))
    labels = torch.arange(6) % 3

    def draw(scale, lab=labels, use_cache=True):
        return model.sample(6, lab, use_cache=use_cache, generator=torch.Generator().manual_seed(0),
                            guidance_scale=scale)

    conditional = draw(1.0)
    assert torch.equal(draw(0.0), draw(1.0, lab=torch.full_like(labels, 3)))
    assert torch.equal(draw(2.5), draw(2.5, use_cache=False)) and not torch.equal(draw(2.5), conditional)
    plain = scrambled(Stackformer(stackformer_config(num_classes=3)))
    with pytest.raises(ValueError, match="needs a model trained for classifier-free guidance"):
        plain.sample(2, torch.tensor([0, 1]), guidance_scale=2.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        plain.sample(2, torch.tensor([0, 3]))  # no null class without cond_dropout
    calls = guide_at_scale_1_too(monkeypatch)
    assert torch.equal(draw(1.0), conditional) and set(calls) == {(12, 1.0)}
