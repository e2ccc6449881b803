"""Faults from outside: kill -9 at any moment of a tiny ``largebatch train`` run, inside its checkpoint and
metrics writes, during a resume; a full disk. Every chain of kills and resumes must end bit-identical to the
run that was never interrupted (parameters, optimizer state, RNG, metrics, summary).

A few fixed variants run by default; the randomized loop is behind ``@pytest.mark.slow`` (LARGEBATCH_SLOW=1).
Each test records what it survived in ``FAULT_FIGURES`` (printed at the end of the session with ``-s``): the
figures of the README's "Reliability" section.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from largebatch.checkpoint import list_checkpoints, load_checkpoint

TINY = dict(task="mlm", optimizer="lamb", batch_size=48, micro_batch_size=20, lr=5e-3, warmup_steps=2, steps=8,
            eval_every=3, checkpoint_every=2, keep_checkpoints=2, progress=False, plot=False, threads=1,
            task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                              limit_train_sequences=200, max_eval_sequences=64))

#: runs a CLI command in this process after arming one fault: "<point>:<n>" kills the process (SIGKILL, no
#: cleanup) at the n-th time the program reaches <point>
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from largebatch import checkpoint as C
    point, n = sys.argv[1].split(":")
    n, seen = int(n), [0]

    def reached(what):
        if what == point:
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    # checkpoint-bytes:n: the n-th checkpoint file gets two writes and half of the third, then the kill
    # (small JSON files are written in one call, so only checkpoints reach a third write)
    class Recording(C._RecordingFile):
        def write(self, data):
            self.writes = getattr(self, "writes", 0) + 1
            if self.writes == 3 and point == "checkpoint-bytes" and seen[0] + 1 == n:
                self.f.write(data[: len(data) // 2]); self.f.flush()
            reached("checkpoint-bytes" if self.writes == 3 else "")
            return super().write(data)

    C._RecordingFile = Recording
    real_replace, real_prune = C.os.replace, C.prune_checkpoints

    def replace(src, dst):  # points before-rename-ckpt, after-rename-summary.json, before-rename-metrics.jsonl, ...
        name = os.path.basename(dst)
        name = "ckpt" if name.startswith("ckpt-") else name
        reached("before-rename-" + name)
        real_replace(src, dst)
        reached("after-rename-" + name)

    def prune(*a, **k):
        reached("before-prune")
        return real_prune(*a, **k)

    C.os.replace, C.prune_checkpoints = replace, prune
    from largebatch.cli.main import main
    sys.exit(main(sys.argv[2:]))
""")

FAULT_FIGURES = {"kills survived": 0, "resumes that were themselves killed": 0, "disk-full failures kept the "
                 "last good checkpoint": 0}


def _config(tmp_path, **over):
    path = tmp_path / f"tiny-{len(list(tmp_path.glob('tiny-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**TINY, **over}))
    return path


def _env(cache):
    return {**os.environ, "LARGEBATCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _train(config, out, cache, *, resume=False, fault=None, kill_after_s=None):
    """One ``largebatch train`` process; ``fault`` arms DRIVER, ``kill_after_s`` kills it from outside."""
    args = ["train", "--config", str(config), "--out", str(out), "--no-progress"] + (["--resume", str(out)]
                                                                                      if resume else [])
    cmd = [sys.executable, "-c", DRIVER, fault or "none:0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache))
    if kill_after_s is not None:
        try:
            proc.wait(kill_after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=900)
    return proc.returncode, stdout, stderr


def _resume_until_done(config, out, cache):
    """Continue a killed run: --resume when it left a checkpoint, else the same command again (the files of
    a run killed before its first checkpoint are moved aside)."""
    rc, stdout, stderr = _train(config, out, cache, resume=bool(list_checkpoints(out)))
    assert rc == 0, stderr[-3000:]
    return stdout + stderr


def _metrics(run):
    recs = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("samples_per_s")  # wall-clock throughput is the one thing allowed to differ
    return recs


def _summary(run):
    summary = json.loads((Path(run) / "summary.json").read_text())
    summary.pop("run_id", None)  # each run has its own
    return summary


def assert_same_run(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"] == TINY["steps"]
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    assert _metrics(a) == _metrics(b)
    assert _summary(a) == _summary(b)
    assert not list(Path(b).glob(".*.tmp"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    config, out = _config(base), base / "straight"
    rc, _, stderr = _train(config, out, base / "cache")
    assert rc == 0, stderr[-3000:]
    return config, out, base / "cache"


@pytest.mark.parametrize("fault", ["checkpoint-bytes:2", "after-rename-ckpt:3", "before-rename-summary.json:1",
                                   pytest.param("before-rename-ckpt:1", marks=pytest.mark.slow),
                                   pytest.param("before-prune:2", marks=pytest.mark.slow)])
def test_kill_inside_a_checkpoint_write_then_resume(tmp_path, straight, fault):
    config, reference, cache = straight
    out = tmp_path / "run"
    rc, _, stderr = _train(config, out, cache, fault=fault)
    assert rc == -signal.SIGKILL, stderr[-2000:]
    FAULT_FIGURES["kills survived"] += 1
    _resume_until_done(config, out, cache)
    assert_same_run(reference, out)


def test_kill_during_resumes_then_resume_again(tmp_path, straight):
    """A chain: killed after a checkpoint, the resume killed while trimming metrics.jsonl, the next one inside
    its first checkpoint write, with a torn line appended to metrics.jsonl as a kill mid-write leaves it."""
    config, reference, cache = straight
    out = tmp_path / "run"
    rc, _, stderr = _train(config, out, cache, fault="after-rename-ckpt:2")  # dies with ckpt 4 on disk
    assert rc == -signal.SIGKILL, stderr[-2000:]
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "samples": 240, "lr": 0.00')
    notes = []
    for fault in ("before-rename-metrics.jsonl:1", "checkpoint-bytes:1"):
        rc, _, stderr = _train(config, out, cache, resume=True, fault=fault)
        assert rc == -signal.SIGKILL, stderr[-2000:]
        notes += [l for l in stderr.splitlines() if "dropped a torn last line" in l]
    FAULT_FIGURES["kills survived"] += 3
    FAULT_FIGURES["resumes that were themselves killed"] += 2
    _resume_until_done(config, out, cache)
    assert len(notes) == 1 and str(out / "metrics.jsonl") in notes[0]  # the trim killed before its rename kept it
    assert_same_run(reference, out)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the exported ``hf/`` model included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_changes_nothing(straight):
    config, reference, cache = straight
    before = _files(reference)
    rc, stdout, stderr = _train(config, reference, cache, resume=True)
    assert rc == 0, stderr[-2000:]
    assert f"run in {reference} is complete" in stdout
    assert _files(reference) == before


def test_a_fresh_run_in_a_used_folder_is_refused(straight):
    config, reference, cache = straight
    before = _files(reference)
    rc, _, stderr = _train(config, reference, cache)
    assert rc == 2 and stderr.strip().splitlines()[-1].startswith(
        f"largebatch train: error: --out {reference} already holds a run"), stderr[-2000:]
    assert _files(reference) == before


@pytest.mark.slow
def test_random_kills_then_resume_bit_identical(tmp_path, straight):
    """20 chains (LARGEBATCH_FAULT_CHAINS), each killed from outside at random moments (resumes killed too)
    until it finishes. The kills fall in the last 60% of a straight run's time: the first 40% is mostly
    start-up (imports, data), where a kill tests little."""
    config, reference, cache = straight
    rng = random.Random(int(os.environ.get("LARGEBATCH_FAULT_SEED", "16")))
    start = time.monotonic()
    _train(config, tmp_path / "timing", cache)
    full_s = time.monotonic() - start
    for chain in range(int(os.environ.get("LARGEBATCH_FAULT_CHAINS", "20"))):
        out = tmp_path / f"chain-{chain}"
        for attempt in range(4):
            resume = bool(list_checkpoints(out))
            rc, _, stderr = _train(config, out, cache, resume=resume, kill_after_s=rng.uniform(0.4, 1.0) * full_s)
            if rc == 0:
                break
            assert rc == -signal.SIGKILL, stderr[-2000:]
            FAULT_FIGURES["kills survived"] += 1
            FAULT_FIGURES["resumes that were themselves killed"] += int(resume)
        _resume_until_done(config, out, cache)
        assert_same_run(reference, out)


def test_disk_full_keeps_the_last_good_checkpoint_and_says_so(tmp_path, straight):
    """A real full disk: the run folder on a 900 KiB tmpfs holds two checkpoints, not three. Needs root and
    mount namespaces (unshare); skipped elsewhere (test_checkpoint.py covers the failing write in-process)."""
    config, _, cache = straight
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small tmpfs")
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir(), copy.mkdir()
    config = _config(tmp_path, checkpoint_every=1, keep_checkpoints=3)
    script = (f"mount -t tmpfs -o size=900k tmpfs {mnt} || exit 77; "
              f"{sys.executable} -m largebatch.cli.main train --config {config} --out {mnt}/run --no-progress; "
              f"rc=$?; cp -a {mnt}/run {copy}/; exit $rc")
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True,
                          env=_env(cache), timeout=900)
    if proc.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    assert proc.returncode not in (0, 1), proc.stderr[-2000:]  # a clear error, not a traceback
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith(f"largebatch train: error: cannot write checkpoint {mnt}/run/ckpt-00000003.pt: No space "
                           "left on device"), last
    assert f"the last good checkpoint {mnt}/run/ckpt-00000002.pt is kept" in last
    kept = copy / "run"
    assert [p.name for p in list_checkpoints(kept)] == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    assert load_checkpoint(kept)["step"] == 2 and not list(kept.glob(".*.tmp"))
    FAULT_FIGURES["disk-full failures kept the last good checkpoint"] += 1


def teardown_module(module):
    print("\nfault figures: " + json.dumps(FAULT_FIGURES))
