"""Commands that are not one method's: ``models``, ``setup``, ``eval``, ``report``, ``lm-eval``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leanfm.cli.common import add_config_flags, add_json_flag, check_json_target, config_from_args, emit, positive_int
from leanfm.data.corpus import corpus
from leanfm.device import resolve_device
from leanfm.eval.harness import EvalConfig, evaluate
from leanfm.eval.llamacpp import evaluate_gguf
from leanfm.eval.lm_eval_adapter import run_cloze
from leanfm.models import list_models, load_model
from leanfm.models.registry import smollm2_tokenizer
from leanfm.paths import leanfm_home
from leanfm.report.report import write_report
from leanfm.setup import prepare_caches

EVAL_KEYS = ("model", "params", "perplexity", "cloze_accuracy", "seqlen", "windows", "dtype", "device",
             "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "seconds")


def add_parsers(sub: Any) -> None:
    sub.add_parser("models", help="list the model registry").set_defaults(handler=cmd_models)
    sub.add_parser("setup", help="prepare caches: convert SmolLM2, extract corpora, check offline data"
                   ).set_defaults(handler=cmd_setup)

    p = sub.add_parser("eval", help="perplexity, cloze accuracy and speed of a causal LM")
    p.add_argument("model", help="registered name (see 'leanfm models'), checkpoint folder, hub id or FILE.gguf")
    add_config_flags(p, EvalConfig)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 [default float32]")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [default auto]")
    add_json_flag(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("report", help="render results JSON files as markdown with PNG plots")
    p.add_argument("results", nargs="+", help="JSON files written by leanfm commands")
    p.add_argument("--out", default="report", help="output folder [default ./report]")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("lm-eval", help="run the offline Austen cloze task through lm-evaluation-harness")
    p.add_argument("model", help="registered name, checkpoint folder or hub id")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N items")
    p.add_argument("--batch-size", type=positive_int, default=8, help="[default 8]")
    p.add_argument("--task-dir", default=None, help="where to write the task files [default $LEANFM_HOME/lm_eval]")
    add_json_flag(p, "the metrics")
    p.set_defaults(handler=cmd_lm_eval)


def cmd_models(args: argparse.Namespace) -> int:
    emit(args, {s.name: f"{s.kind:16s} {s.source:6s}  {s.description}" for s in list_models()})
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    emit(args, prepare_caches())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    config = config_from_args(EvalConfig, args)
    device = resolve_device(args.device)
    check_json_target(args)
    corpus(config.corpus, config.split)  # validates corpus and split before the (slower) model load
    if args.model.endswith(".gguf"):  # through llama.cpp (issue 22): the same windows and JSON schema
        result = evaluate_gguf(args.model, smollm2_tokenizer(), config)
        emit(args, {**result.to_dict(), "device": "cpu (llama.cpp)"}, EVAL_KEYS)
        return 0
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    result = evaluate(model.to(device), tokenizer, config, name=args.model)
    emit(args, {**result.to_dict(), "device": str(device)}, EVAL_KEYS)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report([Path(p) for p in args.results], Path(args.out))
    print(path.read_text(encoding="utf-8"))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    check_json_target(args)
    folder = Path(args.task_dir) if args.task_dir else leanfm_home() / "lm_eval"
    emit(args, {"model": args.model, **run_cloze(args.model, folder, limit=args.limit, batch_size=args.batch_size)})
    return 0
