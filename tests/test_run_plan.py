"""The run plan: the one source of phases, batch, micro-batch, steps and LR (a plain config is one phase)."""
import json

import pytest
import torch
from torch import nn

from largebatch import schedules as S
from largebatch.tasks.base import Task
from largebatch.train import loop
from largebatch.train.config import TrainConfig
from largebatch.train.run_plan import RunPlan, build_run_plan


class Regression(Task):
    """A tiny least-squares task: fast enough to run train() many times in a test."""

    name = "regression"

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
        self.model = nn.Linear(4, 1)
        self.train_size = n

    def batch(self, indices, generator):
        return {"x": self.x[indices], "y": self.y[indices]}

    def loss(self, model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).sum(), len(batch["x"])

    @torch.no_grad()
    def evaluate(self, model, split="test"):
        return {"loss": float(((model(self.x) - self.y) ** 2).mean())}


def _cfg(tmp_path, **kw):  # the task object is passed to train(); the name must be a known task
    return TrainConfig(**{"task": "mlm", "optimizer": "lamb", "progress": False, "plot": False,
                          "out": str(tmp_path), **kw})


def test_a_plain_config_is_a_one_phase_plan(tmp_path):
    plan = build_run_plan(_cfg(tmp_path, batch_size=16, micro_batch_size=8, lr=0.1, warmup_steps=50, epochs=2.0),
                          Regression())
    assert isinstance(plan, RunPlan) and not plan.multi_phase
    (ph,) = plan.phases
    assert (ph.steps, ph.batch_size, ph.micro_batch_size, ph.peak_lr) == (8, 16, 8, 0.1)
    assert ph.warmup_steps == 8  # capped by the run's length
    assert plan.total_steps == 8 and plan.starts == (0,) and plan.train_sizes == (64,)
    assert [plan.lr(t) for t in range(9)] == [S.warmup_poly_decay(t, peak_lr=0.1, warmup_steps=8, total_steps=8)
                                              for t in range(9)]


def test_phases_take_the_config_schedule_unless_they_set_their_own(tmp_path):
    phases = [dict(batch_size=16, lr=0.1, warmup_steps=1, steps=3),
              dict(batch_size=32, lr=0.2, warmup_steps=0, steps=2, schedule="poly", micro_batch_size=64)]
    plan = build_run_plan(_cfg(tmp_path, schedule="constant", phases=phases), Regression())
    assert [ph.schedule for ph in plan.phases] == ["constant", "poly"]
    assert plan.phases[1].micro_batch_size == 32  # never above the phase's batch
    assert [plan.lr(t) for t in range(5)] == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.1])
    assert [plan.locate(t) for t in (0, 2, 3, 4)] == [(0, 0), (0, 2), (1, 0), (1, 1)]
    assert plan.samples_before(1) == 48 and plan.starts == (0, 3)
    with pytest.raises(ValueError, match=r"phases\[0\] schedule"):
        _cfg(tmp_path, phases=[{**phases[0], "schedule": "cosine"}])


def test_train_reads_every_lr_from_the_plan_and_builds_the_optimizer_with_its_first(tmp_path, monkeypatch):
    seen = {}
    create = loop.create_optimizer

    def spy(name, model, *, lr, **kw):
        seen["lr"] = lr
        return create(name, model, lr=lr, **kw)

    monkeypatch.setattr(loop, "create_optimizer", spy)
    cfg = _cfg(tmp_path, schedule="constant", lr=0.05, warmup_steps=2, steps=4, batch_size=16, micro_batch_size=16)
    task = Regression()
    summary = loop.train(cfg, task=task)
    plan = build_run_plan(cfg, task)
    assert seen["lr"] == plan.lr(0) == 0.025
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in recs] == [plan.lr(t) for t in range(4)] == [0.025, 0.05, 0.05, 0.05]
    assert summary["steps"] == 4 and summary["total_steps"] == 4 and "test_loss" in summary


def test_save_pretrained_is_called_at_the_end_of_a_run(tmp_path):
    class Exporting(Regression):
        def save_pretrained(self, model, directory):
            directory.mkdir(parents=True)
            torch.save(model.state_dict(), directory / "model.pt")

    task = Exporting()
    loop.train(_cfg(tmp_path, steps=2, batch_size=8, micro_batch_size=8), task=task)
    saved = torch.load(tmp_path / "hf" / "model.pt")
    assert all(torch.equal(v, task.model.state_dict()[k]) for k, v in saved.items())


def test_a_result_at_or_below_the_trivial_baseline_is_flagged(tmp_path):
    class Scored(Regression):
        def evaluate(self, model, split="test"):
            return {**super().evaluate(model, split), "accuracy": 0.25}

        def baseline(self):
            return {"accuracy": 0.25, "loss": 1.0}

    summary = loop.train(_cfg(tmp_path, steps=1, batch_size=8, micro_batch_size=8), task=Scored())
    assert summary["baseline_accuracy"] == 0.25 and summary["at_or_below_baseline"] is True
    assert "baseline_loss" not in summary  # lower is better for a loss: not compared
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["at_or_below_baseline"] is True
    summary = loop.train(_cfg(tmp_path / "plain", steps=1, batch_size=8, micro_batch_size=8), task=Regression())
    assert "at_or_below_baseline" not in summary  # no baseline, no flag


def test_stop_after_steps_takes_the_first_steps_of_the_full_run_and_says_so(tmp_path):
    """The LR schedule still spans the plan; the steps taken equal the full run's first steps; the last one is
    evaluated and checkpointed; a resume from before the stop ends at it, one from past it is refused."""
    def task():  # the same initial weights every time
        torch.manual_seed(0)
        return Regression()

    kw = dict(lr=0.05, warmup_steps=2, steps=8, batch_size=16, micro_batch_size=8, eval_every=3, seed=3)
    full = loop.train(_cfg(tmp_path / "full", **kw), task=task())
    cut = loop.train(_cfg(tmp_path / "cut", stop_after_steps=5, checkpoint_every=2, **kw), task=task())
    read = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "full"), read(tmp_path / "cut")
    drop = lambda r: {k: v for k, v in r.items() if k not in ("samples_per_s",) and not k.startswith("validation")}  # noqa: E731
    assert [drop(r) for r in b] == [drop(r) for r in a[:5]]  # same LRs (the 8-step schedule), losses, samples
    assert [r["step"] for r in b if "validation_loss" in r] == [3, 5]  # the stop is evaluated
    assert full["steps"] == 8 and "stopped_early" not in full
    assert cut["steps"] == 5 and cut["total_steps"] == 8 and cut["stopped_early"] and cut["stop_after_steps"] == 5
    assert sorted(p.name for p in (tmp_path / "cut").glob("ckpt-*.pt"))[-1] == "ckpt-00000005.pt"
    # a run stopped at 3 and resumed with a stop at 5 ends where the straight cut run ended
    loop.train(_cfg(tmp_path / "two", stop_after_steps=3, checkpoint_every=3, **kw), task=task())
    (tmp_path / "two" / "summary.json").unlink()  # (a stopped run is finished; here: killed right after step 3)
    again = loop.train(_cfg(tmp_path / "two", stop_after_steps=5, **kw), resume=str(tmp_path / "two"),
                       task=task())
    assert again["steps"] == 5 and again["final_loss"] == cut["final_loss"]
    with pytest.raises(ValueError, match=r"Invalid stop_after_steps: 4 \(allowed: >= 5"):
        (tmp_path / "cut" / "summary.json").unlink()
        loop.train(_cfg(tmp_path / "cut", stop_after_steps=4, **kw), resume=str(tmp_path / "cut"), task=task())
    with pytest.raises(ValueError, match="stop_after_steps"):
        _cfg(tmp_path, stop_after_steps=0)
