"""An image-folder dataset read with Pillow: ``ROOT/<class>/<image>``, labels = sorted class folder names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MODES = {1: "L", 3: "RGB"}


class ImageFolder:
    """The images below ``root``, one sub-folder per class, decoded to ``channels`` and resized to
    ``size`` x ``size`` (bilinear). ``classes``: the label names to use (eval data takes the training ones)."""

    def __init__(self, root: str, size: int, channels: int = 3, *, classes: list[str] | None = None,
                 option: str = "data"):
        from PIL import Image

        if channels not in MODES:
            raise ValueError(f"Invalid channels: {channels!r} (allowed: 1 (grey) | 3 (RGB))")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"Invalid image_size: {size!r} (allowed: an integer >= 8)")
        self.root, self.size, self.mode, self.option = Path(root).expanduser(), size, MODES[channels], option
        if not self.root.is_dir():
            raise ValueError(f"Invalid {option}: {root!r} is not a folder (allowed: a folder with one sub-folder "
                             "of images per class)")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        suffixes = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
        self.classes = classes if classes is not None else found
        extra = sorted(set(found) - set(self.classes))
        if len(found) < (1 if classes is not None else 2) or extra:
            raise ValueError(f"Invalid {option}: {root!r} has class folders {found} (allowed: "
                             + (f"a subset of the training classes {self.classes})" if classes is not None
                                else "at least 2 sub-folders of images, one per class)"))
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes) if folder.is_dir() else []
            if not files and classes is None:
                raise ValueError(f"Invalid {option}: class folder {str(folder)!r} holds no images (allowed "
                                 f"suffixes: {' '.join(sorted(suffixes)[:12])} ...)")
            self.samples.extend((f, label) for f in files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """(uint8 image C x size x size, label)."""
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"Invalid {self.option}: cannot read image {str(path)!r} ({exc})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy()), label

    def load(self, indices=None) -> tuple[Tensor, Tensor]:
        """The images (float in [0, 1], N x C x size x size) and labels, decoded once into memory."""
        indices = range(len(self)) if indices is None else indices
        images = torch.empty((len(indices), len(self.mode), self.size, self.size), dtype=torch.uint8)
        labels = torch.empty(len(indices), dtype=torch.long)
        for row, i in enumerate(indices):
            images[row], labels[row] = self[i]
        return images.float().div_(255), labels

    def load_split(self, fraction: float, seed: int = 12345) -> dict[str, tuple[Tensor, Tensor]]:
        """A seeded split per class: ``fraction`` of each class's images (at least one) to validation and
        the same to test, the rest to training."""
        gen = torch.Generator().manual_seed(seed)
        labels = torch.tensor([label for _, label in self.samples])
        parts: dict[str, list[Tensor]] = {"train": [], "validation": [], "test": []}
        for label in range(len(self.classes)):
            members = torch.nonzero(labels == label).flatten()
            members = members[torch.randperm(len(members), generator=gen)]
            k = max(1, round(fraction * len(members)))
            if len(members) < 3:
                raise ValueError(f"Invalid {self.option}: class {self.classes[label]!r} has {len(members)} image(s) "
                                 "(allowed: at least 3 for a held-out split, or give eval_data)")
            parts["validation"].append(members[:k])
            parts["test"].append(members[k:2 * k])
            parts["train"].append(members[2 * k:])
        return {split: self.load(torch.cat(idx).sort().values.tolist()) for split, idx in parts.items()}
