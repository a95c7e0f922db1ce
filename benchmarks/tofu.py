"""ToFu vs ToMe vs no reduction on a ViT trained here on Fashion-MNIST: accuracy against images/s.

    python benchmarks/tofu.py            # trains the ViT first if needed (resumable), then sweeps r

The ViT (196 patch tokens + class token) is trained by ``leanfm.vision.train`` and cached under
``$LEANFM_HOME/vision/fashion-mnist-vit``. For every r, accuracy is measured on the full 10k test set and
throughput (batch 64) alternately over the methods in rounds, medians reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanfm.data.images import fashion_mnist, to_pixel_values
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import write_section
from leanfm.vision import tofu
from leanfm.vision.bench import patch_for
from leanfm.vision.patch import expand_r, token_count, vit_layers
from leanfm.vision.train import ViTTrainConfig, accuracy_and_throughput, load_vit, read_metrics, train_vit

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # label -> (method, tofu kwargs)
    "tome": ("tome", {}),
    "tofu": ("tofu", {"merge": "mlerp"}),
    "tofu-average": ("tofu", {"merge": "average"}),
    # ours, an ablation: a pruned token's size goes to its matched partner, so proportional attention keeps its mass
    "tofu-transfer": ("tofu", {"merge": "mlerp", "size_transfer": True}),
}


RS_4_LAYERS = (8, 16, 24, 32, 36, 39)  # the 4-layer ViT's sweep: 32 to 156 of its 196 patch tokens removed in all
SCHEDULE_RS_4_LAYERS = (24, 32, 40)


def scaled_rs(rs_4_layers: tuple[int, ...], layers: int) -> list[int]:
    """The 4-layer sweep scaled to ``layers``: r * 4 / layers, rounded, so every depth removes about the same
    number of tokens in all at each point (an 8-layer ViT: 8 -> 4, 39 -> 20)."""
    return list(dict.fromkeys(max(1, round(r * 4 / layers)) for r in rs_4_layers))


def default_vit() -> Path:
    """The benchmark's ViT: 5 epochs at lr 2e-3, then 6 more from those weights at lr 1e-3.

    The committed artifact ``artifacts/vit-fmnist-e11`` when present; otherwise the missing stages are trained
    (resumable; stage 2 starts from ``artifacts/vit-fmnist-e5`` when that is committed) — the commands are in
    ``benchmarks/artifacts.py``.
    """
    artifacts = Path(__file__).resolve().parents[1] / "artifacts"
    if (artifacts / "vit-fmnist-e11" / "config.json").is_file():
        return artifacts / "vit-fmnist-e11"
    first = artifacts / "vit-fmnist-e5"
    if not (first / "config.json").is_file():
        first = leanfm_home() / "vision" / "vit-fmnist-e5"
        if not (first / "metrics.json").is_file():
            train_vit(ViTTrainConfig(), first, resume=first.with_name(first.name + ".training").is_dir())
    second = leanfm_home() / "vision" / "vit-fmnist-e11"
    if not (second / "metrics.json").is_file():
        train_vit(ViTTrainConfig(epochs=6, lr=1e-3, init_from=str(first)), second,
                  resume=second.with_name(second.name + ".training").is_dir())
    return second


@torch.no_grad()
def images_per_s(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for batch in batches:
        model(pixel_values=batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def plot(rows: list[dict], base: dict, threads: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label in [*VARIANTS, "tofu-linearity"]:
        pts = sorted((r["images_per_s"], r["accuracy"] * 100) for r in rows if r["label"] == label)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.scatter([base["images_per_s"]], [base["accuracy"] * 100], color="black", zorder=3, label="no reduction")
    ax.set(xlabel=f"images/s (batch 64, {threads} threads)", ylabel="test accuracy (%)",
           title="ViT on Fashion-MNIST: token reduction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="trained ViT folder (default: train/cache one)")
    parser.add_argument("--rs", type=int, nargs="+", default=None,
                        help=f"constant r per layer [default {list(RS_4_LAYERS)} on a 4-layer ViT, scaled by 4/depth "
                             "so a deeper ViT is swept over the same total reductions]")
    parser.add_argument("--schedule-rs", type=int, nargs="+", default=None,
                        help="mean r of ToMe's decreasing schedule (r, -1): 2r tokens off the first layer, 0 the last "
                             f"[default {list(SCHEDULE_RS_4_LAYERS)} on a 4-layer ViT, scaled likewise]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the timed forwards")
    parser.add_argument("--speed-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/tofu"))
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the section from OUT.json, no runs")
    parser.add_argument("--transfer-only", action="store_true",
                        help="only the size-transfer ablation: accuracy of tofu and tofu-transfer at every r (same "
                             "token counts, so no timing), to OUT_transfer.json and its own section")
    parser.add_argument("--transfer-splits", choices=["half", "both"], default="half",
                        help="prune splits of the ablation: half depth, or also the linearity criterion's")
    parser.add_argument("--mechanism-only", action="store_true",
                        help="add MLERP's mechanism (merge_norm_ratios) to OUT.json and rewrite its section")
    args = parser.parse_args()
    if args.render_only:
        if args.transfer_only:
            summary = json.loads(args.out.with_name(args.out.name + "_transfer.json").read_text())
            write_section(args.benchmarks_md, section(args.out) + "-transfer", transfer_markdown(summary))
        else:
            write_section(args.benchmarks_md, section(args.out),
                          markdown(json.loads(args.out.with_suffix(".json").read_text()), args))
        return
    torch.set_num_threads(args.threads)
    set_quiet(True)
    load_before = os.getloadavg()[0]
    folder = args.model or default_vit()
    trained = read_metrics(folder)
    model = load_vit(folder)
    images, labels = fashion_mnist("test")
    calib = to_pixel_values(fashion_mnist("train")[0][:64])
    args.rs = args.rs or scaled_rs(RS_4_LAYERS, len(vit_layers(model)))
    args.schedule_rs = args.schedule_rs or scaled_rs(SCHEDULE_RS_4_LAYERS, len(vit_layers(model)))
    if args.mechanism_only:
        summary = json.loads(args.out.with_suffix(".json").read_text())
        summary["mechanism"] = mechanism(model, images, max(args.rs), str(folder))
        atomic_write_json(args.out.with_suffix(".json"), summary)
        write_section(args.benchmarks_md, section(args.out), markdown(summary, args))
        return
    profile = tofu.linearity_profile(model, calib)
    split = tofu.split_by_linearity(profile)
    variants = {**VARIANTS, "tofu-linearity": ("tofu", {"merge": "mlerp", "prune_layers": split})}
    if args.transfer_only:
        splits: list[int | str] = ["half", split] if args.transfer_splits == "both" else ["half"]
        path = args.out.with_name(args.out.name + "_transfer.json")
        transfer = {"model": str(folder), "unreduced_accuracy": trained["accuracy"],
                    "rows": transfer_ablation(model, images, labels, args, splits, path, str(folder))}
        atomic_write_json(path, transfer)
        write_section(args.benchmarks_md, section(args.out) + "-transfer", transfer_markdown(transfer))
        return
    batches = [to_pixel_values(images[i * 64 : (i + 1) * 64]) for i in range(args.speed_batches)]
    base = {"label": "none", "r": 0, **accuracy_and_throughput(patch_for(model, "none"), images, labels)}
    rows = []
    sweeps: list[tuple[int | tuple[int, float], int | str]] = [  # tofu.json labels a constant r by its int
        (r, r if isinstance(r, int) else label) for r, label in sweep_points(args)]
    for r, r_label in list(sweeps):  # refuse infeasible settings before any timing (one-line reason each)
        try:
            expand_r(r, len(vit_layers(model)), token_count(model))
        except LeanfmError as error:
            print(f"skipping r={r_label}: {error}", flush=True)
            sweeps.remove((r, r_label))
    for r, r_label in sweeps:
        speeds: dict[str, list[float]] = {label: [] for label in ["none", *variants]}
        for _ in range(args.rounds):  # alternate methods within each round: same machine state for all
            for label in speeds:
                method, kwargs = ("none", {}) if label == "none" else variants[label]
                settings = {} if label == "none" else {**r_settings(r), **kwargs}
                speeds[label].append(images_per_s(patch_for(model, method, **settings), batches))
        for label, (method, kwargs) in variants.items():
            quality = accuracy_and_throughput(patch_for(model, method, **r_settings(r), **kwargs), images, labels)
            rows.append({"label": label, "r": r_label, "accuracy": quality["accuracy"],
                         "images_per_s": statistics.median(speeds[label]),
                         "speedup": statistics.median(speeds[label]) / statistics.median(speeds["none"]),
                         "tokens_per_layer": list(model._leanfm_reduction.state.tokens)})
            print(rows[-1], flush=True)
    patch_for(model, "none")
    summary = {"trained": trained, "base": base, "linearity_profile": profile, "linearity_split": split, "rows": rows,
               "threads": args.threads, "load_average": [load_before, os.getloadavg()[0]],
               "mechanism": mechanism(model, images, max(args.rs), str(folder))}
    atomic_write_json(args.out.with_suffix(".json"), summary)
    atomic_write_bytes(args.out.with_suffix(".png"), plot(rows, base, args.threads))
    write_section(args.benchmarks_md, section(args.out), markdown(summary, args))


def section(out: Path) -> str:
    """The BENCHMARKS.md section of a run: ``tofu`` for the default ``results/tofu``, else named after ``--out``
    (e.g. ``results/tofu_vit8`` -> ``tofu-vit8``), so a second model's table sits beside the first."""
    return "tofu" if out.name == "tofu" else out.name.replace("_", "-")


def sweep_points(args: argparse.Namespace) -> list[tuple[int | tuple[int, float], str]]:
    """The r settings of a run: constant r, then ToMe's decreasing schedule ``(r, -1)``."""
    return [(r, str(r)) for r in args.rs] + [((r, -1), f"{r}@-1") for r in args.schedule_rs]


def transfer_ablation(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
                      splits: list[int | str], path: Path, model_name: str) -> list[dict]:
    """ToFu with plain pruning vs pruning that hands each pruned token's size to its matched kept token, at each r
    and each split in ``splits`` (e.g. half depth, the linearity criterion's), with ToMe at the same r as the
    reference. Same token counts: accuracy alone. Rows already in ``path`` for the same model are reused (each
    is a full 10k-image pass), and ``path`` is rewritten after every row."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    rows: list[dict] = cached.get("rows", []) if cached.get("model") == model_name else []
    for r, r_label in sweep_points(args):
        settings = [("tome", None, False)] + [("tofu", s, t) for s in dict.fromkeys(splits) for t in (False, True)]
        for method, prune_layers, transfer in settings:
            key = {"r": r_label, "method": method, "prune_layers": prune_layers, "size_transfer": transfer}
            if any(all(row.get(k, "tofu" if k == "method" else None) == v for k, v in key.items()) for row in rows):
                continue
            kwargs = {} if method == "tome" else {"merge": "mlerp", "prune_layers": prune_layers,
                                                  "size_transfer": transfer}
            patched = patch_for(model, method, **r_settings(r), **kwargs)
            rows.append({**key, "accuracy": accuracy_and_throughput(patched, images, labels)["accuracy"]})
            print(rows[-1], flush=True)
            atomic_write_json(path, {**cached, "model": model_name, "rows": rows})
    patch_for(model, "none")
    return rows


def mechanism(model: torch.nn.Module, images: torch.Tensor, r: int, model_name: str, count: int = 512) -> dict:
    """The record of :func:`merge_norm_ratios` at the sweep's largest constant r, on the first ``count`` images."""
    return {"model": model_name, "r": r, "images": count, "layers": merge_norm_ratios(model, images, r, count)}


@torch.no_grad()
def merge_norm_ratios(model: torch.nn.Module, images: torch.Tensor, r: int, count: int = 512) -> list[dict]:
    """Why MLERP and averaging score alike: how much averaging shrinks the tokens it merges.

    MLERP differs from ToMe's size-weighted mean m only where ||m|| < max_i ||x_i||; it rescales m to that norm.
    For ToFu with plain averaging at constant ``r`` on the first ``count`` test images, each merging layer's mean
    over merged groups (B tokens that received at least one A token) of ||m|| / max_i ||x_i|| — 1.0 means MLERP
    changes nothing there — and the mean cosine of the matched pairs' hidden states. Recorded by wrapping the
    patch's ``reduce_tokens`` for one pass (restored after)."""
    from leanfm.vision import patch as patch_module

    original = patch_module.reduce_tokens
    stats: dict[int, list[torch.Tensor]] = {}

    def recording(x: torch.Tensor, size: torch.Tensor, matching: Any, mode: str) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        if mode == "average":
            xf = x.float()  # the statistics in float32; the pass itself goes on in the model's dtype
            a_x, b_x = xf[:, ::2], xf[:, 1::2]
            src_x = a_x.gather(1, matching.src.expand(-1, -1, xf.shape[-1]))  # [B, r, C]
            dst_x = b_x.gather(1, matching.dst.expand(-1, -1, xf.shape[-1]))  # [B, r, C]
            merged, _ = original(xf, size, matching, "average")
            reference, _ = original(xf, size, matching, "mlerp")
            tail = merged.shape[1] - b_x.shape[1]  # merged B tokens sit after the kept A tokens
            received = torch.zeros(b_x.shape[:2], dtype=torch.bool, device=x.device)  # [B, Nb]
            received = received.scatter(1, matching.dst[..., 0], True)  # B tokens that took an A token
            ratio = merged[:, tail:].norm(dim=-1) / reference[:, tail:].norm(dim=-1).clamp_min(1e-6)  # [B, Nb]
            cosine = torch.nn.functional.cosine_similarity(src_x, dst_x, dim=-1)  # [B, r]
            stats.setdefault(x.shape[1], []).extend([ratio[received], cosine.flatten()])
        return original(x, size, matching, mode)

    patch_module.reduce_tokens = recording  # type: ignore[assignment]
    try:
        patched = patch_for(model, "tofu", r=r, merge="average")
        patched(pixel_values=to_pixel_values(images[:count]))
    finally:
        patch_module.reduce_tokens = original  # type: ignore[assignment]
        patch_for(model, "none")
    layers = sorted(stats, reverse=True)  # tokens entering a layer fall with depth
    first = len(vit_layers(model)) - len(layers)  # the pruning layers come first and are not recorded
    return [{"layer": first + i, "tokens_in": n, "norm_ratio": float(stats[n][0].mean()),
             "min_norm_ratio": float(stats[n][0].min()), "pair_cosine": float(stats[n][1].mean())}
            for i, n in enumerate(layers)]


def shown(path: str) -> str:
    """A model folder as the reader's checkout names it (relative to the repository when inside it)."""
    root = str(Path(__file__).resolve().parents[1])
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def transfer_markdown(summary: dict) -> str:
    rows = [{"method": "tofu", **row} for row in summary["rows"]]  # rows of the first run name no method
    tofu_rows = [row for row in rows if row["method"] == "tofu"]
    splits = list(dict.fromkeys(row["prune_layers"] for row in tofu_rows))
    tome = {row["r"]: row["accuracy"] for row in rows if row["method"] == "tome"}
    lines = ["### Pruning with size transfer (ablation)", "",
             "ToFu prunes in its early layers: the pruned token is dropped and its size (the number of patches it "
             "stands for) with it, so proportional attention no longer counts that mass. `transfer` adds the pruned "
             "token's size to the kept token it matched (ours; the paper does not). Accuracy on the full 10k test "
             f"set, MLERP in the merging layers, ToMe at the same r beside them, `{shown(summary['model'])}`"
             + (f" ({summary['unreduced_accuracy'] * 100:.2f}% unreduced)" if "unreduced_accuracy" in summary else "")
             + "; token counts are identical, so speed is too (ToFu vs ToMe speed: the table above).", "",
             "| r | " + " | ".join(f"ToFu, prune {s} layers: plain / transfer %" for s in splits)
             + (" | ToMe % |" if tome else " |"),
             "|---|" + "---|" * (len(splits) + bool(tome))]
    gains, plain_gap, moved_gap = [], [], []
    for r in dict.fromkeys(row["r"] for row in tofu_rows):
        cells = []
        for split in splits:
            plain, moved = (next(x["accuracy"] for x in tofu_rows if x["r"] == r and x["prune_layers"] == split
                                 and x["size_transfer"] is t) for t in (False, True))
            gains.append((moved - plain) * 100)
            if r in tome:
                plain_gap.append((plain - tome[r]) * 100)
                moved_gap.append((moved - tome[r]) * 100)
            cells.append(f"{plain * 100:.2f} / {moved * 100:.2f}")
        lines.append(f"| {r} | " + " | ".join(cells) + (f" | {tome[r] * 100:.2f} |" if r in tome else " |"))
    lines += ["", f"- Transfer minus plain pruning: median {statistics.median(gains):+.2f} points over {len(gains)} "
              f"settings (range {min(gains):+.2f} to {max(gains):+.2f})."]
    if plain_gap:
        lines += [f"- ToFu minus ToMe at the same r: plain pruning median {statistics.median(plain_gap):+.2f} points, "
                  f"with size transfer {statistics.median(moved_gap):+.2f} ({len(plain_gap)} settings)."]
    lines += ["", "Regenerate: `python benchmarks/tofu.py --transfer-only --threads 1`"]
    return "\n".join(lines)


def best_within(rows: list[dict], label: str, base_accuracy: float, loss_points: float = 1.0) -> dict | None:
    """The fastest row of ``label`` whose accuracy is within ``loss_points`` of the unreduced model."""
    ok = [r for r in rows if r["label"] == label and (base_accuracy - r["accuracy"]) * 100 <= loss_points]
    return max(ok, key=lambda r: r["speedup"], default=None)


def r_settings(r: int | tuple[int, float]) -> dict:
    """A sweep point as config settings: a constant r, or ToMe's (r, inflect) schedule."""
    return {"r": r[0], "r_inflect": r[1]} if isinstance(r, tuple) else {"r": r}


def matched_speed_gap(rows: list[dict], label: str, reference: str = "tome") -> list[float]:
    """Accuracy of ``label`` minus ``reference`` (points) at ``label``'s speed-ups, reference interpolated."""
    ref = sorted((r["speedup"], r["accuracy"]) for r in rows if r["label"] == reference)
    xs, ys = [x for x, _ in ref], [y for _, y in ref]
    gaps = [(row["accuracy"] - float(np.interp(row["speedup"], xs, ys))) * 100 for row in rows
            if row["label"] == label and xs[0] <= row["speedup"] <= xs[-1]]
    return gaps


def markdown(summary: dict, args: argparse.Namespace) -> str:
    base, trained = summary["base"], summary["trained"]
    cfg = trained["config"]
    history = trained.get("stages") or [{"steps": trained["steps"], "train_seconds": trained["train_seconds"],
                                         "epochs": cfg["epochs"], "lr": cfg["lr"], "accuracy": base["accuracy"]}]
    stages = ", then ".join(f"{h['epochs']} epochs at peak lr {h['lr']:g} ({h['accuracy'] * 100:.1f}%)"
                            for h in history)
    minutes = sum(h["train_seconds"] for h in history) / 60
    labels = [label for label in [*VARIANTS, "tofu-linearity"] if any(r["label"] == label for r in summary["rows"])]
    load = summary.get("load_average")
    lines = [
        "## ToFu (accelerate)" if section(args.out) == "tofu" else f"### ToFu on `{shown(str(args.model))}`", "",
        "Claim (paper): ToFu's accuracy >= ToMe's at equal speed; >= 1.6x images/s at <= 1 point accuracy loss "
        "(off the shelf, no retraining).", "",
        f"Setting: a transformers ViT ({cfg['layers']} layers, width {cfg['hidden_size']}, MLP {cfg['mlp']}, "
        f"patch {cfg['patch_size']} -> {(28 // cfg['patch_size']) ** 2} tokens + class token) trained here on "
        f"Fashion-MNIST for {stages} ({minutes:.0f} min of training on this CPU): "
        f"test accuracy **{base['accuracy'] * 100:.2f}%** at "
        f"{base['images_per_s']:.0f} images/s. r = tokens removed per layer; `r@-1` is ToMe's decreasing schedule "
        "(2r in the first layer down to 0 in the last, mean r). Accuracy on the full 10k test set; throughput: "
        f"batch 64, {summary.get('threads', 2)} threads, methods alternated in {args.rounds} rounds, medians"
        + (f" (load average {load[0]:.1f} before, {load[1]:.1f} after)" if load else "")
        + "; speed-up vs no reduction in the same rounds. ToFu split (prune in the first layers, MLERP later): "
        "`tofu` uses half depth; "
        "`tofu-linearity` uses the paper's criterion (layer nonlinearity on interpolated calibration inputs: "
        f"{', '.join(f'{e:.3f}' for e in summary['linearity_profile'])} -> prune the first "
        f"{summary['linearity_split']} layers); `tofu-average` is the ablation with plain averaging"
        + ("; `tofu-transfer` (ours, an ablation) prunes as `tofu` but adds each pruned token's size to its matched "
           "kept token, so proportional attention keeps the pruned mass." if "tofu-transfer" in labels else "."), "",
        "| r | " + " | ".join(f"{v} acc % / speed-up" for v in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for r in list(dict.fromkeys(row["r"] for row in summary["rows"])):
        cells = []
        for label in labels:
            row = next(x for x in summary["rows"] if x["r"] == r and x["label"] == label)
            cells.append(f"{row['accuracy'] * 100:.2f} / {row['speedup']:.2f}x")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    rows = summary["rows"]
    reading = []
    for label in labels[1:]:
        gaps = matched_speed_gap(rows, label)
        if gaps:
            reading.append(f"`{label}` minus ToMe at matched speed (ToMe interpolated): median "
                           f"{statistics.median(gaps):+.2f} points over {len(gaps)} points "
                           f"(range {min(gaps):+.2f} to {max(gaps):+.2f}).")
    pairs = [(a["accuracy"] - b["accuracy"]) * 100 for a in rows if a["label"] == "tofu"
             for b in rows if b["label"] == "tofu-average" and b["r"] == a["r"]]
    if pairs:
        reading.append(f"MLERP minus plain averaging (ToFu, same r): {min(pairs):+.2f} to {max(pairs):+.2f} points.")
    moved = [(a["accuracy"] - b["accuracy"]) * 100 for a in rows if a["label"] == "tofu-transfer"
             for b in rows if b["label"] == "tofu" and b["r"] == a["r"]]
    if moved:
        reading.append("Pruning with size transfer minus plain pruning (same r): median "
                       f"{statistics.median(moved):+.2f} points (range {min(moved):+.2f} to {max(moved):+.2f}).")
    if "mechanism" in summary:
        found = summary["mechanism"]
        reading.append(
            f"Why MLERP and averaging score alike (ToFu with averaging at r={found['r']}, first {found['images']} "
            "test images): the size-weighted mean of a merged group keeps, on average, "
            + ", ".join(f"{m['norm_ratio'] * 100:.1f}%" for m in found["layers"])
            + " of the group's largest norm in merging layers "
            + ", ".join(str(m["layer"]) for m in found["layers"])
            + " (lowest single group: " + ", ".join(f"{m['min_norm_ratio'] * 100:.0f}%" for m in found["layers"])
            + "; mean cosine of the matched pairs' hidden states: "
            + ", ".join(f"{m['pair_cosine']:.2f}" for m in found["layers"])
            + "). MLERP rescales the mean to that largest norm, so it can only differ where the mean shrinks.")
    for label in labels:
        best = best_within(rows, label, base["accuracy"])
        reading.append(f"`{label}`: fastest setting within 1 point of the unreduced model: " + (
            f"r={best['r']}, {best['speedup']:.2f}x at {best['accuracy'] * 100:.2f}%." if best else "none."))
    lines += ["", "Reading (computed from the rows above):", *[f"- {line}" for line in reading],
              "", f"![ToFu vs ToMe]({args.out.with_suffix('.png')})", "", "Regenerate: `python benchmarks/tofu.py"
              + ("`" if section(args.out) == "tofu" else f" --model {shown(str(args.model))} --out {args.out}`")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
