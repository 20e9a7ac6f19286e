"""The code passes the linter the project pins (``ruff``, its rules and exceptions in pyproject.toml)."""

from __future__ import annotations

import re
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


# Writes in production code that bypass infra.storage's durable helpers (a temporary file beside the target,
# fsynced, renamed, the directory fsynced): each one counted, with why it may. A new one fails here: use
# atomic_write_bytes / atomic_write_json / atomic_copy / atomic_target / replace_dir, or add it with its reason.
RAW_WRITE = re.compile(r"\.write_text\(|\.write_bytes\(|shutil\.(copyfile|copy2?|move)\(|os\.(replace|rename)\(")
RAW_WRITES_ALLOWED = {
    "infra/storage.py": (6, "the helpers themselves"),
    "flows/gc.py": (1, "renames a folder to its trash name beside it (removal, not a write)"),
    "infra/tokens.py": (1, "the compacted LMDB file: fsynced by hand, then its directory"),
    "infra/metrics.py": (1, "a private temporary copy of the Inception weights (a 0700 folder removed at exit)"),
    "infra/ray.py": (1, "the storage id's temporary file, then os.link (never replaces an id a worker holds)"),
    "infra/console.py": (2, "the live progress file: best effort, rewritten every few seconds"),
    "infra/tracking.py": (1, "a temporary file handed to MLflow's log_artifact"),
}


def _production_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for top in ("flows", "tasks", "infra", "models")
            for p in sorted((ROOT / top).rglob("*.py"))}


def test_durable_writes_go_through_one_helper() -> None:
    found = {path: len(RAW_WRITE.findall(text)) for path, text in _production_sources().items()}
    found = {path: n for path, n in found.items() if n}
    expected = {path: n for path, (n, _) in RAW_WRITES_ALLOWED.items()}
    assert found == expected, ("writes that bypass infra.storage's durable helpers changed (use the helpers, or "
                               f"list the file with its reason in RAW_WRITES_ALLOWED): found {found}")


def test_every_torch_load_is_weights_only() -> None:
    """No checkpoint mqgen reads can run code: every ``torch.load`` passes ``weights_only=True`` (pickle itself is
    refused by ruff's S301, configured in pyproject.toml)."""
    import ast

    calls = []
    for path, text in _production_sources().items():
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path}:{node.lineno}", safe))
    assert calls, "no torch.load found: the check no longer sees the code"
    assert all(safe for _, safe in calls), [where for where, safe in calls if not safe]
