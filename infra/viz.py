"""Pictures people look at: image grids, mask overlays, histograms (uint8 numpy arrays / PNG bytes)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` floats in [-1, 1] -> uint8 in [0, 255]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1,
         pad_value: int = 255) -> np.ndarray:
    """Tile ``[B, C, H, W]`` uint8 images into one ``[H', W', 3]`` uint8 array (grey -> RGB)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    images = images.cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, _, h, w = images.shape
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y:y + h, x:x + w] = arr[i]
    return out


def mask_overlay(images: torch.Tensor, keep_mask: torch.Tensor, grid_size: int, alpha: float = 0.55
                 ) -> torch.Tensor:
    """Highlight kept latent regions: masked cells darkened and tinted blue, kept cells left as they are.

    ``images`` ``[B, C, H, W]`` uint8 or [-1, 1] floats; ``keep_mask`` ``[B, g*g]`` bool. Returns uint8 RGB.
    """
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    images = images.cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, _, h, w = images.shape
    m = keep_mask.view(b, 1, grid_size, grid_size).float().cpu()
    m = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")
    tint = torch.tensor([40.0, 60.0, 200.0]).view(1, 3, 1, 1)
    img = images.float()
    masked = (1 - alpha) * img * 0.5 + alpha * tint
    out = m * img + (1 - m) * masked
    return out.round().clamp(0, 255).to(torch.uint8)


def side_by_side(*rows: torch.Tensor) -> torch.Tensor:
    """Interleave equally sized batches so a grid with ``nrow=len(rows)`` shows them next to each other."""
    rows_u8 = [r if r.dtype == torch.uint8 else to_uint8(r) for r in rows]
    rows_u8 = [r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows_u8]
    return torch.stack(rows_u8, dim=1).flatten(0, 1)


def captioned_grid(images: torch.Tensor, captions: list[str], ncol: int = 4, cell: int = 128) -> np.ndarray:
    """Images (uint8 ``[B, C, H, W]``) scaled to ``cell`` pixels, each with its caption written under it (wrapped),
    ``ncol`` per row, on white."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, width=max(8, cell // 7))[:4] for c in captions]
    text_h = 12 * max((len(x) for x in lines), default=1) + 4
    b = images.shape[0]
    rows = math.ceil(b / ncol)
    canvas = Image.new("RGB", (ncol * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    imgs = images.cpu()
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    for i in range(b):
        r, c = divmod(i, ncol)
        x, y = 8 + c * (cell + 8), 8 + r * (cell + text_h + 8)
        tile = Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (x, y))
        for j, line in enumerate(lines[i]):
            draw.text((x, y + cell + 2 + 12 * j), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def histogram_png(counts: np.ndarray, title: str, xlabel: str = "code", ylabel: str = "count") -> bytes:
    """A bar chart of ``counts`` as PNG bytes (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    ax.bar(np.arange(len(counts)), counts, width=1.0, color="#3b6fb6")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
