"""``leanfm t2i pretrain|sample``: the small text-to-image diffusion model (emoji and shapes) and its samples."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leanfm.adapt.t2i import T2IPretrainConfig, train_t2i
from leanfm.cli.common import (
    Parser,
    add_config_flags,
    add_json_flag,
    add_run_flags,
    check_json_target,
    config_from_args,
    emit,
    nonnegative_int,
    out_path,
    positive_int,
)
from leanfm.data.t2i import image_grid, write_png
from leanfm.device import resolve_device
from leanfm.errors import LeanfmError
from leanfm.models.t2i import TokenCaptions, caption_encoder, load_t2i, load_tokens, read_info, sample
from leanfm.paths import check_writable_file

PRETRAIN_KEYS = ("steps", "loss", "parameters", "concepts", "autocast", "train_seconds")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("t2i", help="a small text-to-image diffusion model trained on emoji and shapes")
    tsub = p.add_subparsers(dest="t2i_command", parser_class=Parser, required=True)
    t = tsub.add_parser("pretrain", help="train the U-Net on captioned emoji and shapes (resumable)")
    add_run_flags(t, "t2i.json, unet/, scheduler/, history.json; checkpoints in OUT.training")
    add_config_flags(t, T2IPretrainConfig)
    add_json_flag(t, "the training summary")
    t.set_defaults(handler=cmd_pretrain)

    s = tsub.add_parser("sample", help="a PNG grid of samples: one row per caption")
    s.add_argument("model", help="folder written by 'leanfm t2i pretrain' or 'leanfm continual t2i'")
    s.add_argument("--caption", action="append", required=True, help="caption to draw (repeat for more rows)")
    s.add_argument("--n", type=positive_int, default=8, help="samples per caption [default 8]")
    s.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the initial noise [default 0]")
    s.add_argument("--steps", type=positive_int, default=50, help="DDIM steps [default 50]")
    s.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale [default 3.0]")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [default auto]")
    s.add_argument("--out", required=True, help="the PNG file to write")
    s.set_defaults(handler=cmd_sample)


def cmd_pretrain(args: argparse.Namespace) -> int:
    check_json_target(args)
    config = config_from_args(T2IPretrainConfig, args)
    summary = train_t2i(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    emit(args, {k: v for k, v in summary.items() if k != "history"}, PRETRAIN_KEYS)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    target = check_writable_file(args.out)
    if target.suffix.lower() != ".png":
        raise LeanfmError(f"--out '{args.out}' is not a .png file; accepted: a path ending in .png")
    if args.guidance < 0:
        raise LeanfmError(f"--guidance {args.guidance} is invalid; accepted: a number >= 0")
    read_info(Path(args.model))  # a one-line error before loading anything
    device = resolve_device(args.device)
    model, _ = load_t2i(Path(args.model))
    captions = [c for c in args.caption for _ in range(args.n)]
    tokens = load_tokens(Path(args.model))  # a customised model's concept tokens ('a picture of <c1>')
    encoder = TokenCaptions(caption_encoder(model.config.text_encoder, model.config.max_tokens), tokens)
    images = sample(model.to(device), captions, steps=args.steps, guidance=args.guidance, seed=args.seed,
                    encoder=encoder)
    write_png(image_grid(images, columns=args.n), target)
    print(f"{len(images)} samples ({len(args.caption)} captions x {args.n}) written to {target}")
    return 0
