"""Parameter shapes of the benchmark sets (only shapes: no model is built)."""
from __future__ import annotations


def bert_base() -> list[tuple[int, ...]]:
    """bert-base-uncased with its MLM head (decoder weight tied): 204 tensors, 110.1 M parameters."""
    h, ffn, vocab = 768, 3072, 30522
    shapes: list[tuple[int, ...]] = [(vocab, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(12):
        shapes += [(h, h), (h,)] * 3                      # query, key, value
        shapes += [(h, h), (h,), (h,), (h,)]              # attention output dense + LayerNorm
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,), (h,), (h,)]  # intermediate, output, LayerNorm
    shapes += [(h, h), (h,)]                              # pooler
    shapes += [(h, h), (h,), (h,), (h,), (vocab,)]        # MLM transform + LayerNorm + decoder bias
    return shapes


def resnet50() -> list[tuple[int, ...]]:
    """torchvision's resnet50: 161 tensors, 25.6 M parameters (conv, BatchNorm weight/bias, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, cin, 1, 1), (width * 4,), (width * 4,)]
            cin = width * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def many_small(count: int = 10_000, size: int = 1_000) -> list[tuple[int, ...]]:
    """Per-tensor overhead: many tiny tensors, where launch and bookkeeping costs decide."""
    return [(size,)] * count


def tiny() -> list[tuple[int, ...]]:
    return [(64, 32), (32,), (10, 64), (10,), ()]


SETS = {"bert-base": bert_base, "resnet50": resnet50, "many-small": many_small, "tiny": tiny}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe() -> str:
    """One line per set: tensors and parameters (``python -m largebatch.bench.shapes``)."""
    return "\n".join(f"{name}: {len(f())} tensors, {sum(numel(s) for s in f()):,} parameters"
                     for name, f in SETS.items())


if __name__ == "__main__":
    print(describe())
