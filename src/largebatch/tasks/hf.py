"""Tokenizers and models of the ``transformers`` library for the text tasks, in and out.

In: a local tokenizer folder (``AutoTokenizer``), a model config JSON of any architecture with a
masked-LM head (``AutoConfig`` / ``AutoModelForMaskedLM``), a built-in size (``model_sizes.json``), or a
model folder (``AutoModelForSequenceClassification``). Out: ``save_pretrained`` of model and tokenizer,
so ``AutoModelForMaskedLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load them.
Nothing is ever downloaded: every path must be a local folder or file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

MODEL_SIZES_FILE = Path(__file__).with_name("model_sizes.json")
#: the special tokens of a WordPiece vocabulary trained here, in id order
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _brief(exc: BaseException) -> str:
    """An exception's message on one line (the CLI prints errors as one line)."""
    return " ".join(str(exc).split())[:200]


def quiet_progress() -> None:
    """No progress bars from transformers while it saves or loads weights (the run has its own)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@lru_cache(maxsize=1)
def model_sizes() -> dict[str, dict]:
    return {k: v for k, v in json.loads(MODEL_SIZES_FILE.read_text()).items() if not k.startswith("_")}


def wordpiece_as_pretrained(tokenizer):
    """A trained ``tokenizers`` WordPiece as a ``PreTrainedTokenizerFast`` that ``save_pretrained`` writes.

    The copy adds BERT's ``[CLS] … [SEP]`` template, so the loaded tokenizer encodes as BERT expects;
    the original is left unchanged (the built-in tasks add those tokens themselves).
    """
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    copy = Tokenizer.from_str(tokenizer.to_str())
    vocab = copy.get_vocab()
    copy.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                             special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=copy, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _local_dir(path: str, option: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"Invalid {option}: {path!r} is not a folder (allowed: a local folder {what}; "
                         "nothing is downloaded)")
    return p


def load_tokenizer(path: str, option: str = "tokenizer"):
    """A local HF tokenizer folder; it must be a fast tokenizer (``tokenizer.json``)."""
    from transformers import AutoTokenizer

    folder = _local_dir(path, option, "written by a tokenizer's save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"Invalid {option}: {path!r} holds no loadable tokenizer ({_brief(exc)}; allowed: a "
                         "folder with tokenizer.json / tokenizer_config.json)") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"Invalid {option}: {path!r} is a slow tokenizer (allowed: a fast tokenizer, with "
                         "tokenizer.json)")
    return tok


@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    cls: int
    sep: int
    mask: int | None
    all: Tensor


def special_tokens(tok, option: str = "tokenizer", need_mask: bool = True) -> SpecialTokens:
    """Ids of the tokens that start, separate, pad and mask sequences (BERT or RoBERTa naming)."""
    cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    missing = [n for n, v in (("cls/bos", cls), ("sep/eos", sep)) if v is None]
    if need_mask and tok.mask_token_id is None:
        missing.append("mask")
    if missing:
        raise ValueError(f"Invalid {option}: the tokenizer has no {' / '.join(missing)} token (allowed: a tokenizer "
                         "for masked-LM models, e.g. BERT's or RoBERTa's)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else sep
    return SpecialTokens(pad, cls, sep, tok.mask_token_id, torch.tensor(sorted(set(tok.all_special_ids))))


def _config_dict(model_config: str | None, model_size: str | None) -> tuple[dict, bool]:
    """The config as a dict, and whether it is a built-in size (whose dropout the task option sets)."""
    if model_config and model_size:
        raise ValueError(f"Invalid model_size: {model_size!r} together with model_config (allowed: one of them)")
    if model_size:
        sizes = model_sizes()
        if model_size not in sizes:
            raise ValueError(f"Invalid model_size: {model_size!r} (allowed: {' | '.join(sizes)})")
        return dict(sizes[model_size]), True
    path = Path(model_config).expanduser()
    if not path.is_file():
        raise ValueError(f"Invalid model_config: {model_config!r} is not a file (allowed: a model config JSON, "
                         "e.g. a config.json written by save_pretrained)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"Invalid model_config: {model_config!r} is not JSON ({exc})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ValueError(f"Invalid model_config: {model_config!r} has no 'model_type' (allowed: a transformers "
                         "config JSON, e.g. {\"model_type\": \"bert\", \"hidden_size\": 256, ...})")
    return d, False


def masked_lm_config(*, model_config: str | None, model_size: str | None, vocab_size: int,
                     special: SpecialTokens, dropout: float):
    """A transformers config with a masked-LM head, its vocabulary and padding id set from the tokenizer."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    d, builtin = _config_dict(model_config, model_size)
    option = "model_size" if builtin else "model_config"
    model_type = d.pop("model_type")
    if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ValueError(f"Invalid {option}: model_type {model_type!r} has no masked-LM head (allowed: "
                         f"{', '.join(MODEL_FOR_MASKED_LM_MAPPING_NAMES)})")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        d.pop(key, None)
    if builtin:
        d.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    d.update(vocab_size=vocab_size, pad_token_id=special.pad)
    try:
        return AutoConfig.for_model(model_type, **d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid {option}: {_brief(exc)}") from None


def build_masked_lm(config) -> nn.Module:
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_config(config)


def max_sequence_length(model: nn.Module) -> int:
    """Longest input the position embeddings allow (RoBERTa-style models offset positions by pad + 1)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return 1 << 30
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return positions - (padding_idx + 1 if padding_idx is not None else 0)


def full_state_dict(model: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    """A model's (or a state dict's) entries as plain tensors. A sharded (FSDP2) model must be gathered by
    the caller on every rank first (``train.distributed.full_state``): gathering is a collective."""
    state = model if isinstance(model, dict) else model.state_dict()
    if any(hasattr(v, "full_tensor") for v in state.values()):
        raise ValueError("Invalid model: sharded (FSDP2) parameters; gather the full state on every rank first "
                         "and pass that state dict")
    return dict(state)


def save_masked_lm(model: nn.Module, config, tokenizer, directory: str | Path) -> Path:
    """Write a plain ``*ForMaskedLM`` with ``model``'s weights, and the tokenizer, via ``save_pretrained``.

    ``model`` may be any module whose state_dict keys are the HF model's (the task's masked-only wrapper).
    """
    with torch.random.fork_rng(devices=[]):  # a fresh model's initialisation must not move the run's RNG
        hf = build_masked_lm(config)
    hf.load_state_dict(full_state_dict(model))
    return save_pretrained(hf, tokenizer, directory)


def save_pretrained(hf_model: nn.Module, tokenizer, directory: str | Path) -> Path:
    quiet_progress()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def load_sequence_classifier(path: str, num_labels: int, dropout: float | None = None, option: str = "model"):
    """Any local HF model folder (ours or another) with a new ``num_labels``-way classification head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    folder = _local_dir(path, option, "written by save_pretrained (config.json + weights)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"Invalid {option}: {path!r} holds no loadable model config ({_brief(exc)})") from None
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"Invalid {option}: model_type {config.model_type!r} has no sequence-classification head "
                         f"(allowed: {', '.join(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)})")
    quiet_progress()
    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    extra = {k: v for k, v in extra.items() if hasattr(config, k)}
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True, **extra)
    except (OSError, ValueError) as exc:
        raise ValueError(f"Invalid {option}: {path!r} could not be loaded ({_brief(exc)})") from None
