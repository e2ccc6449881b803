
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from largebatch import schedules as S


def test_warmup_poly_decay_explicit_values():
    lrs = [S.warmup_poly_decay(t, peak_lr=1.0, warmup_steps=2, total_steps=6) for t in range(8)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_poly_power_and_end_lr():
    lr = S.warmup_poly_decay(3, peak_lr=1.0, warmup_steps=0, total_steps=4, power=0.5, end_lr=0.1)
    assert lr == pytest.approx(0.1 + 0.9 * (1 - 3 / 4) ** 0.5)
    assert S.warmup_poly_decay(0, peak_lr=2.0, warmup_steps=0, total_steps=5) == 2.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=-1, peak_lr=1, warmup_steps=0, total_steps=3), "step"),
    (dict(step=0, peak_lr=1, warmup_steps=5, total_steps=3), "warmup_steps"),
    (dict(step=0, peak_lr=1, warmup_steps=0, total_steps=0), "total_steps"),
    (dict(step=0, peak_lr=1, warmup_steps=0, total_steps=3, power=0), "power"),
])
def test_degenerate_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.warmup_poly_decay(**kwargs)


def test_constant_with_warmup():
    assert [S.constant(t, peak_lr=0.4, warmup_steps=4) for t in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_scaling_rules_and_paper_numbers():
    # BERT-Large: 5e-3 at 32768 -> 6.25e-4 at 512 under the sqrt rule (docs/training.md, "The run plan")
    assert S.scale_lr(5e-3, 32768, 512, "sqrt") == pytest.approx(6.25e-4)
    assert S.scale_lr(0.1, 256, 1024, "linear") == pytest.approx(0.4)
    assert S.scale_lr(0.1, 256, 1024, "none") == 0.1
    with pytest.raises(ValueError, match="rule"):
        S.scale_lr(0.1, 256, 1024, "cubic")
    with pytest.raises(ValueError, match="batch"):
        S.scale_lr(0.1, 0, 1024)


def test_untuned_scaling_fixed_epochs():
    """The paper's untuned rule: sqrt LR scaling at a fixed epoch budget (fewer steps at a bigger batch)."""
    assert S.steps_for_epochs(2, 1000, 16) == 125 and S.steps_for_epochs(2, 1000, 1024) == 2  # ceil(2·1000/1024)
    assert S.scale_lr(1e-3, 16, 1024) == pytest.approx(8e-3) and S.scale_lr(1e-3, 16, 64, "linear") == pytest.approx(4e-3)
    assert S.steps_for_epochs(1, 1_000_000 * 512, 32768) == 1_000_000 * 512 // 32768


def test_multi_phase_rewarms_and_switches():
    phases = [S.Phase(steps=4, batch_size=64, peak_lr=1.0, warmup_steps=2, seq_len=32),
              S.Phase(steps=2, batch_size=32, peak_lr=0.5, warmup_steps=1, seq_len=64, optimizer_state="reset_step")]
    assert [S.phase_at(phases, t) for t in (0, 3, 4, 5, 9)] == [(0, 0), (0, 3), (1, 0), (1, 1), (1, 5)]
    lrs = [S.multi_phase_lr(phases, t) for t in range(6)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5, 0.5])  # phase 2 warms up from 0 again
    with pytest.raises(ValueError, match="warmup_steps"):
        S.Phase(steps=2, batch_size=8, peak_lr=1.0, warmup_steps=3)
    with pytest.raises(ValueError, match="optimizer_state"):
        S.Phase(steps=2, batch_size=8, peak_lr=1.0, warmup_steps=0, optimizer_state="forget")


def test_each_phase_follows_its_own_schedule():
    phases = [S.Phase(steps=3, batch_size=8, peak_lr=1.0, warmup_steps=1, schedule="constant"),
              S.Phase(steps=3, batch_size=8, peak_lr=0.6, warmup_steps=0)]
    assert [S.multi_phase_lr(phases, t) for t in range(7)] == pytest.approx([1.0, 1.0, 1.0, 0.6, 0.4, 0.2, 0.0])
    with pytest.raises(ValueError, match="schedule"):
        S.Phase(steps=2, batch_size=8, peak_lr=1.0, warmup_steps=0, schedule="cosine")


@settings(max_examples=60, deadline=None)
@given(peak=st.floats(1e-5, 10), end_frac=st.floats(0, 1), warmup=st.integers(0, 50), extra=st.integers(1, 200),
       power=st.floats(0.1, 3))
def test_poly_schedule_properties(peak, end_frac, warmup, extra, power):
    total = warmup + extra
    end = peak * end_frac
    lrs = [S.warmup_poly_decay(t, peak_lr=peak, warmup_steps=warmup, total_steps=total, power=power, end_lr=end)
           for t in range(total + 3)]
    assert all(0 < lr <= peak * (1 + 1e-12) for lr in lrs[:warmup])           # warmup never starts at 0
    assert all(a <= b * (1 + 1e-12) for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))   # warmup rises
    decay = lrs[warmup:]
    assert decay[0] == pytest.approx(peak)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(decay, decay[1:]))       # decay never rises
    assert all(lr == pytest.approx(end) for lr in lrs[total:])
