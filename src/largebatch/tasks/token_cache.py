"""A corpus tokenised once into memory-mapped token files, and fixed-length sequences read from them.

Each split's documents become one stream of token ids (``uint16`` when the vocabulary fits, else
``uint32``), documents separated by the tokenizer's separator token, written in chunks to
``<split>.bin`` under a cache folder keyed by the files (paths, sizes, mtimes), the split and the
tokenizer. Training then reads only the windows a batch needs, so the corpus never has to fit in memory.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: characters of text handed to the tokenizer at once (bounds the memory used while tokenising)
ENCODE_CHARS = 1 << 22
SPLITS = ("train", "validation", "test")


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class _SplitWriter:
    """Buffers one split's text pieces, encodes them in batches and appends the ids to its file."""

    def __init__(self, path: Path, encode: Callable[[list[str]], list[list[int]]], sep_id: int, dtype):
        self.file = path.open("wb")
        self.encode, self.sep_id, self.dtype = encode, sep_id, dtype
        self.pieces: list[str] = []
        self.starts: list[bool] = []   # whether the piece begins a document (a separator goes before it)
        self.chars, self.tokens, self.documents = 0, 0, 0

    def add(self, piece: str, new_document: bool) -> None:
        self.pieces.append(piece)
        self.starts.append(new_document)
        self.chars += len(piece)
        if self.chars >= ENCODE_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.pieces:
            return
        out: list[int] = []
        for starts, ids in zip(self.starts, self.encode(self.pieces)):
            if starts:
                if self.documents:
                    out.append(self.sep_id)
                self.documents += 1
            out.extend(ids)
        np.asarray(out, dtype=self.dtype).tofile(self.file)
        self.tokens += len(out)
        self.pieces, self.starts, self.chars = [], [], 0

    def close(self) -> None:
        self.flush()
        self.file.close()


def write_token_cache(directory: Path, pieces: Iterable[tuple[str, int, str]],
                      encode: Callable[[list[str]], list[list[int]]], *, sep_id: int, vocab_size: int) -> dict:
    """Tokenise ``(split, document index, piece)`` triples into ``directory/<split>.bin`` (atomically)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    dtype = token_dtype(vocab_size)
    try:
        writers = {s: _SplitWriter(tmp / f"{s}.bin", encode, sep_id, dtype) for s in SPLITS}
        last_doc = {s: -1 for s in SPLITS}
        for split, doc, piece in pieces:
            writers[split].add(piece, doc != last_doc[split])
            last_doc[split] = doc
        for w in writers.values():
            w.close()
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
                "tokens": {s: w.tokens for s, w in writers.items()},
                "documents": {s: w.documents for s, w in writers.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if directory.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.replace(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_meta(directory)


def read_meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


def open_tokens(directory: Path, split: str) -> np.ndarray:
    meta = read_meta(directory)
    if meta["tokens"][split] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r")


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> Tensor:
    """How often each id occurs, read in chunks (for the unigram baseline)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[start:start + chunk], minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(counts)


class TokenWindows:
    """Sequences ``[CLS] tokens[i·(L-2) : (i+1)·(L-2)] [SEP]`` of a token stream, read on demand.

    Indexing with a tensor, array or slice of sequence numbers returns a ``LongTensor`` (n, L), like the
    in-memory sequence tensor of the built-in corpus.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, cls_id: int, sep_id: int, limit: int | None = None):
        self.tokens, self.seq_len, self.cls_id, self.sep_id = tokens, seq_len, cls_id, sep_id
        n = len(tokens) // (seq_len - 2)
        self.n = min(n, limit) if limit else n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, slice):
            rows = np.arange(self.n)[index]
        else:
            rows = np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= self.n):
                raise IndexError(f"sequence index out of range 0 ... {self.n - 1}")
        body = self.seq_len - 2
        ids = self.tokens[rows[:, None] * body + np.arange(body)] if rows.size else np.zeros((0, body), np.int64)
        out = torch.empty((len(rows), self.seq_len), dtype=torch.long)
        out[:, 0], out[:, -1] = self.cls_id, self.sep_id
        out[:, 1:-1] = torch.from_numpy(ids.astype(np.int64))
        return out
