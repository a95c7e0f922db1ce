"""``leanfm compress MODEL --method M``: every registered compressor behind one command.

Each method's flags come from its config; the parser offers the union (under one group per method) and a flag
of another method is refused with a one-line error instead of being ignored. A method whose config has a
``steps`` field trains (DISP-LLM): it checkpoints to ``OUT.training`` and takes ``--resume``.
"""

from __future__ import annotations

import argparse
from typing import Any

from leanfm.cli.common import (
    add_config_flags,
    add_json_flag,
    add_run_flags,
    check_json_target,
    config_from_args,
    emit,
    out_path,
    refuse_foreign_flags,
)
from leanfm.compress.api import compress_checkpoint, save_compressed
from leanfm.compress.engine import release_memory_eagerly
from leanfm.config import MethodSpec, get_method, list_methods
from leanfm.errors import LeanfmError
from leanfm.models import load_model, resolve_dtype
from leanfm.paths import check_output_dir
from leanfm.training import init_distributed, prepare_run

REPORT_KEYS = ("method", "ratio", "achieved_ratio", "whole_model_ratio", "params_before", "params_after", "seconds",
               "peak_rss_mb", "out")


def trains(spec: MethodSpec) -> bool:
    """Whether a compressor learns its structure by training (and so checkpoints and resumes)."""
    return spec.config is not None and "steps" in spec.config.__dataclass_fields__


def add_parsers(sub: Any) -> None:
    methods = list_methods("compress")
    p = sub.add_parser("compress", help=f"structured compression ({', '.join(s.name for s in methods)})")
    p.add_argument("model", help="registered name, checkpoint folder or hub id")
    p.add_argument("--method", default="modegpt", help=f"{', '.join(s.name for s in methods)} [default modegpt]")
    add_run_flags(p, "a transformers checkpoint; trained methods checkpoint to OUT.training")
    p.add_argument("--dtype", default="float32", help="dtype of the saved checkpoint [default float32]")
    add_json_flag(p, "the compression report")
    offered: dict[str, str] = {}
    for spec in methods:
        assert spec.config is not None
        add_config_flags(p.add_argument_group(f"--method {spec.name}: {spec.description}"), spec.config,
                         known=offered)
    p.set_defaults(handler=cmd_compress, method_flags=offered)


def cmd_compress(args: argparse.Namespace) -> int:
    spec = get_method(args.method, "compress")
    assert spec.config is not None
    refuse_foreign_flags(args, spec.config, args.method_flags, args.method)
    if args.resume and not trains(spec):
        raise LeanfmError(f"--resume does not apply to --method {args.method} (it does not train)")
    config = config_from_args(spec.config, args)
    out = out_path(args)
    check_output_dir(out, args.overwrite)
    dtype = resolve_dtype(args.dtype)
    check_json_target(args)
    if trains(spec):
        context = init_distributed(config.device)
        checkpoint = prepare_run(out, resume=args.resume, overwrite=args.overwrite, context=context)
        model, tokenizer = load_model(args.model)
        report = spec.entry(model, tokenizer, config, checkpoint, resume=args.resume, context=context)
        report.settings = config.to_dict()  # compression.json says how the folder was made
        if context.is_main:
            _save(args, model.to(dtype), tokenizer, report)
        context.barrier()
        return 0
    release_memory_eagerly()  # this process's peak memory is a goal (issue 14); see there
    model, tokenizer, report = compress_checkpoint(args.model, args.method, **config.to_dict())  # streams if it can
    _save(args, model.to(dtype), tokenizer, report)
    return 0


def _save(args: argparse.Namespace, model: Any, tokenizer: Any, report: Any) -> None:
    out = save_compressed(model, tokenizer, out_path(args), report, overwrite=args.overwrite)
    emit(args, {"model": args.model, "out": str(out), **report.to_dict()}, REPORT_KEYS)
