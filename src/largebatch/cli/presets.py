"""``largebatch presets``: the preset table — which flags reproduce which library."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    from largebatch.optim.presets import PRESETS, describe_presets

    if args.json:
        table = {
            name: {"optimizer": p.optimizer, "options": dict(p.options), "reproduces": p.reproduces,
                   "notes": p.notes, "checked_against": p.checked_against,
                   "groups": {k: getattr(v, "__name__", v) for k, v in p.groups.items()}}
            for name, p in PRESETS.items()
        }
        print(json.dumps(table, indent=2))
    else:
        print(describe_presets())
    return 0
