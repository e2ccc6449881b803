"""The noise-scale check's pure functions (study/noise_check.py) on hand-computed numbers: S_min, the predicted
efficiency, B_simple pooled over windows, the steps to a training-loss target, the ranges and the verdict rule."""
import math

import pytest

from largebatch.study import noise_check as N
from largebatch.train.noise_scale import steps_model


def test_model_through_the_measured_smallest_batch():
    s_min = N.min_steps(1000, 16, 48)
    assert s_min == 250  # 1000 / (1 + 48/16)
    assert steps_model(16, s_min, 48) == 1000 and steps_model(64, s_min, 48) == 437.5
    assert N.predicted_efficiency(64, 16, 48) == pytest.approx(64 / 112)
    assert N.predicted_efficiency(64, 16, 48) == pytest.approx((1000 * 16 / 64) / 437.5)  # (S(b0)·b0/B)/S(B)
    assert N.predicted_efficiency(16, 16, 48) == 1


def test_pooled_b_simple_is_the_ratio_of_the_step_weighted_means():
    windows = [dict(step=100, window_steps=100, window_grad_sq_norm=2.0, window_grad_trace_cov=100.0,
                    window_b_simple=50.0),
               dict(step=200, window_steps=100, window_grad_sq_norm=1.0, window_grad_trace_cov=300.0,
                    window_b_simple=300.0),
               dict(step=250, window_steps=50, window_grad_sq_norm=4.0, window_grad_trace_cov=200.0,
                    window_b_simple=50.0),
               dict(step=300, window_steps=50, window_grad_sq_norm=-1.0, window_grad_trace_cov=200.0,
                    window_b_simple=None)]
    # windows ending in (250·0.75, 250]: steps 200 and 250; |G|² = (1·100 + 4·50)/150 = 2, tr Σ = 40000/150
    b, steps, spread = N.noise_near(windows, 250)
    assert b == pytest.approx(40000 / 150 / 2) and steps == 150 and spread == [300.0, 50.0]
    assert b != pytest.approx((300 + 50) / 2)  # not the mean of the windows' ratios
    assert N.noise_near(windows, 50) == (None, 0, [])
    assert N.window_estimates([{"step": 1}, windows[0]]) == [windows[0]]


def test_steps_to_a_training_loss_read_from_a_trailing_mean():
    steps, losses = list(range(1, 11)), [6, 5, 4, 6, 2, 2, 2, 2, 2, 2]
    assert N.steps_to_train_loss(steps, losses, 3.9, smooth=0.2) == 6  # mean of 2 records: (6+2)/2 > 3.9 at 5
    assert N.steps_to_train_loss(steps, losses, 3.9, smooth=0.01) == 5  # one record
    assert N.steps_to_train_loss(steps, losses, 4.0, smooth=0.2) == 5  # at or below
    assert N.steps_to_train_loss(steps, losses, 1.0) is None
    assert N.median_reached([None, 10, 20]) == 15 and N.median_reached([None]) is None


def test_measured_and_predicted_ranges_and_the_verdict_rule():
    assert N.efficiency_range([1000, 1200], [300, 400], 16, 64) == pytest.approx((250 / 400, 300 / 300))
    assert N.efficiency_range([1000, 1200], [300, 400], 16, 64, bound0=True, bound=True) == (0.0, math.inf)
    assert N.efficiency_range([1000], [None, None], 16, 64) is None
    assert N.predicted_range(64, 16, [16.0, 48.0]) == pytest.approx((32 / 80, 64 / 112))
    assert N.predicted_range(64, 16, [16.0, None])[1] == 1.0  # a window with |G|² <= 0: B_simple unbounded
    assert N.predicted_range(64, 16, [None]) is None
    pred = (0.4, 64 / 112)
    assert N.judge((0.625, 1.0), pred) == "better"
    assert N.judge((0.2, 0.39), pred) == "worse"
    assert N.judge((0.55, 0.7), pred) == "holds"
    assert N.judge(None, pred, reached=False, predicted_steps=500, total_steps=100) == "consistent"
    assert N.judge(None, pred, reached=False, predicted_steps=50, total_steps=100) == "not reached"
    assert N.judge((0.5, 0.6), None) == "n/a"


def test_the_verdict_sentence():
    assert N.summary_sentence({64: "holds", 256: "holds", 1024: "holds"}) == "**holds** at every batch"
    assert N.summary_sentence({64: "holds", 256: "holds", 1024: "better"}) == \
        "**holds up to batch 256**, fails above (scales better than predicted at 1024)"
    assert N.summary_sentence({64: "worse", 256: "not reached"}) == ("**fails** at every batch above the smallest "
                                                                     "(scales worse than predicted at 64; the target "
                                                                     "not reached where predicted at 256)")
    assert N.summary_sentence({64: "better", 256: "holds"}) == \
        "**holds at 256**, fails elsewhere (scales better than predicted at 64)"
    assert N.summary_sentence({64: "n/a"}) == "not judged (no batch to compare)"


def test_the_committed_check_reproduced(tmp_path):
    """scripts/noise_scale_check.py over the committed runs rewrites docs/results/noise-scale/check.json."""
    import json
    import runpy
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = root / "docs" / "results" / "noise-scale" / "runs"
    argv = ["noise_scale_check.py", "--runs", *[str(runs / n) for n in ("mlm-lamb", "mlm-adamw", "image-lamb",
                                                                         "image-adamw", "image-sgd")],
            "--results", str(root / "docs" / "results"), "--out", str(tmp_path),
            "--results-of", "image-scaling", "image-scaling-no-exclusions",
            # mlm-scaling's results as the check read them (the suite's rerun moves LAMB's ladder since)
            "--results-of", "mlm-scaling", "noise-scale/inputs/mlm-scaling-2026-12-01"]
    old = sys.argv
    try:
        sys.argv = argv
        runpy.run_path(str(root / "scripts" / "noise_scale_check.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert json.loads((tmp_path / "check.json").read_text()) == \
        json.loads((root / "docs" / "results" / "noise-scale" / "check.json").read_text())
    assert (tmp_path / "prediction.png").stat().st_size > 10_000


def test_the_report_section_on_the_committed_runs_gives_the_hand_made_verdicts():
    """noise_section over the committed mlm-scaling ladder and the committed noise-scale runs (read, as probes):
    the README of docs/results/noise-scale: B_simple 180 (127–312) for LAMB, holding at every batch; 1,405 for
    AdamW, failing (worse than predicted)."""
    import json
    from pathlib import Path

    from largebatch.study import analysis as A
    from largebatch.study import runs as R
    from largebatch.study.suites import get_suite

    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    suite = get_suite("mlm-scaling")
    import math

    base = {"lamb": 3e-3, "adamw": 1e-3}  # the √-rule ladders the check read (the rerun adds LAMB's from 0.0052)
    seeds = {16: 2, 64: 2, 256: 2, 1024: 3}  # the seeds the check read (the rerun adds third seeds where two overlap)
    ladder = [r for r in R.load_runs(root / "mlm-scaling") if r.get("kind") == "ladder" and r["optimizer"] in base
              and math.isclose(r["lr"], base[r["optimizer"]] * math.sqrt(r["batch_size"] / 16), rel_tol=1e-6)
              and r["seed"] < seeds[r["batch_size"]]]
    probes = [{"optimizer": opt, "batch_size": 16, "lr": lr, "kind": N.PROBE_KIND, "dir": str(root / "noise-scale" /
               "runs" / f"mlm-{opt}"), "run": f"mlm-{opt}", "steps": 5134} for opt, lr in (("lamb", 3e-3), ("adamw", 1e-3))]
    table = A.build_table(ladder, suite.metric, suite.target)
    section = N.noise_section(ladder + probes, table, A.steps_table(table), suite)
    lamb, adamw = section["optimizers"]["lamb"], section["optimizers"]["adamw"]
    assert round(lamb["b_noise_used"]) == 180 and [round(v) for v in lamb["window_range"]] == [127, 312]
    assert lamb["verdict"] == "**holds** at every batch"
    assert round(adamw["b_noise_used"]) == 1405 and adamw["windows_unbounded"] == 1
    assert [adamw["judged"][b]["verdict"] for b in (64, 256, 1024)] == ["worse", "worse", "not reached"]
    check = json.loads((root / "noise-scale" / "check.json").read_text())[0]
    assert lamb["train_loss_rows"] == check["train_loss_rows"]
