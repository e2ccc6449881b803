"""``largebatch presets``: the optimizer registry — every optimizer and preset, and what it reproduces."""
from __future__ import annotations

import argparse
import json

from largebatch.optim.registry import OPTIMIZERS, as_json, describe_optimizers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({name: as_json(info) for name, info in OPTIMIZERS.items()}, indent=2))
    else:
        print(describe_optimizers())
    return 0
