"""Builds, checks and calls the C CPU kernels (``csrc/largebatch_kernels.c``).

The kernel is compiled on first use with the system C compiler (``cc``/``gcc``; OpenMP shares the
runtime torch has already loaded) into ``$LARGEBATCH_CACHE`` or ``~/.cache/largebatch``, keyed by a
hash of the sources, the flags and the CPU, and loaded with ctypes: one call per parameter group and
step, whatever the number of tensors. When it loads, the C structs' size, field names and offsets are
checked against their ctypes mirrors here. With no compiler the optimizers fall back to the foreach path
with a one-time warning. ``LARGEBATCH_NO_KERNEL=1`` disables the kernel.

The hyper-parameter records passed to :func:`lamb_step` / :func:`lars_step` are
:class:`largebatch.optim.lamb.LambHyper` / :class:`largebatch.optim.lars.LarsHyper` (read by attribute).
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "largebatch_kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
PHI_CODES = {"identity": 0, "clamp_norm": 1, "clamp_ratio": 2, "cap_ratio": 3}
#: tensors with at least this many elements are split over all threads, smaller ones run concurrently
PAR_THRESHOLD = 1 << 18
STEP_FUNCTIONS = ("lb_lamb_f32", "lb_lamb_f64", "lb_lars_f32", "lb_lars_f64")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class KernelLayoutError(RuntimeError):
    """The compiled kernel's struct layout differs from the ctypes mirror: a bug, never a fallback."""


class CLambHyper(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in
                ("beta1", "beta2", "beta3", "eps", "clip", "l2", "wd_in", "decay_out", "phi_min", "phi_max")] + \
               [(n, ctypes.c_int32) for n in ("eps_inside", "phi", "has_min", "has_max")]


class CLarsHyper(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in
                ("momentum", "beta3", "weight_decay", "clip", "lr", "trust_coefficient", "eps", "phi_min",
                 "phi_max")] + \
               [(n, ctypes.c_int32) for n in ("mode_2017", "nesterov", "larc_clip", "phi", "has_min", "has_max")]


def _phi_fields(h: Any) -> dict[str, Any]:
    return dict(phi=PHI_CODES[h.phi], phi_min=h.phi_min or 0.0, phi_max=h.phi_max or 0.0,
                has_min=h.phi_min is not None, has_max=h.phi_max is not None)


def c_lamb_hyper(h: Any, clip: float) -> CLambHyper:
    """The C struct of a :class:`~largebatch.optim.lamb.LambHyper` and this step's clip factor."""
    return CLambHyper(beta1=h.beta1, beta2=h.beta2, beta3=h.beta3, eps=h.eps, clip=clip, l2=h.l2, wd_in=h.wd_in,
                      decay_out=h.decay_out, eps_inside=int(h.eps_inside_sqrt), **_phi_fields(h))


def c_lars_hyper(h: Any, clip: float) -> CLarsHyper:
    """The C struct of a :class:`~largebatch.optim.lars.LarsHyper` and this step's clip factor."""
    return CLarsHyper(momentum=h.momentum, beta3=h.beta3, weight_decay=h.weight_decay, clip=clip, lr=h.lr,
                      trust_coefficient=h.trust_coefficient, eps=h.eps, mode_2017=int(h.mode_2017),
                      nesterov=int(h.nesterov), larc_clip=int(h.larc_clip), **_phi_fields(h))


def _cache_dir() -> Path:
    return Path(os.environ.get("LARGEBATCH_CACHE", Path.home() / ".cache" / "largebatch"))


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def compile_library(source: Path, include_dirs: Sequence[Path] = ()) -> Path:
    """Compile ``source`` (which may include files from ``include_dirs``) once; the cached .so's path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, e.g. apt-get install -y gcc)")
    blob = source.read_bytes() + b"".join(p.read_bytes() for d in include_dirs for p in sorted(Path(d).glob("*.c")))
    key = hashlib.sha256(blob + " ".join(FLAGS).encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a temporary name and rename: concurrent processes (torchrun ranks) never load a
        # half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        includes = [f"-I{d}" for d in include_dirs]
        proc = subprocess.run([compiler, *FLAGS, *includes, "-o", tmp, str(source)], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {source.name} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)
    return target


def check_layout(lib: ctypes.CDLL, mirrors: Sequence[type[ctypes.Structure]] = (CLambHyper, CLarsHyper)) -> None:
    """Raise :class:`KernelLayoutError` unless each C struct's size, field names and offsets are the mirror's."""
    for which, mirror in enumerate(mirrors):
        buf = (ctypes.c_int64 * 64)()
        c_names = lib.lb_struct_layout(which, buf, 64).decode().rstrip(",").split(",")
        names = [field[0] for field in mirror._fields_]  # (name, type) or (name, type, bits)
        c_layout = [buf[0], *buf[1:1 + len(c_names)]]
        layout = [ctypes.sizeof(mirror), *(getattr(mirror, name).offset for name in names)]
        if c_names != names or c_layout != layout:
            raise KernelLayoutError(
                f"{mirror.__name__} does not match the C struct: C fields {c_names} at (size, offsets) {c_layout}, "
                f"ctypes fields {names} at {layout}; edit the two together")


def load_library(source: Path = SOURCE, include_dirs: Sequence[Path] = ()) -> ctypes.CDLL:
    """Build (cached) and load a library exporting the step functions; its struct layout is checked."""
    lib = ctypes.CDLL(str(compile_library(source, include_dirs)))
    for name in STEP_FUNCTIONS:
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 9, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    for name in ("lb_first_nonfinite_f32", "lb_first_nonfinite_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.lb_struct_layout.restype = ctypes.c_char_p
    lib.lb_struct_layout.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    check_layout(lib)
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
                    _lib = load_library()
                except KernelLayoutError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any other failure means "use the fallback"
                    _error = str(exc)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    library()
    return _error or ""


def _int64s(values) -> array.array:
    """A C int64 array (``array`` converts many Python ints faster than ``torch.tensor``; see
    benchmarks/optimizer_step/README.md)."""
    return array.array("q", values)


def _address(a: array.array) -> int:
    return a.buffer_info()[0]


def scratch_elements(numels: list[int], nthreads: int) -> int:
    """Scratch the LAMB kernel needs: the largest large tensor, or one slot per thread of the size of
    the largest small tensor (below PAR_THRESHOLD elements), whichever is more."""
    large = max((n for n in numels if n >= PAR_THRESHOLD), default=0)
    small = max((n for n in numels if n < PAR_THRESHOLD), default=0)
    return max(large, nthreads * small)


def first_nonfinite(ts: Sequence[Tensor], *, lib: ctypes.CDLL | None = None) -> int | None:
    """Index of the first tensor holding a NaN or ±inf, -1 if none; None when the kernel cannot take
    them (not all contiguous CPU tensors of one dtype, float32 or float64: use torch then)."""
    dtype = ts[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return None
    for t in ts:
        if not t.is_cpu or t.dtype != dtype or not t.is_contiguous():
            return None
    lib = lib or library()
    suffix = "f64" if dtype == torch.float64 else "f32"
    ptrs, numel = _int64s([t.data_ptr() for t in ts]), _int64s([t.numel() for t in ts])
    first = getattr(lib, f"lb_first_nonfinite_{suffix}")(len(ts), _address(ptrs), _address(numel),
                                                         torch.get_num_threads())
    if first < -1:
        raise MemoryError("largebatch kernel lb_first_nonfinite: out of memory")
    return first


def _call(lib: ctypes.CDLL | None, name: str, tensors: Sequence[Sequence[Tensor]], coefs: Tensor | None,
          trust: Tensor, c_hyper: ctypes.Structure, scratch: Tensor | None, numels: list[int],
          out: Tensor | None) -> Tensor:
    """``tensors``: x, g, m and (LAMB) v lists of one dtype. ``out``: [n, 3] float64 to write into."""
    lib = lib or library()
    assert lib is not None
    xs = tensors[0]
    n = len(xs)
    suffix = "f64" if xs[0].dtype == torch.float64 else "f32"
    px, pg, pm = (_int64s([t.data_ptr() for t in ts]) for ts in tensors[:3])
    pv = _int64s([t.data_ptr() for t in tensors[3]]) if len(tensors) > 3 else px
    numel = _int64s(numels)
    trust_u8 = trust.to(torch.uint8).contiguous()
    if coefs is not None:
        coefs = coefs.to(torch.float64).contiguous()
    out = torch.empty((n, 3), dtype=torch.float64) if out is None else out
    rc = getattr(lib, f"{name}_{suffix}")(
        n, _address(px), _address(pg), _address(pm), _address(pv), _address(numel),
        coefs.data_ptr() if coefs is not None else None, trust_u8.data_ptr(), ctypes.addressof(c_hyper),
        out.data_ptr(), torch.get_num_threads(), scratch.data_ptr() if scratch is not None else None, PAR_THRESHOLD)
    if rc != 0:
        raise MemoryError(f"largebatch kernel {name}_{suffix} failed (code {rc})")
    return out


def lamb_step(xs, gs, ms, vs, coefs: Tensor, trust: Tensor, hyper: Any, clip: float,
              scratch: Tensor | Callable[[torch.dtype, int], Tensor], *, lib: ctypes.CDLL | None = None,
              out: Tensor | None = None) -> Tensor:
    """One fused LAMB step over a list of tensors; returns [n, 3] float64 (‖x‖, ‖u‖, ratio).

    ``hyper``: a :class:`~largebatch.optim.lamb.LambHyper`; ``clip``: the gradient factor of this step
    (1.0 without pre-normalisation). ``scratch``: at least :func:`scratch_elements` elements of the
    tensors' dtype, or a function ``(dtype, elements) -> buffer`` that provides them (the optimizers'
    reusable buffer). ``lib``: another build of the kernel (the benchmark's profile); ``out``: the
    result buffer.
    """
    numels = [t.numel() for t in xs]
    need = scratch_elements(numels, torch.get_num_threads())
    if callable(scratch):
        scratch = scratch(xs[0].dtype, need)
    if scratch.numel() < need or scratch.dtype != xs[0].dtype:
        raise ValueError(f"scratch must hold {need} {xs[0].dtype} elements")
    return _call(lib, "lb_lamb", (xs, gs, ms, vs), coefs, trust, c_lamb_hyper(hyper, clip), scratch, numels, out)


def lars_step(xs, gs, ms, trust: Tensor, hyper: Any, clip: float, *, lib: ctypes.CDLL | None = None,
              out: Tensor | None = None) -> Tensor:
    """One fused LARS step; returns [n, 3] float64 (‖x‖, ‖m‖ or ‖g‖ in 2017 mode, ratio).
    ``hyper``: a :class:`~largebatch.optim.lars.LarsHyper`; the rest as in :func:`lamb_step`."""
    return _call(lib, "lb_lars", (xs, gs, ms), None, trust, c_lars_hyper(hyper, clip), None,
                 [t.numel() for t in xs], out)
