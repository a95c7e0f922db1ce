"""Compositional SLU on ATIS and SNIPS: JointBERT (MiniLM) vs + compositional loss, + paired training, + both.

    python benchmarks/slu.py                                   # the issue's full grid (many CPU hours)
    python benchmarks/slu.py --plan atis:standard:baseline atis:novel-combination:baseline --steps 100
    python benchmarks/slu.py --workers 2 --threads 1      # two rows at once, one thread each (2-core machine)

Rows are ``dataset:split:variant`` (x ``--seeds``), trained in the order given; each finished row is stored in
``results/slu.json`` at once and reused by a later run with the same settings (so a re-run only trains what
changed or is missing), and BENCHMARKS.md / ``results/slu.png`` are rewritten after every row, saying which rows
of the grid did not run. Splits: ``standard`` (the shipped train/dev/test) and the two compositional re-splits of
:mod:`leanfm.data.slu`, written under ``$LEANFM_HOME/bench/slu/data``; runs under ``$LEANFM_HOME/bench/slu``
(checkpointed: an interrupted row resumes). The data root is ``--data``, else ``$LEANFM_DATA``, else
``../shared/data`` beside the repository; absent data is a clear message, never a download.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from leanfm.adapt.slu import SluConfig, cross_slot_attention, evaluate, load_run, train_slu
from leanfm.adapt.spoken import evaluate_spoken
from leanfm.data import slu as slu_data
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.report.report import write_section

DATASETS = ("atis", "snips")
SPLITS = ("standard", "novel-combination", "length", "novel-combination-val", "length-val")
GRID_SPLITS = SPLITS[:3]  # *-val: the same construction *inside* the compositional split's training side, the
# validation splits for λ and the pair fraction (their tests never touch the real test utterances)
VARIANTS = {"baseline": ("jointbert", False), "compositional": ("compositional", False),
            "paired": ("jointbert", True), "both": ("compositional", True), "crf": ("jointbert", False)}
GRID = ("baseline", "compositional", "paired", "both")  # the grid; "crf" (JointBERT + CRF) is opt-in
ANCHORS = {"atis": (97.87, 95.59), "snips": (99.14, 96.90)}  # JointBERT, BERT-base, standard split (intent, F1)
REPO = Path(__file__).resolve().parents[1]


def data_root(arg: Path | None) -> Path:
    root = arg or (Path(os.environ[slu_data.DATA_ENV]) if os.environ.get(slu_data.DATA_ENV) else REPO.parent / "shared"
                   / "data")
    if not (root / "slu").is_dir():
        raise SystemExit(f"no SLU data under {root}/slu (ATIS/SNIPS in JointBERT's layout); pass --data DIR")
    return root


def split_folder(root: Path, dataset: str, split: str) -> Path:
    """The shipped folder for ``standard``, else the cached re-split (written once, deterministic)."""
    if split == "standard":
        return root / "slu" / dataset
    if split.endswith("-val"):
        folder = leanfm_home() / "bench" / "slu" / "data" / f"{dataset}-{split}"
        if not (folder / "split.json").is_file():
            outer = split.removesuffix("-val")
            side = replace(slu_data.load(split_folder(root, dataset, outer), allow_unseen=True), test=[])
            inner = (slu_data.split_novel_combination(side, seed=1) if outer == "novel-combination"
                     else slu_data.split_length(side, seed=1))  # train + dev pooled only
            slu_data.write(inner, folder)  # with its split.json
        return folder
    folder = leanfm_home() / "bench" / "slu" / "data" / f"{dataset}-{split}"
    if not (folder / "split.json").is_file():
        slu_data.resplit(root / "slu" / dataset, split, folder)
    return folder


def settings(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    method, paired = VARIANTS[base(variant)]
    # compositional@0.3: the loss weight λ, paired@0.25: the pair fraction; absent (the defaults, 1.0 and 0.5) so
    # that older rows still match
    weight: dict[str, float] = {}
    if "@" in variant:
        weight = {"pair_fraction" if base(variant) == "paired" else "comp_weight": float(variant.split("@")[1])}
    crf = {"crf": True} if variant == "crf" else {}  # absent otherwise, so rows stored before it existed still match
    return {"method": method, "paired": paired, **crf, **weight, "seed": seed, "steps": args.steps,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
            "device": args.device, "autocast": args.autocast}


def run_folder(dataset: str, split: str, variant: str, seed: int, wanted: dict[str, Any]) -> Path:
    """Where a row's run lives: other settings, other folder (a hash), so nothing resumes another's checkpoint."""
    tag = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:8]
    return leanfm_home() / "bench" / "slu" / f"{dataset}-{split}-{variant}-s{seed}-{tag}"


def run_spoken(root: Path, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """ATIS standard-split runs (seed 0) on espeak-ng renderings of the first ``--spoken`` test utterances, through
    Whisper tiny.en; cached in results/slu_spoken.json by run settings, count and voice."""
    path = args.results / "slu_spoken.json"
    done: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    test = slu_data.load(root / "slu" / "atis", allow_unseen=True).test[: args.spoken]
    for r in sorted(rows, key=_order):
        if (r["dataset"], r["split"], r["seed"]) != ("atis", "standard", 0) or r["variant"] not in args.spoken_variants:
            continue
        key = {"variant": r["variant"], "settings": r["settings"], "utterances": len(test), "voice": args.voice}
        if any({k: d[k] for k in key} == key for d in done):
            continue
        model, tokenizer, meta = load_run(run_folder("atis", "standard", r["variant"], 0, r["settings"]))
        tick = time.time()
        result = evaluate_spoken(model, tokenizer, meta, test, voice=args.voice)
        done = [d for d in done if d["variant"] != r["variant"]]
        done.append(key | result | {"seconds": time.time() - tick, "load_average": os.getloadavg()[0]})
        atomic_write_json(path, done)
        print(json.dumps({k: done[-1][k] for k in ("variant", "wer", "spoken", "text")}), flush=True)
    return done


def spoken_lines(spoken: list[dict]) -> list[str]:
    if not spoken:
        return ["Spoken input: not measured yet (`--spoken N`)."]
    first = spoken[0]
    lines = [f"Spoken ATIS: the standard-split runs of seed 0 read Whisper tiny.en's transcripts of espeak-ng "
             f"renderings (voice {first['voice']}) of the first {first['utterances']} test utterances (no recorded "
             "ATIS audio exists offline). Slot scores here are (type, value) pairs, since transcript words need not "
             "align with the gold ones (`leanfm.adapt.spoken`); the text column is the same measure on the gold "
             "text, so the difference is the recogniser's.", "",
             "| variant | WER | intent acc text -> spoken | slot-pair F1 text -> spoken | seconds |",
             "|---|---|---|---|---|"]
    for d in spoken:
        lines.append(f"| {d['variant']} | {100 * d['wer']:.1f} | {100 * d['text']['intent_accuracy']:.2f} -> "
                     f"{100 * d['spoken']['intent_accuracy']:.2f} | {100 * d['text']['slot_pair']['f1']:.2f} -> "
                     f"{100 * d['spoken']['slot_pair']['f1']:.2f} | {d['seconds']:.0f} |")
    examples = "; ".join(f"\"{e['reference']}\" -> \"{e['transcript']}\"" for e in first["examples"][:3])
    return [*lines, "", f"Transcripts, first three: {examples}."]


def run_row(root: Path, dataset: str, split: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    folder = split_folder(root, dataset, split)
    wanted = settings(args, variant, seed)
    config = SluConfig(data=str(folder), **wanted)
    out = run_folder(dataset, split, variant, seed, wanted)
    training = out.with_name(out.name + ".training")
    tick, load = time.time(), os.getloadavg()[0]
    summary = train_slu(config, out, resume=training.is_dir(), overwrite=True)
    model, tokenizer, meta = load_run(out)  # the mechanism: how much slot tokens attend to other slots' values
    test = slu_data.load(folder, allow_unseen=True).test
    cross = cross_slot_attention(model, tokenizer, test, meta["intents"], meta["slots"], config.comp_layers)
    stats = json.loads((folder / "split.json").read_text()) if (folder / "split.json").is_file() else {}
    buckets = by_slot_count(model, tokenizer, meta, test) if split.startswith("length") else {}
    return {"dataset": dataset, "split": split, "variant": variant, "seed": seed,
            "settings": wanted, "metrics": summary["metrics"],
            "train_seconds": summary["training"]["seconds"], "wall_seconds": time.time() - tick,
            "seconds_per_epoch": summary["training"]["seconds_per_epoch"], "steps": summary["training"]["steps"],
            "steps_per_epoch": summary["training"]["steps_per_epoch"],
            "final": summary["training"]["history"][-1], "cross_slot_attention_test": cross,
            "test_by_slots": buckets,
            "threads": torch.get_num_threads(),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "split_stats": {k: stats.get(k) for k in (
                "sizes", "k", "test_share") if k in stats}}


def by_slot_count(model: Any, tokenizer: Any, meta: dict, test: list) -> dict[str, dict]:
    """Test slot F1 and exact match by the utterance's number of gold slots (the length split's mechanism: does a
    method help more on the longest?); buckets k+1, k+2, >= k+3 from the shortest test utterance."""
    shortest = min(len(u.spans()) for u in test)
    edges = {f"{shortest}": (shortest, shortest), f"{shortest + 1}": (shortest + 1, shortest + 1),
             f">={shortest + 2}": (shortest + 2, 10**6)}
    out = {}
    for name, (low, high) in edges.items():
        part = [u for u in test if low <= len(u.spans()) <= high]
        if part:
            m = evaluate(model, tokenizer, part, meta["intents"], meta["slots"], meta["config"]["max_length"])
            out[name] = {"utterances": len(part), "slot_f1": m["slot_f1"], "exact_match": m["exact_match"]}
    return out


def backfill_buckets(rows: list[dict]) -> bool:
    """``test_by_slots`` for length rows stored before it was measured (inference on the saved runs)."""
    changed = False
    for r in rows:
        if r["split"].startswith("length") and not r.get("test_by_slots"):
            out = run_folder(r["dataset"], r["split"], r["variant"], r["seed"], r["settings"])
            if (out / "slu.json").is_file():
                model, tokenizer, meta = load_run(out)
                test = slu_data.load(Path(meta["data"]), allow_unseen=True).test
                r["test_by_slots"] = by_slot_count(model, tokenizer, meta, test)
                changed = True
    return changed


def bucket_lines(rows: list[dict]) -> list[str]:
    """Slot F1 by number of slots on the length split, mean over seeds per variant."""
    lines = []
    for dataset in DATASETS:
        group = [r for r in rows if (r["dataset"], r["split"]) == (dataset, "length") and r.get("test_by_slots")]
        if not group:
            continue
        names = list(group[0]["test_by_slots"])
        lines += [f"{dataset} length split, test slot F1 by the utterance's number of slots (utterances):", "",
                  "| variant | " + " | ".join(f"{n} slots ({group[0]['test_by_slots'][n]['utterances']})"
                                             for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        for variant in dict.fromkeys(r["variant"] for r in sorted(group, key=_order)):
            mine = [r for r in group if r["variant"] == variant]
            cells = [_stats([100 * r["test_by_slots"][n]["slot_f1"] for r in mine if n in r["test_by_slots"]])
                     for n in names]
            lines.append(f"| {variant} (n={len(mine)}) | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dataset"], r["split"]) for r in rows if r["split"] in GRID_SPLITS},
                    key=lambda g: (g[0], SPLITS.index(g[1])))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.2), dpi=110)
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    width = 0.8 / max(1, len(variants))
    lowest = 100.0
    for offset, variant in enumerate(variants):
        runs = [[100 * r["metrics"]["test"]["slot_f1"] for r in rows
                 if (r["dataset"], r["split"]) == g and r["variant"] == variant] for g in groups]
        means = [sum(v) / len(v) if v else float("nan") for v in runs]
        spread = [(max(v) - min(v)) / 2 if len(v) > 1 else 0.0 for v in runs]  # half the range over seeds
        lowest = min([lowest, *(m for m in means if m == m)])
        ax.bar([i + offset * width for i in range(len(groups))], means, width=width, yerr=spread, capsize=2,
               label=variant)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{d}\n{s}" for d, s in groups], fontsize=8)
    ax.set_ylim(max(0.0, lowest - 10), 100)  # the differences are a few points: do not start at 0
    ax.set(ylabel="test slot F1 (seqeval, %)",
           title="Compositional SLU on MiniLM-L6 (bars: mean over seeds, whiskers: half the range)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=len(variants), loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _mean(group: list[dict], metric: str) -> float | None:
    values = [100 * r["metrics"]["test"][metric] for r in group]
    return sum(values) / len(values) if values else None


def _order(r: dict) -> tuple:
    weight = float(r["variant"].split("@")[1]) if "@" in r["variant"] else 0.0
    return (DATASETS.index(r["dataset"]), SPLITS.index(r["split"]), list(VARIANTS).index(base(r["variant"])), weight,
            r["seed"])


def base(variant: str) -> str:
    """``compositional@0.3`` -> ``compositional``."""
    return variant.split("@")[0]


def valid_variant(variant: str) -> bool:
    if "@" not in variant:
        return variant in VARIANTS
    name, weight = variant.split("@", 1)
    try:
        return name in ("compositional", "both", "paired") and float(weight) > 0
    except ValueError:
        return False


def _stats(values: list[float], signed: bool = False) -> str:
    """``mean``, or ``mean ± sd`` (sample sd) where several seeds ran, of percentages."""
    mean = sum(values) / len(values)
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if len(values) == 1:
        return text
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{text} ± {sd:.2f}"


def unseen_types(rows: list[dict]) -> str:
    """Per length split that ran: how many test slot types never occur in its training side (from split.json)."""
    out = []
    for dataset in DATASETS:
        if any((r["dataset"], r["split"]) == (dataset, "length") for r in rows):
            stats = leanfm_home() / "bench" / "slu" / "data" / f"{dataset}-length" / "split.json"
            if stats.is_file():
                unseen = json.loads(stats.read_text()).get("test_types_unseen_in_train", [])
                out.append(f"{dataset} {len(unseen)}")
    return ", ".join(out) or "not counted (split.json absent)"


def summary(rows: list[dict]) -> list[str]:
    """One line per (dataset, split, variant): test metrics over seeds, and the change to the baseline of the same
    seeds (paired by seed, so a variant is only compared where its baseline ran)."""
    out = ["| dataset | split (test n, k) | variant | seeds | intent acc | slot F1 | exact match | "
           "slot F1 minus baseline (same seeds) | dev slot F1 | cross-slot attention (test, %) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=_order):
        groups.setdefault((r["dataset"], r["split"], r["variant"]), []).append(r)
    for (dataset, split, variant), group in groups.items():
        stats = group[0].get("split_stats", {})
        size = stats.get("sizes", {}).get("test")
        k = f", k={stats['k']}" if stats.get("k") is not None else ""
        test = [r["metrics"]["test"] for r in group]
        base = {r["seed"]: r for r in groups.get((dataset, split, "baseline"), [])}
        deltas = [100 * (r["metrics"]["test"]["slot_f1"] - base[r["seed"]]["metrics"]["test"]["slot_f1"])
                  for r in group if r["seed"] in base]
        delta = "—" if variant == "baseline" else _stats(deltas, signed=True) if deltas else "no baseline"
        seeds = ",".join(str(r["seed"]) for r in group)
        masses = [100 * r["cross_slot_attention_test"] for r in group if "cross_slot_attention_test" in r]
        cross = _stats(masses) if masses else "—"
        out.append(f"| {dataset} | {split}{f' ({size}{k})' if size else ''} | {variant} | "
                   f"{seeds} | {_stats([100 * m['intent_accuracy'] for m in test])} | "
                   f"**{_stats([100 * m['slot_f1'] for m in test])}** | "
                   f"{_stats([100 * m['exact_match'] for m in test])} | {delta} | "
                   f"{_stats([100 * r['metrics']['dev']['slot_f1'] for r in group])} | {cross} |")
    return out


def run_lr_sweep(root: Path, args: argparse.Namespace) -> None:
    """ATIS standard baseline (seed 0) at each ``--lr-sweep`` rate; cached in results/slu_lr.json by settings."""
    path = args.results / "slu_lr.json"
    done: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    for lr in args.lr_sweep:
        trial = argparse.Namespace(**{**vars(args), "lr": lr})
        if any(r["settings"] == settings(trial, "baseline", 0) for r in done):
            continue
        done.append(run_row(root, "atis", "standard", "baseline", 0, trial))
        atomic_write_json(path, done)


def lr_sweep_text(args: argparse.Namespace) -> str:
    path = args.results / "slu_lr.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    if not done:
        return "no sweep stored: --lr-sweep"
    points = ", ".join(f"{r['settings']['lr']:g}: {100 * r['metrics']['dev']['slot_f1']:.1f}"
                       for r in sorted(done, key=lambda r: r["settings"]["lr"]))
    steps = sorted({r["settings"]["steps"] for r in done})
    return f"lr: dev slot F1 = {points}, {'/'.join(map(str, steps))} steps; results/slu_lr.json"


def tuning(rows: list[dict], split: str, variant: str, name: str, default: str) -> str:
    """Which setting of ``variant`` won on the validation ``split`` (its nested test's slot F1), from the rows."""
    val = [r for r in rows if r["split"] == split and base(r["variant"]) == variant]
    if not val:
        return f"not run yet: the grid rows use {name} = {default}"
    best = max(val, key=lambda r: r["metrics"]["test"]["slot_f1"])
    value = best["variant"].split("@")[1] if "@" in best["variant"] else default
    return (f"best {name} = {value} of {len(val)} tried; the grid rows use {name} = {default}, rows named "
            f"{variant}@{value} apply the chosen one where they ran")


def commands(rows: list[dict]) -> list[str]:
    """The command that reproduces the rows of each seed, from the settings stored with the rows."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        group = sorted((r for r in rows if r["seed"] == seed), key=_order)
        s = group[0]["settings"]
        plan = " ".join(f"{r['dataset']}:{r['split']}:{r['variant']}" for r in group)
        out.append(f"python benchmarks/slu.py --plan {plan} --seeds {seed} --steps {s['steps']} --epochs {s['epochs']} "
                   f"--warmup {s['warmup']} --lr {s['lr']} --batch-size {s['batch_size']} --device {s['device']}"
                   f"{'' if s.get('autocast', True) else ' --no-autocast'} --workers 2 --threads 1")
    return out


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    length = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs"
    seen = (f"{length} of {args.batch_size} utterances (~{args.steps * args.batch_size / 4478:.1f} ATIS epochs, "
            f"~{args.steps * args.batch_size / 13084:.1f} SNIPS epochs)" if args.steps else length)
    minutes = [r["train_seconds"] / 60 for r in rows]
    loads = [x for r in rows for x in r.get("load_average", [])]
    lines = [
        "## Compositional SLU (adapt)", "",
        "Claim (paper): on compositional splits of ATIS and SNIPS the compositional loss (novel slot combinations) and "
        "paired training (length) gain up to +5 slot F1 over a BERT SLU baseline, with no loss on the standard split. "
        f"Reference (JointBERT, BERT-base, 10 epochs, standard split): ATIS {ANCHORS['atis'][0]} / "
        f"{ANCHORS['atis'][1]}, SNIPS {ANCHORS['snips'][0]} / {ANCHORS['snips'][1]} (intent accuracy / slot F1).", "",
        f"Setting: JointBERT on all-MiniLM-L6-v2 (22M parameters, 5x smaller than BERT-base), {seen} per run, AdamW "
        f"lr {args.lr} (warm-up {args.warmup} steps, cosine), bf16 autocast "
        f"{'on' if args.autocast else 'off'}, on this machine's CPU; the learning rate was chosen on ATIS standard "
        f"dev slot F1 of the baseline ({lr_sweep_text(args)}) and is shared by every variant and by SNIPS. "
        "Compositional loss (variant@λ names its weight; default 1.0) over the last 2 "
        "layers; paired training with half of each batch's rows pairs (variant@f names another fraction). The dev "
        "split of a compositional split is drawn from its training side and cannot select for compositional "
        "generalisation, so the settings are chosen on validation splits built the same way *inside* the training "
        "side: λ on novel-combination-val (held-out slot-type pairs; "
        f"{tuning(rows, 'novel-combination-val', 'compositional', 'λ', '1')}), the pair fraction on length-val "
        "(train on the shorter, validate on the longest utterances of length's training side; "
        f"{tuning(rows, 'length-val', 'paired', 'fraction', '0.5')}). Test metrics in %: intent accuracy, span-level "
        "slot F1 (seqeval), sentence exact match; mean ± sd over seeds where more than one ran. Cross-slot attention "
        "is the mechanism the compositional loss acts on: the mean attention mass a slot sub-token sends to other slot "
        "spans in the last 2 layers, on the test split. Splits: novel-combination "
        "holds out slot-type pairs (every test utterance has one, every test slot type is seen in training); length "
        "trains on utterances with <= k slots and tests on > k (k in the table); slot types that only occur in long "
        f"utterances are then never seen in training (test types unseen in training: {unseen_types(rows)}; listed in "
        "`$LEANFM_HOME/bench/slu/data/*/split.json`).", "",
        *summary(rows), "",
        f"Train time per run: {min(minutes):.1f}-{max(minutes):.1f} min ({len(rows)} runs, two at a time with one "
        f"thread each on 2 cores; load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f}).", "",
    ]
    done = {(r["dataset"], r["split"], r["variant"]) for r in rows}
    missing = [f"{d}:{s}:{v}" for d in DATASETS for s in GRID_SPLITS for v in GRID if (d, s, v) not in done]
    short = sorted({f"{r['dataset']}:{r['split']}" for r in rows if r["split"] != "standard"
                    and len({x["seed"] for x in rows if (x["dataset"], x["split"]) == (r["dataset"], r["split"])}) < 3})
    lines += [f"Not run: {', '.join(missing) if missing else 'none of the 24 rows is missing'}; compositional splits "
              f"with fewer than the issue's 3 seeds: {', '.join(short) if short else 'none'}.",
              "", *bucket_lines(rows), *spoken_lines(_spoken(args)),
              "", "![Compositional SLU](results/slu.png)", "", "Regenerate (one command per seed; finished rows are "
              "reused from results/slu.json):", ""]
    lines += [f"    {command}" for command in commands(rows)]
    return "\n".join(lines)


def _spoken(args: argparse.Namespace) -> list[dict]:
    path = args.results / "slu_spoken.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _init_worker(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", nargs="+", default=None,
                        help="rows dataset:split:variant[:seed] in order (default: the grid; no seed: --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600, help="steps per run (0: --epochs)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false", help="train in float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per row")
    parser.add_argument("--workers", type=int, default=1, help="rows trained at once, each in its own process")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--spoken", type=int, default=0, help="ATIS test utterances to render and transcribe (0: none)")
    parser.add_argument("--spoken-variants", nargs="+", default=["baseline", "compositional"])
    parser.add_argument("--lr-sweep", type=float, nargs="*", default=[],
                        help="learning rates for the ATIS standard baseline, chosen on dev (results/slu_lr.json)")
    parser.add_argument("--voice", default="en-us", help="espeak-ng voice of the spoken test")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root(args.data)
    plan = [tuple(p.split(":")) for p in args.plan] if args.plan else [
        (d, s, v) for d in DATASETS for s in GRID_SPLITS for v in GRID]
    for row in plan:
        if (len(row) not in (3, 4) or row[0] not in DATASETS or row[1] not in SPLITS or not valid_variant(row[2])
                or (len(row) == 4 and not row[3].isdigit())):
            raise SystemExit(f"bad --plan row {':'.join(row)}; accepted: {'|'.join(DATASETS)}:{'|'.join(SPLITS)}:"
                             f"{'|'.join(VARIANTS)}[@WEIGHT][:SEED]")
    args.results.mkdir(parents=True, exist_ok=True)
    results = args.results / "slu.json"
    rows: list[dict] = json.loads(results.read_text()) if results.is_file() else []
    jobs_wanted = [(row[0], row[1], row[2], seed) for row in plan
                   for seed in ([int(row[3])] if len(row) == 4 else args.seeds)]  # a row's own seed wins
    todo = [(dataset, split, variant, seed) for dataset, split, variant, seed in jobs_wanted
            if not any((r["dataset"], r["split"], r["variant"], r["settings"]) == (
                dataset, split, variant, settings(args, variant, seed)) for r in rows)]  # else finished already
    for folder in {(d, s) for d, s, _, _ in todo}:
        split_folder(root, *folder)  # re-split once, before the workers race for it
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker,
                             initargs=(args.threads,)) as pool:
        jobs: dict[Future, tuple] = {pool.submit(run_row, root, *job, args): job for job in todo}
        for done in as_completed(jobs):
            row = done.result()
            rows = [r for r in rows if (r["dataset"], r["split"], r["variant"], r["seed"]) != jobs[done]] + [row]
            atomic_write_json(results, rows)
            atomic_write_bytes(args.results / "slu.png", plot(rows))
            write_section(args.benchmarks_md, "slu", markdown(rows, args))
            print(json.dumps({k: row[k] for k in ("dataset", "split", "variant", "seed", "train_seconds")}
                             | row["metrics"]["test"]), flush=True)
    if backfill_buckets(rows):
        atomic_write_json(results, rows)
    if args.lr_sweep:
        run_lr_sweep(root, args)
    if args.spoken:
        run_spoken(root, rows, args)
    if rows:  # also when every row was cached: the section follows the code that renders it
        atomic_write_bytes(args.results / "slu.png", plot(rows))
        write_section(args.benchmarks_md, "slu", markdown(rows, args))


if __name__ == "__main__":
    main()
