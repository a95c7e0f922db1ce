"""``leanfm czsl build|pretrain|train|eval``: compositional zero-shot learning with MMPT and its peers.

``DATA`` is a folder in the standard CZSL layout (MIT-States, UT-Zappos, C-GQA as released by ExplainableML/czsl,
or one built here: ``leanfm czsl build emoji|shapes``). ``--base`` is the frozen image-text model: a folder from
``leanfm czsl pretrain`` (MiniLM + an image tower aligned on a pool that holds no CZSL test image) or a
transformers CLIP folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leanfm.adapt.mmpt import CZSLConfig, evaluate_run, train_czsl
from leanfm.align.pipeline import PoolAlignConfig, align_pool
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
from leanfm.data import czsl as czsl_data
from leanfm.data import czsl_build
from leanfm.models.clip import convert_openclip
from leanfm.paths import check_output_dir

BUILDERS = ("emoji", "shapes")
WORLDS = ("closed", "open", "open_feasible")
SHOWN = ("auc", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("czsl", help="compositional zero-shot learning: datasets, base model, MMPT/CSP/CoOp prompts")
    csub = p.add_subparsers(dest="czsl_command", parser_class=Parser, required=True)
    b = csub.add_parser("build", help="write an offline dataset in the standard CZSL layout (deterministic)")
    b.add_argument("kind", choices=BUILDERS, help="emoji (Noto + Twemoji drawings) or shapes (rendered shapes)")
    b.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the pair split and renders [default 0]")
    add_run_flags(b, "the dataset folder", trains=False)
    b.set_defaults(handler=cmd_build)
    r = csub.add_parser("pretrain", help="align a fresh image tower to MiniLM on a captioned pool (the base model)")
    r.add_argument("--pool", default="emoji,shapes",
                   help=f"comma-separated sources among {', '.join(czsl_build.POOL_SOURCES)} [default emoji,shapes]")
    r.add_argument("--exclude", action="append", default=[], metavar="DATA",
                   help="CZSL folder whose val/test-only pairs the pool must not contain (repeatable; required "
                        "for the emoji and shapes sources)")
    r.add_argument("--cifar", default=None, help="CIFAR-10 folder or cifar10-jpeg.tar (source cifar10)")
    r.add_argument("--per-item", type=positive_int, default=8, help="renders per pooled emoji [default 8]")
    r.add_argument("--per-pair", type=positive_int, default=40, help="renders per seen shapes pair [default 40]")
    r.add_argument("--per-class", type=positive_int, default=500, help="CIFAR-10 images per class [default 500]")
    add_run_flags(r, "encoder.safetensors, align.json; checkpoints in OUT.training")
    add_config_flags(r, PoolAlignConfig)
    add_json_flag(r, "the pool and training summary")
    r.set_defaults(handler=cmd_pretrain)
    t = csub.add_parser("train", help="learn a method's prompts on the seen pairs, evaluate closed and open world")
    t.add_argument("data", help="CZSL dataset folder")
    t.add_argument("--base", required=True, help="frozen base model folder")
    add_run_flags(t, "prompts.safetensors, czsl.json; checkpoints in OUT.training")
    add_config_flags(t, CZSLConfig)
    add_json_flag(t, "the val and test metrics")
    t.set_defaults(handler=cmd_train)
    e = csub.add_parser("eval", help="closed-world (and --open-world) AUC, best HM, seen, unseen of a run")
    e.add_argument("run", help="folder written by 'leanfm czsl train'")
    e.add_argument("--data", default=None, help="CZSL folder [default: the run's]")
    e.add_argument("--base", default=None, help="base model folder [default: the run's]")
    e.add_argument("--split", choices=("val", "test"), default="test", help="which split [default test]")
    e.add_argument("--open-world", action="store_true", help="also all attribute x object pairs, with and "
                   "without the feasibility mask (threshold from val)")
    add_json_flag(e, "the metrics")
    e.set_defaults(handler=cmd_eval)
    c = csub.add_parser("convert-openclip", help="open_clip ViT weights -> a transformers CLIP folder (--base)")
    c.add_argument("weights", help="open_clip .safetensors / .bin / .pt file (read without unpickling code)")
    c.add_argument("--tokenizer", required=True, help="folder with a CLIP tokenizer (vocab.json, merges.txt)")
    c.add_argument("--quick-gelu", action="store_true", help="QuickGELU activations (OpenAI-trained weights)")
    c.add_argument("--vision-heads", type=positive_int, default=None,
                   help="image tower heads [default width/64; ViT-H/g/bigG differ]")
    c.add_argument("--text-heads", type=positive_int, default=None, help="text tower heads [default width/64]")
    add_run_flags(c, "the CLIP folder", trains=False)
    c.set_defaults(handler=cmd_convert)


def cmd_build(args: argparse.Namespace) -> int:
    out = out_path(args)
    check_output_dir(out, args.overwrite)
    build = czsl_build.build_emoji if args.kind == "emoji" else czsl_build.build_shapes
    folder = build(out, seed=args.seed)
    data = czsl_data.read_czsl(folder)
    print(f"{args.kind}: {len(data.attrs)} attributes, {len(data.objs)} objects, {len(data.seen_pairs)} seen pairs, "
          f"{len(data.samples)} images -> {folder}")
    return 0


def _pool(args: argparse.Namespace, config: PoolAlignConfig) -> tuple[Any, list[str], dict[str, Any]]:
    sources = [s.strip() for s in args.pool.split(",") if s.strip()]  # pretraining_pool validates them
    excluded = [czsl_data.read_czsl(folder) for folder in args.exclude]
    return czsl_build.pretraining_pool(sources, excluded, per_item=args.per_item, per_pair=args.per_pair,
                                       per_class=args.per_class, cifar=args.cifar, seed=config.seed)


def cmd_pretrain(args: argparse.Namespace) -> int:
    config = config_from_args(PoolAlignConfig, args)
    check_json_target(args)
    check_output_dir(out_path(args), args.overwrite or args.resume)
    images, captions, info = _pool(args, config)
    meta = align_pool(config, images, captions, out_path(args), resume=args.resume, overwrite=args.overwrite,
                      data=info)
    emit(args, {"images": len(captions), "captions": meta["data"]["captions"], "logit_scale": meta["logit_scale"],
                "steps": meta["training"]["steps"], "seconds": meta["training"]["seconds"], **info})
    return 0


def _flatten(metrics: dict[str, Any], splits: tuple[str, ...], worlds: tuple[str, ...]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for split in splits:
        for world in worlds:
            if world in metrics.get(split, {}):
                flat |= {f"{split}_{world}_{k}": metrics[split][world][k] for k in SHOWN}
    if "feasibility_threshold" in metrics:
        flat["feasibility_threshold"] = metrics["feasibility_threshold"]
    return flat


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(CZSLConfig, args, data=args.data, base=args.base)
    check_json_target(args)
    summary = train_czsl(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    if summary["metrics"]:
        flat = _flatten(summary["metrics"], ("test",), WORLDS)
        emit(args, flat | {"metrics": summary["metrics"], "seconds": summary["training"]["seconds"]},
             keys=[*flat, "seconds"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    check_json_target(args)
    metrics = evaluate_run(args.run, args.data, args.base)
    worlds = WORLDS if args.open_world else ("closed",)
    flat = _flatten(metrics, (args.split,), worlds)
    emit(args, flat | {"metrics": metrics}, keys=list(flat))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    out = out_path(args)
    check_output_dir(out, args.overwrite)
    convert_openclip(Path(args.weights), out, Path(args.tokenizer), quick_gelu=args.quick_gelu,
                     vision_heads=args.vision_heads, text_heads=args.text_heads)
    print(f"wrote a transformers CLIP folder -> {out}")
    return 0
