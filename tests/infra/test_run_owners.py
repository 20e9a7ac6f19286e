"""No MLflow run stays RUNNING after its process died: pipeline and stage runs carry their owner's lease (a file
the owner holds a lock on for its lifetime), so the next run closes them as KILLED, also when the owner had
another host name (a container restarted), and never closes the run of a process that is still alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from infra.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
OWNER = """
import socket, sys, time
if sys.argv[3] != "-":
    socket.gethostname = lambda: sys.argv[3]  # the host name the container had before it restarted
from infra.tracking import Tracker
t = Tracker(sys.argv[1])
if sys.argv[2] == "both":  # a pipeline run and its stage run, as mqgen holds them mid-stage
    parent = t.pipeline_run("cfg")
    run = t.stage_run("train_tokenizer", "k1", parent_run_id=parent.run_id)
    print(parent.run_id, run.run_id, flush=True)
else:
    run = t.stage_run("train_tokenizer", "k1") if sys.argv[2] == "stage" else t.pipeline_run("cfg")
    print(run.run_id, flush=True)
time.sleep(600)
"""


def _owner(root: Path, kind: str, host: str = "-") -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(root), kind, host], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE)
    return proc, proc.stdout.readline().strip()


def _status(t: Tracker, run_id: str) -> str:
    return t.client.get_run(run_id).info.status


def test_a_killed_owners_stage_run_is_closed_and_a_live_ones_is_not(run_root: Path) -> None:
    proc, run_id = _owner(run_root, "stage")
    try:
        t = Tracker(run_root)
        assert t.mark_dead_runs_killed() == {} and _status(t, run_id) == "RUNNING"  # its owner is alive
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        dead = t.mark_dead_runs_killed()
        assert list(dead) == [run_id] and dead[run_id]["mqgen.stage"] == "train_tokenizer"
        assert _status(t, run_id) == "KILLED"
        assert t.client.get_run(run_id).data.tags["mqgen.ended_by"] == "owner process gone"
    finally:
        proc.kill()


def test_a_command_that_starts_no_pipeline_still_closes_a_killed_runs_mlflow_runs(run_root: Path) -> None:
    """``mqgen run`` with every stage done starts no pipeline run (so no sweep at its start): a run killed after its
    last stage (while publishing its results) would stay RUNNING for good. The cached command sweeps too, opening
    MLflow only when a lease is free."""
    from infra.tracking import close_runs_of_dead_owners

    proc, ids = _owner(run_root, "both")
    parent_id, stage_id = ids.split()
    try:
        assert close_runs_of_dead_owners(run_root, "mqgen") == 0  # its owner is alive
        t = Tracker(run_root)
        assert _status(t, parent_id) == _status(t, stage_id) == "RUNNING"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert close_runs_of_dead_owners(run_root, "mqgen") == 2
        assert _status(t, parent_id) == _status(t, stage_id) == "KILLED"
        assert not list((run_root / ".owners").glob("*.lease"))  # the spent lease went with them
        assert close_runs_of_dead_owners(run_root, "mqgen") == 0
    finally:
        proc.kill()


def test_a_run_of_a_restarted_container_is_closed(run_root: Path) -> None:
    proc, run_id = _owner(run_root, "pipeline", host="container-before-restart")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t = Tracker(run_root)
    tags = t.client.get_run(run_id).data.tags
    assert tags["mqgen.pid"].startswith("container-before-restart:")  # not this host: only the lease can tell
    assert list(t.mark_dead_runs_killed()) == [run_id] and _status(t, run_id) == "KILLED"
    assert not Path(tags["mqgen.lease"]).exists()  # a spent lease is removed


def test_every_run_of_a_restarted_containers_process_is_closed(run_root: Path) -> None:
    """Mid-stage, one mqgen process holds two runs (the pipeline run and its stage run) under one lease: after a
    container restart both end KILLED, and only then is the spent lease removed."""
    proc, ids = _owner(run_root, "both", host="container-before-restart")
    parent_id, stage_id = ids.split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t = Tracker(run_root)
    lease = Path(t.client.get_run(stage_id).data.tags["mqgen.lease"])
    assert lease == Path(t.client.get_run(parent_id).data.tags["mqgen.lease"]) and lease.exists()
    assert sorted(t.mark_dead_runs_killed()) == sorted([parent_id, stage_id])
    assert _status(t, parent_id) == _status(t, stage_id) == "KILLED"
    assert not lease.exists()


def test_a_process_that_exits_normally_leaves_no_lease_behind(run_root: Path) -> None:
    script = "import sys; from infra.tracking import Tracker; Tracker(sys.argv[1]).pipeline_run('cfg').finish()"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-c", script, str(run_root)], cwd=REPO, env=env, check=True, timeout=120)
    assert list((run_root / ".owners").glob("*.lease")) == []


def test_a_sqlite_store_on_a_network_file_system_is_warned_about_once(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run root on a cluster's NFS share with the default SQLite store: it works on one node, and the user is
    told once that several nodes need a tracking server (mount table simulated; the store is real)."""
    from infra import tokens

    shared = tmp_path / "shared"
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {shared} nfs4 rw 0 0\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tokens, "MOUNTS_FILE", str(mounts))
    Tracker(tmp_path / "local", "mqgen")
    assert "warning" not in capsys.readouterr().err  # a local root: nothing to say
    Tracker(shared / "runs", "mqgen")
    Tracker(shared / "runs", "mqgen")
    err = capsys.readouterr().err
    assert err.count("warning: the MLflow store") == 1, err
    assert "nfs4 file system" in err and str(shared / "runs" / "mlflow.db") in err and "MLFLOW_TRACKING_URI" in err
