"""Presets that claim to reproduce a library are compared with that library, step by step."""
from __future__ import annotations

import pytest
import torch

import largebatch
from peers import load_peer

SHAPES = [(7, 3), (5,), (4, 4, 2), (1,), (300,)]
STEPS = 12


def _params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    ps[1].zero_()  # a zero-initialised tensor exercises the zero-norm rule
    grads = [[torch.randn(s, generator=gen, dtype=dtype) * (1 + i) for s in SHAPES] for i in range(STEPS)]
    return ps, grads


def _compare(make_ours, make_theirs, groups_of=None, impls=("fused", "foreach", "single_tensor")):
    init, grads = _params()
    for impl in impls:
        kw = {"fused": dict(fused=True), "foreach": dict(foreach=True, fused=False),
              "single_tensor": dict(foreach=False, fused=False)}[impl]
        ours = [torch.nn.Parameter(p.clone()) for p in init]
        theirs = [torch.nn.Parameter(p.clone()) for p in init]
        opt_a = make_ours(groups_of(ours) if groups_of else ours, **kw)
        opt_b = make_theirs(groups_of(theirs) if groups_of else theirs)
        for step_grads in grads:
            for a, b, g in zip(ours, theirs, step_grads):
                a.grad, b.grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


def _peer(package, subdir, module):
    try:
        return load_peer(package, subdir, module)
    except ImportError as exc:
        pytest.skip(f"{package} not importable: {exc}")


def test_torch_optimizer_preset_reproduces_torch_optimizer_lamb():
    mod = _peer("torch_optimizer", "", "lamb")
    preset = largebatch.PRESETS["torch_optimizer"]
    _compare(lambda ps, **kw: largebatch.Lamb(ps, **preset.options, **kw), lambda ps: mod.Lamb(ps))


def test_torch_optimizer_with_weight_decay_and_debias():
    """torch-optimizer's debias=True is our bias_correction='step_size'; its decay is inside the ratio."""
    mod = _peer("torch_optimizer", "", "lamb")
    opts = {**largebatch.PRESETS["torch_optimizer"].options, "weight_decay": 0.05, "bias_correction": "step_size"}
    _compare(lambda ps, **kw: largebatch.Lamb(ps, **opts, **kw),
             lambda ps: mod.Lamb(ps, weight_decay=0.05, debias=True))


def _timm_groups(ps):
    # timm's create_optimizer: no weight decay for 1-D tensors and biases
    return [{"params": [p for p in ps if p.ndim > 1], "weight_decay": 0.01},
            {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0}]


def test_timm_preset_reproduces_timm_lamb():
    mod = _peer("timm", "optim", "lamb")
    preset = largebatch.PRESETS["timm"]
    _compare(lambda groups, **kw: largebatch.Lamb(groups, **preset.options, **kw),
             lambda groups: mod.Lamb(groups), groups_of=_timm_groups)


@pytest.mark.parametrize("flags, timm_flags", [
    (dict(phi="cap_ratio"), dict(trust_clip=True)),
    (dict(trust_ratio=True), dict(always_adapt=True)),
    (dict(bias_correction="none"), dict(bias_correction=False)),
    (dict(max_grad_norm=None), dict(max_grad_norm=None)),
    (dict(grad_averaging=False), dict(grad_averaging=False)),
])
def test_timm_flags_map_to_ours(flags, timm_flags):
    mod = _peer("timm", "optim", "lamb")
    base = dict(largebatch.PRESETS["timm"].options)
    _compare(lambda groups, **kw: largebatch.Lamb(groups, **{**base, **flags}, **kw),
             lambda groups: mod.Lamb(groups, **timm_flags), groups_of=_timm_groups)
