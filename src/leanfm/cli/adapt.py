"""``leanfm slu split|train|eval|predict``, ``leanfm speech transcribe`` (compositional spoken-language
understanding) and ``leanfm continual train|eval|export`` (continual adapters: LoRA, C-LoRA, STAMINA) and
``leanfm continual t2i`` (the same adapters teaching new concepts to the small text-to-image model in sequence).

``DATA`` is a folder in JointBERT's layout or a name (``atis``, ``snips``) under ``$LEANFM_DATA/slu``; nothing is
downloaded. Spoken input (``predict --audio FILE.wav``) is Whisper tiny.en's transcript read by the text model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from leanfm.adapt import continual
from leanfm.adapt.slu import SluConfig, evaluate, load_run, predict, train_slu
from leanfm.adapt.spoken import predict_audio, transcribe_files
from leanfm.adapt.t2i_continual import T2IContinualConfig, train_t2i_continual
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
)
from leanfm.data import slu as slu_data
from leanfm.errors import LeanfmError
from leanfm.paths import check_output_dir

CONTINUAL_DATA_HELP = "folder with the 16-shot data (fewshot/<task>/16-<seed>/...) and, for text11, slu/snips"
DATA_HELP = "dataset folder in JointBERT's layout, or a name (atis, snips) under $LEANFM_DATA/slu"
METRICS = ("intent_accuracy", "slot_f1", "slot_precision", "slot_recall", "exact_match", "utterances")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("slu", help="compositional SLU: splits, JointBERT training, evaluation, prediction")
    ssub = p.add_subparsers(dest="slu_command", parser_class=Parser, required=True)
    s = ssub.add_parser("split", help="re-split train+dev+test compositionally (same layout + split.json)")
    s.add_argument("data", help=DATA_HELP)
    s.add_argument("--kind", required=True, choices=slu_data.KINDS, help="which compositional split")
    s.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the held-out pairs and of dev [default 0]")
    s.add_argument("--k", type=nonnegative_int, default=None,
                   help="length split: train on <= k slots (default: test share closest to 17.5%%)")
    add_run_flags(s, "the new dataset folder", trains=False)
    add_json_flag(s, "the split statistics")
    s.set_defaults(handler=cmd_split)
    t = ssub.add_parser("train", help="train JointBERT (+ compositional loss, + paired training) and evaluate")
    t.add_argument("data", help=DATA_HELP)
    add_run_flags(t, "model.safetensors, slu.json; checkpoints in OUT.training")
    add_config_flags(t, SluConfig)
    add_json_flag(t, "the dev and test metrics")
    t.set_defaults(handler=cmd_train)
    e = ssub.add_parser("eval", help="intent accuracy, slot F1 (seqeval, spans) and exact match of a run")
    e.add_argument("run", help="folder written by 'leanfm slu train'")
    e.add_argument("--data", default=None, help=DATA_HELP + " [default: the run's training data]")
    e.add_argument("--split", choices=slu_data.SPLITS, default="test", help="which split [default test]")
    add_json_flag(e, "the metrics")
    e.set_defaults(handler=cmd_eval)
    r = ssub.add_parser("predict", help="intent and slots of one utterance, as JSON")
    r.add_argument("run", help="folder written by 'leanfm slu train'")
    r.add_argument("text", nargs="?", default=None, help="the utterance (words separated by spaces)")
    r.add_argument("--audio", default=None, help="a PCM .wav file instead of text: transcribed by Whisper tiny.en")
    r.set_defaults(handler=cmd_predict)
    sp = sub.add_parser("speech", help="speech recognition with Whisper tiny.en")
    spsub = sp.add_subparsers(dest="speech_command", parser_class=Parser, required=True)
    tr = spsub.add_parser("transcribe", help="transcribe PCM .wav files (greedy decoding, up to 30 s each)")
    tr.add_argument("files", nargs="+", help="PCM .wav files, any sample rate (resampled to 16 kHz)")
    add_json_flag(tr, "the transcripts")
    tr.set_defaults(handler=cmd_transcribe)
    _add_continual(sub)


def _add_continual(sub: Any) -> None:
    p = sub.add_parser("continual", help="continual adapters (LoRA, C-LoRA, STAMINA) on class-incremental tasks")
    csub = p.add_subparsers(dest="continual_command", parser_class=Parser, required=True)
    t = csub.add_parser("train", help="learn a task sequence one task at a time; A_N, F_N and accuracy matrices")
    t.add_argument("data", help=CONTINUAL_DATA_HELP)
    add_run_flags(t, "weights.safetensors, continual.json; checkpoints in OUT.training")
    add_config_flags(t, continual.ContinualConfig)
    add_json_flag(t, "the metrics and accuracy matrices")
    t.set_defaults(handler=cmd_continual_train)
    e = csub.add_parser("eval", help="accuracy of a run's final model on every task (argmax over all classes)")
    e.add_argument("run", help="folder written by 'leanfm continual train'")
    e.add_argument("--data", default=None, help=CONTINUAL_DATA_HELP + " [default: the run's]")
    e.add_argument("--split", choices=(*continual.SPLITS, continual.TASK_AWARE), default="test",
                   help="which split [default test]")
    add_json_flag(e, "the accuracies")
    e.set_defaults(handler=cmd_continual_eval)
    x = csub.add_parser("export", help="the folded encoder as a transformers folder + head.safetensors")
    x.add_argument("run", help="folder written by 'leanfm continual train'")
    add_run_flags(x, "config.json, model.safetensors, tokenizer, head.safetensors, labels.json", trains=False)
    x.set_defaults(handler=cmd_continual_export)
    i = csub.add_parser("t2i", help="teach held-out concepts to a t2i model one at a time (own token each); "
                                    "KID/MMD/recognition per concept with --classifier")
    add_run_flags(i, "the customised t2i model (folded U-Net, tokens.safetensors), samples, grid.png, "
                     "continual_t2i.json; checkpoints in OUT.training")
    add_config_flags(i, T2IContinualConfig)
    add_json_flag(i, "the summary (and metrics)")
    i.set_defaults(handler=cmd_continual_t2i)


def cmd_split(args: argparse.Namespace) -> int:
    out = out_path(args)
    check_output_dir(out, args.overwrite)
    check_json_target(args)
    stats = slu_data.resplit(args.data, args.kind, out, seed=args.seed, k=args.k)
    emit(args, stats, keys=[k for k in ("kind", "k", "sizes", "test_share", "test_with_novel_pair",
                                        "test_types_unseen_in_train") if k in stats])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(SluConfig, args, data=str(slu_data.resolve(args.data)))
    check_json_target(args)
    summary = train_slu(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    if summary["metrics"]:  # only the main rank evaluates
        flat = {f"{split}_{k}": v for split, m in summary["metrics"].items() for k, v in m.items()}
        emit(args, flat | {"seconds_per_epoch": summary["training"]["seconds_per_epoch"]})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    check_json_target(args)
    model, tokenizer, meta = load_run(args.run)
    folder = slu_data.resolve(args.data) if args.data else Path(meta["data"])
    data = slu_data.load(folder, allow_unseen=True)
    # the run's own label inventory: gold labels it never saw count as errors, whatever the folder's label files
    metrics = evaluate(model, tokenizer, data.split(args.split), meta["intents"], meta["slots"],
                       meta["config"]["max_length"])
    emit(args, metrics, keys=METRICS)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.audio is None):
        raise LeanfmError("pass either TEXT or --audio FILE.wav (exactly one)")
    result = predict(args.run, args.text) if args.audio is None else predict_audio(args.run, args.audio)
    print(json.dumps(result, indent=2))
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    check_json_target(args)
    emit(args, transcribe_files(args.files))
    return 0


def cmd_continual_train(args: argparse.Namespace) -> int:
    config = config_from_args(continual.ContinualConfig, args, data=str(Path(args.data).expanduser()))
    check_json_target(args)
    summary = continual.train_continual(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    flat: dict[str, Any] = {}
    for split, metrics in summary["metrics"].items():
        flat |= {f"{split}_{k}": v for k, v in metrics.items() if k != "final_row"}
    emit(args, flat | {"matrices": summary["matrices"], "seconds": sum(t["seconds"] for t in summary["training"])},
         keys=[k for k in flat if not k.endswith("final_row")] + ["seconds"])
    return 0


def cmd_continual_eval(args: argparse.Namespace) -> int:
    check_json_target(args)
    result = continual.evaluate_run(args.run, args.data, args.split)
    emit(args, {"average_accuracy": result["average_accuracy"], **result["per_task"]})
    return 0


def cmd_continual_export(args: argparse.Namespace) -> int:
    out = out_path(args)
    check_output_dir(out, args.overwrite)
    continual.read_meta(args.run)
    emit(args, continual.export_run(args.run, out))
    return 0


def cmd_continual_t2i(args: argparse.Namespace) -> int:
    config = config_from_args(T2IContinualConfig, args)
    check_json_target(args)
    summary = train_t2i_continual(config, out_path(args), resume=args.resume, overwrite=args.overwrite)
    shown: dict[str, Any] = {"concepts": len(summary["concepts"]),
                             "seconds": round(sum(t["seconds"] for t in summary["training"]), 1)}
    if "metrics" in summary:
        mean = summary["metrics"]["mean"]
        shown |= {f"{kind}_{m}": v for kind in ("floor", "base", "after", "final", "forgetting")
                  for m, v in mean[kind].items()}
    emit(args, shown | {"summary": {k: v for k, v in summary.items() if k != "histories"}}, keys=list(shown))
    return 0
