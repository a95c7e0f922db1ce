"""DISP-LLM vs MoDeGPT and the baselines on SmolLM2-135M at 30% and 50%: quality in and out of domain, cost, speed.

    python benchmarks/disp.py --data ../shared/data     # ~30 min of training on 2 cores, then evaluation; resumes
    python benchmarks/disp.py --steps 20 --windows 2 --cloze 10 --out /tmp/disp   # quick look

Training runs ``leanfm compress --method disp`` in a subprocess (the user's command, checkpointed; an
interrupted run continues with ``--resume``) on the library's default training text, Austen + Python docs
``train`` splits (the same two domains MoDeGPT calibrates on, other documents); pruned models live under
``$LEANFM_HOME/bench/disp``. Each pruned model is judged exactly as ``benchmarks/modegpt.py`` judges its rows
(``lm_judge.Judge``: five kinds of text, three of them in no training or calibration mix); the dense model is
re-scored here and must reproduce that benchmark's dense row, which shows both measured the same thing. Speed:
dense vs each pruned model, prefill (8 x 512) and greedy decode (batch 1), measured alternately in this process.
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

from leanfm import load_model
from leanfm.compress.disp import MASK_NAMES, block_count, block_shape, export_masks, prune_to_masks
from leanfm.compress.engine import block_parameter_count
from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.eval.harness import count_parameters
from leanfm.eval.speed import decode_tokens_per_s, prefill_tokens_per_s
from leanfm.models import get_adapter
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import write_section
from lm_judge import HELD, Judge, default_data

MODEL = "smollm2-135m"
VARIANTS = {"disp": "reinmax", "disp-gumbel": "gumbel"}  # label -> sampler
BASELINES = ("modegpt", "flap", "slicegpt", "svd-llm")  # rows of benchmarks/modegpt.py


def train(label: str, ratio: float, args: argparse.Namespace) -> Path:
    """Run (or resume, or reuse) ``leanfm compress --method disp``; returns the pruned model's folder."""
    out = args.models / f"{label}-{ratio:.2f}"
    if (out / "compression.json").is_file():
        return out
    cmd = [sys.executable, "-m", "leanfm", "--threads", str(args.threads), "compress", MODEL, "--method", "disp",
           "--ratio", str(ratio), "--sampler", VARIANTS[label], "--steps", str(args.steps), "--out", str(out)]
    if out.with_name(out.name + ".training").is_dir():
        cmd.append("--resume")
    subprocess.run(cmd, check=True)
    return out


def evaluate_row(label: str, ratio: float, folder: str, judge: Judge, dense_params: int,
                 args: argparse.Namespace) -> dict:
    """Judge one model exactly as benchmarks/modegpt.py does (cached under ``OUT/rows``)."""
    path = args.out / "rows" / f"{label}-{ratio:.2f}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, _ = load_model(folder)
    row = {"label": label, "ratio": ratio, "params": count_parameters(model)}
    row["model_ratio"] = 1 - row["params"] / dense_params
    row.update(judge(model))
    if label != "dense":
        report = json.loads((Path(folder) / "compression.json").read_text())
        training = report["training"]
        row.update(achieved_ratio=report["achieved_ratio"], steps=training["steps"],
                   train_seconds=training["train_seconds"], tokens_seen=training["tokens_seen"],
                   compress_seconds=report["seconds"], layer_sparsity=report["layer_sparsity"],
                   history=training["history"], sampler=VARIANTS[label], calibration=report["calibration"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)
    print(json.dumps({"label": label, "ratio": ratio, **row["perplexity"]}), flush=True)
    return row


def random_masks_row(ratio: float, judge: Judge, dense_params: int, args: argparse.Namespace) -> dict:
    """DISP's structure with *random* channel choices at the same parameter budget: what the hypernetwork's
    learning is worth (the learned masks must beat it). Random logits go through DISP's own export."""
    path = args.out / "rows" / f"disp-random-{ratio:.2f}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, _ = load_model(MODEL)
    adapter = get_adapter(model)
    shapes = [block_shape(adapter, block) for block in adapter.blocks(model)]
    full = sum(int(block_count(s, s.widths)) for s in shapes)
    generator = torch.Generator().manual_seed(0)
    logits = {n: torch.randn(len(shapes), shapes[0].widths[n], generator=generator) for n in MASK_NAMES}
    before = block_parameter_count(model)
    prune_to_masks(model, export_masks(logits, shapes, (1 - ratio) * full))
    row = {"label": "disp-random", "ratio": ratio, "params": count_parameters(model),
           "achieved_ratio": 1 - block_parameter_count(model) / before}
    row["model_ratio"] = 1 - row["params"] / dense_params
    row.update(judge(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)
    print(json.dumps({"label": "disp-random", "ratio": ratio, **row["perplexity"]}), flush=True)
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

    key = "heldout" if "heldout" in dense["perplexity"] else "austen"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
    for label, group in (("disp (ReinMax)", "disp"), ("disp (Gumbel)", "disp-gumbel")):
        pts = sorted((r["ratio"], r["perplexity"][key]) for r in rows if r["label"] == group)
        axes[0].plot(*zip(*pts, strict=True), marker="o", lw=2, label=label) if pts else None
    for label in BASELINES:
        pts = sorted((r["ratio"], r["perplexity"][key]) for r in baselines if r["label"] == label)
        axes[0].plot(*zip(*pts, strict=True), marker="s", ls="--", label=label) if pts else None
    axes[0].axhline(dense["perplexity"][key], color="gray", ls=":", label="dense")
    axes[0].set(xlabel="ratio (block parameters removed)", ylabel=f"perplexity ({key})", yscale="log")
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
    fig.suptitle("SmolLM2-135M: DISP-LLM vs MoDeGPT and baselines (same judge)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def markdown(rows: list[dict], baselines: list[dict], dense: dict, speed: dict | None, command: str) -> str:
    d = dense["perplexity"]
    lines = [
        "## DISP-LLM (compress)", "",
        "Claim (paper): letting each block choose its own residual channels (learned by a hypernetwork on the "
        "frozen model) makes structural pruning as accurate as semi-structured pruning; at 50% it beats MoDeGPT "
        "(LLaMA-2 7B WikiText-2: 9.84 vs 11.88) and SliceGPT / LLM-Pruner.", "",
        "Setting: SmolLM2-135M. DISP trains on the Austen + Python docs `train` splits (batch 4 x 256 tokens, two "
        "windows from each, bfloat16 autocast, AdamW lr 1e-2, λ 16, 2 threads); the training-free methods calibrate "
        "on 32 x 512 tokens of the same two corpora's `calib` splits. All rows are judged on the same windows "
        "(`benchmarks/modegpt.py`'s judge: perplexity on Austen `eval`, Python docs `eval` and held-out text — "
        "reviews, news, questions, geometric mean — and Austen cloze); the baseline rows are that benchmark's, and "
        "the dense model re-scored in this run reproduced its row. `disp-random` = DISP's structure with random "
        "channel choices at the same budget (random logits through DISP's own export): what the learning is worth. "
        "Dense: "
        + ", ".join(f"{k} {v:.2f}" for k, v in d.items()) + f", cloze {dense.get('cloze_accuracy', 0):.2f}.", "",
        "| method | ratio | model | austen | pydocs | held-out | reviews | news | questions | cloze |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows + baselines, key=lambda r: (r["ratio"], r["label"] not in VARIANTS, r["label"])):
        p = row["perplexity"]
        cells = [f"{p[k]:.1f}" if k in p else "-" for k in ("austen", "pydocs", "heldout", *HELD)]
        lines.append(f"| {row['label']} | {row['ratio']:.1f} | {row['model_ratio']:.3f} | " + " | ".join(cells)
                     + f" | {row.get('cloze_accuracy', float('nan')):.2f} |")
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
    parser.add_argument("--data", type=Path, default=default_data(), help="16-shot data folder (held-out text)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--gumbel-ratio", type=float, default=0.0,
                        help="ratio of the Gumbel-sigmoid ablation (0: none)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--cloze", type=int, default=100)
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training subprocess")
    parser.add_argument("--out", type=Path, default=Path("results/disp"))
    parser.add_argument("--models", type=Path, default=leanfm_home() / "bench" / "disp-mix")
    parser.add_argument("--baselines", type=Path, default=Path("results/modegpt/rows"))
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    set_quiet(True)
    runs = [("disp", r) for r in args.ratios] + ([("disp-gumbel", args.gumbel_ratio)] if args.gumbel_ratio > 0 else [])
    folders = {(label, ratio): train(label, ratio, args) for label, ratio in runs}
    dense_model, tokenizer = load_model(MODEL)
    dense_params = count_parameters(dense_model)
    del dense_model
    judge = Judge(tokenizer, args)
    dense = evaluate_row("dense", 0.0, MODEL, judge, dense_params, args)
    baselines = []
    reference = args.baselines / "dense.json"
    if reference.is_file():
        ref = json.loads(reference.read_text())
        if ref["perplexity"].keys() != dense["perplexity"].keys() or any(
                abs(ref["perplexity"][k] - v) > 1e-6 * v for k, v in dense["perplexity"].items()):
            raise SystemExit(f"dense perplexities {dense['perplexity']} differ from the baseline run's "
                             f"{ref['perplexity']}; re-run benchmarks/modegpt.py with the same --data/--windows")
        cached = [json.loads(p.read_text()) for p in sorted(args.baselines.glob("*.json"))]
        baselines = [r for r in cached if r["label"] in BASELINES
                     and any(abs(r["ratio"] - ratio) < 1e-9 for ratio in args.ratios)]
    rows = [evaluate_row(label, ratio, str(folder), judge, dense_params, args)
            for (label, ratio), folder in folders.items()]
    randoms = [random_masks_row(ratio, judge, dense_params, args) for ratio in args.ratios]
    speed_path = args.out / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else None
    if speed is None and args.speed_rounds > 0:
        speed = measure_speed({f"{label}-{ratio:.1f}": f for (label, ratio), f in folders.items()
                               if label == "disp"}, args.speed_rounds)
        atomic_write_json(speed_path, speed)
    baselines += randoms
    summary = {"model": MODEL, "dense": dense, "rows": rows, "baselines": baselines, "speed": speed,
               "settings": {k: str(v) for k, v in vars(args).items()}}
    atomic_write_json(args.out.with_suffix(".json"), summary)
    atomic_write_bytes(args.out.with_suffix(".png"), plot(rows, baselines, dense))
    command = "python benchmarks/disp.py --data ../shared/data"
    write_section(args.benchmarks_md, "disp", markdown(rows, baselines, dense, speed, command))


if __name__ == "__main__":
    main()
