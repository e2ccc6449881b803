"""Readers for a user's own data: text corpora as streams of documents, labelled rows, held-out splits.

A *document* is the unit a held-out split never cuts:

- a plain-text file (``.txt`` or any other suffix): blocks separated by one or more blank lines (the
  format of BERT's pre-training data: one sentence or paragraph per line, documents delimited by empty
  lines); a file without blank lines is one document;
- a JSONL file (``.jsonl`` / ``.json`` with one object per line): one row, text in ``text_field``;
- a folder written by ``datasets``' ``save_to_disk``: one row, text in ``text_field``.

Everything is streamed: documents are yielded as pieces of at most ``PIECE_CHARS`` characters (cut at
line ends), so a file without blank lines larger than memory still reads in constant memory.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

PIECE_CHARS = 1 << 20
JSONL_SUFFIXES = (".jsonl", ".json")
DATASETS_INSTALL = "pip install -c constraints.txt 'largebatch[datasets]'   (or: pip install datasets)"
#: without eval_data: this fraction of the documents (at least one each) is validation, the same again test
HELD_OUT_FRACTION = 0.05


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def resolve_paths(paths: Iterable[str] | str, option: str) -> list[Path]:
    """Files, folders (all files below, sorted; a ``save_to_disk`` folder stays one entry) and globs."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        matches = sorted(glob.glob(os.path.expanduser(str(raw)), recursive=True)) if glob.has_magic(str(raw)) \
            else [os.path.expanduser(str(raw))]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise ValueError(f"Invalid {option}: {raw!r} does not exist (allowed: text or JSONL files, folders of "
                             "them, globs, or a folder written by datasets' save_to_disk)")
        for m in map(Path, matches):
            if m.is_dir() and not _is_saved_dataset(m):
                out.extend(sorted(p for p in m.rglob("*") if p.is_file() and not p.name.startswith(".")))
            else:
                out.append(m)
    if not out:
        raise ValueError(f"Invalid {option}: {list(paths)!r} holds no files")
    return out


def fingerprint(paths: list[Path]) -> list[list]:
    """(path, size, mtime) of every file: the cache key of anything derived from the data."""
    files = []
    for p in paths:
        for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return files


def _text_documents(path: Path) -> Iterator[tuple[bool, str]]:
    """(starts_new_document, piece) of a plain-text file."""
    lines: list[str] = []
    size, new = 0, True
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():  # a blank line ends the document, even right after a piece was handed on
                if lines:
                    yield new, "\n".join(lines)
                lines, size, new = [], 0, True
                continue
            lines.append(line)
            size += len(line) + 1
            if size >= PIECE_CHARS:  # a long document: hand it on in pieces, still one document
                yield new, "\n".join(lines)
                lines, size, new = [], 0, False
    if lines:
        yield new, "\n".join(lines)


def _field(row: dict, field: str, option: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"Invalid {option}: {field!r} is not a field of {where} (allowed: {keys})")
    if row[field] is None:
        raise ValueError(f"Invalid data: {where} has no value in {option} {field!r} (allowed: every row with one)")
    return str(row[field])


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"Invalid data: {path}:{number} is not JSON ({exc.msg}; allowed: one JSON "
                                     "object per line)") from None


def load_saved_dataset(path: Path, option: str):
    """A ``datasets`` Dataset from ``save_to_disk`` (its ``train`` split if it is a DatasetDict)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{option} {path} is a saved datasets folder; reading it needs the datasets package: "
                          f"{DATASETS_INSTALL}") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"Invalid {option}: {path} has splits {sorted(ds)} (allowed: a Dataset or a "
                             "DatasetDict with a 'train' split)")
        ds = ds["train"]
    return ds


def _dataset_rows(path: Path, option: str) -> Iterator[dict]:
    ds = load_saved_dataset(path, option)
    for batch in ds.iter(batch_size=1000):  # Arrow files are memory-mapped: rows are read as needed
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            yield {k: batch[k][i] for k in keys}


def iter_documents(paths: list[Path], text_field: str = "text", option: str = "data") -> Iterator[tuple[int, str]]:
    """(document index, text piece) over all files in order; pieces of one document share its index."""
    doc = -1
    for path in paths:
        if _is_saved_dataset(path):
            for row in _dataset_rows(path, option):
                doc += 1
                yield doc, _field(row, text_field, "text_field", f"the dataset {path}")
        elif path.suffix.lower() in JSONL_SUFFIXES:
            for number, row in _jsonl_rows(path):
                doc += 1
                yield doc, _field(row, text_field, "text_field", f"{path}:{number}")
        else:
            for new, piece in _text_documents(path):
                doc += new
                yield doc, piece


def count_documents(paths: list[Path], text_field: str = "text", option: str = "data") -> int:
    last = -1
    for last, _ in iter_documents(paths, text_field, option):
        pass
    return last + 1


def held_out_documents(n_documents: int, option: str = "data") -> dict[str, np.ndarray]:
    """Without eval_data: which documents are validation / test, spread evenly through the corpus.

    ``HELD_OUT_FRACTION`` of the documents (at least one) each; a document is never cut.
    """
    if n_documents < 3:
        raise ValueError(f"Invalid {option}: {n_documents} document(s), too few for a held-out split by document "
                         "(allowed: at least 3 documents -- separate them by a blank line, give several files, "
                         "or give eval_data)")
    n_held = max(1, round(HELD_OUT_FRACTION * n_documents))
    held = np.unique(np.linspace(0, n_documents - 1, 2 * n_held).round().astype(np.int64))
    return {"validation": held[0::2], "test": held[1::2]}


def read_rows(paths: list[Path], fields: tuple[str, ...], option: str) -> list[dict]:
    """Labelled rows of CSV (header row), JSONL or saved-dataset files, with ``fields`` checked."""
    rows: list[dict] = []
    for path in paths:
        if _is_saved_dataset(path):
            found = list(_dataset_rows(path, option))
        elif path.suffix.lower() == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                found = list(csv.DictReader(f))
        elif path.suffix.lower() in JSONL_SUFFIXES:
            found = [row for _, row in _jsonl_rows(path)]
        else:
            raise ValueError(f"Invalid {option}: {path} (allowed: .csv with a header row, .jsonl, or a datasets "
                             "save_to_disk folder)")
        for i, row in enumerate(found):
            for name, field in zip(("text_field", "label_field"), fields):
                _field(row, field, name, f"{path} row {i + 1}")
        rows.extend(found)
    if not rows:
        raise ValueError(f"Invalid {option}: {[str(p) for p in paths]} hold no rows")
    return rows
