"""The MLM bigram baseline (study/baselines.py) and the in-domain pre-training pair (mlm-news → finetune-news):
the baseline equals a plain counting implementation, is chosen on validation, reaches the report and its
plot; the news pre-training never reads a fine-tuning validation or test article."""
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

from largebatch.study import baselines as B

SPECIAL = np.array([0, 1, 2, 3])   # pad, cls, sep, mask (as the test's own convention)
CLS, SEP, MASK = 1, 2, 3


def naive_bigram(train, inputs, labels, unigram):
    """Counters and dicts, one position at a time: the definition the vectorised code must match."""
    count = {k: defaultdict(Counter) for k in B.BIGRAM_CONTEXTS}
    for seq in train.tolist():
        for j in range(1, len(seq) - 1):
            if seq[j] in SPECIAL:
                continue
            count["left"][seq[j - 1]][seq[j]] += 1
            count["right"][seq[j + 1]][seq[j]] += 1
            count["both"][(seq[j - 1], seq[j + 1])][seq[j]] += 1

    def best(c):
        top = max(c.values())
        return min(t for t, n in c.items() if n == top)

    correct, n = Counter(), 0
    for x, y in zip(inputs.tolist(), labels.tolist()):
        for j, t in enumerate(y):
            if t == -100:
                continue
            n += 1
            left = best(count["left"][x[j - 1]]) if x[j - 1] in count["left"] else None
            right = best(count["right"][x[j + 1]]) if x[j + 1] in count["right"] else None
            both = best(count["both"][(x[j - 1], x[j + 1])]) if (x[j - 1], x[j + 1]) in count["both"] else None
            pred = {"left": left if left is not None else unigram, "right": right if right is not None else unigram,
                    "both": next(p for p in (both, left, right, unigram) if p is not None)}
            for k, p in pred.items():
                correct[k] += p == t
    return {k: correct[k] / n for k in B.BIGRAM_CONTEXTS}


def random_sequences(rng, n, length=12, vocab=14):
    body = rng.integers(4, vocab, size=(n, length - 2))
    body[body > 9] = rng.integers(4, 7, size=int((body > 9).sum()))  # a skewed distribution: repeated contexts
    return np.concatenate([np.full((n, 1), CLS), body, np.full((n, 1), SEP)], axis=1)


def masked(rng, seqs):
    labels = np.where((rng.random(seqs.shape) < 0.3) & ~np.isin(seqs, SPECIAL), seqs, -100)
    inputs = np.where((labels != -100) & (rng.random(seqs.shape) < 0.8), MASK, seqs)
    return inputs, labels


def test_bigram_equals_plain_counting_in_chunks_and_picks_the_context_on_validation():
    rng = np.random.default_rng(0)
    train = random_sequences(rng, 300)
    sets = {split: masked(rng, random_sequences(rng, 80)) for split in ("validation", "test")}
    out = B.mlm_bigram([train[:170], train[170:]], sets, 16, SPECIAL, unigram=5)
    for split, (inputs, labels) in sets.items():
        want = naive_bigram(train, inputs, labels, unigram=5)
        assert {k: v[split] for k, v in out["accuracy_by_context"].items()} == pytest.approx(want)
    best = max(B.BIGRAM_CONTEXTS, key=lambda k: out["accuracy_by_context"][k]["validation"])
    assert out["context"] == best and out["test_accuracy"] == out["accuracy_by_context"][best]["test"]
    # neighbours that are [MASK] were never counted as a context: those positions back off
    assert 0 < out["test_context_seen"]["both"] < out["test_context_seen"]["left"] < 1


def test_bigram_by_hand_ties_back_off_and_special_targets():
    train = np.array([[CLS, 4, 5, 6, SEP], [CLS, 4, 7, 6, SEP], [CLS, 8, 7, 9, SEP]])
    tables = B.bigram_tables([train], 10, SPECIAL)
    # after 4: 5 and 7 once each -> the lower id; [SEP] is never a target (after 6 nothing is counted)
    assert dict(zip(*tables["left"]))[4] == 5 and 6 not in dict(zip(*tables["left"]))
    assert dict(zip(*tables["left"]))[CLS] == 4  # [CLS] is a context
    inputs = np.array([[CLS, 4, MASK, 6, SEP], [CLS, MASK, MASK, 9, SEP]])
    labels = np.array([[-100, -100, 7, -100, -100], [-100, 8, 7, -100, -100]])
    keys = B.context_keys(*B.neighbours(inputs, *np.nonzero(labels != -100)), 10)
    # (4, 6) seen with 5 and 7 -> 5; [MASK] left of position 2 of row 1 -> right neighbour 9 -> 7;
    # row 1 position 1: ([CLS], [MASK]) unseen -> left [CLS] -> 4
    assert B.bigram_predict(tables, "both", keys, unigram=6).tolist() == [5, 4, 7]
    assert B.bigram_predict(tables, "left", keys, unigram=6).tolist() == [5, 4, 6]


def test_bigram_on_a_real_task_and_baselines_only(tmp_path):
    """`largebatch study smoke --baselines-only`: baselines.json with the bigram on the suite's own task, no
    training run, no study.json (a finished study's base LRs stay untouched)."""
    env = {**os.environ, "LARGEBATCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "study", "smoke", "--baselines-only",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bigram = json.loads((out / "baselines.json").read_text())["bigram"]
    assert bigram["context"] in B.BIGRAM_CONTEXTS and 0 < bigram["test_accuracy"] < 1
    assert not (out / "runs").exists() and not (out / "study.json").exists()


def test_report_shows_the_bigram_beside_the_unigram(tmp_path):
    from test_study_report import MLM, ladder

    from largebatch.study.report import build_report

    ladder(tmp_path, "lamb", {16: [0.30, 0.31], 64: [0.20, 0.21]})
    ladder(tmp_path, "adamw", {16: [0.30, 0.31], 64: [0.29, 0.30]})
    bigram = {"context": "both", "test_accuracy": 0.25, "validation_accuracy": 0.24,
              "accuracy_by_context": {k: {"validation": 0.2, "test": 0.2} for k in B.BIGRAM_CONTEXTS}}
    (tmp_path / "baselines.json").write_text(json.dumps({"bigram": bigram}))
    md = build_report(tmp_path, MLM).read_text()
    assert "Unigram baseline (always the most frequent token): 0.1000." in md
    assert "Bigram baseline (the most frequent training token given its two neighbours" in md
    assert "): 0.2500. **1 of 4 results are at or below it**" in md
    assert json.loads((tmp_path / "results.json").read_text())["bigram_baseline"]["test_accuracy"] == 0.25
    assert (tmp_path / "metric_vs_batch.png").stat().st_size > 5_000


# ------------------------------------------------------------------------ pre-training on the news text
def test_news_pretraining_never_reads_a_finetuning_validation_or_test_article():
    from largebatch.tasks import DataMissingError
    from largebatch.tasks.bbcnews import article_texts, normalise
    from largebatch.tasks.classify import ClassifyConfig, load_bbc_news, seeded_split
    from largebatch.tasks.mlm import article_name, split_news

    try:
        texts, _, _ = load_bbc_news()
    except DataMissingError as exc:
        pytest.skip(str(exc))
    ft = {s: {normalise(texts[i]) for i in idx.tolist()}
          for s, idx in seeded_split(len(texts), ClassifyConfig()).items()}
    news = article_texts()
    assert news == texts  # the same articles in the same order, read without their labels
    pre = {s: {normalise(news[int(n.rsplit("-", 1)[1])]) for n in names} for s, names in split_news(news).items()}
    assert article_name(7) == "bbc-news-0007"
    assert not pre["train"] & (ft["test"] | ft["validation"])  # the collection's duplicates included
    assert pre["test"] == ft["test"] and pre["validation"] == ft["validation"] and pre["train"] <= ft["train"]
    assert len(ft["train"] & (ft["test"] | ft["validation"])) > 0  # (the seeded split itself has copies)


def test_finetuning_leaves_the_held_out_articles_copies_out_of_training():
    """The classify task drops the training articles that are verbatim copies of a validation or test article
    (the collection's duplicates); ``drop_train_copies=False`` keeps the raw seeded split."""
    from largebatch.tasks import DataMissingError
    from largebatch.tasks.bbcnews import normalise, without_copies
    from largebatch.tasks.classify import ClassifyConfig, load_bbc_news, seeded_split

    try:
        texts, _, _ = load_bbc_news()
    except DataMissingError as exc:
        pytest.skip(str(exc))
    split = seeded_split(len(texts), ClassifyConfig())
    kept = without_copies(texts, split)
    held = {normalise(texts[i]) for s in ("validation", "test") for i in split[s].tolist()}
    dropped = set(split["train"].tolist()) - set(kept.tolist())
    assert kept.tolist() == [i for i in split["train"].tolist() if i not in dropped]  # order kept
    assert dropped and all(normalise(texts[i]) in held for i in dropped)
    assert not {normalise(texts[i]) for i in kept.tolist()} & held
    assert ClassifyConfig().drop_train_copies is True
    from largebatch.tasks.classify import ClassifyTask

    assert ClassifyTask(seq_len=8).train_size == len(kept)  # the task uses it by default


def test_corpus_option_is_checked(capsys):
    from largebatch.cli.main import main

    assert main(["study", "mlm-news", "--data", "x.txt"]) == 2  # the suite is defined by its corpus
    assert "Invalid --data for suite 'mlm-news' (allowed: a suite of the mlm task: mlm-scaling | smoke)" \
        in capsys.readouterr().err
    from largebatch.tasks import check_task_options

    with pytest.raises(ValueError, match=r"^Invalid corpus: 'news' \(allowed: shakespeare \| bbc-news\)$"):
        check_task_options("mlm", {"corpus": "news"})
    with pytest.raises(ValueError, match=r"^Invalid corpus: 'bbc-news' \(allowed: 'shakespeare' \(the default\) when"):
        check_task_options("mlm", {"corpus": "bbc-news", "data": ["x.txt"]})


def test_smoke_news_then_its_finetuning(tmp_path, monkeypatch):
    """smoke-news pre-trains on the news text; smoke-finetune-news fine-tunes its checkpoint and the random
    encoder (the news vocabulary) and writes its report."""
    from largebatch.study.report import build_report
    from largebatch.study.runner import FinetuneRunner, SuiteRunner
    from largebatch.study.suites import get_suite
    from largebatch.tasks import DataMissingError

    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    try:
        SuiteRunner(get_suite("smoke-news"), tmp_path / "smoke-news", threads=1, progress=False).run()
    except DataMissingError as exc:
        pytest.skip(str(exc))
    config = json.loads(next((tmp_path / "smoke-news" / "runs").glob("*/config.json")).read_text())
    assert config["task_options"]["corpus"] == "bbc-news"
    ft = tmp_path / "smoke-finetune-news"
    FinetuneRunner(get_suite("smoke-finetune-news"), ft, threads=1, progress=False).run()
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (ft / "runs").glob("*/summary.json")}
    assert {"ft-lamb-b16-lr0.01-s0", "ft-random-encoder-s0", "tfidf-logreg"} <= set(summaries)
    assert summaries["ft-lamb-b16-lr0.01-s0"]["pretrain_optimizer"] == "lamb"
    # the recipe check: the same encoders fine-tuned 2x longer (the suite's long_baseline), nothing else changed
    long, short = summaries["ft-long-lamb-b16-lr0.01-s0-e2"], summaries["ft-lamb-b16-lr0.01-s0"]
    assert long["kind"] == "finetune-long" and long["epochs"] == 2.0 and long["steps"] == 2 * short["steps"]
    assert summaries["ft-long-random-encoder-s0-e2"]["kind"] == "finetune-baseline-long"
    assert len(summaries) == 5
    md = build_report(ft).read_text()  # the suite comes from study.json
    assert "Study `smoke-finetune-news`" in md and "random encoder" in md
    assert "## The recipe 2× longer: is the downstream score converged?" in md
    assert f"| lamb, pre-trained at batch 16 | {short['test_accuracy']:.4f}" in md
    results = json.loads((ft / "results.json").read_text())
    assert results["recipe_check"]["long"]["lamb"]["16"]["mean"] == pytest.approx(long["test_accuracy"])
