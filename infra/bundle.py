"""Model bundles: a trained model as one self-contained folder, in the layout Hugging Face Hub model repos use.

A bundle is what the MLflow registry stores inside each registered model version (next to MLflow's ``MLmodel``)
and what ``mqgen export`` writes; ``mqgen sample --model DIR`` and the registry loader read it back::

    model_index.json           what the folder holds: components, their classes, weights sha256, data facts
    README.md                  model card (YAML front matter for the Hub; evaluation and provenance when known)
    generator/config.json      Stackformer / full-grid config          (generator bundles only)
    generator/model.safetensors
    generator/text_tokenizer.json  the caption tokenizer                    (text-conditional generators only)
    generator/text_encoder/    a frozen pretrained caption encoder, as given (text.pretrained generators only)
    tokenizer/config.json      MQ-VAE config
    tokenizer/model.safetensors
    evaluation.json            the evaluation behind the card          (when one exists)

A generator bundle carries its tokenizer (the decoder of its samples), so one folder samples images. Nothing in a
bundle is executed or unpickled: configs are JSON, weights safetensors, each checked against the sha256 in
``model_index.json`` (and, for a registered version, against the sha256 the registry recorded at registration).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.refs import StackformerOutput, TokenizerOutput
from infra.storage import (
    UnsafeCheckpointError,
    atomic_copy,
    atomic_write_bytes,
    atomic_write_json,
    sha256_file,
)
from infra.text import FILENAME as TEXT_TOKENIZER
from infra.text import TextTokenizerError, pretrained_digest, pretrained_files

FORMAT = "mqgen.bundle/1"
INDEX = "model_index.json"
CARD = "README.md"
EVALUATION = "evaluation.json"
WEIGHTS = "model.safetensors"
TEXT_ENCODER = "text_encoder"  # a frozen pretrained caption encoder's folder (Hugging Face layout), inside generator/
MAX_JSON_BYTES = 1 << 20  # a config or index larger than this is not ours


class BundleError(UnsafeCheckpointError):
    """A folder that is not a complete, intact mqgen bundle (named, with what is wrong)."""


@dataclass(frozen=True)
class Bundle:
    """A bundle read back: the references that rebuild its models (paths inside the bundle, sha256 checked on
    load by :func:`infra.refs.load_tokenizer` / :func:`infra.refs.load_generator`)."""

    path: Path
    kind: str  # "generator" | "tokenizer"
    tokenizer: TokenizerOutput
    generator: StackformerOutput | None
    index: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes if self.generator is not None else 0

    @property
    def classes(self) -> list[str]:
        return list(self.index.get("data", {}).get("classes") or [])


def _component(out: Path, name: str, weights: str, sha256: str, config: dict[str, Any]) -> dict[str, Any]:
    (out / name).mkdir(parents=True, exist_ok=True)
    target = out / name / WEIGHTS
    atomic_copy(weights, target)
    actual = sha256_file(target)
    if actual != sha256:
        raise BundleError(f"{weights}: sha256 {actual[:12]} != the stage reference's {sha256[:12]}; not bundled")
    atomic_write_json(out / name / "config.json", config)
    return {"weights": f"{name}/{WEIGHTS}", "config": f"{name}/config.json", "sha256": sha256}


def write_bundle(out: str | Path, *, tokenizer: TokenizerOutput, generator: StackformerOutput | None = None,
                 data: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None,
                 evaluation: dict[str, Any] | None = None, name: str = "") -> Path:
    """Write a bundle of ``tokenizer`` (and ``generator``) into the empty or missing folder ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new folder (a bundle is never written over files)")
    out.mkdir(parents=True, exist_ok=True)
    components = {"tokenizer": {"class": "mqvae", "step": tokenizer.step, "mlflow_run_id": tokenizer.mlflow_run_id,
                                "metrics": tokenizer.metrics,
                                **_component(out, "tokenizer", tokenizer.weights, tokenizer.sha256,
                                             tokenizer.model_config)}}
    if generator is not None:
        if generator.tokenizer_sha256 and generator.tokenizer_sha256 != tokenizer.sha256:
            raise BundleError(f"the generator was trained on tokenizer {generator.tokenizer_sha256[:12]}, not on "
                              f"{tokenizer.sha256[:12]}")
        components["generator"] = {"class": generator.model, "step": generator.step, "num_classes":
                                   generator.num_classes, "tokens_per_image": generator.tokens_per_image,
                                   "mlflow_run_id": generator.mlflow_run_id, "metrics": generator.metrics,
                                   **_component(out, "generator", generator.weights, generator.sha256,
                                                generator.model_config)}
        if generator.text_tokenizer:  # a text-conditional generator reads captions through its own tokenizer
            target = out / "generator" / TEXT_TOKENIZER
            atomic_copy(generator.text_tokenizer, target)
            if sha256_file(target) != generator.text_tokenizer_sha256:
                raise BundleError(f"{generator.text_tokenizer}: sha256 differs from the stage reference's; not bundled")
            components["generator"].update(text_tokenizer=f"generator/{TEXT_TOKENIZER}",
                                           text_tokenizer_sha256=generator.text_tokenizer_sha256)
        if generator.text_encoder:  # a frozen pretrained encoder: copied whole, so the folder samples offline
            target = out / "generator" / TEXT_ENCODER
            for rel, src in pretrained_files(generator.text_encoder).items():  # what the digest reads, as files
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                atomic_copy(src, target / rel)
            if pretrained_digest(target) != generator.text_encoder_digest:
                raise BundleError(f"{generator.text_encoder}: the text encoder changed since the model was trained "
                                  "on it (digest differs); not bundled")
            components["generator"].update(text_encoder=f"generator/{TEXT_ENCODER}",
                                           text_encoder_digest=generator.text_encoder_digest)
    index = {"format": FORMAT, "name": name, "kind": "generator" if generator is not None else "tokenizer",
             "library_name": "mqgen", "components": components, "data": data or {}, "provenance": provenance or {}}
    if evaluation is not None:
        atomic_write_json(out / EVALUATION, evaluation)
        index["evaluation"] = EVALUATION
    atomic_write_json(out / INDEX, index)
    atomic_write_bytes(out / CARD, model_card(index, evaluation).encode())
    return out


def _json(path: Path) -> Any:
    if not path.is_file():
        raise BundleError(f"{path.parent}: {path.name} is missing (not an mqgen bundle)")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes is too large for a bundle's JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None


def _inside(root: Path, rel: Any) -> Path:
    """``root/rel`` when ``rel`` is a relative path that stays inside ``root``."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{root / INDEX}: a component path is missing")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BundleError(f"{root / INDEX}: {rel!r} points outside the bundle")
    return path


def read_bundle(path: str | Path, *, expected_sha256: dict[str, str] | None = None) -> Bundle:
    """The bundle in ``path``, every file checked against the sha256 in its index (and ``expected_sha256``,
    component -> sha256, e.g. what the registry recorded); :class:`BundleError` naming what is wrong."""
    root = Path(path)
    index = _json(root / INDEX)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise BundleError(f"{root / INDEX}: format {index.get('format') if isinstance(index, dict) else None!r}, "
                          f"expected {FORMAT!r}")
    comps = index.get("components")
    if not isinstance(comps, dict) or "tokenizer" not in comps:
        raise BundleError(f"{root / INDEX}: no tokenizer component")
    refs: dict[str, Any] = {}
    for name, comp in comps.items():
        if name not in ("tokenizer", "generator") or not isinstance(comp, dict):
            raise BundleError(f"{root / INDEX}: unknown component {name!r}")
        weights, config = _inside(root, comp.get("weights")), _json(_inside(root, comp.get("config")))
        sha = comp.get("sha256")
        if expected_sha256 and name in expected_sha256 and expected_sha256[name] != sha:
            raise BundleError(f"{root}: the {name}'s sha256 {str(sha)[:12]} is not the registered "
                              f"{expected_sha256[name][:12]}")
        if not weights.is_file():
            raise BundleError(f"{root}: {comp.get('weights')} is missing")
        actual = sha256_file(weights)
        if actual != sha:
            raise BundleError(f"{weights}: sha256 {actual[:12]} != {str(sha)[:12]} in {INDEX} (altered or truncated)")
        try:
            if name == "tokenizer":
                refs[name] = TokenizerOutput(path=str(root), key="bundle", weights=str(weights), sha256=actual,
                                             step=int(comp.get("step", 0)), model_config=config,
                                             metrics=dict(comp.get("metrics") or {}),
                                             mlflow_run_id=str(comp.get("mlflow_run_id", "")))
                refs[name].mqvae_config  # noqa: B018 - validates the config now, with the bundle named
            else:
                text_tok, text_sha = "", ""
                if comp.get("text_tokenizer"):
                    tpath = _inside(root, comp["text_tokenizer"])
                    text_sha = str(comp.get("text_tokenizer_sha256", ""))
                    if not tpath.is_file() or sha256_file(tpath) != text_sha:
                        raise BundleError(f"{root}: {comp['text_tokenizer']} is missing or does not match its sha256 "
                                          f"in {INDEX}")
                    text_tok = str(tpath)
                text_enc, text_digest = "", ""
                if comp.get("text_encoder"):
                    epath = _inside(root, comp["text_encoder"])
                    text_digest = str(comp.get("text_encoder_digest", ""))
                    try:
                        outside = [n for n, p in pretrained_files(epath).items()
                                   if not p.resolve().is_relative_to(root.resolve())]
                        if outside:
                            raise BundleError(f"{root}: {comp['text_encoder']}/{outside[0]} points outside the bundle")
                        ok = pretrained_digest(epath) == text_digest
                    except TextTokenizerError:
                        ok = False
                    if not ok:
                        raise BundleError(f"{root}: {comp['text_encoder']} is missing or does not match its digest "
                                          f"in {INDEX}")
                    text_enc = str(epath)
                refs[name] = StackformerOutput(
                    path=str(root), key="bundle", weights=str(weights), sha256=actual, step=int(comp.get("step", 0)),
                    model=str(comp.get("class")), model_config=config, metrics=dict(comp.get("metrics") or {}),
                    mlflow_run_id=str(comp.get("mlflow_run_id", "")), tokenizer_sha256=comps["tokenizer"]["sha256"],
                    num_classes=int(comp.get("num_classes", 0)), text_tokenizer=text_tok,
                    text_tokenizer_sha256=text_sha, text_encoder=text_enc, text_encoder_digest=text_digest)
        except (TypeError, ValueError) as e:
            raise BundleError(f"{root / str(comp.get('config'))}: not a valid {name} config ({e})") from None
    return Bundle(path=root, kind="generator" if "generator" in refs else "tokenizer", tokenizer=refs["tokenizer"],
                  generator=refs.get("generator"), index=index)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(index: dict[str, Any], evaluation: dict[str, Any] | None) -> str:
    """The README.md of a bundle: Hub front matter, what the model is, its evaluation and where it came from."""
    comps = index["components"]
    gen = comps.get("generator")
    data = index.get("data") or {}
    tags = ["mqgen", "image-generation", "vector-quantization", "masked-vq"]
    lines = ["---", "library_name: mqgen", "pipeline_tag: unconditional-image-generation" if not (gen and
             gen.get("num_classes")) else "pipeline_tag: image-generation", "tags:", *[f"- {t}" for t in tags]]
    if data.get("source"):
        lines += ["datasets:", f"- {data['source']}"]
    lines += ["---", "", f"# {index.get('name') or 'mqgen model'}", ""]
    if gen:
        lines.append(f"A {gen['class']} generator ({gen['tokens_per_image']} tokens per image"
                     f"{', ' + str(gen['num_classes']) + ' classes' if gen.get('num_classes') else ', unconditional'}) "
                     "over the codes of an MQ-VAE tokenizer (masked vector quantization: only the most important "
                     "latent regions are quantized and generated).")
    else:
        lines.append("An MQ-VAE tokenizer (masked vector quantization).")
    tok = json.dumps({k: comps["tokenizer"].get(k) for k in ("step", "sha256")})
    lines += ["", (f"Images: {data.get('image_size', '?')} px, {data.get('channels', '?')} channel(s). "
                   f"Tokenizer: {tok}."), "", "Sample with `mqgen sample --model <this folder> --n 64 --out grid.png`.", ""]
    if evaluation:
        m = evaluation.get("metrics") or {}
        interval = evaluation.get("fid_interval") or {}
        lines += ["## Evaluation", "", (f"Extractor: `{evaluation.get('extractor')}`; {evaluation.get('n')} samples "
                                        f"against {evaluation.get('set_sizes', {}).get('reference')} reference images."),
                  "",
                  "| figure | value |", "|---|---|"]
        for k in ("fid", "kid_mean", "isc_mean", "recon_psnr", "recon_ssim", "rfid", "sample_class_accuracy",
                  "sampling_images_per_s"):
            if m.get(k) is not None:
                lines.append(f"| {k} | {_fmt(m[k])} |")
        if interval:
            lines.append(f"| fid {int(100 * interval.get('level', 0.95))}% bootstrap interval | "
                         f"{_fmt(interval.get('low'))} .. {_fmt(interval.get('high'))} |")
        lines.append("")
    prov = index.get("provenance") or {}
    if prov:
        lines += ["## Provenance", "", "```json", json.dumps(prov, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
