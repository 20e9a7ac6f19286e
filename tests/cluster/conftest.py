"""The two-node Ray cluster tests run only when asked (``MQGEN_CLUSTER_TESTS=1``): they start two real Ray
nodes on this machine and run a whole grid on them, which takes minutes."""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("MQGEN_CLUSTER_TESTS") == "1" else ["test_*.py"]
