"""The benchmark's profile: the kernel's passes run one at a time must add up to the fused step."""
import pytest
import torch

from largebatch.bench import profile
from largebatch.optim import kernel

pytestmark = pytest.mark.skipif(not kernel.available(), reason="C kernel unavailable")

SHAPES = [(300, 1000), (70,), (5, 7), (1 << 18,)]  # one tensor above the parallel threshold


def _lars_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ms = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    return xs, gs, ms


def test_lars_pass1_then_pass2_is_the_fused_step():
    hyper = profile._Problem(SHAPES).lars_hyper
    trust = torch.ones(len(SHAPES), dtype=torch.bool)
    a, b = _lars_problem(), _lars_problem()
    fused = kernel.lars_step(*a, trust, hyper, 1.0)
    norms = profile.run_phase(kernel.lars_step, profile.PHASE_NORMS, xs=b[0], gs=b[1], ms=b[2], trust=trust,
                              hyper=hyper, clip=1.0)
    assert torch.equal(norms, fused)
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))  # pass 1 wrote the momentum
    profile.run_phase(kernel.lars_step, profile.PHASE_APPLY, fused[:, 2], xs=b[0], gs=b[1], ms=b[2], trust=trust,
                      hyper=hyper, clip=1.0)
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=0)


def test_lamb_pass1_alone_returns_the_fused_norms():
    p, q = profile._Problem(SHAPES), profile._Problem(SHAPES)
    fused = p.lamb(profile.PHASE_FUSED)
    assert torch.equal(q.lamb(profile.PHASE_NORMS), fused)
    assert all(torch.equal(x, y) for x, y in zip(p.vs, q.vs))
    with pytest.raises(ValueError, match="needs the ratios"):
        profile.run_phase(kernel.lamb_step, profile.PHASE_APPLY)


def test_the_shipped_step_is_the_profile_builds_fused_phase():
    p, q = profile._Problem(SHAPES), profile._Problem(SHAPES)
    fused = kernel.lamb_step(p.xs, p.gs, p.ms, p.vs, p.coefs, p.trust, p.lamb_hyper, 1.0, p.scratch)
    assert torch.equal(q.lamb(profile.PHASE_FUSED), fused) and all(torch.equal(x, y) for x, y in zip(p.xs, q.xs))


def test_profile_rows_and_markdown():
    prof = profile.profile_set(SHAPES, repeats=2)
    parts = {r["part"]: r for r in prof["rows"]}
    assert set(parts) == {"adamw", "lamb fused", "lamb pass 1", "lamb pass 2", "lars fused", "lars pass 1", "lars pass 2"}
    assert all(r["ms"] > 0 for r in parts.values())
    assert parts["lamb pass 1"]["bytes_per_param"] == 28 and parts["lamb fused"]["gbs"] is None
    assert prof["params"] == 300 * 1000 + 70 + 35 + (1 << 18)
    compute = profile.compute_cost(elements=1024, repeat=4, repeats=2)
    assert set(compute["ns_per_element"]) == set(parts) and compute["elements"] == 4096
    text = profile.markdown({"tiny": prof}, compute, 20.0)
    assert "| lamb pass 2 |" in text and "ns per element" in text
