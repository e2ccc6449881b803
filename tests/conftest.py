"""Shared pytest configuration for the optimizer tests (kept minimal)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: uses torch.compile (skipped when it cannot run here); "
                                       "deselect with -m 'not compile'")
