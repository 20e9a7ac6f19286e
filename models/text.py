"""The caption encoder of text-conditional generation: a small bidirectional transformer over caption token ids.

``TextEncoder(ids)`` maps ``[B, T]`` ids (0 = padding, as :mod:`infra.text` stores them) to ``[B, T, C]`` states:
token + learned position embeddings, ``n_layer`` pre-LN blocks of full (non-causal) self-attention whose keys
exclude the padding, and a final LayerNorm. The first position is always attendable, so the empty caption
(all padding: the null condition of classifier-free guidance) has a well-defined, learned encoding instead of
an attention over nothing. States at padded positions are computed like any other and are a function of the
caption alone; the generators read all ``T`` of them as a fixed-length prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.transformer import MLP, init_weights


class FrozenTextEncoder(Protocol):
    """A pretrained caption encoder a generator reads but does not train (e.g. ``infra.text.PretrainedTextEncoder``):
    ``[B, T]`` long ids (0 = padding) -> ``[B, T, width]`` states, computed without gradients. ``module`` holds its
    weights; the generator moves it with itself and leaves it out of its state dict."""

    width: int
    module: nn.Module

    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    vocab_size: int  # caption token ids are < vocab_size; 0 is padding
    max_len: int  # T ids per caption
    n_layer: int
    n_embd: int
    n_head: int
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or self.max_len < 1 or self.n_layer < 1:
            raise ValueError(f"TextEncoderConfig: vocab_size >= 2, max_len >= 1 and n_layer >= 1 needed, got {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"TextEncoderConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


class _Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = _Attention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """See the module docstring."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(c.max_len, c.n_embd))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(_Block(c.n_embd, c.n_head, c.dropout) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.apply(init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        if ids.dim() != 2 or ids.shape[1] != c.max_len:
            raise ValueError(f"caption ids must be [B, {c.max_len}], got {tuple(ids.shape)}")
        if ((ids < 0) | (ids >= c.vocab_size)).any():
            raise ValueError(f"caption ids must lie in [0, {c.vocab_size})")
        keep = ids != 0
        keep[:, 0] = True  # the empty caption still attends to something: its first (padding) position
        x = self.drop(self.tok_emb(ids) + self.pos_emb)
        for block in self.blocks:
            x = block(x, keep)
        return self.ln_f(x)
