"""Multi-phase ("mixed batch") training: short sequences at a large batch, then long ones at a smaller batch,
re-warmup, and the optimizer-state policy at the boundary (docs/training.md, "The run plan")."""
import json
from pathlib import Path

import pytest
import torch

from largebatch import schedules
from largebatch.checkpoint import load_checkpoint
from largebatch.train.loop import TrainConfig, train

TASK = dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64, dropout=0.0,
            limit_train_sequences=200, max_eval_sequences=64)
PHASES = [dict(batch_size=48, micro_batch_size=20, lr=5e-3, warmup_steps=2, steps=3, seq_len=16),
          dict(batch_size=24, lr=3e-3, warmup_steps=1, steps=3, seq_len=32, optimizer_state="reset")]
BASE = dict(task="mlm", optimizer="lamb", progress=False, plot=False, threads=1, eval_every=0, checkpoint_every=1,
            keep_checkpoints=8, task_options=TASK)


class Stop(Exception):
    pass


def _records(run):
    recs = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("samples_per_s")
    return recs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import os
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LARGEBATCH_CACHE")
    os.environ["LARGEBATCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LARGEBATCH_CACHE", None)
    else:
        os.environ["LARGEBATCH_CACHE"] = old


def test_two_phases_interrupted_at_the_boundary_resume_identically(tmp_path, cache):
    cfg = TrainConfig(**BASE, phases=PHASES, out=str(tmp_path / "straight"))
    summary = train(cfg)
    assert summary["steps"] == 6
    recs = _records(tmp_path / "straight")
    assert [r["phase"] for r in recs] == [1, 1, 1, 2, 2, 2]
    # samples: 3 steps of 48, then steps of 24; each phase re-warms up to its own peak
    assert [r["samples"] for r in recs] == [48, 96, 144, 168, 192, 216]
    phases = [schedules.Phase(steps=3, batch_size=48, peak_lr=5e-3, warmup_steps=2),
              schedules.Phase(steps=3, batch_size=24, peak_lr=3e-3, warmup_steps=1)]
    assert [r["lr"] for r in recs] == pytest.approx([schedules.multi_phase_lr(phases, t) for t in range(6)])
    # masked tokens per step follow the sequence length: ~15% of 48·14 body tokens, then of 24·30
    assert all(80 < r["count"] < 120 for r in recs[:3]) and all(90 < r["count"] < 130 for r in recs[3:])
    # optimizer_state="reset": the step counters restarted at the boundary (3 steps since, not 6)
    state = load_checkpoint(tmp_path / "straight")["optimizer"]["state"]
    assert {float(s["step"]) for s in state.values()} == {3.0}

    def stop_at_boundary(step, record):
        if step == 3:
            raise Stop
    with pytest.raises(Stop):
        train(TrainConfig(**BASE, phases=PHASES, out=str(tmp_path / "cut")), on_step=stop_at_boundary)
    train(TrainConfig(**BASE, phases=PHASES, out=str(tmp_path / "cut")), resume=str(tmp_path / "cut"))
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "cut")
    assert a["data_position"] == b["data_position"] and a["data_position"]["phase"] == 1
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert _records(tmp_path / "straight") == _records(tmp_path / "cut")


def test_phase_one_is_the_single_phase_run(tmp_path, cache):
    """The first phase draws the same samples and masks as a plain run with its settings."""
    two = TrainConfig(**BASE, phases=PHASES, out=str(tmp_path / "two"))
    train(two)
    one = TrainConfig(**{**BASE, "task_options": {**TASK, "seq_len": 16, "max_position": 32}}, batch_size=48,
                      micro_batch_size=20, lr=5e-3, warmup_steps=2, steps=3, out=str(tmp_path / "one"))
    train(one)
    r1, r2 = _records(tmp_path / "one"), _records(tmp_path / "two")[:3]
    assert [r["loss"] for r in r1] == [r["loss"] for r in r2]
    assert [r["count"] for r in r1] == [r["count"] for r in r2]


@pytest.mark.parametrize("phases, message", [
    ([{"batch_size": 8, "lr": 1e-3}], "needs batch_size, lr, warmup_steps"),
    ([{"batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "steps": 2, "epochs": 1}], "exactly one of steps | epochs"),
    ([{"batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "steps": 2, "seqlen": 8}], "Invalid phases[0] key(s): seqlen"),
    ([{"batch_size": 0, "lr": 1e-3, "warmup_steps": 0, "steps": 2}], "Invalid phases[0] batch_size: 0"),
    ([{"batch_size": 8, "lr": -1.0, "warmup_steps": 0, "steps": 2}], "Invalid phases[0] lr: -1.0"),
    ([7], "Invalid phases[0]: 7"),
])
def test_invalid_phases(phases, message):
    with pytest.raises(ValueError) as exc:
        TrainConfig(phases=phases)
    assert message in str(exc.value)


def test_sequence_length_beyond_the_position_embeddings_is_refused(tmp_path, cache):
    phases = [dict(batch_size=8, lr=1e-3, warmup_steps=0, steps=1, seq_len=64)]
    with pytest.raises(ValueError, match=r"Invalid seq_len: 64 \(allowed: 3 \.\.\. 32"):
        train(TrainConfig(**BASE, phases=phases, out=str(tmp_path / "r")))


def test_tasks_without_sequences_refuse_a_seq_len(tmp_path):
    from largebatch.tasks import DataMissingError, build_task
    try:
        task = build_task("image", width=4, blocks=1, limit_train=64)
    except DataMissingError as exc:
        pytest.skip(f"image data unavailable: {exc}")
    with pytest.raises(ValueError, match="can change the sequence length"):
        task.set_train_seq_len(16)
