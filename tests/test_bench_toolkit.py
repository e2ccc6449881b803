"""largebatch bench --toolkit: the three loops do the same work, the baton interleaves them, the CLI's output."""
import copy
import json
import subprocess
import sys
import threading

import pytest
import torch

from largebatch.bench import toolkit
from largebatch.tasks import build_task
from largebatch.train.config import TrainConfig
from largebatch.train.loop import train
from largebatch.train.run_plan import build_run_plan

TINY = dict(hidden=32, layers=1, heads=2, intermediate=64, limit_train_sequences=64, max_eval_sequences=32,
            dropout=0.0)
TINY_ARGS = " ".join(f"--task-opt {k}={v}" for k, v in TINY.items())


def tiny_config(tmp_path, **kw):
    return TrainConfig(**{**dict(task="mlm", task_options=TINY, batch_size=16, micro_batch_size=8, steps=3, lr=0.01,
                                 out=str(tmp_path / "run"), progress=False, plot=False), **kw})


@pytest.fixture(scope="module")
def tiny_task():
    return build_task("mlm", **TINY)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_train_the_minimal_loop_and_the_trainer_do_the_same_work(tmp_path, tiny_task, precision):
    """Same batches, masks, optimizer, groups, schedule and exact accumulation: the same parameters, bit for bit,
    after 3 steps (so the comparison times the same work)."""
    cfg = tiny_config(tmp_path, precision=precision)
    task = tiny_task
    plan = build_run_plan(cfg, task)
    ours = toolkit.task_copy(task)
    train(cfg, task=ours)
    minimal = copy.deepcopy(task.model)
    toolkit.minimal_loop(task, cfg, plan, minimal, 3)
    hf = copy.deepcopy(task.model)
    toolkit.hf_trainer(task, cfg, plan, hf, 3, str(tmp_path / "trainer")).train()
    assert not torch.equal(next(ours.model.parameters()), next(task.model.parameters()))  # it trained
    for other in (minimal, hf):
        assert all(torch.equal(a, b) for a, b in zip(ours.model.parameters(), other.parameters()))


def test_the_baton_runs_one_step_at_a_time_in_shuffled_rounds():
    log, running = [], []
    lock = threading.Lock()

    def runner(baton, name):
        for _ in range(4):
            with lock:
                running.append(name)
                assert len(running) == 1, running  # nobody else is inside a step
            log.append(name)
            with lock:
                running.remove(name)
            if baton.tick(name):
                return

    times = toolkit.run_interleaved({n: runner for n in "abc"}, steps=4, threads=1)
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    rounds = [log[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every runner once per round
    assert len({tuple(r) for r in rounds}) > 1  # in a shuffled order


def test_a_failing_runner_stops_the_others_and_its_error_is_raised():
    def good(baton, name):
        while not baton.tick(name):
            pass

    def bad(baton, name):
        baton.tick(name)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        toolkit.run_interleaved({"good": good, "bad": bad}, steps=50, threads=1)


def test_a_runner_that_ends_early_is_reported():
    def short(baton, name):
        baton.tick(name)

    def good(baton, name):
        while not baton.tick(name):
            pass

    with pytest.raises(RuntimeError, match="ended before their 3 steps"):
        toolkit.run_interleaved({"short": short, "good": good}, steps=3, threads=1)


def test_more_steps_than_the_config_has_are_refused(tmp_path, tiny_task):
    with pytest.raises(ValueError, match="Invalid steps: 12 warm-up and timed steps .* 10 steps"):
        toolkit.compare(tiny_config(tmp_path, steps=10), steps=10, warmup=2, task=tiny_task)


def test_summary_ratios_are_samples_per_second_ratios():
    times = {"train (logging off)": [0.5, 0.5, 0.9], "minimal loop": [0.4, 0.4, 0.4], "HF Trainer": [1.0, 1.0, 1.0]}
    s = toolkit.summarise(times, 256)
    assert s["rows"]["minimal loop"]["samples_per_s"] == pytest.approx(640)
    assert s["ratios"]["train (logging off) ÷ minimal loop (samples_per_s)"] == pytest.approx(0.8)
    assert s["ratios"]["train (logging off) ÷ HF Trainer (samples_per_s)"] == pytest.approx(2.0)
    assert s["ratios"]["train (logging off) ÷ HF Trainer (samples_per_s_overall)"] == pytest.approx(3 / 1.9)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "largebatch.cli.main", "bench", "--toolkit", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_times_the_four_runners_and_writes_results(tmp_path):
    proc = cli("--train-args", f"{TINY_ARGS} --batch-size 16 --micro-batch-size 8 --steps 8 --eval-every 2",
               "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "toolkit.json").read_text())
    assert list(data["rows"]) == list(toolkit.RUNNERS)
    assert all(r["steps"] == 2 and 0 < r["min_ms"] <= r["median_ms"] for r in data["rows"].values())
    assert data["work"]["batch_size"] == 16 and data["work"]["threads"] == 1 and data["work"]["eval_every"] == 2
    assert len(data["ratios"]) == 8
    assert "| train (logging off) |" in (tmp_path / "toolkit.md").read_text()


@pytest.mark.parametrize("args, needle", [
    (["--train-args", "--bogus 3"], "--train-args"),
    (["--train-args", "--precision bf16"], "Invalid precision"),
    (["--train-args", "--batch-size 256 --micro-batch-size 100"], "Invalid micro_batch_size"),
    (["--e2e"], "--toolkit"),
])
def test_cli_rejects_what_it_cannot_compare_with_one_line(tmp_path, capsys, args, needle):
    from largebatch.cli.main import main

    assert main(["bench", "--toolkit", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
