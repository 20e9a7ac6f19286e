"""Stage-1 (VQGAN-style) losses: L1 (+ optional perceptual), quantizer loss, PatchGAN hinge loss.

Total autoencoder loss: ``nll + d_weight * disc_factor * g_loss + codebook_weight * quant_loss`` with
``nll = l1_weight * mean|x - x_hat| + perceptual_weight * mean(perceptual(x, x_hat))``. No perceptual network
ships with mqgen (no weights offline): pass a frozen ``perceptual`` module (e.g. LPIPS whose weights were
loaded outside ``models/``) to use ``perceptual_weight > 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import LossConfig


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: ``[B, in_channels, H, W] -> [B, 1, h, w]`` real/fake logits per patch.

    conv4x4 stride 2 + LeakyReLU(0.2); ``num_layers - 1`` more stride-2 conv4x4 + BatchNorm + LeakyReLU with
    widths ``ndf * min(2**n, 8)``; one stride-1 conv4x4 + BatchNorm + LeakyReLU; a stride-1 conv4x4 to
    1 channel.
    Conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0. The input side must be at least
    ``3 * 2 ** num_layers`` pixels (24 for 3 layers) for the output to be non-empty.
    """

    def __init__(self, in_channels: int, *, ndf: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, num_layers + 1):
            out_width = ndf * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(width, out_width, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_width),
                nn.LeakyReLU(0.2),
            ]
            width = out_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(
    nll: Tensor, g_loss: Tensor, last_layer: Tensor, *, disc_weight: float, disc_weight_max: float
) -> Tensor:
    """Balance the GAN gradient against the reconstruction gradient at ``last_layer`` (detached scalar).

    ``min(clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4) * disc_weight, disc_weight_max)``. Both gradients
    are taken with ``retain_graph=True`` so the caller can still backpropagate the total loss.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
    return (weight * disc_weight).clamp(max=disc_weight_max)


class VQGANLoss(nn.Module):
    """Autoencoder and discriminator losses of MQ-VAE / VQGAN training; owns the discriminator.

    Usage per batch (one model forward): ``total, logs = loss.generator_loss(x, out.reconstruction,
    out.quant_loss, model.last_layer, step)``; backward/step the autoencoder; then, if
    :meth:`is_gan_active`, ``d_loss, d_logs = loss.discriminator_loss(x, out.reconstruction.detach(), step)``
    with the discriminator's gradients zeroed first (the generator backward also reaches the discriminator).
    """

    def __init__(self, cfg: LossConfig, in_channels: int, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError(
                f"perceptual_weight={cfg.perceptual_weight} > 0 needs a perceptual module: LPIPS/VGG weights "
                "must be provided (none ship with mqgen); pass perceptual=... or set perceptual_weight=0"
            )
        self.cfg = cfg
        self.perceptual = perceptual
        self.discriminator = NLayerDiscriminator(in_channels, ndf=cfg.disc_ndf, num_layers=cfg.disc_layers)

    def is_gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at ``step`` (``step >= disc_start`` and ``disc_factor > 0``)."""
        return step >= self.cfg.disc_start and self.cfg.disc_factor > 0

    def generator_loss(
        self, x: Tensor, recon: Tensor, quant_loss: Tensor, last_layer: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss for images ``x`` and ``recon`` ``[B, C, H, W]`` and the quantizer loss ``[]``.

        Returns ``(total, logs)``; logs hold detached scalars: total, nll, l1, perceptual, quant, g_loss,
        d_weight. Before ``disc_start`` the discriminator is not run and g_loss = d_weight = 0. The adaptive
        weight needs gradients at ``last_layer``; when this module is in eval mode, grad is disabled or a loss
        has no graph (validation), it falls back to 0 and the GAN term does not count.
        """
        cfg = self.cfg
        l1 = (x - recon).abs().mean()
        perceptual = self.perceptual(x, recon).mean() if cfg.perceptual_weight > 0 else l1.new_zeros(())
        nll = cfg.l1_weight * l1 + cfg.perceptual_weight * perceptual
        total = nll + cfg.codebook_weight * quant_loss
        g_loss = d_weight = l1.new_zeros(())
        if self.is_gan_active(step):
            g_loss = -self.discriminator(recon).mean()
            if self.training and torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                d_weight = adaptive_gan_weight(
                    nll, g_loss, last_layer, disc_weight=cfg.disc_weight, disc_weight_max=cfg.disc_weight_max
                )
            total = total + d_weight * cfg.disc_factor * g_loss
        logs = {
            "total": total,
            "nll": nll,
            "l1": l1,
            "perceptual": perceptual,
            "quant": quant_loss,
            "g_loss": g_loss,
            "d_weight": d_weight,
        }
        return total, {name: value.detach() for name, value in logs.items()}

    def discriminator_loss(
        self, x: Tensor, recon_detached: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss of the discriminator on real ``x`` and reconstructions ``[B, C, H, W]``.

        ``recon_detached`` is detached again (no gradient can reach the autoencoder) and cast to ``x``'s
        dtype, so a reconstruction produced under autocast can be scored outside it. Returns ``(loss, logs)``
        with logs d_loss, logits_real, logits_fake (detached means). Before ``disc_start`` the
        discriminator is not run and ``loss`` is a constant 0 without a graph: skip the discriminator step
        (see :meth:`is_gan_active`).
        """
        if not self.is_gan_active(step):
            zero = x.new_zeros(())
            return zero, {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(recon_detached.detach().to(x.dtype))
        loss = self.cfg.disc_factor * hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {name: value.detach() for name, value in logs.items()}
