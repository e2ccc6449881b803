"""Table-driven: every flag value and every preset × every implementation path × dtype, pinned step by step
to the paper-literal float64 reference (tests/reference.py), in the spirit of torch's OptimizerInfo.

Tolerances (relative on the parameters, compared after EVERY step, 10 steps):
  float64  1e-12 (atol 1e-13)   — the three paths do the same arithmetic in a different order
  float32  1e-5  (atol 1e-6)    — the float32 paths against the float64 reference, grads rounded to f32 first
  bfloat16 6e-2 (atol 6e-2)     — bf16 params without master weights round every update (2^-8 ≈ 4e-3)
           1e-5 (atol 1e-6)     — bf16 params with master_weights=True: the fp32 master is checked
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import largebatch
from largebatch.optim.presets import PRESETS
from reference import ReferenceLamb, ReferenceLars

IMPLS = {
    "fused": dict(fused=True),
    "foreach": dict(foreach=True, fused=False),
    "single_tensor": dict(foreach=False, fused=False),
}
# group 0 (λ from the case): 0-d, 1-d, zero-size, 2-d, a zero-initialised 1-d, a 3-d whose grad is None for
# the first 3 steps, and one that never has a gradient; group 1 (λ = 0): a bias-like 1-d and a 2-d whose
# gradient is zero for the first 2 steps (‖u‖ = 0).
GROUP0 = [(), (5,), (0,), (6, 4), (8,), (3, 2, 5), (4,)]
GROUP1 = [(7,), (3, 3)]
GROUP2 = [(4, 2)]   # group 2 (λ from the case, trust_ratio=False): a per-group exclusion from the ratio
ZERO_INIT = (0, 4)
LATE_GRAD = (0, 5)
NEVER_GRAD = (0, 6)
STEPS = 10

LAMB_CASES = {
    "paper": {},
    "bias_inside": dict(bias_correction="inside"),
    "bias_step_size": dict(bias_correction="step_size"),
    "bias_none": dict(bias_correction="none"),
    "wd_decoupled": dict(weight_decay_mode="decoupled", weight_decay=0.1),
    "wd_l2": dict(weight_decay_mode="l2", weight_decay=0.1),
    "wd_decoupled_outside": dict(weight_decay_mode="decoupled_outside", weight_decay=0.1),
    "wd_outside_step_size": dict(weight_decay_mode="decoupled_outside", weight_decay=0.1,
                                 bias_correction="step_size"),
    "wd_l2_bias_none": dict(weight_decay_mode="l2", bias_correction="none"),
    "wd0": dict(weight_decay=0.0),
    "trust_true": dict(trust_ratio=True),
    "trust_false": dict(trust_ratio=False),
    "trust_decayed": dict(trust_ratio="decayed"),
    "trust_decayed_wd0": dict(trust_ratio="decayed", weight_decay=0.0),
    "phi_identity": dict(phi="identity"),
    "phi_clamp_norm": dict(phi="clamp_norm", phi_min=0.0, phi_max=2.0),
    "phi_clamp_norm_min_only": dict(phi="clamp_norm", phi_min=3.0),
    "phi_clamp_ratio": dict(phi="clamp_ratio", phi_min=0.3, phi_max=0.8),
    "phi_clamp_ratio_max_only": dict(phi="clamp_ratio", phi_max=0.5),
    "phi_cap_ratio": dict(phi="cap_ratio"),
    "max_grad_norm_active": dict(max_grad_norm=1.0),
    "max_grad_norm_inactive": dict(max_grad_norm=1e6),
    "eps_inside_sqrt": dict(eps_inside_sqrt=True, eps=1e-3),
    "eps_outside_large": dict(eps=1e-2),
    "no_grad_averaging": dict(grad_averaging=False),
    "nesterov_n": dict(nesterov="n-lamb"),
    "nesterov_nn": dict(nesterov="nn-lamb"),
    "nesterov_nn_bias_none": dict(nesterov="nn-lamb", bias_correction="none"),
    "nesterov_n_no_grad_averaging": dict(nesterov="n-lamb", grad_averaging=False),
    "betas": dict(betas=(0.5, 0.9)),
}
LARS_CASES = {
    "paper": {},
    "paper_nesterov": dict(nesterov=True),
    "paper_no_grad_averaging": dict(grad_averaging=False),
    "paper_trust_false": dict(trust_ratio=False),
    "paper_trust_decayed_wd0": dict(trust_ratio="decayed", weight_decay=0.0),
    "paper_wd0": dict(weight_decay=0.0),
    "paper_clamp_norm": dict(phi="clamp_norm", phi_min=0.0, phi_max=2.0),
    "paper_clamp_ratio": dict(phi="clamp_ratio", phi_min=0.3, phi_max=0.8),
    "paper_cap_ratio": dict(phi="cap_ratio", lr=2.0),
    "paper_max_grad_norm": dict(max_grad_norm=1.0),
    "2017": dict(mode="2017", lr=0.5),
    "2017_nesterov": dict(mode="2017", lr=0.5, nesterov=True),
    "2017_trust_false": dict(mode="2017", lr=0.5, trust_ratio=False),
    "2017_trust_decayed": dict(mode="2017", lr=0.5, trust_ratio="decayed"),
    "2017_tc_eps": dict(mode="2017", lr=0.5, trust_coefficient=0.02, eps=0.1),
    "2017_max_grad_norm": dict(mode="2017", lr=0.5, max_grad_norm=1.0),
    "larc_clip_inactive": dict(mode="2017", lr=0.5, larc_clip=True, trust_coefficient=0.02),
    "larc_clip_active": dict(mode="2017", lr=1e-3, larc_clip=True, trust_coefficient=0.02),
    "larc_nesterov": dict(mode="2017", lr=0.01, larc_clip=True, trust_coefficient=0.02, nesterov=True),
}
LAMB_LR, LARS_LR = 0.02, 0.1
for _name, _preset in PRESETS.items():
    _table = LAMB_CASES if _preset.optimizer == "lamb" else LARS_CASES
    _opts = dict(_preset.options)
    _opts.pop("lr", None)  # the preset's flags with the table's LR (large enough for the ratios to matter)
    _table[f"preset_{_name}"] = _opts

OPTIMIZERS = {"lamb": (largebatch.Lamb, ReferenceLamb, LAMB_CASES, LAMB_LR),
              "lars": (largebatch.Lars, ReferenceLars, LARS_CASES, LARS_LR)}
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=1e-5, atol=1e-6)}
# bf16 parameters without master weights: every update is rounded to 8 bits (a decay factor 1 − ηλ = 0.998 is
# lost entirely at |x| ≈ 2), so errors drift; measured worst |err|/(|ref|+1) over all cases after 10 steps:
# 5.1% (foreach, decoupled_outside) and 2.4% (single tensor). A wrong formula moves far more than that.
BF16_TOL = dict(rtol=6e-2, atol=6e-2)
BF16_MASTER_TOL = dict(rtol=1e-5, atol=1e-6)    # fp32 master weights: the master must match like float32


def make_problem(dtype, seed=0, group0=GROUP0, group1=GROUP1, steps=STEPS, grad_scale=1.0, group2=GROUP2):
    """Initial params (rounded to dtype) and per-step grads (rounded to dtype) of the 3 groups, as float64."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).double()

    params = [[rnd(s) for s in group0], [rnd(s) for s in group1], [rnd(s) for s in group2]]
    if len(group0) > ZERO_INIT[1]:
        params[0][ZERO_INIT[1]].zero_()
    grads = []
    for k in range(steps):
        step = [[rnd(s, grad_scale * (0.2 + 0.3 * k)) for s in group0], [rnd(s, grad_scale) for s in group1],
                [rnd(s, grad_scale) for s in group2]]
        if len(group1) > 1 and k < 2:
            step[1][1] = torch.zeros_like(step[1][1])   # zero gradient with λ = 0: ‖u‖ = 0, the zero-norm rule
        if len(group0) > NEVER_GRAD[1]:
            step[0][NEVER_GRAD[1]] = None
        if len(group0) > LATE_GRAD[1] and k < 3:
            step[0][LATE_GRAD[1]] = None
        grads.append(step)
    return params, grads


def run_pair(opt_name, options, impl, dtype, *, seed=0, master_weights=False, problem=None,
             check_each_step=True, tol=None, device="cpu"):
    cls, ref_cls, _, default_lr = OPTIMIZERS[opt_name]
    options = {"lr": default_lr, **options}
    params, grads = problem or make_problem(dtype, seed)
    wd = options.get("weight_decay", 0.01)
    group_options = [{"weight_decay": wd}, {"weight_decay": 0.0}, {"weight_decay": wd, "trust_ratio": False}]
    ref = ref_cls([{"params": p, **o} for p, o in zip(params, group_options)], **options)
    ps = [[torch.nn.Parameter(p.to(device, dtype)) for p in group] for group in params]
    extra = dict(master_weights=True) if master_weights else {}
    impl_options = IMPLS[impl] if impl in IMPLS else {}   # "default": fused=None, foreach=None
    opt = cls([{"params": p, **o} for p, o in zip(ps, group_options)], **options, **impl_options, **extra)
    tol = tol or TOL.get(dtype)
    for k, step_grads in enumerate(grads):
        for group, group_grads in zip(ps, step_grads):
            for p, g in zip(group, group_grads):
                p.grad = None if g is None else g.to(device, dtype)
        grads_before = [[None if p.grad is None else p.grad.clone() for p in group] for group in ps]
        opt.step()
        ref.step(step_grads)
        for group, before in zip(ps, grads_before):   # step() never mutates p.grad (every path)
            for p, b in zip(group, before):
                assert (p.grad is None and b is None) or torch.equal(p.grad, b), "step() mutated p.grad"
        if check_each_step or k == len(grads) - 1:
            compare(opt, ps, ref, dtype, tol, master_weights, step=k + 1)
    return opt, ps, ref


def compare(opt, ps, ref, dtype, tol, master_weights, step):
    for gi, group in enumerate(ps):
        for pi, p in enumerate(group):
            got = opt.state[p]["master_param"] if master_weights and p in opt.state else p.detach()
            torch.testing.assert_close(got.double().cpu(), ref.groups[gi]["params"][pi], **tol,
                                       msg=lambda m: f"step {step}, group {gi}, tensor {pi}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LAMB_CASES)
def test_lamb_matches_reference(case, impl, dtype):
    opt, ps, ref = run_pair("lamb", LAMB_CASES[case], impl, dtype)
    check_telemetry(opt, ref, dtype)
    check_step_counters(opt, ps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LARS_CASES)
def test_lars_matches_reference(case, impl, dtype):
    opt, ps, ref = run_pair("lars", LARS_CASES[case], impl, dtype)
    check_telemetry(opt, ref, dtype)
    check_step_counters(opt, ps)


def check_telemetry(opt, ref, dtype):
    """telemetry() reports the reference's ‖x‖, ‖u‖ (‖g‖ for LARS 2017) and ratio of the last step."""
    tele = opt.telemetry()
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert set(tele) == {f"group{gi}.{pi}" for gi, pi in ref.norms}
    for (gi, pi), (xn, un, ratio) in ref.norms.items():
        got = tele[f"group{gi}.{pi}"]
        assert got["param_norm"] == pytest.approx(xn, rel=rel, abs=1e-12)
        assert got["update_norm"] == pytest.approx(un, rel=rel, abs=1e-12)
        assert got["trust_ratio"] == pytest.approx(ratio, rel=rel, abs=1e-12)


def check_step_counters(opt, ps):
    """The step counter is per parameter: the late-grad tensor is 3 steps behind, the never-grad one has no state."""
    late, never = ps[LATE_GRAD[0]][LATE_GRAD[1]], ps[NEVER_GRAD[0]][NEVER_GRAD[1]]
    assert float(opt.state[ps[0][0]]["step"]) == STEPS
    assert float(opt.state[late]["step"]) == STEPS - 3
    assert len(opt.state.get(never, {})) == 0 and not never.detach().isnan().any()


BF16_CASES = {"lamb": list(LAMB_CASES), "lars": list(LARS_CASES)}   # every flag and preset


@pytest.mark.parametrize("impl", ["foreach", "single_tensor"])
@pytest.mark.parametrize("opt_case", [f"{o}:{c}" for o, cs in BF16_CASES.items() for c in cs])
def test_bf16_params_within_loose_tolerance(opt_case, impl):
    opt_name, case = opt_case.split(":")
    cases = OPTIMIZERS[opt_name][2]
    run_pair(opt_name, cases[case], impl, torch.bfloat16, tol=BF16_TOL)


@pytest.mark.parametrize("impl", ["foreach", "single_tensor"])
@pytest.mark.parametrize("opt_case", [f"{o}:{c}" for o, cs in BF16_CASES.items() for c in cs])
def test_bf16_master_weights_match_like_float32(opt_case, impl):
    opt_name, case = opt_case.split(":")
    cases = OPTIMIZERS[opt_name][2]
    opt, ps, ref = run_pair(opt_name, cases[case], impl, torch.bfloat16, master_weights=True,
                            tol=BF16_MASTER_TOL)
    for gi, group in enumerate(ps):          # the bf16 parameter is the rounded master
        for pi, p in enumerate(group):
            if p in opt.state and len(opt.state[p]):
                assert torch.equal(p.detach(), opt.state[p]["master_param"].to(torch.bfloat16))


def test_fused_rejects_bf16():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="fused=True"):
        largebatch.Lamb([p], fused=True).step()


def test_large_tensor_crossing_kernel_chunks_matches_reference():
    """A tensor large enough to cross the C kernel's chunking, all paths vs the reference (float64)."""
    problem = make_problem(torch.float64, seed=3, group0=[(70_001,), (3,)], group1=[(129, 33)], steps=3)
    for impl in IMPLS:
        run_pair("lamb", {}, impl, torch.float64, problem=problem)
        run_pair("lars", {}, impl, torch.float64, problem=problem)


# ------------------------------------------------------------------ hypothesis: shapes and hyperparameters
shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, lr=st.floats(1e-4, 0.5), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999),
       eps=st.floats(1e-10, 1e-2), wd=st.floats(0.0, 2.0), seed=st.integers(0, 2**16),
       bias=st.sampled_from(["inside", "step_size", "none"]),
       mode=st.sampled_from(["decoupled", "l2", "decoupled_outside"]),
       impl=st.sampled_from(list(IMPLS)))
def test_lamb_random_shapes_and_hyperparameters(shapes, lr, beta1, beta2, eps, wd, seed, bias, mode, impl):
    problem = make_problem(torch.float64, seed, group0=shapes, group1=[(2,)], steps=4)
    options = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, bias_correction=bias,
                   weight_decay_mode=mode)
    run_pair("lamb", options, impl, torch.float64, problem=problem, tol=dict(rtol=1e-10, atol=1e-12))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, lr=st.floats(1e-4, 1.0), momentum=st.floats(0.0, 0.99), wd=st.floats(0.0, 1.0),
       tc=st.floats(1e-4, 1.0), seed=st.integers(0, 2**16), mode=st.sampled_from(["paper", "2017"]),
       nesterov=st.booleans(), impl=st.sampled_from(list(IMPLS)))
def test_lars_random_shapes_and_hyperparameters(shapes, lr, momentum, wd, tc, seed, mode, nesterov, impl):
    problem = make_problem(torch.float64, seed, group0=shapes, group1=[(2,)], steps=4)
    options = dict(lr=lr, momentum=momentum, weight_decay=wd, mode=mode, nesterov=nesterov,
                   trust_coefficient=tc)
    run_pair("lars", options, impl, torch.float64, problem=problem, tol=dict(rtol=1e-10, atol=1e-12))


# ------------------------------------------------------------------ the reference itself, from first principles
def test_reference_lamb_one_step_by_hand():
    """t = 1, ε = 0: m̂ = g, v̂ = g², r = sign(g). x = (3, 4), ‖x‖ = 5, g = (2, −0.5) → r = (1, −1), ‖r‖ = √2."""
    x, g, lr = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([2.0, -0.5], dtype=torch.float64), 0.1
    r = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def one(**kw):
        ref = ReferenceLamb([x], lr=lr, eps=0.0, **kw)
        ref.step([[g]])
        return ref.groups[0]["params"][0], ref.norms[(0, 0)]

    got, (xn, un, ratio) = one(weight_decay=0.0)
    torch.testing.assert_close(got, x - lr * 5 / 2 ** 0.5 * r)
    assert (xn, un, ratio) == pytest.approx((5.0, 2 ** 0.5, 5 / 2 ** 0.5))
    u = r + 0.5 * x                                              # decoupled, inside the ratio
    got, _ = one(weight_decay=0.5)
    torch.testing.assert_close(got, x - lr * 5 / float(u.norm()) * u)
    got, _ = one(weight_decay=0.5, weight_decay_mode="decoupled_outside")
    torch.testing.assert_close(got, x - lr * 0.5 * x - lr * 5 / 2 ** 0.5 * r)
    got, _ = one(weight_decay=0.0, bias_correction="step_size")  # r = 0.1g/√(0.001g²); s = √0.001/0.1
    torch.testing.assert_close(got, x - lr * (0.001 ** 0.5 / 0.1) * 5 / 2 ** 0.5 * r)
    got, _ = one(weight_decay=0.0, trust_ratio=False)
    torch.testing.assert_close(got, x - lr * r)
    got, _ = one(weight_decay=0.0, phi="cap_ratio")
    torch.testing.assert_close(got, x - lr * r)
    got, _ = one(weight_decay=0.0, phi="clamp_norm", phi_max=1.0)
    torch.testing.assert_close(got, x - lr * 1 / 2 ** 0.5 * r)
    got, _ = one(weight_decay=0.0, max_grad_norm=0.5)            # scale-invariant at t = 1 with ε = 0
    torch.testing.assert_close(got, x - lr * 5 / 2 ** 0.5 * r)


def test_reference_lars_one_step_by_hand():
    x, g, lr = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64), 0.1
    ref = ReferenceLars([x], lr=lr, weight_decay=0.0)             # m = 0.1 g, ratio = 5/‖m‖
    ref.step([[g]])
    torch.testing.assert_close(ref.groups[0]["params"][0], x - lr * 5 / 2 ** 0.5 * g)
    ref = ReferenceLars([x], lr=lr, weight_decay=0.2, mode="2017", trust_coefficient=0.01, eps=0.0)
    ref.step([[g]])
    local = 0.01 * 5 / (2 ** 0.5 + 0.2 * 5)
    torch.testing.assert_close(ref.groups[0]["params"][0], x - lr * local * (g + 0.2 * x))
    assert ref.norms[(0, 0)] == pytest.approx((5.0, 2 ** 0.5, local))


# ------------------------------------------------------------------ degenerate flags == torch.optim (a well-kept library)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["adamw", "adam_l2", "sgd", "sgd_nesterov"])
def test_trust_ratio_off_reduces_to_torch_optim(name, impl):
    """Without the trust ratio: Lamb(decoupled_outside) == AdamW, Lamb(l2) == Adam(weight_decay),
    Lars(mode="2017") == SGD(momentum, weight_decay[, nesterov]), 10 steps, float64 to 1e-12."""
    ours, theirs = {
        "adamw": (lambda ps: largebatch.Lamb(ps, lr=0.01, weight_decay=0.1, weight_decay_mode="decoupled_outside",
                                             trust_ratio=False, eps=1e-8, **IMPLS[impl]),
                  lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, eps=1e-8)),
        "adam_l2": (lambda ps: largebatch.Lamb(ps, lr=0.01, weight_decay=0.1, weight_decay_mode="l2",
                                               trust_ratio=False, eps=1e-8, **IMPLS[impl]),
                    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, eps=1e-8)),
        "sgd": (lambda ps: largebatch.Lars(ps, lr=0.1, momentum=0.9, weight_decay=0.01, mode="2017",
                                           trust_ratio=False, **IMPLS[impl]),
                lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)),
        "sgd_nesterov": (lambda ps: largebatch.Lars(ps, lr=0.1, momentum=0.9, weight_decay=0.01, mode="2017",
                                                    nesterov=True, trust_ratio=False, **IMPLS[impl]),
                         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    }[name]
    params, grads = make_problem(torch.float64, seed=5, group0=[(4, 3), (5,), ()], group1=[(2,)], group2=[],
                                 steps=10)
    init = params[0] + params[1]
    a, b = [torch.nn.Parameter(t.clone()) for t in init], [torch.nn.Parameter(t.clone()) for t in init]
    opt_a, opt_b = ours(a), theirs(b)
    for step_grads in grads:
        flat = step_grads[0] + step_grads[1]
        for p, q, g in zip(a, b, flat):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_non_contiguous_params(cls):
    """fused=None falls back to a path that handles a non-contiguous tensor; fused=True says why it cannot."""
    b = torch.randn(4, 3, dtype=torch.float64)
    ref_cls = ReferenceLamb if cls is largebatch.Lamb else ReferenceLars
    for impl in ({}, IMPLS["foreach"], IMPLS["single_tensor"]):
        p = torch.nn.Parameter(b.clone().t())
        assert not p.is_contiguous()
        ref, opt = ref_cls([b.t()], lr=0.05), cls([p], lr=0.05, **impl)
        for k in range(3):
            g = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
            p.grad = g
            opt.step()
            ref.step([[g]])
        torch.testing.assert_close(p.detach(), ref.groups[0]["params"][0], rtol=1e-12, atol=1e-14)
    p = torch.nn.Parameter(b.clone().t())
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"fused=True\) needs contiguous float32/float64 CPU tensors"):
        cls([p], fused=True).step()


@pytest.mark.parametrize("opt_name", ["lamb", "lars"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_kernel_is_bitwise_independent_of_the_thread_count(opt_name, dtype):
    """The C kernel documents fixed-chunk norm sums (bit-reproducible resumes on any thread count): a tensor
    above its parallel threshold (2^18 elements) and many small ones, 1 vs 2 vs 3 threads, bit for bit."""
    shapes = [(300_001,), *[(17, 5)] * 12, (3,), ()]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(3)]
    cls = largebatch.Lamb if opt_name == "lamb" else largebatch.Lars
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ps = [torch.nn.Parameter(t.clone()) for t in init]
            opt = cls(ps, lr=0.05, fused=True, max_grad_norm=1.0)
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g
                opt.step()
            results.append([p.detach().clone() for p in ps])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the CUDA default path is foreach)")
@pytest.mark.parametrize("impl", ["default", "foreach", "single_tensor"])
def test_cuda_matches_reference(impl):
    """Every flag and preset on CUDA (fused=None picks foreach there), float64 and float32, vs the reference."""
    for opt_name, (_, _, cases, _) in OPTIMIZERS.items():
        for case, options in cases.items():
            for dtype in (torch.float64, torch.float32):
                try:
                    run_pair(opt_name, options, impl, dtype, device="cuda")
                except AssertionError as exc:
                    raise AssertionError(f"{opt_name}:{case} {dtype}: {exc}") from None


# ------------------------------------------------------------------ hypothesis: combinations of flags
PHIS = st.sampled_from([("identity", None, None), ("clamp_norm", 0.0, 10.0), ("clamp_norm", 2.0, None),
                        ("clamp_ratio", 0.01, 10.0), ("clamp_ratio", None, 0.5), ("cap_ratio", None, None)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bias=st.sampled_from(["inside", "step_size", "none"]),
       mode=st.sampled_from(["decoupled", "l2", "decoupled_outside"]),
       trust=st.sampled_from([True, False, "decayed"]), phi=PHIS, max_grad_norm=st.sampled_from([None, 1.0]),
       eps_inside=st.booleans(), grad_averaging=st.booleans(), nesterov=st.sampled_from([None, "n-lamb", "nn-lamb"]),
       wd=st.sampled_from([0.0, 0.1]), impl=st.sampled_from(list(IMPLS)))
def test_lamb_flag_combinations(bias, mode, trust, phi, max_grad_norm, eps_inside, grad_averaging, nesterov, wd,
                                impl):
    if bias == "step_size" and nesterov is not None:
        nesterov = None                                   # rejected combination (tested in test_optim_api)
    options = dict(bias_correction=bias, weight_decay_mode=mode, trust_ratio=trust, phi=phi[0], phi_min=phi[1],
                   phi_max=phi[2], max_grad_norm=max_grad_norm, eps_inside_sqrt=eps_inside,
                   grad_averaging=grad_averaging, nesterov=nesterov, weight_decay=wd)
    problem = make_problem(torch.float64, 7, group0=[(3, 4), (), (0,), (5,)], group1=[(2,)], steps=5)
    run_pair("lamb", options, impl, torch.float64, problem=problem)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["paper", "2017"]), larc=st.booleans(), nesterov=st.booleans(),
       trust=st.sampled_from([True, False, "decayed"]), phi=PHIS, max_grad_norm=st.sampled_from([None, 1.0]),
       grad_averaging=st.booleans(), wd=st.sampled_from([0.0, 0.01]), lr=st.sampled_from([1e-3, 0.1]),
       impl=st.sampled_from(list(IMPLS)))
def test_lars_flag_combinations(mode, larc, nesterov, trust, phi, max_grad_norm, grad_averaging, wd, lr, impl):
    if mode == "paper":
        larc = False                                      # LARC clipping belongs to the 2017 form
    else:
        phi = ("identity", None, None)                    # the 2017 form has no φ
    options = dict(mode=mode, larc_clip=larc, nesterov=nesterov, trust_ratio=trust, phi=phi[0], phi_min=phi[1],
                   phi_max=phi[2], max_grad_norm=max_grad_norm, grad_averaging=grad_averaging, weight_decay=wd,
                   lr=lr, trust_coefficient=0.02)
    problem = make_problem(torch.float64, 7, group0=[(3, 4), (), (0,), (5,)], group1=[(2,)], steps=5)
    run_pair("lars", options, impl, torch.float64, problem=problem)


@pytest.mark.parametrize("cls, ref_cls", [(largebatch.Lamb, ReferenceLamb), (largebatch.Lars, ReferenceLars)])
def test_class_defaults_are_the_papers(cls, ref_cls):
    """The defaults ARE the paper's algorithm (docs/algorithms.md, "LAMB" and "LARS"): β=(0.9, 0.999), ε=1e-6 outside √, λ=0.01 decoupled
    inside the ratio, bias correction inside, φ = identity, ratio on every tensor; LARS Algorithm 1."""
    import inspect

    signature = inspect.signature(cls).parameters
    for key, value in ref_cls.defaults.items():
        assert signature[key].default == value, key
