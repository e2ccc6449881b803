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
    (["train", "--optimizer", "nope"], "Invalid optimizer: 'nope' (allowed: lamb | lars"),
    (["train", "--lr", "abc"], "invalid float value"),
    (["train", "--task", "speech"], "Invalid task: 'speech' (allowed: mlm | classify | image)"),
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


def test_config_file_then_command_line_overrides(tmp_path):
    import argparse

    from largebatch.cli import train as cli_train

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("task: image\nbatch_size: 512\nlr: 0.1\ntask_options: {width: 8}\n")
    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    cfg = cli_train.build_config(parser.parse_args(["--config", str(cfg_file), "--lr", "0.3", "--task-opt", "blocks=2"]))
    assert (cfg.task, cfg.batch_size, cfg.lr) == ("image", 512, 0.3)          # file, file, command line
    assert cfg.micro_batch_size == cli_train.TASK_DEFAULTS["image"]["micro_batch_size"]  # task default
    assert cfg.task_options == {"width": 8, "blocks": 2}
    assert cli_train.build_config(parser.parse_args([])).task == "mlm"         # no arguments: the main job


def test_the_main_job_is_one_bf16_micro_batch_and_the_old_one_is_three_flags_away():
    """The mlm defaults measured in benchmarks/e2e/README.md ("The main job"); other tasks keep fp32."""
    import argparse

    from largebatch.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    main = cli_train.build_config(parser.parse_args([]))
    assert (main.batch_size, main.micro_batch_size, main.precision, main.eval_every) == (256, 256, "bf16-autocast", 50)
    old = cli_train.build_config(parser.parse_args(["--micro-batch-size", "128", "--precision", "fp32",
                                                    "--eval-every", "25"]))
    assert (old.batch_size, old.micro_batch_size, old.precision, old.eval_every) == (256, 128, "fp32", 25)
    assert cli_train.build_config(parser.parse_args(["--task", "image"])).precision == "fp32"
    small = cli_train.build_config(parser.parse_args(["--batch-size", "64"]))  # the default micro-batch gives way
    assert (small.batch_size, small.micro_batch_size) == (64, 64)
    with pytest.raises(ValueError, match="Invalid micro_batch_size: 128"):  # an explicit one does not
        cli_train.build_config(parser.parse_args(["--batch-size", "64", "--micro-batch-size", "128"]))


def test_resume_with_other_settings_exits_2(tmp_path):
    run = tmp_path / "r"
    opts = ["--steps", "1", "--out", str(run), "--no-progress", "--eval-every", "0",
            "--task-opt", "limit_train_sequences=64", "--task-opt", "max_eval_sequences=32", "--task-opt", "hidden=32",
            "--task-opt", "layers=1", "--task-opt", "intermediate=64", "--task-opt", "vocab_size=512"]
    env = {**__import__("os").environ, "LARGEBATCH_CACHE": str(tmp_path / "cache")}
    assert _cli("train", *opts, env=env).returncode == 0
    proc = _cli("train", *opts, "--lr", "0.5", "--resume", str(run), env=env)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr.strip().splitlines()[-1]


def test_two_phase_example_config_and_a_bad_phase(tmp_path):
    import argparse
    from pathlib import Path

    from largebatch.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    example = Path(__file__).parent.parent / "examples" / "two_phase_mlm.yaml"
    cfg = cli_train.build_config(parser.parse_args(["--config", str(example)]))
    assert [p["seq_len"] for p in cfg.phases] == [32, 64] and cfg.phases[1]["optimizer_state"] == "reset_step"
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases:\n  - {batch_size: 64, lr: 0.01, warmup_steps: 5, steps: 10, seqlen: 32}\n")
    proc = _cli("train", "--config", str(bad))
    assert proc.returncode == 2 and "Invalid phases[0] key(s): seqlen" in proc.stderr.strip().splitlines()[-1]


def test_tensorboard_scalars_and_a_clear_error_without_the_package(tmp_path, monkeypatch):
    import builtins

    from largebatch.train.loop import TrainConfig, train

    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    pytest.importorskip("tensorboard", reason="installed by the test extra: pip install -e '.[test]'")
    cfg = TrainConfig(task="mlm", batch_size=16, micro_batch_size=16, steps=2, warmup_steps=1, progress=False,
                      plot=False, tensorboard=True, out=str(tmp_path / "run"), threads=1,
                      task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                                        limit_train_sequences=64, max_eval_sequences=32))
    train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "validation_accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"pip install 'largebatch\[tensorboard\]'"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "other")}))
    assert not (tmp_path / "other").exists()  # nothing started


def test_python_dash_m_largebatch_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "largebatch", "presets"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "nvlamb" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "largebatch", "train", "--threads", "-1"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
