"""`largebatch study finetune` checks its sources before any work: a pre-training study copied without its
checkpoints (they are never committed) gets one clear error naming the runs and the fix."""
import json
import subprocess
import sys

import pytest

from largebatch.study.runner import FinetuneRunner
from largebatch.study.suites import get_suite


def _ladder_run(root, name, with_checkpoint, fingerprint="0123456789abcdef"):
    import torch

    d = root / "mlm-scaling" / "runs" / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"kind": "ladder", "optimizer": "lamb", "batch_size": 16, "seed": 0}))
    if with_checkpoint:  # only its tokenizer fingerprint is read before any work
        torch.save({"step": 10} | ({"input_fingerprint": fingerprint} if fingerprint else {}), d / "ckpt-00000010.pt")
    return d


def test_missing_checkpoints_are_listed_before_any_work(tmp_path):
    _ladder_run(tmp_path, "lamb-b16-lr0.003-s0", with_checkpoint=True)
    _ladder_run(tmp_path, "lamb-b64-lr0.006-s0", with_checkpoint=False)
    _ladder_run(tmp_path, "adamw-b64-lr0.002-s1", with_checkpoint=False)
    out = tmp_path / "finetune"
    with pytest.raises(FileNotFoundError) as err:
        FinetuneRunner(get_suite("finetune"), out, progress=False).run()
    msg = str(err.value)
    assert "2 of 3 mlm-scaling runs have no checkpoint" in msg
    assert "adamw-b64-lr0.002-s1, lamb-b64-lr0.006-s0" in msg and "largebatch study mlm-scaling --out" in msg
    assert not (out / "runs").exists()  # nothing was started


def test_checkpoints_without_a_tokenizer_fingerprint_are_refused_before_any_work(tmp_path):
    """An older largebatch numbered WordPiece pieces differently per process: such an encoder cannot be matched
    to the tokenizer rebuilt here, so the study names the runs to retrain instead of fine-tuning under other ids."""
    _ladder_run(tmp_path, "lamb-b16-lr0.003-s0", with_checkpoint=True)
    _ladder_run(tmp_path, "lamb-b64-lr0.006-s0", with_checkpoint=True, fingerprint=None)
    out = tmp_path / "finetune"
    with pytest.raises(ValueError) as err:
        FinetuneRunner(get_suite("finetune"), out, progress=False).run()
    msg = str(err.value)
    assert msg.startswith("1 of 2 mlm-scaling runs have a checkpoint without a tokenizer fingerprint")
    assert "lamb-b64-lr0.006-s0;" in msg and "lamb-b16" not in msg and "largebatch study mlm-scaling --out" in msg
    assert not (out / "runs").exists()


def _wordpiece(words):
    from tokenizers import Tokenizer, models

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    return Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))


def test_an_encoder_pre_trained_under_other_token_ids_is_refused():
    from largebatch.tasks.base import tokenizer_fingerprint
    from largebatch.tasks.classify import check_encoder_tokenizer

    here, other = _wordpiece(["the", "##s", "##ing"]), _wordpiece(["the", "##ing", "##s"])  # two ids swapped
    check_encoder_tokenizer("run/ckpt", tokenizer_fingerprint(here), here)  # the same ids: accepted
    with pytest.raises(ValueError, match=r"Invalid checkpoint: run/ckpt was pre-trained with another tokenizer"):
        check_encoder_tokenizer("run/ckpt", tokenizer_fingerprint(other), here)
    with pytest.warns(UserWarning, match="no tokenizer fingerprint in this checkpoint"):
        check_encoder_tokenizer("run/ckpt", None, here)


def test_cli_says_it_in_one_line(tmp_path):
    _ladder_run(tmp_path, "lamb-b64-lr0.006-s0", with_checkpoint=False)
    proc = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "study", "finetune", "--out",
                           str(tmp_path / "finetune")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("largebatch study: error: 1 of 1 mlm-scaling runs")


def test_tfidf_baseline_learns_separable_token_sets_and_picks_c_on_validation():
    import torch

    from largebatch.study.baselines import tfidf_logreg

    gen = torch.Generator().manual_seed(0)

    def split(n):
        labels = torch.arange(n) % 2
        ids = torch.randint(10, 20, (n, 12), generator=gen) + 10 * labels[:, None]  # class 1 uses ids 20..29
        ids[:, -3:] = 0  # padding is not a token
        return ids, labels

    out = tfidf_logreg({"train": split(40), "validation": split(20), "test": split(20)})
    assert out["test_accuracy"] == 1.0 and out["test_macro_f1"] == 1.0
    assert out["C"] in (0.1, 1.0, 10.0, 100.0) and set(out["validation_accuracy_by_C"]) == {"0.1", "1.0", "10.0", "100.0"}
    assert out["features"] > 20  # unigrams and bigrams, no padding id


def test_baselines_only_is_for_finetuning_and_mlm_suites(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "study", "image-scaling", "--baselines-only",
                           "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Invalid --baselines-only for suite 'image-scaling'" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_superseded_ladder_runs_are_not_fine_tuned(tmp_path):
    """A pre-training study whose base LR moved (the near-tie refinement) keeps the old ladder runs on disk:
    fine-tuning reads only the current ladder's (study.json's base LR by the √ rule)."""
    for name, lr, batch in (("lamb-b16-lr0.003-s0", 3e-3, 16), ("lamb-b64-lr0.006-s0", 6e-3, 64),
                            ("lamb-b16-lr0.0052-s0", 5.2e-3, 16), ("lamb-b64-lr0.0104-s0", 1.04e-2, 64)):
        d = _ladder_run(tmp_path, name, with_checkpoint=True)
        (d / "summary.json").write_text(json.dumps({"kind": "ladder", "optimizer": "lamb", "batch_size": batch,
                                                    "seed": 0, "lr": lr}))
    (tmp_path / "mlm-scaling" / "study.json").write_text(json.dumps({"suite": "mlm-scaling",
                                                                      "base_lr": {"lamb": 5.2e-3}}))
    runner = FinetuneRunner(get_suite("finetune"), tmp_path / "finetune", progress=False)
    assert [p.name for p in runner.sources()] == ["lamb-b16-lr0.0052-s0", "lamb-b64-lr0.0104-s0"]
