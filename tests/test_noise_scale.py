"""The gradient noise scale: the estimator against a problem whose noise is known in closed form, and
the same estimate from gradient accumulation, from DDP (2 gloo processes) and from both."""
import contextlib
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from test_distributed import _spawn  # 2 gloo processes, retried on a taken port

from largebatch.tasks.base import Task
from largebatch.train.noise_scale import (NoiseScaleTracker, layer_type_groups, simple_noise_scale, steps_model,
                                          two_batch_estimates)

# linear regression y = x·w* + ε, x ~ N(0, diag(C)), ε ~ N(0, σ²), per-sample loss ½(x·w − y)², at w = w* + δ.
# Per-sample gradient g = x(xᵀδ − ε); by Isserlis' theorem E[g gᵀ] = (δᵀCδ + σ²)·C + 2·Cδ(Cδ)ᵀ, so
#   G = Cδ,  |G|² = |Cδ|²,  tr Σ = (δᵀCδ + σ²)·tr C + |Cδ|².
C_DIAG = torch.tensor([2.0, 1.0, 1.0, 0.5, 0.5, 0.25], dtype=torch.float64)
DELTA = torch.tensor([0.3, -0.2, 0.1, 0.4, 0.0, -0.3], dtype=torch.float64)
SIGMA = 0.5


def true_values():
    c_delta = C_DIAG * DELTA
    grad_sq = float(c_delta.square().sum())
    trace = float((DELTA @ c_delta + SIGMA ** 2) * C_DIAG.sum() + grad_sq)
    return grad_sq, trace


def regression_model():
    model = nn.Linear(len(C_DIAG), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(DELTA)  # w* = 0, so w − w* = δ
    return model


def draw(n, gen):
    x = torch.randn(n, len(C_DIAG), dtype=torch.float64, generator=gen) * C_DIAG.sqrt()
    return x, SIGMA * torch.randn(n, dtype=torch.float64, generator=gen)


def accumulate(model, tracker, micro_batches, total, grad_scale_factor=1.0):
    """Summed loss / total per micro-batch, as the training loop does; tells the tracker each one."""
    for x, y in micro_batches:
        tracker.micro_batch(samples=len(x), grad_scale=grad_scale_factor * len(x) / total)
        loss = 0.5 * (model(x).squeeze(1) - y).square().sum()
        (loss * (grad_scale_factor / total)).backward()


def run_steps(steps, micro_sizes, seed=0, ema=0.95):
    model = regression_model()
    tracker = NoiseScaleTracker(model, ema=ema)
    gen = torch.Generator().manual_seed(seed)
    raw = []
    for _ in range(steps):
        batch = sum(micro_sizes)
        x, y = draw(batch, gen)
        accumulate(model, tracker, list(zip(x.split(micro_sizes), y.split(micro_sizes))), batch)
        tracker.update(batch)
        raw.append([float(v[-1]) for v in tracker.last])
        model.zero_grad(set_to_none=True)
    return torch.tensor(raw, dtype=torch.float64), tracker


def test_two_batch_estimates_are_exact_on_expected_norms():
    """Plugging E|G_B|² = |G|² + tr Σ / B at both sizes returns |G|² and tr Σ exactly (the paper's form)."""
    grad_sq, trace, b_small, b_big = 0.7, 31.0, 8, 96
    expected = [grad_sq + trace / b for b in (b_small, b_big)]
    g, t = two_batch_estimates(expected[0], expected[1], 1 / b_small, 1 / b_big)
    assert g == pytest.approx(grad_sq, rel=1e-12) and t == pytest.approx(trace, rel=1e-12)
    paper_g = (b_big * expected[1] - b_small * expected[0]) / (b_big - b_small)
    paper_t = (expected[0] - expected[1]) / (1 / b_small - 1 / b_big)
    assert (g, t) == pytest.approx((paper_g, paper_t), rel=1e-12)
    assert simple_noise_scale(t, g) == pytest.approx(trace / grad_sq)
    assert simple_noise_scale(5.0, -0.1) is None
    assert steps_model(batch_size=100, min_steps=10, noise_scale=100) == 20


def test_estimates_match_closed_form_linear_regression():
    """4 micro-batches of 4 per step: the mean per-step estimate of |G|², tr Σ and (ratio of means) B_simple
    is within 4 standard errors of the closed form. The standard errors come from the estimator's own
    spread over the 3000 independent steps (delta method for the ratio): a correct estimator fails this
    with probability ~1e-4 per quantity; fixed seeds make the test deterministic."""
    steps = 3000
    raw, _ = run_steps(steps, [4, 4, 4, 4])
    grad_sq, trace = true_values()
    mean = raw.mean(0)
    cov = torch.cov(raw.T)
    se = (cov.diagonal() / steps).sqrt()
    assert abs(mean[0] - grad_sq) < 4 * se[0], (mean, se, grad_sq)
    assert abs(mean[1] - trace) < 4 * se[1], (mean, se, trace)
    ratio = mean[1] / mean[0]
    # Var(T̄/Ḡ) ≈ (Var T − 2R Cov(T, G) + R² Var G) / (n Ḡ²)
    se_ratio = math.sqrt((cov[1, 1] - 2 * ratio * cov[0, 1] + ratio ** 2 * cov[0, 0]) / (steps * mean[0] ** 2))
    assert abs(ratio - trace / grad_sq) < 4 * se_ratio, (ratio, se_ratio, trace / grad_sq)
    assert se_ratio < 0.1 * trace / grad_sq  # the tolerance is tight enough to mean something:
    # the naive estimate (the full-batch norm taken as |G|²) is off by tr Σ / 16, many standard errors
    assert trace / 16 > 10 * se[0]


def test_unequal_micro_batches_and_ema_summary():
    """Micro-batches of unequal size (5, 5, 2) stay unbiased (mean of 1/b_i), and the EMA summary
    (β = 0.99, effective window ~200 steps) is within 4 of its own standard errors of the closed form."""
    steps = 2000
    raw, tracker = run_steps(steps, [5, 5, 2], seed=1, ema=0.99)
    grad_sq, trace = true_values()
    se = (torch.cov(raw.T).diagonal() / steps).sqrt()
    assert abs(raw[:, 0].mean() - grad_sq) < 4 * se[0]
    assert abs(raw[:, 1].mean() - trace) < 4 * se[1]
    s = tracker.summary()
    # an EMA of weight (1 − β) has the variance of a mean of (1 + β)/(1 − β) samples
    window = (1 + 0.99) / (1 - 0.99)
    se_ema = se * math.sqrt(steps / window)
    assert abs(s["grad_sq_norm"] - grad_sq) < 4 * se_ema[0]
    assert abs(s["grad_trace_cov"] - trace) < 4 * se_ema[1]
    assert s["b_simple"] == pytest.approx(s["grad_trace_cov"] / s["grad_sq_norm"])
    assert s["b_simple/Linear"] == pytest.approx(s["b_simple"])
    # the window: plain means of the per-step estimates since the last summary (here: all steps)
    assert s["window_steps"] == steps
    assert (s["window_grad_sq_norm"], s["window_grad_trace_cov"]) == pytest.approx(raw.mean(0).tolist(), rel=1e-9)
    assert "window_steps" not in tracker.summary()  # each summary starts a new window


def test_one_batch_size_says_what_it_needs():
    model = regression_model()
    tracker = NoiseScaleTracker(model)
    x, y = draw(8, torch.Generator().manual_seed(0))
    accumulate(model, tracker, [(x, y)], 8)
    with pytest.raises(ValueError, match="two batch sizes"):
        tracker.update(8)
    assert tracker.summary() == {}


def test_groups_and_bad_input():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 10))
    model[2].weight = model[0].weight  # tied: counted once, under its first owner
    assert layer_type_groups(model) == {"0.weight": "Embedding", "1.weight": "LayerNorm", "1.bias": "LayerNorm",
                                        "2.bias": "Linear"}
    with pytest.raises(ValueError, match="ema"):
        NoiseScaleTracker(model, ema=1.0)
    with pytest.raises(ValueError, match="no group for parameter"):
        NoiseScaleTracker(model, groups={"0.weight": "a"})
    tracker = NoiseScaleTracker(model)
    with pytest.raises(ValueError, match="samples"):
        tracker.micro_batch(samples=0, grad_scale=1.0)
    with pytest.raises(RuntimeError, match="without micro_batch"):
        tracker.update(4)


def test_per_group_estimates_add_up_and_state_round_trips():
    """|G|² and tr Σ are sums over coordinates: the groups' estimates add up to the overall one; the
    tracker's state resumes the moving averages exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 1)).double()
    tracker = NoiseScaleTracker(model, ema=0.9)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    for _ in range(3):
        for xs, ys in zip(x.split(4), y.split(4)):
            tracker.micro_batch(samples=4, grad_scale=4 / 12)
            ((model(xs).squeeze(1) - ys).square().sum() / 12).backward()
        tracker.update(12)
        model.zero_grad()
    grad_sq, trace = tracker.last
    assert float(grad_sq[:-1].sum()) == pytest.approx(float(grad_sq[-1]))
    assert float(trace[:-1].sum()) == pytest.approx(float(trace[-1]))
    other = NoiseScaleTracker(model, ema=0.9)
    other.load_state_dict(tracker.state_dict())
    summary = tracker.summary()
    assert set(summary) == {"b_simple", "grad_sq_norm", "grad_trace_cov", "b_simple/LayerNorm", "b_simple/Linear",
                            "window_steps", "window_grad_sq_norm", "window_grad_trace_cov", "window_b_simple"}
    assert other.summary() == summary
    tracker.close()
    other.close()


# -- the same estimate from accumulation and from DDP ------------------------------------------------

def ddp_worker(rank, world, port, out, micro_per_rank, steps):
    """Each rank takes its contiguous share of every global batch, ``micro_per_rank`` micro-batches of it,
    through DDP (no_sync on all but the last); rank 0 writes the per-step raw estimates and the summary."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = regression_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    tracker = NoiseScaleTracker(model, ema=0.9, distributed=True)
    gen = torch.Generator().manual_seed(0)
    raw = []
    for _ in range(steps):
        x, y = draw(16, gen)  # the same global batch on every rank
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        micro = list(zip(xs.tensor_split(micro_per_rank), ys.tensor_split(micro_per_rank)))
        for i, (mx, my) in enumerate(micro):
            tracker.micro_batch(samples=len(mx), grad_scale=world * len(mx) / 16)  # DDP averages: × world
            with ddp.no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
                (0.5 * (ddp(mx).squeeze(1) - my).square().sum() * (world / 16)).backward()
        tracker.update(16)
        raw.append([float(v[-1]) for v in tracker.last])
        model.zero_grad(set_to_none=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"raw": raw, "summary": tracker.summary()}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("micro_per_rank", [1, 2])
def test_ddp_equals_accumulation_on_the_same_samples(tmp_path, micro_per_rank):
    """2 ranks × k micro-batches of the global batch of 16 give the estimate of 1 process accumulating the
    same 2k micro-batches (per-rank gradients vs the all-reduced one; with k = 2 also local micro-batches)."""
    steps = 6
    out = tmp_path / "ddp.json"
    _spawn(ddp_worker, str(out), micro_per_rank, steps)
    ddp = json.loads(out.read_text())
    size = 16 // (2 * micro_per_rank)
    raw, tracker = run_steps(steps, [size] * (2 * micro_per_rank), ema=0.9)
    torch.testing.assert_close(torch.tensor(ddp["raw"], dtype=torch.float64), raw, rtol=1e-10, atol=1e-12)
    assert ddp["summary"] == pytest.approx(tracker.summary(), rel=1e-10)


def test_plot_noise_scale(tmp_path):
    from largebatch.plots import batch_sizes, plot_noise_scale

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "samples": 16 * s if s <= 4 else 64 + 32 * (s - 4), "loss": 1.0} for s in range(1, 9)]
    recs[3].update({"b_simple": 40.0, "b_simple/Linear": 30.0, "b_simple/LayerNorm": None})
    recs[7].update({"b_simple": 90.0, "b_simple/Linear": 70.0, "b_simple/LayerNorm": 5.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [b for _, b in batch_sizes(recs)] == [16] * 4 + [32] * 4  # a two-phase run's batches
    out = plot_noise_scale([run], tmp_path / "noise.png")
    assert out.stat().st_size > 10_000
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if "b_simple" not in k}) + "\n"
                                               for r in recs))
    with pytest.raises(ValueError, match="--noise-scale"):
        plot_noise_scale([run], tmp_path / "none.png")


# -- in the training loop (`largebatch train --noise-scale`) --------------------------------------------

class GaussianRegression(Task):
    """The closed-form problem above as a training task (a fixed sample of 512 points)."""

    name = "regression"

    def __init__(self, n: int = 512):
        self.x, noise = draw(n, torch.Generator().manual_seed(5))
        self.y = noise  # w* = 0
        self.model = regression_model()
        self.train_size = n

    def batch(self, indices, generator):
        return {"x": self.x[indices], "y": self.y[indices]}

    def loss(self, model, batch):
        return 0.5 * (model(batch["x"]).squeeze(1) - batch["y"]).square().sum(), len(batch["x"])

    @torch.no_grad()
    def evaluate(self, model, split="test"):
        return {"loss": float(0.5 * (model(self.x).squeeze(1) - self.y).square().mean())}


def _train_cfg(out, **kw):  # the task object is passed to train(); the name must be a known task
    from largebatch.train.config import TrainConfig

    return TrainConfig(**{"task": "mlm", "optimizer": "sgd", "lr": 1e-3, "warmup_steps": 0, "batch_size": 32,
                          "micro_batch_size": 8, "steps": 12, "eval_every": 4, "checkpoint_every": 6,
                          "progress": False, "plot": False, "noise_scale": True, "noise_scale_ema": 0.5,
                          "out": str(out), **kw})


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_logs_the_noise_scale_per_evaluation_and_a_resume_continues_it(tmp_path):
    from largebatch.train.loop import train

    train(_train_cfg(tmp_path / "straight", plot=True), task=GaussianRegression())
    recs = _records(tmp_path / "straight")
    measured = [r for r in recs if "b_simple" in r]
    assert [r["step"] for r in measured] == [4, 8, 12]
    assert all(r["window_steps"] == 4 and r["b_simple"] > 0 and r["b_simple/Linear"] == r["b_simple"]
               for r in measured)
    # the lr is small: the weights stay near δ, so the closed form holds roughly (12 steps of 32 samples)
    assert 0.3 < measured[-1]["window_b_simple"] / (true_values()[1] / true_values()[0]) < 3
    assert (tmp_path / "straight" / "noise_scale.png").stat().st_size > 10_000
    train(_train_cfg(tmp_path / "resumed"), task=GaussianRegression(),
          resume=str(tmp_path / "straight" / "ckpt-00000006.pt"))
    resumed = [r for r in _records(tmp_path / "resumed") if "b_simple" in r]
    assert [r["step"] for r in resumed] == [8, 12]
    for a, b in zip(measured[1:], resumed):
        assert {k: v for k, v in a.items() if "b_simple" in k or k.startswith(("window", "grad_"))} == \
               pytest.approx({k: v for k, v in b.items() if "b_simple" in k or k.startswith(("window", "grad_"))},
                             rel=1e-12)


def test_train_without_two_batch_sizes_says_what_it_needs(tmp_path):
    from largebatch.train.config import make_config
    from largebatch.train.loop import train

    with pytest.raises(ValueError, match=r"two batch sizes: use gradient accumulation .*batch_size 32 = "
                                         r"micro_batch_size, 1 process"):
        train(_train_cfg(tmp_path, micro_batch_size=32), task=GaussianRegression())
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="Invalid noise_scale: True with strategy 'fsdp'"):
        make_config({"noise_scale": True, "strategy": "fsdp"})
    with pytest.raises(ValueError, match="Invalid noise_scale: True with step_in_backward"):
        make_config({"noise_scale": True, "step_in_backward": True, "nonfinite": "raise"})
    with pytest.raises(ValueError, match="noise_scale_ema"):
        make_config({"noise_scale_ema": 1.0})


def test_cli_without_accumulation_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "train", "--noise-scale", "--batch-size", "8",
                           "--micro-batch-size", "8", "--steps", "1", "--out", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "largebatch train: error: the gradient noise scale needs gradients at two batch sizes: use gradient "
        "accumulation (micro_batch_size < batch_size) or several data-parallel processes (here: batch_size 8 = "
        "micro_batch_size, 1 process)")


LOOP_DRIVER = """
import sys
sys.path.insert(0, sys.argv[3])
from test_noise_scale import GaussianRegression, _train_cfg
from largebatch.train.loop import train
train(_train_cfg(sys.argv[1], micro_batch_size=int(sys.argv[2]), threads=1), task=GaussianRegression())
"""


@pytest.mark.distributed
def test_train_under_ddp_equals_one_process_accumulating(tmp_path):
    """`train(noise_scale=True)` on 2 gloo processes × 1 micro-batch of 16 logs the estimates of 1 process
    accumulating the same 2 micro-batches (the Stepper's factor world × count / total under DDP)."""
    import subprocess
    import sys
    from pathlib import Path

    from test_ddp import _torchrun  # torchrun on 127.0.0.1, retried on a taken port

    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-c", LOOP_DRIVER, str(tmp_path / "one"), "16", tests],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, ["-c", LOOP_DRIVER, str(tmp_path / "two"), "16", tests], env)
    assert two.returncode == 0, two.stderr[-3000:]
    keys = lambda r: {k: v for k, v in r.items() if "b_simple" in k or k.startswith(("window", "grad_"))}  # noqa: E731
    a = [keys(r) for r in _records(tmp_path / "one") if "b_simple" in r]
    b = [keys(r) for r in _records(tmp_path / "two") if "b_simple" in r]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-9)
