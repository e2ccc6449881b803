"""Peer loaders for the tests: the same ones the benchmark uses."""
from largebatch.bench.peers import load_peer

__all__ = ["load_peer"]
