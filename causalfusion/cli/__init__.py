"""Command line: parses arguments and calls the library. No modelling logic lives here.

One module per group of commands; each has `add_parser(sub)` and its `cmd_*` functions.
"""
from __future__ import annotations

import argparse
import sys

from safetensors import SafetensorError

from ..checkpoint import CheckpointError
from . import app, convert, edit, evaluate, info, multimodal, sample, train
from .common import DefaultsHelpFormatter
from .train import add_train_args

# OSError: an output that cannot be written (a directory, a full disk, no permission), a damaged file
# SafetensorError: a cache file that cannot be written (full disk, read-only cache directory)
USER_ERRORS = (ValueError, CheckpointError, OSError, FloatingPointError, KeyError, SafetensorError)


class OneLineErrors(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other refused input; the usage
    block is one ``--help`` away. Subcommand parsers inherit the class: exact flag names only (no
    abbreviations, which would make a new flag change what an old abbreviation means) and every
    option's default in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(prog="causalfusion", description="Causal Diffusion Transformers (CausalFusion)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (train, sample, info, evaluate, edit, convert):
        module.add_parser(sub)
    multimodal.add_commands(sub)  # train-mm, t2i, caption, eval-mm
    app.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to tell explicit flags from defaults (--config)
    try:
        args.func(args)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"causalfusion {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["add_train_args", "build_parser", "main"]
