"""The ``leanfm`` command: thin argument parsing over the library; all logic lives in the library.

Bad input exits with code 2 and one line on stderr (``leanfm: error: ...``), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from leanfm.errors import LeanfmError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is available with ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"leanfm: error: {message}\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity, cloze accuracy and speed of a causal LM")
    p.add_argument("model", help="registered name (see 'leanfm models'), checkpoint folder or hub id")
    p.add_argument("--seqlen", type=_positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=_positive_int, default=40, help="non-overlapping windows scored (default 40)")
    p.add_argument("--corpus", default="austen", help="corpus name: austen (default) or pydocs")
    p.add_argument("--split", default="eval", help="corpus split: eval (default), calib, train, novel:<name>")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--cloze", type=_nonnegative_int, default=100, help="cloze items to score, 0 to skip (default 100)")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode throughput measurement")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH ('-' = stdout, JSON only)")


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="render results JSON files as markdown with PNG plots")
    p.add_argument("results", nargs="+", help="JSON files written by leanfm commands")
    p.add_argument("--out", default="report", help="output folder (default ./report)")


def _add_lm_eval(sub: Any) -> None:
    p = sub.add_parser("lm-eval", help="run the offline Austen cloze task through lm-evaluation-harness")
    p.add_argument("model", help="registered name, checkpoint folder or hub id")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N items")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--task-dir", default=None, help="where to write the task files (default $LEANFM_HOME/lm_eval)")
    p.add_argument("--json", metavar="PATH", help="write the metrics as JSON to PATH ('-' = stdout)")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; accepted: 0 < ratio < 1") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; accepted: 0 < ratio < 1")
    return value


def _add_compress(sub: Any) -> None:
    from leanfm.compress.base import ALLOCATIONS

    p = sub.add_parser("compress", help="structured compression (modegpt, disp, baselines wanda-sp, svd-llm)")
    p.add_argument("model", help="registered name, checkpoint folder or hub id")
    p.add_argument("--method", default="modegpt", help="modegpt (default), disp, wanda-sp or svd-llm")
    p.add_argument("--ratio", type=_ratio, required=True, help="fraction of block parameters to remove, 0 < R < 1")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--calib-samples", type=_positive_int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seqlen", type=_positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--allocation", default="global", choices=ALLOCATIONS, help="per-layer sparsity rule")
    p.add_argument("--epsilon", type=float, default=0.1, help="softmax temperature of the global allocation")
    p.add_argument("--dtype", default="float32", help="dtype of the saved checkpoint (compression runs in float32)")
    p.add_argument("--json", metavar="PATH", help="write the compression report as JSON ('-' = stdout)")
    d = p.add_argument_group("disp (hypernetwork training; run under torchrun for data parallelism)")
    d.add_argument("--steps", type=_positive_int, default=200, help="training steps (default 200)")
    d.add_argument("--lr", type=float, default=1e-2, help="hypernetwork learning rate (default 1e-2)")
    d.add_argument("--lambda", dest="lam", type=float, default=16.0, help="parameter regulariser weight (default 16)")
    d.add_argument("--sampler", default="reinmax", help="mask sampler: reinmax (default) or gumbel")
    d.add_argument("--tau", type=float, default=None, help="sampler temperature (default 1.0 reinmax, 0.4 gumbel)")
    d.add_argument("--batch-size", type=_positive_int, default=4, help="global batch of windows (default 4)")
    d.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per training window (default 256)")
    d.add_argument("--checkpoint-every", type=_positive_int, default=25, help="steps between checkpoints")
    d.add_argument("--checkpoint", metavar="DIR", help="training checkpoint folder (default: OUT.training)")
    d.add_argument("--resume", action="store_true", help="continue from the training checkpoint")
    d.add_argument("--no-autocast", action="store_true", help="train in float32 instead of bfloat16 autocast")


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; accepted: 0 <= threshold <= 1")
    return value


def _add_dynamo(sub: Any) -> None:
    p = sub.add_parser("dynamo", help="DynaMo multi-token heads: train, generate")
    dsub = p.add_subparsers(dest="dynamo_command", parser_class=_Parser, required=True)
    t = dsub.add_parser("train", help="add heads 2..n to a causal LM and train them (base frozen)")
    t.add_argument("model", help="registered name, checkpoint folder or hub id")
    t.add_argument("--heads", type=int, default=3, help="total heads incl. the base model's (default 3)")
    t.add_argument("--out", required=True, help="output folder (base model + heads + n-gram counts)")
    t.add_argument("--steps", type=_positive_int, default=300, help="training steps (default 300)")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate of the new heads (default 1e-3)")
    t.add_argument("--batch-size", type=_positive_int, default=4)
    t.add_argument("--seqlen", type=_positive_int, default=256)
    t.add_argument("--init", default="copy", help="new layers start as a copy of the last block (copy) or random")
    t.add_argument("--checkpoint-every", type=_positive_int, default=50)
    t.add_argument("--resume", action="store_true", help="continue from the training checkpoint (OUT.training)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out and its checkpoint")
    g = dsub.add_parser("generate", help="generate with 1..n tokens per step")
    g.add_argument("model", help="folder written by 'leanfm dynamo train'")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--threshold", type=_threshold, default=0.5, help="ε_b in [0, 1]; 1 = the base model's decoding")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' = stdout)")


def _add_align(sub: Any) -> None:
    p = sub.add_parser("align", help="CWCL: align a speech or image encoder to a frozen text encoder")
    asub = p.add_subparsers(dest="align_command", parser_class=_Parser, required=True)
    for kind in ("speech", "image"):
        t = asub.add_parser(kind, help=f"train a {kind} encoder into the frozen model's space, then test zero-shot")
        t.add_argument("--frozen", default="minilm-l6", help="frozen text encoder (default minilm-l6)")
        t.add_argument("--out", required=True, help="output folder (encoder.safetensors, align.json)")
        t.add_argument("--loss", default="cwcl", help="cwcl (default) or clip (the baseline)")
        t.add_argument("--other", default="cwcl", help="CWCL's frozen->trainable direction: cwcl or clip")
        t.add_argument("--weight-power", type=float, default=1.0,
                       help="raise CWCL's weights to this power (1 = the paper's; >1 sharpens, see BENCHMARKS.md)")
        t.add_argument("--steps", type=_positive_int, default=1500)
        t.add_argument("--batch-size", type=_positive_int, default=128)
        t.add_argument("--lr", type=float, default=1e-3)
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--checkpoint-every", type=_positive_int, default=250)
        if kind == "speech":
            t.add_argument("--phrases", type=_nonnegative_int, default=20000,
                           help="random 1-4 word Austen spans to synthesise (default 20000)")
            t.add_argument("--sentences", type=_nonnegative_int, default=0, help="whole Austen sentences to add")
            t.add_argument("--renditions", type=_positive_int, default=1, help="voices/speeds/pitches per text")
        else:
            t.add_argument("--per-combo", type=_positive_int, default=120, help="training images per combination")
        t.add_argument("--resume", action="store_true", help="continue from the training checkpoint (OUT.training)")
        t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out and its checkpoint")
        t.add_argument("--json", metavar="PATH", help="write the metrics as JSON ('-' = stdout)")
    e = asub.add_parser("eval", help="zero-shot metrics of an aligned encoder")
    e.add_argument("model", help="folder written by 'leanfm align speech|image'")
    e.add_argument("--json", metavar="PATH", help="write the metrics as JSON ('-' = stdout)")


def _r_value(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer or a comma-separated list of integers") from None
    return values[0] if len(values) == 1 else values


def _add_vision(sub: Any) -> None:
    p = sub.add_parser("vision", help="ViT training and token reduction (ToMe, ToFu)")
    vsub = p.add_subparsers(dest="vision_command", parser_class=_Parser, required=True)
    t = vsub.add_parser("train", help="train a small ViT on Fashion-MNIST (196 tokens per image)")
    t.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    t.add_argument("--out", required=True, help="output folder (model/, metrics.json; checkpoint in OUT.training)")
    t.add_argument("--epochs", type=_positive_int, default=5)
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up, then cosine)")
    t.add_argument("--init-from", default=None, help="continue from a trained ViT folder with a fresh schedule")
    t.add_argument("--resume", action="store_true", help="continue from the training checkpoint (OUT.training)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out and its checkpoint")
    b = vsub.add_parser("bench", help="test accuracy and images/s with a token-reduction method")
    b.add_argument("model", help="folder written by 'leanfm vision train'")
    b.add_argument("--method", default="none", help="none (default), tome or tofu")
    b.add_argument("--r", type=_r_value, default=0, help="tokens removed per layer: N or a list N1,N2,...")
    b.add_argument("--r-inflect", type=float, default=None,
                   help="schedule r linearly from r*(1-x) to r*(1+x) over layers (ToMe's inflect, -1..1)")
    b.add_argument("--prune-layers", default="half", help="ToFu: leading layers that prune ('half' or N)")
    b.add_argument("--merge", default="mlerp", help="ToFu merge in later layers: mlerp (default) or average")
    b.add_argument("--batch-size", type=_positive_int, default=64)
    b.add_argument("--limit", type=_positive_int, default=None, help="use only the first N test images")
    b.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' = stdout)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``leanfm`` argument parser."""
    parser = _Parser(prog="leanfm", description="Make foundation models small, fast and adaptable.")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars and info logs")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("models", help="list the model registry")
    sub.add_parser("setup", help="prepare caches: convert SmolLM2, extract corpora, check offline data")
    _add_eval(sub)
    _add_report(sub)
    _add_lm_eval(sub)
    _add_compress(sub)
    _add_vision(sub)
    _add_dynamo(sub)
    _add_align(sub)
    return parser


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _emit_json(data: dict[str, Any], target: str | None) -> None:
    from leanfm.paths import atomic_write_json

    if target == "-":
        print(json.dumps(data, indent=2))
    elif target:
        atomic_write_json(target, data)


def cmd_models(args: argparse.Namespace) -> int:
    from leanfm.models import list_models

    rows = [(s.name, f"{s.kind:16s} {s.source:6s}  {s.description}") for s in list_models()]
    _print_table(rows)
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from leanfm.setup import prepare_caches

    _print_table([(k, v) for k, v in prepare_caches().items()])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import leanfm
    from leanfm.data.corpus import corpus
    from leanfm.paths import check_writable_file

    if args.json and args.json != "-":
        check_writable_file(args.json)
    corpus(args.corpus, args.split)  # validates corpus and split before the (slower) model load
    model, tokenizer = leanfm.load_model(args.model, dtype=args.dtype)
    result = leanfm.evaluate(
        model, tokenizer, name=args.model, corpus_name=args.corpus, split=args.split, seqlen=args.seqlen,
        windows=args.windows, batch_size=args.batch_size, cloze=args.cloze, speed=not args.no_speed,
    )
    data = result.to_dict()
    if args.json != "-":
        keys = ("model", "params", "perplexity", "cloze_accuracy", "seqlen", "windows", "dtype",
                "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "seconds")
        _print_table([(k, _fmt(data[k])) for k in keys])
    _emit_json(data, args.json)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from leanfm.report.report import write_report

    path = write_report([Path(p) for p in args.results], Path(args.out))
    print(path.read_text(encoding="utf-8"))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from leanfm.eval.lm_eval_adapter import run_cloze
    from leanfm.paths import check_writable_file, leanfm_home

    if args.json and args.json != "-":
        check_writable_file(args.json)
    folder = Path(args.task_dir) if args.task_dir else leanfm_home() / "lm_eval"
    metrics = {"model": args.model, **run_cloze(args.model, folder, limit=args.limit, batch_size=args.batch_size)}
    if args.json != "-":
        _print_table([(k, _fmt(v)) for k, v in metrics.items()])
    _emit_json(metrics, args.json)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    import leanfm
    from leanfm.compress.api import compress_model, save_compressed
    from leanfm.config import get_method
    from leanfm.models import resolve_dtype
    from leanfm.paths import check_output_dir, check_writable_file

    get_method(args.method, "compress")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    dtype = resolve_dtype(args.dtype)
    if args.json and args.json != "-":
        check_writable_file(args.json)
    if args.method == "disp":
        return _compress_disp(args, out, dtype)
    model, tokenizer = leanfm.load_model(args.model)
    report = compress_model(
        model, tokenizer, method=args.method, ratio=args.ratio, allocation=args.allocation, epsilon=args.epsilon,
        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
    )
    save_compressed(model.to(dtype), tokenizer, out, report, overwrite=args.overwrite)
    _print_compression(args, out, report)
    return 0


def _compress_disp(args: argparse.Namespace, out: Path, dtype: Any) -> int:
    """``--method disp``: train (every rank), export and save (rank 0)."""
    import leanfm
    from leanfm.compress.api import save_compressed
    from leanfm.compress.disp import DispConfig, compress_disp
    from leanfm.training import init_distributed, prepare_run

    config = DispConfig(
        ratio=args.ratio, steps=args.steps, lr=args.lr, lam=args.lam, sampler=args.sampler, tau=args.tau,
        batch_size=args.batch_size,
        seqlen=args.seqlen, checkpoint_every=args.checkpoint_every, autocast=not args.no_autocast,
    )
    context = init_distributed(config.device)
    checkpoint = prepare_run(out, resume=args.resume, overwrite=args.overwrite, checkpoint=args.checkpoint,
                             context=context)
    model, tokenizer = leanfm.load_model(args.model)
    report = compress_disp(model, tokenizer, config, checkpoint, resume=args.resume, context=context)
    if context.is_main:
        save_compressed(model.to(dtype), tokenizer, out, report, overwrite=args.overwrite)
        _print_compression(args, out, report)
    context.barrier()
    return 0


def _print_compression(args: argparse.Namespace, out: Path, report: Any) -> None:
    data = {"model": args.model, "out": str(out), **report.to_dict()}
    if args.json != "-":
        keys = ("method", "ratio", "achieved_ratio", "params_before", "params_after", "seconds", "peak_rss_mb", "out")
        _print_table([(k, _fmt(data[k])) for k in keys])
    _emit_json(data, args.json)


def cmd_vision(args: argparse.Namespace) -> int:
    if args.vision_command == "train":
        from leanfm.vision.train import ViTTrainConfig, train_vit

        config = ViTTrainConfig(dataset=args.dataset, epochs=args.epochs, lr=args.lr, init_from=args.init_from)
        metrics = train_vit(config, Path(args.out), resume=args.resume, overwrite=args.overwrite)
        _print_table([(k, _fmt(metrics[k])) for k in ("accuracy", "images_per_s", "steps", "train_seconds")])
        return 0
    from leanfm.paths import check_writable_file
    from leanfm.vision.bench import bench

    if args.json and args.json != "-":
        check_writable_file(args.json)
    settings: dict[str, Any] = {}
    if args.method != "none":
        settings = {"r": args.r, "r_inflect": args.r_inflect}
    if args.method == "tofu":
        settings |= {"prune_layers": args.prune_layers, "merge": args.merge}
    result = bench(Path(args.model), args.method, limit=args.limit, batch_size=args.batch_size, **settings)
    if args.json != "-":
        _print_table([(k, _fmt(v)) for k, v in result.items()])
    _emit_json(result, args.json)
    return 0


def cmd_dynamo(args: argparse.Namespace) -> int:
    from leanfm.decode import dynamo

    if args.dynamo_command == "train":
        train_config = dynamo.DynamoTrainConfig(model=args.model, heads=args.heads, steps=args.steps, lr=args.lr,
                                                batch_size=args.batch_size, seqlen=args.seqlen, init=args.init,
                                                checkpoint_every=args.checkpoint_every)
        out = Path(args.out)
        summary = dynamo.train_and_save(train_config, out, resume=args.resume, overwrite=args.overwrite)
        final = summary["history"][-1]["losses"] if summary["history"] else []
        _print_table([("out", str(out)), ("steps", str(summary["steps"])), ("seconds", _fmt(summary["seconds"])),
                      ("final head losses", " ".join(f"{x:.3f}" for x in final))])
        return 0
    import torch

    from leanfm.paths import check_writable_file

    if args.json and args.json != "-":
        check_writable_file(args.json)
    config = dynamo.DecodeConfig(threshold=args.threshold, temperature=args.temperature)
    model, tokenizer, stats = dynamo.load(args.model)
    torch.manual_seed(args.seed)
    result = dynamo.generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, config=config,
                             stats=stats)
    data = {"texts": result.texts, "steps": result.steps, "tokens_per_step": result.tokens_per_step,
            "seconds": result.seconds, "level_counts": result.level_counts}
    if args.json != "-":
        for prompt, text in zip(args.prompt, result.texts, strict=True):
            print(f"{prompt}{text}\n")
        _print_table([("tokens per step", _fmt(result.tokens_per_step)), ("seconds", _fmt(result.seconds))])
    _emit_json(data, args.json)
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from leanfm.align import pipeline
    from leanfm.align.trainer import AlignConfig
    from leanfm.paths import check_writable_file
    from leanfm.training import init_distributed, prepare_run

    if args.json and args.json != "-":
        check_writable_file(args.json)
    if args.align_command == "eval":
        metrics = pipeline.evaluate_folder(args.model)
    else:
        config = AlignConfig(loss=args.loss, other=args.other, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
                             weight_power=args.weight_power)
        pipeline.text_encoder(args.frozen)  # fail on an unknown frozen model before any work
        if args.align_command == "speech" and args.phrases + args.sentences == 0:
            raise LeanfmError("--phrases 0 and --sentences 0 leave no training speech; accepted: at least one >= 1")
        out = Path(args.out)
        context = init_distributed(config.device)
        checkpoint = prepare_run(out, resume=args.resume, overwrite=args.overwrite, context=context)
        if args.align_command == "speech":
            meta = pipeline.align_speech(out, args.frozen, config, args.sentences, args.renditions, args.resume,
                                         checkpoint, context, phrases=args.phrases)
        else:
            meta = pipeline.align_image(out, args.frozen, config, args.per_combo, args.resume, checkpoint, context)
        metrics = meta["metrics"]
    if metrics and args.json != "-":
        _print_table([(k, _fmt(v)) for k, v in metrics.items()])
    if metrics:
        _emit_json(metrics, args.json)
    return 0


COMMANDS = {
    "models": cmd_models, "setup": cmd_setup, "eval": cmd_eval, "report": cmd_report, "lm-eval": cmd_lm_eval,
    "compress": cmd_compress,
    "vision": cmd_vision,
    "dynamo": cmd_dynamo,
    "align": cmd_align,
}


def _configure(args: argparse.Namespace) -> None:
    import torch

    from leanfm.progress import set_quiet

    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    set_quiet(args.quiet)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="leanfm: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leanfm`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from leanfm import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _configure(args)
        return COMMANDS[args.command](args)
    except LeanfmError as err:
        print(f"leanfm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        checkpoint = getattr(err, "checkpoint", None)  # leanfm.training.TrainingInterrupted saved one first
        saved = f"; training checkpoint saved in '{checkpoint}' (continue with --resume)" if checkpoint else ""
        print(f"leanfm: interrupted{saved}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
