"""The code passes the linter the project pins (``ruff``, its rules and exceptions in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.is_file(), f"{ruff} is missing: install the dev extra (make setup)"
    done = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"ruff check found problems (fix them or run `ruff check --fix`):\n{done.stdout}"
