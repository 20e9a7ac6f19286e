"""Small CLI conventions: --version, shell completion, one override syntax (positional KEY=VALUE) everywhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

MQGEN = Path(sys.executable).parent / "mqgen"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MQGEN), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_version_and_completion(tmp_path: Path) -> None:
    from infra.tracking import mqgen_version

    out = _cli("--version", cwd=tmp_path)
    assert out.returncode == 0 and re.fullmatch(rf"mqgen {re.escape(mqgen_version())}( \(git [0-9a-f]{{12}}\))?\n",
                                                out.stdout), out
    helptext = _cli("--help", cwd=tmp_path).stdout
    assert "--install-completion" in helptext and "Exit codes" in helptext


def test_compare_takes_positional_overrides_like_every_other_command(tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    out = _cli("compare", f"run.root={root}", cwd=tmp_path)
    # the override reached the config: the empty root's own database was opened (and had no grid)
    assert out.returncode == 1 and f"sqlite:///{root}/mlflow.db" in out.stderr, out
    assert "Traceback" not in out.stderr and "INFO" not in out.stderr
    bad = _cli("compare", "run.rot=x", cwd=tmp_path)
    assert bad.returncode == 2 and "run.rot" in bad.stderr, bad
