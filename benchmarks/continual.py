"""Continual adapters on rehearsal-free class-incremental text classification: LoRA vs C-LoRA vs STAMINA.

    python benchmarks/continual.py --tune --workers 2 --threads 1      # lr, then lambda and beta, on val A_N
    python benchmarks/continual.py --workers 2 --threads 1            # the grid at the chosen settings
    python benchmarks/continual.py --plan text4:clora@reg_weight=1e5:1 text11:stamina

Rows are ``sequence:method[@field=value,...][:seed]`` (fields of ``ContinualConfig``; no seed: ``--seeds``); each
finished row is stored in ``results/continual.json`` at once and reused by a later run with the same settings,
and BENCHMARKS.md / ``results/continual.png`` are rewritten after every row. ``--tune`` runs the validation grids
(``results/continual_tuning.json``: lr for LoRA, then C-LoRA's lambda and STAMINA's beta at that lr, each chosen on
the *validation* average accuracy, never on test) and the grid then uses the winners. Every row also scores the
final model on a domain no task trained on: MR's movie reviews through the SST-2 classes (argmax over every
class, and over the two SST-2 classes). Data: ``--data``, else ``$LEANFM_DATA``, else ``../shared/data`` beside
the repository; absent data is a clear message, never a download. Runs live under ``$LEANFM_HOME/bench/continual``.
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
from pathlib import Path
from typing import Any

import torch

from leanfm.adapt.continual import ContinualConfig, accuracy, load_run, train_continual
from leanfm.data.fewshot import Example, fewshot_root, test_set
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.report.report import write_section

REPO = Path(__file__).resolve().parents[1]
METHODS = ("frozen", "lora", "clora", "stamina", "joint")
SEQUENCE_STEPS = {"text4": {}, "text11": {"steps_per_task": 50, "test_per_class": 100}}  # text11: CPU budget
LR_GRID = (5e-4, 1e-3, 2e-3)
REG_GRID = (1e2, 1e3, 1e4, 1e5, 1e7)
SPARSITY_GRID = (0.01, 0.1, 1.0)
HELD_OUT_PER_CLASS = 200


def data_root(arg: Path | None) -> Path:
    for candidate in (arg, Path(os.environ["LEANFM_DATA"]) if os.environ.get("LEANFM_DATA") else None,
                      REPO.parent / "shared" / "data"):
        if candidate is not None and candidate.is_dir():
            return candidate
    raise SystemExit("no data: pass --data DIR (a folder with fewshot/ and slu/snips) or set LEANFM_DATA")


def parse_row(text: str, seeds: list[int]) -> list[tuple[str, str, dict[str, Any], int]]:
    """``sequence:method[@k=v,...][:seed]`` -> (sequence, method, overrides, seed) per seed."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SEQUENCE_STEPS or (len(parts) == 3 and not parts[2].isdigit()):
        raise SystemExit(f"bad --plan row {text}; accepted: {'|'.join(SEQUENCE_STEPS)}:METHOD[@k=v,...][:SEED]")
    method, _, setting = parts[1].partition("@")
    if method not in METHODS:
        raise SystemExit(f"bad method in {text}; accepted: {', '.join(METHODS)}")
    overrides: dict[str, Any] = {}
    for pair in filter(None, setting.split(",")):
        key, _, value = pair.partition("=")
        overrides[key] = json.loads(value)
    return [(parts[0], method, overrides, seed) for seed in ([int(parts[2])] if len(parts) == 3 else seeds)]


def settings(args: argparse.Namespace, sequence: str, method: str, overrides: dict[str, Any],
             seed: int) -> dict[str, Any]:
    chosen = tuned(args.results)
    base: dict[str, Any] = {"sequence": sequence, "method": method, "seed": seed, "device": args.device,
                            "lr": chosen.get("lr", 1e-3), **SEQUENCE_STEPS[sequence]}
    if method == "clora" and "reg_weight" in chosen:
        base["reg_weight"] = chosen["reg_weight"]
    if method == "stamina" and "sparsity" in chosen:
        base["sparsity"] = chosen["sparsity"]
    return base | overrides


def run_folder(wanted: dict[str, Any]) -> Path:
    tag = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:8]
    return leanfm_home() / "bench" / "continual" / f"{wanted['sequence']}-{wanted['method']}-s{wanted['seed']}-{tag}"


def held_out(root: Path, model: Any, tokenizer: Any, meta: dict[str, Any]) -> dict[str, float]:
    """MR test reviews scored as the SST-2 classes: over every class of the sequence, and over SST-2's two."""
    names = meta["sequence"]["class_names"]
    sst = [names.index("sst-2:negative"), names.index("sst-2:positive")]
    examples = test_set(fewshot_root(root), "mr")
    counts = {0: 0, 1: 0}
    chosen = []
    for e in examples:
        if counts[e.label] < HELD_OUT_PER_CLASS:
            counts[e.label] += 1
            chosen.append(Example(e.text, sst[e.label]))
    every = list(range(len(names)))
    length = meta["config"]["max_length"]
    return {"mr_all_classes": accuracy(model, tokenizer, chosen, every, max_length=length, amp=True),
            "mr_sst2_classes": accuracy(model, tokenizer, chosen, sst, max_length=length, amp=True)}


def run_row(root: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    config = ContinualConfig(data=str(root), **wanted)
    out = run_folder(wanted)
    training = out.with_name(out.name + ".training")
    tick, load = time.time(), os.getloadavg()[0]
    try:
        summary = train_continual(config, out, resume=training.is_dir(), overwrite=True)
    except LeanfmError as err:  # a checkpoint written by older code with other settings: start that row over
        if "was trained with" not in str(err):
            raise
        summary = train_continual(config, out, resume=False, overwrite=True)
    model, tokenizer, meta = load_run(out)
    return {"sequence": wanted["sequence"], "method": wanted["method"], "seed": wanted["seed"], "settings": wanted,
            "metrics": summary["metrics"], "matrices": summary["matrices"], "held_out": held_out(root, model,
                                                                                                   tokenizer, meta),
            "tasks": [t["name"] for t in summary["sequence"]["tasks"]],
            "steps": sum(t["steps"] for t in summary["training"]),
            "train_seconds": sum(t["seconds"] for t in summary["training"]), "wall_seconds": time.time() - tick,
            "final": [t["history"][-1] for t in summary["training"]], "threads": torch.get_num_threads(),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}


# ---------------------------------------------------------------- tuning on validation


def tuned(results: Path) -> dict[str, Any]:
    path = results / "continual_tuning.json"
    return json.loads(path.read_text())["chosen"] if path.is_file() else {}


def tuning_plan(args: argparse.Namespace, stage: str) -> list[dict[str, Any]]:
    common = {"sequence": "text4", "seed": 0, "device": args.device}
    if stage == "lr":
        return [common | {"method": "lora", "lr": lr} for lr in LR_GRID]
    lr = tuned(args.results)["lr"]
    return ([common | {"method": "clora", "lr": lr, "reg_weight": r} for r in REG_GRID]
            + [common | {"method": "stamina", "lr": lr, "sparsity": b} for b in SPARSITY_GRID])


def choose(rows: list[dict], method: str, field: str) -> Any:
    candidates = [r for r in rows if r["method"] == method and field in r["settings"]]
    best = max(candidates, key=lambda r: r["metrics"]["val"]["average_accuracy"])
    return best["settings"][field]


# ---------------------------------------------------------------- report


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def label(row: dict) -> str:
    s = row["settings"]
    defaults = ContinualConfig()
    extra = {"clora": f" λ={s.get('reg_weight', defaults.reg_weight):g}",
             "stamina": f" β={s.get('sparsity', defaults.sparsity):g}"
             f"{' mask lr x' + format(s['mask_lr_scale'], 'g') if 'mask_lr_scale' in s else ''}"}
    steps, usual = s.get("steps_per_task", 100), SEQUENCE_STEPS[row["sequence"]].get("steps_per_task", 100)
    return f"{row['method']}{extra.get(row['method'], '')}" + (f" ({steps} steps/task)" if steps != usual else "")


def groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["sequence"], METHODS.index(r["method"]), label(r), r["seed"])):
        out.setdefault((r["sequence"], label(r)), []).append(r)
    return out


def summary_table(rows: list[dict]) -> list[str]:
    lines = ["| sequence | method | seeds | A_N test | F_N test | A_N task-aware | A_N val | MR held out (all / SST-2 "
             "classes) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for (sequence, name), group in groups(rows).items():
        forget = [r["metrics"]["test"]["forgetting"] for r in group if r["metrics"]["test"]["forgetting"] is not None]
        a_n = _mean_sd([r["metrics"]["test"]["average_accuracy"] for r in group])
        aware = _mean_sd([r["metrics"]["test_task_aware"]["average_accuracy"] for r in group])
        val = _mean_sd([r["metrics"]["val"]["average_accuracy"] for r in group])
        mr = (f"{_mean_sd([r['held_out']['mr_all_classes'] for r in group])} / "
              f"{_mean_sd([r['held_out']['mr_sst2_classes'] for r in group])}")
        lines.append(
            f"| {sequence} | {name} | {len(group)} | {a_n} | {_mean_sd(forget)} | {aware} | {val} | {mr}"
            f" | {sum(r['train_seconds'] for r in group) / len(group):.0f} |")
    return lines


def plasticity(row: dict) -> tuple[float, float]:
    """Mean just-learned accuracy (task-aware diagonal R[i][i]) over the first and the second half of the tasks:
    a method that saturates learns later tasks worse than earlier ones."""
    diagonal = [r[i] for i, r in enumerate(row["matrices"]["test_task_aware"])]
    half = len(diagonal) // 2
    return sum(diagonal[:half]) / max(1, half), sum(diagonal[half:]) / max(1, len(diagonal) - half)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's claims, read off the rows (means over seeds; 'holds' only when every seed agrees)."""
    by = groups(rows)
    lines = []
    for sequence in SEQUENCE_STEPS:
        default_steps = SEQUENCE_STEPS[sequence].get("steps_per_task", 100)
        pick = {r[0]["method"]: r for (seq, _), r in by.items() if seq == sequence
                and r[0]["settings"].get("steps_per_task", 100) == default_steps}
        if "lora" in pick and "clora" in pick:
            f_lora = {r["seed"]: r["metrics"]["test"]["forgetting"] for r in pick["lora"]}
            f_clora = {r["seed"]: r["metrics"]["test"]["forgetting"] for r in pick["clora"]}
            shared = sorted(set(f_lora) & set(f_clora))
            wins = sum(f_clora[k] < f_lora[k] for k in shared)
            lines.append(f"- {sequence}, C-LoRA forgets less than LoRA: F_N "
                         f"{100 * _mean(list(f_clora.values())):.1f} vs {100 * _mean(list(f_lora.values())):.1f} "
                         f"(lower on {wins} of {len(shared)} shared seeds) — "
                         f"{'holds' if shared and wins == len(shared) else 'not reproduced'}.")
        if "stamina" in pick and "clora" in pick:
            a_st = _mean([r["metrics"]["test"]["average_accuracy"] for r in pick["stamina"]])
            a_cl = _mean([r["metrics"]["test"]["average_accuracy"] for r in pick["clora"]])
            p_st = [plasticity(r) for r in pick["stamina"]]
            p_cl = [plasticity(r) for r in pick["clora"]]
            lines.append(f"- {sequence}, STAMINA vs C-LoRA: A_N {100 * a_st:.1f} vs {100 * a_cl:.1f}; just-learned "
                         f"task-aware accuracy, first / second half of the tasks: STAMINA "
                         f"{100 * _mean([p[0] for p in p_st]):.1f} / {100 * _mean([p[1] for p in p_st]):.1f}, C-LoRA "
                         f"{100 * _mean([p[0] for p in p_cl]):.1f} / {100 * _mean([p[1] for p in p_cl]):.1f}.")
        if "joint" in pick and pick.keys() & {"lora", "clora", "stamina", "frozen"}:
            best = max((m for m in ("frozen", "lora", "clora", "stamina") if m in pick),
                       key=lambda m: _mean([r["metrics"]["test"]["average_accuracy"] for r in pick[m]]))
            a_best = _mean([r["metrics"]["test"]["average_accuracy"] for r in pick[best]])
            aware = _mean([r["metrics"]["test_task_aware"]["average_accuracy"] for r in pick[best]])
            a_joint = _mean([r["metrics"]["test"]["average_accuracy"] for r in pick["joint"]])
            lines.append(f"- {sequence}: the best rehearsal-free row is {best} (A_N {100 * a_best:.1f}); joint "
                         f"training reaches {100 * a_joint:.1f}. With the task identity given, the same {best} "
                         f"models score {100 * aware:.1f}: most of what is lost is the head's bias towards recent "
                         "classes, which no adapter method acts on.")
    short = {label(g[0]): g for (seq, _), g in by.items() if seq == "text4"}
    for method in ("lora", "clora", "stamina"):
        full = [g for name, g in short.items() if g[0]["method"] == method and "steps/task" not in name]
        half = [g for name, g in short.items() if g[0]["method"] == method and "(50 steps/task)" in name]
        if full and half:
            lines.append(f"- text4, {method} at 50 vs 100 steps per task: A_N "
                         f"{100 * _mean([r['metrics']['test']['average_accuracy'] for r in half[0]]):.1f} vs "
                         f"{100 * _mean([r['metrics']['test']['average_accuracy'] for r in full[0]]):.1f}.")
    return lines


def tuning_lines(args: argparse.Namespace) -> list[str]:
    path = args.results / "continual_tuning.json"
    if not path.is_file():
        return ["Not tuned yet (`--tune`): library defaults used."]
    data = json.loads(path.read_text())
    lines = ["Chosen on the validation A_N of text4, seed 0 (validation = the 16-shot train/dev pools, drawn from "
             "each dataset's training set; no test example):", "",
             "| method | setting | val A_N | test A_N (not used to choose) |", "|---|---|---|---|"]
    fields = {"lora": "lr", "clora": "reg_weight", "stamina": "sparsity"}
    for r in sorted(data["rows"], key=lambda r: (list(fields).index(r["method"]), r["settings"][fields[r["method"]]])):
        field = fields[r["method"]]
        lines.append(f"| {r['method']} | {field} = {r['settings'][field]:g} | "
                     f"{100 * r['metrics']['val']['average_accuracy']:.1f} | "
                     f"{100 * r['metrics']['test']['average_accuracy']:.1f} |")
    lines += ["", "Chosen: " + ", ".join(f"{k} = {v:g}" for k, v in data["chosen"].items()) + "."]
    return lines


def plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [group[0] for (_, _), group in groups(rows).items() if group[0]["method"] != "joint"
             and group[0]["settings"].get("steps_per_task", 100) == SEQUENCE_STEPS[group[0]["sequence"]].get(
                 "steps_per_task", 100)]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.2 * max(1, len(shown)), 3.4), squeeze=False)
    for ax, row in zip(axes[0], shown, strict=False):
        matrix = row["matrices"]["test"]
        n = len(matrix)
        grid = [[(matrix[i][j] if j < len(matrix[i]) else float("nan")) for j in range(n)] for i in range(n)]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{row['sequence']} {label(row)}\nA_N {100 * row['metrics']['test']['average_accuracy']:.1f}",
                     fontsize=7)
        ax.set_xlabel("task evaluated", fontsize=7)
        ax.set_ylabel("after task", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    loads = sorted({x for r in rows for x in r["load_average"]})
    lines = [
        "## Continual adapters: C-LoRA and STAMINA (adapt)", "",
        "**Claims tested** (METHODS.md sections 8-9): C-LoRA forgets less than sequential LoRA; STAMINA does not "
        "saturate where C-LoRA does over a longer sequence and needs fewer steps. Setting: rehearsal-free "
        "class-incremental text classification on the pretrained MiniLM-L6 (LoRA r = 8, α = 16 on query/key/value "
        "of all 6 layers, folded after every task; one linear head, only the current task's logits trained; "
        "prediction over every class seen so far, no task identity). `text4`: AG News (4 classes), TREC (6), Subj "
        "(2), SST-2 (2); `text11`: 11 tasks of 2-3 classes (AG News, TREC split finer; Subj, SST-2, CR; SNIPS's 7 "
        "intents). Train/test: the two seeded halves of each official test set (≤ 200 per class; text11 ≤ 100 test "
        "per class); validation: the 16-shot train/dev pools. `frozen` trains the head only; `joint` is one LoRA on "
        "all tasks at once for the same total steps (the upper bound).", "",
        *summary_table(rows), "",
        "A_N: mean accuracy over all tasks after the last; F_N: mean drop of each earlier task from its best "
        "(Chaudhry et al.); task-aware: the argmax over the task's own classes (separates forgetting in the features "
        "from the head's bias to recent classes). MR held out: 200 + 200 MR test reviews (a dataset no task trained "
        "on) read through the SST-2 classes.", "",
        "### The claims, read off these rows", "", *verdicts(rows), "",
        "### Settings chosen on validation", "", *tuning_lines(args), "",
        "![accuracy matrices](results/continual.png)", "",
        f"Load average during the runs: {loads[0] if loads else '—'}-{loads[-1] if loads else '—'} (2 cores; "
        "two runs at once, one thread each).", "",
        "Regenerate (rows cached in results/continual.json; ~75 min on 2 cores): "
        "`python benchmarks/continual.py --tune --workers 2 --threads 1 --plan " + " ".join(args.plan or []) + "`.",
    ]
    return "\n".join(lines)


def _init_worker(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def run_all(root: Path, wanted_rows: list[dict[str, Any]], results: Path, args: argparse.Namespace,
            render: bool = True) -> list[dict]:
    rows: list[dict] = json.loads(results.read_text()) if results.is_file() else []
    todo = [w for w in wanted_rows if not any(r["settings"] == w for r in rows)]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker,
                             initargs=(args.threads,)) as pool:
        jobs: dict[Future, dict] = {pool.submit(run_row, root, w): w for w in todo}
        for done in as_completed(jobs):
            row = done.result()
            rows = [r for r in rows if r["settings"] != jobs[done]] + [row]
            atomic_write_json(results, rows)
            shown = [r for r in rows if any(r["settings"] == w for w in wanted_rows)]
            if render:
                atomic_write_bytes(args.results / "continual.png", plot(shown))
                write_section(args.benchmarks_md, "continual", markdown(shown, args))
            print(json.dumps({k: row[k] for k in ("sequence", "method", "seed", "train_seconds")}
                             | {"A_N": row["metrics"]["test"]["average_accuracy"],
                                "F_N": row["metrics"]["test"]["forgetting"]}), flush=True)
    return [r for r in rows if any(r["settings"] == w for w in wanted_rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", nargs="+", default=None, help="rows SEQUENCE:METHOD[@k=v,...][:SEED]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune", action="store_true", help="run the validation grids first (lr, lambda, beta)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per row")
    parser.add_argument("--workers", type=int, default=1, help="rows trained at once, each in its own process")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root(args.data)
    args.results.mkdir(parents=True, exist_ok=True)
    results = args.results / "continual.json"
    if args.tune:
        tuning = args.results / "continual_tuning.json"
        lr_rows = run_all(root, tuning_plan(args, "lr"), results, args, render=False)
        atomic_write_json(tuning, {"chosen": {"lr": choose(lr_rows, "lora", "lr")}, "rows": lr_rows})
        rest = run_all(root, tuning_plan(args, "method"), results, args, render=False)
        chosen = {"lr": choose(lr_rows, "lora", "lr"), "reg_weight": choose(rest, "clora", "reg_weight"),
                  "sparsity": choose(rest, "stamina", "sparsity")}
        atomic_write_json(tuning, {"chosen": chosen, "rows": lr_rows + rest})
    plan = args.plan or [f"{s}:{m}" for s in SEQUENCE_STEPS for m in METHODS]
    wanted = [settings(args, *row) for text in plan for row in parse_row(text, args.seeds)]
    grid = run_all(root, wanted, results, args)
    if grid:  # the section follows the code that renders it, also when every row was cached
        atomic_write_bytes(args.results / "continual.png", plot(grid))
        write_section(args.benchmarks_md, "continual", markdown(grid, args))


if __name__ == "__main__":
    main()
