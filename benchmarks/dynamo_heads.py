"""DynaMo heads for SmolLM2-135M trained on cached stem states; exports the committed heads artifact.

    nice -n 5 python benchmarks/dynamo_heads.py --threads 2 >> /work/logs/dynamo-heads.log 2>&1   # resumable
    python benchmarks/dynamo_heads.py --export-only      # re-export artifacts/ + results/ from finished runs

Stages (each resumable, each finished stage kept under ``--runs``): build the bf16 stem cache of
``--cache-windows`` windows per source (austen:train, pydocs:train); train 3 heads (copy init) on ``--tokens``
tokens sampled from it; evaluate PPL_j and top-1 agreement on 20 x 256 held-out windows of austen:eval and
pydocs:eval; export ``artifacts/dynamo-heads-smollm2/`` (heads in bf16, evaluated as saved); then copy vs random
init at ``--compare-tokens`` each from the same cache. Writes results/dynamo_heads.json after every stage and
results/dynamo_heads.png. The committed heads become a DynaMo folder with
``leanfm.decode.training.attach_heads("artifacts/dynamo-heads-smollm2", OUT)``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.decode.dynamo import DynamoModel
from leanfm.decode.training import DynamoTrainConfig, export_heads, head_metrics, prepare_stem_cache, train_heads
from leanfm.models import load_model
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "artifacts" / "dynamo-heads-smollm2"
RESULTS = ROOT / "results" / "dynamo_heads.json"
PLOT = ROOT / "results" / "dynamo_heads.png"
COMMAND = "nice -n 5 python benchmarks/dynamo_heads.py --threads 2"
BASE = "smollm2-135m"
log = logging.getLogger("dynamo_heads")


def config_for(args: argparse.Namespace, tokens: int, init: str) -> DynamoTrainConfig:
    per_step = args.batch_size * args.seqlen
    return DynamoTrainConfig(model=BASE, heads=3, steps=math.ceil(tokens / per_step), batch_size=args.batch_size,
                             seqlen=args.seqlen, lr=args.lr, init=init, cache_windows=args.cache_windows,
                             distill=args.distill, checkpoint_every=25, device="cpu", seed=0)


def train_run(name: str, config: DynamoTrainConfig, base: Any, tokenizer: Any, runs: Path) -> tuple[DynamoModel, dict]:
    """Train (or resume, or reload when finished) run ``name``; returns the model and its summary."""
    model = DynamoModel(base, config.heads, config.init, config.seed)
    done = runs / name / "summary.json"
    if done.is_file():
        model.heads.load_state_dict(load_file(str(runs / name / "heads.safetensors")))
        return model.eval(), json.loads(done.read_text())
    checkpoint = runs / f"{name}.training"
    summary = train_heads(model, tokenizer, config, checkpoint, resume=checkpoint.is_dir())
    (runs / name).mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.heads.state_dict().items()}
    atomic_write_bytes(runs / name / "heads.safetensors", save(state))
    summary["config"] = config.to_dict()
    atomic_write_json(done, summary)
    return model.eval(), summary


def evaluate(model: DynamoModel, windows: dict[str, torch.Tensor], bf16: bool = False) -> dict[str, Any]:
    """PPL_j and agreement per held-out domain (heads rounded to bf16 first when ``bf16``: the artifact)."""
    if bf16:
        model.heads.to(torch.bfloat16).float()
    return {name: head_metrics(model, w) for name, w in windows.items()}


def curve(history: list[dict], per_step: int, every: int = 5) -> list[dict]:
    return [{"step": h["step"], "tokens": h["step"] * per_step, "losses": h["losses"],
             **({"kl": h["kl"]} if "kl" in h else {})}
            for h in history if h["step"] % every == 0 or h["step"] == len(history)]


def plot(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=110)
    for label, run in [("main (copy)", results.get("main")), *[(f"{k} init", v) for k, v in
                                                               results.get("compare", {}).items()]]:
        if not run:
            continue
        points = run["curve"]
        for j in range(len(points[0]["losses"])):
            raw = [p["losses"][j] for p in points]
            smooth = [sum(raw[max(0, i - 9): i + 1]) / len(raw[max(0, i - 9): i + 1]) for i in range(len(raw))]
            axes[0 if label.startswith("main") else 1].plot([p["tokens"] / 1e6 for p in points], smooth,
                                                            label=f"{label} head {j + 2}")
    axes[0].set(xlabel="training tokens (M)", ylabel="CE (moving mean of 10 points)",
                title="3 heads on cached SmolLM2-135M states, austen + pydocs train")
    axes[1].set(xlabel="training tokens (M)", ylabel="CE", title="copy vs random init, equal tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write(results: dict, out: Path) -> None:
    atomic_write_json(out / RESULTS.name, results)
    if results.get("main"):
        atomic_write_bytes(out / PLOT.name, plot(results))


def export(model: DynamoModel, config: DynamoTrainConfig, summary: dict, metrics: dict, folder: Path) -> None:
    manifest = {"name": ARTIFACT.name, "command": COMMAND, "steps": summary["steps"], "seed": config.seed,
                "tokens_seen": summary["tokens_seen"], "base": BASE,
                "data": f"{config.train_corpus}: {config.cache_windows} evenly spaced {config.seqlen}-token windows "
                        "per source (stem states cached in bf16); metrics on 20 x 256 windows of austen:eval and "
                        "pydocs:eval",
                "metrics": metrics, "train": config.to_dict(),
                "attach": "leanfm.decode.training.attach_heads('artifacts/dynamo-heads-smollm2', OUT)"}
    export_heads(model, folder, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=leanfm_home() / "dynamo-heads", help="run folders")
    parser.add_argument("--tokens", type=int, default=3_100_000, help="training tokens of the main run")
    parser.add_argument("--compare-tokens", type=int, default=150_000, help="tokens of each copy/random run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--distill", type=float, default=0.0)
    parser.add_argument("--cache-windows", type=int, default=1500, help="cached windows per source")
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS.parent, help="folder of the json and png")
    parser.add_argument("--artifact", type=Path, default=ARTIFACT, help="where the heads artifact goes")
    parser.add_argument("--export-only", action="store_true", help="train nothing; export finished runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base, tokenizer = load_model(BASE)
    windows = {name: token_windows(split_token_ids(tokenizer, name, "eval"), args.seqlen, args.eval_windows)
               for name in ("austen", "pydocs")}
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads((out / RESULTS.name).read_text()) if (out / RESULTS.name).is_file() else {}
    results.update({"command": COMMAND, "threads": args.threads, "base": BASE, "eval_windows": args.eval_windows})
    if "untrained_copy" not in results:
        results["untrained_copy"] = evaluate(DynamoModel(base, 3, "copy", 0).eval(), windows)
        write(results, out)
    config = config_for(args, args.tokens, "copy")
    if args.export_only and not (args.runs / "main" / "summary.json").is_file():
        raise SystemExit("the main run has not finished; run without --export-only")
    _, build = prepare_stem_cache(DynamoModel(base, 2), tokenizer, config)
    if build.get("built_tokens") or "stem_cache" not in results:
        results["stem_cache"] = build  # the session that built the cache records its speed
        write(results, out)
    tick = time.time()
    model, summary = train_run("main", config, base, tokenizer, args.runs)
    log.info("main run done in %.0f s this session", time.time() - tick)
    per_step = args.batch_size * args.seqlen
    metrics = evaluate(model, windows, bf16=True)
    results["main"] = {"config": config.to_dict(), "tokens_seen": summary["tokens_seen"],
                       "train_seconds": summary["seconds"], "train_tokens_per_second": summary["tokens_per_second"],
                       "stem_cache": summary["stem_cache"], "curve": curve(summary["history"], per_step),
                       "eval_bf16_heads": metrics}
    write(results, out)
    export(model, config, summary, metrics, args.artifact)
    log.info("exported %s: %s", ARTIFACT, json.dumps(metrics))
    if args.export_only:
        return
    results.setdefault("compare", {})
    for init in ("copy", "random"):
        small, small_summary = train_run(f"compare-{init}", config_for(args, args.compare_tokens, init), base,
                                         tokenizer, args.runs)
        results["compare"][init] = {"tokens_seen": small_summary["tokens_seen"],
                                    "curve": curve(small_summary["history"], per_step, every=1),
                                    "eval": evaluate(small, windows)}
        write(results, out)
    log.info("all stages done")


if __name__ == "__main__":
    main()
