"""DISP-LLM vs MoDeGPT and the baselines on SmolLM2-135M at 30% and 50%: quality, training cost and speed.

    python benchmarks/disp.py                       # ~45 min of training on 2 cores, then evaluation; resumes
    python benchmarks/disp.py --steps 20 --windows 4 --cloze 10 --out /tmp/disp   # quick look

Training runs ``leanfm compress --method disp`` in a subprocess (the user's command, checkpointed; an
interrupted run continues with ``--resume``); pruned models live under ``$LEANFM_HOME/bench/disp``. Each pruned
model is evaluated with the same harness and settings as ``benchmarks/modegpt.py`` (Austen eval split, 20 x 512
perplexity windows, 100 cloze items). The MoDeGPT / wanda-sp / svd-llm rows are that benchmark's cached rows;
the dense model is re-evaluated here and must reproduce its dense row exactly, which shows both runs measured
the same thing. Speed: dense vs each pruned model, prefill (8 x 512) and greedy decode (batch 1), measured
alternately in this process.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from leanfm import evaluate, load_model
from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.eval.speed import decode_tokens_per_s, prefill_tokens_per_s
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import write_section

MODEL = "smollm2-135m"
VARIANTS = {"disp": "reinmax", "disp-gumbel": "gumbel"}  # label -> sampler
BASELINES = ("modegpt", "wanda-sp", "svd-llm")  # rows of benchmarks/modegpt.py


def train(label: str, ratio: float, args: argparse.Namespace) -> Path:
    """Run (or resume, or reuse) ``leanfm compress --method disp``; returns the pruned model's folder."""
    out = args.models / f"{label}-{ratio:.2f}"
    if (out / "compression.json").is_file():
        return out
    cmd = [sys.executable, "-m", "leanfm", "--threads", "2", "compress", MODEL, "--method", "disp", "--ratio",
           str(ratio), "--sampler", VARIANTS[label], "--steps", str(args.steps), "--out", str(out)]
    if out.with_name(out.name + ".training").is_dir():
        cmd.append("--resume")
    subprocess.run(cmd, check=True)
    return out


def evaluate_row(label: str, ratio: float, folder: str, args: argparse.Namespace) -> dict:
    """Evaluate one model with the shared harness settings (cached under ``OUT/rows``)."""
    path = args.out / "rows" / f"{label}-{ratio:.2f}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_model(folder)
    result = evaluate(model, tokenizer, name=label, seqlen=512, windows=args.windows, cloze=args.cloze, speed=False)
    row = {"label": label, "ratio": ratio, "params": result.params, "perplexity": result.perplexity,
           "cloze_accuracy": result.cloze_accuracy, "windows": result.windows, "tokens": result.tokens}
    if label != "dense":
        report = json.loads((Path(folder) / "compression.json").read_text())
        training = report["training"]
        row.update(achieved_ratio=report["achieved_ratio"], steps=training["steps"],
                   train_seconds=training["train_seconds"], tokens_seen=training["tokens_seen"],
                   compress_seconds=report["seconds"], layer_sparsity=report["layer_sparsity"],
                   history=training["history"], sampler=VARIANTS[label])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)
    print(json.dumps({k: row[k] for k in ("label", "ratio", "perplexity", "cloze_accuracy")}), flush=True)
    return row


def measure_speed(folders: dict[str, Path], rounds: int) -> dict:
    """Prefill and decode tokens/s of dense and each pruned model, alternating, medians of ``rounds``."""
    models = {"dense": load_model(MODEL)[0]} | {label: load_model(str(f))[0] for label, f in folders.items()}
    _, tokenizer = load_model(MODEL)
    windows = token_windows(split_token_ids(tokenizer, "austen", "eval"), 512, 8)
    samples: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for _ in range(rounds):
        for label, model in models.items():
            samples[label]["prefill"].append(prefill_tokens_per_s(model, windows, repeats=1))
            samples[label]["decode"].append(decode_tokens_per_s(model, windows[:1, :32], new_tokens=32, repeats=1))
    median = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in samples.items()}
    speedup = {k: {m: median[k][m] / median["dense"][m] for m in ("prefill", "decode")} for k in folders}
    return {"rounds": rounds, "threads": torch.get_num_threads(), "samples": samples, "median": median,
            "speedup": speedup}


def plot(rows: list[dict], baselines: list[dict], dense: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
    for label, group in (("disp (ReinMax)", "disp"), ("disp (Gumbel)", "disp-gumbel")):
        pts = sorted((r["ratio"], r["perplexity"]) for r in rows if r["label"] == group)
        axes[0].plot(*zip(*pts, strict=True), marker="o", lw=2, label=label) if pts else None
    for label in BASELINES:
        pts = sorted((r["ratio"], r["perplexity"]) for r in baselines if r["label"] == label)
        axes[0].plot(*zip(*pts, strict=True), marker="s", ls="--", label=label) if pts else None
    axes[0].axhline(dense["perplexity"], color="gray", ls=":", label="dense")
    axes[0].set(xlabel="ratio (block parameters removed)", ylabel="perplexity (Austen eval)", yscale="log")
    for row in rows:
        steps = [h["step"] for h in row["history"]]
        name = f"{row['label']} {row['ratio']:.1f}"
        axes[1].plot(steps, [h["ce"] for h in row["history"]], alpha=0.8, label=name)
        axes[2].plot(steps, [h["ratio"] for h in row["history"]], label=name)
    axes[1].set(xlabel="training step", ylabel="masked-model cross-entropy (sampled masks)")
    axes[2].set(xlabel="training step", ylabel="ratio implied by the sampled masks")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: DISP-LLM vs MoDeGPT and baselines (same harness)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def markdown(rows: list[dict], baselines: list[dict], dense: dict, speed: dict | None, command: str) -> str:
    ratios = sorted({r["ratio"] for r in rows})
    labels = [v for v in VARIANTS if any(r["label"] == v for r in rows)] + list(BASELINES)
    everything = rows + baselines
    lines = [
        "## DISP-LLM (compress)", "",
        "Claim (paper): letting each block choose its own residual channels (learned by a hypernetwork on the "
        "frozen model) makes structural pruning as accurate as semi-structured pruning; at 50% it beats MoDeGPT "
        "(LLaMA-2 7B WikiText-2: 9.84 vs 11.88) and SliceGPT / LLM-Pruner.", "",
        f"Setting: SmolLM2-135M, evaluation on the Austen `eval` split ({dense['windows']} x 512 windows, "
        f"cloze on {dense.get('cloze_items', 100)} items), dense perplexity **{dense['perplexity']:.2f}**, cloze "
        f"**{dense['cloze_accuracy']:.2f}**. DISP trains on the `train` split (batch 4 x 256 tokens, bfloat16 "
        "autocast, AdamW lr 1e-2, λ 16, 2 threads); MoDeGPT / wanda-sp / svd-llm calibrate on 32 x 512 tokens of "
        "the `calib` split without training. Baseline rows are `benchmarks/modegpt.py`'s; the dense model "
        "re-evaluated in this run reproduced its row exactly.", "",
        "| ratio | " + " | ".join(f"{v} ppl / cloze" for v in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for ratio in ratios:
        cells = []
        for label in labels:
            row = next((r for r in everything if r["label"] == label and abs(r["ratio"] - ratio) < 1e-9), None)
            cells.append(f"{row['perplexity']:.1f} / {row['cloze_accuracy']:.2f}" if row else "-")
        lines.append(f"| {ratio:.1f} | " + " | ".join(cells) + " |")
    if not any(r["label"] == "disp-gumbel" for r in rows):
        lines += ["", "The Gumbel-sigmoid sampler (the official code's) was not compared in this run "
                  "(`--gumbel-ratio 0`); ReinMax (the paper's) is the default."]
    lines += ["", "| run | steps | tokens seen | training wall time | achieved ratio |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} {row['ratio']:.1f} | {row['steps']} | {row['tokens_seen']:,} | "
                     f"{row['train_seconds'] / 60:.1f} min | {row['achieved_ratio']:.3f} |")
    if speed:
        lines += ["", f"Speed, {speed['rounds']} alternating rounds, {speed['threads']} threads, medians "
                  "(prefill 8 x 512 / greedy decode batch 1, tokens/s): dense "
                  f"{speed['median']['dense']['prefill']:.0f} / {speed['median']['dense']['decode']:.1f}"]
        for label, up in speed["speedup"].items():
            med = speed["median"][label]
            lines[-1] += (f"; {label} {med['prefill']:.0f} / {med['decode']:.1f} "
                          f"(**{up['prefill']:.2f}x / {up['decode']:.2f}x**)")
        lines[-1] += "."
    lines += ["", "![DISP-LLM](results/disp.png)", "", f"Regenerate: `{command}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--gumbel-ratio", type=float, default=0.5,
                        help="ratio of the Gumbel-sigmoid ablation (0: none)")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--cloze", type=int, default=100)
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/disp"))
    parser.add_argument("--models", type=Path, default=leanfm_home() / "bench" / "disp")
    parser.add_argument("--baselines", type=Path, default=Path("results/modegpt/rows"))
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    set_quiet(True)
    runs = [("disp", r) for r in args.ratios] + ([("disp-gumbel", args.gumbel_ratio)] if args.gumbel_ratio > 0 else [])
    folders = {(label, ratio): train(label, ratio, args) for label, ratio in runs}
    dense = evaluate_row("dense", 0.0, MODEL, args)
    dense["cloze_items"] = args.cloze
    baselines = []
    reference = args.baselines / "dense-0.00.json"
    if reference.is_file():
        ref = json.loads(reference.read_text())
        if (ref["windows"], ref["tokens"]) == (dense["windows"], dense["tokens"]):
            if abs(ref["perplexity"] - dense["perplexity"]) > 1e-6 * dense["perplexity"]:
                raise SystemExit(f"dense perplexity {dense['perplexity']} differs from the baseline run's "
                                 f"{ref['perplexity']}; re-run benchmarks/modegpt.py before comparing")
            cached = [json.loads(p.read_text()) for p in sorted(args.baselines.glob("*.json"))]
            baselines = [r for r in cached if r["label"] in BASELINES
                         and any(abs(r["ratio"] - ratio) < 1e-9 for ratio in args.ratios)]
    rows = [evaluate_row(label, ratio, str(folder), args) for (label, ratio), folder in folders.items()]
    speed_path = args.out / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else None
    if speed is None and args.speed_rounds > 0:
        speed = measure_speed({f"{label}-{ratio:.1f}": f for (label, ratio), f in folders.items()
                               if label == "disp"}, args.speed_rounds)
        atomic_write_json(speed_path, speed)
    summary = {"model": MODEL, "dense": dense, "rows": rows, "baselines": baselines, "speed": speed,
               "settings": {k: str(v) for k, v in vars(args).items()}}
    atomic_write_json(args.out.with_suffix(".json"), summary)
    atomic_write_bytes(args.out.with_suffix(".png"), plot(rows, baselines, dense))
    command = "python benchmarks/disp.py" + ("" if args.out == Path("results/disp") else f" --out {args.out}")
    write_section(args.benchmarks_md, "disp", markdown(rows, baselines, dense, speed, command))


if __name__ == "__main__":
    main()
