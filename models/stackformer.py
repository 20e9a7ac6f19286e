"""Stackformer (stage 2 of MQ-VAE) and the full-grid autoregressive baseline.

An MQ-VAE image is ``N`` kept tokens on a ``G x G`` latent grid: a code ``v_i`` (``0..K-1``) and a grid cell
``p_i`` (``0..G*G-1``, row-major), sorted by cell (raster order). The Stackformer models them as two stacked
causal transformers:

* the **Code-Transformer** reads step ``t``'s input token ``(idx_t, pos_t)`` as
  ``e_t = E_code[idx_t] + E_pos[pos_t] + A[t]`` and produces ``h_t``; its head predicts the next code;
* the **Position-Transformer** reads ``g_t = h_t + E_code[v_{t+1}]`` (the next code: ground truth in
  training, the freshly sampled one in sampling; ``E_code`` is shared) and its head predicts the next cell.

Vocabularies (``K`` = ``codebook_size``, ``C`` = ``max(1, num_classes)``):

* codes: ``0..K-1`` are real codes; the start token is code ``K`` (unconditional) or ``K + class_id``
  (class-conditional). The code vocabulary, embedding table and code logits have ``K + C`` entries; start
  tokens are never sampled. (The reference puts class ids first and shifts codes up; here real codes keep
  their tokenizer ids.)
* positions: ``0..G*G-1`` are grid cells and ``G*G`` is the start position paired with the start token.
  The position vocabulary has ``G*G + 1`` entries; the start position and used cells are never sampled.
* steps: a learned, zero-initialised absolute embedding ``A`` with ``N`` entries.
* classifier-free guidance (a class-conditional model with ``cond_dropout > 0``): one more start token,
  ``K + C``, the *null class*; training replaces a label by it with probability ``cond_dropout``, and sampling
  with ``guidance_scale = s`` runs each batch twice in one pass (its classes and the null class, stacked, the
  KV caches holding both halves) and draws from ``l_null + s * (l_class - l_null)`` for both heads: the code
  logits and the position logits. ``s = 1`` is plain conditional sampling (one pass), ``s = 0`` unconditional.

Text conditioning (``text_vocab_size > 0``): a :class:`models.text.TextEncoder` (or, with ``text_width > 0``, a
frozen pretrained encoder given at construction, whose weights the generator neither trains nor saves) turns the
caption's ``T`` token ids into ``T`` states; a linear map of them is a **prefix** of ``T`` tokens before the start token, one map for the
Code-Transformer and one for the Position-Transformer, so both heads read the caption through causal attention
(no cross-attention layers: the KV caches hold the prefix once, filled before the first step, and every step
reads one new token as without text). The empty caption (all padding) is the null condition of guidance:
training replaces a caption by it with probability ``cond_dropout`` (together with the label when the model is
also class-conditional), and guided sampling stacks it under the captions as for classes.

Training inputs are ``idx = [start, v_1..v_{N-1}]`` and ``pos = [G*G, p_1..p_{N-1}]``; the targets are
``v_1..v_N`` and ``p_1..p_N``. There is no end token: every sequence has exactly ``N`` tokens.

:class:`FullGridTransformer` is the baseline: one causal transformer over all ``G*G`` codes in raster order,
with the same start-token convention, blocks and KV cache.

Sampling draws one uniform number per row per head per step from ``generator`` and picks the token by
inverse CDF, so the cached and uncached samplers consume the generator identically and return the same
tokens for the same seed, unless a draw falls within rounding error of the boundary between two tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from models.text import FrozenTextEncoder, TextEncoder, TextEncoderConfig
from models.transformer import KVCache, TransformerStack, init_weights

MAX_CODEBOOK_SIZE = 65535  # codes are stored as uint16 downstream


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one head draws its token: ``logits / temperature``, then top-k, then top-p (nucleus)."""

    temperature: float = 1.0  # 0 = greedy (argmax over the allowed tokens, no random draw)
    top_k: int | None = None  # keep the k most likely allowed tokens; None = all
    top_p: float | None = None  # keep the smallest set of tokens with probability mass >= top_p; None = all

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"SamplingParams: top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1] or None, got {self.top_p}")


def _validate_common(name: str, *, codebook_size: int, grid_size: int, num_classes: int, n_embd: int,
                     n_head: int, dropout: float, layers: dict[str, int], cond_dropout: float = 0.0,
                     text_vocab_size: int = 0, text_len: int = 0, text_width: int = 0) -> None:
    if not 1 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"{name}: codebook_size must be in [1, {MAX_CODEBOOK_SIZE}], got {codebook_size}")
    if grid_size < 1:
        raise ValueError(f"{name}: grid_size must be >= 1, got {grid_size}")
    if num_classes < 0:
        raise ValueError(f"{name}: num_classes must be >= 0 (0 = unconditional), got {num_classes}")
    for key, value in layers.items():
        if value < 1:
            raise ValueError(f"{name}: {key} must be >= 1, got {value}")
    if n_head < 1 or n_embd < 1 or n_embd % n_head:
        raise ValueError(f"{name}: n_embd ({n_embd}) must be a positive multiple of n_head ({n_head})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"{name}: cond_dropout must be in [0, 1), got {cond_dropout}")
    if text_width < 0 or (text_width > 0 and text_vocab_size == 0):
        raise ValueError(f"{name}: text_width ({text_width}) > 0 is the width of a text encoder's states; it needs "
                         "a text-conditional model (text_vocab_size > 0)")
    if cond_dropout > 0 and num_classes == 0 and text_vocab_size == 0:
        raise ValueError(f"{name}: cond_dropout (classifier-free guidance) needs a class- or text-conditional "
                         "model (num_classes > 0 or text_vocab_size > 0)")
    if (text_vocab_size > 0) != (text_len > 0) or text_vocab_size < 0:
        raise ValueError(f"{name}: text_vocab_size ({text_vocab_size}) and text_len ({text_len}) are both 0 (no "
                         "text) or both positive")


class _Vocabulary:
    """The start-token layout shared by both configs (``codebook_size``, ``num_classes``, ``cond_dropout``)."""

    codebook_size: int
    num_classes: int
    cond_dropout: float
    text_vocab_size: int
    text_len: int
    n_layer_text: int
    text_width: int
    n_embd: int
    n_head: int
    dropout: float

    @property
    def has_text(self) -> bool:
        return self.text_vocab_size > 0

    @property
    def guided(self) -> bool:
        """Trained for classifier-free guidance: conditional (class or text) with ``cond_dropout > 0``."""
        return self.cond_dropout > 0 and (self.num_classes > 0 or self.has_text)

    @property
    def prefix_len(self) -> int:
        """Tokens before the start token: the caption states (``text_len``) for a text model, else 0."""
        return self.text_len if self.has_text else 0

    def text_encoder_config(self) -> TextEncoderConfig:
        return TextEncoderConfig(vocab_size=self.text_vocab_size, max_len=self.text_len, n_layer=self.n_layer_text,
                                 n_embd=self.n_embd, n_head=self.n_head, dropout=self.dropout)

    @property
    def null_class(self) -> int | None:
        """The label of the null class (``num_classes``) when the model is trained for guidance, else None."""
        return self.num_classes if self.num_classes > 0 and self.cond_dropout > 0 else None

    @property
    def code_vocab_size(self) -> int:
        """``K + max(1, num_classes)`` (+1 for the null class): real codes, then the start/class tokens."""
        return self.codebook_size + max(1, self.num_classes) + (self.null_class is not None)


@dataclass(frozen=True, kw_only=True)
class StackformerConfig(_Vocabulary):
    codebook_size: int  # K real codes
    grid_size: int  # latent side G; grid cells are 0..G*G-1
    seq_len: int  # N kept tokens per image
    num_classes: int  # 0 = unconditional
    n_layer_code: int  # Code-Transformer depth
    n_layer_pos: int  # Position-Transformer depth
    n_embd: int
    n_head: int
    dropout: float = 0.0  # embedding, attention and residual dropout
    pos_loss_weight: float = 1.0  # loss = CE(code) + pos_loss_weight * CE(position)
    cond_dropout: float = 0.0  # share of training conditions replaced by the null one (classifier-free guidance)
    text_vocab_size: int = 0  # caption token ids (0 = not text-conditional)
    text_len: int = 0  # caption ids per image
    n_layer_text: int = 2  # text encoder depth
    text_width: int = 0  # > 0: states of a frozen external encoder of this width (given at construction)

    def __post_init__(self) -> None:
        _validate_common("StackformerConfig", codebook_size=self.codebook_size, grid_size=self.grid_size,
                         num_classes=self.num_classes, n_embd=self.n_embd, n_head=self.n_head,
                         dropout=self.dropout, cond_dropout=self.cond_dropout,
                         text_vocab_size=self.text_vocab_size, text_len=self.text_len, text_width=self.text_width,
                         layers={"n_layer_code": self.n_layer_code, "n_layer_pos": self.n_layer_pos})
        if not 1 <= self.seq_len <= self.num_positions:
            raise ValueError(f"StackformerConfig: seq_len must be in [1, grid_size**2 = "
                             f"{self.num_positions}], got {self.seq_len}")
        if self.pos_loss_weight < 0:
            raise ValueError(f"StackformerConfig: pos_loss_weight must be >= 0, got {self.pos_loss_weight}")

    @property
    def num_positions(self) -> int:
        """Grid cells, ``G*G``; also the index of the start position."""
        return self.grid_size * self.grid_size

    @property
    def pos_vocab_size(self) -> int:
        """``G*G + 1``: grid cells, then the start position."""
        return self.num_positions + 1


class StackformerOutput(NamedTuple):
    code_logits: torch.Tensor  # [B, L, code_vocab_size]; step t predicts codes[:, t]
    pos_logits: torch.Tensor  # [B, L, pos_vocab_size]; step t predicts positions[:, t]
    loss: torch.Tensor  # code_loss + pos_loss_weight * pos_loss
    code_loss: torch.Tensor  # mean cross-entropy over all B*L codes
    pos_loss: torch.Tensor  # mean cross-entropy over all B*L positions


def _check_range(x: torch.Tensor, high: int, what: str) -> None:
    if ((x < 0) | (x >= high)).any():
        raise ValueError(f"{what} must lie in [0, {high}); got values in [{int(x.min())}, {int(x.max())}]")


def _drop_conditions(config: Any, labels: torch.Tensor | None, text: torch.Tensor | None, training: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """In training, each row's condition replaced by the null one with probability ``cond_dropout`` (one draw
    per row from the global torch RNG): its label by the null class, its caption by the empty caption."""
    ref = labels if labels is not None else text
    if not training or not config.guided or ref is None:
        return labels, text
    drop = torch.rand(ref.shape[0], device=ref.device) < config.cond_dropout
    if labels is not None and config.null_class is not None:
        labels = labels.masked_fill(drop, config.null_class)
    if text is not None:
        text = text.masked_fill(drop[:, None], 0)
    return labels, text


def _check_text(config: Any, text: torch.Tensor | None, batch_size: int) -> None:
    if not config.has_text:
        if text is not None:
            raise ValueError("caption ids given to a model without text conditioning (text_vocab_size == 0)")
        return
    if text is None or text.shape != (batch_size, config.text_len):
        raise ValueError(f"a text-conditional model needs caption ids [{batch_size}, {config.text_len}], got "
                         f"{None if text is None else tuple(text.shape)}")


def _guided(logits: torch.Tensor, batch_size: int, scale: float | None) -> torch.Tensor:
    """``[B, V]`` logits to draw from: the rows as they are (``scale`` None: one pass), or, for a stacked
    ``[2B, V]`` (classes, then null class), ``l_null + scale * (l_class - l_null)``.

    ``torch.lerp`` computes it as ``l_class - (1 - scale) * (l_class - l_null)`` for ``scale >= 0.5``, so scale 1
    gives ``l_class`` and scale 0 ``l_null`` exactly (the plain formula rounds ``l_class`` off at scale 1).
    """
    if scale is None:
        return logits
    cond, null = logits[:batch_size].float(), logits[batch_size:].float()
    return torch.lerp(null, cond, scale)


def _guidance(config: Any, labels: torch.Tensor | None, text: torch.Tensor | None, batch_size: int, scale: float
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
    """The labels and captions of the rows a sampler runs (``[2B]``: the conditions, then the null ones, when
    guiding) and the scale to combine them with (None: one plain pass)."""
    _check_text(config, text, batch_size)
    if scale == 1.0:
        return labels, text, None
    if not config.guided:
        raise ValueError(f"guidance_scale={scale} needs a model trained for classifier-free guidance "
                         "(class- or text-conditional, cond_dropout > 0); use 1.0")
    if labels is None and text is None:
        raise ValueError("classifier-free guidance needs labels or captions")
    if labels is not None and config.null_class is not None:
        labels = torch.cat([labels, torch.full_like(labels, config.null_class)])
    if text is not None:
        text = torch.cat([text, torch.zeros_like(text)])
    return labels, text, float(scale)


def _draw(logits: torch.Tensor, params: SamplingParams, forbidden: torch.Tensor,
          generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from ``logits`` ``[B, V]``, never one where ``forbidden`` (``[B or 1, V]``) is set.

    Consumes exactly one ``torch.rand(B)`` from ``generator`` unless ``params.temperature == 0``. The token is
    the first whose cumulative (float64) probability exceeds ``u * total``, so tokens of zero probability are
    never chosen.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).masked_fill(forbidden, float("-inf"))
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p  # mass before it suffices
        probs = probs.masked_fill(torch.zeros_like(outside).scatter(1, order, outside), 0.0)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return choice.squeeze(1).clamp_max(probs.shape[-1] - 1)


_Out = TypeVar("_Out", torch.Tensor, tuple[torch.Tensor, ...])


def _sampler(fn: Callable[..., _Out]) -> Callable[..., _Out]:
    """Run a ``sample`` method under ``torch.inference_mode`` and return ordinary tensors.

    Inference mode skips the autograd bookkeeping (view and version-counter tracking) that ``no_grad`` still
    does on every op; a sampler runs hundreds of small ops per token, so this is ~10% of a small-batch step
    on a CPU. The results are cloned outside inference mode (under ``no_grad``) so callers get the same
    ordinary tensors as before, usable anywhere, autograd included.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        with torch.no_grad():
            return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return wrapper


def _batches(num_images: int, batch_size: int, labels: torch.Tensor | None, text: torch.Tensor | None
             ) -> Iterator[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]:
    """``(begin, n, labels[begin:begin+n], text[begin:begin+n])`` per batch of at most ``batch_size``."""
    if labels is not None and labels.shape != (num_images,):
        raise ValueError(f"labels must have shape ({num_images},), got {tuple(labels.shape)}")
    if text is not None and (text.dim() != 2 or text.shape[0] != num_images):
        raise ValueError(f"caption ids must have shape ({num_images}, text_len), got {tuple(text.shape)}")
    for begin in range(0, num_images, batch_size):
        n = min(batch_size, num_images - begin)
        yield (begin, n, None if labels is None else labels[begin:begin + n],
               None if text is None else text[begin:begin + n])


def sort_by_position(codes: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of ``positions`` ``[B, N]`` into raster order; reorder ``codes`` ``[B, N]`` to match."""
    positions, order = positions.sort(dim=1)
    return codes.gather(1, order), positions


def sample_tokens(model: nn.Module, n: int, labels: torch.Tensor | None, code_params: SamplingParams,
                  pos_params: SamplingParams, *, raster_order: bool = True, generator: torch.Generator | None = None,
                  guidance_scale: float = 1.0, text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``n`` token sequences from a :class:`Stackformer` or a :class:`FullGridTransformer` with KV caches:
    ``(codes, positions, raster_share)``, sorted by position (what the tokenizer decodes). ``raster_share`` is the
    share of consecutive positions the Stackformer sampled in increasing order (1.0 for the full grid)."""
    if isinstance(model, Stackformer):
        codes, positions = model.sample(n, labels, code_params, pos_params, raster_order=raster_order,
                                        use_cache=True, generator=generator, guidance_scale=guidance_scale, text=text)
        share = float((positions[:, 1:] > positions[:, :-1]).double().mean()) if positions.shape[1] > 1 else 1.0
        codes, positions = sort_by_position(codes, positions)
        return codes, positions, share
    if isinstance(model, FullGridTransformer):
        codes = model.sample(n, labels, code_params, use_cache=True, generator=generator,
                             guidance_scale=guidance_scale, text=text)
        return codes, torch.arange(codes.shape[1], device=codes.device).expand_as(codes), 1.0
    raise TypeError(f"sample_tokens: {type(model).__name__} is not a Stackformer or a FullGridTransformer")


class _TextPrefix(nn.Module):
    """The caption encoder and one linear map of its states per transformer stack (the prefix tokens).

    With ``config.text_width > 0`` the encoder is ``frozen`` (a :class:`models.text.FrozenTextEncoder`): held, not
    registered, so its weights are neither trained nor saved with the generator's; moving the generator moves it.
    Its states of a caption of padding only (the null condition) are replaced by a learned null prefix, so guidance
    has a trained unconditional branch although the encoder itself never learns one.
    """

    def __init__(self, config: Any, stacks: int, frozen: FrozenTextEncoder | None = None) -> None:
        super().__init__()
        self.vocab_size = config.text_vocab_size
        if config.text_width > 0:
            if frozen is None or frozen.width != config.text_width:
                raise ValueError(f"this generator reads the states of a frozen text encoder of width "
                                 f"{config.text_width}; give it (got {None if frozen is None else frozen.width})")
            self._frozen: tuple[FrozenTextEncoder, ...] = (frozen,)  # a tuple: not a registered submodule
            self.encoder = None
            self.null = nn.Parameter(torch.randn(config.text_len, config.text_width) * 0.02)
        else:
            if frozen is not None:
                raise ValueError("a frozen text encoder was given to a generator with its own (text_width = 0)")
            self._frozen = ()
            self.encoder = TextEncoder(config.text_encoder_config())
        width = config.text_width or config.n_embd
        self.maps = nn.ModuleList(nn.Linear(width, config.n_embd) for _ in range(stacks))

    def _apply(self, fn: Any, recurse: bool = True) -> _TextPrefix:
        for frozen in self._frozen:  # .to(device / dtype) reaches the held encoder too
            frozen.module._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, text: torch.Tensor) -> list[torch.Tensor]:
        """``[B, T]`` ids -> one ``[B, T, C]`` prefix per stack."""
        if self.encoder is not None:
            states = self.encoder(text)
        else:
            _check_range(text, self.vocab_size, "caption ids")
            states = self._frozen[0](text).to(self.null.dtype)
            states = torch.where((text == 0).all(dim=1)[:, None, None], self.null.expand_as(states), states)
        return [m(states) for m in self.maps]


def _run_stack(stack: TransformerStack, x: torch.Tensor, cache: KVCache | None, prefix: torch.Tensor | None
               ) -> torch.Tensor:
    """``stack`` over ``x`` ``[B, T, C]``, after ``prefix`` ``[B, P, C]`` when given (its outputs dropped)."""
    if prefix is None:
        return stack(x, cache)
    return stack(torch.cat([prefix, x], dim=1), cache)[:, prefix.shape[1]:]


class _CodeModel(nn.Module):
    """What the Stackformer and the full-grid baseline share: a code table ``code_emb`` whose start rows follow the
    ``K`` codes, and a ``config`` with ``codebook_size``, ``num_classes`` and ``null_class``."""

    config: Any
    code_emb: nn.Embedding

    def num_params(self) -> int:
        """Number of parameters (shared tables counted once)."""
        return sum(p.numel() for p in self.parameters())

    def start_tokens(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Start codes ``[B]`` long: ``K`` when unconditional, ``K + labels`` when class-conditional (a label may
        be ``null_class`` when the model has one)."""
        c, device = self.config, self.code_emb.weight.device
        if c.num_classes == 0:
            if labels is not None:
                raise ValueError("labels given to an unconditional model (num_classes == 0)")
            return torch.full((batch_size,), c.codebook_size, dtype=torch.long, device=device)
        if labels is None:
            raise ValueError(f"a class-conditional model (num_classes={c.num_classes}) needs labels")
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        _check_range(labels, c.num_classes + (c.null_class is not None), "labels")
        return c.codebook_size + labels.to(device=device, dtype=torch.long)


class Stackformer(_CodeModel):
    """Code-Transformer + Position-Transformer over ``N`` (code, cell) tokens; see the module docstring."""

    def __init__(self, config: StackformerConfig, text_encoder: FrozenTextEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.code_emb = nn.Embedding(c.code_vocab_size, c.n_embd)  # E_code, shared by both transformers
        self.pos_emb = nn.Embedding(c.pos_vocab_size, c.n_embd)  # E_pos
        self.step_emb = nn.Parameter(torch.zeros(c.seq_len, c.n_embd))  # A, zero-initialised
        self.drop = nn.Dropout(c.dropout)
        self.code_stack = TransformerStack(n_layer=c.n_layer_code, n_embd=c.n_embd, n_head=c.n_head,
                                           dropout=c.dropout)
        self.code_ln = nn.LayerNorm(c.n_embd)
        self.code_head = nn.Linear(c.n_embd, c.code_vocab_size, bias=False)
        self.pos_stack = TransformerStack(n_layer=c.n_layer_pos, n_embd=c.n_embd, n_head=c.n_head,
                                          dropout=c.dropout)
        self.pos_ln = nn.LayerNorm(c.n_embd)
        self.pos_head = nn.Linear(c.n_embd, c.pos_vocab_size, bias=False)
        self.apply(init_weights)
        # its own init (after apply: position table); text_encoder: the frozen one of a config with text_width > 0
        self.text = _TextPrefix(c, 2, text_encoder) if c.has_text else None

    def _code_hidden(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache | None = None,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Code-Transformer states ``h`` ``[B, T, C]`` for input tokens ``idx``, ``pos`` ``[B, T]``.

        The tokens occupy steps ``cache.length - prefix_len ..`` (from 0 without a cache: then a text model passes
        its ``prefix``; with a cache the prefix is already in it).
        """
        start = 0 if cache is None else cache.length - self.config.prefix_len
        x = self.code_emb(idx) + self.pos_emb(pos) + self.step_emb[start:start + idx.shape[1]]
        return _run_stack(self.code_stack, self.drop(x), cache, prefix)

    def _pos_hidden(self, h: torch.Tensor, next_codes: torch.Tensor, cache: KVCache | None = None,
                    prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Position-Transformer states ``[B, T, C]`` from ``h`` ``[B, T, C]`` and next codes ``[B, T]``."""
        return _run_stack(self.pos_stack, h + self.code_emb(next_codes), cache, prefix)

    def _prefixes(self, text: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The (code, position) prefixes of captions ``text`` (Nones for a model without text)."""
        if self.text is None:
            return [None, None]
        return list(self.text(text.to(self.step_emb.device)))

    def forward(self, codes: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> StackformerOutput:
        """Teacher-forced logits and losses.

        Args:
            codes: ``[B, L]`` long, real codes in ``[0, K)``, ``1 <= L <= N``.
            positions: ``[B, L]`` long, their grid cells in ``[0, G*G)``, raster-sorted per row (the model
                learns the order it is trained on).
            labels: ``[B]`` long class ids for a class-conditional model, else None.
            text: ``[B, text_len]`` long caption ids for a text-conditional model, else None.
        """
        c = self.config
        if codes.dim() != 2 or codes.shape != positions.shape or not 1 <= codes.shape[1] <= c.seq_len:
            raise ValueError(f"codes and positions must both be [B, L] with 1 <= L <= {c.seq_len}; got "
                             f"{tuple(codes.shape)} and {tuple(positions.shape)}")
        _check_range(codes, c.codebook_size, "codes")
        _check_range(positions, c.num_positions, "positions")
        B = codes.shape[0]
        _check_text(c, text, B)
        labels, text = _drop_conditions(c, labels, text, self.training)
        code_prefix, pos_prefix = self._prefixes(text)
        start = self.start_tokens(labels, B)[:, None]
        idx = torch.cat([start, codes[:, :-1]], dim=1)
        pos = torch.cat([torch.full_like(start, c.num_positions), positions[:, :-1]], dim=1)
        h = self._code_hidden(idx, pos, prefix=code_prefix)
        code_logits = self.code_head(self.code_ln(h))
        pos_logits = self.pos_head(self.pos_ln(self._pos_hidden(h, codes, prefix=pos_prefix)))
        code_loss = F.cross_entropy(code_logits.flatten(0, 1), codes.flatten())
        pos_loss = F.cross_entropy(pos_logits.flatten(0, 1), positions.flatten())
        loss = code_loss + c.pos_loss_weight * pos_loss
        return StackformerOutput(code_logits, pos_logits, loss, code_loss, pos_loss)

    @_sampler
    def sample(self, batch_size: int, labels: torch.Tensor | None = None,
               code_params: SamplingParams = SamplingParams(), pos_params: SamplingParams = SamplingParams(),
               raster_order: bool = False, use_cache: bool = True, generator: torch.Generator | None = None,
               guidance_scale: float = 1.0, text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` token sequences; call in eval mode (dropout is otherwise active).

        Each step runs the Code-Transformer and draws the next code (start tokens forbidden), then runs the
        Position-Transformer on ``h_t + E_code[code]`` and draws its cell (the start position and cells
        already used in the row forbidden). With ``raster_order`` a cell must also exceed the row's previous
        cell and leave enough cells for the remaining steps (a variant; the reference only learns the order).

        With ``use_cache`` both transformers read one new token per step against their KV caches; without it
        they re-run the whole prefix each step (the reference algorithm). Both consume ``generator`` (which
        must live on the model's device) identically.

        Args:
            labels: ``[B]`` long class ids for a class-conditional model, else None.
            guidance_scale: classifier-free guidance for both heads (see the module docstring); 1.0 = none.
            text: ``[B, text_len]`` long caption ids for a text-conditional model, else None.
        Returns:
            codes ``[B, N]`` long in ``[0, K)`` and positions ``[B, N]`` long in ``[0, G*G)``, unique per
            row, in sampling order (see :func:`sort_by_position`).
        """
        c = self.config
        N, P, B = c.seq_len, c.num_positions, batch_size
        device, dtype = self.step_emb.device, self.step_emb.dtype
        run_labels, run_text, scale = _guidance(c, labels, text, B, guidance_scale)
        R = B if scale is None else 2 * B  # rows the transformers run: with guidance, the null-class copy too
        start = self.start_tokens(run_labels, R)
        code_prefix, pos_prefix = self._prefixes(run_text)
        L = N + c.prefix_len
        # Step t reads (in_codes[:, t], in_pos[:, t]): the start token, then the tokens sampled so far.
        in_codes = torch.empty(R, N, dtype=torch.long, device=device)
        in_codes[:, 0] = start
        in_pos = torch.full((R, N), P, dtype=torch.long, device=device)
        codes = torch.empty(B, N, dtype=torch.long, device=device)
        positions = torch.empty(B, N, dtype=torch.long, device=device)
        code_forbidden = (torch.arange(c.code_vocab_size, device=device) >= c.codebook_size)[None]
        cells = torch.arange(c.pos_vocab_size, device=device)
        used = (cells == P).expand(B, -1).clone()
        previous = torch.full((B, 1), -1, dtype=torch.long, device=device)
        code_cache = self.code_stack.new_cache(R, L, device=device, dtype=dtype) if use_cache else None
        pos_cache = self.pos_stack.new_cache(R, L, device=device, dtype=dtype) if use_cache else None
        if use_cache and code_prefix is not None:  # the caption prefix enters the caches once
            self.code_stack(code_prefix.to(dtype), code_cache)
            self.pos_stack(pos_prefix.to(dtype), pos_cache)
        rows = R // B  # each drawn token goes to this many rows
        for t in range(N):
            if use_cache:
                h = self._code_hidden(in_codes[:, t:t + 1], in_pos[:, t:t + 1], code_cache)
            else:
                h = self._code_hidden(in_codes[:, :t + 1], in_pos[:, :t + 1], prefix=code_prefix)
            code = _draw(_guided(self.code_head(self.code_ln(h[:, -1])), B, scale), code_params, code_forbidden,
                         generator)
            codes[:, t] = code
            code_rows = code if rows == 1 else code.repeat(rows)  # unguided: no copy on the hot path
            if use_cache:
                g = self._pos_hidden(h, code_rows[:, None], pos_cache)
            else:
                g = self._pos_hidden(h, codes[:, :t + 1].repeat(rows, 1), prefix=pos_prefix)
            forbidden = used
            if raster_order:
                forbidden = used | (cells <= previous) | (cells > P - N + t)
            pos = _draw(_guided(self.pos_head(self.pos_ln(g[:, -1])), B, scale), pos_params, forbidden, generator)
            positions[:, t] = pos
            used.scatter_(1, pos[:, None], True)
            previous = pos[:, None]
            if t + 1 < N:
                in_codes[:, t + 1] = code_rows
                in_pos[:, t + 1] = pos if rows == 1 else pos.repeat(rows)
        return codes, positions

    def sample_many(self, num_images: int, batch_size: int, labels: torch.Tensor | None = None,
                    code_params: SamplingParams = SamplingParams(),
                    pos_params: SamplingParams = SamplingParams(), raster_order: bool = False,
                    use_cache: bool = True, generator: torch.Generator | None = None, guidance_scale: float = 1.0,
                    text: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield :meth:`sample` batches of at most ``batch_size`` until ``num_images`` sequences are drawn.

        ``labels`` is ``[num_images]`` and ``text`` ``[num_images, text_len]`` (sliced per batch) for a class- or
        text-conditional model, else None.
        """
        for begin, n, batch_labels, batch_text in _batches(num_images, batch_size, labels, text):
            yield self.sample(n, batch_labels, code_params, pos_params, raster_order, use_cache, generator,
                              guidance_scale, batch_text)


@dataclass(frozen=True, kw_only=True)
class FullGridConfig(_Vocabulary):
    codebook_size: int  # K real codes
    grid_size: int  # latent side G; the sequence is all G*G codes in raster order
    num_classes: int  # 0 = unconditional
    n_layer: int
    n_embd: int
    n_head: int
    dropout: float = 0.0
    cond_dropout: float = 0.0  # share of training conditions replaced by the null one (classifier-free guidance)
    text_vocab_size: int = 0  # caption token ids (0 = not text-conditional)
    text_len: int = 0  # caption ids per image
    n_layer_text: int = 2  # text encoder depth
    text_width: int = 0  # > 0: states of a frozen external encoder of this width (given at construction)

    def __post_init__(self) -> None:
        _validate_common("FullGridConfig", codebook_size=self.codebook_size, grid_size=self.grid_size,
                         num_classes=self.num_classes, n_embd=self.n_embd, n_head=self.n_head,
                         dropout=self.dropout, cond_dropout=self.cond_dropout, layers={"n_layer": self.n_layer},
                         text_vocab_size=self.text_vocab_size, text_len=self.text_len, text_width=self.text_width)

    @property
    def seq_len(self) -> int:
        """``G*G`` codes per image."""
        return self.grid_size * self.grid_size


class FullGridOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, code_vocab_size]; step t predicts codes[:, t]
    loss: torch.Tensor  # mean cross-entropy over all B*L codes


class FullGridTransformer(_CodeModel):
    """Baseline: a causal transformer over the full ``G x G`` code grid in raster order.

    Step ``t`` reads ``E_code[idx_t] + A[t]`` with ``idx = [start, c_0..c_{G*G-2}]`` and predicts ``c_t``.
    """

    def __init__(self, config: FullGridConfig, text_encoder: FrozenTextEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.code_emb = nn.Embedding(c.code_vocab_size, c.n_embd)
        self.step_emb = nn.Parameter(torch.zeros(c.seq_len, c.n_embd))  # zero-initialised
        self.drop = nn.Dropout(c.dropout)
        self.stack = TransformerStack(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, dropout=c.dropout)
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.code_vocab_size, bias=False)
        self.apply(init_weights)
        self.text = _TextPrefix(c, 1, text_encoder) if c.has_text else None

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None = None, prefix: torch.Tensor | None = None
                ) -> torch.Tensor:
        """States ``[B, T, C]`` for input codes ``idx`` ``[B, T]`` at steps from ``cache.length - prefix_len`` (or 0,
        after ``prefix`` for a text model without a cache)."""
        start = 0 if cache is None else cache.length - self.config.prefix_len
        x = self.code_emb(idx) + self.step_emb[start:start + idx.shape[1]]
        return _run_stack(self.stack, self.drop(x), cache, prefix)

    def _prefix(self, text: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.text is None else self.text(text.to(self.step_emb.device))[0]

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, text: torch.Tensor | None = None
                ) -> FullGridOutput:
        """Teacher-forced logits and loss for ``codes`` ``[B, L]`` (raster order, ``1 <= L <= G*G``)."""
        c = self.config
        if codes.dim() != 2 or not 1 <= codes.shape[1] <= c.seq_len:
            raise ValueError(f"codes must be [B, L] with 1 <= L <= {c.seq_len}; got {tuple(codes.shape)}")
        _check_range(codes, c.codebook_size, "codes")
        _check_text(c, text, codes.shape[0])
        labels, text = _drop_conditions(c, labels, text, self.training)
        idx = torch.cat([self.start_tokens(labels, codes.shape[0])[:, None], codes[:, :-1]], dim=1)
        logits = self.head(self.ln_f(self._hidden(idx, prefix=self._prefix(text))))
        return FullGridOutput(logits, F.cross_entropy(logits.flatten(0, 1), codes.flatten()))

    @_sampler
    def sample(self, batch_size: int, labels: torch.Tensor | None = None,
               params: SamplingParams = SamplingParams(), use_cache: bool = True,
               generator: torch.Generator | None = None, guidance_scale: float = 1.0,
               text: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``batch_size`` code grids ``[B, G*G]`` (raster order, codes in ``[0, K)``); call in eval mode.

        With ``use_cache`` each step reads one new token against the KV cache, otherwise it re-runs the
        prefix; both consume ``generator`` (on the model's device) identically. ``guidance_scale``: classifier-free
        guidance, as for the Stackformer's code head.
        """
        c = self.config
        S, B = c.seq_len, batch_size
        device, dtype = self.step_emb.device, self.step_emb.dtype
        run_labels, run_text, scale = _guidance(c, labels, text, B, guidance_scale)
        R = B if scale is None else 2 * B
        inputs = torch.empty(R, S, dtype=torch.long, device=device)
        inputs[:, 0] = self.start_tokens(run_labels, R)
        codes = torch.empty(B, S, dtype=torch.long, device=device)
        forbidden = (torch.arange(c.code_vocab_size, device=device) >= c.codebook_size)[None]
        prefix = self._prefix(run_text)
        cache = self.stack.new_cache(R, S + c.prefix_len, device=device, dtype=dtype) if use_cache else None
        if use_cache and prefix is not None:
            self.stack(prefix.to(dtype), cache)
        for t in range(S):
            h = (self._hidden(inputs[:, t:t + 1], cache) if use_cache
                 else self._hidden(inputs[:, :t + 1], prefix=prefix))
            code = _draw(_guided(self.head(self.ln_f(h[:, -1])), B, scale), params, forbidden, generator)
            codes[:, t] = code
            if t + 1 < S:
                inputs[:, t + 1] = code if R == B else code.repeat(R // B)
        return codes

    def sample_many(self, num_images: int, batch_size: int, labels: torch.Tensor | None = None,
                    params: SamplingParams = SamplingParams(), use_cache: bool = True,
                    generator: torch.Generator | None = None, guidance_scale: float = 1.0,
                    text: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield :meth:`sample` batches of at most ``batch_size`` until ``num_images`` grids are drawn."""
        for begin, n, batch_labels, batch_text in _batches(num_images, batch_size, labels, text):
            yield self.sample(n, batch_labels, params, use_cache, generator, guidance_scale, batch_text)
