"""Peak extra memory of one ``optimizer.step()`` on CPU, measured from the kernel's page accounting.

Method (Linux): before a step, the process's peak-RSS counter (VmHWM) is reset to the current RSS by writing
``5`` to ``/proc/self/clear_refs``; after the step, VmHWM − RSS-before is the peak extra resident memory the
step touched. glibc's *dynamic* mmap threshold is pinned first (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``) so that
every large temporary is a fresh mapping that is faulted in (and counted) on every step, instead of being
recycled from a heap that already counts as resident. Buffers an optimizer keeps outside its ``state`` (our
kernel's scratch, ``_scratch_buffers``) are added, since they are allocated once and would not show up after
the first step.

Limits: page granularity (4 KiB); temporaries below the mmap threshold that are reused from malloc's free
lists are not counted (this can only make an optimizer look better); other threads of the process count too
(the benchmark runs nothing else meanwhile). Off Linux, memory is reported as unavailable (None).
"""
from __future__ import annotations

import ctypes
import time

M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold so large temporaries are always fresh, counted mappings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except OSError:
        return False


def status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measured_step(opt) -> tuple[float, int | None]:
    """(seconds, peak extra bytes or None) of one ``opt.step()``."""
    rss0 = status_kib("VmRSS")
    ok = rss0 is not None and reset_peak()
    t0 = time.perf_counter()
    opt.step()
    dt = time.perf_counter() - t0
    if not ok:
        return dt, None
    peak = status_kib("VmHWM")
    return dt, max(0, (peak - rss0) * 1024) if peak is not None else None


def persistent_extra_bytes(opt) -> int:
    """Bytes of buffers the optimizer keeps outside its state (allocated once, reused every step)."""
    bufs = getattr(opt, "_scratch_buffers", {}) or {}
    return sum(b.numel() * b.element_size() for b in bufs.values())
