"""The console: one progress line per stage (redrawn on a terminal, a few lines in a log), progress that crosses
process boundaries through a file, library chatter kept off the console."""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from infra import console


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_non_terminal_output_gets_a_few_lines_per_stage_not_one_per_step() -> None:
    out = io.StringIO()
    p = console.Progress("train", 1000, line=console.LiveLine(out))
    for step in range(1, 1001):
        p.update(step, loss=1.0 / step)
    p.close()
    lines = out.getvalue().splitlines()
    assert 3 <= len(lines) <= 6, lines
    assert lines[-1].startswith("  train  1000/1000 steps (100%)")
    assert "loss 0.001" in lines[-1]


def test_terminal_output_redraws_one_line() -> None:
    out = _Tty()
    p = console.Progress("tokenize", 50, unit="shards", line=console.LiveLine(out))
    for i in range(1, 51):
        p.advance(1)
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 50
    assert "50/50 shards (100%)" in text.rsplit("\r", 1)[-1]


def _worker(path: str) -> None:
    p = console.Progress("train_tokenizer", 20, file=path)
    for step in range(1, 21):
        p.update(step, loss=0.5)
        time.sleep(0.1)


def test_progress_written_by_another_process_is_drawn_by_the_watcher(tmp_path: Path, monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(console.sys, "stderr", out)
    path = tmp_path / "progress.json"
    path.write_text('{"done": 999, "total": 1000}')  # a stale record of an earlier attempt is never shown
    with console.watch_progress(path, "train_tokenizer", interval_s=0.05):
        proc = mp.get_context("spawn").Process(target=_worker, args=(str(path),))
        proc.start()
        proc.join(30)
        time.sleep(0.3)
    assert proc.exitcode == 0
    text = out.getvalue()
    assert "999/1000" not in text
    assert "train_tokenizer  20/20 steps (100%)  loss 0.5" in text
    assert console.ProgressFile.read(path)["done"] == 20


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")  # no flow run here
def test_library_messages_go_to_the_log_file_and_only_their_errors_to_the_console(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(console.sys, "stderr", err)
    monkeypatch.setattr(console, "_LOG_DIR", None)  # restored after the test: later tests log nowhere
    monkeypatch.setattr(console, "_CONFIGURED", False)
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        log_dir = console.setup_logging(str(tmp_path), "test")
        logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state")
        logging.getLogger("prefect.task_runs").error("Task run failed\nTraceback (most recent call last): ...")
        logging.getLogger("mlflow.store").error("database is locked\nmore detail")
        logging.getLogger("mqgen").warning("a warning of ours")
        with console.stage_log("ingest"):
            logging.getLogger("mqgen.ingest").info("inside the stage")
        logging.getLogger("mqgen").error("traceback text", extra={"file_only": True})
        for h in root.handlers:
            h.flush()
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
                h.close()
        root.setLevel(saved[1])
    shown = err.getvalue()
    assert "Failed to query" not in shown and "Task run failed" not in shown and "Traceback" not in shown
    assert "error: mlflow.store: database is locked" in shown and "more detail" not in shown
    assert "a warning of ours" in shown and "traceback text" not in shown
    logged = (log_dir / "mqgen.log").read_text()
    for text in ("Failed to query", "Task run failed", "more detail", "inside the stage", "traceback text"):
        assert text in logged
    assert "inside the stage" in (log_dir / "ingest.log").read_text()
    assert "a warning of ours" not in (log_dir / "ingest.log").read_text()


def test_unknown_totals_show_a_count_and_a_rate_without_flooding_a_log() -> None:
    out = io.StringIO()
    p = console.Progress("ingest", None, unit="images", line=console.LiveLine(out))
    for _ in range(1000):
        p.advance(256)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("  ingest  256 images") and "images/s" in lines[0]


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_raylet_warnings_go_to_the_log_file_not_the_console(tmp_path: Path) -> None:
    """Ray's driver prints what the raylet pushes (here its worker-pool warning, provoked by a dozen zero-CPU actors on
    a one-CPU Ray) to stdout whatever log_to_driver says; mqgen's console keeps it out and its log file keeps it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time
        import ray
        from infra import console
        from infra.ray import init_ray
        log_dir = console.setup_logging({str(tmp_path)!r}, "test")
        init_ray(num_cpus=1)

        @ray.remote(num_cpus=0)
        class Idle:
            def ping(self):
                return 1

        actors = [Idle.remote() for _ in range(12)]
        assert sum(ray.get([a.ping.remote() for a in actors])) == 12
        time.sleep(4)  # the message arrives through the driver's listener thread
        ray.shutdown()
        print("log dir", log_dir)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PYTHON worker processes" not in done.stdout + done.stderr
    log_dir = Path(done.stdout.split("log dir ", 1)[1].strip())
    assert "PYTHON worker processes have been started" in (log_dir / "mqgen.log").read_text()
