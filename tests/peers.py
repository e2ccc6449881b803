"""Peer loaders for the tests: the same ones the benchmark uses (largebatch.bench.peers.load_peer loads one
module file of a --no-deps install under a private package alias, so torchvision & co. are never needed).

``peer_class("timm", "optim", "lamb", "Lamb")`` returns the class or skips the calling test with the reason.
"""
from __future__ import annotations

import pytest

from largebatch.bench.peers import INSTALL, load_peer

__all__ = ["load_peer", "peer_class", "PEERS"]

#: name -> (package, subfolder, module, class)
PEERS = {
    "torch_optimizer.Lamb": ("torch_optimizer", "", "lamb", "Lamb"),
    "timm.Lamb": ("timm", "optim", "lamb", "Lamb"),
    "timm.Lars": ("timm", "optim", "lars", "Lars"),
    "pytorch_optimizer.Lamb": ("pytorch_optimizer", "optimizer", "lamb", "Lamb"),
    "pytorch_optimizer.LARS": ("pytorch_optimizer", "optimizer", "lars", "LARS"),
}


def peer_class(package: str, subdir: str, module: str, attr: str):
    try:
        return getattr(load_peer(package, subdir, module), attr)
    except Exception as exc:  # noqa: BLE001 - the reason is reported in the skip message
        pytest.skip(f"{package}.{module}.{attr} not importable ({type(exc).__name__}: {exc}); {INSTALL}")
