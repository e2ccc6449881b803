"""Properties that hold by the paper's definitions, independent of any implementation detail."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import largebatch
from largebatch.optim.trust_ratio import trust_ratio
from paper_reference import ReferenceLamb

IMPLS = [dict(fused=True), dict(foreach=True, fused=False), dict(foreach=False, fused=False)]


def test_reference_single_step_by_hand():
    # x = 1, g = 0.5: m̂ = 0.5, v̂ = 0.25, u = 0.5/(0.5 + 1e-6) + 0.01; ratio·u = |x|·sign(u) → x = 1 − lr
    ref = ReferenceLamb([torch.tensor([1.0])], lr=0.1)
    ref.step([torch.tensor([0.5])])
    assert ref.x[0].item() == pytest.approx(0.9, abs=1e-15)
    u = 0.5 / (0.5 + 1e-6) + 0.01
    assert ref.norms[0] == pytest.approx((1.0, u, 1.0 / u), rel=1e-15)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), lr=st.floats(1e-4, 1e-1), seed=st.integers(0, 2**16),
       impl=st.sampled_from(range(3)), cls=st.sampled_from(["lamb", "lars"]))
def test_step_length_is_lr_times_param_norm(n, lr, seed, impl, cls):
    """With φ = identity the update of each tensor has length exactly lr·‖x‖ (that is the trust ratio)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
    p.grad = torch.randn(n, generator=gen, dtype=torch.float64)
    opt = (largebatch.Lamb if cls == "lamb" else largebatch.Lars)([p], lr=lr, **IMPLS[impl])
    x0 = p.detach().clone()
    opt.step()
    assert (p.detach() - x0).norm().item() == pytest.approx(lr * x0.norm().item(), rel=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_zero_initialised_tensors_move(cls, impl):
    """Zero-norm rule: ‖x‖ = 0 gives ratio 1, so zero-initialised biases and LayerNorm β move."""
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    p.grad = torch.ones(8, dtype=torch.float64)
    cls([p], lr=0.1, **impl).step()
    assert p.detach().abs().min().item() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_decay_zero_keeps_trust_ratio_unless_flag_says_so(impl):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=gen, dtype=torch.float64) * 5
    g = torch.randn(50, generator=gen, dtype=torch.float64)
    moves = {}
    for mode in (True, "decayed"):
        p = torch.nn.Parameter(x.clone())
        p.grad = g.clone()
        largebatch.Lamb([p], lr=0.01, weight_decay=0.0, trust_ratio=mode, **impl).step()
        moves[mode] = (p.detach() - x).norm().item()
    assert moves[True] == pytest.approx(0.01 * x.norm().item(), rel=1e-10)   # ratio applied
    assert moves["decayed"] == pytest.approx(0.01 * math.sqrt(50), rel=1e-3)  # plain Adam step: |u_i| ≈ 1


@pytest.mark.parametrize("impl", IMPLS)
def test_l2_mode_is_not_a_no_op(impl):
    finals = []
    for mode, wd in (("l2", 0.5), ("l2", 0.0)):
        gen = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter(torch.randn(20, generator=gen, dtype=torch.float64))
        opt = largebatch.Lamb([p], lr=0.01, weight_decay=wd, weight_decay_mode=mode, **impl)
        for _ in range(3):
            p.grad = torch.randn(20, generator=gen, dtype=torch.float64)
            opt.step()
        finals.append(p.detach().clone())
    assert not torch.allclose(finals[0], finals[1])


def test_trust_ratio_function_zero_rule_and_phi():
    xn = torch.tensor([0.0, 2.0, 2.0, 30.0])
    un = torch.tensor([1.0, 0.0, 4.0, 1.0])
    assert trust_ratio(xn, un).tolist() == [1.0, 1.0, 0.5, 30.0]
    assert trust_ratio(xn, un, phi="clamp_norm", phi_min=0.0, phi_max=10.0).tolist() == [1.0, 1.0, 0.5, 10.0]
    assert trust_ratio(xn, un, phi="clamp_ratio", phi_min=0.6, phi_max=10.0).tolist() == pytest.approx([1.0, 1.0, 0.6, 10.0])
    assert trust_ratio(xn, un, phi="cap_ratio").tolist() == [1.0, 1.0, 0.5, 1.0]
