"""EMA vector quantizer with dead-code restart (the MQ-VAE / RQ-VAE codebook).

The codebook is a set of buffers updated by an exponential moving average of the encoder vectors assigned
to each code; no gradient reaches it. Synchronisation across data-parallel ranks is *injected* with
:meth:`EMAVectorQuantizer.set_sync`; this module never touches ``torch.distributed`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.metrics import perplexity

SyncFn = Callable[[Tensor], Tensor]

# Rows of the [rows, num_codes] distance matrix computed at once; bounds peak memory of the search.
_SEARCH_CHUNK_ROWS = 32768


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class QuantizerOutput(NamedTuple):
    """Result of one quantizer call; ``...`` are the leading dims of the input ``z`` of shape ``[..., dim]``.

    quantized:  ``[..., dim]`` straight-through: forward value = nearest code, gradient = identity to z.
    indices:    ``[...]`` long, index of the nearest code.
    loss:       ``[]`` ``beta * mse(z, sg(zq)) + mse(zq, sg(z))`` (the second term is a constant).
    perplexity: ``[]`` exp(entropy) of the code usage in this call (this rank only).
    usage:      ``[num_codes]`` long, vectors of this call assigned to each code (this rank only).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor
    usage: Tensor


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with an EMA codebook and dead-code restart.

    Args:
        num_codes: codebook size K.
        dim: code dimension D.
        decay: EMA decay of the per-code counts and vector sums.
        eps: Laplace smoothing added to each count before dividing the sums by them.
        beta: commitment weight.
        restart_threshold: a code whose EMA count falls below this after an update is restarted;
            0 disables restarts.

    Behaviour:
        * Distance is plain squared Euclidean (no l2-normalisation), computed in float32.
        * Exactly one EMA update per call in training mode with ``update=True``; never in eval mode.
          Per update: all-reduce the batch counts/sums (one ``all_reduce_sum`` call on a ``[K, D + 1]``
          tensor), fold them into the EMA, draw K restart candidates from this call's vectors (tiled with
          uniform noise of scale ``0.01 / sqrt(D)`` when there are fewer than K), replace them by rank 0's
          (one ``broadcast_from_rank0`` call), reset every dead code's sum to its candidate and its count
          to 1, then recompute the codebook as ``sum / smoothed_count``. Both collectives are called on every
          update, whatever the data, so ranks never disagree about how many collectives run.
        * With identical initial state on every rank (same seed, or a broadcast of the state dict) all ranks
          hold identical codebooks after every update.
        * Initial state: codebook U(-1/K, 1/K); EMA counts and sums zero, so every code is dead at the first
          update and the codebook is effectively initialised from data. (The reference starts the EMA sums
          from an N(0, 1) draw, which only adds noise to the few codes that survive the first restart.)
        * Loss: the reference's "legacy" form ``beta * mse(z, sg(zq)) + mse(zq, sg(z))`` is kept so logged
          values match it. The codebook is a buffer, so the second term carries no gradient and only
          ``beta * commitment`` trains the encoder.
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    num_updates: Tensor

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        restart_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if restart_threshold < 0.0:
            raise ValueError(f"restart_threshold must be >= 0, got {restart_threshold}")
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.beta = beta
        self.restart_threshold = restart_threshold
        self.register_buffer(
            "codebook", torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        )
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, dim))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._all_reduce_sum: SyncFn = _identity
        self._broadcast_from_rank0: SyncFn = _identity

    def set_sync(self, all_reduce_sum: SyncFn, broadcast_from_rank0: SyncFn) -> None:
        """Inject the collectives used by the EMA update (both default to identity = single process).

        ``all_reduce_sum(t)`` must return the element-wise sum of ``t`` over ranks and
        ``broadcast_from_rank0(t)`` rank 0's ``t``; both receive float32 tensors of the same shape on every
        rank and may work in place or not (only the return value is used). With torch.distributed, e.g.
        ``lambda t: (dist.all_reduce(t), t)[1]`` and ``lambda t: (dist.broadcast(t, 0), t)[1]``.
        """
        self._all_reduce_sum = all_reduce_sum
        self._broadcast_from_rank0 = broadcast_from_rank0

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for ``indices`` of any shape ``[...]`` -> ``[..., dim]`` (float32, no grad)."""
        return F.embedding(indices, self.codebook)

    def forward(self, z: Tensor, update: bool = True) -> QuantizerOutput:
        """Quantize ``z`` of shape ``[..., dim]``; see :class:`QuantizerOutput`.

        The EMA update (exactly one) runs iff ``self.training and update``; pass ``update=False`` for a
        training-mode call that must leave the codebook alone.
        """
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected z of shape [..., {self.dim}], got {tuple(z.shape)}")
        if z.numel() == 0:
            raise ValueError("cannot quantize an empty tensor")
        flat = z.reshape(-1, self.dim)
        indices = self._nearest(flat)
        zq = self.lookup(indices)  # a copy: later in-place codebook updates do not change it
        usage = torch.bincount(indices, minlength=self.num_codes)
        if self.training and update:
            self._ema_update(flat.detach(), indices, usage)

        flat32 = flat.float()
        loss = self.beta * F.mse_loss(flat32, zq.detach()) + F.mse_loss(zq, flat32.detach())
        quantized = flat + (zq.to(flat.dtype) - flat).detach()
        return QuantizerOutput(
            quantized=quantized.view_as(z),
            indices=indices.view(z.shape[:-1]),
            loss=loss,
            perplexity=perplexity(usage),
            usage=usage,
        )

    @torch.no_grad()
    def _nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code (squared Euclidean) for each row of ``flat`` [M, D] -> [M] long."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            code_sq_norms = self.codebook.pow(2).sum(dim=1)
            # ||z||^2 is the same for every code and does not change the argmin.
            return torch.cat(
                [
                    torch.addmm(code_sq_norms, chunk.float(), self.codebook.t(), alpha=-2.0).argmin(dim=1)
                    for chunk in flat.split(_SEARCH_CHUNK_ROWS)
                ]
            )

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor, usage: Tensor) -> None:
        """One EMA step on ``flat`` [M, D] with its ``indices`` [M] and per-code ``usage`` [K]."""
        flat = flat.float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        stats = self._all_reduce_sum(torch.cat([sums, usage.float().unsqueeze(1)], dim=1))
        self.cluster_size.mul_(self.decay).add_(stats[:, self.dim], alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(stats[:, : self.dim], alpha=1.0 - self.decay)

        candidates = self._broadcast_from_rank0(self._restart_candidates(flat))
        dead = self.cluster_size < self.restart_threshold
        self.embed_sum.copy_(torch.where(dead.unsqueeze(1), candidates, self.embed_sum))
        self.cluster_size.masked_fill_(dead, 1.0)

        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        self.num_updates += 1

    def _restart_candidates(self, flat: Tensor) -> Tensor:
        """K random rows of ``flat`` [M, D] (tiled with small noise when M < K) -> [K, D]."""
        num_vectors = flat.shape[0]
        if num_vectors < self.num_codes:
            flat = flat.repeat(math.ceil(self.num_codes / num_vectors), 1)
            flat = flat + torch.rand_like(flat) * (0.01 / math.sqrt(self.dim))
        order = torch.randperm(flat.shape[0], device=flat.device)[: self.num_codes]
        return flat[order]
