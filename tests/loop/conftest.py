"""The kill -9 loop runs only when asked (``MQGEN_KILL_LOOP=1``; ``.ci/run`` does, after the README's test
command): it takes several minutes of whole-pipeline runs."""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("MQGEN_KILL_LOOP") == "1" else ["test_*.py"]
