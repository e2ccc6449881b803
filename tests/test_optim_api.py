"""Regression tests for the peer bugs the variants table in docs/algorithms.md makes impossible, the torch.optim contract
(state_dict, schedulers, compile, telemetry), pinned error messages, param_groups, and convergence smoke tests."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import largebatch
from reference import ReferenceLamb, ReferenceLars, phi_ratio

IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True, fused=False),
         "single_tensor": dict(foreach=False, fused=False)}
MAKERS = {  # name -> factory(params, **impl)
    "lamb": lambda ps, **kw: largebatch.Lamb(ps, lr=0.05, **kw),
    "lamb_l2_prenorm": lambda ps, **kw: largebatch.Lamb(ps, lr=0.05, weight_decay_mode="l2", max_grad_norm=1.0, **kw),
    "lamb_nn": lambda ps, **kw: largebatch.Lamb(ps, lr=0.05, nesterov="nn-lamb", **kw),
    "lars": lambda ps, **kw: largebatch.Lars(ps, lr=0.1, **kw),
    "lars_2017": lambda ps, **kw: largebatch.Lars(ps, lr=0.5, mode="2017", nesterov=True, **kw),
    "larc": lambda ps, **kw: largebatch.Lars(ps, lr=0.01, mode="2017", larc_clip=True, max_grad_norm=1.0, **kw),
}


def _tensors(seed=0, shapes=((4, 3), (5,), (), (0,), (2, 2, 2))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _set_grads(ps, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


# ------------------------------------------------------------------ peer-bug regressions (docs/algorithms.md)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("maker", MAKERS)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_zero_initialised_tensors_move_after_one_step(maker, impl, wd):
    ps = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in [(6,), (3, 4), ()]]
    opt = MAKERS[maker](ps, weight_decay=wd, **IMPLS[impl])
    _set_grads(ps, 0)
    opt.step()
    for p in ps:
        assert (p.detach() != 0).all(), f"{maker}: a zero-initialised tensor did not move: {p}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", ["lamb", "lars"])
def test_weight_decay_zero_keeps_the_trust_ratio_unless_decayed(cls, impl):
    def run(**kw):
        ps = [nn.Parameter(t) for t in _tensors()]
        opt = MAKERS[cls](ps, weight_decay=0.0, **IMPLS[impl], **kw)
        _set_grads(ps, 0)
        opt.step()
        return ps, opt.telemetry()

    with_ratio, tele = run()
    no_ratio, tele_off = run(trust_ratio=False)
    decayed, tele_dec = run(trust_ratio="decayed")
    assert tele["group0.0"]["trust_ratio"] != pytest.approx(1.0)      # λ = 0 and the ratio is still applied
    assert not torch.allclose(with_ratio[0], no_ratio[0])
    assert all(v["trust_ratio"] == 1.0 for v in tele_dec.values())   # "decayed" + λ = 0: no ratio
    for a, b in zip(decayed, no_ratio):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_l2_mode_changes_the_result(impl):
    results = {}
    for name, kw in {"none": dict(weight_decay=0.0), "l2": dict(weight_decay=0.1, weight_decay_mode="l2"),
                     "decoupled": dict(weight_decay=0.1), "outside": dict(weight_decay=0.1,
                                                                            weight_decay_mode="decoupled_outside")}.items():
        ps = [nn.Parameter(t) for t in _tensors()]
        opt = largebatch.Lamb(ps, lr=0.05, **kw, **IMPLS[impl])
        for k in range(3):
            _set_grads(ps, k)
            opt.step()
        results[name] = torch.cat([p.detach().flatten() for p in ps])
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (results[a] - results[b]).abs().max() > 1e-6, f"weight decay {a} == {b}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("maker", MAKERS)
def test_step_never_mutates_grad(maker, impl):
    ps = [nn.Parameter(t) for t in _tensors()]
    opt = MAKERS[maker](ps, **IMPLS[impl])
    for k in range(3):
        _set_grads(ps, k)
        for p in ps:
            p.grad.mul_(30.0)        # a large global norm: max_grad_norm pre-normalisation is active
        before = [p.grad.clone() for p in ps]
        opt.step()
        for p, b in zip(ps, before):
            assert torch.equal(p.grad, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("maker", MAKERS)
def test_no_item_calls_during_step(maker, impl, monkeypatch):
    """No host sync per tensor: step() must not call Tensor.item at all (30 tensors, several steps)."""
    ps = [nn.Parameter(torch.randn(7, 3, dtype=torch.float64)) for _ in range(30)]
    opt = MAKERS[maker](ps, **IMPLS[impl])
    _set_grads(ps, 0)
    opt.step()                                          # lazy state init outside the count
    calls = []
    real_item = torch.Tensor.item

    def counting_item(self):
        calls.append(tuple(self.shape))
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    for k in range(3):
        _set_grads(ps, k + 1)
        opt.step()
    monkeypatch.undo()
    assert calls == [], f"{len(calls)} Tensor.item() calls in 3 steps of {len(ps)} tensors"


# ------------------------------------------------------------------ torch.optim contract
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("maker", MAKERS)
def test_state_dict_round_trip_continues_identically(maker, impl):
    init = _tensors()
    straight = [nn.Parameter(t.clone()) for t in init]
    opt = MAKERS[maker](straight, **IMPLS[impl])
    for k in range(8):
        _set_grads(straight, k)
        if k < 2:
            straight[1].grad = None                     # per-parameter step counters differ
        opt.step()

    first = [nn.Parameter(t.clone()) for t in init]
    opt1 = MAKERS[maker](first, **IMPLS[impl])
    for k in range(4):
        _set_grads(first, k)
        if k < 2:
            first[1].grad = None
        opt1.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = MAKERS[maker](resumed, **IMPLS[impl])
    opt2.load_state_dict(saved["opt"])
    for k in range(4, 8):
        _set_grads(resumed, k)
        opt2.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for a, b in zip(straight, resumed):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key
    assert float(opt2.state[resumed[1]]["step"]) == 6
    assert set(opt2.state[resumed[0]]) >= {"step", "exp_avg", "exp_avg_sq"} if maker.startswith("lamb") \
        else set(opt2.state[resumed[0]]) >= {"step", "momentum_buffer"}


def test_foreach_buckets_split_by_element_budget():
    from largebatch.optim._base import foreach_buckets

    assert foreach_buckets([4, 4, 4, 10, 1, 1], budget=8) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert foreach_buckets([3, 3], budget=100) == [range(0, 2)]
    assert foreach_buckets([], budget=8) == []


@pytest.mark.parametrize("maker", MAKERS)
def test_foreach_buckets_change_nothing(maker, monkeypatch):
    """The foreach path runs over buckets of tensors to bound its temporaries: same result, bit for bit."""
    from largebatch.optim import _base

    results = []
    for budget in (1 << 26, 9):  # one bucket / one or two tensors per bucket
        monkeypatch.setattr(_base, "FOREACH_BUCKET_ELEMENTS", budget)
        ps = [nn.Parameter(t.clone()) for t in _tensors()]
        opt = MAKERS[maker](ps, **IMPLS["foreach"])
        for k in range(3):
            _set_grads(ps, k)
            opt.step()
        results.append(([p.detach().clone() for p in ps], opt.telemetry_tensor()[1].clone()))
    (a, ta), (b, tb) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(ta, tb)


@pytest.mark.parametrize("maker", ["lamb", "lars"])
def test_step_counters_are_plain_scalars_advanced_in_one_op(maker, monkeypatch):
    ps = [nn.Parameter(t.clone()) for t in _tensors()]
    opt = MAKERS[maker](ps)
    calls = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: calls.append(a) or real(*a, **k))
    for k in range(3):
        _set_grads(ps, k)
        if k == 1:
            ps[2].grad = None  # another set of parameters with gradients: the counters are rebuilt
        opt.step()
    steps = [opt.state[p]["step"] for p in ps]
    assert [float(t) for t in steps] == [3, 3, 2, 3, 3]
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in steps)
    assert calls == []  # no per-tensor increments (they cost ~35 ms a step on 10,000 tensors)
    sd = opt.state_dict()
    assert [float(sd["state"][i]["step"]) for i in range(len(ps))] == [3, 3, 2, 3, 3]


def _after_one_step(maker):
    ps = [nn.Parameter(t.clone()) for t in _tensors()]
    opt = MAKERS[maker](ps)
    _set_grads(ps, 0)
    opt.step()
    return ps, opt


@pytest.mark.parametrize("maker", ["lamb", "lars"])
def test_step_counters_written_as_numbers_by_another_library_are_continued(maker):
    ps, opt = _after_one_step(maker)
    sd = opt.state_dict()
    for i, s in sd["state"].items():
        s["step"] = 4 + i  # plain ints / floats, as some libraries save them
    opt.load_state_dict(sd)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in ps] == [5 + i for i in range(len(ps))]


@pytest.mark.parametrize("maker", ["lamb", "lars"])
def test_deepcopy_and_pickle_keep_a_working_optimizer(maker):
    ps, opt = _after_one_step(maker)
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(opt), torch.load(buf, weights_only=False)):
        qs = twin.param_groups[0]["params"]
        for p, q in zip(ps, qs):
            q.grad = p.grad.clone()
        twin.step()
        assert [float(twin.state[q]["step"]) for q in qs] == [2] * len(qs)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", ["lamb", "lars"])
def test_lr_scheduler_drives_the_lr(cls, impl):
    factors = [1.0, 0.5, 0.25, 0.0, 2.0]
    init = _tensors()
    ps = [nn.Parameter(t.clone()) for t in init]
    opt = (largebatch.Lamb if cls == "lamb" else largebatch.Lars)(ps, lr=0.05, **IMPLS[impl])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factors[s])
    ref_cls = ReferenceLamb if cls == "lamb" else ReferenceLars
    ref = ref_cls([{"params": init}], lr=0.05)
    for k, f in enumerate(factors):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * f)
        _set_grads(ps, k)
        before = [p.detach().clone() for p in ps]
        opt.step()
        ref.groups[0]["lr"] = 0.05 * f
        ref.step([[p.grad for p in ps]])
        if f == 0.0:
            assert all(torch.equal(a, b) for a, b in zip(before, ps))
        for p, r in zip(ps, ref.groups[0]["params"]):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-13)
        if k + 1 < len(factors):
            sched.step()


@pytest.mark.compile
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_works_with_a_compiled_model(name):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    compiled_src = copy.deepcopy(eager)
    init = [p.detach().clone() for p in eager.parameters()]
    try:
        compiled = torch.compile(compiled_src, backend="aot_eager")
        compiled(torch.zeros(1, 6))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torch.compile cannot run here: {type(exc).__name__}: {exc}")
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    opts = [largebatch.create_optimizer(name, m, lr=0.05) for m in (eager, compiled)]
    for _ in range(2):
        for m, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(eager.parameters(), compiled_src.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(compiled_src.parameters(), init))
    # the eager model's names (no torch.compile "_orig_mod." prefix)
    assert set(opts[1].telemetry()) == {n for n, _ in compiled_src.named_parameters()}


def test_telemetry_uses_parameter_names_and_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    groups = largebatch.param_groups(model, weight_decay=0.01)
    ref = ReferenceLamb([{"params": [p.detach() for p in g["params"]], "weight_decay": g["weight_decay"],
                          "trust_ratio": g.get("trust_ratio", True)} for g in groups], lr=0.01)
    opt = largebatch.Lamb(groups, lr=0.01)
    assert opt.telemetry() == {}
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    ref.step([[p.grad for p in g["params"]] for g in groups])
    tele = opt.telemetry()
    assert set(tele) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for (gi, pi), (xn, un, ratio) in ref.norms.items():
        got = tele[groups[gi]["param_names"][pi]]
        assert got == pytest.approx({"param_norm": xn, "update_norm": un, "trust_ratio": ratio}, rel=1e-5)
    assert all(isinstance(v, float) for d in tele.values() for v in d.values())


# ------------------------------------------------------------------ pinned error messages
def _p():
    return [nn.Parameter(torch.ones(3))]


ERRORS = [
    (lambda: largebatch.Lamb(_p(), lr=-1.0), ValueError, r"Invalid lr: -1\.0 \(allowed: a number in \[0"),
    (lambda: largebatch.Lamb(_p(), lr="x"), TypeError, r"Invalid lr: 'x'"),
    (lambda: largebatch.Lamb(_p(), betas=(1.0, 0.999)), ValueError, r"Invalid betas\[0\]: 1\.0"),
    (lambda: largebatch.Lamb(_p(), betas=(0.9, -0.1)), ValueError, r"Invalid betas\[1\]: -0\.1"),
    (lambda: largebatch.Lamb(_p(), betas=(0.9,)), ValueError, r"Invalid betas: \(0\.9,\) \(allowed: a pair"),
    (lambda: largebatch.Lamb(_p(), eps=-1e-8), ValueError, r"Invalid eps: -1e-08"),
    (lambda: largebatch.Lamb(_p(), weight_decay=-0.01), ValueError, r"Invalid weight_decay: -0\.01"),
    (lambda: largebatch.Lamb(_p(), bias_correction=True), ValueError,
     r"Invalid bias_correction: True \(allowed: 'inside' \| 'step_size' \| 'none'\)"),
    (lambda: largebatch.Lamb(_p(), weight_decay_mode="adamw"), ValueError,
     r"Invalid weight_decay_mode: 'adamw' \(allowed: 'decoupled' \| 'l2' \| 'decoupled_outside'\)"),
    (lambda: largebatch.Lamb(_p(), trust_ratio=1), ValueError, r"Invalid trust_ratio: 1 \(allowed: True \| False \| 'decayed'\)"),
    (lambda: largebatch.Lamb(_p(), phi="clip"), ValueError, r"Invalid phi: 'clip' \(allowed: 'identity' \| 'clamp_norm'"),
    (lambda: largebatch.Lamb(_p(), nesterov=True), ValueError, r"Invalid nesterov: True \(allowed: None \| 'n-lamb' \| 'nn-lamb'\)"),
    (lambda: largebatch.Lamb(_p(), max_grad_norm=0.0), ValueError, r"Invalid max_grad_norm: 0\.0"),
    (lambda: largebatch.Lamb(_p(), phi="clamp_norm"), ValueError, r"Invalid phi_min/phi_max: \(None, None\)"),
    (lambda: largebatch.Lamb(_p(), phi_max=10.0), ValueError, r"Invalid phi_min/phi_max: \(None, 10\.0\)"),
    (lambda: largebatch.Lamb(_p(), phi="clamp_ratio", phi_min=2.0, phi_max=1.0), ValueError, r"Invalid phi_min: 2\.0"),
    (lambda: largebatch.Lamb(_p(), foreach=True, fused=True), ValueError, r"Invalid foreach/fused: \(True, True\)"),
    (lambda: largebatch.Lamb(_p(), bias_correction="step_size", nesterov="n-lamb"), ValueError,
     r"Invalid nesterov: 'n-lamb' \(allowed: None when bias_correction='step_size'"),
    (lambda: largebatch.Lamb(_p(), eps_inside_sqrt="yes"), ValueError, r"Invalid eps_inside_sqrt: 'yes'"),
    (lambda: largebatch.Lamb(_p(), amsgrad=True), TypeError, r"amsgrad"),
    (lambda: largebatch.Lars(_p(), momentum=1.0), ValueError, r"Invalid momentum: 1\.0"),
    (lambda: largebatch.Lars(_p(), mode="lamb"), ValueError, r"Invalid mode: 'lamb' \(allowed: 'paper' \| '2017'\)"),
    (lambda: largebatch.Lars(_p(), trust_coefficient=0.0), ValueError, r"Invalid trust_coefficient: 0\.0"),
    (lambda: largebatch.Lars(_p(), larc_clip=True), ValueError, r"Invalid larc_clip: True \(allowed: False when mode='paper'"),
    (lambda: largebatch.Lars(_p(), mode="2017", phi="cap_ratio"), ValueError, r"Invalid phi: 'cap_ratio'"),
    (lambda: largebatch.Lars(_p(), nesterov="yes"), ValueError, r"Invalid nesterov: 'yes'"),
    (lambda: largebatch.create_optimizer("lamb2", _p()), ValueError, r"Invalid optimizer name: 'lamb2' \(allowed: lamb"),
    (lambda: largebatch.create_optimizer("timm", _p(), foo=1), TypeError, r"timm: .*'foo'"),
    (lambda: largebatch.create_optimizer("lamb", _p(), no_weight_decay=["*.bias"]), ValueError,
     r"Invalid overrides \['no_weight_decay'\]: parameter-group rules need an nn.Module"),
    (lambda: largebatch.optim.get_preset("apex"), ValueError, r"Invalid preset: 'apex' \(allowed: paper \| nvlamb"),
    (lambda: largebatch.param_groups([nn.Parameter(torch.ones(1))]), TypeError, r"Invalid model: list"),
    (lambda: largebatch.Lamb([{"params": _p(), "trust_ratio": "yes"}]), ValueError, r"Invalid trust_ratio: 'yes'"),
]


@pytest.mark.parametrize("make, exc, match", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_invalid_arguments_name_the_argument_and_the_allowed_values(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_gradients_are_rejected(cls, impl):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters(), **IMPLS[impl])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_state_dict_from_a_different_model_is_rejected(cls):
    a, b, c = nn.Linear(3, 2), nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    opt_a = cls(a.parameters())
    a(torch.randn(2, 3)).sum().backward()
    opt_a.step()
    with pytest.raises(ValueError, match=r"Invalid state_dict: state\[0\]\['(exp_avg|momentum_buffer)'\] has shape "
                                         r"\(2, 3\), the parameter has shape \(4, 3\) \(a different model\?\)"):
        cls(b.parameters()).load_state_dict(opt_a.state_dict())
    with pytest.raises(ValueError, match=r"Invalid state_dict: it holds 2 parameters in 1 groups, this optimizer "
                                         r"has 4 in 1 \(a different model\?\)"):
        cls(c.parameters()).load_state_dict(opt_a.state_dict())


# ------------------------------------------------------------------ param_groups
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2, bias=False)
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


def _by_name(groups):
    return {n: (g["weight_decay"], g.get("trust_ratio", True)) for g in groups for n in g["param_names"]}


def test_param_groups_default_exclusions_and_counts():
    groups = largebatch.param_groups(_Net(), weight_decay=0.1)
    got = _by_name(groups)
    assert got == {"embed.weight": (0.1, True), "proj.weight": (0.1, True), "head.weight": (0.1, True),
                   "proj.bias": (0.0, True), "norm.weight": (0.0, True), "norm.bias": (0.0, True),
                   "bn.weight": (0.0, True), "bn.bias": (0.0, True), "scale": (0.0, True)}
    for g in groups:
        assert g["num_tensors"] == len(g["params"]) == len(g["param_names"])
        assert g["num_params"] == sum(p.numel() for p in g["params"])
    assert sum(g["num_params"] for g in groups) == sum(p.numel() for p in _Net().parameters() if p.requires_grad)


def test_param_groups_separate_decay_and_trust_ratio_rules():
    net = _Net()
    groups = largebatch.param_groups(
        net, weight_decay=0.1, no_weight_decay=["*.bias"], no_weight_decay_if=None,
        no_trust_ratio=["re:^(norm|bn)\\."], no_trust_ratio_if=lambda name, p, m: name == "embed.weight")
    got = _by_name(groups)
    assert got["proj.bias"] == (0.0, True)                 # decay list only
    assert got["norm.weight"] == (0.1, False)              # trust-ratio list only (regex)
    assert got["norm.bias"] == (0.0, False)                # both
    assert got["embed.weight"] == (0.1, False)             # trust-ratio predicate
    assert got["scale"] == (0.1, True) and got["head.weight"] == (0.1, True)
    assert len(groups) == 4
    # predicate for decay receives (name, param, module)
    seen = []
    largebatch.param_groups(net, no_weight_decay_if=lambda n, p, m: seen.append((n, type(m).__name__)) or False)
    assert ("bn.weight", "BatchNorm1d") in seen and ("scale", "_Net") in seen


def test_param_groups_verbose_prints_counts_and_optimizer_honours_groups(capsys):
    net = _Net()
    groups = largebatch.param_groups(net, weight_decay=0.1, no_trust_ratio=["norm.*"], verbose=True)
    out = capsys.readouterr().out
    assert "tensors" in out and "weight_decay" in out
    opt = largebatch.Lamb(groups, lr=0.1)
    out = net.norm(net.proj(net.embed(torch.tensor([1, 2])))).sum() + net.head(torch.ones(1, 4)).sum() \
        + net.bn(torch.randn(3, 4)).sum() + net.scale
    out.backward()
    opt.step()
    tele = opt.telemetry()
    assert tele["norm.weight"]["trust_ratio"] == 1.0 and tele["norm.bias"]["trust_ratio"] == 1.0
    assert tele["proj.weight"]["trust_ratio"] != 1.0


def test_presets_apply_their_group_rules_with_a_model():
    net = _Net()
    nv = largebatch.create_optimizer("nvlamb", net)
    assert all(g["trust_ratio"] == "decayed" for g in nv.param_groups)
    assert {n: g["weight_decay"] for g in nv.param_groups for n in g["param_names"]}["norm.weight"] == 0.0
    lars = largebatch.create_optimizer("lars_2017", net)
    ratio = {n: g["trust_ratio"] for g in lars.param_groups for n in g["param_names"]}
    assert ratio["bn.weight"] is False and ratio["proj.bias"] is False and ratio["proj.weight"] is True
    authors = largebatch.create_optimizer("authors_resnet", net)
    wd = {n: g["weight_decay"] for g in authors.param_groups for n in g["param_names"]}
    assert wd["proj.bias"] == 1.5 and wd["bn.weight"] == 0.0      # biases decayed, BatchNorm not
    for name in ["paper", "nvlamb", "torch_optimizer", "timm", "authors_resnet", "lars_paper", "lars_2017", "larc"]:
        assert name in largebatch.PRESETS
    assert isinstance(largebatch.create_optimizer("adamw", net), torch.optim.AdamW)
    assert isinstance(largebatch.create_optimizer("sgd", net), torch.optim.SGD)


# ------------------------------------------------------------------ convergence smoke tests
@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add contention (100x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rosenbrock(xy):
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


@pytest.mark.parametrize("make, tol", [
    (lambda ps: largebatch.Lamb(ps, lr=0.02, weight_decay=0.0), 0.02),
    (lambda ps: largebatch.Lars(ps, lr=0.05, weight_decay=0.0, momentum=0.9), 0.1),
], ids=["lamb", "lars"])
def test_rosenbrock_reaches_near_one_one(make, tol, one_thread):
    steps = 400
    p = nn.Parameter(torch.tensor([2.0, 3.0], dtype=torch.float64))
    opt = make([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        opt.zero_grad()
        _rosenbrock(p).backward()
        opt.step()
        sched.step()
    assert (p.detach() - 1).abs().max() < tol, p.detach().tolist()


@pytest.mark.parametrize("name, lr", [("lamb", 0.02), ("nvlamb", 0.02), ("lars", 0.05), ("lars_2017", 2.0),
                                      ("larc", 1.0)])
def test_mlp_on_digits_reaches_90_percent_train_accuracy(name, lr, one_thread):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = largebatch.create_optimizer(name, model, lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, f"{name}: train accuracy {acc:.3f}"


# ------------------------------------------------------------------ more contract details
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", ["lamb", "lars"])
def test_pre_normalisation_divides_by_the_global_norm(cls, impl):
    """NVLAMB: g / max(1, G/max_grad_norm). Grads ×100 and ×1000 are normalised to the same thing (a
    pre-normalisation that multiplied, or divided the wrong way, would not be); small grads are untouched."""
    make = (lambda ps, **kw: largebatch.Lamb(ps, lr=0.05, eps=0.1, **kw)) if cls == "lamb" else \
        (lambda ps, **kw: largebatch.Lars(ps, lr=0.05, weight_decay=0.1, **kw))

    def run(scale, max_grad_norm):
        ps = [nn.Parameter(t) for t in _tensors()]
        opt = make(ps, max_grad_norm=max_grad_norm, **IMPLS[impl])
        _set_grads(ps, 0)
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps]))
        for p in ps:
            p.grad.mul_(scale / total)              # global norm == scale
        opt.step()
        return torch.cat([p.detach().flatten() for p in ps])

    torch.testing.assert_close(run(100.0, 1.0), run(1000.0, 1.0), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(run(100.0, 1.0), run(1.0, None), rtol=1e-12, atol=1e-13)
    assert torch.equal(run(0.5, 1.0), run(0.5, None))
    assert not torch.allclose(run(100.0, None), run(100.0, 1.0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_tensor_lr_equals_float_lr(cls, impl):
    out = []
    for lr in (0.01, torch.tensor(0.01, dtype=torch.float64)):
        ps = [nn.Parameter(t) for t in _tensors()]
        opt = cls(ps, lr=lr, **IMPLS[impl])
        for k in range(3):
            _set_grads(ps, k)
            opt.step()
        out.append(torch.cat([p.detach().flatten() for p in ps]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-15, atol=0)


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_closure_and_no_gradients(cls):
    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = cls([p, nn.Parameter(torch.zeros(2))])
    before = p.detach().clone()
    assert opt.step() is None and torch.equal(p, before) and opt.telemetry() == {}   # no grads: nothing happens

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(float((before ** 2).sum()))
    assert not torch.equal(p, before) and set(opt.telemetry()) == {"group0.0"}
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([])


@settings(max_examples=60, deadline=None)
@given(xn=st.lists(st.sampled_from([0.0, 1e-3, 0.5, 3.0, 40.0]), min_size=1, max_size=6),
       un=st.lists(st.sampled_from([0.0, 1e-4, 0.2, 7.0]), min_size=6, max_size=6),
       phi=st.sampled_from(["identity", "clamp_norm", "clamp_ratio", "cap_ratio"]),
       lo=st.sampled_from([None, 0.0, 0.01, 1.0]), hi=st.sampled_from([None, 2.0, 10.0]))
def test_trust_ratio_function_matches_reference(xn, un, phi, lo, hi):
    if phi in ("identity", "cap_ratio"):
        lo = hi = None
    elif lo is None and hi is None:
        hi = 10.0
    un = un[:len(xn)]
    got = largebatch.optim.trust_ratio(torch.tensor(xn, dtype=torch.float64), torch.tensor(un, dtype=torch.float64),
                                       phi=phi, phi_min=lo, phi_max=hi)
    expected = [phi_ratio(a, b, phi, lo, hi) for a, b in zip(xn, un)]
    assert got.tolist() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("impl", ["default", "foreach", "single_tensor"])
@pytest.mark.parametrize("maker", ["lamb_l2_prenorm", "lars", "lars_2017"])
def test_mixed_dtype_group_matches_reference(maker, impl):
    """One group holding float32 and float64 tensors (torch.optim groups by dtype before foreach ops).
    Tolerance: float32 for the f32 tensor; 1e-6 for the f64 one (the global gradient norm includes f32 grads)."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(5, generator=gen).float().double(), torch.randn(4, 3, generator=gen, dtype=torch.float64)]
    dtypes = [torch.float32, torch.float64]
    ps = [nn.Parameter(t.to(d)) for t, d in zip(init, dtypes)]
    kw = {"default": {}, "foreach": IMPLS["foreach"], "single_tensor": IMPLS["single_tensor"]}[impl]
    opt = MAKERS[maker](ps, **kw)
    ref_opts = {"lamb_l2_prenorm": (ReferenceLamb, dict(lr=0.05, weight_decay_mode="l2", max_grad_norm=1.0)),
                "lars": (ReferenceLars, dict(lr=0.1)),
                "lars_2017": (ReferenceLars, dict(lr=0.5, mode="2017", nesterov=True))}[maker]
    ref = ref_opts[0]([{"params": init}], **ref_opts[1])
    for _ in range(5):
        gs = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(d) for t, d in zip(init, dtypes)]
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        ref.step([[g.double() for g in gs]])
    torch.testing.assert_close(ps[0].detach().double(), ref.groups[0]["params"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ps[1].detach(), ref.groups[0]["params"][1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
@pytest.mark.parametrize("group_value, default", [(1e-3, None), (None, 1.0), (2.0, 1.0)])
def test_per_group_max_grad_norm_is_rejected(cls, group_value, default):
    """The NVLAMB norm is global over all groups: a different per-group value cannot be honoured and must not
    be silently ignored."""
    with pytest.raises(ValueError, match=r"max_grad_norm"):
        cls([{"params": [nn.Parameter(torch.ones(3))], "max_grad_norm": group_value}], max_grad_norm=default)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_group_flags_match_reference(impl):
    """Every flag is a param-group key: three groups with different betas/φ/Nesterov/decay mode/bias/ε/lr."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    gopts = [dict(betas=(0.5, 0.9), phi="cap_ratio"),
             dict(nesterov="n-lamb", weight_decay_mode="l2", weight_decay=0.1),
             dict(bias_correction="none", eps_inside_sqrt=True, eps=1e-3, lr=0.2, trust_ratio="decayed")]
    ps = [nn.Parameter(t.clone()) for t in init]
    opt = largebatch.Lamb([{"params": [p], **o} for p, o in zip(ps, gopts)], lr=0.05, **IMPLS[impl])
    ref = ReferenceLamb([{"params": [t], **o} for t, o in zip(init, gopts)], lr=0.05)
    for _ in range(5):
        gs = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        ref.step([[g] for g in gs])
    for p, group in zip(ps, ref.groups):
        torch.testing.assert_close(p.detach(), group["params"][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_per_group_max_grad_norm_equal_to_the_default_is_fine(cls):
    cls([{"params": [nn.Parameter(torch.ones(3))], "max_grad_norm": 1.0}], max_grad_norm=1.0)


def test_create_optimizer_overrides_flags_and_group_rules():
    net = _Net()
    opt = largebatch.create_optimizer("paper", net, lr=0.3, weight_decay=0.3, phi="cap_ratio",
                                      no_trust_ratio=["norm.*"], no_weight_decay_if=largebatch.optim.is_bias)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["proj.weight"]["weight_decay"] == 0.3 and by_name["proj.bias"]["weight_decay"] == 0.0
    assert by_name["norm.weight"]["weight_decay"] == 0.3 and by_name["norm.weight"]["trust_ratio"] is False
    assert by_name["proj.weight"]["trust_ratio"] is True
    assert all(g["lr"] == 0.3 and g["phi"] == "cap_ratio" for g in opt.param_groups)
    preset = largebatch.PRESETS["torch_optimizer"]
    opt = largebatch.create_optimizer("torch_optimizer", [nn.Parameter(torch.ones(2))])
    for key, value in preset.options.items():
        assert opt.defaults[key] == value


@pytest.mark.parametrize("maker", ["lamb", "lamb_nn", "lars", "larc"])
def test_state_dict_is_implementation_independent(maker):
    """Save from one path, resume on the others: the state format (0-d float "step", moments / buffer) is shared."""
    init = _tensors()
    ps = [nn.Parameter(t.clone()) for t in init]
    opt = MAKERS[maker](ps, **IMPLS["fused"])
    for k in range(3):
        _set_grads(ps, k)
        opt.step()
    saved, saved_params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
    for p in ps:
        step = opt.state[p]["step"]
        assert torch.is_tensor(step) and step.shape == () and step.dtype.is_floating_point and float(step) == 3
    results = []
    for impl in IMPLS:
        qs = [nn.Parameter(t.clone()) for t in saved_params]
        o = MAKERS[maker](qs, **IMPLS[impl])
        o.load_state_dict(copy.deepcopy(saved))
        for k in range(3, 6):
            _set_grads(qs, k)
            o.step()
        results.append(torch.cat([q.detach().flatten() for q in qs]))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["default", "foreach", "single_tensor"])
@pytest.mark.parametrize("cls", ["lamb", "lars"])
def test_mixed_dtype_group_telemetry_maps_to_the_right_tensors(cls, impl):
    """Interleaved float32/float64 tensors (stepped in dtype buckets): telemetry keys still name the right tensor."""
    gen = torch.Generator().manual_seed(1)
    shapes, dtypes = [(3,), (2, 2), (5,), (4,)], [torch.float32, torch.float64, torch.float32, torch.float64]
    init = [(torch.randn(s, generator=gen, dtype=torch.float64) * (i + 1)).to(d).double()
            for i, (s, d) in enumerate(zip(shapes, dtypes))]
    ps = [nn.Parameter(t.to(d)) for t, d in zip(init, dtypes)]
    kw = {"default": {}, "foreach": IMPLS["foreach"], "single_tensor": IMPLS["single_tensor"]}[impl]
    names = [f"t{i}" for i in range(len(ps))]
    opt = MAKERS[cls]([{"params": ps, "param_names": names}], **kw)
    ref = (ReferenceLamb if cls == "lamb" else ReferenceLars)([{"params": init}], lr=0.05 if cls == "lamb" else 0.1)
    gs = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(shapes, dtypes)]
    for p, g in zip(ps, gs):
        p.grad = g
    opt.step()
    ref.step([[g.double() for g in gs]])
    tele = opt.telemetry()
    for i, name in enumerate(names):
        xn, un, ratio = ref.norms[(0, i)]
        assert tele[name] == pytest.approx({"param_norm": xn, "update_norm": un, "trust_ratio": ratio}, rel=1e-5)


def test_param_groups_tied_weights_appear_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.decoder = nn.Linear(4, 7)
            self.decoder.weight = self.embed.weight

    model = Tied()
    groups = largebatch.param_groups(model)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == ["decoder.bias", "embed.weight"]
    opt = largebatch.Lamb(groups, lr=0.01)           # torch rejects a parameter listed twice
    model.decoder(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    assert set(opt.telemetry()) == {"decoder.bias", "embed.weight"}
