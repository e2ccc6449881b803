"""Load peer optimizers from their installed files (installed with --no-deps, see requirements/peers.txt).

Their package ``__init__`` pulls dependencies that cannot be installed beside this torch (torchvision,
pytorch_ranger), so the one module file is loaded under a private package alias whose ``__path__`` is
the library's folder: its relative imports of sibling modules still resolve. Nothing is copied.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def load_peer(package: str, subdir: str, module: str):
    """``load_peer("timm", "optim", "lamb")`` → the module object, or raises ImportError with the reason."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed (pip install --no-deps -r requirements/peers.txt)")
    folder = list(spec.submodule_search_locations)[0] + (f"/{subdir}" if subdir else "")
    alias = f"_largebatch_peer_{package}_{subdir or 'root'}"
    if alias not in sys.modules:
        pkg = types.ModuleType(alias)
        pkg.__path__ = [folder]
        sys.modules[alias] = pkg
    return importlib.import_module(f"{alias}.{module}")
