"""The MLflow model registry: trained models as registered versions, the promotion gate, loading by alias.

- :func:`register` (called by each training stage): the stage's model as an MLflow model (a ``pyfunc`` logged
  as model code, :mod:`infra.mlflow_pyfunc`, with a signature; inside it the :mod:`infra.bundle` folder with the
  safetensors weights and the JSON configs that rebuild it), linked to the stage run, registered as a new version
  of ``mqgen-tokenizer-<name>`` / ``mqgen-stackformer-<name>`` (:meth:`infra.config.RegistrySection.model_name`).
  Registering the same weights from the same run again returns the existing version.
- :func:`record_evaluation` + :func:`promote` (called by the flow after ``evaluate``): the evaluation's FID and
  its bootstrap standard error are stored on the version under the evaluation *protocol* (extractor and its
  weights, reference set, number of samples); the version takes the alias (``champion``) when it beats the
  current holder on the same protocol by more than the noise (:class:`~infra.config.RegistrySection`). The
  decision, both figures and the threshold are recorded on the version, the pipeline run and the evaluate run.
- :func:`load_bundle` resolves ``champion`` / ``models:/name@alias`` / ``models:/name/3`` / a folder to a
  verified :class:`~infra.bundle.Bundle` (weights checked against the sha256 recorded at registration).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.bundle import Bundle, BundleError, read_bundle, write_bundle
from infra.config import PipelineConfig, stable_hash
from infra.errors import PermanentError
from infra.secrets import redact_text

log = logging.getLogger("mqgen.registry")

PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
TAG_SHA = "mqgen.weights_sha256"
TAG_TOKENIZER_SHA = "mqgen.tokenizer_sha256"
TAG_TEXT = "mqgen.text_sha256"  # a text-conditional generator: "<caption tokenizer sha256> <frozen encoder digest>"
TAG_KIND = "mqgen.kind"
TAG_DECISION = "mqgen.promotion"
EVAL_PREFIX = "mqgen.eval."  # + <protocol>.<field>


class ModelNotFound(PermanentError, LookupError):
    """No registered model, version, alias or bundle folder answers to what was asked."""


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]


def _client(tracker: Any) -> Any:
    return tracker.client


def _signature(kind: str, tokenizer: Any, generator: Any) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    mc = tokenizer.mqvae_config
    images = TensorSpec(np.dtype("uint8"), (-1, mc.in_channels, mc.resolution, mc.resolution), "images")
    if kind == "tokenizer":
        return ModelSignature(inputs=Schema([images]), outputs=Schema([TensorSpec(np.dtype("int64"),
                                                                                  (-1, 2, mc.num_kept))]))
    return ModelSignature(inputs=Schema([ColSpec("long", "n"), ColSpec("long", "class", required=False),
                                         ColSpec("long", "seed", required=False),
                                         ColSpec("double", "guidance_scale", required=False),
                                         ColSpec("string", "prompt", required=False)]),
                          outputs=Schema([images]))


@contextlib.contextmanager
def _warnings_to_log() -> Iterator[None]:
    """Warnings shown in the block go to the log file, not the console. (MLflow forces its type-hint advice to
    show with its own ``catch_warnings``, so a filter cannot silence it; the display hook can.)"""
    shown = warnings.showwarning

    def to_log(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        log.debug("%s: %s", category.__name__, message, extra={"file_only": True})

    warnings.showwarning = to_log
    try:
        yield
    finally:
        warnings.showwarning = shown


def _find(client: Any, name: str, run_id: str, sha256: str) -> Version | None:
    with contextlib.suppress(Exception):  # no such registered model yet
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if mv.tags.get(TAG_SHA) == sha256:
                return Version(name, str(mv.version), mv.run_id, dict(mv.tags))
    return None


def register(tracker: Any, cfg: PipelineConfig, *, kind: str, run_id: str, tokenizer: Any,
             generator: Any = None, data: dict[str, Any] | None = None) -> Version | None:
    """Log the stage's model on its run ``run_id`` and register it (see the module docstring); None when
    ``registry.enabled`` is false."""
    if not cfg.registry.enabled:
        return None
    import mlflow.pyfunc

    client = _client(tracker)
    name = cfg.registry.model_name(kind, cfg.preset)
    main = generator if generator is not None else tokenizer
    found = _find(client, name, run_id, main.sha256)
    if found is not None:
        return found
    provenance = {"config_hash": cfg.hash(), "preset": cfg.preset, "mlflow_run_id": run_id,
                  "tokenizer_sha256": tokenizer.sha256, **({"generator_sha256": generator.sha256} if generator else {})}
    with tempfile.TemporaryDirectory(prefix="mqgen-model-") as tmp:
        bundle = write_bundle(Path(tmp) / "bundle", tokenizer=tokenizer, generator=generator, data=data,
                              provenance=provenance, name=name)
        model_dir = Path(tmp) / "mlflow-model"
        with _warnings_to_log():  # "add type hints" / "no input example": the signature is given explicitly
            mlflow.pyfunc.save_model(str(model_dir), python_model=str(PYFUNC_CODE), artifacts={"bundle": str(bundle)},
                                     signature=_signature(kind, tokenizer, generator),
                                     pip_requirements=["mqgen[hf]" if generator is not None and generator.text_encoder
                                                       else "mqgen"],  # a frozen HF text encoder needs transformers
                                     metadata={"mqgen_kind": kind, "mqgen_bundle": "artifacts/bundle"})
        logged = client.create_logged_model(tracker.experiment_id, name=kind, source_run_id=run_id,
                                            model_type=f"mqgen-{kind}",
                                            params={"sha256": main.sha256, "step": str(main.step)})
        client.log_model_artifacts(logged.model_id, str(model_dir))
    client.finalize_logged_model(logged.model_id, "READY")
    from mlflow.entities import LoggedModelOutput

    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, int(main.step))])  # the run page's Models column
    try:
        client.create_registered_model(name, description=f"mqgen {kind}s of config {cfg.registry.name or cfg.preset}",
                                       tags={TAG_KIND: kind})
    except Exception as e:  # it exists already (RESOURCE_ALREADY_EXISTS), or another writer made it
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    tags = {TAG_SHA: main.sha256, TAG_TOKENIZER_SHA: tokenizer.sha256, TAG_KIND: kind, "mqgen.step": str(main.step),
            "mqgen.config_hash": cfg.hash()}
    if generator is not None and generator.text_tokenizer:
        tags[TAG_TEXT] = _text_pin(generator)
    mv = client.create_model_version(name, source=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                     tags=tags)
    log.info("registered %s version %s (run %s)", name, mv.version, run_id)
    return Version(name, str(mv.version), run_id, tags)


PENDING = "registration_pending.json"  # in a training stage's output: registered by a later run (server was down)
PROMOTION_PENDING = "promotion_pending.json"  # in the evaluate output: the gate runs again on the next run


def register_trained(tracker: Any, cfg: PipelineConfig, srun: Any, *, kind: str, tokenizer: Any, generator: Any = None,
                     data: dict[str, Any] | None = None) -> Version | None:
    """The end of a training stage: its model registered (:func:`register`) and the version named on the stage
    run; with the registry off, the weights and config logged as plain run artifacts instead.

    A tracking server that does not answer does not fail the stage (its training is done and saved): the
    registration is deferred to the next ``mqgen run`` of the config (:func:`register_pending`), which finds
    :data:`PENDING` in the stage's output, and the gap is recorded on the run (tag ``mqgen.registration``)."""
    main = generator if generator is not None else tokenizer
    try:
        version = register(tracker, cfg, kind=kind, run_id=srun.run_id, tokenizer=tokenizer, generator=generator,
                           data=data)
    except Exception as e:
        if not server_down(tracker):
            raise
        from infra.storage import atomic_write_json

        atomic_write_json(Path(main.path) / PENDING, {"kind": kind, "run_id": srun.run_id, "sha256": main.sha256,
                                                      "data": data, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        log.warning("the MLflow tracking server %s does not answer (%s): the %s is saved in %s and is registered by "
                    "the next `mqgen run` of this config", redact_text(tracker.uri), type(e).__name__, kind, main.path)
        srun.set_tags({"mqgen.registration": "pending (tracking server down)"})
        return None
    if version is None:
        srun.log_artifact(main.weights, "model")
        srun.log_artifact(Path(main.weights).with_name("model_config.json"), "model")
    else:
        srun.set_tags({"mqgen.registered_model": f"{version.name}/{version.version}"})
    return version


def server_down(tracker: Any) -> bool:
    """Whether ``tracker`` talks to a tracking server (http/https) that does not answer now."""
    from infra.tracking import server_answers

    uri = str(getattr(tracker, "uri", ""))
    return uri.startswith(("http://", "https://")) and not server_answers(uri)


def pending(refs: dict[str, Any]) -> list[Path]:
    """The markers of registry work a run left to the next one (:data:`PENDING`, :data:`PROMOTION_PENDING`)."""
    found = []
    for stage, name in (("train_tokenizer", PENDING), ("train_stackformer", PENDING), ("evaluate", PROMOTION_PENDING)):
        path = getattr(refs.get(stage), "path", None)
        if path and "://" not in str(path) and (Path(path) / name).is_file():
            found.append(Path(path) / name)
    return found


def register_pending(tracker: Any, cfg: PipelineConfig, refs: dict[str, Any]) -> list[Version]:
    """Register the models whose training stage found the tracking server down (see :func:`register_trained`);
    each marker goes once its version exists."""
    done = []
    client = _client(tracker)
    for stage in ("train_tokenizer", "train_stackformer"):
        ref = refs.get(stage)
        marker = Path(getattr(ref, "path", "") or ".") / PENDING
        if ref is None or not marker.is_file():
            continue
        doc = json.loads(marker.read_text())
        if doc.get("sha256") != ref.sha256:  # the stage was retrained since: its own run registered it
            marker.unlink()
            continue
        generator = ref if doc["kind"] == "stackformer" else None
        version = register(tracker, cfg, kind=doc["kind"], run_id=doc["run_id"], tokenizer=refs["train_tokenizer"],
                           generator=generator, data=doc.get("data"))
        if version is not None:
            for k, v in {"mqgen.registered_model": f"{version.name}/{version.version}",
                         "mqgen.registration": "registered by a later run"}.items():
                client.set_tag(doc["run_id"], k, v)
            log.info("registered %s version %s, deferred from run %s", version.name, version.version, doc["run_id"])
            done.append(version)
        marker.unlink()
    return done


def find_version(tracker: Any, cfg: PipelineConfig, kind: str, run_id: str, sha256: str) -> Version | None:
    return _find(_client(tracker), cfg.registry.model_name(kind, cfg.preset), run_id, sha256)


def alias_version(tracker: Any, name: str, alias: str) -> Version | None:
    try:
        mv = _client(tracker).get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no such model or alias
        return None
    return Version(name, str(mv.version), mv.run_id, dict(mv.tags))


# --------------------------------------------------------------------------------------------- evaluations


def protocol(evaluation: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two FIDs to be compared: extractor (name, weights), reference set, sample count."""
    info = evaluation.get("extractor_info") or {}
    return {"extractor": evaluation.get("extractor"), "extractor_sha256": info.get("weights_sha256"),
            "reference_set": (evaluation.get("data") or {}).get("reference_set_hash"),
            "reference_images": (evaluation.get("set_sizes") or {}).get("reference"), "samples": evaluation.get("n")}


def protocol_id(evaluation: dict[str, Any]) -> str:
    return stable_hash(protocol(evaluation), length=10)


@dataclass(frozen=True)
class Figure:
    fid: float
    se: float | None  # bootstrap standard error over samples; None without a bootstrap
    low: float | None
    high: float | None
    run_id: str


def record_evaluation(tracker: Any, version: Version, evaluation: dict[str, Any], run_id: str) -> Figure | None:
    """Store the evaluation's FID (and interval) on ``version`` under its protocol; None without an FID."""
    fid = (evaluation.get("metrics") or {}).get("fid")
    if not isinstance(fid, (int, float)) or not math.isfinite(fid):
        return None
    iv = evaluation.get("fid_interval") or {}
    fig = Figure(float(fid), iv.get("std"), iv.get("low"), iv.get("high"), run_id)
    pid = protocol_id(evaluation)
    client = _client(tracker)
    for k, v in {"fid": fig.fid, "se": fig.se, "low": fig.low, "high": fig.high, "run_id": run_id,
                 "protocol": json.dumps(protocol(evaluation), sort_keys=True)}.items():
        if v is not None:
            _set_version_tag(client, version, f"{EVAL_PREFIX}{pid}.{k}", str(v))
    return fig


def _set_version_tag(client: Any, version: Version, key: str, value: str, attempts: int = 4) -> None:
    """Set a tag on a model version, also when another process sets the same key at the same moment (two runs of
    one config finishing together): MLflow's SQL store inserts a new tag after looking for it, so one of two such
    inserts fails on the key's UNIQUE constraint; once the row exists, setting it again is an update."""
    import time

    for attempt in range(attempts):
        try:
            client.set_model_version_tag(version.name, version.version, key, value)
            return
        except Exception as e:
            if attempt == attempts - 1 or not any(w in str(e) for w in ("UNIQUE constraint", "IntegrityError",
                                                                          "duplicate key")):
                raise
            time.sleep(0.1 * (attempt + 1))


def _figure(tags: dict[str, str], pid: str) -> Figure | None:
    p = f"{EVAL_PREFIX}{pid}."
    if p + "fid" not in tags:
        return None

    def num(k: str) -> float | None:
        return float(tags[p + k]) if p + k in tags else None

    return Figure(float(tags[p + "fid"]), num("se"), num("low"), num("high"), tags.get(p + "run_id", ""))


@dataclass(frozen=True)
class Decision:
    decision: str  # "first" | "promoted" | "kept" | "not comparable" | "already champion"
    reason: str
    name: str
    version: str
    alias: str
    new: Figure
    champion_version: str | None = None
    champion: Figure | None = None
    threshold: float | None = None  # the FID drop the new version needed

    @property
    def moved(self) -> bool:
        return self.decision in ("first", "promoted")

    def summary(self) -> str:
        ci = f" ({self.new.low:.3g}..{self.new.high:.3g})" if self.new.low is not None else ""
        champ = (f" vs champion v{self.champion_version} FID {self.champion.fid:.4g}" if self.champion else "")
        return (f"{self.name} v{self.version}: FID {self.new.fid:.4g}{ci}{champ}: {self.decision} "
                f"({self.reason})")

    def tags(self) -> dict[str, str]:
        d = {"decision": self.decision, "reason": self.reason, "model": f"{self.name}/{self.version}",
             "new_fid": self.new.fid, "new_fid_se": self.new.se, "new_fid_low": self.new.low,
             "new_fid_high": self.new.high, "champion_version": self.champion_version,
             "champion_fid": self.champion.fid if self.champion else None,
             "champion_fid_se": self.champion.se if self.champion else None, "threshold": self.threshold}
        return {f"{TAG_DECISION}.{k}": str(v) for k, v in d.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(cfg: PipelineConfig, new: Figure, champion: Figure | None) -> tuple[str, str, float | None]:
    """``(decision, reason, threshold)`` of the gate for ``new`` against the ``champion``'s figure."""
    r = cfg.registry
    if champion is None:
        return "first", "no version held the alias on this evaluation protocol", None
    noise = 0.0
    if r.rule == "interval":
        if new.se is None or champion.se is None:
            return "kept", ("rule=interval needs a bootstrap interval on both (evaluate.fid_bootstrap > 0); "
                            "set registry.rule=point to compare point values"), None
        noise = r.z * math.sqrt(new.se ** 2 + champion.se ** 2)
    threshold = r.margin + noise
    gain = champion.fid - new.fid
    how = (f"FID {new.fid:.4g} vs {champion.fid:.4g}: lower by {gain:.3g}, needed more than {threshold:.3g} "
           f"(margin {r.margin:g}" + (f" + {r.z:g} x standard error of the difference {noise / r.z if r.z else 0:.3g}"
                                     if r.rule == "interval" else "") + ")")
    return ("promoted" if gain > threshold else "kept"), how, threshold


@contextlib.contextmanager
def _lock(cfg: PipelineConfig) -> Iterator[None]:
    if "://" in cfg.run.root:
        yield
        return
    from infra.storage import file_lock

    with file_lock(Path(cfg.run.root) / ".registry.lock", what="the model registry's promotion gate"):
        yield


Rescore = Callable[[Version], tuple[dict[str, Any], str]]


def _rescored(tracker: Any, holder: Version, pid: str, rescore: Rescore | None) -> tuple[Figure | None, str]:
    """The champion's figure on protocol ``pid`` from a fresh evaluation of it (``rescore``: its evaluation dict
    and evaluate run id), recorded on its version; ``(None, why not)`` when it cannot be had."""
    if rescore is None:
        return None, "registry.reevaluate_champion=false"
    try:
        evaluation, run_id = rescore(holder)
    except Exception as e:  # (the run's own model is evaluated; the gate then keeps the champion)
        log.warning("promotion: re-evaluating v%s failed", holder.version, exc_info=True)
        return None, f"re-evaluating it failed ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
    if protocol_id(evaluation) != pid:  # (its evaluation ran on other settings: nothing to compare)
        return None, f"its re-evaluation ran on another protocol ({json.dumps(protocol(evaluation), sort_keys=True)})"
    fig = record_evaluation(tracker, holder, evaluation, run_id)
    return fig, "" if fig is not None else "its re-evaluation has no FID"


def promote(tracker: Any, cfg: PipelineConfig, *, generator: Any, tokenizer_version: Version | None,
            version: Version, evaluation: dict[str, Any], evaluate_run_id: str,
            rescore: Rescore | None = None) -> Decision | None:
    """Record the evaluation on ``version`` and run the promotion gate (under a lock for a local root); None when
    the evaluation has no FID (nothing to compare).

    A champion with no figure on this evaluation's protocol (a retrain on new data: another reference set, another
    evaluator) is first evaluated on it by ``rescore`` (the evaluate stage on the champion's registered weights with
    this run's reference, extractor and sampling seeds), so new data can still promote; without ``rescore``, or when
    that fails, the gate says "not comparable" and keeps the champion."""
    client = _client(tracker)
    alias = cfg.registry.alias
    new = record_evaluation(tracker, version, evaluation, evaluate_run_id)
    if new is None:
        return None
    pid = protocol_id(evaluation)
    rescored: dict[str, str] = {}  # holder version -> why it has no figure after its re-evaluation ("" = it has)
    while True:
        # The champion's re-evaluation (a whole evaluate stage) runs outside the lock; the decision is taken under
        # it on the holder read there, so a gate that moved the alias meanwhile is never overwritten blindly.
        with _lock(cfg):
            holder = alias_version(tracker, version.name, alias)
            pending = (holder is not None and holder.version != version.version and _figure(holder.tags, pid) is None
                       and holder.version not in rescored and rescore is not None)
            if not pending:
                d = _decision(cfg, version, new, evaluation, holder, pid, rescored, rescore is not None)
                if d.moved:
                    client.set_registered_model_alias(version.name, alias, version.version)
                    if tokenizer_version is not None:
                        client.set_registered_model_alias(tokenizer_version.name, alias, tokenizer_version.version)
                if d.decision != "already champion":  # (a re-evaluation keeps the decision that gave it the alias)
                    client.set_model_version_tag(version.name, version.version, TAG_DECISION,
                                                 f"{d.decision}: {d.reason}"[:4000])
                for k, v in d.tags().items():
                    client.set_tag(evaluate_run_id, k, v[:4000])
                break
        _, rescored[holder.version] = _rescored(tracker, holder, pid, rescore)
    log.info("promotion: %s", d.summary())
    return d


def _decision(cfg: PipelineConfig, version: Version, new: Figure, evaluation: dict[str, Any], holder: Version | None,
              pid: str, rescored: dict[str, str], can_rescore: bool) -> Decision:
    """The gate's decision for ``version`` against ``holder`` (read under the lock)."""
    alias = cfg.registry.alias
    if holder is not None and holder.version == version.version:
        return Decision("already champion", f"v{version.version} holds {alias!r} already", version.name,
                        version.version, alias, new, holder.version, new)
    champ = _figure(holder.tags, pid) if holder is not None else None
    if holder is not None and champ is None:
        why_not = (rescored.get(holder.version) or "its re-evaluation left no figure" if can_rescore
                   else "registry.reevaluate_champion=false")
        return Decision("not comparable", f"the {alias} v{holder.version} has no evaluation on this protocol "
                        f"({json.dumps(protocol(evaluation), sort_keys=True)}) and {why_not}; evaluate it with the "
                        "same evaluate settings, or move the alias by hand", version.name, version.version, alias, new,
                        holder.version)
    what, why, threshold = decide(cfg, new, champ)
    if holder is not None and holder.version in rescored:
        why += f"; the {alias} v{holder.version} was re-evaluated on this protocol first"
    return Decision(what, why, version.name, version.version, alias, new, holder.version if holder else None, champ,
                    threshold)


# --------------------------------------------------------------------------------------------- loading


def model_uri(spec: str, cfg: PipelineConfig) -> str:
    """``champion`` (any alias) -> ``models:/mqgen-stackformer-<name>@champion``; ``v3`` / ``3`` -> version 3;
    a ``models:/`` URI unchanged."""
    if spec.startswith("models:/"):
        return spec
    name = cfg.registry.model_name("stackformer", cfg.preset)
    if spec.lstrip("v").isdigit():
        return f"models:/{name}/{spec.lstrip('v')}"
    return f"models:/{name}@{spec}"


def resolve_version(tracker: Any, uri: str) -> Version:
    rest = uri[len("models:/"):]
    client = _client(tracker)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, number = rest.rsplit("/", 1)
            mv = client.get_model_version(name, number)
    except Exception as e:  # noqa: BLE001 - MLflow says RESOURCE_DOES_NOT_EXIST in several ways
        known = [m.name for m in client.search_registered_models(max_results=50)]
        raise ModelNotFound(f"{uri}: not in the registry at {tracker.uri} ({str(e).splitlines()[0][:200]}); "
                            f"registered models: {', '.join(known) or 'none'}") from None
    return Version(mv.name, str(mv.version), mv.run_id, dict(mv.tags))


@contextlib.contextmanager
def load_bundle(spec: str, cfg: PipelineConfig) -> Iterator[tuple[Bundle, Version | None]]:
    """The verified bundle ``spec`` names (a folder, or a registry reference, downloaded to a temporary folder
    that lives as long as the block), and its registered version (None for a folder)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        yield read_bundle(folder), None
        return
    if "/" in spec and not spec.startswith("models:/"):
        raise ModelNotFound(f"{spec}: no such folder (a bundle folder, 'champion', 'v3' or 'models:/NAME@ALIAS')")
    import mlflow.artifacts

    from infra.tracking import Tracker

    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    version = resolve_version(tracker, model_uri(spec, cfg))
    mv = _client(tracker).get_model_version(version.name, version.version)
    with tempfile.TemporaryDirectory(prefix="mqgen-download-") as tmp:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp,
                                                        tracking_uri=tracker.uri))
        bundle_dir = path / "artifacts" / "bundle"
        main = "tokenizer" if version.tags.get(TAG_KIND) == "tokenizer" else "generator"
        expected = {"tokenizer": version.tags.get(TAG_TOKENIZER_SHA, ""), main: version.tags.get(TAG_SHA, "")}
        try:
            bundle = read_bundle(bundle_dir, expected_sha256={k: v for k, v in expected.items() if v})
            pinned = version.tags.get(TAG_TEXT)
            if pinned and (bundle.generator is None or _text_pin(bundle.generator) != pinned):
                raise BundleError("its caption tokenizer or text encoder is not the one registered "
                                  f"({TAG_TEXT} differs)")
        except BundleError as e:
            raise BundleError(f"{version.name} v{version.version}: {e}") from None
        yield bundle, version


def _text_pin(generator: Any) -> str:
    return f"{generator.text_tokenizer_sha256} {generator.text_encoder_digest or '-'}"


class ArtifactAltered(PermanentError, ValueError):
    """An MLflow artifact whose bytes differ from the sha256 recorded when it was logged."""


def evaluation_of(tracker: Any, version: Version) -> dict[str, Any] | None:
    """The latest ``evaluation.json`` recorded on ``version`` (downloaded from its evaluate run), checked against
    the sha256 the evaluate stage recorded on that run (tag ``mqgen.sha256.evaluation.json``; runs from before
    the tag are read unchecked). Raises :class:`ArtifactAltered` when the stored file was changed since."""
    import hashlib

    client = _client(tracker)
    run_ids = [v for k, v in version.tags.items() if k.startswith(EVAL_PREFIX) and k.endswith(".run_id")]
    for run_id in run_ids[::-1]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                data = Path(client.download_artifacts(run_id, "evaluation.json", tmp)).read_bytes()
                recorded = client.get_run(run_id).data.tags.get("mqgen.sha256.evaluation.json")
            except Exception as e:  # noqa: BLE001 - gone or unreadable: an earlier evaluation may still be there
                log.info("evaluation.json of run %s not read (%s)", run_id, type(e).__name__)
                continue
        if recorded and hashlib.sha256(data).hexdigest() != recorded:
            raise ArtifactAltered(
                f"evaluation.json of MLflow run {run_id} ({version.name} v{version.version}) does not match the "
                f"sha256 recorded when it was logged ({recorded[:12]}...): the artifact store's copy was changed. "
                f"Evaluate the model again (`mqgen run`) or restore the file from the run's evaluate output")
        return json.loads(data)
    return None
