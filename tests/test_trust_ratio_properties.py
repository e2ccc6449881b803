"""Properties that hold by the paper's definitions, independent of any implementation detail."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import largebatch
from largebatch.optim.trust_ratio import trust_ratio

IMPLS = [dict(fused=True), dict(foreach=True, fused=False), dict(foreach=False, fused=False)]


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


def test_trust_ratio_function_zero_rule_and_phi():
    xn = torch.tensor([0.0, 2.0, 2.0, 30.0])
    un = torch.tensor([1.0, 0.0, 4.0, 1.0])
    assert trust_ratio(xn, un).tolist() == [1.0, 1.0, 0.5, 30.0]
    assert trust_ratio(xn, un, phi="clamp_norm", phi_min=0.0, phi_max=10.0).tolist() == [1.0, 1.0, 0.5, 10.0]
    assert trust_ratio(xn, un, phi="clamp_ratio", phi_min=0.6, phi_max=10.0).tolist() == pytest.approx([1.0, 1.0, 0.6, 10.0])
    assert trust_ratio(xn, un, phi="cap_ratio").tolist() == [1.0, 1.0, 0.5, 1.0]
