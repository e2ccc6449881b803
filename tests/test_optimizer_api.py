"""The optimizer as a torch.optim citizen: errors, state_dict, schedulers, compile, groups, no host syncs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import largebatch

IMPLS = [dict(fused=True), dict(foreach=True, fused=False), dict(foreach=False, fused=False)]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lr=-0.1), ValueError, r"Invalid lr: -0\.1 \(allowed: a number in \[0\.0, inf\)\)"),
    (dict(betas=(1.0, 0.999)), ValueError, r"Invalid betas\[0\]: 1\.0"),
    (dict(betas=(0.9,)), ValueError, r"Invalid betas: \(0\.9,\) \(allowed: a pair"),
    (dict(eps=-1e-8), ValueError, r"Invalid eps"),
    (dict(weight_decay=-0.01), ValueError, r"Invalid weight_decay"),
    (dict(bias_correction="sometimes"), ValueError, r"Invalid bias_correction: 'sometimes' \(allowed: 'inside' \| 'step_size' \| 'none'\)"),
    (dict(weight_decay_mode="adamw"), ValueError, r"Invalid weight_decay_mode: 'adamw'"),
    (dict(trust_ratio="all"), ValueError, r"Invalid trust_ratio: 'all' \(allowed: True \| False \| 'decayed'\)"),
    (dict(trust_ratio=1), ValueError, r"Invalid trust_ratio: 1"),
    (dict(phi="log"), ValueError, r"Invalid phi: 'log'"),
    (dict(phi="clamp_norm"), ValueError, r"at least one bound when phi='clamp_norm'"),
    (dict(phi_max=10.0), ValueError, r"None unless phi is 'clamp_norm' or 'clamp_ratio'"),
    (dict(phi="clamp_ratio", phi_min=2.0, phi_max=1.0), ValueError, r"Invalid phi_min: 2\.0 \(allowed: <= phi_max"),
    (dict(nesterov="yes"), ValueError, r"Invalid nesterov: 'yes'"),
    (dict(nesterov="n-lamb", bias_correction="step_size"), ValueError, r"Nesterov needs the corrected moments"),
    (dict(max_grad_norm=0.0), ValueError, r"Invalid max_grad_norm"),
    (dict(fused=True, foreach=True), ValueError, r"at most one of them True"),
    (dict(lr="fast"), TypeError, r"Invalid lr: 'fast' \(allowed: a real number\)"),
])
def test_lamb_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        largebatch.Lamb(_model().parameters(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="2018"), r"Invalid mode: '2018' \(allowed: 'paper' \| '2017'\)"),
    (dict(larc_clip=True), r"LARC clipping belongs to mode='2017'"),
    (dict(mode="2017", phi="cap_ratio"), r"the 2017 form has no φ"),
    (dict(momentum=1.5), r"Invalid momentum"),
    (dict(trust_coefficient=0.0), r"Invalid trust_coefficient"),
])
def test_lars_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        largebatch.Lars(_model().parameters(), **kwargs)


def test_unknown_preset_and_unknown_flag():
    with pytest.raises(ValueError, match=r"Invalid optimizer name: 'lamb2' \(allowed: lamb \| lars"):
        largebatch.create_optimizer("lamb2", _model())
    with pytest.raises(TypeError, match=r"nvlamb: .*unexpected keyword argument 'betaz'"):
        largebatch.create_optimizer("nvlamb", _model(), betaz=(0.9, 0.99))


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_gradients_rejected(impl):
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        largebatch.Lamb(emb.parameters(), **impl).step()


def test_state_dict_from_a_different_model_rejected():
    a = _model()
    opt = largebatch.Lamb(a.parameters())
    a(torch.randn(4, 6)).sum().backward()
    opt.step()
    other = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match=r"has shape \(8, 6\), the parameter has shape \(9, 6\) \(a different model\?\)"):
        largebatch.Lamb(other.parameters()).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"holds 6 parameters in 1 groups, this optimizer has 2 in 1"):
        largebatch.Lamb(nn.Linear(6, 3).parameters()).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_round_trip_continues_identically(cls, impl):
    torch.manual_seed(1)
    data = [torch.randn(16, 6) for _ in range(8)]

    def run(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    straight = _model().double()
    opt_s = cls(largebatch.param_groups(straight), lr=0.01, **impl)
    run(straight, opt_s, [x.double() for x in data])

    first = _model().double()
    opt_f = cls(largebatch.param_groups(first), lr=0.01, **impl)
    run(first, opt_f, [x.double() for x in data[:3]])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt_f.state_dict())
    resumed = _model().double()
    resumed.load_state_dict(saved_model)
    opt_r = cls(largebatch.param_groups(resumed), lr=0.01, **impl)
    opt_r.load_state_dict(saved_opt)
    run(resumed, opt_r, [x.double() for x in data[3:]])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert set(opt_r.state_dict()["state"][0]) >= {"step"}


def test_stock_state_keys():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = largebatch.Lamb([p])
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 1
    q = nn.Parameter(torch.ones(3))
    q.grad = torch.ones(3)
    lars = largebatch.Lars([q])
    lars.step()
    assert set(lars.state[q]) == {"step", "momentum_buffer"}


@pytest.mark.parametrize("impl", IMPLS)
def test_lr_scheduler_drives_the_step(impl):
    model = _model()
    opt = largebatch.Lamb(model.parameters(), lr=0.1, **impl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= 1 else 1.0)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    sched.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # lr is now 0: nothing moves
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_works_with_a_compiled_model():
    model = _model()
    try:
        compiled = torch.compile(model, backend="eager")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torch.compile unavailable here: {exc}")
    opt = largebatch.create_optimizer("lamb", compiled, lr=0.05)
    x = torch.randn(32, 6)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = compiled(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_foreach_path_makes_no_per_tensor_item_calls(monkeypatch):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])
    model(torch.randn(2, 4)).sum().backward()
    opt = largebatch.Lamb(model.parameters(), foreach=True, fused=False, max_grad_norm=1.0)
    calls = {"n": 0}
    real = torch.Tensor.item

    def counting(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    opt.step()
    assert calls["n"] == 0


def test_param_groups_separate_decay_and_trust_ratio_exclusions(capsys):
    model = _model()
    groups = largebatch.param_groups(model, weight_decay=0.1, no_trust_ratio=["1.*"], verbose=True)
    by_name = {n: (g["weight_decay"], g.get("trust_ratio", True)) for g in groups for n in g["param_names"]}
    assert by_name["0.weight"] == (0.1, True)
    assert by_name["0.bias"] == (0.0, True)            # bias: no decay, still a trust ratio
    assert by_name["1.weight"] == (0.0, False)         # LayerNorm: no decay (predicate) and no ratio (pattern)
    assert by_name["3.weight"] == (0.1, True)
    assert sum(g["num_tensors"] for g in groups) == 6
    out = capsys.readouterr().out
    assert "decay/trust_ratio" in out and "no_decay/no_trust_ratio" in out
    # a predicate for the trust ratio, and disabling the default decay rule
    groups = largebatch.param_groups(model, no_weight_decay_if=None, no_trust_ratio_if=lambda n, p, m: p.ndim == 1)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    assert {g.get("trust_ratio", True) for g in groups} == {True, False}
    with pytest.raises(TypeError, match="Invalid model"):
        largebatch.param_groups([nn.Parameter(torch.ones(1))])


def test_excluded_groups_keep_preset_trust_mode():
    opt = largebatch.create_optimizer("nvlamb", _model())
    assert {g["trust_ratio"] for g in opt.param_groups} == {"decayed"}


def _rosenbrock(xy):
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


@pytest.mark.parametrize("make", [
    lambda p: largebatch.Lamb([p], lr=0.02, weight_decay=0.0),
    lambda p: largebatch.Lars([p], lr=0.02, weight_decay=0.0, momentum=0.9),
])
def test_rosenbrock_converges(make):
    p = nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = make(p)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.002, 1 - s / 3000))
    for _ in range(3000):
        opt.zero_grad()
        _rosenbrock(p).backward()
        opt.step()
        sched.step()
    assert _rosenbrock(p).item() < 1e-2, p.detach().tolist()


@pytest.mark.parametrize("name, lr", [("lamb", 0.02), ("lars", 0.05), ("nvlamb", 0.02), ("lars_2017", 2.0), ("larc", 1.0)])
def test_mlp_on_digits_converges(name, lr):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = largebatch.create_optimizer(name, model, lr=lr)
    for step in range(300):
        idx = torch.randint(0, len(x), (128,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc
