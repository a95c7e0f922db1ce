"""The ``leanfm`` command: thin argument parsing over the library, one module per family.

Each family module adds its subcommands with ``add_parsers(sub)`` and binds a ``handler``; flags of method
settings come from the config dataclasses (:mod:`leanfm.cli.common`). Bad input exits with code 2 and one line
on stderr (``leanfm: error: ...``), never a traceback; an interrupted training run saves its checkpoint and
exits with 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch
from transformers.utils import logging as hf_logging

from leanfm.cli import adapt, align, audit, compress, czsl, decode, export, general, t2i, vision
from leanfm.cli.common import Parser, positive_int
from leanfm.errors import LeanfmError
from leanfm.progress import set_quiet
from leanfm.training import TrainingInterrupted
from leanfm.version import __version__

__all__ = ["build_parser", "main"]
FAMILIES = (general, compress, export, vision, decode, align, adapt, t2i, czsl, audit)


def build_parser() -> argparse.ArgumentParser:
    """The full ``leanfm`` argument parser."""
    parser = Parser(prog="leanfm", description="Make foundation models small, fast and adaptable.")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars and info logs")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for family in FAMILIES:
        family.add_parsers(sub)
    return parser


def _configure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    set_quiet(args.quiet)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="leanfm: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leanfm`` console script; returns the exit code."""
    parser = build_parser()
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
