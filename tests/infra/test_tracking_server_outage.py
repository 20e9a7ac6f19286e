"""A tracking server that goes away mid-run: metric logging never blocks or fails the run; the points wait and
are back-filled when the server answers again, each step once, and the outage is recorded on the run. Tested
against a real ``mlflow server`` that is stopped and started again on the same port and database."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(db: Path, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--default-artifact-root", str(tmp / "art")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, 9)  # with its job runner and consumers
    proc.wait()
    pytest.fail("mlflow server did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_metrics_logged_while_the_server_is_down_are_backfilled_once(tmp_path: Path, monkeypatch) -> None:
    port, db = _free_port(), tmp_path / "server.db"
    server = _start(db, port, tmp_path)
    uri = f"http://127.0.0.1:{port}"
    from infra.tracking import Tracker

    tracker = Tracker(tmp_path / "root", tracking_uri=uri)
    run = tracker.stage_run("train_tokenizer", "k1")
    try:
        for step in range(10):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.flush()
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while down (the sender retries)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        _stop(server)
        t0 = time.monotonic()
        for step in range(10, 30):  # the server is gone: training goes on
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            if step % 10 == 0:  # what a training loop logs at an evaluation step
                run.log_image(np.full((8, 8), step, np.uint8), f"samples/step{step:05d}.png")
                run.set_tags({"mqgen.resumed_from_step": step})
                run.log_dict({"step": step}, f"eval/step{step}.json")
        assert time.monotonic() - t0 < 2.0  # logging never waited for the server
        time.sleep(3)  # at least one failed send
        server = _start(db, port, tmp_path)
        run.finish("FINISHED")
        steps = [m.step for m in tracker.client.get_metric_history(run.run_id, "loss")]
        assert sorted(steps) == list(range(30))  # every step, once
        info = tracker.client.get_run(run.run_id)
        assert info.info.status == "FINISHED"
        assert int(info.data.tags["mqgen.mlflow_backfilled"]) >= 20 and float(info.data.tags["mqgen.mlflow_gap_s"]) > 0
        assert info.data.tags["mqgen.mlflow_lost"] == "0"
        assert info.data.tags["mqgen.resumed_from_step"] == "20"  # the tags, in order
        images = {a.path for a in tracker.client.list_artifacts(run.run_id, "samples")}
        assert images == {"samples/step00010.png", "samples/step00020.png"}
        assert {a.path for a in tracker.client.list_artifacts(run.run_id, "eval")} == {"eval/step10.json",
                                                                                      "eval/step20.json"}
    finally:
        _stop(server)


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_a_server_that_comes_up_while_a_run_starts_is_waited_for_and_used(tmp_path: Path, monkeypatch) -> None:
    import threading

    from infra.tracking import Tracker

    port, db = _free_port(), tmp_path / "server.db"
    monkeypatch.setenv("MQGEN_TRACKING_WAIT_S", "120")
    opened: dict[str, Tracker] = {}
    starting = threading.Thread(target=lambda: opened.update(
        tracker=Tracker(tmp_path / "root", tracking_uri=f"http://127.0.0.1:{port}")))
    starting.start()  # a nightly run that starts while the server is restarting
    time.sleep(3)
    assert starting.is_alive() and not opened  # waiting, not failed
    server = _start(db, port, tmp_path)
    try:
        starting.join(60)
        assert "tracker" in opened, "the run did not go on once the server answered"
        run = opened["tracker"].stage_run("ingest", "k1")
        run.log_metrics({"num_train": 3.0})
        run.finish("FINISHED")
        info = opened["tracker"].client.get_run(run.run_id)
        assert info.info.status == "FINISHED" and info.data.metrics["num_train"] == 3.0
    finally:
        _stop(server)


OVERRIDES = ("tokenizer.max_steps=6", "tokenizer.eval_every=6", "tokenizer.checkpoint_every=6")


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_a_server_gone_when_training_ends_defers_the_registration_and_the_stage_finishes(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    """The catalogue's case: the server goes down during a training stage. Training is done and saved, so the
    stage finishes; its model is registered by the next run once the server answers, and the gap is recorded."""
    import infra.training
    from flows.publish import registry_step
    from infra import registry
    from infra.config import resolve
    from infra.refs import TokenizerInputs
    from infra.tracking import StageRun, Tracker
    from tasks import ingest, train_tokenizer

    port, db = _free_port(), tmp_path / "server.db"
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(StageRun, "FLUSH_TIMEOUT_S", 3.0)  # how long the stage's end waits for its queued tags
    server = _start(db, port, tmp_path)
    try:
        cfg = resolve("tiny", overrides=[f"run.root={tmp_path / 'root'}", *OVERRIDES])
        assert cfg.registry.enabled
        ing = ingest.run(cfg)
        tracker = Tracker(cfg.run.root, cfg.run.experiment)
        parent = tracker.pipeline_run(cfg.hash())
        real_export = infra.training.export_final_weights

        def export_then_outage(*args, **kwargs):  # the server dies once the weights are trained
            out = real_export(*args, **kwargs)
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while down
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            _stop(server)
            return out

        monkeypatch.setattr(infra.training, "export_final_weights", export_then_outage)
        ref = train_tokenizer.run(cfg, TokenizerInputs(ingest=ing))  # no exception: the stage finished
        assert server.poll() is not None, "the outage was not injected"
        out = Path(ref.path)
        assert (out / train_tokenizer.SUCCESS).is_file() and Path(ref.weights).is_file()
        assert registry.pending({"train_tokenizer": ref}) == [out / registry.PENDING]
        assert json.loads((out / registry.PENDING).read_text())["sha256"] == ref.sha256

        # the pipeline's registry step, still without a server: deferred again, not failed
        assert registry_step(cfg, {"train_tokenizer": ref}, tracker, parent, promote=False) is None
        assert (out / registry.PENDING).is_file()

        server = _start(db, port, tmp_path)  # back: the next `mqgen run` registers the model, although every
        # stage it asks for is done (a fully cached run normally starts nothing)
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS")}
        mqgen = str(Path(sys.executable).parent / "mqgen")
        status = subprocess.run([mqgen, "status", "--preset", "tiny", *OVERRIDES, f"run.root={cfg.run.root}"], env=env,
                                capture_output=True, text=True, timeout=300, check=False)
        assert status.returncode == 0 and "train_tokenizer is done; the tracking server was down when it finished: " \
            "the next `mqgen run` registers its model" in status.stdout, status.stdout + status.stderr
        rerun = subprocess.run([mqgen, "run", "--preset", "tiny", "--only",
                                "train_tokenizer", *OVERRIDES, f"run.root={cfg.run.root}"], env=env,
                               capture_output=True, text=True, timeout=600, check=False)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        assert "nothing to run" not in rerun.stderr, rerun.stderr[-2000:]
        assert registry.pending({"train_tokenizer": ref}) == []
        client = Tracker(cfg.run.root, cfg.run.experiment).client
        [mv] = client.search_model_versions(f"name = '{cfg.registry.model_name('tokenizer', cfg.preset)}'")
        assert mv.run_id == ref.mlflow_run_id and mv.tags[registry.TAG_SHA] == ref.sha256
        tags = client.get_run(ref.mlflow_run_id).data.tags
        assert tags["mqgen.registered_model"] == f"{mv.name}/{mv.version}"
        assert tags["mqgen.registration"] == "registered by a later run"
        assert client.get_metric_history(ref.mlflow_run_id, "train_l1")  # what training logged before the outage
    finally:
        _stop(server)
