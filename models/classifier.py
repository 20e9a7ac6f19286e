"""The evaluator classifier behind the default FID/KID/IS: a small CNN whose penultimate layer gives the
features and whose head gives the class logits. Pure torch; its weights files are read and written by
``infra.metrics`` (safetensors), and it is trained by the ``train_evaluator`` stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ClassifierNetConfig:
    """Architecture of the evaluator classifier (stored in its weights file)."""

    in_channels: int  # 1 (grey) or 3 (RGB), as ingested
    image_size: int  # square side the network is trained at (the ingested image size)
    num_classes: int
    width: int = 32  # channels of the first block; the penultimate features have 4 * width dimensions
    # extra heads on the same features, one per attribute of a caption grammar (e.g. shapes: count, colours,
    # shapes, sizes, layout), each with its number of values; () = none
    attribute_heads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attribute_heads", tuple(int(h) for h in self.attribute_heads))
        if any(h < 2 for h in self.attribute_heads):
            raise ValueError(f"ClassifierNetConfig: every attribute head needs >= 2 values, got {self.attribute_heads}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"ClassifierNetConfig: in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 4:
            raise ValueError(f"ClassifierNetConfig: image_size must be >= 4, got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"ClassifierNetConfig: num_classes must be >= 2, got {self.num_classes}")
        if self.width < 1:
            raise ValueError(f"ClassifierNetConfig: width must be >= 1, got {self.width}")

    @property
    def feature_dim(self) -> int:
        return 4 * self.width


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ClassifierNet(nn.Module):
    """A small VGG-style CNN: three conv blocks (2x max-pooling after the first two), global average pooling,
    a linear head.

    ``forward`` takes images in [-1, 1], ``[B, in_channels, image_size, image_size]``, and returns
    ``(features [B, 4 * width], logits [B, num_classes])``; ``features`` is the penultimate layer.
    """

    def __init__(self, cfg: ClassifierNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(
            _conv_block(cfg.in_channels, w), nn.MaxPool2d(2),
            _conv_block(w, 2 * w), nn.MaxPool2d(2),
            _conv_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4 * w, cfg.num_classes)
        self.attr_head = nn.Linear(4 * w, sum(cfg.attribute_heads)) if cfg.attribute_heads else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(self.drop(features))

    def attribute_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """One ``[B, values]`` logit tensor per attribute head, from :meth:`forward`'s features."""
        if self.attr_head is None:
            return []
        return list(self.attr_head(self.drop(features)).split(list(self.cfg.attribute_heads), dim=1))


def to_classifier_input(images: torch.Tensor, cfg: ClassifierNetConfig) -> torch.Tensor:
    """uint8 ``[B, 1 or 3, H, W]`` -> float ``[B, in_channels, image_size, image_size]`` in [-1, 1].

    Three equal channels (grey replicated for torch-fidelity) become one exactly; other RGB goes to grey
    with the ITU-R 601 luma weights (as PIL's ``convert("L")`` used by ingest); grey goes to RGB by
    replication. Other sizes are resized bilinearly (antialiased).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [B, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
    x = images
    if cfg.in_channels == 1 and x.shape[1] == 3:
        if torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]):
            x = x[:, :1].float()
        else:
            luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x.float() * luma).sum(1, keepdim=True)
    elif cfg.in_channels == 3 and x.shape[1] == 1:
        x = x.float().expand(-1, 3, -1, -1)
    else:
        x = x.float()
    if x.shape[-2:] != (cfg.image_size, cfg.image_size):
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False,
                          antialias=True)
    return x / 127.5 - 1.0
