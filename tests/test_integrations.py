"""Tiny, real runs of largebatch's optimizers inside the stacks people train with (docs/integrations.md),
and the fixes for what users hit there. Each stack's test skips, naming the package to install, when the
package is missing (``bash scripts/install.sh test`` installs them all: requirements/integrations.txt)."""
from __future__ import annotations

import functools
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import largebatch
from largebatch.schedules import LRSchedulerAdapter, warmup_poly_decay

INSTALL = "bash scripts/install.sh test (requirements/integrations.txt)"


def _need(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed; {INSTALL}")


class TinyNet(nn.Module):
    """A regression net whose forward takes the batch as keyword arguments and returns the loss, the
    shape HF Trainer expects; the other stacks call it the same way."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.head(self.body(x)).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def _rows(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 6, generator=g)
    ys = xs.sum(1).tanh()
    return [{"x": x, "labels": y} for x, y in zip(xs, ys)]


def _net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _schedule(total: int = 6, warmup: int = 2):
    return functools.partial(warmup_poly_decay, peak_lr=0.02, warmup_steps=warmup, total_steps=total)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------- fixes
@pytest.mark.parametrize("make", [lambda g: largebatch.Lamb(g, lr=1e-2), lambda g: largebatch.Lars(g, lr=1e-2)],
                         ids=["lamb", "lars"])
def test_a_group_added_without_names_beside_named_groups(make):
    """torch refuses to mix named and unnamed groups; param_groups() names its groups."""
    net = _net()
    net.head.requires_grad_(False)
    opt = make(largebatch.param_groups(net))
    net.head.requires_grad_(True)
    opt.add_param_group({"params": net.head.parameters(), "lr": 1e-3})  # a generator, as libraries pass
    assert opt.param_groups[-1]["param_names"] == [f"group{len(opt.param_groups) - 1}.0",
                                                   f"group{len(opt.param_groups) - 1}.1"]
    net(**{k: torch.stack([r[k] for r in _rows(4)]) for k in ("x", "labels")})["loss"].backward()
    before = net.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, net.head.weight)
    assert "group2.0" in opt.telemetry() and "body.0.weight" in opt.telemetry()
    torch.optim.Adam(net.parameters()).state_dict()  # unrelated optimizers are untouched


def test_a_named_group_added_beside_unnamed_groups():
    net = _net()
    opt = largebatch.Lamb(net.body.parameters(), lr=1e-2)
    opt.add_param_group({"params": list(net.head.named_parameters())})
    assert opt.param_groups[0]["param_names"][0] == "group0.0"
    assert opt.param_groups[1]["param_names"] == ["weight", "bias"]


def test_param_groups_honour_model_no_weight_decay():
    """timm's convention: a ViT declares pos_embed / cls_token decay-free (3-D tensors, so the 1-D rule
    misses them); timm's create_optimizer reads model.no_weight_decay() as fnmatch patterns."""

    class ViTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
            self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            self.blocks[1].rel_pos = nn.Parameter(torch.randn(3, 3))

        def no_weight_decay(self):
            return {"pos_embed", "cls_token", "blocks.*.rel_pos"}

    def decay_of(groups):
        return {n: g["weight_decay"] for g in groups for n in g["param_names"]}

    model = ViTish()
    wd = decay_of(largebatch.create_optimizer("timm", model).param_groups)
    assert wd == {"pos_embed": 0.0, "cls_token": 0.0, "blocks.1.rel_pos": 0.0, "blocks.0.weight": 0.01,
                  "blocks.1.weight": 0.01, "blocks.0.bias": 0.0, "blocks.1.bias": 0.0}
    assert decay_of(largebatch.param_groups(torch.compile(model)))["pos_embed"] == 0.0  # the wrapper forwards it
    off = decay_of(largebatch.param_groups(model, model_no_weight_decay=False))
    assert off["pos_embed"] == off["cls_token"] == 0.01
    with pytest.raises(TypeError, match=r"Invalid model_no_weight_decay: 'no' \(allowed: True \| False\)"):
        largebatch.param_groups(model, model_no_weight_decay="no")
    model.no_weight_decay = lambda: 5
    with pytest.raises(TypeError, match=r"Invalid model.no_weight_decay\(\): 5 \(allowed: a set or list"):
        largebatch.param_groups(model)


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True), dict(fused=None)],
                         ids=["single_tensor", "foreach", "auto"])
def test_larc_at_lr_zero_and_its_reload(impl):
    """LARC's clip min(local/η, 1) is 1 at η = 0 (its limit): the momentum takes the unscaled direction,
    the weights do not move; a state saved at lr 0 (end of a decay) loads."""
    torch.manual_seed(0)
    x = nn.Parameter(torch.randn(4, 3))
    opt = largebatch.create_optimizer("larc", [x], lr=0.0, **impl)
    x.grad = torch.randn(4, 3)
    start = x.detach().clone()
    opt.step()
    assert torch.equal(x, start)
    buf = opt.state[x]["momentum_buffer"]
    assert torch.allclose(buf, x.grad + 5e-4 * start, rtol=0, atol=1e-7)
    saved = opt.state_dict()
    fresh = largebatch.create_optimizer("larc", [x], lr=0.1, **impl)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.0
    fresh.param_groups[0]["lr"] = 0.05
    fresh.step()
    assert not torch.equal(x, start) and torch.isfinite(x).all()


def test_subpackages_are_reachable_lazily():
    code = ("import sys, largebatch\n"
            "assert 'largebatch.schedules' not in sys.modules and 'transformers' not in sys.modules\n"
            "assert largebatch.schedules.constant(0, peak_lr=1.0) == 1.0\n"
            "assert {'schedules', 'train', 'study'} <= set(dir(largebatch))\n"
            "assert 'transformers' not in sys.modules\n"
            "try:\n    largebatch.nope\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "module 'largebatch' has no attribute 'nope'"


# ---------------------------------------------------------------------------------------- LR schedulers
def test_lr_scheduler_adapter_follows_the_schedule_and_resumes():
    schedule = _schedule(total=6, warmup=2)
    net = _net()
    groups = largebatch.param_groups(net)
    groups[-1]["lr_scale"] = 0.5
    opt = largebatch.Lamb(groups, lr=1.0)
    sched = LRSchedulerAdapter(opt, schedule)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [s[0] for s in seen] == [schedule(t) for t in range(4)]
    assert [s[-1] for s in seen] == [0.5 * schedule(t) for t in range(4)]
    saved = sched.state_dict()
    assert "lr_at" not in saved and saved["last_epoch"] == 4
    opt2 = largebatch.Lamb(largebatch.param_groups(net), lr=1.0)
    resumed = LRSchedulerAdapter(opt2, schedule)
    resumed.load_state_dict(saved)
    resumed.step()
    assert resumed.get_last_lr()[0] == schedule(5)
    with pytest.raises(ValueError, match=r"Invalid lr from the schedule at step 1: -1\.0"):
        LRSchedulerAdapter(opt2, lambda t: 1.0 - t * 2.0).step()
    with pytest.raises(TypeError, match="Invalid lr_at: 0.1"):
        LRSchedulerAdapter(opt2, 0.1)


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=3),
    lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=1),
                                                        torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
                                                    milestones=[1]),
], ids=["cosine", "one_cycle", "sequential"])
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_torch_lr_schedulers_drive_our_optimizers(make_sched, name):
    """OneCycleLR cycles the momentum too: Lamb's betas[0] / Lars' momentum."""
    net = _net()
    opt = largebatch.create_optimizer(name, net, lr=0.05)
    sched = make_sched(opt)
    batch = {k: torch.stack([r[k] for r in _rows(4)]) for k in ("x", "labels")}
    lrs = []
    for _ in range(3):
        opt.zero_grad()
        net(**batch)["loss"].backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) == 3 and all(lr >= 0 for lr in lrs)


def test_swa_and_grad_scaler():
    """SWALR sets the groups' LR like any scheduler; GradScaler.step unscales before our step, so the trust
    ratio sees true gradients: a scaled step equals an unscaled one bit for bit."""
    batch = {k: torch.stack([r[k] for r in _rows(8)]) for k in ("x", "labels")}
    net = _net()
    opt = largebatch.Lamb(largebatch.param_groups(net), lr=0.02)
    swa_model = torch.optim.swa_utils.AveragedModel(net)
    swa_sched = torch.optim.swa_utils.SWALR(opt, swa_lr=0.005, anneal_epochs=2)
    for _ in range(3):
        opt.zero_grad()
        net(**batch)["loss"].backward()
        opt.step()
        swa_model.update_parameters(net)
        swa_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005) and swa_model.n_averaged.item() == 3
    results = []
    for scale in (None, 2.0 ** 10):
        net = _net()
        opt = largebatch.Lamb(largebatch.param_groups(net), lr=0.02)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(net(**batch)["loss"]).backward()
            scaler.step(opt)
            scaler.update()
        results.append(_params(net))
    _assert_same(*results)


# ---------------------------------------------------------------------------------------- torch.compile
@pytest.mark.compile
def test_compile_fullgraph_step_fails_with_our_reason():
    net = _net()
    opt = largebatch.Lamb(largebatch.param_groups(net), lr=1e-2)
    net(**{k: torch.stack([r[k] for r in _rows(4)]) for k in ("x", "labels")})["loss"].backward()
    with pytest.raises(Exception, match="largebatch's Lamb/Lars step\\(\\) runs eagerly") as info:
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    assert "fullgraph" in str(info.value)


@pytest.mark.compile
def test_compiled_train_step_runs_the_optimizer_eagerly():
    """Without fullgraph, a compiled function holding forward, backward and step() breaks the graph at
    step() and gives the eager result bit for bit."""
    batch = {k: torch.stack([r[k] for r in _rows(8)]) for k in ("x", "labels")}
    results = []
    for compiled in (False, True):
        net = _net()
        opt = largebatch.Lamb(largebatch.param_groups(net), lr=1e-2)

        def train_step():
            opt.zero_grad()
            loss = net(**batch)["loss"]
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for _ in range(2):
            fn()
        results.append(_params(net))
    _assert_same(*results)


# ---------------------------------------------------------------------------------------- HF Trainer
def _trainer(tmp_path, model, max_steps, **kwargs):
    transformers = _need("transformers")
    _need("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="steps", save_steps=max_steps, logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, learning_rate=0.02, warmup_steps=2, lr_scheduler_type="linear")
    return transformers.Trainer(model=model, args=args, train_dataset=_rows(), **kwargs)


def test_hf_trainer_with_optimizers_and_resume(tmp_path):
    """Our optimizer and LRSchedulerAdapter through ``optimizers=``; the Trainer's checkpoint (optimizer and
    scheduler state, loaded with weights_only) resumes both at step 3."""
    def run(max_steps, resume=None):
        net = _net()
        opt = largebatch.Lamb(largebatch.param_groups(net), lr=0.02)
        sched = LRSchedulerAdapter(opt, _schedule(total=6))
        _trainer(tmp_path, net, max_steps, optimizers=(opt, sched)).train(resume_from_checkpoint=resume)
        return net, opt, sched

    net, opt, sched = run(3)
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == _schedule(total=6)(3)
    assert all(not torch.equal(a, b) for a, b in zip(_params(_net()), net.parameters()))
    assert set(opt.telemetry()) == {n for n, _ in net.named_parameters()}
    _, resumed, resumed_sched = run(4, resume=str(tmp_path / "checkpoint-3"))
    assert resumed_sched.last_epoch == 4 and resumed.param_groups[0]["lr"] == _schedule(total=6)(4)
    assert all(s["step"].item() == 4 for s in resumed.state.values())


def test_hf_trainer_with_optimizer_cls_and_kwargs_and_resume_at_lr_zero(tmp_path):
    """The Trainer builds its own two groups and a linear warmup from 0 that decays to 0 at max_steps:
    LARC runs its first step at lr 0, and a checkpoint saved at the last step (lr 0) resumes."""
    net = _net()
    trainer = _trainer(tmp_path, net, 3, optimizer_cls_and_kwargs=(largebatch.Lars, dict(
        mode="2017", larc_clip=True, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02)))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      largebatch.Lars)
    resumed = _trainer(tmp_path, net, 4, optimizer_cls_and_kwargs=(largebatch.Lars, dict(
        mode="2017", larc_clip=True, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02)))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_hf_trainer_optimizer_cls_and_kwargs_with_our_groups(tmp_path):
    """A "params" entry in the keyword arguments replaces the Trainer's own two groups."""
    net = _net()
    groups = largebatch.param_groups(net, weight_decay=0.1, no_weight_decay="body.*")
    trainer = _trainer(tmp_path, net, 1, optimizer_cls_and_kwargs=(largebatch.Lamb, {"params": groups}))
    opt = trainer.create_optimizer()
    opt = getattr(opt, "optimizer", opt)
    assert isinstance(opt, largebatch.Lamb)
    assert {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]} == {
        "body.0.weight": 0.0, "body.0.bias": 0.0, "body.1.weight": 0.0, "body.1.bias": 0.0,
        "head.weight": 0.1, "head.bias": 0.0}


# ---------------------------------------------------------------------------------------- accelerate
def _accelerate_run(tmp_path, steps, *, stop_at=None, resume=False):
    accelerate = _need("accelerate")
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # one Accelerator per run inside one process
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = _net()
    opt = largebatch.Lamb(largebatch.param_groups(net), lr=0.02)
    sched = LRSchedulerAdapter(opt, _schedule(total=steps))
    loader = torch.utils.data.DataLoader(_rows(), batch_size=2, shuffle=False)
    net, opt, sched, loader = acc.prepare(net, opt, sched, loader)
    if resume:
        acc.load_state(str(tmp_path / "state"))
    done = 0 if not resume else stop_at
    micro = 0
    while done < steps:
        for batch in loader:
            micro += 1
            if resume and micro <= 2 * stop_at % len(loader):
                continue  # the micro-batches the first part consumed in this epoch
            with acc.accumulate(net):
                acc.backward(net(**batch)["loss"])
                opt.step()
                sched.step()
                opt.zero_grad()
            if acc.sync_gradients:
                done += 1
                if done == stop_at and not resume:
                    acc.save_state(str(tmp_path / "state"))
                    return net
                if done == steps:
                    break
    return net


def test_accelerate_prepare_accumulate_save_and_load_state(tmp_path):
    """4 optimizer steps straight == 2 steps, save_state, a fresh process-like restart, load_state, 2 steps."""
    straight = _params(_accelerate_run(tmp_path / "a", 4))
    _accelerate_run(tmp_path / "b", 4, stop_at=2)
    resumed = _params(_accelerate_run(tmp_path / "b", 4, stop_at=2, resume=True))
    _assert_same(straight, resumed)
    assert not torch.equal(straight[0], _params(_net())[0])


# ---------------------------------------------------------------------------------------- Lightning
def _lightning():
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return __import__(name, fromlist=["LightningModule"])
        except ImportError:
            continue
    pytest.skip(f"neither lightning nor pytorch-lightning is installed; {INSTALL}")


def _lightning_module(pl, total_steps):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            return self.net(**batch)["loss"]

        def configure_optimizers(self):
            opt = largebatch.Lamb(largebatch.param_groups(self.net), lr=0.02)
            sched = LRSchedulerAdapter(opt, _schedule(total=total_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_rows(), batch_size=4, shuffle=False)

    return Module()


def _lightning_trainer(pl, tmp_path, **kwargs):
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|TPU available).*")
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = opt.state_dict()["state"]
    return [t.clone() for i in sorted(state) for _, t in sorted(state[i].items())]


def test_lightning_configure_optimizers_and_resume(tmp_path):
    """An epoch of 4 steps checkpointed by ModelCheckpoint; a new Trainer with ckpt_path restores our
    optimizer's state and the schedule's step exactly, then trains on. (A straight-vs-resumed comparison
    of the weights fails for Lightning's own reason: after an end-of-epoch checkpoint it ran one more step
    of the finished epoch on a restarted DataLoader, Lightning-AI/pytorch-lightning#19403.)"""
    pl = _lightning()
    first = _lightning_module(pl, 8)
    _lightning_trainer(pl, tmp_path / "a", max_epochs=1).fit(first)
    (ckpt,) = (tmp_path / "a").glob("**/*.ckpt")
    restored = {}

    class Resumed(type(first)):
        def on_train_start(self):
            opt = self.optimizers().optimizer
            restored.update(params=_params(self), state=_state_tensors(opt), lr=opt.param_groups[0]["lr"],
                            step=self.lr_schedulers().last_epoch)

    resumed = Resumed()
    trainer = _lightning_trainer(pl, tmp_path / "b", max_steps=8, enable_checkpointing=False)
    trainer.fit(resumed, ckpt_path=str(ckpt))
    first_opt = first.optimizers().optimizer
    _assert_same(restored["params"], _params(first))
    _assert_same(restored["state"], _state_tensors(first_opt))
    assert restored["step"] == 4 and restored["lr"] == first_opt.param_groups[0]["lr"] == _schedule(total=8)(4)
    assert isinstance(resumed.optimizers().optimizer, largebatch.Lamb) and trainer.global_step == 8
    assert all(not torch.equal(a, b) for a, b in zip(restored["params"], resumed.parameters()))


def test_lightning_base_finetuning_adds_an_unnamed_group(tmp_path):
    """BaseFinetuning freezes the head, then adds it back with ``add_param_group({"params": [...]})``."""
    pl = _lightning()

    class UnfreezeHead(pl.callbacks.BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.net.head)

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.net.head, optimizer, lr=0.01)

    module = _lightning_module(pl, 8)
    head = _params(module.net.head)
    _lightning_trainer(pl, tmp_path, max_epochs=2, enable_checkpointing=False, callbacks=[UnfreezeHead()]).fit(module)
    opt = module.optimizers().optimizer
    assert len(opt.param_groups) == 3 and opt.param_groups[-1]["param_names"] == ["group2.0", "group2.1"]
    assert all(not torch.equal(a, b) for a, b in zip(head, module.net.head.parameters()))
