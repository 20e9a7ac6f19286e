"""The configs of the tokenizer's model and losses: plain, validated dataclasses without torch, so that the
pipeline's configuration (``infra/config.py``) nests them and light processes (ingest workers, the CLI) read
them without importing torch. ``models.mqvae`` and ``models.losses`` re-export them beside the modules they
configure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Architecture = Literal["mqvae", "vqgan"]
Scorer = Literal["learned", "random"]
KeyMask = Literal["soft", "hard"]
_SCORERS = get_args(Scorer)
_ARCHITECTURES = get_args(Architecture)
_KEY_MASKS = get_args(KeyMask)


@dataclass(frozen=True, kw_only=True)
class MQVAEConfig:
    """Architecture of the MQ-VAE; validated on construction (``ValueError`` naming the field).

    The defaults are the released f16 configuration (256 px RGB, 16x16 grid, keep 75 %, 8 de-mask layers);
    the pipeline's presets set only what differs from them.

    Attributes:
        architecture: "mqvae" (adaptive mask + de-mask modules) or "vqgan": the plain VQGAN baseline the paper
            compares with (encoder -> 1x1 quant_conv -> quantizer -> 1x1 post_quant_conv -> the decoder with its
            own conv_in and mid block, as in taming); no masker, no de-masker; ``keep_ratio`` must be 1.
        in_channels: image channels.
        resolution: image height = width, in pixels.
        ch: base channel count; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: channel multipliers per level; ``len(ch_mult) - 1`` stride-2 downsamples.
        num_res_blocks: ResnetBlocks per encoder level.
        dec_num_res_blocks: ResnetBlocks per decoder level (the literal count: taming's decoder uses
            ``num_res_blocks + 1``, i.e. 3 in the reference config).
        attn_resolutions: feature-map sizes (pixels per side) at which encoder/decoder levels add attention.
        z_channels: encoder output channels.
        codebook_size: number of codes K.
        codebook_dim: code dimension (the masker's bias-free pre-projection maps z_channels to it).
        keep_ratio: fraction of latent positions kept and quantized, in (0, 1]; 1 = the no-masking ablation
            (every position kept; the de-masker still runs: the plain baseline is ``architecture="vqgan"``).
        scorer: "learned" (content-aware score network) or "random" (uniform scores, ablation).
        demask_layers: (ResnetBlock + direction-constrained attention) layers in the de-masker.
        demask_mask_init: masked-key attention weight at the first de-masker layer (soft mode).
        demask_key_mask: "soft" (weights grow as m <- sqrt(m) per layer) or "hard" (masked keys stay 0).
        demask_renormalize: renormalise attention rows after the key mask (the reference does not).
        norm_groups: GroupNorm groups (``min(norm_groups, channels)`` must divide every channel count).
        dropout: dropout inside ResnetBlocks.
        beta: commitment weight of the quantizer.
        ema_decay: EMA decay of the codebook.
    """

    architecture: Architecture = "mqvae"
    in_channels: int = 3
    resolution: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dec_num_res_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    codebook_size: int = 1024
    codebook_dim: int = 256
    keep_ratio: float = 0.75
    scorer: Scorer = "learned"
    demask_layers: int = 8
    demask_mask_init: float = 0.02
    demask_key_mask: KeyMask = "soft"
    demask_renormalize: bool = False
    norm_groups: int = 32
    dropout: float = 0.0
    beta: float = 0.25
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        # Config files deliver lists; store tuples so the config stays hashable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in (
            "in_channels",
            "resolution",
            "ch",
            "num_res_blocks",
            "dec_num_res_blocks",
            "z_channels",
            "codebook_size",
            "codebook_dim",
            "norm_groups",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if self.resolution % self.downsample_factor != 0:
            raise ValueError(
                f"resolution ({self.resolution}) must be divisible by the downsample factor "
                f"{self.downsample_factor} = 2 ** (len(ch_mult) - 1)"
            )
        level_sizes = tuple(self.resolution // 2**i for i in range(len(self.ch_mult)))
        bad_attn = [r for r in self.attn_resolutions if r not in level_sizes]
        if bad_attn:
            raise ValueError(
                f"attn_resolutions {bad_attn} are not level sizes; allowed values: {level_sizes}"
            )
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(
                f"keep_ratio (fraction of positions kept) must be in (0, 1], got {self.keep_ratio}"
            )
        if self.num_kept < 1:
            raise ValueError(
                f"keep_ratio {self.keep_ratio} keeps round({self.keep_ratio} * {self.num_positions}) = 0 "
                "positions"
            )
        if self.keep_ratio < 1.0 and self.num_kept == self.num_positions:
            raise ValueError(
                f"keep_ratio {self.keep_ratio} < 1 rounds to all {self.num_positions} positions; "
                "use keep_ratio = 1.0 for the plain-VQ baseline"
            )
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(f"architecture must be one of {_ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "vqgan" and self.keep_ratio != 1.0:
            raise ValueError(f"architecture 'vqgan' codes every position: keep_ratio must be 1.0, got "
                             f"{self.keep_ratio}")
        if self.scorer not in _SCORERS:
            raise ValueError(f"scorer must be one of {_SCORERS}, got {self.scorer!r}")
        if self.demask_layers < 0:
            raise ValueError(f"demask_layers must be >= 0, got {self.demask_layers}")
        if not 0.0 <= self.demask_mask_init <= 1.0:
            raise ValueError(f"demask_mask_init must be in [0, 1], got {self.demask_mask_init}")
        if self.demask_key_mask not in _KEY_MASKS:
            raise ValueError(f"demask_key_mask must be one of {_KEY_MASKS}, got {self.demask_key_mask!r}")
        for channels in sorted({self.ch * m for m in (1, *self.ch_mult)}):
            if channels % min(self.norm_groups, channels) != 0:
                raise ValueError(
                    f"norm_groups={self.norm_groups} does not divide {channels} channels "
                    f"(GroupNorm uses min(norm_groups, channels) groups)"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def mask_ratio(self) -> float:
        """Fraction of latent positions masked (dropped): ``1 - keep_ratio``."""
        return 1.0 - self.keep_ratio

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Latent grid side g."""
        return self.resolution // self.downsample_factor

    @property
    def num_positions(self) -> int:
        """Latent positions g * g."""
        return self.grid_size**2

    @property
    def num_kept(self) -> int:
        """Kept (quantized) positions per image: ``round(keep_ratio * g * g)``."""
        return round(self.keep_ratio * self.num_positions)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Loss weights and discriminator settings (defaults follow the reference except perceptual_weight).

    Attributes:
        l1_weight: weight of mean |x - x_hat|.
        perceptual_weight: weight of the perceptual distance; 0 by default because no LPIPS/VGG weights ship.
        disc_start: first step (inclusive) at which the GAN terms are active.
        disc_weight: multiplier of the adaptive generator weight.
        disc_weight_max: upper clamp of the adaptive generator weight (after multiplying by disc_weight).
        disc_factor: multiplier of both GAN terms once active.
        disc_layers: number of stride-2 conv layers of the PatchGAN discriminator.
        disc_ndf: width of the first discriminator layer.
        codebook_weight: weight of the quantizer loss.
    """

    l1_weight: float = 1.0
    perceptual_weight: float = 0.0
    disc_start: int = 0
    disc_weight: float = 0.75
    disc_weight_max: float = 1.0
    disc_factor: float = 1.0
    disc_layers: int = 3
    disc_ndf: int = 64
    codebook_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "l1_weight",
            "perceptual_weight",
            "disc_start",
            "disc_weight",
            "disc_weight_max",
            "disc_factor",
            "codebook_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("disc_layers", "disc_ndf"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
