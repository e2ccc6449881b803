"""largebatch.step_in_backward: the same parameters, state and telemetry as the ordinary step, bit for bit."""
import copy

import pytest
import torch
from torch import nn

import largebatch
from largebatch.optim.presets import PRESETS

ALLOWED = [n for n, p in PRESETS.items() if p.options.get("max_grad_norm") is None]
RAISE = {"nonfinite": "raise"}  # the optimizers' default, "skip", needs every gradient first: refused
REFUSED = [n for n in PRESETS if n not in ALLOWED]


class TiedLM(nn.Module):
    """Embedding tied to the output layer (used twice in one graph, like BERT's), LayerNorm, biases."""

    def __init__(self, vocab=50, hidden=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden),
                                  nn.LayerNorm(hidden))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids):
        return self.body(self.embed(ids)) @ self.embed.weight.t() + self.bias


def micro_batches(step, n=2):
    gen = torch.Generator().manual_seed(step)
    return [torch.randint(0, 50, (3, 5), generator=gen) for _ in range(n)]


def loss_of(model, ids):
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def run(model, opt, steps, handle=None, dtype=torch.float32):
    for step in range(steps):
        micro = micro_batches(step)
        for i, ids in enumerate(micro):
            last = i == len(micro) - 1
            ctx = handle.accumulating() if handle is not None and not last else torch.enable_grad()
            with ctx:
                loss_of(model, ids).backward()
        if handle is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            assert all(p.grad is None for p in model.parameters()), "a gradient was kept"


def assert_same(m1, o1, m2, o2):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), name
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for k, st in s1["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][key])), (k, key)
    assert o1.telemetry() == o2.telemetry()


def pair(preset, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    m1 = TiedLM().to(dtype)
    m2 = copy.deepcopy(m1)
    lr = 0.5 if "lars" in preset or preset == "larc" else 1e-2
    kw = {"master_weights": True} if dtype == torch.bfloat16 else {}
    o1 = largebatch.create_optimizer(preset, m1, lr=lr, **kw, **overrides)
    o2 = largebatch.create_optimizer(preset, m2, lr=lr, **kw, **RAISE, **overrides)
    return m1, o1, m2, o2


#: bucket sizes: one tensor per step_params call, a tiny bucket (1 byte: stepped as soon as one is ready), a
#: few tensors per bucket (the TiedLM's gradients are 100 B to 4.8 KB), all at the end of the pass (default)
BUCKETS = [0, 1, 2000, largebatch.optim.backward.DEFAULT_BUCKET_BYTES]


@pytest.mark.parametrize("bucket_bytes", BUCKETS)
@pytest.mark.parametrize("preset", ALLOWED)
def test_bit_identical_to_the_ordinary_step_on_the_kernel_path(preset, bucket_bytes):
    from largebatch.optim import kernel

    if not kernel.available():
        pytest.skip(f"the C kernel is unavailable here: {kernel.unavailable_reason()}")
    m1, o1, m2, o2 = pair(preset)
    handle = largebatch.step_in_backward(m2, o2, bucket_bytes=bucket_bytes)
    run(m1, o1, 3)
    run(m2, o2, 3, handle)
    assert_same(m1, o1, m2, o2)


@pytest.mark.parametrize("bucket_bytes", [0, 1000, largebatch.optim.backward.DEFAULT_BUCKET_BYTES])
@pytest.mark.parametrize("preset", ["paper", "lars_paper"])
def test_bit_identical_with_bf16_master_weights(preset, bucket_bytes):
    m1, o1, m2, o2 = pair(preset, torch.bfloat16)
    handle = largebatch.step_in_backward(m2, o2, bucket_bytes=bucket_bytes)
    run(m1, o1, 3)
    run(m2, o2, 3, handle)
    assert_same(m1, o1, m2, o2)


def test_remove_restores_the_ordinary_step_and_state_dict_round_trips():
    m1, o1, m2, o2 = pair("paper")
    handle = largebatch.step_in_backward(m2, o2)
    run(m1, o1, 2)
    run(m2, o2, 2, handle)
    handle.remove()
    assert not handle.active
    loss_of(m2, micro_batches(9)[0]).backward()
    assert all(p.grad is not None for p in m2.parameters())  # kept: nothing stepped
    before = [p.clone() for p in m2.parameters()]
    o2.zero_grad()
    # a fresh optimizer loaded from the state_dict continues exactly like the original
    o3 = largebatch.create_optimizer("paper", m2, lr=1e-2, **RAISE)
    o3.load_state_dict(o2.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))
    run(m1, o1, 1)
    run(m2, o3, 1)
    assert_same(m1, o1, m2, o3)


@pytest.mark.parametrize("preset", REFUSED)
def test_global_gradient_norm_presets_are_refused(preset):
    model = TiedLM()
    with pytest.raises(ValueError, match="max_grad_norm"):
        largebatch.step_in_backward(model, largebatch.create_optimizer(preset, model, lr=1e-3, **RAISE))


def test_other_optimizers_are_refused():
    model = TiedLM()
    with pytest.raises(TypeError, match="step_params"):
        largebatch.step_in_backward(model, torch.optim.AdamW(model.parameters()))


def test_step_params_refuses_max_grad_norm_and_the_nonfinite_skip():
    model = TiedLM()
    with pytest.raises(ValueError, match="max_grad_norm"):
        largebatch.Lamb(model.parameters(), max_grad_norm=1.0, **RAISE).step_params(list(model.parameters()))
    with pytest.raises(ValueError, match="nonfinite"):
        largebatch.step_in_backward(model, largebatch.Lamb(model.parameters()))  # nonfinite="skip" by default


def test_ddp_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(TiedLM())
        with pytest.raises(ValueError, match="DistributedDataParallel"):
            largebatch.step_in_backward(model, largebatch.Lamb(model.parameters(), **RAISE))
    finally:
        dist.destroy_process_group()


def test_nonfinite_raise_names_the_parameter_before_stepping_it():
    model = TiedLM()
    opt = largebatch.Lamb(largebatch.param_groups(model, weight_decay=0.01), **RAISE)
    handle = largebatch.step_in_backward(model, opt)
    model.bias.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="bias"):
        loss_of(model, micro_batches(0)[0]).backward()
    handle.remove()


def _spy_step_params(opt, monkeypatch):
    """Record each step_params call's tensors and whether each had its gradient when stepped."""
    calls, real = [], opt.step_params

    def spy(params):
        calls.append([p.grad is not None for p in params])
        real(params)

    monkeypatch.setattr(opt, "step_params", spy)
    return calls


@pytest.mark.parametrize("bucket_bytes, expect", [(0, "one per tensor"), (1, "one per tensor"),
                                                  (2000, "several"), (None, "one")])
def test_buckets_step_several_tensors_per_call_and_each_tensor_once(bucket_bytes, expect, monkeypatch):
    m1, o1, m2, o2 = pair("paper")
    kw = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
    handle = largebatch.step_in_backward(m2, o2, **kw)
    calls = _spy_step_params(o2, monkeypatch)
    run(m2, o2, 1, handle)
    n = len(list(m2.parameters()))
    assert sum(len(c) for c in calls) == n and all(all(c) for c in calls)  # every tensor once, with its gradient
    assert {"one per tensor": len(calls) == n, "several": 1 < len(calls) < n, "one": len(calls) == 1}[expect]


def test_bucket_bytes_is_validated():
    model = TiedLM()
    opt = largebatch.Lamb(model.parameters(), **RAISE)
    with pytest.raises(ValueError, match="bucket_bytes"):
        largebatch.step_in_backward(model, opt, bucket_bytes=-1)
    for bad in (1.5, True, "25MB"):
        with pytest.raises(TypeError, match="bucket_bytes"):
            largebatch.step_in_backward(model, opt, bucket_bytes=bad)


@pytest.mark.parametrize("failure", ["nonfinite in the last bucket", "nonfinite in a full bucket",
                                     "another hook raises"])
def test_a_backward_pass_that_raises_leaves_no_stale_bucket(failure):
    """The failed pass's pending tensors are not stepped and their gradients are dropped: the next pass is
    the ordinary step's, bit for bit (as if the failed pass had not run)."""
    m1, o1, m2, o2 = pair("paper")
    handle = largebatch.step_in_backward(m2, o2, bucket_bytes=1 if "full" in failure else 10**9)
    before = [p.detach().clone() for p in m2.parameters()]
    if failure == "another hook raises":  # late in the pass: the body's and the bias's tensors are pending
        hook = m2.body[0].register_forward_hook(lambda mod, inp, out: _raise_in_backward(out))
        expected = RuntimeError
    else:  # bias: the first gradient to be complete (the output layer)
        hook = m2.bias.register_hook(lambda g: g * float("nan"))
        expected = FloatingPointError
    with pytest.raises(expected):
        loss_of(m2, micro_batches(0)[0]).backward()
    hook.remove()
    assert all(p.grad is None for p in m2.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))  # the bias is stepped first
    run(m1, o1, 2)
    run(m2, o2, 2, handle)
    assert_same(m1, o1, m2, o2)


def _raise_in_backward(out):
    def boom(grad):
        raise RuntimeError("boom")

    out.register_hook(boom)


def _train_config(tmp_path, name, **kw):
    from largebatch.train.loop import TrainConfig

    return TrainConfig(task="mlm", batch_size=32, micro_batch_size=16, steps=3, warmup_steps=1, progress=False,
                       plot=False, out=str(tmp_path / name), threads=1, nonfinite="raise", checkpoint_every=1,
                       keep_checkpoints=3,
                       task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                                         limit_train_sequences=64, max_eval_sequences=32, dropout=0.0), **kw)


def _final_state(run_dir):
    from largebatch.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir)
    return ckpt["model"], ckpt["optimizer"]["state"]


def test_train_step_in_backward_matches_the_ordinary_run_and_resumes_exactly(tmp_path, monkeypatch):
    """`largebatch train --step-in-backward`: accumulation over 2 micro-batches, LR schedule, checkpoints."""
    import json

    from largebatch.train.loop import train

    from largebatch.tasks import build_task

    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    cfg = _train_config(tmp_path, "ordinary")
    task = build_task("mlm", seed=cfg.seed, **cfg.task_options)  # built once (tokenizer, encoding): copies below
    ordinary = train(cfg, task=copy.deepcopy(task))
    fused = train(_train_config(tmp_path, "fused", step_in_backward=True), task=copy.deepcopy(task))
    train(_train_config(tmp_path, "resumed", step_in_backward=True), task=copy.deepcopy(task),
          resume=str(tmp_path / "fused" / "ckpt-00000002.pt"))
    for other in ("fused", "resumed"):
        (m1, s1), (m2, s2) = _final_state(tmp_path / "ordinary"), _final_state(tmp_path / other)
        assert all(torch.equal(m1[k], m2[k]) for k in m1), other
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(s2[i][key]))
                   for i, st in s1.items() for key, v in st.items()), other
    assert ordinary["test_loss"] == fused["test_loss"]
    logs = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("ordinary", "fused")]
    for a, b in zip(*logs):  # same losses and LRs at every step; the same ratios, summed in another order
        assert (a["loss"], a["lr"], a["trust_ratio_min"]) == (b["loss"], b["lr"], b["trust_ratio_min"])
        assert a["trust_ratio_mean"] == pytest.approx(b["trust_ratio_mean"], rel=1e-14)


def test_train_step_in_backward_refusals_name_the_option(tmp_path):
    from largebatch.train.loop import TrainConfig

    for kw, needle in (({"nonfinite": "skip"}, "nonfinite"), ({"precision": "fp16"}, "precision"),
                       ({"optimizer": "adamw"}, "optimizer")):
        with pytest.raises(ValueError, match=needle):
            TrainConfig(step_in_backward=True, **{"nonfinite": "raise", **kw})


def test_step_params_finds_tensors_without_scanning_and_refuses_strangers():
    """step_params steps exactly the given tensors, from an index that follows changes of param_groups, and
    refuses a tensor that is not one of the optimizer's parameters (it would otherwise be silently skipped)."""
    import largebatch

    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    opt = largebatch.Lamb([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, nonfinite="raise")
    twin = largebatch.Lamb([{"params": [a.detach().clone().requires_grad_()]},
                            {"params": [b.detach().clone().requires_grad_()], "weight_decay": 0.0}],
                           lr=0.1, nonfinite="raise")
    for p, q in zip((a, b), (twin.param_groups[0]["params"][0], twin.param_groups[1]["params"][0])):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step_params([b])
    opt.step_params([a])
    twin.step()
    assert torch.equal(a, twin.param_groups[0]["params"][0]) and torch.equal(b, twin.param_groups[1]["params"][0])
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.step_params([c])
    opt.add_param_group({"params": [c]})  # the index is rebuilt
    c.grad = torch.ones_like(c)
    before = c.detach().clone()
    opt.step_params([c])
    assert not torch.equal(c, before)
