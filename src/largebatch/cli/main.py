"""Entry point of the ``largebatch`` command.

Each subcommand lives in its own module ``largebatch.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``largebatch --help`` stays fast and a missing optional dependency only affects its own command.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("largebatch.cli.train", "train a model (mlm / classify / image) with a large-batch recipe"),
    "study": ("largebatch.cli.study", "run a batch-scaling study suite and write its report"),
    "report": ("largebatch.cli.report", "rebuild a study report from its run files"),
    "plot": ("largebatch.cli.plot", "plot loss / accuracy / LR / trust-ratio curves of runs"),
    "bench": ("largebatch.cli.bench", "time one optimizer step against fused AdamW and peer libraries"),
    "presets": ("largebatch.cli.presets", "list the optimizer presets and what they reproduce"),
}


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 and a one-line reason on bad arguments."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="largebatch", description="Large-batch training with LAMB and LARS.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("largebatch"):
                continue  # command not part of this build
            p = sub.add_parser(name, help=help_text, description=help_text)
            p.set_defaults(_missing=exc)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = getattr(args, "_missing", None)
    if missing is not None:
        print(
            f"largebatch {args.command}: missing dependency '{missing.name}'. "
            "Install the extras with: pip install -c constraints.txt 'largebatch[train]'",
            file=sys.stderr,
        )
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
