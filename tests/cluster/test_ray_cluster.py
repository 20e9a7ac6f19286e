"""A real two-node Ray cluster on this machine, and ``mqgen grid`` on it.

The cluster: ``ray start --head`` and ``ray start --address=<head>``, each in its own process group (a new
session), each with one CPU, its own custom resource (``mq_head`` / ``mq_worker``) and its own ``--temp-dir``
(Ray 2.60 accepts a temp dir per node: "Can be specified per node"; the second node's sockets, logs and object
store live under its own directory, while its session name is the head's). Settings this machine needs:

* ``RAY_AUTH_MODE`` is set for every process of the test cluster. Ray 2.60's ``ray start --head`` switches
  token authentication on by itself when ``~/.ray/auth_token`` exists, but ``ray start --address`` does not,
  and the second node is then refused by the head ("InvalidAuthToken"). Here the head, the worker node, the
  ``mqgen`` driver and the state queries all run with ``RAY_AUTH_MODE=token`` and a random ``RAY_AUTH_TOKEN`` of
  this test (``~/.ray`` is neither read nor written).
* Every port that has a fixed default (the head's GCS port, the dashboard and dashboard agent ports) is a free
  one, and the worker ports are left to the OS (``--min-worker-port=0``): the two nodes share one host, and
  another Ray on this machine must not be disturbed.
* No dashboard: it needs ``ray[default]``, which mqgen does not install. So Ray's dashboard-backed state API
  (``ray.util.state`` / ``ray list``) is not available; the state is read from the GCS instead, through a driver
  connected to the cluster: ``ray.nodes()``, ``ray._private.state.actors()`` (the actor table) and the task
  events the GCS keeps (what ``ray.timeline`` reads).

``ray stop`` stops every Ray process of this user on the machine, so it is never used: a node is stopped (and
the worker node "lost" mid-grid) by SIGKILL to its process group and to every descendant of its processes (the
workers its raylet started: they put themselves in process groups of their own), found in ``/proc``. The GCS
marks the lost node dead about 15 s later.

On one host, a driver given ``RAY_ADDRESS`` attaches to the head node's raylet (Ray prefers the head when
several nodes share the host), so ``mqgen grid`` survives the loss of the other node. The grid's stage
executions (Ray tasks reserving no CPU) run on the driver's node; the Ray Train workers (one CPU each, one per
node) are what lands on both nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MQGEN, RAY = BIN / "mqgen", BIN / "ray"
# The driver gets a user's shell: local Prefect and MLflow under the run root; only RAY_ADDRESS names the cluster.
UNSET = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
         "RAY_AUTH_TOKEN_PATH")
TOKEN = secrets.token_hex(32)
# The tiny preset with the short step counts of tests/flows/test_pipeline.py.
SHORT = ("tokenizer.max_steps=12", "tokenizer.eval_every=12", "tokenizer.checkpoint_every=12",
         "stackformer.max_steps=12", "stackformer.eval_every=12", "stackformer.checkpoint_every=12",
         "evaluate.num_samples=32")
TRAIN_WORKER = "RayTrainWorker"  # the actor class of a Ray Train (v2) worker


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _group_and_descendants(pgid: int, known: set[int] | None = None) -> set[int]:
    """The live processes of process group ``pgid``, those of ``known`` still alive, and all their descendants."""
    table = _proc_table()
    found = {pid for pid, (_, g) in table.items() if g == pgid} | {p for p in (known or set()) if p in table}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
        found |= more
        grew = bool(more)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to reap it, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_all(pids: set[int], timeout: float = 20) -> set[int]:
    """SIGKILL ``pids``; the ones still running after ``timeout`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


# --------------------------------------------------------------------------------------------- the cluster


@dataclass
class Node:
    name: str  # also its custom resource
    temp_dir: Path
    pgid: int  # the process group (and session) its `ray start` created; its daemons stay in it
    node_id: str = ""
    seen: set[int] = field(default_factory=set)  # pids seen in the group (a worker could leave it)

    def processes(self) -> set[int]:
        self.seen = _group_and_descendants(self.pgid, self.seen)
        return self.seen

    def kill(self) -> set[int]:
        """SIGKILL every process of this node (a machine that disappears); the pids left running."""
        return _kill_all(self.processes())


def _start_node(name: str, temp_dir: Path, *args: str) -> Node:
    temp_dir.mkdir(parents=True)
    cmd = [str(RAY), "start", f"--temp-dir={temp_dir}", "--num-cpus=1", f"--resources={json.dumps({name: 1})}",
           f"--object-store-memory={200 * 1024 * 1024}", "--min-worker-port=0", "--max-worker-port=0",
           f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats", *args]
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = Node(name, temp_dir, pgid=proc.pid)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        node.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"`ray start` for {name} timed out:\n{_tail(out)}") from None
    if proc.returncode != 0:
        node.kill()
        raise AssertionError(f"`ray start` for {name} failed ({proc.returncode}):\n{_tail(out)}")
    node.processes()
    return node


# A driver connected to the cluster that answers state queries on stdin (one connection for the whole test;
# the dashboard-backed ray.util.state needs ray[default], see the module docstring).
OBSERVER = textwrap.dedent(r'''
    import json, sys, time
    import ray
    import ray._private.state as gstate

    REPLY = sys.argv[2]
    ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
    me = ray.get_runtime_context().get_job_id()

    def nodes():
        return [{"node_id": n["NodeID"], "alive": n["Alive"], "raylet": n["RayletSocketName"]} for n in ray.nodes()]

    def actors():
        return [{"class": a["ActorClassName"], "node_id": a["Address"]["NodeID"], "state": a["State"],
                 "job": a["JobID"]} for a in gstate.actors().values() if a["JobID"] != me]

    def tasks():
        merged = {}
        for ev in gstate.state._get_all_task_events():
            if ev.job_id.hex() == me:
                continue
            t = merged.setdefault((ev.task_id, ev.attempt_number), {"name": "", "node_id": "", "states": []})
            if ev.HasField("task_info") and ev.task_info.func_or_class_name:
                t["name"] = ev.task_info.func_or_class_name
            if ev.HasField("state_updates"):
                if ev.state_updates.node_id:
                    t["node_id"] = ev.state_updates.node_id.hex()
                t["states"] = sorted(set(t["states"]) | {str(k) for k in ev.state_updates.state_ts_ns})
                if ev.state_updates.HasField("error_info"):
                    t["error"] = ev.state_updates.error_info.error_type
        return list(merged.values())

    def busy_on_both(head, worker, timeout):
        """Wait until a Ray Train worker is alive on each node at once (two executions, one per node)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = {a["node_id"] for a in actors() if a["class"] == "RayTrainWorker" and a["state"] == "ALIVE"}
            if {head, worker} <= alive:
                return {"found": True, "actors": actors()}
            time.sleep(0.3)
        return {"found": False, "actors": actors()}

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "nodes":
            out = nodes()
        elif cmd == "busy":
            out = busy_on_both(args[0], args[1], float(args[2]))
        elif cmd == "report":
            out = {"nodes": nodes(), "actors": actors(), "tasks": tasks()}
        else:
            break
        print(REPLY + json.dumps(out), flush=True)
''')


REPLY = "@@mqgen-observer@@ "


class Observer:
    def __init__(self, address: str):
        self.proc = subprocess.Popen([sys.executable, "-c", OBSERVER, address, REPLY], env=_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def ask(self, *cmd: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, cmd)) + "\n")
        self.proc.stdin.flush()
        while True:  # Ray prints some warnings of its nodes to every driver's stdout: skip them
            line = self.proc.stdout.readline()
            assert line, f"the state observer exited ({self.proc.poll()})"
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Cluster:
    address: str
    head: Node
    worker: Node
    observer: Observer


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short temp dirs: Ray's unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay
    # under 107 characters, which pytest's tmp_path does not promise.
    base = Path(tempfile.mkdtemp(prefix="mqray-", dir="/tmp"))
    nodes: list[Node] = []
    observer = None
    try:
        port = _free_port()
        head = _start_node("mq_head", base / "head", "--head", f"--port={port}", "--include-dashboard=false",
                           f"--dashboard-port={_free_port()}")
        nodes.append(head)
        address = f"127.0.0.1:{port}"
        worker = _start_node("mq_worker", base / "worker", f"--address={address}")
        nodes.append(worker)
        observer = Observer(address)
        deadline = time.monotonic() + 60
        while True:
            listed = observer.ask("nodes")
            by_dir = {n["raylet"].split("/session_")[0]: n["node_id"] for n in listed if n["alive"]}
            if str(head.temp_dir) in by_dir and str(worker.temp_dir) in by_dir:
                break
            assert time.monotonic() < deadline, f"the two nodes did not register: {listed}"
            time.sleep(1)
        head.node_id, worker.node_id = by_dir[str(head.temp_dir)], by_dir[str(worker.temp_dir)]
        assert head.node_id != worker.node_id
        yield Cluster(address, head, worker, observer)
    finally:
        if observer is not None:
            observer.close()
        left = {n.name: n.kill() for n in reversed(nodes)}
        shutil.rmtree(base, ignore_errors=True)
        assert not any(left.values()), f"Ray processes still running after SIGKILL: {left}"


def _variant_metrics(root: Path, run_id: str) -> dict[str, float]:
    from infra.tracking import Tracker

    return Tracker(root, "mqgen").client.get_run(run_id).data.metrics


def _parse_json_block(stdout: str) -> dict[str, Any]:
    start = stdout.find("{\n")
    assert start >= 0, f"no JSON in the output:\n{_tail(stdout)}"
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


# --------------------------------------------------------------------------------------------- tests


def test_a_worker_that_does_not_see_the_run_root_fails_at_once_naming_its_node_and_the_path(
        cluster: Cluster, tmp_path: Path) -> None:
    """A driver whose run root is not the workers' (its own mount namespace, a tmpfs over the root: what a
    machine with a local ``run.root`` is to the other nodes) launches a Ray Train run on the cluster: the
    worker refuses at once with a permanent error naming its node and the path, and it is not restarted."""
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    if shutil.which("unshare") is None or subprocess.run(probe, check=False, capture_output=True).returncode != 0:
        pytest.skip("needs mount namespaces (`unshare --mount`, root) to give the driver a path the nodes lack")
    root = tmp_path / "local-root"
    root.mkdir()
    ran = tmp_path / "train-loop-ran"
    script = textwrap.dedent(f'''
        import json, sys
        from infra import ray as rayx

        def loop(config):
            open({str(ran)!r}, "w").close()

        try:
            rayx.fit(loop, {{}}, name="not-shared", storage_path={str(root / "ray")!r}, max_failures=2)
            print(json.dumps({{"ok": True}}))
        except BaseException as e:
            print(json.dumps({{"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                              "message": str(e)}}))
    ''')
    shell = f"mount -t tmpfs tmpfs {root} && exec {sys.executable} -c \"$0\""
    trainers_before = _train_workers(cluster)
    t0 = time.monotonic()
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, script],
                          env=_env(RAY_ADDRESS=cluster.address), cwd=Path(__file__).parents[2], text=True,
                          capture_output=True, timeout=240, check=False)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"{proc.returncode}\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.get("type") == "StorageNotShared", out
    assert "PermanentError" in out["mro"]  # neither Ray Train's restarts (max_failures=2) nor Prefect retry it
    message = out["message"]
    assert str(root / "ray") in message
    assert socket.gethostname() in message and "Ray node " in message
    assert "shared by every node" in message and "s3://" in message
    assert not ran.exists(), "the training loop ran on a node that does not see the run root"
    assert "restarting" not in proc.stderr, _tail(proc.stderr)
    # a restart would have started another Ray Train worker (the actor table keeps the dead ones): one ran
    assert _train_workers(cluster) == trainers_before + 1
    print(f"refused in {seconds:.0f} s")


def _train_workers(cluster: Cluster) -> int:
    return sum(a["class"] == TRAIN_WORKER for a in cluster.observer.ask("report")["actors"])


def test_check_shared_storage_refuses_a_missing_path_and_accepts_the_shared_one(tmp_path: Path) -> None:
    from infra.errors import is_permanent
    from infra.ray import StorageNotShared, check_shared_storage, storage_id

    missing = tmp_path / "elsewhere" / "ray"
    with pytest.raises(StorageNotShared) as err:
        check_shared_storage(str(missing), "0123", "driver-host")
    assert str(missing) in str(err.value) and "does not exist there" in str(err.value)
    assert socket.gethostname() in str(err.value) and is_permanent(err.value)

    shared = tmp_path / "ray"
    shared.mkdir()
    ident = storage_id(str(shared))
    assert ident and storage_id(str(shared)) == ident  # stable: the first writer's id stays
    check_shared_storage(str(shared), ident, "driver-host")  # the same directory: accepted
    with pytest.raises(StorageNotShared, match="differs from the one driver-host wrote"):
        check_shared_storage(str(shared), "another-id", "driver-host")  # same path, another directory
    assert storage_id("s3://bucket/ray") is None
    check_shared_storage("s3://bucket/ray", None)  # URLs: left to Ray's storage layer


def test_grid_on_two_nodes_survives_losing_the_worker_node(cluster: Cluster, run_root: Path,
                                                           tmp_path: Path) -> None:
    assert MQGEN.is_file(), f"{MQGEN} is missing: install the project (make setup)"
    out_path, err_path = tmp_path / "grid.out", tmp_path / "grid.err"
    cmd = [str(MQGEN), "grid", "--preset", "tiny", "tokenizer.keep_ratio=[1.0,0.5]", f"run.root={run_root}", *SHORT,
           "--name", "two-nodes"]
    t0 = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        grid = subprocess.Popen(cmd, cwd=tmp_path, env=_env(RAY_ADDRESS=cluster.address), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, text=True, start_new_session=True)
    try:
        # 1. the two variants' trainings run at once, one on each node (one CPU per node, one worker per run)
        busy = cluster.observer.ask("busy", cluster.head.node_id, cluster.worker.node_id, 300)
        assert grid.poll() is None, f"the grid ended early ({grid.returncode}):\n{_tail(err_path.read_text())}"
        assert busy["found"], f"never a Ray Train worker on both nodes at once: {busy['actors']}"
        killed_at = time.monotonic() - t0

        # 2. lose the worker node in the middle of that training: every process of it, at once
        left = cluster.worker.kill()
        assert not left, f"worker node processes survived SIGKILL: {left}"

        # 3. the grid completes on the head node alone
        try:
            grid.wait(timeout=480)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the grid did not finish 8 min after the node loss:\n{_tail(err_path.read_text())}")
        seconds = time.monotonic() - t0
        stdout, stderr = out_path.read_text(), err_path.read_text()
        assert grid.returncode == 0, f"exit {grid.returncode}\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}"
    finally:
        if grid.poll() is None:
            _kill_all(_group_and_descendants(grid.pid))
            grid.wait()
        for node in (cluster.head, cluster.worker):  # the nodes' session logs, for a post-mortem (pytest keeps them)
            for logs in node.temp_dir.glob("session_2*/logs"):
                shutil.copytree(logs, tmp_path / "ray-logs" / node.name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("events", "export_events", "old"))

    result = _parse_json_block(stdout)
    assert len(result["variants"]) == 2
    assert result["executions"]["train_tokenizer"] == 2 and result["executions"]["train_stackformer"] == 2
    assert result["executions"]["evaluate"] == 2 and result["executions"]["ingest"] == 1
    for label, run_id in result["variants"].items():
        metrics = _variant_metrics(run_root, run_id)
        assert "fid" in metrics and metrics["fid"] == metrics["fid"], (label, sorted(metrics))  # (not NaN)

    # 4. Ray's own record: the worker node is dead; Ray Train workers ran on both nodes; the one(s) on the lost
    # node died with it, and the lost training ran again (more Ray Train workers than training executions)
    report = cluster.observer.ask("report")
    alive = {n["node_id"]: n["alive"] for n in report["nodes"]}
    assert alive[cluster.head.node_id] and not alive[cluster.worker.node_id]
    trainers = [a for a in report["actors"] if a["class"] == TRAIN_WORKER]
    on = {nid: [a for a in trainers if a["node_id"] == nid] for nid in (cluster.head.node_id, cluster.worker.node_id)}
    assert on[cluster.head.node_id] and on[cluster.worker.node_id], trainers
    assert all(a["state"] == "DEAD" for a in on[cluster.worker.node_id])
    executions = result["executions"]["train_tokenizer"] + result["executions"]["train_stackformer"]
    assert len(trainers) > executions, f"no training ran again after the node loss: {trainers}"
    stage_tasks = [t for t in report["tasks"] if t["name"].endswith("run_stage_remote")]
    assert stage_tasks, report["tasks"][:20]

    # 5. which recovery redid it (logged): infra.ray.fit's restart of a failed Ray Train run (a worker lost while
    # training; in the stage's Ray task's log, in its node's session logs), Ray Train's own retry of a worker
    # group that failed to start (a worker lost while starting: Ray Train v2 retries those without a limit), or
    # Prefect's retry of a whole stage execution (its Ray task or the Ray Train controller lost; the grid's log)
    worker_logs = [f for n in (cluster.head, cluster.worker) for f in n.temp_dir.glob("session_2*/logs/worker-*")]
    recoveries = {
        "infra.ray.fit restart": _log_lines(worker_logs, "restarting from its latest checkpoint"),
        # (Ray Train v2 raises it with two wordings: a worker lost while starting, or while reporting its metadata)
        "Ray Train start retry": [line for needle in ("WorkerGroupStartupFailedError: At least one of the worker",
                                                      "WorkerGroupStartupFailedError: One of the worker actors")
                                  for line in _log_lines(worker_logs, needle)],
        "Prefect stage retry": _log_lines(list((run_root / "logs").glob("*/mqgen.log")), " will start "),
    }
    assert any(recoveries.values()), ("the lost training was redone without a restart or retry being logged; "
                                      + "\n".join(_log_lines(worker_logs, "rror"))[-6000:])
    print(f"node lost after {killed_at:.0f} s; grid done in {seconds:.0f} s; "
          f"{len(on[cluster.head.node_id])} Ray Train workers on the head, {len(on[cluster.worker.node_id])} "
          f"on the lost node; stage tasks (node, error): "
          f"{sorted((t['node_id'][:8], t.get('error', '')) for t in stage_tasks)}; "
          f"recovered by: {({k: len(v) for k, v in recoveries.items()})}")


def _log_lines(files: list[Path], needle: str) -> list[str]:
    return [line.strip()[:300] for f in files for line in f.read_text(errors="replace").splitlines() if needle in line]
