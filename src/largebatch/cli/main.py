"""Entry point of the ``largebatch`` command.

Each subcommand lives in its own module ``largebatch.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``largebatch --help`` stays fast and a missing optional dependency only affects its own command: a command
whose extra is not installed (a torch-only install) says in one line which extra to install.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("largebatch.cli.train", "train a model (mlm / classify / image) with a large-batch recipe"),
    "study": ("largebatch.cli.study", "run a batch-scaling study suite and write its report"),
    "report": ("largebatch.cli.report", "rebuild a study report from its run files"),
    "plot": ("largebatch.cli.plot", "plot loss / accuracy / LR / trust-ratio curves of runs"),
    "bench": ("largebatch.cli.bench", "time one optimizer step against fused AdamW and peer libraries"),
    "presets": ("largebatch.cli.presets", "list the optimizer presets and what they reproduce"),
    "export": ("largebatch.cli.export", "save a run's model and tokenizer for transformers' from_pretrained"),
}
#: the modules of the ``train`` extra (pyproject.toml), by import name
TRAIN_EXTRA = ("pydantic", "yaml", "tqdm", "numpy", "matplotlib", "sklearn", "transformers", "tokenizers")
#: command -> (extra, the modules it needs)
REQUIRES: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", TRAIN_EXTRA), "study": ("train", TRAIN_EXTRA), "report": ("train", TRAIN_EXTRA),
    "plot": ("train", ("matplotlib",)), "export": ("train", TRAIN_EXTRA), "bench": ("train", ("numpy", "tqdm", "matplotlib")),
}


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 and a one-line reason on bad arguments."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        one_line = message.replace("\r", "\\r").replace("\n", "\\n")  # a value may hold a line break
        self.exit(2, f"{self.prog}: error: {one_line}\n")


def missing_module(command: str) -> str | None:
    """The first module of the command's extra that is not installed (found without importing it)."""
    _, modules = REQUIRES.get(command, ("", ()))
    return next((m for m in modules if importlib.util.find_spec(m) is None), None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="largebatch", description="Large-batch training with LAMB and LARS.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        missing = missing_module(name)
        if missing is None:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("largebatch"):
                    continue  # command not part of this build
                missing = exc.name
        p = sub.add_parser(name, help=help_text, description=help_text)
        if missing is not None:
            p.set_defaults(_missing=missing)
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def install_hint(command: str, module: str | None) -> str:
    extra = REQUIRES.get(command, ("train", ()))[0]
    return (f"largebatch {command}: error: missing module '{module}': this command needs the '{extra}' extra: "
            f"pip install 'largebatch[{extra}]'")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    missing = missing_module(argv[0]) if argv else None
    if missing is not None:  # before parsing: the command's own flags are not known without its extra
        print(install_hint(argv[0], missing), file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = getattr(args, "_missing", None)
    if missing is not None:
        print(install_hint(args.command, missing), file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in TRAIN_EXTRA:
            print(install_hint(args.command, exc.name), file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
