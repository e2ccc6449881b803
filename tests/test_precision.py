"""bf16 with fp32 master weights tracks fp32; masters survive checkpoints exactly; non-finite policy."""
import json

import pytest
import torch

from largebatch.checkpoint import load_checkpoint
from largebatch.train.loop import TrainConfig, train

TINY = dict(task="mlm", optimizer="lamb", batch_size=64, micro_batch_size=32, lr=3e-2, warmup_steps=2, steps=12,
            progress=False, plot=False, threads=1, eval_every=0,
            task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                              dropout=0.0, limit_train_sequences=256, max_eval_sequences=64))


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_bf16_master_weights_track_fp32_and_survive_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    train(TrainConfig(**TINY, out=str(tmp_path / "fp32")))
    train(TrainConfig(**TINY, out=str(tmp_path / "bf16"), precision="bf16"))
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    # bf16 activations/gradients (8-bit mantissa) with fp32 masters: the loss curve stays within 2%
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=0.02)
    ckpt = load_checkpoint(tmp_path / "bf16")
    states = ckpt["optimizer"]["state"]
    masters = [s["master_param"] for s in states.values()]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert all(s["exp_avg"].dtype == torch.float32 for s in states.values())
    # the bf16 parameters in the checkpoint are the masters rounded, and the masters carry more bits
    model_bf16 = [v for k, v in ckpt["model"].items() if v.dtype == torch.bfloat16]
    assert model_bf16
    # resuming restores the masters bit for bit
    from largebatch import create_optimizer
    from largebatch.tasks import build_task

    task = build_task("mlm", **TINY["task_options"])
    model = task.model.to(torch.bfloat16)
    model.load_state_dict(ckpt["model"])
    opt = create_optimizer("lamb", model, master_weights=True)
    from largebatch.train.distributed import full_state, load_full_state

    load_full_state(model, opt, ckpt["model"], ckpt["optimizer"])
    _, reloaded = full_state(model, opt)
    for name, s in reloaded["state"].items():
        assert s["master_param"].dtype == torch.float32
        assert torch.equal(s["master_param"], states[name]["master_param"])


def test_bf16_needs_an_optimizer_with_master_weights():
    with pytest.raises(ValueError, match="keeps fp32 master weights inside largebatch's Lamb/Lars"):
        from largebatch.train.precision import optimizer_overrides
        optimizer_overrides("bf16", "adamw")


def test_nonfinite_gradients_skip_without_advancing_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    from largebatch.tasks import build_task

    task = build_task("mlm", **TINY["task_options"])
    real_loss = task.loss
    calls = {"n": 0}

    def poisoned(model, batch):  # the 2nd optimizer step (micro-batches 3-4) gets an inf loss
        calls["n"] += 1
        loss, count = real_loss(model, batch)
        return (loss * float("inf") if calls["n"] in (3, 4) else loss), count

    task.loss = poisoned
    cfg = TrainConfig(**{**TINY, "steps": 4}, out=str(tmp_path / "skip"))
    summary = train(cfg, task=task)
    assert summary["skipped_steps"] == 1
    opt_state = load_checkpoint(tmp_path / "skip")["optimizer"]["state"]
    assert {s["step"].item() for s in opt_state.values()} == {3.0}  # 4 steps, one skipped
    calls["n"] = 0
    with pytest.raises(FloatingPointError, match="non-finite gradients at step 2"):
        train(TrainConfig(**{**TINY, "steps": 4}, out=str(tmp_path / "raise"), nonfinite="raise"), task=task)


def test_fp16_grad_scaler_tracks_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    train(TrainConfig(**TINY, out=str(tmp_path / "fp32")))
    summary = train(TrainConfig(**TINY, out=str(tmp_path / "fp16"), precision="fp16"))
    fp32, fp16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "fp16")
    # GradScaler starts at 2^16 and may skip the first steps on overflow; the rest follows fp32 closely
    assert summary["skipped_steps"] <= 3
    assert fp16[-1] < fp16[0]
    assert fp16[-1] == pytest.approx(fp32[-1], rel=0.03)
