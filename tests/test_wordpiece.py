"""The trained WordPiece vocabulary is the same file in every process: `tokenizers` numbers some pieces in
hash-map order (a new order per process); canonical_ids fixes the numbers without changing any token."""
import json
import subprocess
import sys

import pytest

TRAIN = """
import json, random, sys
from largebatch.tasks import mlm
rng = random.Random(0)
syllables = "ka to ri se mu na lo ve pi da qu ex zo fy gh".split()
texts = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(40))
         for _ in range(300)]
from tokenizers import BertWordPieceTokenizer
raw = BertWordPieceTokenizer(lowercase=True)
raw.train_from_iterator(texts, vocab_size=300, min_frequency=2, special_tokens=list(mlm.hf.WORDPIECE_SPECIALS),
                        show_progress=False)
tok = mlm.train_tokenizer(texts, 300)
sample = texts[0] + " zokaqu exfyghri"
print(json.dumps({"raw_vocab": raw.get_vocab(), "raw_tokens": raw.encode(sample).tokens,
                  "file": tok.to_str(), "tokens": tok.encode(sample).tokens}))
"""


def _train(cache) -> dict:
    out = subprocess.run([sys.executable, "-c", TRAIN], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "LARGEBATCH_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_two_processes_train_the_same_tokenizer_file(tmp_path):
    a, b = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert a["raw_vocab"].keys() == b["raw_vocab"].keys()
    assert a["raw_vocab"] != b["raw_vocab"]  # the control: the trainer's own ids move between processes
    assert a["file"] == b["file"]  # fixed here, byte for byte
    assert a["tokens"] == a["raw_tokens"] == b["tokens"]  # and no text is tokenised differently
    vocab = json.loads(a["file"])["model"]["vocab"]
    assert list(vocab)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and list(vocab.values()) == list(
        range(len(vocab)))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 1 and files[0].startswith("wordpiece-ids-sorted-300-")  # no temp file left behind


def test_special_tokens_must_come_first():
    from tokenizers import BertWordPieceTokenizer

    from largebatch.tasks.mlm import canonical_ids

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(["ab ba ab"] * 10, vocab_size=50, special_tokens=["[UNK]", "[PAD]"], show_progress=False)
    with pytest.raises(ValueError, match="not the vocabulary's first ids"):
        canonical_ids(tok._tokenizer)


def test_a_checkpoint_of_another_vocabulary_numbering_is_not_resumed(tmp_path, monkeypatch):
    """A run interrupted, then resumed after its tokenizer's ids changed (here: the cache trained again with
    another numbering) would train its embedding rows under other ids (seen once: the loss jumped from 5.8 to
    11.2 at the resume): refused with the fingerprints, the checkpoint kept; the same tokenizer resumes."""
    from largebatch.checkpoint import CheckpointError, list_checkpoints
    from largebatch.tasks import mlm
    from largebatch.train.loop import TrainConfig, train

    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    options = dict(vocab_size=128, seq_len=16, hidden=16, layers=1, heads=2, intermediate=32,
                   limit_train_sequences=64, max_eval_sequences=16)
    cfg = TrainConfig(task="mlm", task_options=options, optimizer="lamb", batch_size=16, micro_batch_size=16,
                      lr=1e-3, warmup_steps=1, steps=8, checkpoint_every=4, eval_every=100, out=str(tmp_path / "run"),
                      progress=False, plot=False, threads=1)
    stop = {"at": 5}

    class Interrupt(Exception):
        pass

    def on_step(step, record):
        if step + 1 == stop["at"]:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, on_step=on_step)
    kept = list_checkpoints(tmp_path / "run")
    assert len(kept) == 1

    sorted_ids = mlm.canonical_ids
    monkeypatch.setattr(mlm, "WORDPIECE_IDS", "ids-reversed")  # another cache file, numbered the other way
    monkeypatch.setattr(mlm, "canonical_ids", lambda tok: _reversed(sorted_ids(tok)))
    with pytest.raises(CheckpointError, match=r"cannot resume from .*ckpt-00000004.*trained with another tokenizer"):
        train(cfg, resume=str(tmp_path / "run"))
    assert list_checkpoints(tmp_path / "run") == kept

    monkeypatch.undo()
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    assert train(cfg, resume=str(tmp_path / "run"))["steps"] == 8


def _reversed(tok):
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    order = list(vocab)[:5] + list(vocab)[5:][::-1]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    return Tokenizer.from_str(json.dumps(spec))
