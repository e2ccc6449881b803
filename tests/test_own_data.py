"""Own data and models: text corpora, tokenizer and model configs, export to transformers and back,
classification from an exported folder, image folders; and every bad input naming its option."""
import json
import random

import numpy as np
import pytest
import torch

from largebatch.tasks import build_task
from largebatch.tasks import corpus, hf
from largebatch.tasks.mlm import to_sequences
from largebatch.tasks.token_cache import TokenWindows
from largebatch.train.loop import TrainConfig, train

WORDS = "river stone light night sea wind fire earth cloud rain snow leaf root branch bird song".split()
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))


def _document(rng: random.Random, lines: int) -> str:
    # a learnable pattern: each line repeats one word pair, so masked tokens are predictable from context
    out = []
    for _ in range(lines):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        out.append(" ".join([a, b] * 6))
    return "\n".join(out)


def _corpus(tmp_path, docs=12, lines=8, seed=0) -> tuple:
    rng = random.Random(seed)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(_document(rng, lines) for _ in range(docs)))
    b.write_text("\n\n".join(_document(rng, lines) for _ in range(3)))
    return a, b


def _write_config(tmp_path, **cfg):
    path = tmp_path / f"{cfg['model_type']}.json"
    path.write_text(json.dumps(cfg))
    return path


def _run(tmp_path, name, task, **kw):
    cfg = TrainConfig(task=task.name, out=str(tmp_path / name), progress=False, plot=False, threads=1, seed=0, **kw)
    summary = train(cfg, task=task)
    recs = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, recs


def _same_logits(task, folder):
    from transformers import AutoModelForMaskedLM

    loaded = AutoModelForMaskedLM.from_pretrained(folder).eval()
    task.model.eval()
    ids = task.data["test"][:4]
    with torch.no_grad():
        ours, _ = task.model(ids, torch.zeros_like(ids))  # labels != -100 everywhere: logits at every position
        theirs = loaded(input_ids=ids).logits.reshape(ours.shape)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_text_files_train_export_load_and_classify(tmp_path):
    from transformers import AutoTokenizer

    a, b = _corpus(tmp_path)
    config = _write_config(tmp_path, **TINY_BERT)
    task = build_task("mlm", data=[str(a)], eval_data=[str(b)], model_config=str(config), vocab_size=128, seq_len=32,
                      dropout=0.0)
    assert "12 training documents" in task.describe() and task.baseline()["accuracy"] > 0
    summary, recs = _run(tmp_path, "mlm", task, batch_size=32, micro_batch_size=16, lr=2e-2, warmup_steps=2, steps=40)
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.5, [round(r["loss"], 3) for r in recs]  # measured: 0.64 (0.499 after 30 steps)
    assert summary["test_accuracy"] > task.baseline()["accuracy"]

    out = task.save_pretrained(task.model, tmp_path / "hf")
    _same_logits(task, out)
    tok = AutoTokenizer.from_pretrained(out)
    text = "river stone light"
    expected = [task.cls_id, *task.tokenizer.encode(text, add_special_tokens=False).ids, task.sep_id]
    assert tok(text)["input_ids"] == expected

    rng = random.Random(1)
    rows = [{"text": " ".join(rng.choice(WORDS[:8] if i % 2 else WORDS[8:]) for _ in range(10)),
             "label": "calm" if i % 2 else "storm"} for i in range(40)]
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    clf = build_task("classify", data=[str(csv)], model=str(out), seq_len=24, dropout=0.0)
    assert clf.classes == ["calm", "storm"] and "2 labels: calm, storm" in clf.describe()
    assert torch.equal(clf.model.bert.encoder.layer[0].output.dense.weight,
                       task.model.bert.encoder.layer[0].output.dense.weight)
    summary, recs = _run(tmp_path, "classify", clf, optimizer="adamw", batch_size=16, micro_batch_size=16, lr=3e-3,
                         warmup_steps=1, steps=20, schedule="constant")
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.2, [round(r["loss"], 3) for r in recs]
    assert clf.baseline()["accuracy"] <= 0.75
    exported = clf.save_pretrained(clf.model, tmp_path / "clf")
    from transformers import AutoModelForSequenceClassification
    loaded = AutoModelForSequenceClassification.from_pretrained(exported)
    assert loaded.config.id2label == {0: "calm", 1: "storm"}


@pytest.mark.parametrize("model_type,extra", [
    ("roberta", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=40)),
    ("distilbert", dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32)),
])
def test_other_masked_lm_configs_export_with_same_logits(tmp_path, model_type, extra):
    a, b = _corpus(tmp_path, docs=4, lines=4)
    config = _write_config(tmp_path, model_type=model_type, **extra)
    task = build_task("mlm", data=[str(a)], eval_data=[str(b)], model_config=str(config), vocab_size=128, seq_len=32)
    assert task.hf_config.model_type == model_type and task.hf_config.vocab_size == task.vocab_size
    loss, count = task.loss(task.model, task.batch(torch.arange(4), torch.Generator().manual_seed(0)))
    loss.backward()
    assert count > 0 and torch.isfinite(loss)
    _same_logits(task, task.save_pretrained(task.model, tmp_path / "hf"))
    # RoBERTa offsets positions by padding_idx + 1 (pad id 0 here): 40 positions hold 39 tokens
    longest = 39 if model_type == "roberta" else 32
    assert task.set_train_seq_len(longest) > 0
    with pytest.raises(ValueError, match=f"Invalid seq_len: {longest + 1} "):
        task.set_train_seq_len(longest + 1)


def test_model_sizes_are_the_published_shapes():
    sizes = hf.model_sizes()
    assert list(sizes) == ["bert-tiny", "bert-mini", "bert-small", "bert-medium", "bert-base", "bert-large"]
    shapes = {k: (v["num_hidden_layers"], v["hidden_size"]) for k, v in sizes.items()}
    assert shapes == {"bert-tiny": (2, 128), "bert-mini": (4, 256), "bert-small": (4, 512), "bert-medium": (8, 512),
                      "bert-base": (12, 768), "bert-large": (24, 1024)}
    for v in sizes.values():
        assert v["num_attention_heads"] == v["hidden_size"] // 64 and v["intermediate_size"] == 4 * v["hidden_size"]


def test_model_size_and_tokenizer_folder(tmp_path):
    a, b = _corpus(tmp_path, docs=6, lines=4)
    task = build_task("mlm", data=[str(a)], model_size="bert-tiny", vocab_size=128, seq_len=32, dropout=0.0)
    cfg = task.hf_config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 128, 2, 512)
    out = task.save_pretrained(task.model, tmp_path / "hf")
    again = build_task("mlm", data=[str(a)], tokenizer=str(out), model_size="bert-tiny", seq_len=32)
    assert again.vocab_size == task.vocab_size
    assert torch.equal(again.data["train"][:8], task.data["train"][:8])


def test_split_is_by_document_and_deterministic(tmp_path, monkeypatch):
    # every document is one repeated unique word: a held-out document's word never reaches the training stream
    docs = [" ".join([f"w{i:02d}"] * 30) for i in range(40)]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n\n".join(docs) + "\n")
    assert corpus.count_documents([path]) == 40
    held = corpus.held_out_documents(40)
    assert len(held["validation"]) == len(held["test"]) == 2
    assert not set(held["validation"]) & set(held["test"])
    task = build_task("mlm", data=[str(path)], vocab_size=128, seq_len=16)
    def words(split):
        ids = np.asarray(task._tokens[split]).tolist()
        return set(task.hf_tokenizer.decode(ids, skip_special_tokens=True).split())

    assert words("validation") == {f"w{d:02d}" for d in held["validation"]}
    assert words("test") == {f"w{d:02d}" for d in held["test"]}
    assert words("train") == {f"w{d:02d}" for d in range(40)} - words("validation") - words("test")
    # a document longer than a piece stays one document
    monkeypatch.setattr(corpus, "PIECE_CHARS", 50)
    long = tmp_path / "long.txt"
    long.write_text("\n".join(["a b c d e f g h"] * 40) + "\n\nsecond document\n")
    pieces = list(corpus.iter_documents([long]))
    assert len(pieces) > 3 and {d for d, _ in pieces} == {0, 1}


def test_jsonl_and_saved_dataset_read_the_same_documents(tmp_path):
    rng = random.Random(0)
    rows = [{"body": _document(rng, 3), "id": i} for i in range(30)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = build_task("mlm", data=[str(jsonl)], text_field="body", vocab_size=128, seq_len=16)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    b = build_task("mlm", data=[str(tmp_path / "ds")], text_field="body", vocab_size=128, seq_len=16)
    assert a.corpus.meta["tokens"] == b.corpus.meta["tokens"] and a.corpus.meta["documents"]["train"] == 26
    # (two WordPiece trainings may number tied pieces differently: compare the text)
    assert a.hf_tokenizer.batch_decode(a.data["test"][:]) == b.hf_tokenizer.batch_decode(b.data["test"][:])


def test_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    a, _ = _corpus(tmp_path, docs=5, lines=4)
    first = build_task("mlm", data=[str(a)], vocab_size=128, seq_len=16)
    from largebatch.tasks import mlm

    monkeypatch.setattr(mlm, "write_token_cache", lambda *a, **k: pytest.fail("tokenised again"))
    again = build_task("mlm", data=[str(a)], vocab_size=128, seq_len=16)
    assert again.corpus.cache == first.corpus.cache
    a.write_text(a.read_text() + "\n\nnew document here\n")
    with pytest.raises(pytest.fail.Exception, match="tokenised again"):
        build_task("mlm", data=[str(a)], vocab_size=128, seq_len=16)


def test_token_windows_match_in_memory_sequences():
    stream = np.random.default_rng(0).integers(5, 300, 1000).astype(np.uint16)
    windows = TokenWindows(stream, 16, cls_id=2, sep_id=3)
    expected = to_sequences(stream.tolist(), 16, 2, 3)
    assert len(windows) == len(expected)
    idx = torch.tensor([5, 0, 70, 5])
    assert torch.equal(windows[idx], expected[idx]) and torch.equal(windows[:10], expected[:10])
    assert len(TokenWindows(stream, 16, 2, 3, limit=7)) == 7
    with pytest.raises(IndexError):
        windows[torch.tensor([len(windows)])]


def _png_folder(root, classes=("blue", "red"), per_class=6, size=(20, 14)):
    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(colours[name]) + rng.normal(0, 20, (*size[::-1], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_image_folder_trains(tmp_path):
    root = _png_folder(tmp_path / "imgs", per_class=10)
    task = build_task("image", data=str(root), image_size=16, width=8, precise_bn_samples=64)
    assert task.classes == ["blue", "red"] and task.data["train"][0].shape[1:] == (3, 16, 16)
    assert [len(task.data[s][1]) for s in ("train", "validation", "test")] == [16, 2, 2]
    assert "2 classes: blue, red" in task.describe() and task.baseline()["accuracy"] == 0.5
    summary, recs = _run(tmp_path, "image", task, batch_size=16, micro_batch_size=8, lr=0.05, warmup_steps=1, steps=8)
    assert recs[-1]["loss"] < recs[0]["loss"]
    grey = build_task("image", data=str(root), eval_data=str(_png_folder(tmp_path / "held", ("red",), 2)),
                      image_size=12, channels=1, width=8)
    assert grey.data["train"][0].shape[1:] == (1, 12, 12) and grey.data["test"][1].tolist() == [1, 1]
    out = grey.save_pretrained(grey.model, tmp_path / "img-out")
    assert json.loads((out / "config.json").read_text())["classes"] == ["blue", "red"]


def test_crop_flip_moves_all_channels_together():
    from largebatch.tasks.image import random_crop_flip

    grey = torch.rand(6, 1, 10, 10)
    rgb = random_crop_flip(grey.expand(6, 3, 10, 10).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert torch.equal(rgb[:, :1], random_crop_flip(grey, torch.Generator().manual_seed(0)))


def _bad_inputs(tmp_path):
    a, b = _corpus(tmp_path, docs=4, lines=2)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"body": "x y z"}) + "\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    gpt2 = _write_config(tmp_path, model_type="gpt2", n_embd=32)
    csv = tmp_path / "rows.csv"
    csv.write_text("text,topic\nhello,a\nworld,b\n")
    short = tmp_path / "short.csv"
    short.write_text("text,label\nhello,a\nworld\n")
    one = _png_folder(tmp_path / "one", ("red",), 3)
    return [
        ("mlm", dict(data=[str(tmp_path / "missing.txt")]), "Invalid data: .*does not exist"),
        ("mlm", dict(data=[str(empty)]), "Invalid data: 0 document"),
        ("mlm", dict(data=[str(a)], eval_data=[str(empty)]), "Invalid eval_data: the validation split"),
        ("mlm", dict(data=[str(jsonl)]), r"Invalid text_field: 'text' is not a field .*allowed: \['body'\]"),
        ("mlm", dict(data=[str(a)], model_config=str(gpt2)), "Invalid model_config: model_type 'gpt2' has no masked-LM"),
        ("mlm", dict(data=[str(a)], model_size="bert-huge"), "Invalid model_size: 'bert-huge' .*bert-tiny"),
        ("mlm", dict(data=[str(a)], tokenizer=str(tmp_path)), "Invalid tokenizer: "),
        ("mlm", dict(eval_data=[str(b)]), "Invalid eval_data: given without data"),
        ("classify", dict(data=[str(csv)]), r"Invalid label_field: 'label' is not a field .*\['text', 'topic'\]"),
        ("classify", dict(data=[str(csv)], label_field="topic", model=str(tmp_path / "nope")), "Invalid model: "),
        ("classify", dict(data=[str(short)]), r"Invalid data: .*short.csv row 2 has no value in label_field 'label'"),
        ("image", dict(data=str(one)), r"Invalid data: .*class folders \['red'\]"),
        ("image", dict(data=str(tmp_path / "nope")), "Invalid data: .*is not a folder"),
    ]


def test_bad_inputs_name_the_option(tmp_path):
    for task, options, message in _bad_inputs(tmp_path):
        with pytest.raises(ValueError, match=message):
            build_task(task, **options)


def test_export_from_a_run_checkpoint(tmp_path):
    from largebatch.cli.export import export_run

    a, b = _corpus(tmp_path, docs=4, lines=4)
    cfg = TrainConfig(task="mlm", data=[str(a)], eval_data=[str(b)],
                      model_config=str(_write_config(tmp_path, **TINY_BERT)), task_options=dict(vocab_size=128, seq_len=32),
                      out=str(tmp_path / "run"), progress=False, plot=False, threads=1, batch_size=8,
                      micro_batch_size=8, lr=1e-2, warmup_steps=1, steps=3)
    task = build_task("mlm", seed=0, **cfg.task_build_options())
    train(cfg, task=task)
    out = export_run(tmp_path / "run", tmp_path / "exported")
    _same_logits(task, out)
    with pytest.raises(ValueError, match="Invalid directory: .* is not an empty folder"):
        export_run(tmp_path / "run", tmp_path / "exported")


def test_save_pretrained_leaves_the_rng_alone(tmp_path):
    a, _ = _corpus(tmp_path, docs=4, lines=4)
    task = build_task("mlm", data=[str(a)], model_config=str(_write_config(tmp_path, **TINY_BERT)), vocab_size=128,
                      seq_len=16)
    before = torch.get_rng_state()
    task.save_pretrained(task.model, tmp_path / "hf")
    assert torch.equal(before, torch.get_rng_state())
    # the trainer passes a gathered state dict under FSDP2: the same export
    _same_logits(task, task.save_pretrained(task.model.state_dict(), tmp_path / "from-state"))


def test_an_option_of_another_task_is_named():
    from largebatch.tasks import check_task_options

    with pytest.raises(ValueError, match="Invalid option 'label_field' for task 'mlm'"):
        check_task_options("mlm", {"label_field": "topic"})
    with pytest.raises(ValueError, match="Invalid option 'model_config' for task 'image'"):
        check_task_options("image", {"model_config": "x.json"})
    check_task_options("image", {"data": ["photos"]})  # the command line gives a list


def _cli(*args, cwd=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "largebatch.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)


def test_cli_own_corpus_train_export_classify(tmp_path):
    """The issue's path through the command line: two text files and a config -> train -> export -> classify."""
    from transformers import AutoModelForMaskedLM

    a, b = _corpus(tmp_path, docs=6, lines=4)
    config = _write_config(tmp_path, **TINY_BERT)
    common = ["--no-progress", "--no-plot", "--threads", "1", "--warmup-steps", "1"]
    r = _cli("train", "--task", "mlm", "--data", a, "--eval-data", b, "--model-config", config, "--out",
             tmp_path / "mlm", "--steps", "3", "--batch-size", "8", "--micro-batch-size", "8",
             "--task-opt", "vocab_size=128", "--task-opt", "seq_len=32", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 training documents" in r.stdout and (tmp_path / "mlm" / "hf" / "config.json").exists()
    r = _cli("export", tmp_path / "mlm", tmp_path / "exported")
    assert r.returncode == 0, r.stderr[-2000:]
    end_of_run = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm" / "hf").state_dict()
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(end_of_run[k], exported[k]) for k in end_of_run)

    rows = [f"{' '.join(random.Random(i).choices(WORDS, k=6))},{'calm' if i % 2 else 'storm'}\n" for i in range(24)]
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(rows[:18]))
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(rows[18:]))
    r = _cli("train", "--task", "classify", "--data", tmp_path / "train.csv", "--eval-data", tmp_path / "test.csv",
             "--model", tmp_path / "exported", "--out", tmp_path / "clf", "--steps", "2", "--batch-size", "8",
             "--micro-batch-size", "8", "--task-opt", "seq_len=16", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 labels: calm, storm; model from" in r.stdout
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf" / "hf").config.num_labels == 2


def test_cli_bad_own_data_exits_2_with_one_line(tmp_path):
    a, _ = _corpus(tmp_path, docs=4, lines=2)
    for args, message in [
        (["train", "--task", "mlm", "--data", tmp_path / "missing.txt"], "Invalid data: "),
        (["train", "--task", "mlm", "--data", a, "--model-size", "bert-huge"], "Invalid model_size: 'bert-huge'"),
        (["train", "--task", "mlm", "--data", a, "--label-field", "topic"], "Invalid option 'label_field'"),
        (["export", tmp_path / "no-run", tmp_path / "x"], "checkpoint not found"),
    ]:
        r = _cli(*args, *(["--out", tmp_path / "out", "--no-progress"] if args[0] == "train" else []))
        assert r.returncode == 2, (args, r.stdout[-500:], r.stderr[-1000:])
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
