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
    # the noise-scale probes: one per optimizer at batch 16 with the chosen LR, micro-batch 8, B_simple logged,
    # out of the ladder's table; the report's section compares them with the ladder
    for opt in ("lamb", "adamw"):
        probe = out / "runs" / f"noise-{opt}-b16-lr{base[opt]:.3g}-s0"
        cfg, summary = (json.loads((probe / f).read_text()) for f in ("config.json", "summary.json"))
        assert (cfg["micro_batch_size"], cfg["batch_size"], cfg["noise_scale"], summary["kind"]) == (8, 16, True,
                                                                                                     "noise-probe")
        assert summary["steps"] == min(summary["total_steps"], cfg["stop_after_steps"] or summary["total_steps"])
        assert any("window_b_simple" in line for line in (probe / "metrics.jsonl").read_text().splitlines())
        assert results["table"][opt]["16"]["n"] == 1
        assert set(results["noise_scale"]["optimizers"][opt]["judged"]) == {"64"}
    assert "## Does the gradient noise scale predict how far the batch can grow?" in report
    assert "| lamb | 64 |" in report and (out / "noise_prediction.png").stat().st_size > 5_000
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


def test_a_suite_on_the_users_own_corpus(tmp_path):
    """`largebatch study mlm-scaling --data ... --eval-data ...`: the files reach every run as the trainer's data
    fields (config.json) and the report names them with their sizes."""
    import random

    from largebatch.study.report import build_report
    from largebatch.study.runner import SuiteRunner
    from largebatch.study.suites import Suite

    rng = random.Random(0)
    words = "king queen crown sword love night day heart blood death life war peace sea land fire".split()
    for name, lines in (("train.txt", 600), ("held.txt", 100)):
        (tmp_path / name).write_text("".join(" ".join(rng.choice(words) for _ in range(16)) + ".\n"
                                             for _ in range(lines)))
    data, held = [str(tmp_path / "train.txt")], [str(tmp_path / "held.txt")]
    suite = Suite("own", "mlm", batches=(16,), epochs=1.0, warmup_steps=1, micro_batch_size=16,
                  lr_grids={"lamb": (3e-3,)}, seeds=1, seeds_largest=1, extend_grid=0, refine_factor=0.0,
                  task_options=dict(vocab_size=128, seq_len=16, hidden=16, layers=1, heads=2, intermediate=32,
                                    data=data, eval_data=held, max_eval_sequences=32))
    SuiteRunner(suite, tmp_path / "own", threads=1, progress=False).run()
    config = json.loads((tmp_path / "own" / "runs" / "lamb-b16-lr0.003-s0" / "config.json").read_text())
    assert config["data"] == data and config["eval_data"] == held and "data" not in config["task_options"]
    report = build_report(tmp_path / "own", suite).read_text()
    size = (tmp_path / "train.txt").stat().st_size
    assert f"- data: `{data[0]}` ({size:,} bytes)" in report and f"--data {data[0]} --eval-data {held[0]}" in report
