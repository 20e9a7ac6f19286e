"""The stage contract: what each stage receives (``<Stage>Inputs``) and what it leaves (``<Stage>Output``).

A stage never looks for its own upstream and never imports another stage: ``flows/pipeline.py`` holds the stage
graph, resolves every input reference and calls ``run(cfg, inputs, *, force=False)``. References are small,
frozen and JSON-serialisable (paths, hashes, counts, run ids, model configs), never tensors; Prefect stores
them with its JSON serializer and every stage writes its own as ``_SUCCESS.json``.

Facts derived from an upstream output are read from its reference (``TokenizerOutput.mqvae_config``,
``.seq_len``, ``.grid_size``, ``.codebook_size``, ``.keep_ratio``), not recomputed from the pipeline config: the
reference says what was *trained*, the config only what was asked for.

The loaders at the end rebuild a trained model from its reference after verifying the weights' sha256.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

    from infra.text import CaptionTokenizer
    from models.mqvae import MQVAE, MQVAEConfig
    from models.stackformer import FullGridTransformer, Stackformer


class Ref:
    """Mixin for frozen dataclass stage references: a JSON round trip, nothing else."""

    def to_dict(self) -> dict[str, Any]:
        assert is_dataclass(self)
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class IngestOutput(Ref):
    """Reference to a complete ingest output (what downstream stages receive)."""

    path: str  # the stage directory holding the shards and manifest.json
    key: str
    manifest_sha256: str
    num_train: int
    num_val: int
    num_classes: int  # 0 when unlabelled
    image_size: int
    channels: int
    mlflow_run_id: str
    captioned: bool = False  # every sample has a caption (.txt member)
    caption_grammar: str | None = None  # "shapes": the captions follow infra.shapes' grammar


@dataclass(frozen=True)
class TokenizerOutput(Ref):
    """Reference to a trained MQ-VAE: weights (safetensors) + the model config needed to rebuild it."""

    path: str
    key: str
    weights: str
    sha256: str
    step: int
    model_config: dict[str, Any]  # fields of models.mqvae.MQVAEConfig
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str = ""

    @cached_property
    def mqvae_config(self) -> MQVAEConfig:
        """The trained model's config (validated once, when first read)."""
        from models.mqvae import MQVAEConfig

        mc = dict(self.model_config)
        mc["ch_mult"] = tuple(mc["ch_mult"])
        mc["attn_resolutions"] = tuple(mc["attn_resolutions"])
        return MQVAEConfig(**mc)

    @property
    def grid_size(self) -> int:
        return self.mqvae_config.grid_size

    @property
    def seq_len(self) -> int:
        """Codes per image: the kept positions."""
        return self.mqvae_config.num_kept

    @property
    def codebook_size(self) -> int:
        return self.mqvae_config.codebook_size

    @property
    def keep_ratio(self) -> float:
        return self.mqvae_config.keep_ratio


@dataclass(frozen=True)
class TokenizeOutput(Ref):
    """Reference to the token databases of one (tokenizer, ingest output) pair."""

    path: str  # stage directory: train.lmdb/, val.lmdb/, _SUCCESS.json
    key: str
    num_train: int
    num_val: int
    train_db: str
    val_db: str
    metadata: dict[str, dict[str, Any]]  # split -> TokenMeta fields
    checksum: str  # sha256 of "train <records_sha256>\nval <records_sha256>\n"
    mlflow_run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    # captioned data: the caption tokenizer (tokenizer.json of infra.text) whose ids the records hold
    text_tokenizer: str = ""
    text_tokenizer_sha256: str = ""
    # text.pretrained: the frozen encoder folder whose tokenizer made the ids, and its infra.text.pretrained_digest
    text_encoder: str = ""
    text_encoder_digest: str = ""

    def db(self, split: str) -> str:
        return {"train": self.train_db, "val": self.val_db}[split]

    @property
    def text_len(self) -> int:
        """Caption ids per record (0: the data has no captions)."""
        return int(self.metadata["train"].get("text_len", 0))

    @property
    def text_vocab_size(self) -> int:
        return int(self.metadata["train"].get("text_vocab_size", 0))


@dataclass(frozen=True)
class EvaluatorOutput(Ref):
    """Reference to a trained evaluator classifier (the feature extractor of the classifier FID/KID/IS)."""

    path: str
    key: str
    weights: str  # model.safetensors (architecture + classes in its header)
    sha256: str
    extractor_name: str  # torch-fidelity registry name, e.g. "classifier-fashion-mnist"
    num_classes: int
    val_accuracy: float  # top-1 accuracy on the first ``num_val`` val images
    image_size: int
    channels: int
    mlflow_run_id: str
    source: str = ""  # data.source it was trained on
    step: int = 0
    num_val: int = 0
    classes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    caption_grammar: str | None = None  # the classifier also has the attribute heads of this caption grammar


@dataclass(frozen=True)
class StackformerOutput(Ref):
    """Reference to a trained Stackformer or full-grid baseline: weights (safetensors) + what rebuilds it."""

    path: str  # stage directory
    key: str
    weights: str  # <path>/model.safetensors (final weights)
    sha256: str  # of the weights file
    step: int  # optimiser steps taken
    model: str  # "stackformer" | "fullgrid"
    model_config: dict[str, Any]  # fields of StackformerConfig / FullGridConfig
    metrics: dict[str, float] = field(default_factory=dict)  # last reported train and val figures
    mlflow_run_id: str = ""
    tokenizer_sha256: str = ""  # the MQ-VAE whose tokens the model was trained on (decodes its samples)
    num_classes: int = 0  # 0 = unconditional
    # a text-conditional model: the caption tokenizer (infra.text) whose ids it reads, copied beside its weights
    text_tokenizer: str = ""
    text_tokenizer_sha256: str = ""
    # one reading a frozen pretrained encoder (model_config text_width > 0): its folder and digest (not copied)
    text_encoder: str = ""
    text_encoder_digest: str = ""

    @property
    def text_len(self) -> int:
        """Caption ids the model reads (0: not text-conditional)."""
        return int(self.model_config.get("text_len", 0)) if self.model_config.get("text_vocab_size") else 0

    @property
    def tokens_per_image(self) -> int:
        mc = self.model_config
        return int(mc["seq_len"] if self.model == "stackformer" else mc["grid_size"] ** 2)


@dataclass(frozen=True)
class EvaluateOutput(Ref):
    """Reference to a complete evaluation: ``evaluation.json`` and the figures in it."""

    path: str
    key: str
    evaluation_json: str
    metrics: dict[str, float | None]  # every figure; None = unavailable (see evaluation.json "unavailable")
    mlflow_run_id: str
    extractor: str = ""  # the feature extractor behind FID/KID/IS ("" when none was available)
    num_samples: int = 0


# --------------------------------------------------------------------------------------------- inputs
# One class per stage; each field is named after the stage whose output it holds (the flow fills them from
# its stage graph), so ``<Stage>Inputs(**{name: refs[name] for name in GRAPH[stage]})`` builds one.


@dataclass(frozen=True)
class IngestInputs(Ref):
    """ingest reads only the config (its data section)."""


@dataclass(frozen=True)
class TokenizerInputs(Ref):
    ingest: IngestOutput


@dataclass(frozen=True)
class TokenizeInputs(Ref):
    ingest: IngestOutput
    train_tokenizer: TokenizerOutput


@dataclass(frozen=True)
class EvaluatorInputs(Ref):
    ingest: IngestOutput


@dataclass(frozen=True)
class StackformerInputs(Ref):
    tokenize: TokenizeOutput
    train_tokenizer: TokenizerOutput  # decodes the samples logged during training


@dataclass(frozen=True)
class EvaluateInputs(Ref):
    ingest: IngestOutput  # the reference images
    train_tokenizer: TokenizerOutput
    train_stackformer: StackformerOutput
    train_evaluator: EvaluatorOutput | None = None  # None: no classifier (another extractor, or unlabelled data)


# --------------------------------------------------------------------------------------------- loaders


def _verified(weights: str, sha256: str) -> str:
    from infra.storage import UnsafeCheckpointError, sha256_file

    actual = sha256_file(weights)
    if actual != sha256:
        raise UnsafeCheckpointError(f"{weights}: sha256 {actual[:12]} != reference {sha256[:12]}")
    return weights


def _loaded(model: Any, weights: str, sha256: str, device: torch.device | str) -> Any:
    """``model`` with the verified weights loaded strictly, on ``device``, in eval mode."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(_verified(weights, sha256)), strict=True)
    return model.to(device).eval()


def load_tokenizer(ref: TokenizerOutput, device: torch.device | str = "cpu") -> MQVAE:
    """The trained MQ-VAE of ``ref`` (weights verified against its sha256, strict load), in eval mode."""
    from models.mqvae import MQVAE

    return _loaded(MQVAE(ref.mqvae_config), ref.weights, ref.sha256, device)


def new_generator(kind: str, model_config: dict[str, Any], text_encoder: Any = None
                  ) -> Stackformer | FullGridTransformer:
    """A freshly initialised generator of ``kind`` from its config fields (draws from the global torch RNG);
    ``text_encoder``: the frozen encoder (:func:`infra.text.load_pretrained_encoder`) of a config with
    ``text_width > 0``."""
    from models.stackformer import FullGridConfig, FullGridTransformer, Stackformer, StackformerConfig

    if kind == "stackformer":
        return Stackformer(StackformerConfig(**model_config), text_encoder)
    if kind == "fullgrid":
        return FullGridTransformer(FullGridConfig(**model_config), text_encoder)
    raise ValueError(f"unknown model kind {kind!r}; allowed: 'stackformer', 'fullgrid'")


_WithEncoder = TypeVar("_WithEncoder", "TokenizeOutput", "StackformerOutput")


def at_configured_encoder(ref: _WithEncoder | None, folder: str) -> _WithEncoder | None:
    """``ref`` reading its frozen text encoder from ``folder``, the config's ``text.pretrained``. A stage key holds
    the folder's digest, not its path, so an output found for the config was made with these very files, maybe
    at another path (the folder moved since, or another user's copy on a shared root): read them where they are."""
    if ref is not None and ref.text_encoder and folder and ref.text_encoder != folder:
        return replace(ref, text_encoder=folder)
    return ref


def frozen_text_encoder(folder: str, digest: str) -> Any:
    """The frozen pretrained encoder in ``folder`` (verified against ``digest``), or None when ``folder`` is ""."""
    if not folder:
        return None
    from infra.text import load_pretrained_encoder

    return load_pretrained_encoder(folder, digest)


def load_generator(ref: StackformerOutput, device: torch.device | str = "cpu") -> Stackformer | FullGridTransformer:
    """The trained Stackformer / full-grid model of ``ref`` (sha256 verified, strict load; its frozen text encoder,
    if any, verified against its digest), in eval mode."""
    encoder = frozen_text_encoder(ref.text_encoder, ref.text_encoder_digest)
    return _loaded(new_generator(ref.model, ref.model_config, encoder), ref.weights, ref.sha256, device)


def caption_tokenizer(ref: StackformerOutput) -> CaptionTokenizer:
    """The caption tokenizer a text-conditional generator reads (sha256 verified)."""
    from infra.text import PRETRAINED_ID_OFFSET, CaptionTokenizer

    return CaptionTokenizer.load(ref.text_tokenizer, ref.text_tokenizer_sha256,
                                 offset=PRETRAINED_ID_OFFSET if ref.text_encoder else 0)
