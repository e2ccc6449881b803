"""Builds and calls the C CPU kernels (``csrc/largebatch_kernels.c``).

The kernel is compiled on first use with the system C compiler (``cc``/``gcc``; OpenMP shares the
runtime torch has already loaded) into ``$LARGEBATCH_CACHE`` or ``~/.cache/largebatch``, keyed by a
hash of the source, the flags and the CPU, and loaded with ctypes: one call per parameter group and
step, whatever the number of tensors. With no compiler the optimizers fall back to the foreach path
with a one-time warning. ``LARGEBATCH_NO_KERNEL=1`` disables the kernel.
"""
from __future__ import annotations

import array
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("csrc") / "largebatch_kernels.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
_PHI = {"identity": 0, "clamp_norm": 1, "clamp_ratio": 2, "cap_ratio": 3}
PHASE_FUSED, PHASE_NORMS, PHASE_APPLY = 0, 1, 2
#: tensors with at least this many elements are split over all threads, smaller ones run concurrently
PAR_THRESHOLD = 1 << 18

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class _LambHyper(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in
                ("beta1", "beta2", "beta3", "eps", "clip", "l2", "wd_in", "decay_out", "phi_min", "phi_max")] + \
               [(n, ctypes.c_int32) for n in ("eps_inside", "phi", "has_min", "has_max")]


class _LarsHyper(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in
                ("momentum", "beta3", "weight_decay", "clip", "lr", "trust_coefficient", "eps", "phi_min",
                 "phi_max")] + \
               [(n, ctypes.c_int32) for n in ("mode_2017", "nesterov", "larc_clip", "phi", "has_min", "has_max")]


@dataclass
class LambHyper:
    beta1: float
    beta2: float
    beta3: float
    eps: float
    eps_inside_sqrt: bool
    clip: float
    l2: float
    wd_in: float
    decay_out: float
    phi: str
    phi_min: float | None
    phi_max: float | None

    def to_c(self) -> _LambHyper:
        return _LambHyper(self.beta1, self.beta2, self.beta3, self.eps, self.clip, self.l2, self.wd_in,
                          self.decay_out, self.phi_min or 0.0, self.phi_max or 0.0, int(self.eps_inside_sqrt),
                          _PHI[self.phi], self.phi_min is not None, self.phi_max is not None)


@dataclass
class LarsHyper:
    momentum: float
    beta3: float
    weight_decay: float
    clip: float
    lr: float
    trust_coefficient: float
    eps: float
    mode_2017: bool
    nesterov: bool
    larc_clip: bool
    phi: str
    phi_min: float | None
    phi_max: float | None

    def to_c(self) -> _LarsHyper:
        return _LarsHyper(self.momentum, self.beta3, self.weight_decay, self.clip, self.lr,
                          self.trust_coefficient, self.eps, self.phi_min or 0.0, self.phi_max or 0.0,
                          int(self.mode_2017), int(self.nesterov), int(self.larc_clip), _PHI[self.phi],
                          self.phi_min is not None, self.phi_max is not None)


def _cache_dir() -> Path:
    return Path(os.environ.get("LARGEBATCH_CACHE", Path.home() / ".cache" / "largebatch"))


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, e.g. apt-get install -y gcc)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    target = _cache_dir() / f"largebatch_kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a temporary name and rename: concurrent processes (torchrun ranks) never load a
        # half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling the kernel failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    for name in ("lb_lamb_f32", "lb_lamb_f64", "lb_lars_f32", "lb_lars_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    lib.lb_triad_f32.restype = None
    lib.lb_triad_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_float, ctypes.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None if that is impossible."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("LARGEBATCH_NO_KERNEL"):
                _error = "disabled by LARGEBATCH_NO_KERNEL"
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # noqa: BLE001 - any failure means "use the fallback"
                    _error = str(exc)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    library()
    return _error or ""


def _int64s(values) -> array.array:
    """A C int64 array (``array`` converts 10,000 Python ints ~3x faster than ``torch.tensor``: 0.5 vs 1.6 ms)."""
    return array.array("q", values)


def _address(a: array.array) -> int:
    return a.buffer_info()[0]


def scratch_elements(numels: list[int], nthreads: int) -> int:
    """Scratch the LAMB kernel needs: the largest large tensor, or one slot per thread of the size of
    the largest small tensor (below PAR_THRESHOLD elements), whichever is more."""
    large = max((n for n in numels if n >= PAR_THRESHOLD), default=0)
    small = max((n for n in numels if n < PAR_THRESHOLD), default=0)
    return max(large, nthreads * small)


def _call(name: str, xs, gs, ms, vs, coefs: Tensor | None, trust: Tensor, hyper, scratch: Tensor | None,
          phase: int, nthreads: int, ratios: Tensor | None = None, numels: list[int] | None = None) -> Tensor:
    lib = library()
    assert lib is not None
    n = len(xs)
    suffix = "f64" if xs[0].dtype == torch.float64 else "f32"
    px, pg, pm = (_int64s([t.data_ptr() for t in ts]) for ts in (xs, gs, ms))
    pv = _int64s([t.data_ptr() for t in vs]) if vs is not None else px
    numel = _int64s([t.numel() for t in xs] if numels is None else numels)
    trust_u8 = trust.to(torch.uint8).contiguous()
    if coefs is not None:
        coefs = coefs.to(torch.float64).contiguous()
    out = torch.empty((n, 3), dtype=torch.float64)
    if phase == PHASE_APPLY:  # pass 2 alone reads each tensor's ratio from out[:, 2]
        if ratios is None:
            raise ValueError("phase APPLY needs the ratios")
        out[:, 2] = ratios
    c_hyper = hyper.to_c()
    rc = getattr(lib, f"{name}_{suffix}")(
        n, _address(px), _address(pg), _address(pm), _address(pv), _address(numel),
        coefs.data_ptr() if coefs is not None else None, trust_u8.data_ptr(), ctypes.addressof(c_hyper),
        out.data_ptr(), phase, nthreads,
        scratch.data_ptr() if scratch is not None else None, PAR_THRESHOLD)
    if rc != 0:
        raise MemoryError(f"largebatch kernel {name}_{suffix} failed (code {rc})")
    return out


def lamb_step(xs, gs, ms, vs, coefs: Tensor, trust: Tensor, hyper: LambHyper,
              scratch: Tensor | Callable[[torch.dtype, int], Tensor], *, phase: int = PHASE_FUSED,
              ratios: Tensor | None = None) -> Tensor:
    """One fused LAMB step over a list of tensors; returns [n, 3] float64 (‖x‖, ‖u‖, ratio).

    ``scratch``: at least :func:`scratch_elements` elements of the tensors' dtype, or a function
    ``(dtype, elements) -> buffer`` that provides them (the optimizers' reusable buffer). ``phase``
    PHASE_NORMS runs pass 1 only (returns the squared norms, writes m, v), PHASE_APPLY pass 2 only with
    the given ``ratios``: used by the benchmark's profile to time the passes one at a time (pass 2 then
    reads the scratch the last tensor's pass 1 left, so only PHASE_FUSED is a correct step).
    """
    nthreads = torch.get_num_threads()
    numels = [t.numel() for t in xs]
    need = scratch_elements(numels, nthreads)
    if callable(scratch):
        scratch = scratch(xs[0].dtype, need)
    if scratch.numel() < need or scratch.dtype != xs[0].dtype:
        raise ValueError(f"scratch must hold {need} {xs[0].dtype} elements")
    return _call("lb_lamb", xs, gs, ms, vs, coefs, trust, hyper, scratch, phase, nthreads, ratios, numels)


def lars_step(xs, gs, ms, trust: Tensor, hyper: LarsHyper, *, phase: int = PHASE_FUSED,
              ratios: Tensor | None = None) -> Tensor:
    """One fused LARS step; returns [n, 3] float64 (‖x‖, ‖m‖ or ‖g‖ in 2017 mode, ratio).
    ``phase``/``ratios`` as in :func:`lamb_step` (pass 2 alone is a correct step here: no scratch)."""
    return _call("lb_lars", xs, gs, ms, None, None, trust, hyper, None, phase, torch.get_num_threads(), ratios)


def triad(a: Tensor, b: Tensor, c: Tensor, s: float = 1.5) -> None:
    """a = b + s·c over float32 CPU tensors, all threads (memory-bandwidth probe)."""
    lib = library()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    lib.lb_triad_f32(a.data_ptr(), b.data_ptr(), c.data_ptr(), a.numel(), s, torch.get_num_threads())
