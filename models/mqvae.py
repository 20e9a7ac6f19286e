"""MQ-VAE: masked vector quantization (stage 1 of "Not All Image Regions Matter", CVPR 2023).

Pipeline (shapes for a batch of B images, latent grid g x g, N = ``cfg.num_kept`` kept positions):

    x [B, C_in, R, R] --Encoder--> h [B, z_channels, g, g]
      --AdaptiveMasker--> kept features [B, N, codebook_dim] at raster-sorted positions [B, N]
      --EMAVectorQuantizer--> codes [B, N]
      --AdaptiveDemasker--> [B, ch * ch_mult[-1], g, g] --Decoder--> reconstruction [B, C_in, R, R]

``keep_ratio`` is the fraction of latent positions that are kept and quantized;
``mask_ratio = 1 - keep_ratio``.
With ``keep_ratio == 1`` the masker is bypassed and the model is the keep-1.0 ablation sharing every other
module (the de-masker included). ``architecture="vqgan"`` is the plain VQGAN baseline instead: no masker and no
de-masker (encoder -> quant_conv -> quantizer -> post_quant_conv -> conv_in + mid block -> decoder, as in
taming). All masking, gathering and scattering is batched; there are no per-sample Python loops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import KeyMask, MQVAEConfig, Scorer  # noqa: F401  (the model's config, re-exported)
from models.quantizer import EMAVectorQuantizer, SyncFn


class TokenSeq(NamedTuple):
    """Discrete representation of a batch of images.

    codes:     ``[B, N]`` long code indices, in the order of ``positions``.
    positions: ``[B, N]`` long flat grid positions (row-major), strictly increasing along N.
    mask:      ``[B, g * g]`` bool, True where a position is kept.
    """

    codes: Tensor
    positions: Tensor
    mask: Tensor


class MQVAEOutput(NamedTuple):
    """Result of :meth:`MQVAE.forward`.

    reconstruction: ``[B, C_in, R, R]``.
    quant_loss:     ``[]`` quantizer loss (see :class:`models.quantizer.EMAVectorQuantizer`).
    keep_mask:      ``[B, g * g]`` bool, True = kept.
    scores:         ``[B, g * g]`` scorer output (not detached), or None when the masker is bypassed.
    codes:          ``[B, N]`` long, raster order.
    positions:      ``[B, N]`` long, strictly increasing.
    perplexity:     ``[]`` codebook perplexity of this batch.
    usage:          ``[codebook_size]`` long per-code counts of this batch.
    """

    reconstruction: Tensor
    quant_loss: Tensor
    keep_mask: Tensor
    scores: Tensor | None
    codes: Tensor
    positions: Tensor
    perplexity: Tensor
    usage: Tensor


class MaskerOutput(NamedTuple):
    """Result of :meth:`AdaptiveMasker.forward`.

    features:  ``[B, N, codebook_dim]`` pre-projected kept features, raster order.
    positions: ``[B, N]`` long, strictly increasing.
    keep_mask: ``[B, g * g]`` bool.
    scores:    ``[B, g * g]`` or None when bypassed.
    """

    features: Tensor
    positions: Tensor
    keep_mask: Tensor
    scores: Tensor | None


def to_model_input(images_u8: Tensor, device: torch.device | str) -> Tensor:
    """uint8 images ``[B, C, H, W]`` in [0, 255] -> float model input in [-1, 1] on ``device``."""
    return images_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def positions_to_mask(positions: Tensor, num_positions: int) -> Tensor:
    """Boolean keep mask ``[B, num_positions]`` with True at ``positions`` ``[B, N]``."""
    mask = torch.zeros(positions.shape[0], num_positions, dtype=torch.bool, device=positions.device)
    return mask.scatter_(1, positions, True)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``min(groups, channels)`` groups and the taming epsilon."""
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice (dropout before the second conv), residual; 1x1 shortcut when the
    width changes.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (taming style): GroupNorm, 1x1 q/k/v, softmax, proj_out, residual.

    ``[B, C, H, W] -> [B, C, H, W]``. The optional ``key_weight`` ``[B, H * W]`` multiplies the post-softmax
    attention column of each key, for every query: ``out_i = sum_j softmax_j(q_i . k_j / sqrt(C)) m_j v_j``.
    Because the factor depends only on j it is folded into the values, ``softmax(QK^T) @ (m * V)``, so the
    fused ``F.scaled_dot_product_attention`` kernel is used either way. With ``renormalize`` each row is
    divided by ``sum_j softmax_ij m_j``, obtained from the same call through one extra value channel (m).
    """

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, key_weight: Tensor | None = None, renormalize: bool = False) -> Tensor:
        b, c, height, width = x.shape
        # [B, 3C, H, W] -> three [B, 1, HW, C] (one head)
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        if key_weight is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            m = key_weight.to(v.dtype)[:, None, :, None]  # [B, 1, HW, 1]
            if renormalize:
                out = F.scaled_dot_product_attention(q, k, torch.cat([v * m, m], dim=-1))
                out = out[..., :c] / out[..., c:]
            else:
                out = F.scaled_dot_product_attention(q, k, v * m)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3 with asymmetric (0, 1, 0, 1) padding: ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """VQGAN/taming encoder without quant_conv: ``[B, in_channels, R, R] -> [B, z_channels, g, g]``.

    conv_in; per level ``num_res_blocks`` ResnetBlocks (each followed by attention when the level size is in
    ``attn_resolutions``) and a downsample except at the last level; mid Res-Attn-Res; GroupNorm, swish,
    conv_out.
    """

    def __init__(self, cfg: MQVAEConfig) -> None:
        super().__init__()
        groups, dropout = cfg.norm_groups, cfg.dropout
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = []
        block_in, size = cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            layers: list[nn.Module] = []
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(block_in, cfg.ch * mult, dropout=dropout, groups=groups))
                block_in = cfg.ch * mult
                if size in cfg.attn_resolutions:
                    layers.append(AttnBlock(block_in, groups=groups))
            if level != len(cfg.ch_mult) - 1:
                layers.append(Downsample(block_in))
                size //= 2
            levels.append(nn.Sequential(*layers))
        self.down = nn.Sequential(*levels)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout=dropout, groups=groups),
            AttnBlock(block_in, groups=groups),
            ResnetBlock(block_in, block_in, dropout=dropout, groups=groups),
        )
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Taming decoder without conv_in and mid block (the de-masker owns conv_in).

    ``[B, ch * ch_mult[-1], g, g] -> [B, in_channels, R, R]``: per level, from the coarsest,
    ``dec_num_res_blocks`` ResnetBlocks (+ attention at ``attn_resolutions``) and an upsample except at the
    finest level; GroupNorm, swish, conv_out.
    """

    def __init__(self, cfg: MQVAEConfig) -> None:
        super().__init__()
        groups, dropout = cfg.norm_groups, cfg.dropout
        levels = []
        block_in, size = cfg.ch * cfg.ch_mult[-1], cfg.grid_size
        for level in reversed(range(len(cfg.ch_mult))):
            layers: list[nn.Module] = []
            for _ in range(cfg.dec_num_res_blocks):
                layers.append(
                    ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level], dropout=dropout, groups=groups)
                )
                block_in = cfg.ch * cfg.ch_mult[level]
                if size in cfg.attn_resolutions:
                    layers.append(AttnBlock(block_in, groups=groups))
            if level != 0:
                layers.append(Upsample(block_in))
                size *= 2
            levels.append(nn.Sequential(*layers))
        self.up = nn.Sequential(*levels)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv, where the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.up(h))))


class AdaptiveMasker(nn.Module):
    """Scores the latent positions and keeps the top ``num_kept`` per image.

    ``h [B, z_channels, g, g] -> MaskerOutput``.

    * Learned scorer: LayerNorm over (C, H, W) without affine, conv3x3, ReLU, conv1x1 to 1 channel,
      BatchNorm2d(1), sigmoid -> scores in (0, 1). Random scorer: U(0, 1) scores, no parameters, drawn
      afresh on every call (also in eval mode).
    * Selection: top-k of the *detached* scores per image, then sorted ascending (raster order); top-k and the
      mask carry no gradient.
    * Features: per-token LayerNorm (no affine) of the kept tokens, times their non-detached score (learned
      scorer only: this product is the scorer's only gradient path; the random scorer does not scale), then
      ``pre_projection`` (bias-free Linear z_channels -> codebook_dim).
    * ``keep_ratio == 1`` (the config forbids ratios < 1 that round to every position): bypassed; no scorer
      is built, every position is kept and features are ``pre_projection(LN(h_token))`` without score
      scaling, so the model is the no-masking ablation: VQ with the same encoder, de-masker and decoder (the
      plain VQGAN baseline, without the de-masker, is ``architecture="vqgan"``).
    """

    def __init__(self, cfg: MQVAEConfig) -> None:
        super().__init__()
        self.num_positions = cfg.num_positions
        self.num_kept = cfg.num_kept
        self.bypass = cfg.num_kept == cfg.num_positions
        self.score_net: nn.Sequential | None = None
        if not self.bypass and cfg.scorer == "learned":
            g = cfg.grid_size
            self.score_net = nn.Sequential(
                nn.LayerNorm([cfg.z_channels, g, g], elementwise_affine=False),
                nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(cfg.z_channels, 1, 1),
                nn.BatchNorm2d(1),
                nn.Sigmoid(),
            )
        self.pre_projection = nn.Linear(cfg.z_channels, cfg.codebook_dim, bias=False)

    def forward(self, h: Tensor) -> MaskerOutput:
        b, c = h.shape[:2]
        tokens = h.flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.bypass:
            positions = torch.arange(self.num_positions, device=h.device).repeat(b, 1)
            features = F.layer_norm(tokens, (c,))
            keep_mask = torch.ones(b, self.num_positions, dtype=torch.bool, device=h.device)
            return MaskerOutput(self.pre_projection(features), positions, keep_mask, None)

        # scores in fp32 also under bf16 autocast: bf16 scores tie at the k-th value, and ties would then be
        # broken by index in training but not in fp32 tokenisation
        if self.score_net is not None:
            with torch.autocast(h.device.type, enabled=False):
                scores = self.score_net(h.float()).flatten(1)  # [B, HW]
        else:
            scores = torch.rand(b, self.num_positions, device=h.device, dtype=torch.float32)
        positions = scores.detach().topk(self.num_kept, dim=1).indices.sort(dim=1).values  # [B, N]
        kept = F.layer_norm(tokens.gather(1, positions.unsqueeze(-1).expand(-1, -1, c)), (c,))
        if self.score_net is not None:
            kept = kept * scores.gather(1, positions).unsqueeze(-1)
        keep_mask = positions_to_mask(positions, self.num_positions)
        return MaskerOutput(self.pre_projection(kept), positions, keep_mask, scores)


class AdaptiveDemasker(nn.Module):
    """Rebuilds the full latent grid from the kept code vectors.

    ``(quantized [B, N, codebook_dim], positions [B, N]) -> [B, ch * ch_mult[-1], g, g]``.

    A canvas holding one learnable mask token (init U(+-1/codebook_dim)) everywhere receives the quantized
    vectors at their positions; then 1x1 ``post_projection``, 3x3 ``conv_in`` (the decoder's), and
    ``demask_layers`` x (ResnetBlock, direction-constrained attention), then one ResnetBlock. No positional
    embedding: position enters only through the convolutions' zero padding.

    Direction-constrained attention multiplies every key column j, for all queries, by m_j after the softmax
    (see :meth:`key_mask_schedule`); with the default (soft, no renormalisation) rows sum to less than 1 and
    information flows mostly from kept to masked positions.
    """

    def __init__(self, cfg: MQVAEConfig) -> None:
        super().__init__()
        self.grid_size = cfg.grid_size
        self.mask_init = cfg.demask_mask_init
        self.hard = cfg.demask_key_mask == "hard"
        self.renormalize = cfg.demask_renormalize
        dim, block_in = cfg.codebook_dim, cfg.ch * cfg.ch_mult[-1]
        groups, dropout = cfg.norm_groups, cfg.dropout
        self.mask_token = nn.Parameter(torch.empty(dim).uniform_(-1.0 / dim, 1.0 / dim))
        self.post_projection = nn.Conv2d(dim, dim, 1)
        self.conv_in = nn.Conv2d(dim, block_in, 3, padding=1)
        self.res_blocks = nn.ModuleList(
            ResnetBlock(block_in, block_in, dropout=dropout, groups=groups) for _ in range(cfg.demask_layers)
        )
        self.attn_blocks = nn.ModuleList(AttnBlock(block_in, groups=groups) for _ in range(cfg.demask_layers))
        self.res_out = ResnetBlock(block_in, block_in, dropout=dropout, groups=groups)

    def key_mask_schedule(self, keep_mask: Tensor) -> list[Tensor]:
        """Per-layer key weights m, one ``[B, g * g]`` float tensor per de-mask layer.

        Kept positions: 1. Masked positions: soft mode ``mask_init`` at layer 1 and ``m <- sqrt(m)`` after
        each layer (0.02, 0.141, 0.376, 0.613, ...); hard mode 0 in every layer.
        """
        masked_weight = 0.0 if self.hard else self.mask_init
        weights = []
        for _ in range(len(self.attn_blocks)):
            weights.append(torch.where(keep_mask, 1.0, masked_weight))
            if not self.hard:
                masked_weight = math.sqrt(masked_weight)
        return weights

    def forward(self, quantized: Tensor, positions: Tensor) -> Tensor:
        b, _, dim = quantized.shape
        g = self.grid_size
        canvas = self.mask_token.to(quantized.dtype).expand(b, g * g, dim)
        canvas = canvas.scatter(1, positions.unsqueeze(-1).expand(-1, -1, dim), quantized)  # [B, HW, D]
        h = canvas.transpose(1, 2).reshape(b, dim, g, g)
        h = self.conv_in(self.post_projection(h))
        key_weights = self.key_mask_schedule(positions_to_mask(positions, g * g))
        for res, attn, key_weight in zip(self.res_blocks, self.attn_blocks, key_weights, strict=True):
            h = attn(res(h), key_weight=key_weight, renormalize=self.renormalize)
        return self.res_out(h)


class PlainHead(nn.Module):
    """The VQGAN path between the quantizer and the decoder's upsampling levels (taming's ``post_quant_conv`` and
    the decoder's ``conv_in`` + mid block): ``[B, g * g, codebook_dim]`` (all positions, raster order) ->
    ``[B, ch * ch_mult[-1], g, g]``."""

    def __init__(self, cfg: MQVAEConfig) -> None:
        super().__init__()
        self.grid_size = cfg.grid_size
        block_in, groups, dropout = cfg.ch * cfg.ch_mult[-1], cfg.norm_groups, cfg.dropout
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout=dropout, groups=groups),
            AttnBlock(block_in, groups=groups),
            ResnetBlock(block_in, block_in, dropout=dropout, groups=groups),
        )

    def forward(self, quantized: Tensor) -> Tensor:
        b, _, dim = quantized.shape
        h = quantized.transpose(1, 2).reshape(b, dim, self.grid_size, self.grid_size)
        return self.mid(self.conv_in(self.post_quant_conv(h)))


class MQVAE(nn.Module):
    """Masked-VQ autoencoder: Encoder, AdaptiveMasker, EMAVectorQuantizer, AdaptiveDemasker, Decoder.

    Input images are in [-1, 1] with shape ``[B, in_channels, resolution, resolution]``.
    """

    def __init__(self, cfg: MQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # built in this order (it fixes the random initialisation of a seed: do not reorder)
        self.encoder = Encoder(cfg)
        self.plain = cfg.architecture == "vqgan"
        if self.plain:
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        else:
            self.masker = AdaptiveMasker(cfg)
        self.quantizer = EMAVectorQuantizer(
            cfg.codebook_size, cfg.codebook_dim, decay=cfg.ema_decay, beta=cfg.beta
        )
        if self.plain:
            self.head = PlainHead(cfg)
        else:
            self.demasker = AdaptiveDemasker(cfg)
        self.decoder = Decoder(cfg)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's final conv weight (for the adaptive GAN weight)."""
        return self.decoder.last_layer

    def set_codebook_sync(self, all_reduce_sum: SyncFn, broadcast_from_rank0: SyncFn) -> None:
        """Inject the codebook collectives; see :meth:`EMAVectorQuantizer.set_sync`."""
        self.quantizer.set_sync(all_reduce_sum, broadcast_from_rank0)

    def forward(self, x: Tensor, update_codebook: bool | None = None) -> MQVAEOutput:
        """Reconstruct ``x`` ``[B, C_in, R, R]``; see :class:`MQVAEOutput`.

        ``update_codebook``: None (default) updates the EMA codebook exactly once iff in training mode;
        False never updates; True requires training mode. Call this once per training batch and run the
        discriminator step on ``reconstruction.detach()``, never on a second forward.
        """
        self._check_input(x)
        if update_codebook and not self.training:
            raise ValueError("update_codebook=True requires training mode (call .train())")
        update = self.training if update_codebook is None else update_codebook
        masked = self._select(self.encoder(x))
        quant = self.quantizer(masked.features, update=update)
        reconstruction = self.decoder(self._expand(quant.quantized, masked.positions))
        return MQVAEOutput(
            reconstruction=reconstruction,
            quant_loss=quant.loss,
            keep_mask=masked.keep_mask,
            scores=masked.scores,
            codes=quant.indices,
            positions=masked.positions,
            perplexity=quant.perplexity,
            usage=quant.usage,
        )

    @torch.no_grad()
    def encode(self, x: Tensor) -> TokenSeq:
        """Tokenise ``x`` ``[B, C_in, R, R]`` -> TokenSeq(codes [B, N], positions [B, N], mask [B, g * g]).

        Never updates the codebook. Selection uses the current mode: call ``.eval()`` first so the scorer's
        BatchNorm uses running statistics (the reference encodes with a frozen, eval-mode first stage).
        """
        self._check_input(x)
        masked = self._select(self.encoder(x))
        quant = self.quantizer(masked.features, update=False)
        return TokenSeq(codes=quant.indices, positions=masked.positions, mask=masked.keep_mask)

    def decode(self, codes: Tensor, positions: Tensor) -> Tensor:
        """Images ``[B, C_in, R, R]`` from ``codes`` and their flat ``positions`` (both ``[B, N]`` long).

        Raw codebook vectors go into the de-masker (no pre-projection, no score). Positions must be unique
        per row; any N in [1, g * g] is accepted.
        """
        if codes.shape != positions.shape or codes.ndim != 2:
            raise ValueError(
                "codes and positions must both be [B, N]; "
                f"got {tuple(codes.shape)} and {tuple(positions.shape)}"
            )
        if not 1 <= codes.shape[1] <= self.cfg.num_positions:
            raise ValueError(f"N must be in [1, {self.cfg.num_positions}], got {codes.shape[1]}")
        if self.plain and (codes.shape[1] != self.cfg.num_positions or not torch.equal(
                positions, torch.arange(self.cfg.num_positions, device=positions.device).expand_as(positions))):
            raise ValueError("the vqgan tokenizer decodes full grids only: positions must be 0 .. g*g-1 in order")
        return self.decoder(self._expand(self.quantizer.lookup(codes), positions))

    def _select(self, h: Tensor) -> MaskerOutput:
        """The encoder's grid -> the features to quantize (the masker's kept tokens, or every position)."""
        if not self.plain:
            return self.masker(h)
        b = h.shape[0]
        n = self.cfg.num_positions
        features = self.quant_conv(h).flatten(2).transpose(1, 2)  # [B, g*g, codebook_dim]
        positions = torch.arange(n, device=h.device).repeat(b, 1)
        return MaskerOutput(features, positions, torch.ones(b, n, dtype=torch.bool, device=h.device), None)

    def _expand(self, quantized: Tensor, positions: Tensor) -> Tensor:
        """Quantized vectors at ``positions`` -> the decoder's input grid."""
        return self.head(quantized) if self.plain else self.demasker(quantized, positions)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.cfg.in_channels, self.cfg.resolution, self.cfg.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}"
            )
