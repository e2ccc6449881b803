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


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_kept_heap_is_given_back_on_request():
    """A study trims the heap between runs: with the tuning on, freed tensors stay in the process until
    release_freed_memory(), which gives them back (read from /proc in a fresh process)."""
    import subprocess
    import sys

    code = """
import torch
from largebatch.train.allocator import keep_freed_memory, release_freed_memory, freed_memory_kept
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
assert keep_freed_memory() and freed_memory_kept()
x = [torch.ones(2**20) for _ in range(128)]  # 512 MiB in 4 MiB tensors
held = rss()
del x
kept = rss()
assert release_freed_memory()
print(held, kept, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "LARGEBATCH_MALLOC_TUNING": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    held, kept, released = map(float, out.stdout.split())
    assert kept > held - 64  # the tuning keeps the freed 512 MiB
    assert released < kept - 400  # and the trim gives it back
