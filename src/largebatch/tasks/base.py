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
        number of training samples. Only sequence tasks support it (multi-phase runs)."""
        raise ValueError(f"Invalid seq_len for task {self.name!r}: {seq_len!r} (allowed: only tasks with "
                         "sequences, i.e. 'mlm', can change the sequence length between phases)")

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return f"{self.name}: {params / 1e6:.2f} M parameters, {self.train_size} training samples"


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
