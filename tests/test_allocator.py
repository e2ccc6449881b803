"""The commands' allocator tuning: applied on glibc, switchable off, never an error elsewhere."""
import platform

import pytest

from largebatch.train.allocator import keep_freed_memory


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LARGEBATCH_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_on_glibc(monkeypatch):
    monkeypatch.delenv("LARGEBATCH_MALLOC_TUNING", raising=False)
    assert keep_freed_memory() is True
