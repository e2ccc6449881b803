"""Where the time of our LAMB/LARS step goes: the C kernel's passes timed one at a time.

Hardware counters are not readable on the VMs this runs on (``perf`` reports them "not supported"), so
the profile is made of timings that separate the three possible limits:

- **memory traffic** — each pass timed alone over the whole set (every tensor's pass 1, then every
  tensor's pass 2, which then reads x from memory: "cold"), divided into the bytes it must move
  (``PASS_BYTES``) → GB/s, beside the probe's bandwidth and fused AdamW's own GB/s. LAMB's pass 2 alone
  is not all cold: every tensor's u sits at the start of the one scratch buffer, whose first megabytes stay
  cached from tensor to tensor, so its time is a lower bound;
- **cache reuse** — the real (fused) schedule runs pass 2 of a tensor right after its pass 1, backwards;
  ``pass 1 + cold pass 2 − fused`` is the time the cache saved (for LAMB an underestimate, see above);
- **arithmetic** — the same kernels on one thread over data that stays in L1/L2 (one 16,384-element
  tensor passed 64 times), in ns per element, beside fused AdamW's: if ``ns/element × params ÷ threads``
  approaches the step time, the step is compute-bound, not memory-bound.
"""
from __future__ import annotations

import ctypes
import functools
import statistics
import time
from pathlib import Path

import torch

from largebatch.optim import kernel
from largebatch.optim.lamb import LambHyper, lamb_coefficients
from largebatch.optim.lars import LarsHyper

#: the shipped kernel with a switch to run one pass alone (``csrc/profile_kernels.c``)
PROFILE_SOURCE = Path(__file__).with_name("csrc") / "profile_kernels.c"
PHASE_FUSED, PHASE_NORMS, PHASE_APPLY = 0, 1, 2

#: bytes each pass must move per fp32 parameter (reads + writes)
PASS_BYTES = {
    "lamb pass 1": 28,   # read x, g, m, v; write m, v and u (to the scratch)
    "lamb pass 2": 12,   # read x, u; write x
    "lars pass 1": 16,   # read x, g, m; write m
    "lars pass 2": 12,   # read x, m; write x
    "adamw": 28,         # read x, g, m, v; write x, m, v
}


def _median_times(parts: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin (one call of each in turn, like the benchmark),
    so every part sees the same machine noise; one untimed warm-up call each."""
    for fn in parts.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@functools.cache
def profile_library() -> ctypes.CDLL:
    """The profile's build of the kernel (compiled once, cached like the shipped one)."""
    lib = kernel.load_library(PROFILE_SOURCE, include_dirs=[kernel.SOURCE.parent])
    lib.lb_profile_set_phase.restype = None
    lib.lb_profile_set_phase.argtypes = [ctypes.c_int]
    return lib


def run_phase(step, phase: int, ratios: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``step(..., lib=, out=)`` (``kernel.lamb_step`` / ``lars_step``) with one pass alone or both.
    PHASE_APPLY needs this step's ``ratios``; only PHASE_FUSED is a correct LAMB step."""
    lib = profile_library()
    out = None
    if phase == PHASE_APPLY:
        if ratios is None:
            raise ValueError("phase APPLY needs the ratios")
        out = torch.zeros((len(ratios), 3), dtype=torch.float64)
        out[:, 2] = ratios
    lib.lb_profile_set_phase(phase)
    try:
        return step(lib=lib, out=out, **kwargs)
    finally:
        lib.lb_profile_set_phase(PHASE_FUSED)


#: the settings the benchmark's table times (see ``peers.optimizer_factories``)
LR, WEIGHT_DECAY, MOMENTUM = 1e-3, 0.01, 0.9


def _groups() -> tuple[dict, dict]:
    """Default Lamb and Lars param groups, as the optimizers themselves fill them in."""
    from largebatch import Lamb, Lars

    p = [torch.nn.Parameter(torch.zeros(1))]
    return (Lamb(p, lr=LR, weight_decay=WEIGHT_DECAY).param_groups[0],
            Lars(p, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM).param_groups[0])


class _Problem:
    """x, g, m, v for the given shapes (fp32) plus the kernel's inputs, timing callables per pass."""

    def __init__(self, shapes, *, repeat_one: int = 0, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)

        def arrays(shape):
            return (torch.randn(shape, generator=gen) * 0.02, torch.randn(shape, generator=gen) * 1e-3,
                    torch.zeros(shape), torch.zeros(shape))

        if repeat_one:  # one small tensor passed many times: the data stays in cache
            self.xs, self.gs, self.ms, self.vs = ([t] * repeat_one for t in arrays(shapes[0]))
        else:
            self.xs, self.gs, self.ms, self.vs = (list(a) for a in zip(*(arrays(s) for s in shapes)))
        n = len(self.xs)
        self.n_params = sum(x.numel() for x in self.xs)
        self.trust = torch.ones(n, dtype=torch.bool)
        lamb_group, lars_group = _groups()
        self.lamb_hyper = LambHyper.from_group(lamb_group)
        self.lars_hyper = LarsHyper.from_group(lars_group)
        self.coefs = lamb_coefficients(torch.ones(n), self.lamb_hyper)  # the first step's
        self.ratios = torch.ones(n, dtype=torch.float64)
        need = kernel.scratch_elements([x.numel() for x in self.xs], torch.get_num_threads())
        self.scratch = torch.empty(need)
        self.steps = [torch.tensor(1.0) for _ in range(n)]

    def lamb(self, phase: int) -> torch.Tensor:
        return run_phase(kernel.lamb_step, phase, self.ratios, xs=self.xs, gs=self.gs, ms=self.ms, vs=self.vs,
                         coefs=self.coefs, trust=self.trust, hyper=self.lamb_hyper, clip=1.0, scratch=self.scratch)

    def lars(self, phase: int) -> torch.Tensor:
        return run_phase(kernel.lars_step, phase, self.ratios, xs=self.xs, gs=self.gs, ms=self.ms,
                         trust=self.trust, hyper=self.lars_hyper, clip=1.0)

    def adamw(self) -> None:
        torch._fused_adamw_(self.xs, self.gs, self.ms, self.vs, [], self.steps, lr=LR, beta1=0.9,
                            beta2=0.999, weight_decay=WEIGHT_DECAY, eps=1e-8, amsgrad=False, maximize=False)


def _passes(p: _Problem, repeats: int) -> dict[str, float]:
    f, n1, a2 = PHASE_FUSED, PHASE_NORMS, PHASE_APPLY
    return _median_times({
        "adamw": p.adamw,
        "lamb fused": lambda: p.lamb(f),
        "lamb pass 1": lambda: p.lamb(n1),
        "lamb pass 2": lambda: p.lamb(a2),
        "lars fused": lambda: p.lars(f),
        "lars pass 1": lambda: p.lars(n1),
        "lars pass 2": lambda: p.lars(a2),
    }, repeats)


def profile_set(shapes, *, repeats: int = 5) -> dict:
    """Pass-by-pass timings of our kernels and fused AdamW on ``shapes`` (all threads), as a dict."""
    if not kernel.available():
        return {"error": f"kernel unavailable: {kernel.unavailable_reason()}"}
    p = _Problem(shapes)
    t = _passes(p, repeats)
    n = p.n_params
    rows = []
    for name, secs in t.items():
        nbytes = PASS_BYTES.get(name)
        rows.append({"part": name, "ms": secs * 1e3,
                     "bytes_per_param": nbytes, "gbs": nbytes * n / secs / 1e9 if nbytes else None})
    out = {"params": n, "threads": torch.get_num_threads(), "rows": rows}
    for opt in ("lamb", "lars"):
        fused, p1, p2 = t[f"{opt} fused"], t[f"{opt} pass 1"], t[f"{opt} pass 2"]
        out[f"{opt}_cache_saving_ms"] = (p1 + p2 - fused) * 1e3
        out[f"{opt}_over_adamw"] = fused / t["adamw"]
    return out


def compute_cost(*, elements: int = 16_384, repeat: int = 64, repeats: int = 9) -> dict:
    """ns per element of each kernel on ONE thread with the data in L1/L2 (arithmetic, not memory)."""
    if not kernel.available():
        return {"error": f"kernel unavailable: {kernel.unavailable_reason()}"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = _Problem([(elements,)], repeat_one=repeat)
        t = _passes(p, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"elements": elements * repeat, "ns_per_element": {k: v / (elements * repeat) * 1e9 for k, v in t.items()}}


def markdown(profiles: dict, compute: dict, bandwidth: float) -> str:
    """The profile section of results.md."""
    lines = ["\n## Profile: where our step's time goes\n",
             "Timed round-robin like the table above, on one set of tensors: each pass of the C kernel alone "
             "over the whole set (pass 2 alone runs after every tensor's pass 1, so it reads x from memory; LAMB's "
             "u comes from the start of the one scratch buffer, partly cached, so its pass 2 alone is a lower "
             "bound and its cache saving an underestimate), the "
             "real fused schedule (pass 2 of a tensor right after its pass 1, backwards, from cache), and "
             "torch's `_fused_adamw_` on the same tensors; GB/s = the bytes the pass must move ÷ its time "
             f"(probe: {bandwidth:.1f} GB/s).\n"]
    for set_name, prof in profiles.items():
        if "error" in prof:
            lines.append(f"\n**{set_name}**: {prof['error']}\n")
            continue
        lines.append(f"\n**{set_name}** ({prof['params'] / 1e6:.1f} M params, {prof['threads']} threads): "
                     f"LAMB ÷ AdamW {prof['lamb_over_adamw']:.2f}, LARS ÷ AdamW {prof['lars_over_adamw']:.2f}; "
                     f"cache saved {prof['lamb_cache_saving_ms']:.1f} ms (LAMB), "
                     f"{prof['lars_cache_saving_ms']:.1f} ms (LARS)\n")
        lines.append("| part | ms | bytes/param | GB/s |")
        lines.append("|---|---:|---:|---:|")
        for r in prof["rows"]:
            gbs = "—" if r["gbs"] is None else f"{r['gbs']:.1f}"
            nb = "—" if r["bytes_per_param"] is None else str(r["bytes_per_param"])
            lines.append(f"| {r['part']} | {r['ms']:.1f} | {nb} | {gbs} |")
    if "error" not in compute:
        ns = compute["ns_per_element"]
        lines.append(f"\nArithmetic (1 thread, data in L1/L2, {compute['elements']:,} elements): "
                     + ", ".join(f"{k} {v:.2f} ns" for k, v in ns.items()) + " per element.\n")
    return "\n".join(lines) + "\n"
