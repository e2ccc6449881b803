"""largebatch bench --e2e: the workloads, the CLI's output and errors, the whole-step memory measurement."""
import json
import subprocess
import sys

from largebatch.bench import e2e, models, shapes


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "largebatch.cli.main", "bench", "--e2e", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_resnet50_has_torchvisions_parameter_shapes():
    model = models.ResNet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert sorted(tuple(p.shape) for p in model.parameters()) == sorted(shapes.resnet50())


def test_bert_workload_masks_about_15_percent():
    w = models.bert_base_mlm(2, seq_len=128)
    masked = (w.batch["labels"] != -100).float().mean().item()
    assert 0.08 < masked < 0.22
    assert sum(p.numel() for p in w.model.parameters()) > 100e6


def test_cli_times_every_variant_and_writes_results(tmp_path):
    proc = cli("--models", "resnet50", "--batch", "resnet50=1", "--precisions", "fp32,bf16-autocast", "--steps", "2",
               "--warmup", "0", "--no-memory", "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(s["workload"], s["precision"]) for s in data["sets"]] == [("resnet50", "fp32"),
                                                                       ("resnet50", "bf16-autocast")]
    for s in data["sets"]:
        rows = {r["variant"]: r for r in s["rows"]}
        assert set(rows) == set(e2e.variants())
        assert rows["torch AdamW (fused)"]["ratio_to_fused_adamw"] == 1.0
        for r in rows.values():
            assert 0 < r["min_ms"] <= r["median_ms"]
            assert abs(sum(r[f"{k}_ms"] for k in e2e.PHASES) - r["median_ms"]) < 0.5 * r["median_ms"]
        sib = rows["largebatch Lamb (step in backward)"]
        assert sib["optimizer_share"] is None and sib["ratio_to_lamb"] > 0
        assert 0 < rows["largebatch Lamb"]["optimizer_share"] < 1
    assert "| variant |" in (tmp_path / "results.md").read_text()


def test_cli_rejects_bad_options_with_one_line():
    for args, needle in ((["--batch", "resnet50=0"], "--batch"), (["--models", "gpt"], "--models"),
                         (["--precisions", "fp16"], "--precisions"), (["--optimizers", "sgd"], "--optimizers")):
        proc = cli(*args, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, args


def test_step_in_backward_lowers_the_whole_step_peak_by_about_the_gradients():
    """Measured in fresh processes: ResNet-50 at batch 1, where the gradients (100 MB) dominate the peak."""
    ordinary = e2e.memory_in_subprocess("resnet50", 1, "fp32", "largebatch Lamb", warmup=1, threads=1)
    fused = e2e.memory_in_subprocess("resnet50", 1, "fp32", "largebatch Lamb (step in backward)", warmup=1,
                                     threads=1)
    assert "error" not in ordinary and "error" not in fused, (ordinary, fused)
    grads = ordinary["grad_bytes"]
    assert grads == 4 * 25_557_032
    # params + m + v (3 × 4 B/param) are resident before the step; the step adds gradients and activations
    assert ordinary["peak_bytes"] > ordinary["resident_before_step_bytes"] + 0.9 * grads
    assert ordinary["peak_bytes"] - fused["peak_bytes"] > 0.5 * grads
