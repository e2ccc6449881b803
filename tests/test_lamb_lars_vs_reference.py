"""Every flag and preset, every implementation, pinned to the paper-literal float64 reference."""
from __future__ import annotations

import pytest
import torch

import largebatch
from largebatch.optim.presets import PRESETS
from paper_reference import ReferenceLamb, ReferenceLars

SHAPES = [(), (5,), (0,), (7, 3), (4,), (3, 4, 5), (70_000,)]  # 70k: crosses the kernel's chunking
ZERO_INIT = 4   # index of a zero-initialised tensor
NO_GRAD = 5     # index of a tensor whose grad is None for the first 3 steps
STEPS = 10
IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True, fused=False),
         "single_tensor": dict(foreach=False, fused=False)}

LAMB_CASES = {
    "paper": {},
    "bias_step_size": dict(bias_correction="step_size"),
    "bias_none": dict(bias_correction="none"),
    "l2": dict(weight_decay_mode="l2"),
    "decoupled_outside": dict(weight_decay_mode="decoupled_outside"),
    "wd0_trust_on": dict(weight_decay=0.0),
    "wd0_decayed": dict(weight_decay=0.0, trust_ratio="decayed"),
    "no_trust": dict(trust_ratio=False),
    "clamp_norm": dict(phi="clamp_norm", phi_min=0.0, phi_max=10.0),
    "clamp_ratio": dict(phi="clamp_ratio", phi_min=0.01, phi_max=10.0),
    "cap_ratio": dict(phi="cap_ratio"),
    "nvlamb_prenorm": dict(max_grad_norm=1.0),
    "eps_inside": dict(eps_inside_sqrt=True),
    "no_grad_averaging": dict(grad_averaging=False),
    "n_lamb": dict(nesterov="n-lamb"),
    "nn_lamb": dict(nesterov="nn-lamb"),
    "nn_lamb_no_bc": dict(nesterov="nn-lamb", bias_correction="none"),
}
LARS_CASES = {
    "paper": {},
    "paper_nesterov": dict(nesterov=True),
    "paper_clamp": dict(phi="clamp_ratio", phi_min=0.01, phi_max=10.0),
    "paper_prenorm": dict(max_grad_norm=0.5),
    "paper_decayed_wd0": dict(weight_decay=0.0, trust_ratio="decayed"),
    "2017": dict(mode="2017", lr=0.5),
    "2017_nesterov": dict(mode="2017", lr=0.5, nesterov=True),
    "larc": dict(mode="2017", lr=0.5, larc_clip=True, trust_coefficient=0.02),
    "no_trust": dict(trust_ratio=False),
}
for _name, _p in PRESETS.items():
    (LAMB_CASES if _p.optimizer == "lamb" else LARS_CASES)[f"preset_{_name}"] = dict(_p.options)


def _problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params[ZERO_INIT].zero_()
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (0.1 + i) for s in SHAPES]
             for i in range(STEPS)]
    for i in range(3):
        grads[i][NO_GRAD] = None
    return [p.to(dtype) for p in params], grads


def _run(cls, ref_cls, options, impl, dtype):
    params, grads = _problem(dtype)
    ref = ref_cls(params, **options)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ps, **options, **IMPLS[impl])
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = None if g is None else g.to(dtype)
        before = [None if p.grad is None else p.grad.clone() for p in ps]
        opt.step()
        for p, b in zip(ps, before):  # step() never mutates p.grad
            assert (p.grad is None and b is None) or torch.equal(p.grad, b)
        ref.step(step_grads)
    return ps, ref, opt


def _assert_close(ps, ref, rtol, atol):
    for i, (p, x) in enumerate(zip(ps, ref.x)):
        torch.testing.assert_close(p.detach().double(), x, rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LAMB_CASES)
def test_lamb_float64_matches_reference(case, impl):
    ps, ref, opt = _run(largebatch.Lamb, ReferenceLamb, LAMB_CASES[case], impl, torch.float64)
    _assert_close(ps, ref, rtol=1e-12, atol=1e-12)
    tele = opt.telemetry()
    for i, norms in enumerate(ref.norms):
        if norms is not None and SHAPES[i] != (0,):
            got = tele[f"group0.{i}"]
            assert got["param_norm"] == pytest.approx(norms[0], rel=1e-12, abs=1e-12)
            assert got["update_norm"] == pytest.approx(norms[1], rel=1e-12, abs=1e-12)
            assert got["trust_ratio"] == pytest.approx(norms[2], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LARS_CASES)
def test_lars_float64_matches_reference(case, impl):
    ps, ref, opt = _run(largebatch.Lars, ReferenceLars, LARS_CASES[case], impl, torch.float64)
    _assert_close(ps, ref, rtol=1e-12, atol=1e-12)
    tele = opt.telemetry()
    for i, norms in enumerate(ref.norms):
        if norms is not None:
            assert tele[f"group0.{i}"]["trust_ratio"] == pytest.approx(norms[2], rel=1e-12, abs=1e-12)


# float32: rounding differs from the float64 reference by ~1e-7 per op; 10 steps stay within 1e-5
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["paper", "l2", "nvlamb_prenorm", "nn_lamb", "clamp_norm", "preset_timm"])
def test_lamb_float32_within_tolerance(case, impl):
    ps, ref, _ = _run(largebatch.Lamb, ReferenceLamb, LAMB_CASES[case], impl, torch.float32)
    _assert_close(ps, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["paper", "2017", "larc"])
def test_lars_float32_within_tolerance(case, impl):
    ps, ref, _ = _run(largebatch.Lars, ReferenceLars, LARS_CASES[case], impl, torch.float32)
    _assert_close(ps, ref, rtol=1e-5, atol=1e-6)


# bf16 parameters with fp32 master weights track the float64 reference to fp32 accuracy in the master,
# and the bf16 parameter is the master rounded
@pytest.mark.parametrize("impl", ["foreach", "single_tensor"])
def test_lamb_bf16_master_weights(impl):
    params, grads = _problem(torch.float64)
    ref = ReferenceLamb(params)
    ps = [torch.nn.Parameter(p.to(torch.bfloat16)) for p in params]
    ref.x = [p.detach().double() for p in ps]  # start from the same (rounded) point
    opt = largebatch.Lamb(ps, master_weights=True, **IMPLS[impl])
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = None if g is None else g.to(torch.bfloat16)
        opt.step()
        ref.step([None if g is None else g.to(torch.bfloat16) for g in step_grads])
    for p, x in zip(ps, ref.x):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.double(), x, rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_bf16_without_master_weights_stays_close():
    params, grads = _problem(torch.float64)
    ps = [torch.nn.Parameter(p.to(torch.bfloat16)) for p in params]
    ref = ReferenceLamb([p.detach() for p in ps])
    opt = largebatch.Lamb(ps)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = None if g is None else g.to(torch.bfloat16)
        opt.step()
        ref.step([None if g is None else g.to(torch.bfloat16) for g in step_grads])
    # each step rounds the parameter to bf16 (relative spacing 2^-8 ≈ 0.4%): after 10 steps the
    # parameter is within 10 roundings of the exact trajectory
    for p, x in zip(ps, ref.x):
        torch.testing.assert_close(p.detach().double(), x, rtol=10 * 2 ** -8, atol=2e-3)


def test_param_groups_carry_their_own_decay_and_trust_ratio():
    params, grads = _problem(torch.float64)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    groups = [{"params": ps[:3], "weight_decay": 0.0, "trust_ratio": False},
              {"params": ps[3:], "weight_decay": 0.1}]
    opt = largebatch.Lamb(groups, trust_ratio="decayed")
    ref = ReferenceLamb(params, trust_ratio="decayed")
    ref.wd_of = [0.0] * 3 + [0.1] * (len(ps) - 3)
    ref.trust_of = [False] * 3 + ["decayed"] * (len(ps) - 3)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g
        opt.step()
        ref.step(step_grads)
    _assert_close(ps, ref, rtol=1e-12, atol=1e-12)
