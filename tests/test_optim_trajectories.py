"""Bit-for-bit replay of short saved trajectories: every preset and every flag variant, on every path.

The fixture ``tests/data/trajectories.json`` (a digest of every tensor's bytes and of every step's
telemetry figures) was written by the code before the optimizer core was
restructured; a refactor that changes any bit of any parameter, moment, counter or telemetry figure fails
here. The last bits depend on the CPU (torch's kernels dispatch on the vector ISA and reduce in another
order; the C kernel is built with ``-march=native``), so the fixture holds one profile per CPU kind
(vendor and torch's CPU capability; the first, ``AuthenticAMD``, was recorded on an AMD EPYC without noting
the capability); a CPU kind with no profile is skipped with the command that records one. Record a new
CPU kind only with code whose numerics are already pinned on another kind; regenerate all of it ONLY for an
intended change of numerics::

    PYTHONPATH=src python tests/test_optim_trajectories.py            # adds/replaces this CPU kind's profile
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import largebatch
from largebatch.optim import kernel
from largebatch.optim.presets import PRESETS
from variants import FLAG_VARIANTS

FIXTURE = Path(__file__).with_name("data") / "trajectories.json"
STEPS = 5
LARGE = 1 << 18  # one tensor at the kernel's parallel threshold: the chunked multi-thread schedule
#: flag variants the presets do not cover, so each branch of each path is in the fixture
VARIANTS = {
    **FLAG_VARIANTS,
    "lamb_cap": ("lamb", dict(phi="cap_ratio", max_grad_norm=0.5, trust_ratio=False)),
    "lamb_master": ("lamb", dict(master_weights=True)),  # bf16 parameters, fp32 masters (no kernel)
    "larc_master": ("larc", dict(master_weights=True)),
}
CASES = {**{name: (p.optimizer, {"name": name}) for name, p in PRESETS.items()},
         **{name: (opt, {"name": opt, **flags}) for name, (opt, flags) in VARIANTS.items()}}
IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True, fused=False),
         "single_tensor": dict(foreach=False, fused=False)}


class Tiny(nn.Module):
    """Mixed shapes: a matrix, a bias, a LayerNorm (1-D), a 3-D tensor and a zero-initialised tensor."""

    def __init__(self, large: bool):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.cube = nn.Parameter(torch.empty(2, 3, 2))
        self.zero = nn.Parameter(torch.zeros(5))
        self.big = nn.Parameter(torch.empty(LARGE + 3 if large else 7))


def _model(dtype: torch.dtype, large: bool) -> Tiny:
    torch.manual_seed(0)
    model = Tiny(large)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "zero":
                p.copy_(torch.randn(p.shape) * 0.5)
    return model.to(dtype)


def _fingerprint(t: torch.Tensor) -> str:
    """dtype, shape and a digest of the bytes: equal exactly when the tensors are bit-identical."""
    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:20]
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{digest}"


def trajectory(case: str, impl: str, dtype: torch.dtype, large: bool = False) -> dict:
    """Final params, state and every step's telemetry after STEPS steps with fixed seeded gradients."""
    opt_name, flags = CASES[case]
    flags = dict(flags)
    model = _model(dtype, large)
    opt = largebatch.create_optimizer(flags.pop("name"), model, **{"lr": 0.02, **flags, **IMPLS[impl]})
    gen = torch.Generator().manual_seed(1)
    telemetry = []  # every step's ‖x‖, ‖u‖, ratio
    for k in range(STEPS):
        for name, p in model.named_parameters():
            scale = 0.0 if (name == "norm.bias" and k < 2) else 1.0 + k  # a zero gradient: ‖u‖ = 0 rule
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(dtype)
        opt.step()
        telemetry.append(opt.telemetry())
    out = {f"param/{n}": _fingerprint(p) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            out[f"state/{names[id(p)]}/{key}"] = _fingerprint(value) if torch.is_tensor(value) else value
    for k, row in enumerate(telemetry):  # one digest per step: the figures in hex, exact
        text = json.dumps({n: {f: float(v).hex() for f, v in fig.items()} for n, fig in row.items()}, sort_keys=True)
        out[f"telemetry/{k}"] = hashlib.sha256(text.encode()).hexdigest()[:20]
    return out


def all_cases():
    for case, (_, flags) in CASES.items():
        master = flags.get("master_weights", False)
        for impl in IMPLS:
            for dtype in (torch.bfloat16,) if master else (torch.float32, torch.float64):
                if not (master and impl == "fused"):
                    yield case, impl, dtype, False
    yield "paper", "fused", torch.float32, True
    yield "lars_paper", "fused", torch.float32, True


def _key(case, impl, dtype, large) -> str:
    return f"{case}/{impl}/{str(dtype).removeprefix('torch.')}{'/large' if large else ''}"


def cpu_kind() -> str:
    """``<vendor>-<torch CPU capability>``, e.g. ``GenuineIntel-AVX512``."""
    try:
        m = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return f"{m.group(1) if m else 'unknown'}-{torch.backends.cpu.get_cpu_capability()}"


def profile_for(profiles: dict, kind: str) -> dict | None:
    """This CPU kind's digests: an exact ``vendor-capability`` profile, else one recorded for the vendor."""
    return profiles.get(kind) or profiles.get(kind.split("-")[0])


@pytest.fixture(scope="module")
def saved():
    profile = profile_for(json.loads(FIXTURE.read_text())["profiles"], cpu_kind())
    if profile is None:
        pytest.skip(f"no trajectories recorded on this CPU kind ({cpu_kind()}); record them with the code of a "
                    f"commit that passes on another kind: PYTHONPATH=src python tests/test_optim_trajectories.py")
    return profile


@pytest.mark.parametrize("case,impl,dtype,large", list(all_cases()), ids=[_key(*c) for c in all_cases()])
def test_trajectory_is_bit_identical(saved, case, impl, dtype, large):
    if impl == "fused" and not kernel.available():
        pytest.skip("C kernel unavailable")
    want = saved[_key(case, impl, dtype, large)]
    got = trajectory(case, impl, dtype, large)
    assert set(got) == set(want)
    assert [k for k in want if got[k] != want[k]] == []


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    fixture = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {"profiles": {}}
    fixture["profiles"][cpu_kind()] = {_key(*c): trajectory(*c) for c in all_cases()}
    FIXTURE.write_text(json.dumps(fixture, indent=0, sort_keys=True))
    print(f"wrote the {cpu_kind()} profile into {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
