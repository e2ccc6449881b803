"""Shared pytest configuration for the optimizer tests (kept minimal)."""
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: uses torch.compile (skipped when it cannot run here); "
                                       "deselect with -m 'not compile'")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only with LARGEBATCH_SLOW=1 (the default run stays within minutes on 2 cores)."""
    if os.environ.get("LARGEBATCH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set LARGEBATCH_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
