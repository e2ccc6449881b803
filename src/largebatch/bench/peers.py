"""Peer optimizers, imported from their installed files (they are installed with --no-deps).

Their package ``__init__`` pulls dependencies that cannot be installed beside this torch (torchvision,
pytorch_ranger), so one module file is loaded under a private package alias whose ``__path__`` is the
library's folder: its relative imports still resolve, nothing is copied.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

INSTALL = "pip install --no-deps -r requirements/peers.txt"


def load_peer(package: str, subdir: str, module: str):
    """``load_peer("timm", "optim", "lamb")`` → the module, or ImportError saying why."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed ({INSTALL})")
    folder = next(iter(spec.submodule_search_locations)) + (f"/{subdir}" if subdir else "")
    alias = f"_largebatch_peer_{package}_{subdir or 'root'}"
    if alias not in sys.modules:
        pkg = types.ModuleType(alias)
        pkg.__path__ = [folder]
        sys.modules[alias] = pkg
    return importlib.import_module(f"{alias}.{module}")


def optimizer_factories(wd: float = 0.01, lr: float = 1e-3):
    """name -> (factory(params) or None, reason if unavailable). The first one is the yardstick."""
    import torch

    import largebatch

    out: dict[str, tuple] = {
        "torch AdamW (fused)": (lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, fused=True), None),
        "largebatch Lamb": (lambda ps: largebatch.Lamb(ps, lr=lr, weight_decay=wd), None),
        "largebatch Lamb (foreach)": (lambda ps: largebatch.Lamb(ps, lr=lr, weight_decay=wd, foreach=True, fused=False), None),
        "largebatch Lars": (lambda ps: largebatch.Lars(ps, lr=lr, weight_decay=wd, momentum=0.9), None),
        # the non-finite check's cost: the same steps unchecked (docs/algorithms.md, "Non-finite gradients")
        "largebatch Lamb (propagate)": (lambda ps: largebatch.Lamb(ps, lr=lr, weight_decay=wd, nonfinite="propagate"),
                                        None),
        "largebatch Lars (propagate)": (lambda ps: largebatch.Lars(ps, lr=lr, weight_decay=wd, momentum=0.9,
                                                                   nonfinite="propagate"), None),
        # the accelerator's sync-free skip (masked writes) run on the CPU, beside the foreach row
        "largebatch Lamb (sync-free)": (lambda ps: largebatch.Lamb(ps, lr=lr, weight_decay=wd, foreach=True,
                                                                            fused=False, sync_free=True), None),
    }

    def add(name, package, subdir, module, attr, **kw):
        try:
            cls = getattr(load_peer(package, subdir, module), attr)
            out[name] = (lambda ps: cls(ps, lr=lr, weight_decay=wd, **kw), None)
        except Exception as exc:  # noqa: BLE001 - any import failure is reported, never faked
            out[name] = (None, f"not importable: {type(exc).__name__}: {exc}")

    add("torch-optimizer Lamb", "torch_optimizer", "", "lamb", "Lamb")
    add("pytorch_optimizer Lamb", "pytorch_optimizer", "optimizer", "lamb", "Lamb")
    add("pytorch_optimizer LARS", "pytorch_optimizer", "optimizer", "lars", "LARS", momentum=0.9)
    add("timm Lamb", "timm", "optim", "lamb", "Lamb")
    add("timm Lars", "timm", "optim", "lars", "Lars", momentum=0.9)
    return out
