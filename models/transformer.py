"""minGPT-style causal transformer blocks shared by the Stackformer and the full-grid baseline.

A block is pre-LN: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, with multi-head causal self-attention computed
by :func:`torch.nn.functional.scaled_dot_product_attention` and a 4x GELU MLP. Dropout is applied to the
attention weights, after the attention projection and after the MLP.

Incremental decoding uses a :class:`KVCache`: one preallocated ``[B, n_head, max_len, head_dim]`` key tensor
and value tensor per layer, plus the number of tokens already stored. :class:`TransformerStack` appends one or
more new tokens per call and advances the cache once all of its layers have written their keys and values.

Shapes: ``B`` batch, ``T`` tokens in the call, ``C`` = ``n_embd``, ``H`` = ``n_head``, ``D`` = ``C // H``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys and values of every attention layer of one :class:`TransformerStack`.

    ``keys[i]`` and ``values[i]`` are ``[B, H, max_len, D]``; entries ``[:, :, :length]`` hold the tokens seen
    so far. Create it with :meth:`TransformerStack.new_cache`.
    """

    def __init__(self, *, num_layers: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (``[B, H, T, D]``) after the stored tokens of ``layer``.

        Returns the layer's keys and values for all ``length + T`` tokens. The length itself only moves on
        :meth:`advance`, so every layer of the stack writes at the same offset.
        """
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more tokens as stored (called once per stack forward)."""
        self.length += num_tokens


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally reading and extending a :class:`KVCache`."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; with ``cache``, ``x`` is the tokens after the cached ones."""
        B, T, C = x.shape
        # [B, T, 3C] -> three [B, H, T, D] views (one permute + unbind: fewer ops per decoding step than
        # split + view + transpose, same strides and values).
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            past = cache.length
            k, v = cache.update(layer, k, v)
            # Query i sits at absolute step past + i and may read keys 0..past + i. A single query reads all.
            mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))
        return self.resid_dropout(y) if self.training else y  # dropout is the identity in eval mode


class MLP(nn.Module):
    """``Linear(C, 4C)`` -> GELU -> ``Linear(4C, C)`` -> dropout."""

    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.act(self.fc(x)))
        return self.dropout(y) if self.training else y  # dropout is the identity in eval mode


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class TransformerStack(nn.Module):
    """``n_layer`` causal :class:`Block` s applied in sequence (no embeddings, no final LayerNorm)."""

    def __init__(self, *, n_layer: int, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``.

        Without ``cache`` the ``T`` tokens attend causally among themselves. With it they follow the
        ``cache.length`` stored tokens, their keys and values are appended and the cache advances by ``T``.
        """
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return x

    def new_cache(self, batch_size: int, max_len: int, *, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty :class:`KVCache` for this stack holding up to ``max_len`` tokens per row."""
        return KVCache(num_layers=len(self.blocks), batch_size=batch_size, n_head=self.n_head,
                       head_dim=self.head_dim, max_len=max_len, device=device, dtype=dtype)


def init_weights(module: nn.Module) -> None:
    """minGPT init, for ``model.apply``: Linear and Embedding weights N(0, 0.02), Linear biases 0.

    LayerNorms keep their default (weight 1, bias 0); bare parameters are left to their owner.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on ``nn.Linear`` weights, 0 on everything else.

    Everything else means biases, LayerNorm parameters, embedding tables and bare parameters such as
    absolute position embeddings. Parameters with ``requires_grad=False`` are left out; shared parameters
    appear once.
    """
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in linear_weights else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
