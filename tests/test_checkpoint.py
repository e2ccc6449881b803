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

from largebatch.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                                         set_rng_state)

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


def _state(step, value=1.0, run_id=None):
    """A small training state with every key a real one has."""
    w = torch.full((3,), float(value))
    return {"step": step, "model": {"w": w},
            "optimizer": {"state": {"w": {"step": torch.tensor(float(step)), "exp_avg": w / 10,
                                          "exp_avg_sq": w / 100}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]},
            "rng": rng_state(), **({"run_id": run_id} if run_id else {})}


def test_corrupt_checkpoint_clear_error_and_never_overwritten(tmp_path):
    good = save_checkpoint(_state(1), tmp_path, 1)
    bad = save_checkpoint(_state(2), tmp_path, 2)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated, e.g. the disk filled up
    with pytest.raises(CheckpointError, match=r"ckpt-00000002\.pt is truncated or corrupt.*ckpt-00000001\.pt"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(good)["step"] == 1
    # a new checkpoint goes to a new file: neither the good nor the broken one is written over
    save_checkpoint(_state(3, 0.0), tmp_path, 3, keep=3)
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

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(_state(1), tmp_path, 1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path)["rng"])   # load_checkpoint uses weights_only=True
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_retention_keeps_the_newest_and_leaves_no_temp_files(tmp_path):
    for step in range(1, 6):
        save_checkpoint(_state(step, step), tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert not list(tmp_path.glob(".ckpt-*"))  # the temp file became the checkpoint (os.replace)


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    from largebatch.train.loop import TrainConfig, train

    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    cfg = {**TINY, "steps": 1, "eval_every": 0, "out": str(tmp_path / "run")}
    train(TrainConfig(**cfg))
    with pytest.raises(ValueError, match=r"batch_size=64 \(checkpoint: 48\)"):
        train(TrainConfig(**{**cfg, "steps": 2, "batch_size": 64}), resume=str(tmp_path / "run"))


# ---- integrity: every damaged, foreign or unsafe file is refused with one line naming it ----

def _record_offset(path, name_suffix):
    """Byte offset of the data of the first zip record whose name ends with ``name_suffix``."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(name_suffix))
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "zero-byte": lambda p: p.write_bytes(b""),
    "truncated-10%": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 10]),
    "truncated-last-byte": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "bit-flip-in-a-tensor": lambda p: _flip(p, _record_offset(p, "data/0") + 5),
    "bit-flip-in-the-structure": lambda p: _flip(p, _record_offset(p, "data.pkl") + 40),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_refused_with_one_line(tmp_path, damage):
    save_checkpoint(_state(1), tmp_path, 1)
    path = save_checkpoint(_state(2, 2.0), tmp_path, 2, keep=2)
    DAMAGES[damage](path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert str(path) in message and "ckpt-00000001.pt" in message and "\n" not in message, message


def test_a_flipped_tensor_byte_is_caught_by_the_checksum(tmp_path):
    """torch.load alone accepts the file (a silently different model); the CRC-32 check refuses it."""
    path = save_checkpoint(_state(1), tmp_path, 1)
    _flip(path, _record_offset(path, "data/0") + 2)
    assert torch.load(path, weights_only=True)["step"] == 1  # what made this check necessary
    with pytest.raises(CheckpointError, match=r"ckpt-00000001\.pt fails its checksum \(CRC-32 of record .*data/0"):
        load_checkpoint(path)


@pytest.mark.parametrize("where, key", [("model", "w"), ("optimizer", "exp_avg"), ("optimizer", "exp_avg_sq")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_state_is_refused_naming_the_tensor(tmp_path, where, key, value):
    state = _state(1)
    target = state["model"] if where == "model" else state["optimizer"]["state"]["w"]
    target[key][1] = value
    save_checkpoint(state, tmp_path, 1)
    name = "model.w" if where == "model" else f"optimizer.state.w.{key}"
    with pytest.raises(CheckpointError, match=rf"ckpt-00000001\.pt: {name} holds NaN or infinite values"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("missing", ["optimizer", "rng", "step", "model"])
def test_a_checkpoint_missing_a_key_is_refused_naming_it(tmp_path, missing):
    state = _state(1)
    del state[missing]
    save_checkpoint(state, tmp_path, 1)
    with pytest.raises(CheckpointError, match=rf"ckpt-00000001\.pt lacks '{missing}'"):
        load_checkpoint(tmp_path)


def test_foreign_files_are_refused(tmp_path):
    """A bare state_dict and a list are not training states; a step that is not a count neither."""
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpt-00000001.pt")
    with pytest.raises(CheckpointError, match="lacks 'step', 'model', 'optimizer', 'rng'"):
        load_checkpoint(tmp_path / "ckpt-00000001.pt")
    torch.save([1, 2], tmp_path / "ckpt-00000002.pt")
    with pytest.raises(CheckpointError, match="does not hold a largebatch training state"):
        load_checkpoint(tmp_path / "ckpt-00000002.pt")
    save_checkpoint({**_state(1), "step": -3}, tmp_path, 3)
    with pytest.raises(CheckpointError, match=r"step is -3"):
        load_checkpoint(tmp_path / "ckpt-00000003.pt")


def _malicious(canary):
    """Pickled objects that would run code if loaded with a plain unpickler (each writes ``canary``)."""
    import builtins
    import shutil
    import subprocess

    cmd = f"touch {canary}"
    calls = {
        "os.system": (os.system, (cmd,)),
        "builtins.eval": (builtins.eval, (f"open({str(canary)!r}, 'w')",)),
        "builtins.exec": (builtins.exec, (f"open({str(canary)!r}, 'w')",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(canary)],)),
        "pathlib.Path.write_text": (Path.write_text, (canary, "x")),
        "builtins.__import__": (builtins.__import__, ("os",)),
        "shutil.rmtree": (shutil.rmtree, (str(canary.parent / "victim"),)),
    }
    made = {}
    for name, call in calls.items():
        made[name] = type("Evil", (), {"__reduce__": lambda self, call=call: call})()
    return made


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "pathlib.Path.write_text", "builtins.__import__", "shutil.rmtree", "plain-pickle"])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, name):
    import pickle

    canary = tmp_path / "pwned"
    (tmp_path / "victim").mkdir()
    path = tmp_path / "ckpt-00000001.pt"
    evil = _malicious(canary)
    if name == "plain-pickle":  # torch's legacy (non-zip) format, as a hand-made file could be
        path.write_bytes(pickle.dumps({**_state(1), "x": evil["os.system"]}))
    else:
        torch.save({**_state(1), "x": evil[name]}, path)
    with pytest.raises(CheckpointError, match=r"ckpt-00000001\.pt is truncated or corrupt"):
        load_checkpoint(path)
    assert not canary.exists() and (tmp_path / "victim").is_dir()


# ---- retention, validation, failing writes ----

def test_retention_prunes_only_this_runs_checkpoints(tmp_path):
    """An earlier, longer run's checkpoints (another run id) are never deleted by this run's retention."""
    for step in (10, 20, 30):
        save_checkpoint(_state(step, run_id="a" * 32), tmp_path, step, keep=3)
    for step in (1, 2, 3):
        save_checkpoint(_state(step, run_id="b" * 32), tmp_path, step, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000002.pt", "ckpt-00000003.pt", "ckpt-00000010.pt", "ckpt-00000020.pt",
                     "ckpt-00000030.pt"]


@pytest.mark.parametrize("keep", [-1, 0, "two", 1.5, True, None])
def test_keep_checkpoints_is_validated_before_writing(tmp_path, keep):
    from largebatch.checkpoint import check_keep

    with pytest.raises(ValueError, match=r"Invalid keep_checkpoints: .* \(allowed: an integer >= 1"):
        check_keep(keep)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        save_checkpoint(_state(1), tmp_path, 1, keep=keep)
    assert not list(tmp_path.iterdir())  # nothing written


class _FullDisk:
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("fill", [0.0, 0.3, 0.95])
def test_disk_full_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fill):
    """The write fails after ``fill`` of the checkpoint's bytes (ENOSPC): one line naming the path and the
    disk, the earlier checkpoint kept, no temp file left."""
    room = int(fill * save_checkpoint(_state(1), tmp_path, 1, keep=1).stat().st_size)
    real_open = Path.open

    def full_when_temp(path, *a, **k):  # the temp file the checkpoint is written to fills the disk
        f = real_open(path, *a, **k)
        return _FullDisk(f, room) if path.name.endswith(".tmp") else f

    monkeypatch.setattr(Path, "open", full_when_temp)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(_state(2, 2.0), tmp_path, 2, keep=1)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'ckpt-00000002.pt'}: No space left on device")
    assert f"the last good checkpoint {tmp_path / 'ckpt-00000001.pt'} is kept" in message and "\n" not in message
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001.pt"]  # no temp file, nothing pruned
    assert load_checkpoint(tmp_path)["step"] == 1


def test_stale_temp_files_are_removed(tmp_path):
    from largebatch.checkpoint import remove_stale_temps

    save_checkpoint(_state(1), tmp_path, 1)
    stale = [tmp_path / ".ckpt-abc123.tmp", tmp_path / ".metrics.jsonl.x1.tmp", tmp_path / ".run.json.y.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("a user's file")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "notes.tmp"]


def test_write_atomically_replaces_whole_files(tmp_path):
    from largebatch.checkpoint import write_atomically

    path = tmp_path / "summary.json"
    path.write_text("old")
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_checkpoint_with_optimizer_options_unknown_here_is_refused_with_its_name():
    """A newer largebatch's checkpoint (an extra param-group option) gets a one-line CheckpointError naming the
    file instead of torch's bare KeyError; an older one (an option missing) loads with this optimizer's value."""
    import copy

    import largebatch
    from largebatch.checkpoint import CheckpointError
    from largebatch.train.distributed import full_state, load_full_state
    from largebatch.train.resume import check_optimizer_options

    model = torch.nn.Linear(3, 2)
    opt = largebatch.Lamb(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model_state, optim_state = full_state(model, opt)
    newer = copy.deepcopy(optim_state)
    newer["param_groups"][0]["future_flag"] = 1
    with pytest.raises(CheckpointError, match=r"^runs/x/ckpt-00000001\.pt: optimizer option\(s\) \['future_flag'\] "
                                              r"unknown to this Lamb"):
        check_optimizer_options({"path": "runs/x/ckpt-00000001.pt", "optimizer": newer}, opt)
    older = copy.deepcopy(optim_state)
    older["param_groups"][0].pop("sync_free")
    check_optimizer_options({"optimizer": older}, opt)
    load_full_state(model, opt, model_state, older)
    assert opt.param_groups[0]["sync_free"] is None


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """Temp files are created 0600; the file that replaces the target gets what ``open()`` would (0666 less the
    umask), so a shared cache or a run folder stays readable by others, and a failed write leaves nothing."""
    from largebatch.checkpoint import replaced_atomically, write_atomically

    mask = os.umask(0o022)
    os.umask(mask)
    write_atomically(tmp_path / "run.json", "{}")
    plain = tmp_path / "plain"
    plain.write_text("{}")
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError), replaced_atomically(tmp_path / "cache.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run.json"]
