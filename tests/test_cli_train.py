"""Command line: bad input exits with status 2 and a one-line reason; presets/plot work."""
import json
import subprocess
import sys

import pytest


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "largebatch.cli.main", *args], capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.parametrize("args, reason", [
    (["train", "--batch-size", "0"], "Invalid batch_size: 0"),
    (["train", "--optimizer", "nope"], "unknown optimizer 'nope'"),
    (["train", "--lr", "abc"], "invalid float value"),
    (["train", "--task", "speech"], "invalid choice"),
    (["train", "--micro-batch-size", "4096", "--batch-size", "64"], "micro_batch_size"),
    (["train", "--lr", "-1"], "Invalid lr"),
    (["train", "--opt", "phi"], "KEY=VALUE"),
    (["train", "--config", "/nonexistent.yaml"], "config file not found"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(args, reason):
    proc = _cli(*args)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert reason in lines[-1]


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_sise: 64\n")
    proc = _cli("train", "--config", str(cfg))
    assert proc.returncode == 2 and "unknown keys" in proc.stderr


def test_invalid_optimizer_flag_exits_2(tmp_path):
    proc = _cli("train", "--opt", "phi=bogus", "--steps", "1", "--out", str(tmp_path / "r"),
                "--task-opt", "limit_train_sequences=64", "--no-progress")
    assert proc.returncode == 2 and "Invalid phi" in proc.stderr


def test_presets_json():
    proc = _cli("presets", "--json")
    table = json.loads(proc.stdout)
    assert {"paper", "nvlamb", "torch_optimizer", "timm", "authors_resnet", "lars_paper", "lars_2017", "larc"} <= set(table)


def test_plot_missing_run(tmp_path):
    proc = _cli("plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr
