"""Baselines that calibrate the fine-tuning numbers: what a downstream score is worth without pre-training.

- ``random_encoder``: the pre-training suite's encoder at its random initialisation (same vocabulary, same
  architecture), saved as a step-0 checkpoint, so it is fine-tuned with exactly the recipe of the others.
- ``tfidf_logreg``: a bag-of-words linear classifier (scikit-learn TF-IDF over the same WordPiece tokens the
  encoder reads, unigrams and bigrams, + logistic regression with C chosen on the validation split).
"""
from __future__ import annotations

from pathlib import Path

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
        payload = {"step": 0, "model": task.model.state_dict(),
                   "config": {"task": task_name, "task_options": dict(task_options), "seed": seed}}
        save_checkpoint(payload, out, 0, keep=1)
    return out


def _tokens(ids) -> list[str]:
    """A document's non-padding token ids as words, plus its bigrams."""
    words = [str(int(i)) for i in ids if int(i) != 0]
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


def tfidf_logreg(data: dict, c_grid: tuple[float, ...] = TFIDF_C_GRID) -> dict:
    """``data``: split -> (token ids [n, seq], labels [n]). Fit on train, pick C on validation, score test."""
    vec = TfidfVectorizer(analyzer=_tokens, sublinear_tf=True)
    x = {split: (vec.fit_transform if split == "train" else vec.transform)([row for row in ids])
         for split, (ids, _) in sorted(data.items(), key=lambda kv: kv[0] != "train")}
    y = {split: labels.numpy() for split, (_, labels) in data.items()}
    fits = {c: LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"]) for c in c_grid}
    val = {c: accuracy_score(y["validation"], m.predict(x["validation"])) for c, m in fits.items()}
    best = max(c_grid, key=lambda c: (val[c], -c))  # ties: the stronger regularisation
    pred = fits[best].predict(x["test"])
    return {"C": best, "validation_accuracy_by_C": {str(c): v for c, v in val.items()},
            "validation_accuracy": val[best], "test_accuracy": float(accuracy_score(y["test"], pred)),
            "test_macro_f1": float(f1_score(y["test"], pred, average="macro")),
            "features": len(vec.vocabulary_), "train_size": int(x["train"].shape[0])}
