"""Shared fixtures: a run root per test with a ready MLflow database (real SQLite backend).

Creating an MLflow SQLite database runs its schema migrations (several seconds on a small machine), so
one empty, migrated database is made per session and copied into each test's run root; the Tracker
then creates its experiment there as it would in a fresh root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite database with the current schema."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def run_root(tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``<tmp_path>/run`` holding a copy of the template database; MLFLOW_TRACKING_URI is unset."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "run"
    root.mkdir()
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")
    return root


@pytest.fixture
def make_run_root(tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory for several run roots in one test: ``make_run_root("a")`` -> ``<tmp_path>/a``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        shutil.copyfile(mlflow_db_template, root / "mlflow.db")
        return root

    return make


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One torch thread in the test process: tiny models and small convolutions run fastest on one thread, and
    intra-op threads crawl on a shared, busy CPU (a tiny MQ-VAE step: 0.28 s on one thread, 5-9 s on two while Ray
    workers or another suite share the two cores). Subprocesses and Ray workers set their own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
