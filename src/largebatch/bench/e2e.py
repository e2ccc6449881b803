"""End-to-end training steps (forward, backward, optimizer step, zero_grad), optimizers side by side.

Timing: every variant (an optimizer, and whether it steps inside the backward pass) gets its own copy of
the same initial model; after the warm-up steps, one whole training step of each is timed in turn
(``time.perf_counter`` around each phase), the order of every round shuffled with a fixed seed, as the
optimizer-step benchmark does, so all variants share the machine's noise.

Memory: the peak resident memory of the whole step, measured in a fresh process per variant (spawned, so
nothing else lives in it): glibc's mmap threshold is pinned to 1 MiB, so every large buffer (activations,
gradients, optimizer temporaries) is its own mapping, resident while it lives and returned when freed;
after the warm-up steps Linux's peak-RSS counter (VmHWM) is reset (``/proc/self/clear_refs``) and read
after one more step. Reported: that peak minus the process's RSS before the model was built, i.e. the
parameters, optimizer state, gradients, activations and temporaries at the step's high-water mark. RSS is
what the operating system charges the run (and what an out-of-memory kill looks at); torch's CPU
allocator keeps no statistics of its own. Limits: page granularity, and buffers under 1 MiB come from
malloc's heap, which keeps its own high-water mark (a few MiB).
"""
from __future__ import annotations

import concurrent.futures
import copy
import gc
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .memory import pin_mmap_threshold, reset_peak, status_kib
from .models import WORKLOADS, Workload

PRECISIONS = ("fp32", "bf16-autocast")
PHASES = ("forward", "backward", "optimizer", "zero_grad")
LR = 1e-4  # small, so that a few steps from a random init stay finite (the values do not change the timing)


@dataclass(frozen=True)
class Variant:
    """An optimizer built on a model's parameters, stepped after backward or inside it."""
    name: str
    build: Callable[[torch.nn.Module], torch.optim.Optimizer]
    in_backward: bool = False


def _groups(model):
    import largebatch

    return largebatch.param_groups(model, weight_decay=0.01)


def variants() -> dict[str, Variant]:
    """The yardstick first."""
    import largebatch

    out = [
        Variant("torch AdamW (fused)", lambda m: torch.optim.AdamW(_groups(m), lr=LR, fused=True)),
        Variant("largebatch Lamb", lambda m: largebatch.Lamb(_groups(m), lr=LR)),
        Variant("largebatch Lars", lambda m: largebatch.Lars(_groups(m), lr=LR, momentum=0.9)),
        # nonfinite="raise" (each gradient checked before its step): the default "skip" needs all gradients
        Variant("largebatch Lamb (step in backward)",
                lambda m: largebatch.Lamb(_groups(m), lr=LR, nonfinite="raise"), in_backward=True),
    ]
    return {v.name: v for v in out}


def amp_context(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r} (allowed: {' | '.join(PRECISIONS)})")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")


class Runner:
    """One variant's model and optimizer; ``step()`` runs and times one whole training step."""

    def __init__(self, workload: Workload, model: torch.nn.Module, variant: Variant, precision: str):
        self.workload, self.model, self.precision = workload, model, precision
        self.optimizer = variant.build(model)
        self.handle = None
        if variant.in_backward:
            import largebatch

            self.handle = largebatch.step_in_backward(model, self.optimizer)

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        with amp_context(self.precision):
            loss = self.workload.loss(self.model, self.workload.batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if self.handle is None:  # inside backward, the step has already happened
            self.optimizer.step()
        t3 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "zero_grad": t4 - t3, "step": t4 - t0}


@dataclass
class Timings:
    name: str
    in_backward: bool
    phases: list[dict[str, float]] = field(default_factory=list)
    memory: dict | None = None
    error: str | None = None


def time_variants(workload: Workload, precision: str, chosen: dict[str, Variant], *, steps: int, warmup: int,
                  progress: Callable[[], None] | None = None) -> dict[str, Timings]:
    """Round-robin timing of every variant on its own copy of ``workload.model``."""
    runners, out = {}, {}
    for name, variant in chosen.items():
        out[name] = Timings(name, variant.in_backward)
        runners[name] = Runner(workload, copy.deepcopy(workload.model), variant, precision)
        for _ in range(warmup):
            runners[name].step()
        gc.collect()
    order, rng = list(runners), random.Random(0)
    for _ in range(steps):
        rng.shuffle(order)
        for name in order:
            out[name].phases.append(runners[name].step())
            if progress is not None:
                progress()
    del runners
    gc.collect()
    return out


def measure_memory(workload_name: str, batch_size: int, precision: str, variant_name: str, *, warmup: int,
                   threads: int) -> dict:
    """Peak RSS of one whole training step (see the module docstring); runs in a fresh process."""
    pin_mmap_threshold()
    torch.set_num_threads(threads)
    import transformers  # noqa: F401 - loaded before the baseline: a library is not the step's memory

    base = status_kib("VmRSS")
    workload = WORKLOADS[workload_name](batch_size)
    runner = Runner(workload, workload.model, variants()[variant_name], precision)
    for _ in range(max(warmup, 1)):  # the first step creates the optimizer state
        runner.step()
    gc.collect()
    before = status_kib("VmRSS")
    if not reset_peak():
        return {"error": "/proc/self/clear_refs is not writable: no peak-RSS measurement"}
    runner.step()
    peaks = [status_kib("VmHWM")]
    params = [p for p in workload.model.parameters()]
    return {"peak_bytes": (max(peaks) - base) * 1024, "resident_before_step_bytes": (before - base) * 1024,
            "grad_bytes": sum(p.numel() * p.element_size() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params)}


def memory_in_subprocess(*args, **kwargs) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(measure_memory, *args, **kwargs).result()
        except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, never faked
            return {"error": f"{type(exc).__name__}: {exc}"}


def _median(xs):
    return statistics.median(xs) if xs else None


def summarise(workload: Workload, precision: str, results: dict[str, Timings]) -> dict:
    """Per variant: step time (median, min, IQR), phases, optimizer share, ratios, samples/s, peak memory."""
    rows = []
    base = next(iter(results.values()))
    base_med = _median([p["step"] for p in base.phases])
    base_min = min(p["step"] for p in base.phases)
    lamb = results.get("largebatch Lamb")
    for r in results.values():
        steps = [p["step"] for p in r.phases]
        med, q = _median(steps), statistics.quantiles(steps, n=4) if len(steps) >= 2 else None
        row = {"variant": r.name, "in_backward": r.in_backward, "median_ms": med * 1e3, "min_ms": min(steps) * 1e3,
               "iqr_ms": (q[2] - q[0]) * 1e3 if q else None, "samples_per_s": workload.samples / med,
               **{f"{k}_ms": _median([p[k] for p in r.phases]) * 1e3 for k in PHASES},
               "optimizer_share": None if r.in_backward else _median([p["optimizer"] / p["step"] for p in r.phases]),
               "ratio_to_fused_adamw": med / base_med, "ratio_min_to_fused_adamw": min(steps) / base_min}
        if r.in_backward and lamb is not None:
            row["ratio_to_lamb"] = med / _median([p["step"] for p in lamb.phases])
            row["ratio_min_to_lamb"] = min(steps) / min(p["step"] for p in lamb.phases)
        row["memory"] = r.memory
        rows.append(row)
    _memory_deltas(rows)
    n_params = sum(p.numel() for p in workload.model.parameters())
    return {"workload": workload.name, "precision": precision, "batch_size": workload.samples,
            "params_millions": n_params / 1e6, "rows": rows}


def _memory_deltas(rows: list[dict]) -> None:
    """Peak MiB of every row, and the step-in-backward saving ÷ the gradient bytes (vs ordinary Lamb)."""
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        mem = r["memory"] or {}
        r["peak_mib"] = mem["peak_bytes"] / 2**20 if "peak_bytes" in mem else None
        r["grad_mib"] = mem["grad_bytes"] / 2**20 if "grad_bytes" in mem else None
        lamb = by_name.get("largebatch Lamb")
        if r["in_backward"] and lamb and r["peak_mib"] is not None and lamb["peak_mib"] is not None:
            r["peak_saving_mib"] = lamb["peak_mib"] - r["peak_mib"]
            r["peak_saving_vs_grad_bytes"] = r["peak_saving_mib"] / r["grad_mib"]
