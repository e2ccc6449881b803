"""The benchmark harness on tiny shapes: structure, ratios, outputs (no speed is asserted here)."""
import json
import subprocess
import sys


def test_bench_tiny_writes_table_json_and_plot(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "bench", "--shapes", "tiny", "--steps", "2",
                           "--warmup", "1", "--out", str(tmp_path), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["optimizer"]: r for r in data["sets"][0]["rows"]}
    assert rows["torch AdamW (fused)"]["ratio_to_fused_adamw"] == 1.0
    for name in ("largebatch Lamb", "largebatch Lars", "largebatch Lamb (foreach)"):
        assert rows[name]["median_ms"] > 0 and rows[name]["ratio_to_fused_adamw"] > 0
        assert 0 < rows[name]["min_ms"] <= rows[name]["median_ms"] and rows[name]["ratio_min_to_fused_adamw"] > 0
    pairs = {(p["optimizer"], p["versus"]): p for p in data["sets"][0]["pairs"]}
    assert set(pairs) == {("largebatch Lamb", "largebatch Lamb (propagate)"),
                          ("largebatch Lars", "largebatch Lars (propagate)"),
                          ("largebatch Lamb (sync-free)", "largebatch Lamb (foreach)")}
    for p in pairs.values():
        assert p["ratio_median"] > 0 and p["ratio_min"] > 0 and p["ratio_per_round_median"] > 0
    assert "| tiny | largebatch Lamb | largebatch Lamb (propagate) |" in (tmp_path / "results.md").read_text()
    for r in rows.values():  # every peer is either measured or says why not
        assert r.get("median_ms") is not None or r["error"]
    assert data["environment"]["bandwidth_gbs"] > 0
    assert (tmp_path / "step_time.png").stat().st_size > 5_000
    assert "| optimizer |" in (tmp_path / "results.md").read_text()


def test_bench_rejects_unknown_sets():
    proc = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "bench", "--shapes", "gpt5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown shape sets" in proc.stderr
