"""Continual text-to-image customisation: sequential LoRA vs C-LoRA vs STAMINA over 10 and 30 held-out concepts.

    nice -n 5 python benchmarks/continual_t2i.py --threads 1                 # the grid on artifacts/t2i-emoji-shapes
    python benchmarks/continual_t2i.py --plan 10:clora@token_init=word 30:stamina@steps=150
    python benchmarks/continual_t2i.py --smoke                               # a tiny random base, end to end, < 3 min

Rows are ``SEQUENCE:METHOD[@field=value,...]`` (``SEQUENCE``: the number of held-out concepts, taken in the fixed
order; fields of :class:`leanfm.adapt.t2i_continual.T2IContinualConfig`). Each row is one ``leanfm continual t2i``
run under ``--runs`` (resumable: an interrupted row continues from its checkpoint; a finished row is read back from
``results/continual_t2i.json`` when its settings match). After every row: results/continual_t2i.json, the row's
sample grid (results/continual_t2i/<row>.png: rows concepts, columns noise seeds), the fidelity-vs-concept curves
(results/continual_t2i.png) and the BENCHMARKS.md section.

The judge is the concept classifier of :mod:`leanfm.eval.t2i` trained on real renders of every pretraining concept
and the 40 held-out emoji (``--classifier``; default the one benchmarks/t2i_pretrain.py trained and committed,
``artifacts/t2i-classifier``, else its run's copy, else rebuilt with the same recipe). ``--base`` must be a
pretrained model folder; a missing one is refused in one line.

Cost (measured on the default-size U-Net with random weights, one thread, shared 2-core machine): ~1 s per
training step (batch 16, MiniLM forward/backward of the token's caption included) and ~23 s per 16 samples (25 DDIM
steps, guidance); a 10-concept row is ~1 h (3000 steps + 30 sample sets), a 30-concept row ~3 h, the default plan
~13 CPU-hours — run it where a GPU is available, or rows in parallel processes with ``--plan``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leanfm.adapt.t2i_continual import GRID_FILE, RESULT_FILE, T2IContinualConfig, train_t2i_continual
from leanfm.data.t2i import held_out_concepts, pretraining_concepts, render_concepts
from leanfm.errors import LeanfmError
from leanfm.eval.t2i import ClassifierConfig, load_classifier, save_classifier, train_classifier
from leanfm.models.t2i import T2IConfig, T2IModel, save_t2i
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import write_section
from t2i_pretrain import ARTIFACT, CLASSIFIER

REPO = Path(__file__).resolve().parents[1]
BASE = ARTIFACT  # what benchmarks/t2i_pretrain.py exports
PLAN = ("10:lora", "10:clora", "10:stamina", "10:clora@token_init=word", "30:lora", "30:clora", "30:stamina")
SMOKE_PLAN = ("2:lora", "2:clora", "2:stamina", "3:clora")
SMOKE = {"shots": 2, "steps": 3, "batch_size": 4, "warmup": 1, "samples": 4, "sample_steps": 2, "real": 4}
log = logging.getLogger("continual_t2i")


def parse_row(text: str) -> tuple[str, str, dict[str, Any]]:
    """``SEQUENCE:METHOD[@k=v,...]`` -> (concept count, method, overrides)."""
    count, _, rest = text.partition(":")
    method, _, setting = rest.partition("@")
    if not count.isdigit() or not method:
        raise SystemExit(f"bad --plan row {text}; accepted: N:METHOD[@field=value,...], e.g. 10:clora")
    overrides: dict[str, Any] = {}
    for pair in filter(None, setting.split(",")):
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return count, method, overrides


def row_name(settings: dict[str, Any]) -> str:
    extra = {k: v for k, v in settings.items() if k not in ("concepts", "method", "base", "classifier", "device")}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    label = "-".join(f"{k}={v}" for k, v in sorted(extra.items()) if k in ("token_init", "steps", "reg_weight"))
    return f"{settings['concepts']}-{settings['method']}{'-' + label if label else ''}-{tag}"


def build_classifier(folder: Path, smoke: bool) -> Path:
    """The judge: trained on real renders (seed 1) of every pretraining concept and the held-out emoji, as
    benchmarks/t2i_pretrain.py trains it (the smoke run: a tiny one on the held-out emoji only)."""
    if (folder / "classifier.json").is_file():
        return folder
    concepts = held_out_concepts() if smoke else pretraining_concepts("emoji,shapes", 200) + held_out_concepts()
    renders = render_concepts(concepts, 8 if smoke else 48, seed=1)
    config = ClassifierConfig(width=8, steps=30, batch_size=32, warmup_steps=5) if smoke else ClassifierConfig()
    classifier, summary = train_classifier(renders, [c.caption for c in concepts], config)
    save_classifier(classifier, folder, {"concepts": len(concepts), "steps": summary["steps"],
                                         "train_seconds": summary["train_seconds"], "built_by": "continual_t2i"})
    return folder


def smoke_base(folder: Path) -> Path:
    """A tiny random-init U-Net on the tiny random BERT: nothing it draws means anything, everything runs."""
    if not (folder / "t2i.json").is_file():
        torch.manual_seed(0)
        save_t2i(T2IModel(T2IConfig(width=8, heads=2, text_encoder="tiny-bert", cross_attention_dim=32)), folder)
    return folder


def run_row(settings: dict[str, Any], overrides: dict[str, Any], runs: Path) -> dict[str, Any]:
    config = T2IContinualConfig(**settings)
    out = runs / row_name(settings)
    training = out.with_name(out.name + ".training")
    tick = time.time()
    try:
        summary = train_t2i_continual(config, out, resume=training.is_dir(), overwrite=True)
    except LeanfmError as err:  # a checkpoint of other settings (older code): start that row over
        if "was trained with" not in str(err):
            raise
        summary = train_t2i_continual(config, out, resume=False, overwrite=True)
    return {"settings": settings, "overrides": overrides, "folder": str(out), "concepts": summary["concepts"],
            "metrics": summary["metrics"], "training": summary["training"],
            "train_seconds": sum(t["seconds"] for t in summary["training"]), "wall_seconds": time.time() - tick,
            "threads": torch.get_num_threads()}


def label(row: dict[str, Any]) -> str:
    """The method and the row's own overrides from the plan (``clora (token_init=word)``)."""
    extras = [f"{k}={v}" for k, v in sorted(row["overrides"].items())]
    return row["settings"]["method"] + (f" ({', '.join(extras)})" if extras else "")


def _f(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| concepts | method | recognised after → final | forgetting (recognised) | KID after → final | "
             "forgetting (KID) | MMD final | KID floor / base | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        m = row["metrics"]["mean"]
        lines.append(f"| {row['settings']['concepts']} | {label(row)} | {_f(m['after']['recognised'], 2)} → "
                     f"{_f(m['final']['recognised'], 2)} | {_f(m['forgetting']['recognised'], 2)} | "
                     f"{_f(m['after']['kid'])} → {_f(m['final']['kid'])} | {_f(m['forgetting']['kid'])} | "
                     f"{_f(m['final']['mmd'])} | {_f(m['floor']['kid'])} / {_f(m['base']['kid'])} | "
                     f"{row['train_seconds']:.0f} |")
    return lines


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The claims of METHODS.md sections 8-9, read off plain rows (default settings) of each sequence."""
    lines = []
    plain = {(r["settings"]["concepts"], r["settings"]["method"]): r["metrics"]["mean"] for r in rows
             if not r["overrides"]}
    for count in sorted({c for c, _ in plain}, key=int):
        lora, clora, stamina = (plain.get((count, m)) for m in ("lora", "clora", "stamina"))
        if lora and clora:
            less = clora["forgetting"]["recognised"] < lora["forgetting"]["recognised"]
            lines.append(f"- {count} concepts — C-LoRA forgets {'less' if less else 'not less'} than sequential LoRA "
                         f"(recognised after − final: {_f(clora['forgetting']['recognised'], 2)} vs "
                         f"{_f(lora['forgetting']['recognised'], 2)}; KID final − after: "
                         f"{_f(clora['forgetting']['kid'])} vs {_f(lora['forgetting']['kid'])}).")
        if clora and stamina:
            keeps = stamina["final"]["recognised"] > clora["final"]["recognised"]
            lines.append(f"- {count} concepts — STAMINA {'keeps more' if keeps else 'does not keep more'} fidelity "
                         f"than C-LoRA at the end (recognised {_f(stamina['final']['recognised'], 2)} vs "
                         f"{_f(clora['final']['recognised'], 2)}; KID {_f(stamina['final']['kid'])} vs "
                         f"{_f(clora['final']['kid'])}).")
    floors = [(r["metrics"]["mean"]["floor"]["kid"], r["metrics"]["mean"]["base"]["kid"]) for r in rows]
    if floors:
        tells = all(f < 0.5 * b for f, b in floors)
        lines.append(f"- The metric {'can' if tells else 'cannot clearly'} tell: KID(real, real') "
                     f"{_f(max(f for f, _ in floors))} at most vs KID(real, base samples) "
                     f"{_f(min(b for _, b in floors))} at least.")
    return lines


def plot(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["settings"]["concepts"] for r in rows}, key=int)
    fig, axes = plt.subplots(2, len(counts), figsize=(4.2 * len(counts), 6.0), squeeze=False)
    for col, count in enumerate(counts):
        for row in (r for r in rows if r["settings"]["concepts"] == count):
            per = row["metrics"]["per_concept"]
            x = list(range(1, len(per) + 1))
            for line, kind, style in ((0, "recognised", "-"), (1, "kid", "-")):
                shown = axes[line][col].plot(x, [p["final"][kind] for p in per], style, marker="o", ms=3,
                                             label=f"{label(row)} final")
                axes[line][col].plot(x, [p["after"][kind] for p in per], ":", color=shown[0].get_color(), lw=1)
        axes[0][col].set_title(f"{count} concepts (dotted: just after learning)", fontsize=8)
        axes[0][col].set_ylim(-0.02, 1.02)
        axes[0][col].set_ylabel("recognised by the classifier", fontsize=8)
        axes[1][col].set_ylabel("KID to real renders (lower: closer)", fontsize=8)
        axes[1][col].set_xlabel("concept (order learned)", fontsize=8)
        axes[0][col].legend(fontsize=6)
        for ax in axes[:, col]:
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    shared = {k: v for k, v in rows[0]["settings"].items() if k not in rows[0]["overrides"]}
    config = T2IContinualConfig(**shared)  # the settings every row shares unless its plan entry overrides them
    lines = [
        "## Continual text-to-image customisation: LoRA, C-LoRA, STAMINA (adapt)" + (" — SMOKE RUN" if args.smoke
                                                                                    else ""), "",
        "**Claims tested** (METHODS.md sections 8-9): C-LoRA forgets less than sequential LoRA; STAMINA keeps "
        "fidelity where C-LoRA saturates over a longer sequence. Setting: the small diffusion U-Net "
        f"(`{args.base}`) learns the first {' / '.join(sorted({r['settings']['concepts'] for r in rows}, key=int))} "
        "held-out emoji (never seen in pretraining) one at a time, each "
        f"from {config.shots} renders under its own token (`a picture of <cN>`), {config.steps} steps per concept; "
        f"LoRA r = {config.rank}, α = {config.alpha} on `attn2.to_k` / `attn2.to_v` (cross-attention), folded after "
        f"each concept; C-LoRA λ = {config.reg_weight:g}; STAMINA β = {config.sparsity}, MLP token "
        f"({config.token_hidden} hidden). Tokens: random input embeddings at the word embeddings' scale "
        "(`token_init=word`: from the embedding of 'object').", "",
        *table(rows), "",
        f"Judge: the concept classifier of `leanfm.eval.t2i` (`{args.classifier}`), trained on real renders of every "
        "pretraining concept and the 40 held-out emoji; KID (cubic kernel) and MMD (Gaussian, median bandwidth) on "
        f"its penultimate features, {config.samples} samples per concept against {config.real} real renders; "
        "recognised: share of samples it classifies as the concept. After: sampled right after the concept was "
        "learned; final: after the whole sequence (same noise); forgetting: after − final (recognised), final − "
        "after (KID); floor: a second set of real renders; base: the base model under the concept's real name.", "",
        "### The claims, read off these rows", "", *verdicts(rows), "",
        "![fidelity per concept](results/continual_t2i.png)", "",
        "Sample grids (rows: concepts in order; columns: noise seeds): "
        + ", ".join(f"[{r['settings']['concepts']} {label(r)}](results/continual_t2i/{row_name(r['settings'])}.png)"
                    for r in rows) + ".", "",
        "Regenerate (rows cached in results/continual_t2i.json, runs resumable): "
        f"`nice -n 5 python benchmarks/continual_t2i.py --threads 1 --plan {' '.join(args.plan)}`.",
    ]
    return "\n".join(lines)


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    atomic_write_json(args.results / "continual_t2i.json", rows)
    if rows:
        atomic_write_bytes(args.results / "continual_t2i.png", plot(rows))
        write_section(args.benchmarks_md, "continual_t2i", markdown(rows, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=BASE, help="the pretrained t2i model folder")
    parser.add_argument("--plan", nargs="+", default=None, help="rows N:METHOD[@field=value,...]")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="concept classifier folder [default: artifacts/t2i-classifier, else "
                             "$LEANFM_HOME/t2i-pretrain/classifier]")
    parser.add_argument("--runs", type=Path, default=None, help="run folders [$LEANFM_HOME/bench/continual_t2i]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random base and classifier made on the fly, tiny rows; writes under --runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = leanfm_home()
    args.runs = args.runs or home / "bench" / ("continual_t2i-smoke" if args.smoke else "continual_t2i")
    args.plan = args.plan or list(SMOKE_PLAN if args.smoke else PLAN)
    if args.smoke:  # never the repository's results: a smoke row means nothing
        args.base = smoke_base(args.runs / "base")
        args.results, args.benchmarks_md = args.runs / "results", args.runs / "BENCHMARKS.md"
    elif not (args.base / "t2i.json").is_file():
        sys.exit(f"continual_t2i: base model '{args.base}' is missing (no t2i.json); pretrain it with "
                 "benchmarks/t2i_pretrain.py, pass --base DIR, or try --smoke")
    default = (args.runs / "classifier" if args.smoke else CLASSIFIER if (CLASSIFIER / "classifier.json").is_file()
               else home / "t2i-pretrain" / "classifier")
    args.classifier = build_classifier(args.classifier or default, args.smoke)
    load_classifier(args.classifier)
    (args.results / "continual_t2i").mkdir(parents=True, exist_ok=True)
    path = args.results / "continual_t2i.json"
    cached: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
    rows: list[dict[str, Any]] = []
    for text in args.plan:
        count, method, overrides = parse_row(text)
        settings = {"base": str(args.base), "classifier": str(args.classifier), "concepts": count,
                    "method": method, "device": args.device, **(SMOKE if args.smoke else {}), **overrides}
        row = next((r for r in cached if r["settings"] == settings), None)
        if row is None:
            row = run_row(settings, overrides, args.runs)
            log.info("%s: recognised final %.3f, forgetting %.3f, %.0f s", text,
                     row["metrics"]["mean"]["final"]["recognised"], row["metrics"]["mean"]["forgetting"]["recognised"],
                     row["train_seconds"])
        cached = [r for r in cached if r["settings"] != settings] + [row]
        rows.append(row)
        grid = Path(row["folder"]) / GRID_FILE
        if grid.is_file():
            shutil.copyfile(grid, args.results / "continual_t2i" / f"{row_name(settings)}.png")
        atomic_write_json(path, cached)
        render(rows, args)
    print(json.dumps([{"row": label(r), "concepts": r["settings"]["concepts"], **r["metrics"]["mean"]["final"],
                       "forgetting": r["metrics"]["mean"]["forgetting"]["recognised"]} for r in rows]))
    assert all((Path(r["folder"]) / RESULT_FILE).is_file() for r in rows)


if __name__ == "__main__":
    main()
