"""Configuration that cannot surprise: one dataclass gives the keys, flags, help, defaults and validation;
every bad value exits 2 with one line naming the option, before any work."""
import argparse
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from largebatch.cli import main as cli_main
from largebatch.cli import train as cli_train
from largebatch.train.config import FIELDS, TrainConfig, config_schema


def _parser():
    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    return p


def _config(*argv):
    return cli_train.build_config(_parser().parse_args(list(argv)))


def _fails(capsys, *argv):
    """Run ``largebatch train ARGV`` in-process: it must exit 2 with exactly one line on stderr."""
    try:
        rc = cli_main.main(["train", *argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err and "\n" not in err, (rc, err)
    return err


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["--threads", "-1"], "Invalid threads: -1"),
    (["--epochs", "inf"], "Invalid epochs: inf"),
    (["--epochs", "1e30"], "Invalid epochs: 1e+30"),
    (["--batch-size", "1e30"], "--batch-size: invalid int value: '1e30'"),
    (["--eval-every", "-1"], "Invalid eval_every: -1"),
    (["--checkpoint-every", "-5"], "Invalid checkpoint_every: -5"),
    (["--trust-every", "-2"], "Invalid trust_every: -2"),
    (["--eval-split", "bogus"], "Invalid eval_split: 'bogus' (allowed: validation | test)"),
    (["--out", ""], "Invalid out: ''"),
    (["--task-opt", "hidden=abc"], "Invalid task option hidden: 'abc'"),
    (["--task-opt", "hiden=3"], "Invalid option 'hiden' for task 'mlm'"),
    (["--task", "image", "--task-opt", "seq_len=32"], "Invalid option 'seq_len' for task 'image'"),
    (["--task-opt", "data=x.txt", "--data", "y.txt"], "Invalid task_options key 'data': data is set too"),
    (["--seed", "1.5"], "--seed: invalid int value: '1.5'"),
    (["--opt", "=3"], "Invalid --opt '=3' (allowed: KEY=VALUE)"),
])
def test_bad_command_line_values_exit_2_with_one_line(capsys, argv, expected):
    assert expected in _fails(capsys, *argv)


@pytest.mark.parametrize("text, expected", [
    ("lr: fast\n", "Invalid lr: 'fast'"),
    ("optimizer: 5\n", "Invalid optimizer: 5"),
    ("seed: 1.5\n", "Invalid seed: 1.5"),
    ("eval_split: bogus\n", "Invalid eval_split: 'bogus'"),
    ("batch_size: [1, 2\n", "not plain YAML at line"),
    ("lr: !!python/object:os.system {}\n", "not plain YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("batch_size: 1000000000000000000000000000000\n", "Invalid batch_size"),
    ("progress: 3\n", "Invalid progress: 3"),
    ("phases: [{batch_size: 8, lr: 0.1, warmup_steps: 0, epochs: .inf}]\n", "Invalid phases[0] epochs: inf"),
    ("task_options: {hidden: abc}\n", "Invalid task option hidden"),
])
def test_bad_config_file_values_exit_2_with_one_line(tmp_path, capsys, text, expected):
    assert expected in _fails(capsys, "--config", _yaml(tmp_path, text))


def test_bad_config_paths_and_run_directories(tmp_path, capsys):
    assert "is not a file" in _fails(capsys, "--config", str(tmp_path))
    assert "config file not found" in _fails(capsys, "--config", str(tmp_path / "none.yaml"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"Invalid out: '{afile}' is a file" in _fails(capsys, "--out", str(afile))
    assert "cannot be created" in _fails(capsys, "--out", str(afile / "run"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option", ["hidden=0", "hidden=-1", "seq_len=2", "seq_len=100000"])
def test_out_of_range_mlm_options_exit_2_before_any_work(capsys, option):
    assert option.split("=")[0] in _fails(capsys, "--task-opt", option)


def test_command_line_wins_over_the_file_and_dicts_merge_alike(tmp_path):
    path = _yaml(tmp_path, "task: image\nlr: 0.5\ntask_options: {hidden: 64}\n")
    cfg = _config("--config", path, "--task", "mlm", "--task-opt", "layers=1")
    assert cfg.task == "mlm" and cfg.lr == 0.5 and cfg.batch_size == cli_train.TASK_DEFAULTS["mlm"]["batch_size"]
    # the file's task_options block keeps the task's default dropout, like --task-opt does
    assert cfg.task_options == {"dropout": 0.0, "hidden": 64, "layers": 1}
    assert _config("--task-opt", "hidden=64").task_options == {"dropout": 0.0, "hidden": 64}
    assert _config("--config", path).task == "image" and _config("--config", path, "--lr", "0.1").lr == 0.1


def test_data_fields_reach_the_task_only_when_set():
    assert _config().task_build_options() == {"dropout": 0.0}
    cfg = _config("--data", "a.txt", "b.txt", "--text-field", "body", "--model-size", "bert-mini")
    assert cfg.task_build_options() == {"dropout": 0.0, "data": ["a.txt", "b.txt"], "text_field": "body",
                                        "model_size": "bert-mini"}


def test_help_shows_every_field_with_task_dependent_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: lamb (classify: adamw)" in text
    assert "default: 256 (classify: 32, image: 1024)" in text
    for name, info in FIELDS.items():
        if name not in cli_train.SPECIAL:
            assert "--" + name.replace("_", "-") in text and " ".join(info.description.split()) in text


def test_schema_lists_every_key_with_its_bounds():
    props = config_schema()["properties"]
    assert set(props) == set(FIELDS)
    assert props["batch_size"]["minimum"] == 1 and props["lr"]["exclusiveMinimum"] == 0


def test_a_torch_only_install_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    absent = {"pydantic", "matplotlib", "tqdm"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    for command in ("train", "plot", "bench"):
        assert cli_main.main([command, "--anything"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"largebatch {command}: error: missing module" in err[0], err
        assert "pip install 'largebatch[train]'" in err[0]


_FLAGS = ["--lr", "--batch-size", "--micro-batch-size", "--epochs", "--steps", "--seed", "--threads", "--eval-every",
          "--optimizer", "--task", "--schedule", "--precision", "--eval-split", "--out", "--task-opt", "--opt",
          "--warmup-steps", "--power", "--end-lr", "--progress", "--no-plot", "--data", "--nonsense"]
_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "3", "1e30", "inf", "nan", "abc", "", "lamb", "classify",
                                     "hidden=abc", "hidden=3", "seq_len=2", "=", "k=", "poly", "fp16", "test",
                                     "x=!!python/object:os.system {}", "[1, 2"]),
                    st.text(max_size=8))
_YAML_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**31), st.floats(allow_nan=True),
                         st.text(max_size=6), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _one_line_or_valid(argv, capsys):
    try:
        cfg = cli_train.build_config(cli_main.build_parser().parse_args(["train", *argv]))
        cli_train.check_before_work(cfg)
        assert isinstance(cfg, TrainConfig)
    except SystemExit as exc:
        assert exc.code in (0, 2)
        assert capsys.readouterr().err.strip().count("\n") == 0 or exc.code == 0
    except ValueError as exc:  # one line that names the option: "Invalid <option>..."
        assert "\n" not in str(exc) and str(exc).startswith("Invalid "), str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_FLAGS), _VALUES), max_size=4))
def test_fuzzed_command_lines_are_valid_or_one_line_errors(capsys, pairs):
    _one_line_or_valid([x for pair in pairs for x in pair], capsys)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from([*FIELDS, "bogus"]), _YAML_VALUES, max_size=4) | st.text(max_size=30))
def test_fuzzed_config_files_are_valid_or_one_line_errors(tmp_path_factory, capsys, content):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    _one_line_or_valid(["--config", str(path), "--out", str(path.parent / "run")], capsys)


def test_summary_and_metrics_are_strict_json_and_a_nan_end_is_a_failure(tmp_path):
    """--lr 1e30: the last steps' loss is NaN -> diverged, exit 1, null + "nonfinite" in the files."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "LARGEBATCH_CACHE": str(tmp_path / "cache")}
    tiny = [x for o in ("limit_train_sequences=64", "max_eval_sequences=32", "hidden=32", "layers=1", "heads=2",
                        "intermediate=64", "vocab_size=512", "seq_len=32") for x in ("--task-opt", o)]
    common = ["-m", "largebatch.cli.main", "train", *tiny, "--batch-size", "16", "--micro-batch-size", "16",
              "--warmup-steps", "0", "--no-progress", "--no-plot", "--eval-every", "0"]
    proc = subprocess.run([sys.executable, *common, "--lr", "1e30", "--steps", "3", "--out", str(tmp_path / "nan")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr
    def reject(name):
        raise AssertionError(f"bare {name} in JSON")
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text(), parse_constant=reject)
    assert summary["diverged"] is True and summary["final_loss"] is None and "final_loss" in summary["nonfinite"]
    for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=reject)
    proc = subprocess.run([sys.executable, *common, "--lr", "1e30", "--steps", "3", "--nonfinite", "raise",
                           "--out", str(tmp_path / "raise")], capture_output=True, text=True, timeout=600, env=env)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "non-finite gradients at step" in lines[0], proc.stderr
