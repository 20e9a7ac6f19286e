"""The default pipeline end to end, as a user runs it: wall time, orchestration share, cached rerun.

Not a timed test: it measures and prints, then prints one JSON line last. Figures are recorded in
``docs/benchmarks.md``.

1. ``mqgen run`` (the ``fmnist`` preset unless ``--preset``; extra ``KEY=VALUE`` overrides pass through) in a
   fresh run root, as a subprocess: CLI start-up, Prefect's ephemeral API, Ray, MLflow and every stage.
   ``wall_s`` is that process's wall time.
2. Model work is the time inside the stages: the sum of the stage runs' durations (each stage's MLflow run,
   from its start to its end: data, training, encoding, sampling, metrics, and the Ray start-up each stage
   does). ``orchestration_share`` = (wall - model work) / wall: the CLI and imports, Prefect's API server and
   flow/task bookkeeping, the pipeline's MLflow parent run; target <= 0.10.
3. ``rerun_s``: the same command again on the finished root (every stage a verified cache hit, no model work);
   target <= 20 s.

Usage (the figures in docs/benchmarks.md; about 15 minutes on a 2-core machine)::

    .venv/bin/python benchmarks/pipeline.py
    .venv/bin/python benchmarks/pipeline.py --preset tiny          # a quick check of the script itself
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime

WALL_TARGET_S = 15 * 60
ORCHESTRATION_TARGET = 0.10
RERUN_TARGET_S = 20.0


def log(msg: str) -> None:
    print(msg, flush=True)


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    mqgen = Path(sys.executable).parent / "mqgen"
    t0 = time.perf_counter()
    proc = subprocess.run([str(mqgen), *args], cwd=_HERE.parent, env=env, text=True, capture_output=True,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"mqgen {' '.join(args)} failed with rc {proc.returncode}")
    return wall, proc


def stage_seconds(root: Path, experiment: str) -> dict[str, float]:
    """Seconds per stage from the stage runs' start and end times (all attempts of the first pipeline)."""
    from infra.tracking import Tracker

    client = Tracker(root, experiment).client
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp], filter_string="tags.`mqgen.kind` = 'stage'")
    out: dict[str, float] = {}
    for r in runs:
        if r.info.end_time is None:
            raise SystemExit(f"stage run {r.info.run_id} did not end")
        stage = r.data.tags["mqgen.stage"]
        out[stage] = out.get(stage, 0.0) + (r.info.end_time - r.info.start_time) / 1000.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fmnist")
    ap.add_argument("--root", type=Path, default=None, help="Run root (default: a fresh temporary folder).")
    ap.add_argument("--keep", action="store_true", help="Keep the run root afterwards.")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides passed to mqgen run")
    args = ap.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="mqgen-pipeline-bench-"))
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty: the benchmark needs a fresh run root")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    cli = ["run", "--json", "--preset", args.preset, f"run.root={root}", *args.overrides]
    load_before = os.getloadavg()
    log(f"pipeline benchmark: mqgen {' '.join(cli)}")
    wall, _ = run_cli(cli, env)
    log(f"  first run: {wall:.1f} s")
    stages = stage_seconds(root, "mqgen")
    work = sum(stages.values())
    for stage, sec in stages.items():
        log(f"  {stage:18s} {sec:8.1f} s  {sec / wall:6.1%}")
    rerun, proc = run_cli(cli, env)
    log(f"  rerun (all stages cached): {rerun:.1f} s")
    refs = json.loads(proc.stdout[proc.stdout.index("{"):])
    figures = {}
    ev = refs.get("evaluate", {}).get("metrics", {})
    for k in ("fid", "isc_mean", "recon_psnr", "sampling_images_per_s"):
        if isinstance(ev.get(k), (int, float)):
            figures[k] = round(float(ev[k]), 4)
    result = {
        "benchmark": "pipeline", "preset": args.preset, "overrides": args.overrides,
        "wall_s": round(wall, 1), "wall_target_s": WALL_TARGET_S,
        "model_work_s": round(work, 1), "stage_s": {k: round(v, 1) for k, v in stages.items()},
        "orchestration_s": round(wall - work, 1), "orchestration_share": round((wall - work) / wall, 4),
        "orchestration_target": ORCHESTRATION_TARGET,
        "rerun_s": round(rerun, 1), "rerun_target_s": RERUN_TARGET_S, "figures": figures,
        "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if not args.keep and args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
