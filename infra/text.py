"""Captions -> token ids: the caption tokenizer every stage that reads text shares.

The tokenizer is a byte-level BPE trained with Hugging Face ``tokenizers`` on the training captions (by the
``tokenize`` stage, which stores ``text_tokenizer.json`` beside its databases and the ids in every record). The
normaliser NFKC-normalises, lower-cases and folds whitespace runs to one space; ids 0 and 1 are ``<pad>`` and ``<unk>``. A caption becomes at most
``max_len`` ids, padded with 0; longer ones are cut and counted. The empty caption (all padding) is the null
condition classifier-free guidance uses.

Loading reads the JSON file only (the tokenizers library parses it; nothing is executed or unpickled) and checks
its sha256 when the caller knows it.

**A frozen pretrained encoder** (``text.pretrained=DIR``): a local directory in the Hugging Face layout
(``config.json``, ``*.safetensors`` weights, ``tokenizer.json``; e.g. what ``CLIPTextModel.save_pretrained`` and
``CLIPTokenizerFast.save_pretrained`` write). Its ``tokenizer.json`` replaces the trained BPE (special tokens
added as the model expects, ids stored shifted by one so that 0 stays padding: :data:`PRETRAINED_ID_OFFSET`), and
:class:`PretrainedTextEncoder` turns the ids into the model's last hidden states without training it. The folder is
identified by :func:`pretrained_digest` (a sha256 over every file's name and sha256), which enters the stage keys
and is checked again whenever the encoder is loaded. Loading never unpickles: weights are read with
``use_safetensors=True`` (a folder with only ``pytorch_model.bin`` is refused), no remote code is trusted, and
nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infra.errors import PermanentError

PAD, UNK = "<pad>", "<unk>"
PAD_ID = 0
FILENAME = "text_tokenizer.json"
PRETRAINED_ID_OFFSET = 1  # stored id = the pretrained tokenizer's id + 1 (0 stays padding)
MAX_PRETRAINED_FILES = 64  # a model folder with more files than this is not the folder meant


class TextTokenizerError(PermanentError, ValueError):
    """A caption tokenizer file is missing, damaged or not the one a model was trained with."""


class CaptionTokenizer:
    """A caption tokenizer: a trained BPE, or (``offset=1``) a pretrained encoder's ``tokenizer.json`` whose ids are
    stored shifted by one (see the module docstring)."""

    def __init__(self, tokenizer: object, offset: int = 0) -> None:
        self._tok = tokenizer
        self.offset = offset
        if offset > 0:
            # a saved tokenizer.json may pad to the longest caption of a batch and truncate (many Hub tokenizers
            # do): a caption's ids would then depend on its neighbours and padding would not read 0. Ids are
            # padded and cut here, to the configured length.
            tokenizer.no_padding()  # type: ignore[attr-defined]
            tokenizer.no_truncation()  # type: ignore[attr-defined]
        if offset == 0 and tokenizer.token_to_id(PAD) != PAD_ID:  # type: ignore[attr-defined]
            raise TextTokenizerError(f"the caption tokenizer's {PAD} id is not {PAD_ID}")
        if self.vocab_size > 65535:
            raise TextTokenizerError(f"the caption tokenizer has {self.vocab_size - offset} ids; at most "
                                     f"{65535 - offset} fit the uint16 ids the token databases store")

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
    def load(cls, path: str | Path, expected_sha256: str | None = None, *, offset: int = 0) -> CaptionTokenizer:
        """The tokenizer saved at ``path`` (``offset=1``: a pretrained encoder's, see the module docstring)."""
        from tokenizers import Tokenizer

        from infra.storage import sha256_file

        p = Path(path)
        if not p.is_file():
            raise TextTokenizerError(f"caption tokenizer {p} does not exist (rerun the tokenize stage)")
        if expected_sha256 is not None and sha256_file(p) != expected_sha256:
            raise TextTokenizerError(f"caption tokenizer {p} does not match the sha256 its model was trained with")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # the library raises its own exception types for a malformed file
            raise TextTokenizerError(f"caption tokenizer {p} cannot be read: {e}") from e
        return cls(tok, offset)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CaptionTokenizer:
        """The ``tokenizer.json`` of a pretrained encoder's folder (ids shifted by :data:`PRETRAINED_ID_OFFSET`)."""
        return cls.load(pretrained_files(directory)["tokenizer.json"], offset=PRETRAINED_ID_OFFSET)

    def save(self, path: str | Path) -> None:
        from infra.storage import atomic_write_bytes

        atomic_write_bytes(Path(path), self._tok.to_str().encode())  # type: ignore[attr-defined]

    @property
    def vocab_size(self) -> int:
        """Stored ids are below this (padding included)."""
        return int(self._tok.get_vocab_size()) + self.offset  # type: ignore[attr-defined]

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, int]:
        """``[n, max_len]`` uint16 ids (0-padded) and how many captions were cut. A pretrained tokenizer adds the
        special tokens its model was trained with (e.g. CLIP's start and end of text)."""
        out = np.zeros((len(captions), max_len), np.uint16)
        cut = 0
        if captions:
            encs = self._tok.encode_batch(list(captions), add_special_tokens=self.offset > 0)  # type: ignore[attr-defined]
            for i, enc in enumerate(encs):
                ids = enc.ids
                cut += len(ids) > max_len
                out[i, :min(len(ids), max_len)] = np.asarray(ids[:max_len], np.int64) + self.offset
        return out, cut

    def prompt_ids(self, prompt: str, max_len: int, n: int) -> tuple[Any, bool]:
        """``[n, max_len]`` int64 torch ids of one prompt for ``n`` samples, and whether it was cut."""
        import torch

        ids, cut = self.encode([prompt], max_len)
        return torch.from_numpy(ids.astype(np.int64)).expand(n, -1), bool(cut)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of one row of ids (padding and special tokens dropped)."""
        kept = [int(i) - self.offset for i in ids if int(i) != PAD_ID]
        return self._tok.decode(kept, skip_special_tokens=True).strip()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------- frozen pretrained encoder


def pretrained_files(directory: str | Path) -> dict[str, Path]:
    """The files of a pretrained encoder's folder by relative name; :class:`TextTokenizerError` when it is not a
    usable folder (missing, no ``config.json`` / ``tokenizer.json`` / safetensors weights)."""
    d = Path(directory)
    if not d.is_dir():
        raise TextTokenizerError(f"text.pretrained={d}: no such directory (a local folder in the Hugging Face layout: "
                                 "config.json, model.safetensors, tokenizer.json; nothing is downloaded)")
    files = {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)}
    if len(files) > MAX_PRETRAINED_FILES:
        raise TextTokenizerError(f"text.pretrained={d}: {len(files)} files; a text model folder has a handful "
                                 "(is this the right directory?)")
    missing = [n for n in ("config.json", "tokenizer.json") if n not in files]
    if not any(n.endswith(".safetensors") for n in files):
        pickled = [n for n in files if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        missing.append("*.safetensors weights" + (f" ({', '.join(pickled)} are pickles and are never loaded; "
                                                  "convert them with safetensors)" if pickled else ""))
    if missing:
        raise TextTokenizerError(f"text.pretrained={d}: {', '.join(missing)} missing (save the model and its fast "
                                 "tokenizer with save_pretrained)")
    return files


def pretrained_max_positions(config_json: str | Path) -> int | None:
    """The positions of the text model a folder's ``config.json`` describes (a dual model's text tower), or None
    where it sets no limit (relative positions, as T5's)."""
    import json

    try:
        doc = json.loads(Path(config_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TextTokenizerError(f"{config_json} cannot be read as JSON: {e}") from e
    if not isinstance(doc, dict):
        raise TextTokenizerError(f"{config_json} is not a model config (a JSON object)")
    text = doc["text_config"] if isinstance(doc.get("text_config"), dict) else doc
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


_FILE_SHA256: dict[tuple[str, int, int, int, int], str] = {}  # _stamp(path) -> sha256, in this process


def _stamp(path: Path) -> tuple[str, int, int, int, int]:
    """A file's identity and state: a write changes the size or the times (the change time too, which no tool
    can set back, unlike the modification time that ``rsync -t`` or ``tar`` restore)."""
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def pretrained_digest(directory: str | Path) -> str:
    """sha256 over the name and sha256 of every file of a pretrained encoder's folder (dot files aside).

    One process asks for it several times per run (the tokenize key, the stage, the Stackformer plan, each load),
    and a text model's weights are hundreds of MB: a file's sha256 is computed once per process and reused while
    its inode, size, modification and change times are unchanged."""
    import hashlib

    from infra.storage import sha256_file

    h = hashlib.sha256()
    for name, path in pretrained_files(directory).items():
        stamp = _stamp(path)
        if stamp not in _FILE_SHA256:
            digest = sha256_file(path)
            if _stamp(path) == stamp:  # not written to while it was read
                _FILE_SHA256[stamp] = digest
        else:
            digest = _FILE_SHA256[stamp]
        h.update(f"{name}\t{digest}\n".encode())
    return h.hexdigest()


def load_pretrained_encoder(directory: str | Path, expected_digest: str | None = None) -> PretrainedTextEncoder:
    """The frozen encoder of a pretrained folder (verified against ``expected_digest`` when given), in eval mode."""
    d = Path(directory)
    if expected_digest is None:
        pretrained_files(d)  # the folder checks alone
    elif pretrained_digest(d) != expected_digest:
        raise TextTokenizerError(f"text encoder {d} changed since the model was trained on it (digest differs); "
                                 "restore the folder or retrain")
    try:
        import transformers
    except ImportError as e:
        raise TextTokenizerError("text.pretrained needs the transformers package: pip install 'mqgen[hf]'") from e
    transformers.logging.set_verbosity_error()  # its load report and progress bars are not ours to print
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(d), local_files_only=True, use_safetensors=True,
                                                       trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise TextTokenizerError(f"text encoder {d} cannot be loaded: {e}") from e
    return PretrainedTextEncoder(model)


class PretrainedTextEncoder:
    """A frozen Hugging Face text model as the caption encoder of a generator: ``[B, T]`` stored ids (0 =
    padding, else the model's id + 1) -> ``[B, T, width]`` last hidden states.

    A plain callable that owns a module but is not one itself, so a generator holding it does not register its
    weights: they are not trained, not in the generator's state dict or checkpoints (the folder, identified by its
    digest, is), and not synchronised by distributed training. A text-only part is taken from a dual model (CLIP's
    ``text_model``) and the encoder of an encoder-decoder (T5). Rows of padding only (the null caption of
    guidance) are encoded with their first position attendable; the generator replaces their states by a learned
    null prefix.
    """

    def __init__(self, model: object) -> None:
        import torch

        module = model
        if hasattr(model, "get_text_features") and hasattr(model, "text_model"):  # a dual model: its text tower
            module = model.text_model
        elif getattr(model.config, "is_encoder_decoder", False):  # an encoder-decoder: its encoder
            module = model.get_encoder()
        module.eval().requires_grad_(False)
        self.module = module
        get = getattr(module, "get_input_embeddings", None)  # (a text tower of transformers 4 is a bare module)
        embeddings = get() if callable(get) else getattr(getattr(module, "embeddings", None), "token_embedding", None)
        if embeddings is None or not hasattr(embeddings, "num_embeddings"):
            raise TextTokenizerError(f"{type(module).__name__}: no token embedding table found; text.pretrained takes "
                                     "a text encoder (CLIP's text model, BERT-like, T5's encoder)")
        # the states' width is the hidden size, which a factorised embedding (ALBERT) makes wider than the table
        config = getattr(module, "config", None)
        self.width = int(getattr(config, "hidden_size", None) or embeddings.embedding_dim)
        self.vocab_size = int(embeddings.num_embeddings)
        self._torch = torch

    def to(self, *args: object, **kwargs: object) -> PretrainedTextEncoder:
        self.module.to(*args, **kwargs)
        return self

    def __call__(self, ids: object) -> object:
        torch = self._torch
        keep = ids != PAD_ID
        hf_ids = (ids - PRETRAINED_ID_OFFSET).clamp_min(0)  # padding reads id 0, masked out of the keys
        if int(hf_ids.max()) >= self.vocab_size:
            raise ValueError(f"caption ids reach {int(hf_ids.max())}, beyond the text encoder's {self.vocab_size} "
                             "embeddings: its tokenizer.json and weights do not belong together")
        keep[:, 0] = True
        with torch.no_grad():
            out = self.module(input_ids=hf_ids, attention_mask=keep.long())
        return out.last_hidden_state
