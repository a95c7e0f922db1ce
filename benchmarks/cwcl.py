"""CWCL vs the standard contrastive (CLIP) loss, everything else identical: speech and image, zero-shot.

    python benchmarks/cwcl.py                      # ~30 min on 2 cores (synthesis cached, runs resumable)
    python benchmarks/cwcl.py --steps 20 --seeds 0 --out /tmp/cwcl    # quick look

Each run is ``leanfm align speech|image --loss L`` in a subprocess (the user's command; checkpointed, re-running
resumes or reuses it); encoders live under ``$LEANFM_HOME/bench/cwcl``. Speech: Austen sentences spoken by 30
training voices, zero-shot speech-to-intent (12 intents, 144 commands) and keyword (30 words, 90 utterances) in 3
unseen voices. Image: rendered shapes, zero-shot caption retrieval for images of the 36 held-out combinations
(180 candidate captions, and the 36 unseen ones). CWCL runs with the frozen->trainable direction weighted too
(``other=cwcl``) and, for speech, with the standard term in that direction (``other=clip``).

The analysis block measures how diverse the frozen side's similarities are (the weights w_ij = <q_i, q_j>/2 + 1/2
of random training batches): CWCL can only differ from CLIP where off-diagonal weights are far from each other.
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

from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.report.report import write_section

RUNS = {  # label -> (kind, loss, other)
    "speech clip": ("speech", "clip", "cwcl"),
    "speech cwcl": ("speech", "cwcl", "cwcl"),
    "speech cwcl (other=clip)": ("speech", "cwcl", "clip"),
    "image clip": ("image", "clip", "cwcl"),
    "image cwcl": ("image", "cwcl", "cwcl"),
}
METRICS = {"speech": ("intent_accuracy", "keyword_accuracy"),
           "image": ("heldout_accuracy_all", "heldout_accuracy_unseen")}


def run(label: str, seed: int, args: argparse.Namespace) -> dict:
    kind, loss, other = RUNS[label]
    out = args.models / f"{label.replace(' ', '-').replace('(', '').replace(')', '').replace('=', '')}-s{seed}"
    if not (out / "align.json").is_file():
        cmd = [sys.executable, "-m", "leanfm", "--threads", "2", "align", kind, "--out", str(out), "--loss", loss,
               "--other", other, "--steps", str(args.steps), "--seed", str(seed)]
        if out.with_name(out.name + ".training").is_dir():
            cmd.append("--resume")
        subprocess.run(cmd, check=True)
    meta = json.loads((out / "align.json").read_text())
    return {"label": label, "seed": seed, "kind": kind, "loss": loss, "other": other, "metrics": meta["metrics"],
            "train_seconds": meta["training"]["seconds"], "steps": meta["training"]["steps"],
            "final_loss": meta["training"]["history"][-1]["loss"], "tau": meta["training"]["history"][-1]["tau"],
            "data": meta["data"]}


def weight_diversity(kind: str, batch: int = 128, batches: int = 20) -> dict:
    """Statistics of CWCL's off-diagonal weights on random training batches of the frozen embeddings."""
    from leanfm.align import shapes, speech
    from leanfm.align.cwcl import intra_modal_weights
    from leanfm.align.pipeline import embed_texts, text_encoder

    texts = speech.austen_sentences(3000) if kind == "speech" else [
        shapes.caption(c) for c in shapes.split_combinations(0)[0]]
    q = embed_texts(text_encoder(), texts)
    generator = torch.Generator().manual_seed(0)
    off = []
    for _ in range(batches):
        rows = torch.randint(len(texts), (batch,), generator=generator)
        w = intra_modal_weights(q[rows])
        mask = ~torch.eye(batch, dtype=torch.bool)
        off.append(w[mask])
    values = torch.cat(off)
    return {"mean": float(values.mean()), "std": float(values.std()), "p05": float(values.quantile(0.05)),
            "p95": float(values.quantile(0.95)), "frac_above_0.75": float((values > 0.75).float().mean()),
            "distinct_texts": len(set(texts))}


def plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, kind in zip(axes, ("speech", "image"), strict=True):
        labels = [label for label in RUNS if RUNS[label][0] == kind]
        for offset, metric in enumerate(METRICS[kind]):
            means = [statistics.mean(r["metrics"][metric] for r in rows if r["label"] == label) for label in labels]
            ax.bar([i + 0.4 * offset for i in range(len(labels))], means, width=0.4, label=metric)
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, fontsize=7)
        ax.set(ylabel="zero-shot top-1 accuracy", title=kind)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("CWCL vs CLIP loss, aligned to frozen MiniLM (same data, steps, seeds)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def markdown(rows: list[dict], diversity: dict, args: argparse.Namespace, command: str) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "## CWCL (align)", "",
        "Claim (paper): weighting every pair by the frozen tower's own similarity (instead of CLIP's one-hot "
        "target) gains 20-30 points absolute in zero-shot speech-to-intent and keyword accuracy, 5-8 in zero-shot "
        "image classification.", "",
        f"Setting: trainable speech encoder (3 strided convs + 3-layer transformer, 128 wide) or ViT (patch 4, 3 "
        f"layers, 128 wide) "
        f"aligned to frozen all-MiniLM-L6-v2; {args.steps} steps, batch 128, AdamW 1e-3 cosine, learnable "
        f"temperature (init 0.07); seeds {seeds}; identical data, steps and seeds for both losses. Values are "
        "means over seeds (min-max in brackets when several).", "",
        "| run | metric 1 | metric 2 | final loss | train time |", "|---|---|---|---|---|",
    ]
    for label in RUNS:
        group = [r for r in rows if r["label"] == label]
        if not group:
            continue
        cells = []
        for metric in METRICS[group[0]["kind"]]:
            values = [r["metrics"][metric] for r in group]
            spread = f" [{min(values):.3f}-{max(values):.3f}]" if len(values) > 1 else ""
            cells.append(f"{metric} **{statistics.mean(values):.3f}**{spread}")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {statistics.mean(r['final_loss'] for r in group):.3f} "
                     f"| {statistics.mean(r['train_seconds'] for r in group) / 60:.1f} min |")
    lines += ["", f"Chance: intent {1 / 12:.3f}, keyword {1 / 30:.3f}, held-out captions {1 / 180:.4f} (all) / "
              f"{1 / 36:.3f} (unseen only).", ""]
    for kind, d in diversity.items():
        lines.append(f"Frozen-side weight diversity ({kind}, random batches of 128): off-diagonal w_ij mean "
                     f"{d['mean']:.3f}, std {d['std']:.3f}, 5-95% [{d['p05']:.3f}, {d['p95']:.3f}], "
                     f"{100 * d['frac_above_0.75']:.1f}% above 0.75 ({d['distinct_texts']} distinct texts).")
    if "speech" in diversity:
        d = diversity["speech"]
        share = 1 / (1 + 127 * d["mean"])
        lines += ["", f"Analysis: with w_ij = <q_i, q_j>/2 + 1/2, unrelated MiniLM sentences (cosine ~0.1) still get "
                  f"w ~ {d['mean']:.2f}, so in a batch of 128 the true pair carries only ~{100 * share:.1f}% of "
                  "CWCL's target mass: the weighted target is nearly uniform and the loss stays near log 128 "
                  "(final loss column). On the shape captions the weights are higher still. CWCL's gain needs a "
                  "frozen space whose unrelated pairs sit near cosine -1..0, or a sharper mapping of similarity to "
                  "weight. The speech encoder itself does not generalise zero-shot to unseen voices and texts at this "
                  "scale (CLIP is also near chance), so the speech comparison is not informative yet."]
    lines += ["", "![CWCL](results/cwcl.png)", "", f"Regenerate: `{command}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=Path("results/cwcl"))
    parser.add_argument("--models", type=Path, default=leanfm_home() / "bench" / "cwcl")
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for seed in args.seeds:
        for label in args.runs:
            rows.append(run(label, seed, args))
            print(json.dumps({k: rows[-1][k] for k in ("label", "seed", "metrics")}), flush=True)
    diversity = {kind: weight_diversity(kind) for kind in ("speech", "image")}
    atomic_write_json(args.out.with_suffix(".json"), {"rows": rows, "diversity": diversity,
                                                      "settings": {k: str(v) for k, v in vars(args).items()}})
    atomic_write_bytes(args.out.with_suffix(".png"), plot(rows))
    command = "python benchmarks/cwcl.py" + ("" if args.out == Path("results/cwcl") else f" --out {args.out}")
    write_section(args.benchmarks_md, "cwcl", markdown(rows, diversity, args, command))


if __name__ == "__main__":
    main()
