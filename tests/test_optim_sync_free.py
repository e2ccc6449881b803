"""The sync-free step (issue 16 item 8: the skip "decided on the device without a host sync"), forced on CPU
with ``sync_free=True``: the same results as the ordinary foreach path bit for bit, no host read during
``step()``, the skip/raise/propagate semantics, and the skipped-step count in the state_dict.

On an accelerator ``sync_free=None`` turns it on by itself; this machine has none, so the tests force it and
treat every read of a tensor on the host as the sync it would be (docs/algorithms.md, "Non-finite gradients").
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import largebatch
from largebatch.optim.presets import PRESETS
from variants import FLAG_VARIANTS

NAN, INF = float("nan"), float("inf")
FOREACH = dict(foreach=True, fused=False)
VARIANTS = FLAG_VARIANTS  # every branch of the multi-tensor paths runs
CASES = {**{name: (name, {}) for name in PRESETS}, **VARIANTS}


class Net(nn.Module):
    """A matrix, a bias, a LayerNorm, a 3-D tensor, a zero tensor (the zero-norm rule) and a 0-dim one."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.cube = nn.Parameter(torch.randn(2, 3, 2) * 0.5)
        self.zero = nn.Parameter(torch.zeros(5))
        self.scalar = nn.Parameter(torch.tensor(0.7))  # 0-dim: a 0-dim coefficient must not promote it
        self.to(dtype)


def _grads(model, gen, k, bad=None):
    for name, p in model.named_parameters():
        scale = 0.0 if (name == "norm.bias" and k < 2) else 1.0 + k
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale).to(p.dtype)
    if bad is not None:
        model.cube.grad.view(-1)[3] = bad


def _run(case, dtype, steps=5, bad_steps=(), **kw):
    """``steps`` steps of seeded gradients; a step in ``bad_steps`` gets all-ones gradients with one NaN
    instead, inserted without drawing from the generator (so the clean steps are those of a clean run)."""
    name, flags = CASES[case]
    model = Net(dtype)
    opt = largebatch.create_optimizer(name, model, **{"lr": 0.02, **flags, **FOREACH, **kw})
    gen = torch.Generator().manual_seed(1)
    telemetry, clean = [], 0
    for k in range(steps):
        if k in bad_steps:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            model.cube.grad.view(-1)[3] = NAN
        else:
            _grads(model, gen, clean)
            clean += 1
        opt.step()
        telemetry.append(opt.telemetry())
    return model, opt, telemetry


def _state(opt):
    return {(i, key): v for i, s in enumerate(opt.state.values()) for key, v in s.items()}


def _bitwise(a, b):
    a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8)
                                                                      if a.dtype != torch.bool else a, b.view(-1)
                                                                      .view(torch.uint8) if b.dtype != torch.bool
                                                                      else b)


def _assert_same_run(one, other):
    (m1, o1, t1), (m2, o2, t2) = one, other
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert _bitwise(p.detach(), q.detach()), n
    s1, s2 = _state(o1), _state(o2)
    assert s1.keys() == s2.keys()
    for key in s1:
        assert _bitwise(s1[key], s2[key]), key
    assert _hex(t1) == _hex(t2)


def _hex(telemetry):
    """Telemetry figures as exact hex strings (NaN compares equal to NaN here)."""
    return [{n: {f: float(v).hex() for f, v in fig.items()} for n, fig in row.items()} for row in telemetry]


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_with_finite_gradients_the_sync_free_step_is_the_foreach_step_bit_for_bit(case, dtype, nonfinite):
    """Same params, moments, counters and telemetry after 5 steps. bf16/fp16 without master weights too: there
    torch's CPU foreach ops round differently in place and out of place (masked_writes.scaled_copy)."""
    _assert_same_run(_run(case, dtype, nonfinite=nonfinite, sync_free=False),
                     _run(case, dtype, nonfinite=nonfinite, sync_free=True))


@pytest.mark.parametrize("case", ["paper", "larc"])
def test_bf16_master_weights_are_bit_identical_too(case):
    _assert_same_run(_run(case, torch.bfloat16, master_weights=True, sync_free=False),
                     _run(case, torch.bfloat16, master_weights=True, sync_free=True))


def test_buckets_change_nothing(monkeypatch):
    from largebatch.optim import _base
    whole = _run("paper", torch.float32, sync_free=True, bad_steps=(2,))
    monkeypatch.setattr(_base, "FOREACH_BUCKET_ELEMENTS", 8)  # a bucket per tensor or two
    _assert_same_run(whole, _run("paper", torch.float32, sync_free=True, bad_steps=(2,)))


# ------------------------------------------------------------------ no host sync
_SYNCS = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"]


@pytest.fixture
def no_host_reads(monkeypatch):
    """Within the context, any read of a tensor's value on the host (and any tensor built from host data,
    a host-to-device copy on an accelerator) raises."""
    from contextlib import contextmanager

    @contextmanager
    def forbidden():
        with monkeypatch.context() as m:
            for attr in _SYNCS:
                def boom(*args, _attr=attr, **kwargs):
                    raise AssertionError(f"host sync: Tensor.{_attr}")
                m.setattr(torch.Tensor, attr, boom)
            m.setattr(torch, "tensor", lambda *a, **k: (_ for _ in ()).throw(AssertionError("host sync: torch.tensor")))
            yield
    return forbidden


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("case", CASES)
def test_no_host_read_during_step(case, nonfinite, no_host_reads):
    """Every preset and variant, finite and non-finite gradients (first step, later steps)."""
    name, flags = CASES[case]
    model = Net()
    opt = largebatch.create_optimizer(name, model, **{"lr": 0.02, **flags, **FOREACH, "nonfinite": nonfinite,
                                                      "sync_free": True})
    gen = torch.Generator().manual_seed(1)
    for k in range(4):
        _grads(model, gen, k, INF if k in (0, 2) else None)
        with no_host_reads():
            opt.step()
    assert opt.skipped_steps == (2 if nonfinite == "skip" else 0)
    if nonfinite == "skip":
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_check_can_fail_on_the_host_path(no_host_reads):
    """The ordinary path reads the flag (free on CPU): the patched reads see it, so the test above can fail."""
    model = Net()
    opt = largebatch.Lamb(model.parameters(), **FOREACH, sync_free=False)
    _grads(model, torch.Generator().manual_seed(1), 0)
    with no_host_reads(), pytest.raises(AssertionError, match="host sync"):
        opt.step()


def test_raise_and_a_tensor_lr_are_read_on_the_host_and_still_work(no_host_reads):
    """Documented exceptions: nonfinite='raise' must read the flag to raise; a tensor lr is float()ed."""
    model = Net()
    opt = largebatch.Lamb(largebatch.param_groups(model), nonfinite="raise", **FOREACH, sync_free=True)
    _grads(model, torch.Generator().manual_seed(1), 0)
    with no_host_reads(), pytest.raises(AssertionError, match="host sync"):
        opt.step()
    before = copy.deepcopy(([p.detach().clone() for p in model.parameters()], _state(opt)))
    model.cube.grad.view(-1)[0] = NAN
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in cube \(nonfinite='raise'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before[0], model.parameters()))
    model.cube.grad.view(-1)[0] = 1.0
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters()) and opt.skipped_steps == 0
    tensor_lr = largebatch.Lars(model.parameters(), lr=torch.tensor(0.1), **FOREACH, sync_free=True)
    tensor_lr.step()
    assert tensor_lr.state[model.cube]["step"].item() == 1.0


# ------------------------------------------------------------------ skip semantics
@pytest.mark.parametrize("case", CASES)
def test_a_skipped_step_leaves_everything_bit_for_bit_and_the_run_continues_as_if_it_never_came(case):
    name, flags = CASES[case]
    model = Net()
    opt = largebatch.create_optimizer(name, model, **{"lr": 0.02, **flags, **FOREACH, "sync_free": True})
    gen = torch.Generator().manual_seed(1)
    for k in range(2):
        _grads(model, gen, k)
        opt.step()
    rows = opt.telemetry()
    before = copy.deepcopy(([p.detach().clone() for p in model.parameters()], _state(opt)))
    _grads(model, torch.Generator().manual_seed(5), 2, NAN)
    opt.step()
    assert all(_bitwise(p, q.detach()) for p, q in zip(before[0], model.parameters()))
    assert all(_bitwise(before[1][k], v) for k, v in _state(opt).items())
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert _hex([opt.telemetry()]) == _hex([rows])  # the skipped step's rows are the previous ones
    # and then the run continues exactly like one that never saw the bad gradient
    clean = _run(case, torch.float32, steps=4, sync_free=True)
    skipped = _run(case, torch.float32, steps=5, bad_steps=(1,), sync_free=True)
    _assert_same_run((clean[0], clean[1], clean[2]), (skipped[0], skipped[1], skipped[2][:1] + skipped[2][2:]))
    assert skipped[1].skipped_steps == 1 and not skipped[1].last_step_skipped


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_the_issues_example_on_the_sync_free_path(cls):
    """p = [3, 4, .5, .5], grad [nan, 1, 1, 1], then three steps of ones: three clean steps; the first step
    skipped creates the zero state, which changes nothing."""
    def run(first):
        p = nn.Parameter(torch.tensor([3.0, 4.0, 0.5, 0.5]))
        opt = cls([p], lr=0.1, **FOREACH, sync_free=True)
        for g in ([first] if first is not None else []) + [torch.ones(4)] * 3:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt

    skipped, opt = run(torch.tensor([NAN, 1.0, 1.0, 1.0]))
    clean, _ = run(None)
    assert torch.equal(skipped, clean) and opt.skipped_steps == 1


@pytest.mark.parametrize("preset", ["nvlamb", "timm", "authors_resnet", "larc"])
def test_with_max_grad_norm_one_nan_skips_instead_of_turning_everything_nan(preset):
    def run(policy):
        model = Net()
        opt = largebatch.create_optimizer(preset, model, nonfinite=policy, max_grad_norm=1.0, **FOREACH,
                                          sync_free=True)
        for k in range(3):
            _grads(model, torch.Generator().manual_seed(k), k, NAN if k == 1 else None)
            opt.step()
        return [p.detach() for p in model.parameters()]

    assert all(torch.isfinite(p).all() for p in run("skip"))
    assert all(torch.isnan(p).all() for p in run("propagate"))


def test_propagate_on_the_sync_free_path_is_the_foreach_paths_propagate():
    _assert_same_run(_run("paper", torch.float32, bad_steps=(2,), nonfinite="propagate", sync_free=False),
                     _run("paper", torch.float32, bad_steps=(2,), nonfinite="propagate", sync_free=True))


def test_sharded_parameters_skip_on_the_sync_free_path():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        start = torch.tensor([[3.0, 4.0], [0.5, 0.5]])
        for cls in (largebatch.Lamb, largebatch.Lars):
            p = nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
            opt = cls([p], lr=0.1, sync_free=True)
            p.grad = distribute_tensor(torch.tensor([[NAN, 1.0], [1.0, 1.0]]), mesh, [Shard(0)])
            opt.step()
            assert opt.skipped_steps == 1 and torch.equal(p.to_local(), start)
            p.grad = distribute_tensor(torch.ones(2, 2), mesh, [Shard(0)])
            opt.step()
            plain = nn.Parameter(start.clone())
            ref = cls([plain], lr=0.1, **FOREACH)
            plain.grad = torch.ones(2, 2)
            ref.step()
            assert torch.equal(p.to_local(), plain.detach())
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ counts, state_dict, validation
def test_the_count_is_an_int_in_the_state_dict_and_survives_copies_and_old_checkpoints_load():
    model, opt, _ = _run("paper", torch.float32, steps=4, bad_steps=(1, 2), sync_free=True)
    assert opt._skipped_on_device is not None  # kept on the device until asked
    sd = opt.state_dict()
    assert type(sd["param_groups"][0]["skipped_steps"]) is int and sd["param_groups"][0]["skipped_steps"] == 2
    assert copy.deepcopy(opt).skipped_steps == 2 and pickle.loads(pickle.dumps(opt)).skipped_steps == 2
    fresh_model = Net()
    fresh = largebatch.Lamb(largebatch.param_groups(fresh_model), **FOREACH, sync_free=True)
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 2
    on_host = largebatch.Lamb(largebatch.param_groups(Net()))  # sync_free is this optimizer's, not the writer's
    on_host.load_state_dict(sd)
    assert on_host.skipped_steps == 2 and on_host.param_groups[0]["sync_free"] is None
    # a checkpoint of the host path, with python-number counters, continues on the sync-free path exactly
    host_model, host, _ = _run("paper", torch.float32, steps=3, sync_free=False)
    old = copy.deepcopy(host.state_dict())
    for s in old["state"].values():
        s["step"] = int(s["step"])
    for g in old["param_groups"]:  # written before sync_free existed
        del g["sync_free"]
    resumed_model, ref_model = copy.deepcopy(host_model), copy.deepcopy(host_model)
    resumed = largebatch.create_optimizer("paper", resumed_model, lr=0.02, **FOREACH, sync_free=True)
    resumed.load_state_dict(old)
    ref = largebatch.create_optimizer("paper", ref_model, lr=0.02, **FOREACH, sync_free=False)
    ref.load_state_dict(copy.deepcopy(old))
    gen1, gen2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for k in range(2):
        _grads(resumed_model, gen1, k + 3)
        _grads(ref_model, gen2, k + 3)
        resumed.step()
        ref.step()
    _assert_same_run((resumed_model, resumed, []), (ref_model, ref, []))


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_sync_free_is_validated(cls):
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"Invalid sync_free: 'yes' \(allowed: None \| True \| False\)"):
        cls([p], sync_free="yes")
    for bad in (dict(fused=True), dict(foreach=False)):
        with pytest.raises(ValueError, match=r"Invalid sync_free: True \(allowed: None or False with fused=True"):
            cls([p], sync_free=True, **bad)
    with pytest.raises(ValueError, match=r"Invalid sync_free: True \(allowed: only the optimizer-wide value None"):
        cls([{"params": [p], "sync_free": True}])


@pytest.mark.parametrize("cls", [largebatch.Lamb, largebatch.Lars])
def test_on_cpu_the_default_is_the_host_path_and_the_kernel_is_untouched(cls):
    p = nn.Parameter(torch.ones(3))
    opt = cls([p])
    p.grad = torch.ones(3)
    opt.step()
    assert opt._resolve_sync_free() is False and opt.state[p]["step"].device.type == "cpu"
    assert opt._skipped_on_device is None


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("case", CASES)
def test_on_a_device_without_data_the_default_step_is_the_sync_free_one(case, nonfinite):
    """The meta device stands in for an accelerator: its tensors have no values, so any read on the host
    raises. With the defaults (sync_free=None) every preset and variant steps there; the host path cannot."""
    name, flags = CASES[case]
    model = Net().to("meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt = largebatch.create_optimizer(name, model, **{"lr": 0.02, **flags, "nonfinite": nonfinite})
    for _ in range(2):
        opt.step()
    assert all(s["step"].device.type == "meta" for s in opt.state.values())
    host = largebatch.create_optimizer(name, model, **{"lr": 0.02, **flags, "nonfinite": nonfinite,
                                                       "sync_free": False})
    if nonfinite == "skip":  # the host path reads the finite flag
        with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
            host.step()
