"""Credentials in URLs (user:password@, the signature of a presigned URL) are never recorded: not in the log
files or the console, not in MLflow (params, tags, artifacts), not in Prefect's database, not in the ingest
manifest. The stage still reads the data with them."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infra.secrets import has_secret, keep_private, private_value, redact, redact_text
from tests.fixtures.ingest_data import sample_members, write_tar

SIG, CRED = "S3CRETSIGNATURE0123", "AKIASECRETCREDENTIAL"


@pytest.mark.parametrize("text, expected", [
    ("https://user:tok3n@example.com/data/{000..009}.tar", "https://REDACTED@example.com/data/{000..009}.tar"),
    ("https://b.s3.amazonaws.com/a.tar?X-Amz-Credential=AK%2F1&X-Amz-Expires=60&X-Amz-Signature=ab12",
     "https://b.s3.amazonaws.com/a.tar?X-Amz-Credential=REDACTED&X-Amz-Expires=60&X-Amz-Signature=REDACTED"),
    ("https://acc.blob.core.windows.net/c/a.tar?sv=2020-08-04&sp=r&sig=XYZ%3D",
     "https://acc.blob.core.windows.net/c/a.tar?sv=2020-08-04&sp=r&sig=REDACTED"),
    ("failed to read gs://b/a.tar?access_token=ya29.x#frag: 403", "failed to read gs://b/a.tar?access_token=REDACTED#frag: 403"),
    ("s3://bucket/shards/a.tar and /local/path.tar", "s3://bucket/shards/a.tar and /local/path.tar"),
])
def test_urls_lose_their_credentials_and_nothing_else(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_private_parameters_stay_in_the_process() -> None:
    plain = {"data": {"path": "/tmp/x"}}
    assert keep_private(plain) is plain
    secret = {"data": {"path": f"https://h/a.tar?X-Amz-Signature={SIG}"}}
    param = keep_private(secret)
    assert SIG not in repr(param) and has_secret(secret) and not has_secret(param)
    assert private_value(param) is secret and redact(secret) == param["redacted"]
    with pytest.raises(PermissionError, match="environment"):
        private_value({"redacted": {}, "private": "from-another-process"})


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the test shard, with byte ranges (what fsspec's HTTP file system asks for)."""

    def do_GET(self) -> None:
        path = Path(self.directory) / self.path.split("?", 1)[0].lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            body = data[start:end + 1]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_response(403)  # a URL presigned for GET refuses HEAD
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}


def _ingest_signed(served: Path, name: str, root: Path, *args: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """``mqgen run --only ingest`` on ``served/name`` behind a presigned-style URL (a local HTTP server)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: _RangeHandler(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = (f"http://127.0.0.1:{server.server_address[1]}/{name}?X-Amz-Credential={CRED}&X-Amz-Expires=600"
           f"&X-Amz-Signature={SIG}")
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "mqgen"), "run", "--only", "ingest", "--preset",
                               "tiny", *args, "data.source=shards", f"data.path={url}", f"run.root={root}",
                               "data.min_shards=1"],
                              env=_env(), capture_output=True, text=True, timeout=600, check=False)
    finally:
        server.shutdown()
    return url, proc


def _leaks(root: Path) -> list[str]:
    """The files under ``root`` holding the signature or the credential."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
            and any(s.encode() in p.read_bytes() for s in (SIG, CRED))]


@pytest.mark.slow  # a real `mqgen` process with its own Prefect server and MLflow database
@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_a_presigned_shard_url_is_read_and_recorded_nowhere(tmp_path: Path) -> None:
    served = tmp_path / "served"
    members = sample_members(40) + [("broken00001.png", b"not a png"), ("broken00001.cls", b"1")]
    write_tar(served / "shard.tar", members)
    root = tmp_path / "run"
    url, proc = _ingest_signed(served, "shard.tar", root, "-v", "data.val_fraction=0.25", "data.max_bad_fraction=0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [manifest] = list((root / "ingest").glob("*/manifest.json"))
    assert "X-Amz-Signature=REDACTED" in manifest.read_text()  # the source is recorded, without its secret
    assert _leaks(root) == [], f"credentials written to {_leaks(root)}"
    env = _env()
    assert SIG not in proc.stderr + proc.stdout and CRED not in proc.stderr + proc.stdout
    assert any(p.name == "prefect.db" for p in root.rglob("*"))  # Prefect's records were among the files read
    assert "REDACTED" in next((root / "ingest").glob("*/_key.json")).read_text()

    # the next night's URL, signed afresh: the same data, so the same ingest key (done), and nothing leaks
    fresh = url.replace(SIG, "FRESHSIGNATURE9876")
    status = subprocess.run([str(Path(sys.executable).parent / "mqgen"), "status", "--preset", "tiny",
                             "data.source=shards", f"data.path={fresh}", f"run.root={root}", "data.val_fraction=0.25",
                             "data.min_shards=1", "data.max_bad_fraction=0.1"], env={**env, "COLUMNS": "250"},
                            capture_output=True, text=True, timeout=300, check=False)
    assert status.returncode == 0, status.stderr[-3000:]
    [row] = [line for line in status.stdout.splitlines() if " ingest " in line]
    assert " done " in row, status.stdout
    assert "FRESHSIGNATURE9876" not in status.stdout + status.stderr and SIG not in status.stdout + status.stderr


@pytest.mark.long  # a real `mqgen` process; run by .ci/run after the README's test command
def test_a_failing_presigned_url_is_reported_without_its_secret(tmp_path: Path) -> None:
    """The stage fails on a signed URL that is gone (404): the message the user reads, the logs, MLflow and
    Prefect's records of the failed task (its state, its API logs, the persisted exception) never hold the
    signature."""
    served = tmp_path / "served"
    served.mkdir()
    root = tmp_path / "run"
    _, proc = _ingest_signed(served, "gone.tar", root, "--debug", "run.retries=0")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "gone.tar" in proc.stderr and "X-Amz-Signature=REDACTED" in proc.stderr, proc.stderr[-3000:]
    assert SIG not in proc.stderr + proc.stdout and CRED not in proc.stderr + proc.stdout
    assert _leaks(root) == [], f"credentials written to {_leaks(root)}"
    assert any(p.name == "prefect.db" for p in root.rglob("*"))
