"""The smoke suite runs the whole study pipeline (sweep, ladder, report) and resumes without redoing runs."""
import json
import re
import subprocess
import sys


def test_smoke_suite_end_to_end_and_resume(tmp_path):
    out = tmp_path / "smoke"
    env_cache = {"LARGEBATCH_CACHE": str(tmp_path / "cache")}
    import os

    env = {**os.environ, **env_cache}
    cmd = [sys.executable, "-m", "largebatch.cli.main", "study", "smoke", "--out", str(out), "--threads", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "Did the paper's claim hold here?" in report and "| lamb |" in report and "| adamw |" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"lamb", "adamw"}
    for opt, row in results["table"].items():
        assert set(row) == {"16", "64"}
        assert row["64"]["n"] >= 2  # more seeds at the largest batch (a third where two overlap)
    for png in ("metric_vs_batch.png", "loss_curves.png", "lr_sweep.png", "steps_to_target.png"):
        assert (out / png).stat().st_size > 5_000
    # the √ rule: the larger batch's LR is the base LR × √4
    base = results["base_lr"]
    for opt in ("lamb", "adamw"):
        assert abs(results["table"][opt]["64"]["lr"] - 2 * base[opt]) < 1e-12
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")} == mtimes  # nothing redone
    for proc in (first, again):  # the progress bar ends exactly at its planned total
        done, total = re.findall(r"(\d+)/(\d+) \[", proc.stderr)[-1]
        assert done == total, proc.stderr[-500:]
    rebuilt = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "report", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0 and "Study `smoke`" in rebuilt.stdout
