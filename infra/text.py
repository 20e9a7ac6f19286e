"""Captions -> token ids: the caption tokenizer every stage that reads text shares.

The tokenizer is a byte-level BPE trained with Hugging Face ``tokenizers`` on the training captions (by the
``tokenize`` stage, which stores ``text_tokenizer.json`` beside its databases and the ids in every record). The
normaliser NFKC-normalises, lower-cases and folds whitespace runs to one space; ids 0 and 1 are ``<pad>`` and ``<unk>``. A caption becomes at most
``max_len`` ids, padded with 0; longer ones are cut and counted. The empty caption (all padding) is the null
condition classifier-free guidance uses.

Loading reads the JSON file only (the tokenizers library parses it; nothing is executed or unpickled) and checks
its sha256 when the caller knows it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from infra.errors import PermanentError

PAD, UNK = "<pad>", "<unk>"
PAD_ID = 0
FILENAME = "text_tokenizer.json"


class TextTokenizerError(PermanentError, ValueError):
    """A caption tokenizer file is missing, damaged or not the one a model was trained with."""


class CaptionTokenizer:
    """A trained BPE caption tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer
        if tokenizer.token_to_id(PAD) != PAD_ID:  # type: ignore[attr-defined]
            raise TextTokenizerError(f"the caption tokenizer's {PAD} id is not {PAD_ID}")

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int) -> CaptionTokenizer:
        """Train on ``captions`` (deterministic for the same captions in the same order)."""
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                               normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None) -> CaptionTokenizer:
        from tokenizers import Tokenizer

        from infra.storage import sha256_file

        p = Path(path)
        if not p.is_file():
            raise TextTokenizerError(f"caption tokenizer {p} does not exist (rerun the tokenize stage)")
        if expected_sha256 is not None and sha256_file(p) != expected_sha256:
            raise TextTokenizerError(f"caption tokenizer {p} does not match the sha256 its model was trained with")
        try:
            return cls(Tokenizer.from_file(str(p)))
        except Exception as e:  # the library raises its own exception types for a malformed file
            raise TextTokenizerError(f"caption tokenizer {p} cannot be read: {e}") from e

    def save(self, path: str | Path) -> None:
        from infra.storage import atomic_write_bytes

        atomic_write_bytes(Path(path), self._tok.to_str().encode())  # type: ignore[attr-defined]

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())  # type: ignore[attr-defined]

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, int]:
        """``[n, max_len]`` uint16 ids (0-padded) and how many captions were cut."""
        out = np.zeros((len(captions), max_len), np.uint16)
        cut = 0
        if captions:
            for i, enc in enumerate(self._tok.encode_batch(list(captions), add_special_tokens=False)):  # type: ignore[attr-defined]
                ids = enc.ids
                cut += len(ids) > max_len
                out[i, :min(len(ids), max_len)] = ids[:max_len]
        return out, cut

    def decode(self, ids: Sequence[int]) -> str:
        """The text of one row of ids (padding dropped)."""
        return self._tok.decode([int(i) for i in ids if int(i) != PAD_ID]).strip()  # type: ignore[attr-defined]
