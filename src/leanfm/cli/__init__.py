"""The ``leanfm`` command: thin argument parsing over the library, one module per family.

Each family module adds its subcommands with ``add_parsers(sub)`` and binds a ``handler``; flags of method
settings come from the config dataclasses (:mod:`leanfm.cli.common`). Bad input exits with code 2 and one line
on stderr (``leanfm: error: ...``), never a traceback; an interrupted training run saves its checkpoint and
exits with 130.

Imports are lazy: ``import leanfm.cli`` loads no family, and a command imports only the family module that
defines it (:data:`COMMANDS`), because the families together pull in diffusers, sentence-transformers, peft,
lm-eval... — ~190 MB of resident memory that ``leanfm compress`` (whose peak memory is a goal, issue 14) never
uses. The full parser (every family) is built for ``leanfm --help``, no command, or an unknown one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from leanfm.cli.common import Parser, positive_int
from leanfm.errors import LeanfmError
from leanfm.progress import set_quiet
from leanfm.training.checkpoint import TrainingInterrupted
from leanfm.version import __version__

__all__ = ["build_parser", "main"]
# the family modules, in the order `leanfm --help` lists their commands
FAMILIES = ("general", "compress", "export", "vision", "decode", "align", "adapt", "t2i", "czsl", "audit")
# command -> the family module that defines it (tests/test_cli.py checks this against the full parser)
COMMANDS = {
    "models": "general", "setup": "general", "eval": "general", "report": "general", "lm-eval": "general",
    "compress": "compress", "export": "export", "vision": "vision", "dynamo": "decode", "align": "align",
    "slu": "adapt", "speech": "adapt", "continual": "adapt", "t2i": "t2i", "czsl": "czsl", "serve": "audit",
    "audit": "audit",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``leanfm`` argument parser: with ``command`` (a key of :data:`COMMANDS`) only that command's family is
    imported and added; otherwise every family (the full parser)."""
    parser = Parser(prog="leanfm", description="Make foundation models small, fast and adaptable.")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars and info logs")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for family in [COMMANDS[command]] if command in COMMANDS else FAMILIES:
        importlib.import_module(f"leanfm.cli.{family}").add_parsers(sub)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is neither a global flag nor its value), else None."""
    words = iter(argv)
    for word in words:
        if word == "--threads":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _configure(args: argparse.Namespace) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    set_quiet(args.quiet)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="leanfm: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leanfm`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _configure(args)
        return int(args.handler(args))
    except LeanfmError as err:
        print(f"leanfm: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"leanfm: interrupted; training checkpoint saved in '{stop.checkpoint}' (continue with --resume)",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("leanfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
