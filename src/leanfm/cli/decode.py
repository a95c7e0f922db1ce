"""``leanfm dynamo train|generate``: DynaMo's multi-token heads."""

from __future__ import annotations

import argparse
from typing import Any

import torch

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
)
from leanfm.decode.dynamo import DecodeConfig, generate, load
from leanfm.decode.training import DynamoTrainConfig, train_and_save
from leanfm.device import decode_dtype, resolve_device


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("dynamo", help="DynaMo multi-token heads: train, generate")
    dsub = p.add_subparsers(dest="dynamo_command", parser_class=Parser, required=True)
    t = dsub.add_parser("train", help="add heads 2..n to a causal LM and train them (base frozen)")
    t.add_argument("model", help="registered name, checkpoint folder or hub id")
    add_run_flags(t, "base model + heads + n-gram counts; checkpoints in OUT.training")
    add_config_flags(t, DynamoTrainConfig, skip=("model",))
    t.set_defaults(handler=cmd_train)

    g = dsub.add_parser("generate", help="generate with 1..n tokens per step")
    g.add_argument("model", help="folder written by 'leanfm dynamo train'")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    add_config_flags(g, DecodeConfig)
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="[default 64]")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling RNG [default 0]")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights' dtype; auto = bfloat16 where this CPU/GPU runs it natively [default auto]")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N [default auto]")
    add_json_flag(g)
    g.set_defaults(handler=cmd_generate)


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(DynamoTrainConfig, args, model=args.model)
    summary = train_and_save(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    final = summary["history"][-1]["losses"] if summary["history"] else []
    emit(args, {"out": args.out, "steps": summary["steps"], "seconds": summary["seconds"],
                "final head losses": " ".join(f"{x:.3f}" for x in final)})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = config_from_args(DecodeConfig, args)
    check_json_target(args)
    device = resolve_device(args.device)
    model, tokenizer, stats = load(args.model, dtype=decode_dtype(args.dtype, device))
    model.to(device)
    torch.manual_seed(args.seed)
    result = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, config=config, stats=stats)
    if args.json != "-":
        for prompt, text in zip(args.prompt, result.texts, strict=True):
            print(f"{prompt}{text}\n")
    data = {"texts": result.texts, "steps": result.steps, "tokens_per_step": result.tokens_per_step,
            "seconds": result.seconds, "level_counts": result.level_counts, "acceptance": result.acceptance,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    emit(args, data, ("tokens_per_step", "seconds"))
    return 0
