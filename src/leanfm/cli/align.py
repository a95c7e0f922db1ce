"""``leanfm align speech|image|eval``: CWCL (or the CLIP baseline) into a frozen text encoder's space."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from leanfm.align.pipeline import (
    SYNTHESISERS,
    ImageAlignConfig,
    SpeechAlignConfig,
    align_image,
    align_speech,
    evaluate_folder,
)
from leanfm.cli.common import (
    Parser,
    add_config_flags,
    add_json_flag,
    add_run_flags,
    check_json_target,
    config_from_args,
    emit,
    out_path,
)
from leanfm.config import MethodConfig

KINDS: dict[str, tuple[type[MethodConfig], Callable[..., dict[str, Any]]]] = {
    "speech": (SpeechAlignConfig, align_speech), "image": (ImageAlignConfig, align_image)}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("align", help="CWCL: align a speech or image encoder to a frozen text encoder")
    asub = p.add_subparsers(dest="align_command", parser_class=Parser, required=True)
    for kind, (config, _) in KINDS.items():
        t = asub.add_parser(kind, help=f"train a {kind} encoder into the frozen model's space, then test zero-shot")
        add_run_flags(t, "encoder.safetensors, align.json; checkpoints in OUT.training")
        add_config_flags(t, config)
        add_json_flag(t, "the zero-shot metrics")
        t.set_defaults(handler=cmd_align, kind=kind)
    e = asub.add_parser("eval", help="zero-shot metrics of an aligned encoder")
    e.add_argument("model", help="folder written by 'leanfm align speech|image'")
    e.add_argument("--synthesiser", choices=list(SYNTHESISERS), default="espeak-ng",
                   help="who speaks a speech encoder's tests: espeak-ng (unseen voices) or flite (an unseen engine)")
    add_json_flag(e, "the metrics")
    e.set_defaults(handler=cmd_eval)


def cmd_align(args: argparse.Namespace) -> int:
    config_class, run = KINDS[args.kind]
    config = config_from_args(config_class, args)
    check_json_target(args)
    meta = run(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    if meta["metrics"]:  # only the main rank evaluates
        emit(args, meta["metrics"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    check_json_target(args)
    emit(args, evaluate_folder(args.model, args.synthesiser))
    return 0
