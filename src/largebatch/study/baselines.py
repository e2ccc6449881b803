"""Baselines that calibrate the study's numbers (docs/study.md, "Baselines").

MLM, what a masked-token accuracy is worth without a model that reads the sequence:

- the unigram guess (always the most frequent training token) is the task's own (tasks/mlm.py);
- ``mlm_bigram``: each masked token predicted from its neighbours alone, the most frequent token after its left
  neighbour, before its right neighbour, or between the two, counted on the training sequences only; the
  neighbours are read from the evaluation input, i.e. as the model sees them (a masked neighbour is the
  [MASK] token, a context never counted in training, so the prediction backs off); unseen contexts back off
  (both → left → right) to the unigram guess. Which context (``BIGRAM_CONTEXTS``) is chosen on the
  validation split; the test accuracy of that choice is the baseline.

Fine-tuning, what a downstream score is worth without pre-training:

- ``random_encoder``: the pre-training suite's encoder at its random initialisation (same vocabulary, same
  architecture), saved as a step-0 checkpoint, so it is fine-tuned with exactly the recipe of the others.
- ``tfidf_logreg``: a bag-of-words linear classifier (scikit-learn TF-IDF over the same WordPiece tokens the
  encoder reads, unigrams and bigrams, + logistic regression with C chosen on the validation split).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

TFIDF_C_GRID = (0.1, 1.0, 10.0, 100.0)


def random_encoder(task_name: str, task_options: dict, seed: int, out: str | Path) -> Path:
    """Write the untrained model of ``task_name`` (initialised from ``seed``) as a step-0 checkpoint in ``out``."""
    from ..tasks import build_task
    from ..checkpoint import list_checkpoints, save_checkpoint

    out = Path(out)
    if not list_checkpoints(out):
        task = build_task(task_name, **task_options, seed=seed)
        fingerprint = task.input_fingerprint()
        payload = {"step": 0, "model": task.model.state_dict(),
                   "config": {"task": task_name, "task_options": dict(task_options), "seed": seed},
                   **({"input_fingerprint": fingerprint} if fingerprint is not None else {})}
        save_checkpoint(payload, out, 0, keep=1)
    return out


def _tokens(ids) -> list[str]:
    """A document's non-padding token ids as words, plus its bigrams."""
    words = [str(int(i)) for i in ids if int(i) != 0]
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


def tfidf_logreg(data: dict, c_grid: tuple[float, ...] = TFIDF_C_GRID) -> dict:
    """``data``: split -> (token ids [n, seq], labels [n], anything else: the classify task's attention mask).
    Fit on train, pick C on validation, score test."""
    vec = TfidfVectorizer(analyzer=_tokens, sublinear_tf=True)
    x = {split: (vec.fit_transform if split == "train" else vec.transform)([row for row in rows[0]])
         for split, rows in sorted(data.items(), key=lambda kv: kv[0] != "train")}
    y = {split: rows[1].numpy() for split, rows in data.items()}
    fits = {c: LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"]) for c in c_grid}
    val = {c: accuracy_score(y["validation"], m.predict(x["validation"])) for c, m in fits.items()}
    best = max(c_grid, key=lambda c: (val[c], -c))  # ties: the stronger regularisation
    pred = fits[best].predict(x["test"])
    return {"C": best, "validation_accuracy_by_C": {str(c): v for c, v in val.items()},
            "validation_accuracy": val[best], "test_accuracy": float(accuracy_score(y["test"], pred)),
            "test_macro_f1": float(f1_score(y["test"], pred, average="macro")),
            "features": len(vec.vocabulary_), "train_size": int(x["train"].shape[0])}


# ------------------------------------------------------------------------------------------- MLM: bigram
BIGRAM_CONTEXTS = ("left", "right", "both")    # the candidates; the validation split picks one
UNSEEN = -1                                     # the context of a position without a neighbour


def _merge_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys: (sorted unique keys, their counts)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse.reshape(-1), weights=counts, minlength=len(uniq)).astype(np.int64)


def most_frequent_by_context(contexts: np.ndarray, targets: np.ndarray, counts: np.ndarray,
                             ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct contexts, the most frequent target of each); a tie goes to the lowest target id."""
    order = np.lexsort((targets, -counts, contexts))
    contexts, targets = contexts[order], targets[order]
    first = np.ones(len(contexts), dtype=bool)
    first[1:] = contexts[1:] != contexts[:-1]
    return contexts[first], targets[first]


def lookup(table: tuple[np.ndarray, np.ndarray], contexts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The table's prediction for each context; ``fallback`` where the context was never counted."""
    keys, best = table
    if not len(keys):
        return fallback.copy()
    at = np.clip(np.searchsorted(keys, contexts), 0, len(keys) - 1)
    return np.where(keys[at] == contexts, best[at], fallback)


def neighbours(seqs: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The left and right neighbours of positions (rows, cols) of ``seqs``; ``UNSEEN`` past either end."""
    left = np.where(cols > 0, seqs[rows, np.maximum(cols - 1, 0)], UNSEEN)
    right = np.where(cols < seqs.shape[1] - 1, seqs[rows, np.minimum(cols + 1, seqs.shape[1] - 1)], UNSEEN)
    return left, right


def context_keys(left: np.ndarray, right: np.ndarray, vocab_size: int) -> dict[str, np.ndarray]:
    """One integer key per position and context kind (a missing neighbour makes the key unseen)."""
    both = np.where((left >= 0) & (right >= 0), left * vocab_size + right, UNSEEN)
    return {"left": left, "right": right, "both": both}


def bigram_tables(chunks, vocab_size: int, special_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """context kind -> (contexts, most frequent target) over training sequences (an iterable of [n, L] int
    arrays); special tokens are never targets (they are never masked) but are contexts ([CLS], [SEP])."""
    if vocab_size ** 3 >= 2 ** 62:
        raise ValueError(f"Invalid vocab_size: {vocab_size} (allowed: < 2**20 for the bigram baseline's keys)")
    acc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for seqs in chunks:
        seqs = np.asarray(seqs, dtype=np.int64)
        rows, cols = np.nonzero(~np.isin(seqs, special_ids))
        targets = seqs[rows, cols]
        for kind, ctx in context_keys(*neighbours(seqs, rows, cols), vocab_size).items():
            keep = ctx >= 0
            keys = ctx[keep] * vocab_size + targets[keep]
            old_keys, old_counts = acc.get(kind, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
            acc[kind] = _merge_counts(np.concatenate([old_keys, keys]),
                                      np.concatenate([old_counts, np.ones(len(keys), np.int64)]))
    return {kind: most_frequent_by_context(keys // vocab_size, keys % vocab_size, counts)
            for kind, (keys, counts) in acc.items()}


def bigram_predict(tables: dict, kind: str, keys: dict[str, np.ndarray], unigram: int) -> np.ndarray:
    """The prediction of context ``kind`` with its back-off chain (both → left → right → unigram)."""
    chain = {"left": ("left",), "right": ("right",), "both": ("both", "left", "right")}[kind]
    pred = np.full(len(keys["left"]), unigram, dtype=np.int64)
    for k in reversed(chain):  # the most specific context is applied last, so it wins where it was seen
        pred = lookup(tables[k], keys[k], pred)
    return pred


def mlm_bigram(train_chunks, eval_sets: dict, vocab_size: int, special_ids, unigram: int) -> dict:
    """The bigram baseline: ``eval_sets``: split -> (inputs, labels) [n, L] with labels -100 where nothing is
    predicted (the evaluation's masks). The context kind with the best validation accuracy (ties: the first of
    ``BIGRAM_CONTEXTS``) is chosen; its test accuracy is the baseline."""
    special = np.asarray(special_ids, dtype=np.int64)
    tables = bigram_tables(train_chunks, vocab_size, special)
    acc: dict[str, dict[str, float]] = {}
    seen: dict[str, float] = {}
    masked: dict[str, int] = {}
    for split, (inputs, labels) in eval_sets.items():
        inputs, labels = np.asarray(inputs, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        rows, cols = np.nonzero(labels != -100)
        masked[split] = int(len(rows))
        keys = context_keys(*neighbours(inputs, rows, cols), vocab_size)
        targets = labels[rows, cols]
        for kind in BIGRAM_CONTEXTS:
            pred = bigram_predict(tables, kind, keys, unigram)
            acc.setdefault(kind, {})[split] = float((pred == targets).mean()) if len(targets) else float("nan")
        if split == "test":
            seen = {kind: float(np.isin(keys[kind], tables[kind][0]).mean()) for kind in BIGRAM_CONTEXTS}
    chosen = max(BIGRAM_CONTEXTS, key=lambda k: (acc[k]["validation"], -BIGRAM_CONTEXTS.index(k)))
    return {"context": chosen, "test_accuracy": acc[chosen]["test"], "validation_accuracy": acc[chosen]["validation"],
            "accuracy_by_context": acc, "test_context_seen": seen, "masked_tokens": masked,
            "contexts_counted": {k: int(len(t[0])) for k, t in tables.items()}}


def mlm_task_bigram(task, chunk: int = 1 << 16) -> dict:
    """``mlm_bigram`` of a built ``mlm`` task: its training sequences (up to its limit), its evaluation masks,
    its unigram guess as the fallback."""
    train = task.data["train"]
    chunks = (train[start:start + chunk].numpy() for start in range(0, len(train), chunk))
    eval_sets = {split: task.eval_set(split) for split in ("validation", "test")}
    return mlm_bigram(chunks, eval_sets, task.vocab_size, task.special_ids.numpy(), task.most_frequent)
