"""The end-to-end benchmark's workloads: a model, one batch of synthetic data and its loss.

- ``bert-base``: ``transformers.BertForMaskedLM`` on ``BertConfig()``'s defaults (bert-base-uncased:
  12 layers, hidden 768, vocabulary 30,522; the decoder weight tied to the word embeddings), random token
  ids of length ``seq_len``, 15% of the positions masked as labels (the others -100, ignored by the loss).
- ``resnet50``: ResNet-50 v1.5 (stride on the 3×3 convolution, as torchvision's ``resnet50``) built here
  from its published layer sizes, since torchvision does not import beside this torch; 25,557,032
  parameters, the same count and shapes as torchvision's. Random images and 1,000-class labels.

Synthetic data: the benchmark times the arithmetic of a step, which does not depend on the values.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 v1.5 for 1,000 classes (He et al. 2016; torchvision's layer sizes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        blocks, cin = [], 64
        for i, (width, count) in enumerate(RESNET50_STAGES):
            for b in range(count):
                blocks.append(Bottleneck(cin, width, stride=2 if b == 0 and i > 0 else 1))
                cin = width * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


@dataclass
class Workload:
    """A model, one batch, and ``loss(model, batch)``; ``samples`` is the batch size."""
    name: str
    model: nn.Module
    batch: dict[str, Tensor]
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    samples: int


def _bert_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).loss


def _image_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch["images"]), batch["labels"])


def bert_base_mlm(batch_size: int, seq_len: int = 128, seed: int = 0) -> Workload:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig()
    model = BertForMaskedLM(config)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
    masked = torch.rand(batch_size, seq_len, generator=gen) < 0.15
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return Workload("bert-base", model, {"input_ids": ids, "labels": labels}, _bert_loss, batch_size)


def resnet50(batch_size: int, image_size: int = 224, seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, 1000, (batch_size,), generator=gen)
    return Workload("resnet50", ResNet50(), {"images": images, "labels": labels}, _image_loss, batch_size)


WORKLOADS: dict[str, Callable[..., Workload]] = {"bert-base": bert_base_mlm, "resnet50": resnet50}
DEFAULT_BATCH = {"bert-base": 8, "resnet50": 16}
