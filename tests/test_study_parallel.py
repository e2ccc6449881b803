"""`largebatch study --jobs N`: the runs of a stage train at once in worker processes, with the same results as
one at a time; a second study process on the same folder is refused."""
import json
import os
import subprocess
import sys

import pytest

from largebatch.study.runner import LOCK_FILE, StudyBusyError, SuiteRunner, study_lock
from largebatch.study.suites import Suite

TIMING = {"samples_per_s", "run_id", "seconds", "wall_s"}

TINY = Suite("tiny", "mlm", batches=(16, 32), epochs=1.0, warmup_steps=2, micro_batch_size=16,
             lr_grids={"lamb": (3e-3, 1e-2), "adamw": (1e-3, 3e-3)},
             task_options=dict(vocab_size=256, seq_len=16, hidden=16, layers=1, heads=2, intermediate=32,
                               limit_train_sequences=96, max_eval_sequences=32),
             seeds=1, seeds_largest=2, target=0.01, extend_grid=1, eval_points=3, noise_probe=4,
             noise_loss_target=6.5)


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def _results(out):
    runs = {}
    for d in sorted((out / "runs").iterdir()):
        if not (d / "summary.json").exists():
            continue
        metrics = [_strip(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((d / "config.json").read_text())
        config.pop("out")
        runs[d.name] = (_strip(json.loads((d / "summary.json").read_text())), metrics, config)
    return runs, json.loads((out / "study.json").read_text())


def test_jobs_give_the_same_study_as_one_run_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    SuiteRunner(TINY, tmp_path / "one", threads=1, progress=False).run()
    SuiteRunner(TINY, tmp_path / "two", threads=1, progress=False, jobs=2).run()
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert set(one[0]) == set(two[0]) and len(one[0]) >= 10  # sweeps, tuned control, ladder, seeds, probes
    for name in one[0]:
        assert one[0][name] == two[0][name], name  # bit for bit: losses, LRs, evaluations, summaries
    assert one[1] == two[1]  # the same chosen and tuned LRs
    assert not (tmp_path / "two" / LOCK_FILE).read_text()  # released


def test_a_second_study_process_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "study"
    with study_lock(out):
        with pytest.raises(StudyBusyError, match=f"pid {os.getpid()}.*{out}"):
            SuiteRunner(TINY, out, threads=1, progress=False).run()
        cli = subprocess.run([sys.executable, "-m", "largebatch", "study", "smoke", "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 2 and f"another study process (pid {os.getpid()})" in cli.stderr
        assert not (out / "runs").exists()  # nothing was trained or touched
    with study_lock(out):  # free again once the holder is done
        pass


def test_invalid_jobs(tmp_path):
    with pytest.raises(ValueError, match="Invalid jobs: 0"):
        SuiteRunner(TINY, tmp_path, jobs=0)
    cli = subprocess.run([sys.executable, "-m", "largebatch", "study", "smoke", "--out", str(tmp_path / "s"),
                          "--jobs", "0"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "Invalid --jobs: 0 (allowed: an integer >= 1)" in cli.stderr


SLOW = """
import sys, dataclasses
sys.path.insert(0, {tests!r})
from test_study_parallel import TINY
from largebatch.study.runner import SuiteRunner
if __name__ == "__main__":
    suite = dataclasses.replace(TINY, epochs=200.0)  # runs long enough to be killed in the middle
    SuiteRunner(suite, {out!r}, threads=1, progress=False, jobs=2).run()
"""


def _children(pid: int) -> list[int]:
    from pathlib import Path

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_with_a_killed_study_process(tmp_path, monkeypatch):
    """`kill` of the study process (SIGTERM: no Python cleanup) takes its training workers with it within
    seconds: an orphan would keep writing a run that the next study process resumes."""
    import signal
    import time
    from pathlib import Path

    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    script = tmp_path / "study.py"
    script.write_text(SLOW.format(tests=str(Path(__file__).parent), out=str(tmp_path / "s")))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "s" / "runs").glob("*/metrics.jsonl")):
            time.sleep(0.5)
        workers = [k for k in _children(proc.pid) if k != proc.pid]
        assert workers, "no worker process started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
                       for w in workers)
    finally:
        proc.kill()


def test_a_worker_started_after_the_sources_changed_refuses_to_run():
    """Workers are spawned and import the package from disk: one started after the sources changed (an upgrade,
    an edit) would run other code than the study process. It stops with what to do (rerun: it resumes)."""
    from largebatch.study import runner

    with pytest.raises(RuntimeError, match="sources changed on disk while this study ran.*rerun the study"):
        runner._worker_init(False, os.getpid(), "0" * 16)
    assert runner._source_stamp() == runner.CODE_STAMP  # the stamp is that of the files as they are
