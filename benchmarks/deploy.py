"""Run where users run (issue 22): SmolLM2 dense and compressed, in llama.cpp at bf16 / q8_0 / q4_0 / q4_1.

    python benchmarks/deploy.py                       # ~35 min on a quiet 2-core machine
    python benchmarks/deploy.py --ratios 0.3 --quants q4_0 --windows 4 --out /tmp/deploy   # a smoke run

Models: SmolLM2-135M dense and ``modegpt-heads`` (MoDeGPT type I + whole heads, the llama.cpp-compatible variant)
at each ``--ratios`` (compressed once under ``$LEANFM_HOME/bench/deploy``, reused; default calibration). Each is
exported with ``leanfm.compress.gguf.export_gguf`` at every ``--quants`` (llama.cpp's own quantizer for the
4/8-bit types) and measured through llama-cpp-python: perplexity on ``--windows`` x ``--seqlen`` windows of the
Austen and Python-docs eval splits (the windows of ``leanfm eval``), prefill tokens/s of one window (logits of
the last position only), greedy decode tokens/s of ``--decode`` tokens after a 32-token prompt at batch 1 (the
prompt's prefill subtracted; medians of 3), file size. Threads: ``--threads`` for llama.cpp and torch.

Rows come from the functions in :data:`ROWS` (each ``fn(context) -> list of row dicts`` with the keys of
:data:`ROW_KEYS`); the PyTorch rows (our fast decode path) are added there by appending a function.
Writes ``<out>.json``, ``<out>.png`` (perplexity vs decode tokens/s) and the ``deploy`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leanfm.compress import compress_model, save_compressed
from leanfm.compress.gguf import export_gguf
from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.eval.harness import versions
from leanfm.eval.llamacpp import (
    gguf_decode_tokens_per_s,
    gguf_parameters,
    gguf_perplexity,
    gguf_prefill_tokens_per_s,
)
from leanfm.models import load_model
from leanfm.models.registry import smollm2_tokenizer
from leanfm.models.smollm2 import ensure_checkpoint
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import write_section

METHOD = "modegpt-heads"
CORPORA = ("austen", "pydocs")
ROW_KEYS = ("model", "runtime", "weights", "params", "file_mb", "ppl_austen", "ppl_pydocs", "prefill_tok_s",
            "decode_tok_s")


@dataclass
class Context:
    """What every row function gets: the settings, the models (label -> folder) and the eval windows."""

    args: argparse.Namespace
    folders: dict[str, Path]
    windows: dict[str, torch.Tensor]
    cost: dict[str, float] = field(default_factory=dict)  # compression seconds per label


def compressed_folder(ratio: float, tokenizer: Any) -> tuple[Path, float]:
    """SmolLM2 compressed with ``modegpt-heads`` at ``ratio`` (cached); returns the folder and the seconds it took
    (0 when cached)."""
    out = leanfm_home() / "bench" / "deploy" / f"{METHOD}-{ratio}"
    if (out / "config.json").is_file():
        return out, 0.0
    model, _ = load_model("smollm2-135m")
    start = time.perf_counter()
    report = compress_model(model, tokenizer, method=METHOD, ratio=ratio)
    save_compressed(model, tokenizer, out, report, overwrite=True)
    return out, time.perf_counter() - start


def gguf_file(ctx: Context, label: str, quant: str) -> tuple[Path, float]:
    """The GGUF of model ``label`` at ``quant`` (cached beside the folders); returns its path and export seconds."""
    path = leanfm_home() / "bench" / "deploy" / "gguf" / f"{label}.{quant}.gguf"
    if path.is_file():
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, float(export_gguf(ctx.folders[label], path, quant=quant, threads=ctx.args.threads)["seconds"])


def llama_cpp_rows(ctx: Context) -> list[dict[str, Any]]:
    """One row per (model, quant) through llama-cpp-python."""
    rows = []
    threads = ctx.args.threads
    for label in ctx.folders:
        for quant in ctx.args.quants:
            path, export_seconds = gguf_file(ctx, label, quant)
            ppl = {c: gguf_perplexity(path, w, threads=threads).perplexity for c, w in ctx.windows.items()}
            window = ctx.windows["austen"][0]
            row = {"model": label, "runtime": "llama.cpp", "weights": quant, "params": gguf_parameters(path)[0],
                   "file_mb": path.stat().st_size / 2**20, **{f"ppl_{c}": v for c, v in ppl.items()},
                   "prefill_tok_s": gguf_prefill_tokens_per_s(path, window, threads=threads),
                   "decode_tok_s": gguf_decode_tokens_per_s(path, window[:32], ctx.args.decode, threads=threads),
                   "export_seconds": export_seconds, "load": os.getloadavg()[0]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# the lead appends the PyTorch fast-path rows here: fn(ctx) -> rows with ROW_KEYS (runtime "pytorch", weights dtype)
ROWS: list[Callable[[Context], list[dict[str, Any]]]] = [llama_cpp_rows]


def plot(rows: list[dict[str, Any]]) -> bytes:
    """Austen perplexity vs decode tokens/s, one marker per weight type, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"bf16": "o", "q8_0": "s", "q4_0": "^", "q4_1": "v", "float32": "D", "bfloat16": "P"}
    colours: dict[str, str] = {}
    for row in rows:
        colour = colours.setdefault(row["model"], f"C{len(colours)}")
        ax.scatter(row["decode_tok_s"], row["ppl_austen"], color=colour, marker=markers.get(row["weights"], "x"),
                   facecolors="none" if row["runtime"] != "llama.cpp" else colour)
    for label, colour in colours.items():
        ax.scatter([], [], color=colour, label=label)
    for weights, marker in markers.items():
        if any(r["weights"] == weights for r in rows):
            ax.scatter([], [], color="grey", marker=marker, label=weights)
    ax.set_xlabel("decode tokens/s (batch 1, greedy)")
    ax.set_ylabel("perplexity, Austen eval")
    ax.set_title("SmolLM2-135M: quality vs speed (llama.cpp)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def markdown(result: dict[str, Any], command: str) -> str:
    s = result["settings"]
    lines = ["## Run where users run: llama.cpp (issue 22)", "",
             f"SmolLM2-135M dense and `{METHOD}` (ours: MoDeGPT type I + whole heads) exported with "
             "`leanfm export --gguf`, quantized by llama.cpp, measured through llama-cpp-python "
             f"{result.get('llama_cpp_version', '?')}: perplexity on {s['windows']} x {s['seqlen']} eval windows "
             f"(those of `leanfm eval`), prefill of one {s['seqlen']}-token window, greedy decode of {s['decode']} "
             f"tokens after 32 at batch 1, {s['threads']} threads, load {result['load'][0]:.1f} -> "
             f"{result['load'][1]:.1f}.", "",
             "| model | runtime | weights | params | file MB | PPL Austen | PPL pydocs | prefill tok/s "
             "| decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['weights']} | {r['params']:,} | {r['file_mb']:.1f} | "
                     f"{r['ppl_austen']:.2f} | {r['ppl_pydocs']:.2f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} |")
    lines += ["", "![perplexity vs decode speed](results/deploy.png)", "", f"Regenerate: `{command}`"]
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--quants", nargs="+", default=["bf16", "q8_0", "q4_0", "q4_1"])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/deploy"))
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    load_before = os.getloadavg()[0]
    tokenizer = smollm2_tokenizer()
    folders, cost = {"dense": ensure_checkpoint()}, {}
    for ratio in args.ratios:
        folders[f"{METHOD}-{ratio}"], cost[f"{METHOD}-{ratio}"] = compressed_folder(ratio, tokenizer)
    windows = {c: token_windows(split_token_ids(tokenizer, c, "eval"), args.seqlen, args.windows) for c in CORPORA}
    ctx = Context(args, folders, windows, cost)
    rows = [row for fn in ROWS for row in fn(ctx)]
    import llama_cpp

    result = {"rows": rows, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "compression_seconds": cost, "load": [load_before, os.getloadavg()[0]],
              "llama_cpp_version": llama_cpp.__version__, **versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_bytes(args.out.with_suffix(".png"), plot(rows))
    command = "python benchmarks/deploy.py" + ("" if args.out == Path("results/deploy") else f" --out {args.out}")
    write_section(args.benchmarks_md, "deploy", markdown(result, command))


if __name__ == "__main__":
    main()
