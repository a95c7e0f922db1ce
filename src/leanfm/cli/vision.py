"""``leanfm vision train|bench``: a small ViT on Fashion-MNIST, and token reduction (ToMe, ToFu) on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leanfm.cli.common import (
    Parser,
    add_config_flags,
    add_json_flag,
    add_run_flags,
    check_json_target,
    config_from_args,
    emit,
    out_path,
    positive_int,
    refuse_foreign_flags,
)
from leanfm.config import get_method, list_methods
from leanfm.errors import LeanfmError
from leanfm.vision.bench import bench, bench_methods
from leanfm.vision.train import ViTTrainConfig, train_vit

TRAIN_KEYS = ("accuracy", "images_per_s", "steps", "train_seconds")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("vision", help="ViT training and token reduction (ToMe, ToFu)")
    vsub = p.add_subparsers(dest="vision_command", parser_class=Parser, required=True)
    t = vsub.add_parser("train", help="train a small ViT on Fashion-MNIST (196 tokens per image)")
    add_run_flags(t, "model/, metrics.json; checkpoints in OUT.training")
    add_config_flags(t, ViTTrainConfig)
    t.set_defaults(handler=cmd_train)

    b = vsub.add_parser("bench", help="test accuracy and images/s with a token-reduction method")
    b.add_argument("model", help="folder written by 'leanfm vision train'")
    b.add_argument("--method", default="none", help=f"{', '.join(bench_methods())} [default none]")
    offered: dict[str, str] = {}
    for spec in list_methods("patch"):
        assert spec.config is not None  # every token-reduction method has a config class
        add_config_flags(b.add_argument_group(f"{spec.name}: {spec.description}"), spec.config, known=offered)
    b.set_defaults(patch_flags=offered)
    b.add_argument("--batch-size", type=positive_int, default=64, help="[default 64]")
    b.add_argument("--limit", type=positive_int, default=None, help="use only the first N test images")
    add_json_flag(b)
    b.set_defaults(handler=cmd_bench)


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(ViTTrainConfig, args)
    metrics = train_vit(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    emit(args, metrics, TRAIN_KEYS)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    check_json_target(args)
    if args.method not in bench_methods():
        raise LeanfmError(f"unknown method '{args.method}'; accepted: {', '.join(bench_methods())}")
    spec = get_method(args.method, "patch") if args.method != "none" else None
    config_class = spec.config if spec is not None else None
    refuse_foreign_flags(args, config_class, args.patch_flags, args.method)
    config = config_from_args(config_class, args) if config_class is not None else None
    emit(args, bench(Path(args.model), args.method, config, limit=args.limit, batch_size=args.batch_size))
    return 0
