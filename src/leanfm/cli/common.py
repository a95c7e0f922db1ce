"""What every ``leanfm`` subcommand shares: one-line errors, flags built from config dataclasses, ``--json``,
output folders and the training checkpoint rule.

Flags come from the fields of a :class:`leanfm.config.MethodConfig` (their ``option()`` metadata gives the help
text, ``cli=False`` hides a field, ``flag=`` renames it), so a default is written once, in the config. Every
config-derived flag is parsed with ``default=SUPPRESS``: a flag the user did not pass is absent from the
namespace, the config's own default applies, and a flag that belongs to another method of the same command is
detected and refused instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from leanfm.config import MethodConfig
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_json, check_writable_file
from leanfm.report.report import format_cell


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is available with ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"leanfm: error: {message}\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``minimum`` with a one-line reason otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer; accepted: an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid; accepted: an integer >= {minimum}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


# ---------------------------------------------------------------- output


def print_table(rows: Sequence[tuple[str, Any]]) -> None:
    """Two aligned columns on stdout."""
    if not rows:
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {format_cell(value)}")


def add_json_flag(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", metavar="PATH", help=f"write {what} as JSON to PATH ('-' = stdout, JSON only)")


def check_json_target(args: argparse.Namespace) -> None:
    """Fail before any work when ``--json PATH`` cannot be written."""
    target = getattr(args, "json", None)
    if target and target != "-":
        check_writable_file(target)


def emit(args: argparse.Namespace, data: dict[str, Any], keys: Iterable[str] | None = None) -> None:
    """Print ``keys`` of ``data`` as a table (unless ``--json -``) and write ``--json`` (atomically)."""
    target = getattr(args, "json", None)
    if target != "-":
        print_table([(k, data.get(k)) for k in (keys if keys is not None else data)])
    if target == "-":
        print(json.dumps(data, indent=2))
    elif target:
        atomic_write_json(target, data)


# ---------------------------------------------------------------- flags from config dataclasses


def _scalar_type(annotation: Any) -> type:
    """int/float/str for a field's annotation (``X | None`` -> X); anything richer is parsed by the config."""
    if annotation in (int, float, str, bool):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and options[0] in (int, float, str, bool):
            return options[0]
    return str


def flag_name(field: dataclasses.Field) -> str:
    """``--calib-samples`` for ``calib_samples``; ``flag=`` renames (``lam`` -> ``--lambda``); ``--no-x`` for a
    boolean that is on by default (the flag turns it off)."""
    name = "--" + (field.metadata.get("flag") or field.name).replace("_", "-")
    return name.replace("--", "--no-", 1) if field.default is True else name


def cli_fields(config: type[MethodConfig]) -> list[dataclasses.Field]:
    """The fields of ``config`` shown on the command line."""
    return [f for f in dataclasses.fields(config) if f.metadata.get("cli", True)]


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return " [required]"
    if default is None:
        return ""
    if isinstance(default, bool):
        return " [on by default; this flag turns it off]" if default else " [off by default]"
    return f" [default {default}]"


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type[MethodConfig],
                     skip: Iterable[str] = (), known: dict[str, str] | None = None) -> set[str]:
    """Add a flag per CLI field of ``config``; returns the field names it covers.

    ``known`` (field name -> flag) is shared by the configs of one command (``compress --method``): a field
    name already there is not added twice, and the mapping is what :func:`refuse_foreign_flags` checks.

    Booleans become ``--x`` (default False) or ``--no-x`` (default True). Choices are listed in the help and
    checked by the config itself (one-line error), so methods sharing a flag may accept different values.
    """
    hints = typing.get_type_hints(config)
    seen = known if known is not None else {}
    names = set()
    for field in cli_fields(config):
        if field.name in skip:
            continue
        names.add(field.name)
        if field.name in seen:
            continue
        seen[field.name] = flag_name(field)
        kind = _scalar_type(hints[field.name])
        text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if choices:
            text += f" ({', '.join(map(str, choices))})"
        text = f"{text}{_default_text(field)}".strip().replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag_name(field), dest=field.name,
                                action="store_false" if field.default is True else "store_true",
                                default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag_name(field), dest=field.name, type=kind, default=argparse.SUPPRESS,
                                metavar=flag_name(field)[2:].upper().replace("-", "_"), help=text)
    return names


def refuse_foreign_flags(args: argparse.Namespace, config: type[MethodConfig] | None, offered: dict[str, str],
                         method: str) -> None:
    """One-line error when a flag the command offers for another method (``offered``: field -> flag) was passed."""
    own = cli_fields(config) if config is not None else []
    names = {f.name for f in own}
    for name, shown in sorted(offered.items()):
        if name not in names and hasattr(args, name):
            accepted = ", ".join(flag_name(f) for f in own) or "none"
            raise LeanfmError(f"{shown} does not apply to --method {method}; its flags: {accepted}")


def config_from_args(config: type[MethodConfig], args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``config`` from the flags the user passed (others keep the config's defaults) plus ``extra``."""
    values = {f.name: getattr(args, f.name) for f in cli_fields(config) if hasattr(args, f.name)}
    for field in dataclasses.fields(config):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.name not in values and field.name not in extra:
            raise LeanfmError(f"{flag_name(field)} is required")
    return config(**values, **extra)


# ---------------------------------------------------------------- output folders and training runs


def add_run_flags(parser: argparse.ArgumentParser, what: str, trains: bool = True) -> None:
    """``--out`` (required), ``--overwrite`` and, for trainers, ``--resume`` — the same words for every command."""
    parser.add_argument("--out", required=True, help=f"output folder ({what})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out" + (" and start its training over" if trains else ""))
    if trains:
        parser.add_argument("--resume", action="store_true",
                            help="continue the interrupted training checkpoint OUT.training")


def out_path(args: argparse.Namespace) -> Path:
    return Path(args.out).expanduser()
