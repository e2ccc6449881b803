"""Faults and bad input at the optimizer (issue 16 items 8, 10, 11): the non-finite policy on every path,
constructor validation, and load_state_dict that validates first and loads all or nothing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import largebatch
from largebatch.optim import kernel

NAN, INF = float("nan"), float("inf")
IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True, fused=False),
         "single_tensor": dict(foreach=False, fused=False)}
if not kernel.available():
    del IMPLS["fused"]
OPTS = {
    "lamb": lambda ps, **kw: largebatch.Lamb(ps, lr=0.1, **kw),
    "lamb_prenorm": lambda ps, **kw: largebatch.Lamb(ps, lr=0.1, max_grad_norm=1.0, **kw),
    "lars": lambda ps, **kw: largebatch.Lars(ps, lr=0.1, **kw),
    "lars_2017_prenorm": lambda ps, **kw: largebatch.Lars(ps, lr=0.1, mode="2017", max_grad_norm=1.0, **kw),
}


def _snapshot(opt, ps):
    return copy.deepcopy(([p.detach().clone() for p in ps], opt.state_dict()))


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][key])), (k, key)


# ------------------------------------------------------------------ item 8: nonfinite=
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt_name", OPTS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_the_issues_example_skips_the_step_and_then_continues_as_if_it_never_came(opt_name, impl, bad):
    """p = [3, 4, .5, .5], grad [nan, 1, 1, 1], then three steps of ones: the result is three clean steps."""
    def run(first_grad):
        p = nn.Parameter(torch.tensor([3.0, 4.0, 0.5, 0.5]))
        opt = OPTS[opt_name]([p], **IMPLS[impl])
        grads = ([first_grad] if first_grad is not None else []) + [torch.ones(4)] * 3
        for k, g in enumerate(grads):
            before = _snapshot(opt, [p])
            p.grad = g.clone()
            opt.step()
            if k == 0 and first_grad is not None:
                _same(before, _snapshot(opt, [p]))  # params, moments, counters untouched
                assert opt.last_step_skipped and opt.skipped_steps == 1
        return p.detach(), opt

    skipped, opt = run(torch.tensor([bad, 1.0, 1.0, 1.0]))
    clean, _ = run(None)
    assert torch.equal(skipped, clean) and torch.isfinite(skipped).all()
    assert not opt.last_step_skipped and opt.skipped_steps == 1 and opt.state_dict()["param_groups"][0]["skipped_steps"] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_propagate_is_torch_adamws_behaviour(impl):
    p = nn.Parameter(torch.tensor([3.0, 4.0, 0.5, 0.5]))
    opt = largebatch.Lamb([p], lr=0.1, nonfinite="propagate", **IMPLS[impl])
    for g in [torch.tensor([NAN, 1.0, 1.0, 1.0])] + [torch.ones(4)] * 3:
        p.grad = g
        opt.step()
    # the issue's figures: the NaN stays, the ratio of that tensor is silently 1 from then on
    assert math.isnan(p[0].item()) and torch.allclose(p.detach()[1:], torch.tensor([3.5846, 0.0986, 0.0986]), atol=1e-4)
    assert opt.skipped_steps == 0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["nvlamb", "timm", "authors_resnet", "larc"])
def test_with_max_grad_norm_one_nan_no_longer_turns_every_parameter_nan(preset, impl):
    def run(policy):
        model = Net()
        opt = largebatch.create_optimizer(preset, model, nonfinite=policy, max_grad_norm=1.0, **IMPLS[impl])
        for k in range(3):
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            if k == 1:
                model.head.bias.grad[0] = NAN
            opt.step()
        return [p.detach() for p in model.parameters()]

    assert all(torch.isfinite(p).all() for p in run("skip"))
    assert all(torch.isnan(p).all() for p in run("propagate"))  # what the issue saw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt_name", OPTS)
def test_raise_names_the_first_nonfinite_tensor_and_updates_nothing(opt_name, impl):
    model = Net()
    opt = largebatch.create_optimizer(opt_name.split("_")[0], model, nonfinite="raise", **IMPLS[impl],
                                      max_grad_norm=1.0 if "prenorm" in opt_name else None)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    model.norm.weight.grad[1] = INF
    model.head.weight.grad[0, 0] = NAN
    before = _snapshot(opt, list(model.parameters()))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in head\.weight \(nonfinite='raise'"):
        opt.step()
    _same(before, _snapshot(opt, list(model.parameters())))


@pytest.mark.parametrize("impl", ["foreach", "single_tensor"])
def test_skip_with_bf16_master_weights(impl):
    ps = [nn.Parameter(torch.randn(5, 3).bfloat16()), nn.Parameter(torch.randn(7).bfloat16())]
    opt = largebatch.Lamb(ps, lr=0.1, master_weights=True, **IMPLS[impl])
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    ps[1].grad[3] = NAN
    before = _snapshot(opt, ps)
    opt.step()
    _same(before, _snapshot(opt, ps))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("impl", ["foreach", "single_tensor"])
def test_the_torch_check_skips_empty_tensors(impl):
    """bf16 gradients take torch's max-|g| path, which refuses an empty tensor: it is left out, not fatal."""
    ps = [nn.Parameter(torch.ones(0).bfloat16()), nn.Parameter(torch.ones(3).bfloat16())]
    opt = largebatch.Lamb(ps, lr=0.1, **IMPLS[impl])
    for good in (True, False):
        ps[0].grad, ps[1].grad = torch.ones(0).bfloat16(), torch.tensor([1.0, 1.0, 1.0 if good else NAN]).bfloat16()
        opt.step()
        assert opt.last_step_skipped is (not good)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernels_finiteness_scan_finds_the_first_bad_tensor(dtype):
    if not kernel.available():
        pytest.skip("C kernel unavailable")
    sizes = [3, 0, 70_000, kernel.PAR_THRESHOLD + 5, 11, 1]
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    assert kernel.first_nonfinite(ts) == -1
    for bad in [NAN, INF, -INF]:
        for i in [5, 3, 2, 0]:
            ts[i][-1] = bad
            assert kernel.first_nonfinite(ts) == i
        for t in ts:
            t.nan_to_num_(0.0, 0.0, 0.0)
    assert kernel.first_nonfinite([t.to(torch.bfloat16) for t in ts]) is None   # torch does those
    assert kernel.first_nonfinite([ts[0], ts[2][::2]]) is None


def test_sharded_parameters_skip_on_every_rank_alike():
    """A DTensor parameter (FSDP2) on a 1-rank gloo mesh: the sharded path honours the policy too."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for cls in (largebatch.Lamb, largebatch.Lars):
            p = nn.Parameter(distribute_tensor(torch.tensor([[3.0, 4.0], [0.5, 0.5]]), mesh, [Shard(0)]))
            opt = cls([p], lr=0.1)
            p.grad = distribute_tensor(torch.tensor([[NAN, 1.0], [1.0, 1.0]]), mesh, [Shard(0)])
            opt.step()
            assert opt.skipped_steps == 1 and torch.equal(p.to_local(), torch.tensor([[3.0, 4.0], [0.5, 0.5]]))
            assert len(opt.state[p]) == 0
            p.grad = distribute_tensor(torch.ones(2, 2), mesh, [Shard(0)])
            opt.step()
            assert torch.isfinite(p.to_local()).all() and not torch.equal(p.to_local(), torch.tensor([[3.0, 4.0], [0.5, 0.5]]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_nonfinite_is_validated_and_optimizer_wide(cls):
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"Invalid nonfinite: 'ignore' \(allowed: 'skip' \| 'raise' \| 'propagate'\)"):
        cls([p], nonfinite="ignore")
    with pytest.raises(ValueError, match=r"Invalid nonfinite: 'raise' \(allowed: only the optimizer-wide value 'skip'"):
        cls([{"params": [p], "nonfinite": "raise"}])


def test_skipped_steps_survive_a_state_dict_round_trip_and_old_state_dicts_load():
    p = nn.Parameter(torch.ones(3))
    opt = largebatch.Lamb([p])
    p.grad = torch.tensor([1.0, NAN, 1.0])
    opt.step()
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    fresh = largebatch.Lamb([nn.Parameter(torch.ones(3))])
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 1
    old = copy.deepcopy(sd)  # written before nonfinite= existed
    del old["param_groups"][0]["nonfinite"], old["param_groups"][0]["skipped_steps"]
    fresh = largebatch.Lamb([nn.Parameter(torch.ones(3))], nonfinite="raise")
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["nonfinite"] == "raise" and fresh.skipped_steps == 0


# ------------------------------------------------------------------ item 10: constructor arguments
@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
@pytest.mark.parametrize("arg", ["lr", "weight_decay", "eps", "max_grad_norm"])
@pytest.mark.parametrize("value", [INF, -INF, NAN, -1.0])
def test_non_finite_or_negative_hyperparameters_are_refused_by_name(cls, arg, value):
    with pytest.raises(ValueError, match=rf"Invalid {arg}: "):
        cls([nn.Parameter(torch.ones(2))], **{arg: value})


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_complex_parameters_are_refused(cls):
    with pytest.raises(TypeError, match=r"does not support complex parameters \(got torch.complex64\)"):
        cls([nn.Parameter(torch.ones(2, dtype=torch.complex64))])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_sparse_gradients_are_a_clear_type_error(cls, impl, max_grad_norm, nonfinite):
    emb = nn.Embedding(5, 3, sparse=True)
    opt = cls(emb.parameters(), max_grad_norm=max_grad_norm, nonfinite=nonfinite, **IMPLS[impl])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()


# ------------------------------------------------------------------ item 11: load_state_dict
def _trained(cls, ps=None, **kw):
    ps = ps if ps is not None else [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    opt = cls(ps, **kw)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, ps


def _assert_refused_untouched(opt, ps, sd, exc, match):
    before = _snapshot(opt, ps)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    _same(before, _snapshot(opt, ps))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    for p in ps:  # still steps
        p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("src,dst,match", [
    (largebatch.Lars, largebatch.Lamb, r"param_groups lack \['betas', 'bias_correction'.*not a Lamb state_dict"),
    (largebatch.Lamb, largebatch.Lars, r"param_groups lack \['momentum', 'mode'.*not a Lars state_dict"),
    (torch.optim.AdamW, largebatch.Lamb, r"param_groups lack \['bias_correction', 'weight_decay_mode'"),
    (torch.optim.SGD, largebatch.Lars, r"param_groups lack \['mode', 'trust_coefficient', 'trust_ratio'\]"),
])
def test_another_optimizers_state_is_refused(src, dst, match):
    sd = _trained(src)[0].state_dict()
    opt, ps = _trained(dst)
    _assert_refused_untouched(opt, ps, sd, ValueError, match)


def test_another_optimizers_state_keys_are_refused_even_with_our_group_keys():
    lamb_sd = _trained(largebatch.Lamb)[0].state_dict()
    lars, ps = _trained(largebatch.Lars)
    sd = copy.deepcopy(lars.state_dict())
    sd["state"] = lamb_sd["state"]
    _assert_refused_untouched(lars, ps, sd, ValueError, r"state\[0\] has keys \['exp_avg', 'exp_avg_sq'\] that a Lars")


def test_unknown_ids_duplicate_ids_and_missing_keys_are_refused():
    opt, ps = _trained(largebatch.Lamb)
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][7] = bad["state"].pop(1)
    _assert_refused_untouched(opt, ps, bad, ValueError, r"state for ids \[7\] that no param group holds")
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = [0, 0]
    _assert_refused_untouched(opt, ps, bad, ValueError, "appears twice")
    bad = copy.deepcopy(sd)
    del bad["state"][0]["exp_avg_sq"]
    _assert_refused_untouched(opt, ps, bad, ValueError, r"state\[0\] lacks \['exp_avg_sq'\]")


def test_a_stray_master_param_is_refused():
    opt, ps = _trained(largebatch.Lamb)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["master_param"] = torch.zeros(4, 3)  # fp32 params: it would overwrite the weights
    _assert_refused_untouched(opt, ps, sd, ValueError, r"state\[0\] has a 'master_param' but the parameter is "
                                                       r"torch.float32 with master_weights=False")
    bf = [nn.Parameter(torch.randn(4, 3).bfloat16())]
    opt, ps = _trained(largebatch.Lamb, bf, master_weights=True)
    for value, exc, match in [(torch.zeros(3, 4), ValueError, r"'master_param'\] has shape \(3, 4\)"),
                              (torch.zeros(4, 3, dtype=torch.float64), TypeError, "allowed: torch.float32"),
                              (torch.full((4, 3), NAN), ValueError, "holds NaN or inf")]:
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][0]["master_param"] = value
        _assert_refused_untouched(opt, ps, sd, exc, match)


@pytest.mark.parametrize("key,value,exc,match", [
    ("exp_avg", NAN, ValueError, r"state\[1\]\['exp_avg'\] holds NaN or inf"),
    ("exp_avg_sq", INF, ValueError, r"state\[1\]\['exp_avg_sq'\] holds NaN or inf"),
    ("step", NAN, ValueError, r"state\[1\]\['step'\] = nan"),
    ("step", -1.0, ValueError, r"state\[1\]\['step'\] = -1.0"),
])
def test_non_finite_moments_and_bad_counters_are_refused(key, value, exc, match):
    opt, ps = _trained(largebatch.Lamb)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1][key] = torch.full_like(sd["state"][1][key], value)
    _assert_refused_untouched(opt, ps, sd, exc, match)


def test_an_invalid_hyperparameter_in_the_saved_groups_is_refused_before_loading():
    opt, ps = _trained(largebatch.Lamb)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = INF
    _assert_refused_untouched(opt, ps, sd, ValueError, r"Invalid lr: inf")


# ------------------------------------------------------------------ fuzz: constructor and state dicts
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=3), st.just([1, 2]), st.just((0.9, 0.999)), st.just(torch.tensor(0.5)),
                    st.just(torch.zeros(2)), st.sampled_from(["skip", "raise", "propagate", "decayed", "2017", "l2",
                                                              "inside", "n-lamb", "clamp_norm", "identity"]))
_LAMB_ARGS = ["lr", "betas", "eps", "weight_decay", "bias_correction", "weight_decay_mode", "trust_ratio", "phi",
              "phi_min", "phi_max", "max_grad_norm", "eps_inside_sqrt", "grad_averaging", "nesterov",
              "master_weights", "foreach", "fused", "nonfinite", "sync_free"]
_LARS_ARGS = ["lr", "momentum", "weight_decay", "mode", "trust_coefficient", "larc_clip", "eps", "nesterov",
              "grad_averaging", "trust_ratio", "phi", "phi_min", "phi_max", "max_grad_norm", "master_weights",
              "foreach", "fused", "nonfinite", "sync_free"]


@settings(max_examples=300, deadline=None)
@given(is_lamb=st.booleans(), data=st.data())
def test_fuzz_constructor_arguments_build_and_step_or_raise_value_or_type_error(is_lamb, data):
    cls, names = (largebatch.Lamb, _LAMB_ARGS) if is_lamb else (largebatch.Lars, _LARS_ARGS)
    kwargs = data.draw(st.dictionaries(st.sampled_from(names), _VALUES, max_size=4))
    p = nn.Parameter(torch.randn(3, 2))
    try:
        opt = cls([p], **kwargs)
    except (ValueError, TypeError):
        return
    p.grad = torch.randn(3, 2)
    try:
        opt.step()
    except RuntimeError as exc:  # the one documented refusal at step time: fused=True on tensors it cannot take
        assert "fused=True" in str(exc)


def _mutations():
    keys = st.sampled_from(["exp_avg", "exp_avg_sq", "momentum_buffer", "step", "master_param", "bogus"])
    value = st.one_of(_VALUES, st.sampled_from([torch.zeros(4, 3), torch.zeros(3), torch.zeros(4, 3, dtype=torch.int64),
                                                torch.full((3,), NAN), torch.zeros(4, 3).bfloat16(), torch.tensor(2.0)]))
    return st.lists(st.one_of(
        st.tuples(st.just("state"), st.sampled_from([0, 1, 2, "x"]), keys, value),
        st.tuples(st.just("drop_state"), st.sampled_from([0, 1, 2, "x"]), keys, st.none()),
        st.tuples(st.just("group"), st.sampled_from([0, 1]), st.sampled_from(_LAMB_ARGS + _LARS_ARGS + ["params"]), value),
        st.tuples(st.just("drop_group"), st.sampled_from([0, 1]), st.sampled_from(_LAMB_ARGS + _LARS_ARGS + ["params"]),
                  st.none()),
        st.tuples(st.just("top"), st.sampled_from(["state", "param_groups"]), st.none(), value),
    ), min_size=1, max_size=3)


def _mutate(sd, ops):
    for kind, where, key, value in ops:
        if kind != "top" and not (isinstance(sd["state"], dict) and isinstance(sd["param_groups"], list)
                                  and all(isinstance(g, dict) for g in sd["param_groups"])):
            continue  # a mutation of a part an earlier one replaced
        if kind == "state" and isinstance(sd["state"].setdefault(where, {}), dict):
            sd["state"][where][key] = value
        elif kind == "drop_state" and isinstance(sd["state"].get(where), dict):
            sd["state"][where].pop(key, None)
        elif kind == "group":
            sd["param_groups"][where % len(sd["param_groups"])][key] = value
        elif kind == "drop_group":
            sd["param_groups"][where % len(sd["param_groups"])].pop(key, None)
        elif kind == "top":
            sd[where] = value
    return sd


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=st.sampled_from(["lamb", "lars", "adamw"]), dst=st.sampled_from(["lamb", "lars"]), ops=_mutations())
def test_fuzz_mutated_state_dicts_load_or_raise_and_never_half_load(src, dst, ops):
    classes = {"lamb": largebatch.Lamb, "lars": largebatch.Lars, "adamw": torch.optim.AdamW}
    sd = _mutate(copy.deepcopy(_trained(classes[src], [nn.Parameter(torch.ones(4, 3)),
                                                       nn.Parameter(torch.ones(3))])[0].state_dict()), ops)
    opt, ps = _trained(classes[dst], [nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(3))])
    before = _snapshot(opt, ps)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    try:
        opt.load_state_dict(sd)
    except (ValueError, TypeError):
        _same(before, _snapshot(opt, ps))
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
        return
    for p in ps:  # what loaded must step
        p.grad = torch.ones_like(p)
    opt.step()
