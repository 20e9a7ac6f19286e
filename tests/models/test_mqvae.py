"""MQ-VAE, EMA quantizer and stage-1 losses: tiny CPU invariants."""

import ast
import copy
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.losses import LossConfig, NLayerDiscriminator, VQGANLoss, adaptive_gan_weight
from models.mqvae import MQVAE, AdaptiveMasker, AttnBlock, MQVAEConfig
from models.quantizer import EMAVectorQuantizer

R, G, K, D = 16, 8, 32, 16  # image side, latent grid side, codebook size, code dim
P = G * G


def tiny_config(**overrides) -> MQVAEConfig:
    fields = {
        "in_channels": 1,
        "resolution": R,
        "ch": 16,
        "ch_mult": (1, 2),
        "num_res_blocks": 1,
        "dec_num_res_blocks": 1,
        "attn_resolutions": (G,),
        "z_channels": 16,
        "codebook_size": K,
        "codebook_dim": D,
        "keep_ratio": 0.5,
        "demask_layers": 2,
        "norm_groups": 8,
    }
    return MQVAEConfig(**(fields | overrides))


def shapes_batch(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1, R, R] images in {-1, 0, 1}: a random rectangle plus a random disc on a dark background."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")
    y0, x0 = torch.randint(0, R - 6, (2, n, 1, 1), generator=gen)
    h, w = torch.randint(3, 7, (2, n, 1, 1), generator=gen)
    rect = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
    cy, cx = torch.rand(2, n, 1, 1, generator=gen) * (R - 1)
    radius = 2.0 + 2.0 * torch.rand(n, 1, 1, generator=gen)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return (rect.float() + disc.float() - 1.0).unsqueeze(1)


def code_map(codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, P] code per grid cell, -1 where masked."""
    return torch.full((codes.shape[0], P), -1, dtype=torch.long).scatter(1, positions, codes)


# ---------------------------------------------------------------- config


def test_config_derived_properties():
    cfg = tiny_config(keep_ratio=0.3, ch_mult=[1, 2], attn_resolutions=[8])
    assert cfg.ch_mult == (1, 2) and cfg.attn_resolutions == (8,)
    assert (cfg.downsample_factor, cfg.grid_size, cfg.num_positions) == (2, G, P)
    assert cfg.num_kept == round(0.3 * P) == 19
    assert cfg.mask_ratio == pytest.approx(0.7)
    hash(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": 0.999}, "keep_ratio"),
        ({"scorer": "topk"}, "scorer must be one of ('learned', 'random')"),
        ({"demask_key_mask": "medium"}, "demask_key_mask must be one of ('soft', 'hard')"),
        ({"norm_groups": 6}, "norm_groups"),
        ({"attn_resolutions": (5,)}, "attn_resolutions"),
        ({"resolution": 15}, "resolution"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"demask_mask_init": 1.5}, "demask_mask_init"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**overrides)


def test_input_shape_is_validated():
    model = MQVAE(tiny_config())
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 16, 16\]"):
        model(torch.zeros(2, 3, R, R))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, R, R))


# ---------------------------------------------------------------- masking, shapes, ordering


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("training", [True, False])
def test_forward_shapes_and_kept_count(keep_ratio, training):
    torch.manual_seed(0)
    cfg = tiny_config(keep_ratio=keep_ratio)
    model = MQVAE(cfg).train(training)
    b, n = 3, round(keep_ratio * P)
    out = model(shapes_batch(b))

    assert out.reconstruction.shape == (b, 1, R, R)
    assert out.quant_loss.shape == () and out.perplexity.shape == ()
    assert out.keep_mask.shape == (b, P) and out.keep_mask.dtype == torch.bool
    assert out.codes.shape == out.positions.shape == (b, n)
    assert out.codes.dtype == out.positions.dtype == torch.long
    assert out.usage.shape == (K,) and int(out.usage.sum()) == b * n
    assert 1.0 <= float(out.perplexity) <= K + 1e-4
    assert ((out.codes >= 0) & (out.codes < K)).all()

    assert (out.keep_mask.sum(dim=1) == n).all()
    assert (out.positions.diff(dim=1) > 0).all()  # unique and raster order
    assert ((out.positions >= 0) & (out.positions < P)).all()
    assert torch.equal(out.keep_mask, torch.zeros(b, P, dtype=torch.bool).scatter(1, out.positions, True))
    if keep_ratio == 1.0:
        assert out.scores is None and model.masker.score_net is None
        assert torch.equal(out.positions, torch.arange(P).expand(b, -1))
    else:
        assert out.scores.shape == (b, P)


def test_selection_and_codes_match_a_per_image_reference():
    """Top-k of the scores per image, in raster order; codes are the nearest codes of the kept features."""
    torch.manual_seed(1)
    cfg = tiny_config(keep_ratio=0.3)
    model = MQVAE(cfg)
    x = shapes_batch(4, seed=1)
    model(x)  # one training step: EMA codebook and scorer BatchNorm statistics move away from their init
    model.eval()
    out = model(x)
    with torch.no_grad():
        h = model.encoder(x)
        scores = model.masker.score_net(h).flatten(1)
        tokens = F.layer_norm(h.flatten(2).transpose(1, 2), (cfg.z_channels,))
        for i in range(x.shape[0]):
            ranked = sorted(range(P), key=lambda p: -float(scores[i, p]))
            kept = torch.tensor(sorted(ranked[: cfg.num_kept]))
            assert torch.equal(out.positions[i], kept)
            features = model.masker.pre_projection(tokens[i, kept] * scores[i, kept, None])
            codes = torch.cdist(features, model.quantizer.codebook).argmin(dim=1)
            assert torch.equal(out.codes[i], codes)


def test_permuting_grid_cells_permutes_positions_and_codes_consistently():
    """With a pointwise scorer (centre-tap conv) the masker commutes with any permutation of grid cells."""
    torch.manual_seed(2)
    model = MQVAE(tiny_config(keep_ratio=0.4)).eval()
    conv = model.masker.score_net[1]
    with torch.no_grad():
        centre = torch.zeros(3, 3)
        centre[1, 1] = 1.0
        conv.weight.mul_(centre)
        model.masker.score_net[4].bias.fill_(0.3)  # BatchNorm(1) in eval: a monotone affine map
    h = torch.randn(3, 16, G, G)
    perm = torch.randperm(P)
    h_perm = h.flatten(2)[:, :, perm].reshape_as(h)

    def tokens(feature_map):
        masked = model.masker(feature_map)
        codes = model.quantizer(masked.features, update=False).indices
        return masked, code_map(codes, masked.positions)

    masked, codes = tokens(h)
    masked_perm, codes_perm = tokens(h_perm)
    assert torch.equal(masked_perm.keep_mask, masked.keep_mask[:, perm])
    assert torch.equal(codes_perm, codes[:, perm])
    assert (masked_perm.positions.diff(dim=1) > 0).all()
    assert not torch.equal(masked_perm.positions, masked.positions)


# ---------------------------------------------------------------- scorer gradient


@pytest.mark.parametrize("detach_features", [False, True])
def test_scorer_gradient_flows_only_through_scaled_kept_features(detach_features):
    torch.manual_seed(3)
    model = MQVAE(tiny_config(keep_ratio=0.5))
    x = shapes_batch(4, seed=3)
    masked = model.masker(model.encoder(x))
    assert not masked.keep_mask.requires_grad and not masked.positions.is_floating_point()
    features = masked.features.detach() if detach_features else masked.features
    quantized = model.quantizer(features).quantized
    recon = model.decoder(model.demasker(quantized, masked.positions))
    # the loss also reads the mask: it must not open a gradient path to the scorer
    loss = (recon - x).abs().mean() + masked.keep_mask.float().mean() + masked.positions.float().mean()
    loss.backward()

    scorer_grads = [p.grad for p in model.masker.score_net.parameters()]
    assert all(p.grad is not None for p in model.decoder.parameters())  # the loss does backpropagate
    if detach_features:
        assert all(g is None or not g.any() for g in scorer_grads)
    else:
        assert all(g is not None for g in scorer_grads)
        assert any(g.abs().sum() > 0 for g in scorer_grads)


# ---------------------------------------------------------------- de-masker attention


@pytest.mark.parametrize("key_mask", ["soft", "hard"])
def test_demask_key_weights_follow_the_schedule_in_the_forward(key_mask):
    torch.manual_seed(4)
    model = MQVAE(tiny_config(keep_ratio=0.25, demask_layers=4, demask_key_mask=key_mask))
    seen = []
    for attn in model.demasker.attn_blocks:
        attn.register_forward_pre_hook(
            lambda _, args, kwargs: seen.append(kwargs["key_weight"]), with_kwargs=True
        )
    out = model(shapes_batch(2))

    expected = [0.02, 0.1414, 0.3761, 0.6133] if key_mask == "soft" else [0.0] * 4
    schedule = model.demasker.key_mask_schedule(out.keep_mask)
    assert len(seen) == len(schedule) == 4
    for layer, (used, weights) in enumerate(zip(seen, schedule, strict=True)):
        assert torch.equal(used, weights)
        assert (weights[out.keep_mask] == 1.0).all()
        assert torch.allclose(weights[~out.keep_mask], torch.tensor(expected[layer]), atol=1e-4)


@pytest.mark.parametrize("renormalize", [False, True])
def test_masked_attention_equals_post_softmax_key_column_mask(renormalize):
    torch.manual_seed(5)
    block = AttnBlock(16, groups=8)
    x = torch.randn(2, 16, 4, 4)
    m = torch.rand(2, 16)
    m[:, :5] = 1.0
    m[:, 5:8] = 0.0

    q, k, v = block.qkv(block.norm(x)).flatten(2).chunk(3, dim=1)  # [B, C, HW] each
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(16), dim=-1) * m[:, None, :]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    attended = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape_as(x)
    expected = x + block.proj_out(attended)

    assert torch.allclose(block(x, key_weight=m, renormalize=renormalize), expected, atol=1e-5)
    assert torch.allclose(block(x, key_weight=torch.ones(2, 16)), block(x), atol=1e-6)


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_decode_of_encode_equals_eval_reconstruction(keep_ratio):
    torch.manual_seed(6)
    model = MQVAE(tiny_config(keep_ratio=keep_ratio))
    x = shapes_batch(3, seed=6)
    model(x)
    model.eval()
    updates = int(model.quantizer.num_updates)
    out = model(x)
    tokens = model.encode(x)
    assert torch.equal(tokens.codes, out.codes)
    assert torch.equal(tokens.positions, out.positions)
    assert torch.equal(tokens.mask, out.keep_mask)
    assert torch.allclose(model.decode(tokens.codes, tokens.positions), out.reconstruction, atol=1e-5)
    assert int(model.quantizer.num_updates) == updates


def test_random_scorer_keeps_the_count_and_differs_between_images():
    torch.manual_seed(7)
    x = shapes_batch(1).expand(6, -1, -1, -1)
    model = MQVAE(tiny_config(keep_ratio=0.5, scorer="random")).eval()
    assert model.masker.score_net is None
    assert [name for name, _ in model.masker.named_parameters()] == ["pre_projection.weight"]
    tokens = model.encode(x)
    assert (tokens.mask.sum(dim=1) == 32).all()
    assert (tokens.positions.diff(dim=1) > 0).all()
    assert len({tuple(row.tolist()) for row in tokens.positions}) > 1

    learned = MQVAE(tiny_config(keep_ratio=0.5)).eval()
    assert len({tuple(row.tolist()) for row in learned.encode(x).positions}) == 1


def tied_in_bf16_masker() -> tuple[AdaptiveMasker, torch.Tensor]:
    """A learned-scorer masker whose score is ``sigmoid(LN(h)[channel 0])``, and ``h`` [2, z, G, G] whose k-th
    score sits in a group of 4 that differ by ~1e-5 (apart in fp32, one value in bf16): image 0 keeps the group's
    2 highest indices, image 1 its 2 lowest, so no tie-breaking by index gives the fp32 selection for both."""
    cfg = tiny_config(keep_ratio=0.5)
    masker = AdaptiveMasker(cfg).eval()
    _, conv3, _, conv1, _, _ = masker.score_net
    with torch.no_grad():
        for conv in (conv3, conv1):
            conv.weight.zero_()
            conv.bias.zero_()
        conv3.weight[0, 0, 1, 1] = 1.0  # channel 0 at the centre tap
        conv3.bias[0] = 10.0  # all positive through the ReLU...
        conv1.weight[0, 0, 0, 0] = 1.0
        conv1.bias[0] = -10.0  # ...and back
    k = cfg.num_kept
    order = torch.randperm(P, generator=torch.Generator().manual_seed(0))
    group = order[:4].sort().values  # the near-tied cells, in index order
    values = torch.full((2, P), -2.0)
    values[:, order[4:k + 2]] = 2.0  # k - 2 clear winners, then 2 of the group
    step = 1e-5 * torch.arange(4.0)
    values[0, group] = 0.5 + step  # increasing with the index: fp32 keeps the last 2
    values[1, group] = 0.5 - step  # decreasing: fp32 keeps the first 2
    h = torch.zeros(2, cfg.z_channels, G, G)
    h[:, 0] = values.view(2, G, G)
    return masker, h


def test_the_scores_and_their_top_k_are_float32_under_bf16_autocast():
    masker, h = tied_in_bf16_masker()
    want = masker(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = masker(h)
    assert torch.equal(got.positions, want.positions)  # bf16 scores would tie the group: a kept cell changes
    assert want.scores.dtype == got.scores.dtype == torch.float32 and torch.equal(got.scores, want.scores)
    # the group is apart in fp32 and one value in bf16, and fp32 keeps its last 2 cells in image 0, first 2 in 1
    group = (want.scores[0] - want.scores[0, want.positions[0]].min()).abs() < 1e-4
    assert group.sum() == 4 and len(set(want.scores[0, group].tolist())) == 4
    assert len(set(want.scores[:, group].bfloat16().flatten().tolist())) == 1
    kept = want.keep_mask[:, group]
    assert kept.tolist() == [[False, False, True, True], [True, True, False, False]]

    random = AdaptiveMasker(tiny_config(keep_ratio=0.5, scorer="random"))
    torch.manual_seed(3)
    want = random(h)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = random(h.bfloat16())  # the encoder's output under autocast
    assert torch.equal(got.positions, want.positions)
    assert got.scores.dtype == torch.float32 and torch.equal(got.scores, want.scores)


# ---------------------------------------------------------------- quantizer


def test_quantizer_straight_through_and_legacy_loss():
    torch.manual_seed(8)
    quantizer = EMAVectorQuantizer(8, 4, beta=0.25).eval()
    z = torch.randn(3, 5, 4, requires_grad=True)
    out = quantizer(z)
    zq = quantizer.codebook[out.indices]
    assert out.indices.shape == (3, 5)
    assert torch.equal(
        out.indices, torch.cdist(z.detach().reshape(-1, 4), quantizer.codebook).argmin(1).view(3, 5)
    )
    assert torch.allclose(out.quantized, zq, atol=1e-6)
    assert torch.allclose(out.loss, 1.25 * F.mse_loss(z.detach(), zq))
    (grad_st,) = torch.autograd.grad(out.quantized.sum(), z, retain_graph=True)
    assert torch.equal(grad_st, torch.ones_like(z))
    (grad_loss,) = torch.autograd.grad(out.loss, z)  # only the commitment term has a gradient
    assert torch.allclose(grad_loss, 0.25 * 2 * (z.detach() - zq) / z.numel(), atol=1e-7)
    assert not quantizer.codebook.requires_grad and list(quantizer.parameters()) == []


def test_quantizer_updates_ema_exactly_once_per_train_forward_and_never_in_eval():
    torch.manual_seed(9)
    quantizer = EMAVectorQuantizer(8, 4, decay=0.9, restart_threshold=0.0)
    quantizer.cluster_size.uniform_(1.0, 5.0)
    quantizer.embed_sum.normal_()
    z = torch.randn(2, 50, 4)

    def state():
        return [b.clone() for b in (quantizer.codebook, quantizer.cluster_size, quantizer.embed_sum)]

    quantizer.eval()
    before = state()
    quantizer(z)
    quantizer.train()
    quantizer(z, update=False)
    assert all(torch.equal(a, b) for a, b in zip(before, state(), strict=True))
    assert int(quantizer.num_updates) == 0

    codebook0, size0, sum0 = before
    out = quantizer(z)
    flat, idx = z.reshape(-1, 4), out.indices.reshape(-1)
    assert torch.equal(idx, torch.cdist(flat, codebook0).argmin(1))  # assigned with the pre-update codebook
    sums = torch.stack([flat[idx == code].sum(0) for code in range(8)])
    size = 0.9 * size0 + 0.1 * out.usage.float()
    embed_sum = 0.9 * sum0 + 0.1 * sums
    smoothed = (size + 1e-5) / (size.sum() + 8e-5) * size.sum()
    assert int(quantizer.num_updates) == 1
    assert torch.allclose(quantizer.cluster_size, size)
    assert torch.allclose(quantizer.embed_sum, embed_sum, atol=1e-6)
    assert torch.allclose(quantizer.codebook, embed_sum / smoothed[:, None], atol=1e-6)


def test_mqvae_forward_updates_the_codebook_once_per_training_batch():
    model = MQVAE(tiny_config())
    x = shapes_batch(2)
    model(x)
    assert int(model.quantizer.num_updates) == 1
    model(x, update_codebook=False)
    model.eval()
    model(x)
    model.encode(x)
    assert int(model.quantizer.num_updates) == 1
    with pytest.raises(ValueError, match="requires training mode"):
        model(x, update_codebook=True)


def test_dead_code_is_restarted_from_a_batch_vector_and_live_codes_are_not():
    torch.manual_seed(10)
    quantizer = EMAVectorQuantizer(4, 2, decay=0.99)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0]])
    quantizer.codebook.copy_(centres)
    quantizer.cluster_size.copy_(torch.tensor([50.0, 50.0, 50.0, 0.2]))
    quantizer.embed_sum.copy_(centres * quantizer.cluster_size[:, None])
    z = (centres[:3, None, :] + 0.1 * torch.randn(3, 10, 2)).reshape(-1, 2)  # nothing near code 3

    out = quantizer(z)
    assert out.usage.tolist() == [10, 10, 10, 0]
    assert quantizer.cluster_size[3] == 1.0
    assert torch.allclose(quantizer.cluster_size[:3], torch.full((3,), 0.99 * 50 + 0.01 * 10))
    assert torch.cdist(quantizer.codebook[3:], z).min() < 1e-3  # now one of this batch's vectors
    assert torch.allclose(quantizer.codebook[:3], centres[:3], atol=0.05)  # live codes only drift


def test_restart_tiles_a_small_batch_with_noise():
    torch.manual_seed(11)
    quantizer = EMAVectorQuantizer(16, 4)  # fresh: every code is dead at the first update
    z = 3.0 + torch.randn(5, 4)
    quantizer(z)
    assert torch.equal(quantizer.cluster_size, torch.ones(16))
    distance = torch.cdist(quantizer.codebook, z).min(dim=1).values
    assert (distance <= 0.01 + 1e-4).all()  # noise is U(0, 0.01 / sqrt(4)) per coordinate
    assert (distance > 0).all()  # tiled copies are perturbed
    assert len(torch.unique(quantizer.codebook, dim=0)) == 16


class _TwoRankGroup:
    """Simulated process group: two threads exchanging tensors through a barrier."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots = [None, None]
        self.calls = [[], []]

    def _exchange(self, rank, tensor, combine):
        self.calls[rank].append(tuple(tensor.shape))
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        result = combine(self.slots)
        self.barrier.wait()
        return result

    def sync_fns(self, rank):
        return (
            lambda t: self._exchange(rank, t, lambda s: s[0] + s[1]),
            lambda t: self._exchange(rank, t, lambda s: s[0].clone()),
        )

    def run(self, fn):
        """Run ``fn(rank)`` for both ranks concurrently; re-raise the first failure."""

        def target(rank):
            try:
                return fn(rank)
            except BaseException:
                self.barrier.abort()  # release the other rank instead of letting it wait for the timeout
                raise

        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(target, rank) for rank in range(2)]:
                future.result()


@pytest.mark.parametrize("restart_threshold", [1.0, 0.0])
def test_injected_sync_gives_identical_codebooks_on_two_ranks(restart_threshold):
    torch.manual_seed(12)
    quantizers = [EMAVectorQuantizer(16, 4, restart_threshold=restart_threshold)]
    quantizers.append(copy.deepcopy(quantizers[0]))
    unsynced = copy.deepcopy(quantizers)
    single = copy.deepcopy(quantizers[0])
    data = [[torch.randn(24, 4) + 2.0 * (2 * rank - 1) for _ in range(3)] for rank in range(2)]

    group = _TwoRankGroup()
    for rank, quantizer in enumerate(quantizers):
        quantizer.set_sync(*group.sync_fns(rank))
    group.run(lambda rank: [quantizers[rank](z) for z in data[rank]])
    for rank, quantizer in enumerate(unsynced):
        for z in data[rank]:
            quantizer(z)

    assert (
        group.calls[0] == group.calls[1] == [(16, 5), (16, 4)] * 3
    )  # one all-reduce + one broadcast per update
    for name in ("codebook", "cluster_size", "embed_sum"):
        assert torch.equal(getattr(quantizers[0], name), getattr(quantizers[1], name))
    assert not torch.allclose(unsynced[0].codebook, unsynced[1].codebook)
    if restart_threshold == 0.0:  # no restarts: the synced EMA equals one quantizer fed both ranks' data
        for z0, z1 in zip(data[0], data[1], strict=True):
            single(torch.cat([z0, z1]))
        assert torch.allclose(quantizers[0].embed_sum, single.embed_sum, atol=1e-5)
        assert torch.allclose(quantizers[0].codebook, single.codebook, atol=1e-5)


# ---------------------------------------------------------------- losses


def test_adaptive_weight_is_clamped_to_disc_weight_max():
    last = nn.Parameter(torch.randn(4))
    big = adaptive_gan_weight(
        1e3 * (last**2).sum(), 1e-3 * last.sum(), last, disc_weight=0.75, disc_weight_max=1.0
    )
    assert float(big) == 1.0
    small = adaptive_gan_weight(last.sum(), 10.0 * last.sum(), last, disc_weight=0.75, disc_weight_max=1.0)
    assert float(small) == pytest.approx(0.75 * 2.0 / (20.0 + 1e-4))
    capped = adaptive_gan_weight(last.sum(), 10.0 * last.sum(), last, disc_weight=0.75, disc_weight_max=0.05)
    assert float(capped) == pytest.approx(0.05)


def _generator_setup():
    torch.manual_seed(13)
    x = shapes_batch(2)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    recon = conv(x)
    return x, recon, conv.weight, torch.tensor(0.5)


def test_generator_loss_uses_the_clamped_adaptive_weight_and_falls_back_to_zero_in_eval():
    x, recon, last_layer, quant = _generator_setup()
    loss = VQGANLoss(LossConfig(disc_layers=2, disc_ndf=8, disc_weight_max=0.01), in_channels=1)
    total, logs = loss.generator_loss(x, recon, quant, last_layer, step=0)
    assert 0 < float(logs["d_weight"]) <= 0.01
    assert float(logs["g_loss"]) != 0.0
    expected = logs["nll"] + logs["d_weight"] * logs["g_loss"] + quant
    assert torch.allclose(total.detach(), expected)
    total.backward()
    assert last_layer.grad is not None

    loss.eval()
    _, eval_logs = loss.generator_loss(x, F.conv2d(x, last_layer, padding=1), quant, last_layer, step=0)
    assert float(eval_logs["d_weight"]) == 0.0
    loss.train()
    with torch.no_grad():
        _, no_grad_logs = loss.generator_loss(
            x, F.conv2d(x, last_layer, padding=1), quant, last_layer, step=0
        )
    assert float(no_grad_logs["d_weight"]) == 0.0


def test_gan_terms_are_zero_before_disc_start():
    x, recon, last_layer, quant = _generator_setup()
    loss = VQGANLoss(LossConfig(disc_start=100, disc_layers=2, disc_ndf=8), in_channels=1)
    assert not loss.is_gan_active(99) and loss.is_gan_active(100)

    total, logs = loss.generator_loss(x, recon, quant, last_layer, step=99)
    assert float(logs["g_loss"]) == 0.0 and float(logs["d_weight"]) == 0.0
    assert torch.allclose(total, (x - recon).abs().mean() + quant)
    d_loss, d_logs = loss.discriminator_loss(x, recon.detach(), step=99)
    assert float(d_loss) == 0.0 and not d_loss.requires_grad and float(d_logs["d_loss"]) == 0.0

    d_loss, _ = loss.discriminator_loss(x, recon.detach(), step=100)
    assert d_loss.requires_grad and float(d_loss.detach()) > 0.0
    _, logs = loss.generator_loss(x, recon, quant, last_layer, step=100)
    assert float(logs["g_loss"]) != 0.0 and float(logs["d_weight"]) > 0.0


class _MeanSquaredDistance(nn.Module):
    def forward(self, x, y):
        return ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def test_perceptual_weight_requires_a_module():
    with pytest.raises(ValueError, match="LPIPS/VGG weights must be provided"):
        VQGANLoss(LossConfig(perceptual_weight=1.0), in_channels=1)
    x, recon, last_layer, quant = _generator_setup()
    loss = VQGANLoss(
        LossConfig(perceptual_weight=0.5, disc_start=10, disc_layers=2, disc_ndf=8),
        1,
        perceptual=_MeanSquaredDistance(),
    )
    _, logs = loss.generator_loss(x, recon, quant, last_layer, step=0)
    assert torch.allclose(logs["perceptual"], F.mse_loss(recon.detach(), x))
    assert torch.allclose(logs["nll"], logs["l1"] + 0.5 * logs["perceptual"])


def test_patchgan_discriminator_shape_and_init():
    torch.manual_seed(14)
    disc = NLayerDiscriminator(3, ndf=64, num_layers=3)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and len(norms) == 3
    weights = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(float(weights.std()) - 0.02) < 0.002
    bn_weights = torch.cat([n.weight.detach() for n in norms])
    assert (
        abs(float(bn_weights.mean()) - 1.0) < 0.01
        and (torch.cat([n.bias.detach() for n in norms]) == 0).all()
    )


# ---------------------------------------------------------------- training


def test_tiny_mqvae_overfits_64_images():
    torch.manual_seed(15)
    x = shapes_batch(64, seed=15)
    model = MQVAE(tiny_config(keep_ratio=0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))

    def eval_l1():
        model.eval()
        with torch.no_grad():
            error = (model(x).reconstruction - x).abs().mean().item()
        model.train()
        return error

    initial = eval_l1()
    best_constant_image = (x - x.median(dim=0).values).abs().mean().item()
    for _ in range(80):
        out = model(x)
        loss = (out.reconstruction - x).abs().mean() + out.quant_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = eval_l1()
    assert final < initial / 4, (initial, final)
    assert final < 0.75 * best_constant_image, (best_constant_image, final)  # more than the background


# ---------------------------------------------------------------- purity


MODEL_FILES = sorted((Path(__file__).parents[2] / "models").glob("*.py"))


@pytest.mark.parametrize("source", MODEL_FILES, ids=lambda p: p.name)
def test_model_files_import_only_torch_and_stdlib(source: Path) -> None:
    tree = ast.parse(source.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    allowed = {"torch", "models", "__future__"} | set(sys.stdlib_module_names)
    assert roots <= allowed, roots - allowed


# --------------------------------------------------------------------------------------------- the VQGAN baseline


def test_the_vqgan_baseline_has_no_masker_nor_demasker_and_codes_the_full_grid() -> None:
    torch.manual_seed(0)
    vqgan = MQVAE(tiny_config(architecture="vqgan", keep_ratio=1.0)).eval()
    ablation = MQVAE(tiny_config(keep_ratio=1.0)).eval()  # keep 1.0 with the de-masker: a separate row
    assert not hasattr(vqgan, "masker") and not hasattr(vqgan, "demasker")
    names = {n.split(".")[0] for n, _ in vqgan.named_parameters()}
    assert {"encoder", "quant_conv", "head", "decoder"} <= names <= {"encoder", "quant_conv", "quantizer", "head",
                                                                     "decoder"}
    assert sum(p.numel() for p in vqgan.parameters()) < sum(p.numel() for p in ablation.parameters())
    x = torch.rand(3, 1, R, R) * 2 - 1
    out = vqgan(x)
    assert out.reconstruction.shape == x.shape and out.scores is None and bool(out.keep_mask.all())
    tokens = vqgan.encode(x)
    assert torch.equal(tokens.positions, torch.arange(P).expand(3, P)) and tokens.codes.shape == (3, P)
    assert torch.equal(tokens.codes, out.codes)
    # decoding the codes of an image gives the forward pass's reconstruction (eval mode, no codebook update)
    torch.testing.assert_close(vqgan.decode(tokens.codes, tokens.positions), out.reconstruction)
    with pytest.raises(ValueError, match="full grids only"):
        vqgan.decode(tokens.codes[:, :P // 2], tokens.positions[:, :P // 2])


def test_the_vqgan_baseline_refuses_a_mask_and_trains() -> None:
    with pytest.raises(ValueError, match="keep_ratio must be 1.0"):
        tiny_config(architecture="vqgan", keep_ratio=0.5)
    with pytest.raises(ValueError, match="architecture must be one of"):
        tiny_config(architecture="vq")
    torch.manual_seed(0)
    model = MQVAE(tiny_config(architecture="vqgan", keep_ratio=1.0)).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.rand(8, 1, R, R) * 2 - 1
    losses = []
    for _ in range(30):
        out = model(x)
        loss = (out.reconstruction - x).abs().mean() + out.quant_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    assert model.quant_conv.weight.grad is not None and model.head.conv_in.weight.grad is not None


def test_the_modules_are_built_in_the_order_that_fixes_a_seeds_initialisation() -> None:
    # reordering the constructor changes every weight drawn for a seed: the same config and stage key would then
    # train a different model
    assert [n for n, _ in MQVAE(tiny_config()).named_children()] == [
        "encoder", "masker", "quantizer", "demasker", "decoder"]
    assert [n for n, _ in MQVAE(tiny_config(architecture="vqgan", keep_ratio=1.0)).named_children()] == [
        "encoder", "quant_conv", "quantizer", "head", "decoder"]
