"""Pure image and code-usage math shared by the stages: per-image L1, PSNR and SSIM on [0, 1] pixels, and the
perplexity / usage of a code histogram. Pure torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def l1_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel error per image, pixels in [0, 1] (uint8 inputs are scaled by 1/255)."""
    return (_to_unit(x) - _to_unit(y)).abs().flatten(1).mean(1)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, peak 1 on [0, 1] pixels (MSE floored at 1e-10: identical images give 100 dB)."""
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004): Gaussian window 11 / sigma 1.5, K1 0.01, K2 0.03, range [0, 1].

    Computed per channel over the 'valid' window positions and averaged; the window shrinks (odd) for images
    smaller than it.
    """
    a, b = _to_unit(x), _to_unit(y)
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"SSIM needs two equal [B, C, H, W] batches, got {tuple(a.shape)} and {tuple(b.shape)}")
    c = a.shape[1]
    win = min(window, a.shape[-1], a.shape[-2])
    win -= 1 - win % 2
    coords = torch.arange(win, dtype=torch.float32) - (win - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma * sigma))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, win, win).to(a.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of a code-count histogram ``[K]`` (0 for an empty one), in the histogram's float dtype
    (``float32`` for integer counts); differentiable-free, usable inside a model's forward."""
    counts = counts if counts.is_floating_point() else counts.float()
    total = counts.sum()
    p = counts / total.clamp_min(1e-12)
    entropy = -torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).sum()
    return torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))


def code_stats(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity (exp of the entropy) and used fraction of a code-count histogram ``[K]``."""
    counts = counts.double()
    return {"perplexity": float(perplexity(counts)), "usage": float((counts > 0).double().mean())}
