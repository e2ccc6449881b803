"""DDP under torchrun (2 gloo processes) with accumulation equals one process on the same global batch."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from largebatch.checkpoint import load_checkpoint

pytestmark = pytest.mark.distributed

DRIVER = textwrap.dedent("""
    import json, sys
    from largebatch.train.loop import TrainConfig, train
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, argv, env):
    """torchrun on 127.0.0.1; retried only when the chosen port was taken meanwhile (shared machine)."""
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--no-python",
                               sys.executable, *argv], capture_output=True, text=True, env=env, timeout=600)
        if "address already in use" not in proc.stderr.lower():
            return proc
    return proc


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_data_parallel_with_accumulation_equals_single_process(tmp_path, strategy):
    """DDP, and FSDP2 with Lamb's whole-tensor trust ratios, equal one process on the same global batch."""
    # classify from scratch, dropout 0: batch() draws no randomness, so both runs see identical data
    base = dict(task="classify", optimizer="lamb", batch_size=24, micro_batch_size=5, lr=1e-2, warmup_steps=1,
                strategy=strategy,
                steps=5, progress=False, plot=False, threads=1, checkpoint_every=3,
                task_options=dict(checkpoint=None, seq_len=32, dropout=0.0, limit_train=48))
    env = {**os.environ, "LARGEBATCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-c", DRIVER, json.dumps({**base, "out": str(tmp_path / "one")})],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(2, ["-c", DRIVER, json.dumps({**base, "out": str(tmp_path / "two")})], env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "× 2 process(es)" in ddp.stdout  # the global effective batch is reported at start
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    if strategy == "fsdp":  # the step-3 checkpoint of the 2-rank sharded run resumes in 1 process, same end
        driver = DRIVER.replace("train(TrainConfig(**json.loads(sys.argv[1])))",
                                "train(TrainConfig(**json.loads(sys.argv[1])), resume=sys.argv[2])")
        resumed = subprocess.run([sys.executable, "-c", driver, json.dumps({**base, "out": str(tmp_path / "three")}),
                                  str(tmp_path / "two" / "ckpt-00000003.pt")],
                                 capture_output=True, text=True, env=env, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed at step 3" in resumed.stdout
        c = load_checkpoint(tmp_path / "three")
        assert c["step"] == 5
        for k, v in a["model"].items():
            torch.testing.assert_close(c["model"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


KILL_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from largebatch.train.loop import TrainConfig, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    def on_step(step, record):
        if step == kill_at and int(os.environ.get("RANK", "0")) == 1:
            os.kill(os.getpid(), signal.SIGKILL)   # one rank dies mid-run
    train(cfg, resume=sys.argv[3] if len(sys.argv) > 3 else None, on_step=on_step)
""")


def test_killed_rank_stops_the_job_and_resume_continues(tmp_path):
    base = dict(task="classify", optimizer="lamb", batch_size=24, micro_batch_size=6, lr=1e-2, warmup_steps=1,
                steps=5, progress=False, plot=False, threads=1, checkpoint_every=1, keep_checkpoints=3,
                out=str(tmp_path / "run"), task_options=dict(checkpoint=None, seq_len=32, dropout=0.0, limit_train=48))
    env = {**os.environ, "LARGEBATCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def torchrun(nproc, *extra):
        return _torchrun(nproc, ["-c", KILL_DRIVER, json.dumps(base), *extra], env)

    killed = torchrun(2, "3")
    assert killed.returncode != 0  # torchrun tears the job down and reports the failed rank
    assert "SIGKILL" in killed.stderr or "Signal 9" in killed.stderr or "exitcode" in killed.stderr
    last = load_checkpoint(tmp_path / "run")
    assert 1 <= last["step"] <= 3
    # resume on a different world size (1 process): DDP state is replicated, so this is correct too
    resumed = torchrun(1, "-1", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {last['step']}" in resumed.stdout
    assert load_checkpoint(tmp_path / "run")["step"] == 5


STOP_DRIVER = KILL_DRIVER.replace("signal.SIGKILL)   # one rank dies mid-run", "signal.SIGSTOP)   # one rank hangs")


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_after_dist_timeout(tmp_path):
    """A rank that hangs (SIGSTOP) must not hold the job for torch's default 30 minutes: the other rank fails
    after dist_timeout with one clear line, and torchrun ends the job (giving the stopped rank 30 s)."""
    import time

    base = dict(task="classify", optimizer="lamb", batch_size=24, micro_batch_size=6, lr=1e-2, warmup_steps=1,
                steps=6, progress=False, plot=False, threads=1, checkpoint_every=1, dist_timeout=10,
                out=str(tmp_path / "run"), task_options=dict(checkpoint=None, seq_len=32, dropout=0.0, limit_train=48))
    env = {**os.environ, "LARGEBATCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = _torchrun(2, ["-c", STOP_DRIVER, json.dumps(base), "2"], env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 0 of 2: no answer from the other process(es) within dist_timeout=10 s: a rank is stuck or dead" \
        in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 10 + 30 + 120, elapsed  # the timeout, torchrun's grace period, start-up on a busy machine
    assert load_checkpoint(tmp_path / "run")["step"] >= 1  # what was checkpointed is intact
