"""The task interface and helpers shared by the tasks."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn


class DataMissingError(RuntimeError):
    """A dataset package is not installed; the message names the command that installs it."""


class Task:
    """What the trainer uses of a task, and nothing else (the trainer never reads a task's other attributes).

    - ``model``: the ``nn.Module`` to train; ``train_size``: training samples at the current sequence length;
    - ``batch(indices, generator)``: the training samples at ``indices`` (``generator``: the step's data
      randomness, e.g. MLM masks);
    - ``loss(model, batch) -> (summed loss, count)`` and ``count(batch)`` (known before the forward), so that
      gradient accumulation normalises by the true total;
    - ``evaluate(model, split) -> {metric: value}`` on a held-out split ("validation" | "test");
    - ``set_train_seq_len(seq_len)`` (multi-phase runs), ``describe()`` (one line for the run's header);
    - ``baseline()``: the metrics of a trivial predictor on the test split ({} when the task has none);
    - optionally ``save_pretrained(model, directory)``: the trainer calls it into ``<out>/hf/`` at the end
      of a run (a model and tokenizer that ``transformers``' ``from_pretrained`` can load).

    Tasks never import the trainer.
    """

    name: str = "task"
    model: nn.Module
    train_size: int

    def batch(self, indices: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        raise NotImplementedError

    def count(self, batch: dict[str, Tensor]) -> int:
        """What the loss is normalised by (samples; masked tokens for MLM), known before the forward."""
        return int(next(iter(batch.values())).shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        raise NotImplementedError

    def set_train_seq_len(self, seq_len: int | None) -> int:
        """Train on sequences of ``seq_len`` tokens from now on (``None``: the task's own); returns the new
        number of training samples. Only sequence tasks support a length (multi-phase runs)."""
        if seq_len is None:
            return self.train_size
        raise ValueError(f"Invalid seq_len for task {self.name!r}: {seq_len!r} (allowed: only tasks with "
                         "sequences, i.e. 'mlm', can change the sequence length between phases)")

    def baseline(self) -> dict[str, float]:
        """Test-split metrics of a trivial predictor (e.g. the majority class); a result at or below them is
        flagged in the run's summary. ``{}``: the task has no baseline."""
        return {}

    def input_fingerprint(self) -> str | None:
        """A hash of what turns the data into the model's inputs (the tokenizer: its vocabulary and ids), stored
        in checkpoints: a resume under another one would feed the trained weights other ids. ``None``: the task
        has nothing of the kind (images)."""
        tokenizer = getattr(self, "tokenizer", None)
        return None if tokenizer is None else tokenizer_fingerprint(tokenizer)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return f"{self.name}: {params / 1e6:.2f} M parameters, {self.train_size} training samples"


def tokenizer_fingerprint(tokenizer) -> str | None:
    """16 hex digits of the tokenizer's full description (a ``tokenizers.Tokenizer`` or a fast
    ``transformers`` tokenizer): vocabulary, ids, normaliser, special tokens. ``None`` for a tokenizer that
    cannot describe itself (a slow ``transformers`` one)."""
    import hashlib

    to_str = getattr(getattr(tokenizer, "backend_tokenizer", tokenizer), "to_str", None)
    return None if to_str is None else hashlib.sha256(to_str().encode()).hexdigest()[:16]


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed data package, located without importing it (their imports pull old deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissingError(f"the data package '{module}' is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    path = Path(os.environ.get("LARGEBATCH_CACHE", Path.home() / ".cache" / "largebatch"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def hf_offline() -> None:
    """Models are built from configs; never reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
