"""A run folder belongs to one run: ids, refusals, the metrics trim on resume, resume warnings."""
import json

import pytest
import torch

from largebatch.checkpoint import rng_state, save_checkpoint
from largebatch.train.run_folder import (RUN_FILE, RunFolderError, check_out, claim, finished_summary, read_jsonl,
                                         resume_notes, run_id_for, trim_jsonl)


def _ckpt(run_dir, step, run_id):
    w = torch.ones(2)
    save_checkpoint({"step": step, "model": {"w": w}, "optimizer": {"state": {}, "param_groups": []},
                     "rng": rng_state(), "run_id": run_id}, run_dir, step)
    return {"run_id": run_id, "path": str(run_dir / f"ckpt-{step:08d}.pt")}


def test_a_fresh_run_gets_a_new_id_and_claims_the_folder(tmp_path):
    out = tmp_path / "run"
    run_id = run_id_for(out, None)
    assert len(run_id) == 32 and run_id != run_id_for(out, None)
    claim(out, run_id)
    assert json.loads((out / RUN_FILE).read_text()) == {"run_id": run_id}


@pytest.mark.parametrize("existing", ["summary.json", "ckpt"])
def test_a_fresh_run_refuses_a_folder_holding_a_run(tmp_path, existing):
    if existing == "ckpt":
        _ckpt(tmp_path, 3, "a" * 32)
    else:
        (tmp_path / existing).write_text(json.dumps({"run_id": "a" * 32}) + "\n")
    with pytest.raises(RunFolderError, match=rf"--out {tmp_path} already holds a run.*continue it with --resume "
                                             rf"{tmp_path}, or choose another --out"):
        run_id_for(tmp_path, None)
    assert list(tmp_path.iterdir())  # nothing deleted


@pytest.mark.parametrize("with_id", [True, False])
def test_a_run_that_left_no_checkpoint_is_moved_aside(tmp_path, with_id):
    """Killed before its first checkpoint: nothing to resume, so a fresh run may start, keeping those files."""
    files = {"config.json": "{}", "metrics.jsonl": '{"step": 1}\n', **({RUN_FILE: '{"run_id": "' + "e" * 32 + '"}'}
                                                                       if with_id else {})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.txt").write_text("mine")
    run_id = run_id_for(tmp_path, None)
    note = claim(tmp_path, run_id)
    aside = next(tmp_path.glob("aborted-*"))
    assert note == f"note: {tmp_path} held a run that left no checkpoint; its files were moved to {aside}"
    assert not with_id or aside.name == "aborted-" + "e" * 32
    assert {p.name: p.read_text() for p in aside.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([aside.name, "notes.txt", RUN_FILE])
    assert claim(tmp_path, run_id) is None  # its own files are never moved


def test_an_empty_or_new_folder_is_fine(tmp_path):
    run_id_for(tmp_path, None)
    run_id_for(tmp_path / "new" / "deeper", None)
    (tmp_path / "notes.txt").write_text("not a run file")
    run_id_for(tmp_path, None)


def test_resume_continues_the_checkpoints_run_id(tmp_path):
    ckpt = _ckpt(tmp_path, 2, "a" * 32)
    claim(tmp_path, "a" * 32)
    assert run_id_for(tmp_path, ckpt) == "a" * 32
    assert run_id_for(tmp_path / "elsewhere", ckpt) == "a" * 32  # a branch into an empty folder


def test_resume_into_another_runs_folder_is_refused(tmp_path):
    ckpt = _ckpt(tmp_path / "a", 2, "a" * 32)
    _ckpt(tmp_path / "b", 5, "b" * 32)  # no run.json: the folder's newest checkpoint tells its run
    with pytest.raises(RunFolderError, match=rf"belongs to run a{{32}}, but --out {tmp_path / 'b'} holds run b{{32}}"):
        run_id_for(tmp_path / "b", ckpt)


def test_a_checkpoint_without_id_resumes_with_the_folders_or_a_new_one(tmp_path):
    legacy = {"path": "x"}
    assert len(run_id_for(tmp_path, legacy)) == 32
    claim(tmp_path, "c" * 32)
    assert run_id_for(tmp_path, legacy) == "c" * 32


@pytest.mark.parametrize("out, message", [("", "Invalid out: ''"), ("   ", "Invalid out: '   '"),
                                          (None, "Invalid out: None")])
def test_empty_out_is_refused(out, message):
    with pytest.raises(RunFolderError, match=message + r" \(allowed: a folder path"):
        check_out(out)


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        run_id_for(tmp_path / "f", None)


def test_claim_removes_stale_temps(tmp_path):
    (tmp_path / ".ckpt-k1ll3d.tmp").write_bytes(b"\0" * 100)
    assert claim(tmp_path, "d" * 32) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_FILE]


def test_finished_summary(tmp_path):
    assert finished_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text("{\"final_loss\": 1.5}")
    assert finished_summary(tmp_path) == {"final_loss": 1.5}
    (tmp_path / "summary.json").write_text("{\"final_lo")  # torn: not a finished run
    assert finished_summary(tmp_path) is None


def _metrics(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def test_trim_keeps_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, range(1, 8))
    assert trim_jsonl(path, 4) is None
    assert [r["step"] for r in read_jsonl(path)[0]] == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # rewritten in place, no temp left


def test_a_torn_last_line_is_dropped_with_a_note(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, range(1, 5), tail='{"step": 5, "loss": 0.1')
    note = trim_jsonl(path, 4)
    assert note.startswith(f"{path}: dropped a torn last line") and "\n" not in note
    assert [r["step"] for r in read_jsonl(path)[0]] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "[1, 2]", "garbage"])
def test_a_bad_line_inside_the_file_names_file_and_line(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + bad + "\n" + json.dumps({"step": 3}) + "\n")
    before = path.read_text()
    with pytest.raises(RunFolderError, match=rf"{path} line 2 is not a JSON record"):
        trim_jsonl(path, 3)
    assert path.read_text() == before  # nothing lost


def test_resume_notes_warn_about_threads_and_world_size():
    assert resume_notes({"threads": 2, "world_size": 1}, {"threads": 2, "world_size": 1}) == []
    assert resume_notes(None, {"threads": 2, "world_size": 1}) == []  # older checkpoints: nothing to compare
    (note,) = resume_notes({"threads": 1, "world_size": 1}, {"threads": 2, "world_size": 1})
    assert note.startswith("warning: resuming with 2 threads, the checkpoint was written with 1") and "\n" not in note
    assert "4 processes" in resume_notes({"threads": 1, "world_size": 2}, {"threads": 1, "world_size": 4})[0]
