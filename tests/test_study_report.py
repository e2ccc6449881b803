"""The study report builder on synthetic study directories (no training): verdicts, sweep notes, two-phase and
finetune sections, plots, results.json, and the errors of `largebatch report`."""
import json
import math

import pytest

from largebatch.study import analysis as A
from largebatch.study import markdown as M
from largebatch.study import report as R
from largebatch.study import runs
from largebatch.study import stats as S
from largebatch.study import verdicts as V
from largebatch.study.suites import Suite

MLM = Suite("synthetic-mlm", "mlm", batches=(16, 64, 256), epochs=1.0, warmup_steps=2, micro_batch_size=256,
            lr_grids={"lamb": (1e-3, 3e-3), "adamw": (1e-3, 3e-3), "lars": (1e-3, 3e-3)}, target=0.5,
            description="synthetic")
IMG = Suite("synthetic-img", "image", batches=(16, 256), epochs=1.0, warmup_steps=2, micro_batch_size=256,
            lr_grids={"lamb": (1e-3,), "sgd": (1e-2,)}, target=0.5, description="synthetic images")
FT = Suite("synthetic-ft", "classify", batches=(32,), epochs=1.0, warmup_steps=1, micro_batch_size=32,
           lr_grids={"adamw": (1e-3,)}, source="synthetic-mlm", description="synthetic finetune")

TENSORS = ["emb.weight", "layer.0.dense.weight", "layer.1.dense.weight", "head.weight",
           "emb.norm.weight", "layer.0.dense.bias", "layer.1.dense.bias", "head.bias"]


def write_run(study, name, *, optimizer, batch, lr=1e-3, seed=0, kind="ladder", acc=0.6, steps=8, sps=100.0,
              val_loss=2.0, diverged=False, trust=False, phases=None, extra=None, final_val=None):
    d = study / "runs" / name
    d.mkdir(parents=True)
    lines, samples = [], 0
    for s in range(1, steps + 1):
        pb = batch
        rec = {"step": s, "lr": lr, "loss": 3.0 - s / steps, "count": pb, "skipped_steps": 0}
        if phases:
            pi = 0 if s <= phases[0]["steps"] else 1
            pb = phases[pi]["batch_size"]
            rec["phase"] = pi + 1
        samples += pb
        rec.update(samples=samples, samples_per_s=sps)
        if s % 2 == 0 or s == steps:
            rec["validation_accuracy"] = (final_val if final_val is not None else acc) * s / steps
            rec["validation_loss"] = val_loss + (steps - s) / steps
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if trust:
        (d / "trust.jsonl").write_text("".join(
            json.dumps({"step": s, "trust_ratio": {t: 0.01 * (i + 1) * s for i, t in enumerate(TENSORS)}}) + "\n"
            for s in range(1, steps + 1)))
    (d / "config.json").write_text(json.dumps({"batch_size": batch, "lr": lr, "warmup_steps": 2, "epochs": 1.0}))
    summary = {"task": "mlm", "optimizer": optimizer, "batch_size": batch, "lr": lr, "seed": seed, "kind": kind,
               "total_steps": steps, "diverged": diverged, "final_loss": 2.0,
               "validation_loss": float("nan") if diverged else val_loss,
               "test_accuracy": float("nan") if diverged else acc, "test_loss": 2.0, "test_unigram_accuracy": 0.1,
               "run": name, **(extra or {})}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def ladder(study, optimizer, accs: dict, *, trust=False, lr0=1e-3):
    """accs: batch -> list of test accuracies (one per seed); a None entry is a diverged run."""
    for b, vals in accs.items():
        for seed, a in enumerate(vals):
            write_run(study, f"{optimizer}-b{b}-s{seed}", optimizer=optimizer, batch=b, lr=lr0 * math.sqrt(b / 16),
                      seed=seed, acc=a if a is not None else 0.0, diverged=a is None, trust=trust,
                      steps=max(2, 64 // (b // 16)))


def sweep(study, optimizer, losses: dict):
    for lr, v in losses.items():
        write_run(study, f"{optimizer}-sweep-lr{lr}", optimizer=optimizer, batch=16, lr=lr, kind="sweep",
                  val_loss=v if v is not None else 1.0, diverged=v is None)


def no_nan(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in results.json"))


def claims_of(study_dir):
    return {c["optimizer"]: c["status"] for c in json.loads((study_dir / "results.json").read_text())["claims"]}


def test_lamb_holds_adamw_degrades_lars_diverges(tmp_path):
    ladder(tmp_path, "lamb", {16: [0.60, 0.61], 64: [0.60, 0.61], 256: [0.60, 0.605, 0.595]}, trust=True)
    ladder(tmp_path, "adamw", {16: [0.60, 0.61], 64: [0.58, 0.59], 256: [0.50, 0.51, 0.52]})
    ladder(tmp_path, "lars", {16: [0.60, 0.61], 64: [0.55, 0.56], 256: [None, 0.30, None]}, trust=True)
    sweep(tmp_path, "lamb", {3e-4: 2.5, 3e-3: 2.2})
    (tmp_path / "study.json").write_text(json.dumps({"suite": MLM.name, "base_lr": {"lamb": 1e-3, "adamw": 1e-3,
                                                                                   "lars": 1e-3}}))
    md = R.build_report(tmp_path, MLM).read_text()
    assert claims_of(tmp_path) == {"lamb": "held", "adamw": "held", "lars": "held"}
    results = no_nan((tmp_path / "results.json").read_text())
    assert results["table"]["lars"]["256"]["diverged"] == 2 and results["table"]["lars"]["256"]["n"] == 3
    assert results["table"]["adamw"]["256"]["mean"] == pytest.approx(0.51)
    assert results["table"]["adamw"]["256"]["spread"] == pytest.approx(0.01)
    cmp = results["comparison_at_largest"]
    assert [r["optimizer"] for r in cmp["ranking"]][:2] == ["lamb", "adamw"]
    assert cmp["vs_ref"]["adamw"]["status"] == "below"
    assert "- **adamw**: degraded over 16× the batch" in md and "- **lamb**: kept its quality" in md
    assert "2 diverged" in md and "Did the paper's claim hold here?" in md and "| lamb |" in md
    assert "Unigram baseline" in md and "0.1000" in md
    # headers: commands and compute time (Σ batch / samples_per_s = Σ samples / 100 samples/s)
    assert f"largebatch study {MLM.name} --out {tmp_path}" in md and f"largebatch report {tmp_path}" in md
    total_samples = sum(runs.load_metrics(r["dir"])["last_samples"] for r in runs.load_runs(tmp_path))
    assert results["header"]["compute_hours"] == pytest.approx(total_samples / 100 / 3600)
    assert results["header"]["versions"]["torch"]


def test_within_spread_is_inconclusive_and_one_seed_is_inconclusive(tmp_path):
    ladder(tmp_path, "lamb", {16: [0.60], 256: [0.55]})
    ladder(tmp_path, "adamw", {16: [0.60, 0.64], 256: [0.59, 0.61]})
    R.build_report(tmp_path, MLM)
    claims = claims_of(tmp_path)
    assert claims["adamw"] == "inconclusive"  # drop 0.02 within the spread ±0.03
    assert claims["lamb"] == "inconclusive"   # one seed at each end: no spread to judge against
    assert claims["lars"] == "not measured"
    table = A.build_table(runs.load_runs(tmp_path), "accuracy", None)
    assert "within the seed spread" in V.verdicts(table, "accuracy")[0 if list(table)[0] == "adamw" else 1]


def test_claim_rules_directly():
    def cell(vals, diverged=0):
        m, s = S.mean_spread(vals)
        return {"mean": m, "spread": s, "n": len(vals), "diverged": diverged, "unigram": None}

    table = {"lamb": {16: cell([0.6, 0.62]), 256: cell([0.5, 0.51])},       # drop 0.105 > 0.015: did not hold
             "adamw": {16: cell([0.5, 0.51]), 256: cell([0.6, 0.61])}}      # rose beyond spread: did not hold
    claims = {c["optimizer"]: c for c in V.claim_summary(table, "image", "accuracy", ladder=(16, 256, 1024))}
    assert claims["lamb"]["status"] == "did not hold" and claims["adamw"]["status"] == "did not hold"
    assert "ladder incomplete" in claims["lamb"]["text"]
    assert "lars" not in claims  # the LARS part is only about the attention model (MLM)
    flat = {"lamb": {16: cell([0.10, 0.11]), 256: cell([0.10, 0.10])}}
    assert V.claim_summary(flat, "mlm", "accuracy", unigram=0.12)[0]["status"] == "inconclusive"  # at the unigram level
    assert V.claim_summary(flat, "mlm", "accuracy", unigram=0.05)[0]["status"] == "held"
    table["lamb"][256] = cell([float("nan")], diverged=1)
    assert V.claim_summary(table, "mlm", "accuracy")[0]["status"] == "did not hold"


def test_sweep_notes_near_tie_edge_and_divergence(tmp_path):
    pts = [{"lr": 1e-3, "validation_loss": 2.00, "diverged": False},
           {"lr": 3e-3, "validation_loss": 2.03, "diverged": False},
           {"lr": 1e-2, "validation_loss": None, "diverged": True}]
    notes = " | ".join(A.sweep_notes(pts, 1e-3))
    assert "near-tie between 0.001 and 0.003" in notes
    assert "grid edge (the lowest LR tried)" in notes
    assert "diverged / non-finite at LR 0.01" in notes
    clear = A.sweep_notes([{"lr": 1e-3, "validation_loss": 3.0, "diverged": False},
                           {"lr": 3e-3, "validation_loss": 2.0, "diverged": False},
                           {"lr": 1e-2, "validation_loss": 2.5, "diverged": False}], 3e-3)
    assert not any("edge" in n or "near-tie" in n for n in clear) and "clear optimum" in clear[0]
    # from files: the chosen LR's run is relabelled "ladder" by the runner and still belongs to the sweep
    sweep(tmp_path, "adamw", {1e-3: 2.5, 1e-2: None})
    write_run(tmp_path, "adamw-b16-lr0.003-s0", optimizer="adamw", batch=16, lr=3e-3, val_loss=2.0)
    s = A.sweep_table(runs.load_runs(tmp_path), None, 16)["adamw"]
    assert [p["lr"] for p in s["points"]] == [1e-3, 3e-3, 1e-2]
    assert s["chosen"] == 3e-3 and s["provisional"]
    md = "\n".join(M.md_sweep({"adamw": s}))
    assert "**0.003 → 2.0000**" in md and "0.01 → ✗ diverged" in md and "provisional" in md


def test_two_phase_section(tmp_path):
    ladder(tmp_path, "lamb", {16: [0.6], 64: [0.6, 0.6]}, trust=True)
    phases = [dict(batch_size=64, seq_len=16, lr=0.02, warmup_steps=2, epochs=0.9, steps=4),
              dict(batch_size=32, seq_len=32, lr=0.014, warmup_steps=1, epochs=0.1, optimizer_state="reset_step",
                   steps=2)]
    for seed, (a, b) in enumerate([(0.50, 0.40), (0.52, 0.42)]):
        write_run(tmp_path, f"two-phase-s{seed}", optimizer="lamb", batch=32, kind="two-phase", seed=seed, acc=a,
                  steps=6, phases=phases, trust=True, extra={"seq_len": 32, "phases": phases})
        write_run(tmp_path, f"twin-s{seed}", optimizer="lamb", batch=32, kind="two-phase-twin", seed=seed, acc=b,
                  steps=10, trust=True, extra={"seq_len": 32})
    tp = A.two_phase_table(runs.load_runs(tmp_path))
    a, b = tp["two-phase"], tp["two-phase-twin"]
    assert a["n"] == b["n"] == 2 and a["steps"] == 6 and b["steps"] == 10
    assert a["accuracy_mean"] == pytest.approx(0.51) and a["accuracy_spread"] == pytest.approx(0.01)
    assert a["samples"] == 4 * 64 + 2 * 32 and a["tokens"] == 4 * 64 * 16 + 2 * 32 * 32
    assert b["tokens"] == 10 * 32 * 32 and a["phase_starts"] == [(1, 1), (5, 2)]
    assert "beat its single-phase twin" in V.two_phase_comparison(tp) and "(0.60×)" in V.two_phase_comparison(tp)
    md = R.build_report(tmp_path, MLM).read_text()
    assert "phase 2: batch 32, sequence length 32, LR 0.014, warmup 1, 0.1 epochs, optimizer state: reset_step" in md
    assert "single-phase twin, single phase: batch 32, sequence length 32" in md
    assert (tmp_path / "two_phase.png").stat().st_size > 5_000


def test_all_plots_written_and_results_hold_the_report(tmp_path):
    ladder(tmp_path, "lamb", {16: [0.6, 0.61], 64: [0.6], 256: [0.6, 0.6]}, trust=True)
    ladder(tmp_path, "adamw", {16: [0.6, 0.61], 64: [0.55], 256: [0.5, 0.5]})
    sweep(tmp_path, "lamb", {3e-4: 2.5, 3e-3: 2.2})
    sweep(tmp_path, "adamw", {3e-4: 2.5, 3e-3: 2.2})
    md = R.build_report(tmp_path, MLM).read_text()
    expected = ["metric_vs_batch.png", "loss_curves.png", "validation_curves.png", "lr_sweep.png",
                "steps_to_target.png", "trust_ratios.png", "trust_layers.png"]
    results = no_nan((tmp_path / "results.json").read_text())
    assert results["files"] == expected
    for png in expected:
        assert (tmp_path / png).stat().st_size > 5_000, png
        assert f"]({png})" in md
    assert set(results["table"]["lamb"]) == {"16", "64", "256"}
    st = results["steps_to_target"]["lamb"]
    # batch 16: 64 steps, the target 0.5 first reached at the evaluation of step 54 (both seeds); batch 256:
    # 4 steps, reached at step 4 -> efficiency (54 × 16 / 256) / 4
    assert st["16"]["reached"] == 2 and st["16"]["median_steps"] == 54 and st["256"]["median_steps"] == 4
    assert st["256"]["efficiency"] == pytest.approx(54 * 16 / 256 / 4)
    assert results["sweep"]["lamb"]["provisional"] and results["base_lr"] is None
    assert "provisional" in md and "Steps to the validation target" in md and "| lamb |" in md


def test_precise_bn_table_for_images(tmp_path):
    for opt, accs in {"lamb": {16: [0.9, 0.91], 256: [0.88, 0.9]}, "sgd": {16: [0.9, 0.9], 256: [0.7, 0.72]}}.items():
        for b, vals in accs.items():
            for seed, a in enumerate(vals):
                write_run(tmp_path, f"{opt}-b{b}-s{seed}", optimizer=opt, batch=b, seed=seed, acc=a,
                          extra={"task": "image", "test_precise_bn_accuracy": a + 0.01, "test_precise_bn_loss": 0.3,
                                 "test_unigram_accuracy": None})
    md = R.build_report(tmp_path, IMG).read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["precise_bn_table"]["sgd"]["256"]["mean"] == pytest.approx(0.72)
    assert "with precise BN" in md and "not tested by this suite" in md and "Unigram" not in md
    assert claims_of(tmp_path)["lamb"] == "held"


def test_finetune_report(tmp_path):
    for opt, rows in {"lamb": {16: [0.80, 0.82], 1024: [0.79]}, "adamw": {16: [0.80], 1024: [0.60, 0.62]}}.items():
        for b, vals in rows.items():
            for seed, a in enumerate(vals):
                write_run(tmp_path, f"ft-{opt}-b{b}-s{seed}", optimizer="adamw", batch=32, kind="finetune", acc=a,
                          extra={"pretrain_optimizer": opt, "pretrain_batch": b, "pretrain_seed": seed,
                                 "pretrain_test_accuracy": 0.3, "test_macro_f1": a - 0.05})
    md = R.build_report(tmp_path, FT).read_text()
    assert "| lamb | 1024 | 0.7900 ± 0.0000 | 0.7400 ± 0.0000 | 0.3000 ± 0.0000 | 1 |" in md
    assert "| adamw | 1024 | 0.6100 ± 0.0100 | 0.5600 ± 0.0100 | 0.3000 ± 0.0000 | 2 |" in md
    assert "- **adamw**: degraded over 64× the batch" in md
    assert (tmp_path / "finetune_vs_batch.png").stat().st_size > 5_000
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["table"]["lamb"]["16"]["mean"] == pytest.approx(0.81)
    assert f"largebatch report {tmp_path}" in md
    assert "## Baselines" not in md
    for seed, a in enumerate((0.70, 0.90)):  # a random encoder as good as the pre-trained ones
        write_run(tmp_path, f"ft-random-encoder-s{seed}", optimizer="adamw", batch=32, kind="finetune-baseline",
                  acc=a, extra={"baseline": "random encoder", "test_macro_f1": a})
    md = R.build_report(tmp_path, FT).read_text()
    assert "| random encoder | 0.8000 ± 0.1000 | 0.8000 ± 0.1000 | 2 |" in md
    assert "**No pre-trained encoder beats the random encoder beyond the spread**: at this size" in md
    assert "- 1 pre-trained cell(s) fall below the random encoder beyond the spread: adamw 1024" in md


def test_model_order_places_no_decay_tensors_after_their_weights():
    order = runs.model_order(["stem.0.weight", "stages.0.conv1.weight", "stages.0.conv2.weight", "head.weight",
                           "stem.1.weight", "stem.1.bias", "stages.0.bn1.weight", "head.bias"])
    assert order[0] == "stem.0.weight" and order[-1] == "head.bias"
    assert order.index("stem.1.weight") < order.index("stages.0.conv1.weight")
    assert order.index("stages.0.bn1.weight") < order.index("head.weight")


def test_partial_metrics_and_errors(tmp_path, capsys):
    from largebatch.cli.main import main

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "runs")):
        R.build_report(tmp_path, MLM)
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs under" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    # a run still in progress: counted apart, a half-written last line ignored
    ladder(tmp_path, "lamb", {16: [0.6]})
    d = tmp_path / "runs" / "lamb-b64-s0"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": 64, "loss": 3.0, "samples_per_s": 64.0})
                                     + "\n{\"step\": 2, \"sam")
    md = R.build_report(tmp_path, MLM).read_text()
    assert "study still running" in md and "lamb-b64-s0" in md and "not measured yet" in md
    assert runs.load_metrics(d)["compute_s"] == pytest.approx(1.0)


def test_cli_suite_option_for_a_directory_without_study_json(tmp_path, capsys):
    from largebatch.cli.main import main

    study = tmp_path / "somewhere"
    write_run(study, "lamb-b16-s0", optimizer="lamb", batch=16, extra={"task": "image"})
    assert main(["report", str(study), "--suite", "nope"]) == 2
    assert "Invalid suite" in capsys.readouterr().err
    assert main(["report", str(study), "--suite", "image-scaling"]) == 0
    assert "Study `image-scaling`" in capsys.readouterr().out


def test_a_target_met_at_the_first_evaluation_is_only_an_upper_bound(tmp_path):
    for seed in (0, 1):  # batch 16: met at its first evaluation (step 2); batch 256: at step 8, its last
        write_run(tmp_path, f"lamb-b16-s{seed}", optimizer="lamb", batch=16, seed=seed, steps=64, final_val=20.0)
        write_run(tmp_path, f"lamb-b256-s{seed}", optimizer="lamb", batch=256, seed=seed, steps=8, acc=0.6)
        write_run(tmp_path, f"adamw-b16-s{seed}", optimizer="adamw", batch=16, seed=seed, steps=64, final_val=20.0)
        write_run(tmp_path, f"adamw-b256-s{seed}", optimizer="adamw", batch=256, seed=seed, steps=8, final_val=20.0)
    table = A.build_table(runs.load_runs(tmp_path), "accuracy", 0.5)
    st = A.steps_table(table)["lamb"]
    assert st[16]["upper_bound"] and st[16]["median_steps"] == 2 and not st[256]["upper_bound"]
    assert st[256]["efficiency"] == pytest.approx(2 * 16 / 256 / 8) and st[256]["efficiency_bound"] == "≤"
    both = A.steps_table(table)["adamw"][256]  # both ends at a first evaluation: no efficiency at all
    assert both["upper_bound"] and both["efficiency"] is None
    md = "\n".join(M.md_steps(A.steps_table(table), "accuracy", 0.5))
    assert "| lamb | ≤ 2 (2/2, eff 1.00) | 8 (2/2, eff ≤ 0.02) |" in md


def test_tuned_control_gives_both_readings(tmp_path):
    """AdamW: the √ rule's LR was bad (its own LR does better beyond the spread) but even tuned it stays below
    LAMB beyond the spread; LAMB: the √-rule LR is its best. Long baseline and ablation rows are shown."""
    study = tmp_path / "synthetic-img"
    ladder(study, "lamb", {16: [0.90, 0.90], 256: [0.88, 0.89, 0.88]})
    ladder(study, "adamw", {16: [0.90, 0.90], 256: [0.70, 0.71, 0.70]})
    for lr, v in ((2e-3, 2.0), (4e-3, 1.5), (8e-3, 1.0)):  # lamb's tuned sweep: the √-rule LR 4e-3 is not best
        write_run(study, f"lamb-t{lr}", optimizer="lamb", batch=256, lr=lr, kind="tuned-sweep", val_loss=v, acc=0.885)
    for lr, v in ((1e-3, 2.0), (8e-3, 1.0)):
        write_run(study, f"adamw-t{lr}", optimizer="adamw", batch=256, lr=lr, kind="tuned-sweep", val_loss=v, acc=0.80)
    for seed, a in ((1, 0.81), (2, 0.80)):
        write_run(study, f"adamw-tuned-s{seed}", optimizer="adamw", batch=256, lr=8e-3, seed=seed, kind="tuned", acc=a)
    write_run(study, "long-lamb", optimizer="lamb", batch=16, lr=1e-3, kind="long-baseline", acc=0.92,
              extra={"epochs": 2.0})
    abl = tmp_path / "ablated"
    ladder(abl, "lamb", {16: [0.89, 0.89], 256: [0.84, 0.85]})
    suite = Suite("synthetic-img", "image", batches=(16, 256), epochs=1.0, warmup_steps=2, micro_batch_size=256,
                  lr_grids={"lamb": (1e-3,), "adamw": (1e-3,)}, ablation="ablated", description="synthetic")
    (study / "study.json").write_text(json.dumps({"suite": "x", "base_lr": {"lamb": 1e-3, "adamw": 1e-3},
                                                  "tuned_lr": {"batch": 256, "lamb": 8e-3, "adamw": 8e-3}}))
    text = R.build_report(study, suite).read_text()
    assert "## Tuned control at the largest batch (256)" in text
    assert "**adamw** at batch 256: **the √ rule gave it a bad LR**" in text
    assert "**adamw does not reach lamb's quality with any LR tried**" in text
    assert "| lamb | 0.004 | 0.8833 ± 0.0050 (3) | 0.008 | 0.8850 ± 0.0000 (1) |" in text
    assert "| lamb | 16 | 2 | 0.9200 | 0.9000 ± 0.0000 | +0.0200 |" in text
    assert "| lamb | ablated | 0.8900 ± 0.0000 (2) | 0.8450 ± 0.0050 (2) |" in text
    assert "Design rules applied by the runner" in text
    res = no_nan((study / "results.json").read_text())
    assert res["tuned_control"]["adamw"]["tuned"]["n"] == 3 and res["ablation"]["suite"] == "ablated"


def test_the_users_corpus_is_named_with_its_size(tmp_path, capsys):
    corpus = tmp_path / "my.txt"
    corpus.write_text("to be or not to be\n" * 10)
    study = tmp_path / "synthetic-mlm"
    ladder(study, "lamb", {16: [0.5], 64: [0.5]})
    for cfg in study.glob("runs/*/config.json"):
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "task_options": {"data": str(corpus)}}))
    text = R.build_report(study, MLM).read_text()
    assert f"- data: `{corpus}` (190 bytes)" in text
    assert f"largebatch study synthetic-mlm --out {study} --data {corpus}" in text
    from largebatch.cli.main import main

    assert main(["study", "image-scaling", "--data", str(corpus), "--out", str(tmp_path / "img")]) == 2
    assert "Invalid --data for suite 'image-scaling' (allowed: a suite of the mlm task: mlm-scaling | smoke)" \
        in capsys.readouterr().err


def test_ladder_runs_at_a_superseded_lr_leave_the_table(tmp_path):
    """A study resumed under a rule that changed the base LR (e.g. the near-tie refinement): the old ladder runs
    stay on disk but leave the table; the old chosen run stays a sweep point."""
    study = tmp_path / "synthetic-mlm"
    ladder(study, "lamb", {16: [0.5, 0.5], 64: [0.5, 0.5]}, lr0=1e-3)          # the old choice
    for b, seed in ((16, 0), (16, 1), (64, 0), (64, 1)):
        write_run(study, f"new-{b}-{seed}", optimizer="lamb", batch=b, lr=2e-3 * math.sqrt(b / 16), seed=seed, acc=0.7)
    sweep(study, "lamb", {4e-3: 2.5})
    for base, acc in ((1e-3, 0.3), (2e-3, 0.5)):  # the two-phase run and its twin (batch 32) from each base LR
        for kind in ("two-phase", "two-phase-twin"):
            write_run(study, f"{kind}-lamb-base{base}-s0", optimizer="lamb", batch=32, kind=kind, acc=acc,
                      lr=base * math.sqrt(2))
    (study / "study.json").write_text(json.dumps({"suite": "x", "base_lr": {"lamb": 2e-3}}))
    R.build_report(study, MLM)
    res = json.loads((study / "results.json").read_text())
    assert res["table"]["lamb"]["64"]["n"] == 2 and res["table"]["lamb"]["64"]["mean"] == 0.7
    assert sorted(p["lr"] for p in res["sweep"]["lamb"]["points"]) == [1e-3, 2e-3, 4e-3]
    assert res["header"]["by_kind"] == {"ladder": 4, "superseded": 6, "sweep": 1, "two-phase": 1,
                                        "two-phase-twin": 1}
    assert {k: (v["n"], v["accuracy_mean"]) for k, v in res["two_phase"].items()} == {
        "two-phase": (1, 0.5), "two-phase-twin": (1, 0.5)}  # only the runs from the chosen base LR


def test_one_seed_each_is_not_judged():
    from largebatch.study import verdicts as V2

    cell = lambda m, n, lr: {"mean": m, "spread": 0.0, "n": n, "lr": lr}  # noqa: E731
    ctl = {"lamb": {"batch": 1024, "lr": 0.02, "provisional": True, "tuned": cell(0.87, 1, 0.02), "sqrt": None},
           "adamw": {"batch": 1024, "lr": 0.008, "provisional": True, "tuned": cell(0.85, 1, 0.008),
                     "sqrt": cell(0.80, 1, 0.08)}}
    lines = V2.tuned_readings(ctl, "accuracy")
    assert any("adamw at batch 1024: own LR 0.008 gives 0.8500 vs 0.8000" in x and "not judged yet" in x for x in lines)
    assert any("adamw vs lamb" in x and "not judged yet (one seed each" in x for x in lines)
    assert not any("does not reach" in x or "bad LR" in x for x in lines)


NOISE = Suite("synthetic-noise", "mlm", batches=(16, 64), epochs=1.0, warmup_steps=2, micro_batch_size=256,
              lr_grids={"lamb": (1e-3,), "adamw": (1e-3,)}, target=0.5, noise_probe=4, noise_loss_target=2.5)


def test_noise_scale_section_not_run_yet_then_with_a_probe(tmp_path):
    ladder(tmp_path, "lamb", {16: [0.6, 0.6], 64: [0.6, 0.6]})
    ladder(tmp_path, "adamw", {16: [0.6, 0.6], 64: [0.6, 0.6]})
    report = R.build_report(tmp_path, NOISE).read_text()
    assert "## Does the gradient noise scale predict how far the batch can grow?" in report
    assert f"Probes not run yet. `largebatch study synthetic-noise --out {tmp_path}` resumes the study" in report
    # a probe for lamb: B_simple 16 in every window (|G|² = 1, tr Σ = 16), at the ladder's LR
    d = write_run(tmp_path, "noise-lamb-b16-lr0.001-s0", optimizer="lamb", batch=16, kind="noise-probe", steps=40,
                  extra={"stopped_early": True, "steps": 40})
    with open(d / "metrics.jsonl", "a") as f:
        for step in (8, 16, 24, 32, 40):
            f.write(json.dumps({"step": step, "loss": 2.0, "window_steps": 8, "window_grad_sq_norm": 1.0,
                                "window_grad_trace_cov": 16.0, "window_b_simple": 16.0}) + "\n")
    report = R.build_report(tmp_path, NOISE).read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    lamb = results["noise_scale"]["optimizers"]["lamb"]
    # training loss 3 − s/steps: a trailing mean over 3 records reaches 2.5 at step 33 of 64 (batch 16), a single
    # record at step 8 of 16 (batch 64): measured efficiency 33·16/64/8 = 1.03; predicted (16+16)/(64+16) = 0.4
    assert [r["steps"] for r in lamb["train_loss_rows"]] == [[33, 33], [8, 8]]
    assert lamb["b_noise_used"] == pytest.approx(16) and lamb["window_range"] == [16.0, 16.0]
    assert lamb["train_loss_rows"][1]["measured_efficiency"] == pytest.approx(33 * 16 / 64 / 8)
    assert lamb["train_loss_rows"][1]["predicted_efficiency"] == pytest.approx(0.4)
    assert lamb["judged"]["64"]["verdict"] == "better"
    assert results["noise_scale"]["missing"] == ["adamw"]
    assert "| lamb | `noise-lamb-b16-lr0.001-s0` (40, stopped early) | 16 (16–16) | **fails** at every batch above " \
           "the smallest (scales better than predicted at 64) |" in report
    assert "| lamb | 64 | 8, 8 | 21 | 1.03 (1.03–1.03) | 0.40 (0.40–0.40) | better |" in report
    assert "No probe yet for adamw" in report and (tmp_path / "noise_prediction.png").stat().st_size > 5_000
    assert all(r.get("kind") != "noise-probe" for r in A.sweep_points(runs.load_runs(tmp_path)).get("lamb", []))
    assert results["table"]["lamb"]["16"]["n"] == 2  # the probe is not a ladder run


def test_baseline_readings_need_results_to_read():
    """With no ladder result yet (a study that has only run its tuned control) the baselines are given, with
    no claim about results that do not exist; with results, how many are at or below each is said."""
    bigram = {"test_accuracy": 0.26, "context": "both", "accuracy_by_context": {"both": {"validation": 0.28}}}
    empty = "\n".join(M.md_mlm_baselines({}, 0.04, bigram))
    assert "0.2600" in empty and "0.0400" in empty
    assert "Every result" not in empty and "results are at or below" not in empty
    table = {"lamb": {16: {"mean": 0.20}, 1024: {"mean": 0.03}}}
    some = "\n".join(M.md_mlm_baselines(table, 0.04, bigram))
    assert "the models learned no more than word frequencies" not in some  # one of two above the unigram guess
    assert "**Every result is at or below it**: no model predicted" in some  # the bigram baseline
    low = "\n".join(M.md_mlm_baselines({"lamb": {1024: {"mean": 0.03}}}, 0.04, bigram))
    assert "**Every result is at or below it**: the models learned no more than word frequencies" in low
