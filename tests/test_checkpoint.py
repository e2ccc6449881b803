"""Resume bit-exactness after a real kill -9, and corrupt checkpoints that never replace good ones."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from largebatch.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint

TINY = dict(task="mlm", optimizer="lamb", batch_size=48, micro_batch_size=20, lr=5e-3, warmup_steps=2, steps=6,
            eval_every=3, checkpoint_every=1, keep_checkpoints=3, progress=False, plot=False, threads=1,
            task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                              limit_train_sequences=200, max_eval_sequences=64))

DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from largebatch.train.loop import TrainConfig, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    def on_step(step, record):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # a real kill -9, no cleanup
    train(cfg, resume=resume, on_step=on_step)
""")


def _run(cfg, kill_at=-1, resume=None, env_cache=None):
    args = [sys.executable, "-c", DRIVER, json.dumps(cfg), str(kill_at)] + ([resume] if resume else [])
    env = {**os.environ, "LARGEBATCH_CACHE": env_cache}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def _metrics(run):
    recs = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("samples_per_s")  # wall-clock throughput is the one thing allowed to differ
    return recs


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    cache = str(tmp_path / "cache")
    straight = _run({**TINY, "out": str(tmp_path / "straight")}, env_cache=cache)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run({**TINY, "out": str(tmp_path / "killed")}, kill_at=4, env_cache=cache)
    assert killed.returncode == -signal.SIGKILL
    ckpts = list_checkpoints(tmp_path / "killed")
    assert ckpts[-1].name == "ckpt-00000004.pt"
    resumed = _run({**TINY, "out": str(tmp_path / "killed")}, resume=str(tmp_path / "killed"), env_cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 4" in resumed.stdout
    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(tmp_path / "killed")
    assert a["step"] == b["step"] == 6
    assert a["data_position"] == b["data_position"] == {"phase": 0, "epoch": 1, "sample_in_epoch": 88, "seed": 0}  # 6·48 = 200 + 88
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "killed")


def test_corrupt_checkpoint_clear_error_and_never_overwritten(tmp_path):
    good = save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, tmp_path, 1)
    bad = save_checkpoint({"step": 2, "model": {"w": torch.ones(3)}}, tmp_path, 2)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated, e.g. the disk filled up
    with pytest.raises(CheckpointError, match=r"ckpt-00000002\.pt is truncated or corrupt.*ckpt-00000001\.pt"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(good)["step"] == 1
    # a new checkpoint goes to a new file: neither the good nor the broken one is written over
    save_checkpoint({"step": 3, "model": {"w": torch.zeros(3)}}, tmp_path, 3, keep=3)
    assert load_checkpoint(good)["step"] == 1
    assert load_checkpoint(tmp_path)["step"] == 3


def test_checkpoint_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "ckpt-00000001.pt"
    torch.save({"step": 1, "model": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from largebatch.train.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"step": 1, "model": {}, "rng": rng_state()}, tmp_path, 1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path)["rng"])   # load_checkpoint uses weights_only=True
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_retention_keeps_the_newest_and_leaves_no_temp_files(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step, "model": {"w": torch.full((2,), float(step))}}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert not list(tmp_path.glob(".ckpt-*"))  # the temp file became the checkpoint (os.replace)


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    from largebatch.train.loop import TrainConfig, train

    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    cfg = {**TINY, "steps": 1, "eval_every": 0, "out": str(tmp_path / "run")}
    train(TrainConfig(**cfg))
    with pytest.raises(ValueError, match=r"batch_size=64 \(checkpoint: 48\)"):
        train(TrainConfig(**{**cfg, "steps": 2, "batch_size": 64}), resume=str(tmp_path / "run"))
