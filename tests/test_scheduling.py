"""What the trainer does to an optimizer: phase-boundary state policies and the LR of a step."""
import pytest
import torch

from largebatch.schedules import warmup_poly_decay
from largebatch.train.scheduling import ScheduledLR, reset_optimizer_state


def test_reset_optimizer_state_modes():
    import largebatch

    p = torch.nn.Parameter(torch.ones(3))
    opt = largebatch.Lamb([p])
    p.grad = torch.ones(3)
    opt.step()
    reset_optimizer_state(opt, "reset_step")
    assert opt.state[p]["step"].item() == 0 and opt.state[p]["exp_avg"].abs().sum() > 0
    reset_optimizer_state(opt, "reset")
    assert opt.state[p]["exp_avg"].abs().sum() == 0


def test_reset_moments_keeps_the_step_counter():
    import largebatch

    p = torch.nn.Parameter(torch.ones(3))
    opt = largebatch.Lamb([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.step()
    reset_optimizer_state(opt, "reset_moments")
    assert opt.state[p]["step"].item() == 2
    assert opt.state[p]["exp_avg"].abs().sum() == 0 and opt.state[p]["exp_avg_sq"].abs().sum() == 0
    with pytest.raises(ValueError, match="mode"):
        reset_optimizer_state(opt, "forget")


def test_scheduled_lr_drives_any_optimizer_and_keeps_group_multipliers():
    w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [b], "lr_scale": 0.1}], lr=123.0)
    sched = ScheduledLR(opt, lambda t: warmup_poly_decay(t, peak_lr=1.0, warmup_steps=2, total_steps=6))
    assert sched.apply(3) == pytest.approx(0.75)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.75, 0.075])
    # no hidden counter: jumping to any step (a resume) gives that step's LR
    assert sched.apply(0) == pytest.approx(0.5) and opt.param_groups[1]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr from the schedule"):
        ScheduledLR(opt, lambda t: float("nan")).apply(0)
