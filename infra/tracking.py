"""MLflow tracking with explicit run ids (``MlflowClient``, never the thread-local fluent API).

One parent run per pipeline run, one child run per stage. A stage run is found again by its stage
key (tag ``mqgen.stage_key``), so a resumed stage re-attaches to the run it started instead of
opening a second one, and metric steps already logged are never logged twice.

Backend: ``MLFLOW_TRACKING_URI`` when set (any tracking server), else a local SQLite file
``<run.root>/mlflow.db`` with artifacts under ``<run.root>/mlartifacts`` (open it with
``mlflow ui --backend-store-uri sqlite:///<run.root>/mlflow.db``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

TAG_STAGE = "mqgen.stage"
TAG_KEY = "mqgen.stage_key"
TAG_KIND = "mqgen.kind"


def tracking_uri_for(root: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root_s = str(root)
    if "://" in root_s:
        raise ValueError(f"run.root={root_s!r} is remote: set MLFLOW_TRACKING_URI to a tracking server "
                         "(a local SQLite file cannot live in object storage)")
    path = Path(root_s).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


class Tracker:
    """Entry point: one experiment on one backend."""

    def __init__(self, root: str | Path, experiment: str = "mqgen", tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or tracking_uri_for(root)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///") and "://" not in str(root):
                artifact_location = (Path(root).resolve() / "mlartifacts").as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # created concurrently by another process: read it back
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id

    def find_run(self, tags: Mapping[str, str]) -> str | None:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def pipeline_run(self, config_hash: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, str] | None = None) -> "StageRun":
        """A new parent run for one pipeline execution (stage runs attach to it as children)."""
        all_tags = {TAG_KIND: "pipeline", "mqgen.config_hash": config_hash, **(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=f"pipeline-{config_hash}", tags=all_tags)
        sr = StageRun(self.client, run.info.run_id)
        if params:
            sr.log_params(params)
        return sr

    def stage_run(self, stage: str, stage_key: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                  run_id: str | None = None) -> "StageRun":
        """Open (or re-attach to) the run of ``stage`` for ``stage_key``."""
        if run_id is None:
            run_id = self.find_run({TAG_STAGE: stage, TAG_KEY: stage_key})
        all_tags = {TAG_STAGE: stage, TAG_KEY: stage_key, TAG_KIND: "stage", **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=f"{stage}-{stage_key}", tags=all_tags)
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            for k, v in all_tags.items():
                self.client.set_tag(run_id, k, v)
        sr = StageRun(self.client, run_id)
        if params:
            sr.log_params(params)
        return sr


class StageRun:
    """A handle on one MLflow run. Use as a context manager: FAILED on exception, FINISHED otherwise."""

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id
        self._last_step: dict[str, int] = {}

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; a param already logged with the same value is skipped (resume-safe)."""
        existing = self.client.get_run(self.run_id).data.params
        for k, v in flatten(params).items():
            sv = str(v)[:6000]
            if k in existing:
                if existing[k] != sv:
                    raise ValueError(f"MLflow run {self.run_id}: param {k} was {existing[k]!r}, now {sv!r}; "
                                     "a stage key must not change its params")
                continue
            self.client.log_param(self.run_id, k, sv)

    def last_step(self, key: str) -> int:
        if key not in self._last_step:
            hist = self.client.get_metric_history(self.run_id, key)
            self._last_step[key] = max((m.step for m in hist), default=-1)
        return self._last_step[key]

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log metrics at ``step``; a (key, step) at or before the last logged step is dropped."""
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            if step <= self.last_step(k):
                continue
            batch.append(Metric(k, float(v), now, step))
            self._last_step[k] = step
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self._log_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), name)

    def log_image(self, image: Any, name: str) -> None:
        """Log a PIL image or an HxW / HxWxC uint8 array as PNG."""
        from PIL import Image
        import numpy as np

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self._log_bytes(buf.getvalue(), name)

    def _log_bytes(self, data: bytes, name: str) -> None:
        parent, base = os.path.split(name)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / base
            p.write_bytes(data)
            self.client.log_artifact(self.run_id, str(p), parent or None)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out
