"""One Prefect test harness (a temporary API server and database) for all flow tests: starting one costs
tens of seconds on a small machine."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The harness's API URL; subprocesses reach the same API through ``PREFECT_API_URL``."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()
