"""Decompression amplification: a small file holding a huge image is skipped (too_large) from its header, before
any pixel is decoded, and a large legitimate 16-bit image decodes in a few copies of its size. Both checked in a
process whose address space is capped (``RLIMIT_AS``) at what it uses plus 200 MB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.ingest.sources import TOO_LARGE, BadInput, ImageSpec, decode_cost, decode_image

REPO = Path(__file__).resolve().parents[2]
CAPPED = """
import io, resource, sys
import numpy as np
from PIL import Image
from tasks.ingest.sources import BadInput, ImageSpec, decode_image

def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

big16 = png(np.full((4000, 4000), 40000, np.uint16))   # 32 MB of 16-bit pixels in a small file
bomb = png(np.zeros((9000, 9000), np.uint8))            # 81 Mpx: under Pillow's own limit, over our budget
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (200 << 20), resource.RLIM_INFINITY))
spec = ImageSpec(size=32, channels=1)
arr = decode_image(big16, spec, "crop")
assert arr.shape == (32, 32) and int(arr.mean()) == round(40000 * 255 / 65535), arr.mean()
try:
    decode_image(bomb, spec, "crop")
except BadInput as e:
    print("skipped", e.reason, e.detail)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from Linux /proc")
def test_a_bomb_is_skipped_from_its_header_and_a_big_16bit_image_fits_a_capped_process() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPPED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a MemoryError here: decoding took more than the cap
    assert proc.stdout.startswith(f"skipped {TOO_LARGE} 9000x9000 L takes about"), proc.stdout


def test_the_budget_is_the_config_value_and_counts_conversion_copies() -> None:
    assert decode_cost(100, 100, "RGBA") == 100 * 100 * (4 + 15)  # decoded + RGBA, canvas, composite, RGB
    spec = ImageSpec(size=32, channels=3, max_decode_bytes=1 << 20)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (300, 300)).save(buf, format="PNG")
    with pytest.raises(BadInput) as info:
        decode_image(buf.getvalue(), spec, "crop")
    assert info.value.reason == TOO_LARGE and "data.max_decode_mb=1" in info.value.detail
