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
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leanfm.compress import compress_model, save_compressed
from leanfm.compress.gguf import export_gguf
from leanfm.compress.modegpt_heads import ModegptHeadsConfig
from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.errors import LeanfmError
from leanfm.eval.harness import count_parameters, versions
from leanfm.eval.llamacpp import alternating_speeds, gguf_parameters, gguf_perplexity
from leanfm.eval.perplexity import perplexity
from leanfm.eval.speed import prefill_tokens_per_s, pytorch_rows
from leanfm.models import load_model
from leanfm.models.registry import smollm2_tokenizer
from leanfm.models.smollm2 import ensure_checkpoint
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import write_section

METHOD = "modegpt-heads"
DEFAULT_MU = ModegptHeadsConfig(ratio=0.3).solve_ridge
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
    pytorch_only: dict[str, Path] = field(default_factory=dict)  # models llama.cpp cannot run (full MoDeGPT)
    pytorch: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # every pytorch_rows row, per label


def compressed_folder(ratio: float, tokenizer: Any, method: str = METHOD,
                      solve_ridge: float | None = None) -> tuple[Path, float]:
    """SmolLM2 compressed with ``method`` at ``ratio`` (cached under ``$LEANFM_HOME/bench/deploy``; for
    ``modegpt-heads`` the folder name carries ``solve_ridge``, the method's default when None); returns the folder
    and the seconds the compression took (0 when cached)."""
    settings: dict[str, Any] = {"ratio": ratio}
    name = f"{method}-{ratio}"
    if method == METHOD:
        settings["solve_ridge"] = DEFAULT_MU if solve_ridge is None else solve_ridge
        name += f"-mu{settings['solve_ridge']:g}"
    out = leanfm_home() / "bench" / "deploy" / name
    if (out / "config.json").is_file():
        return out, 0.0
    model, _ = load_model("smollm2-135m")
    start = time.perf_counter()
    report = compress_model(model, tokenizer, method=method, **settings)
    save_compressed(model, tokenizer, out, report, overwrite=True)
    return out, time.perf_counter() - start


def gguf_file(folder: Path, quant: str, threads: int) -> tuple[Path, float]:
    """The GGUF of the model in ``folder`` at ``quant`` (cached beside the folders); returns its path and the export
    seconds (0 when cached)."""
    path = leanfm_home() / "bench" / "deploy" / "gguf" / f"{folder.name}.{quant}.gguf"
    if path.is_file():
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, float(export_gguf(folder, path, quant=quant, threads=threads)["seconds"])


def llama_cpp_rows(ctx: Context) -> list[dict[str, Any]]:
    """One row per (model, quant) through llama-cpp-python: perplexity file by file, then every file's speed in
    alternating rounds in this process (:func:`leanfm.eval.llamacpp.alternating_speeds`); ``decode_vs_dense`` is
    the median over rounds of the decode ratio to dense at the same weight type, measured in the same round."""
    threads, rows = ctx.args.threads, {}
    paths = {}
    for label in ctx.folders:
        for quant in ctx.args.quants:
            path, export_seconds = gguf_file(ctx.folders[label], quant, threads)
            paths[f"{label} {quant}"] = path
            ppl = {c: gguf_perplexity(path, w, threads=threads).perplexity for c, w in ctx.windows.items()}
            rows[f"{label} {quant}"] = {
                "model": label, "runtime": "llama.cpp", "weights": quant, "params": gguf_parameters(path)[0],
                "file_mb": path.stat().st_size / 2**20, **{f"ppl_{c}": v for c, v in ppl.items()},
                "export_seconds": export_seconds}
            print(json.dumps(rows[f"{label} {quant}"]), flush=True)
    window = ctx.windows["austen"][0]
    load = os.getloadavg()[0]
    speeds = alternating_speeds(paths, window[:32], window, ctx.args.decode, ctx.args.rounds, threads)
    for key, row in rows.items():
        dense = speeds[f"dense {row['weights']}"]
        row.update({"decode_tok_s": statistics.median(d for d, _ in speeds[key]),
                    "prefill_tok_s": statistics.median(p for _, p in speeds[key]),
                    "decode_vs_dense": statistics.median(d / base for (d, _), (base, _) in
                                                         zip(speeds[key], dense, strict=True)),
                    "rounds": speeds[key], "load": [load, os.getloadavg()[0]]})
        print(json.dumps({k: row[k] for k in ("model", "weights", "decode_tok_s", "decode_vs_dense")}), flush=True)
    return list(rows.values())


@torch.inference_mode()
def pytorch_table_rows(ctx: Context) -> list[dict[str, Any]]:
    """Our PyTorch paths on every model (and full MoDeGPT, which llama.cpp cannot run): ``generate()`` in float32
    and bfloat16 and the compiled bfloat16 fast path (:func:`leanfm.eval.speed.pytorch_rows`: alternating rounds,
    medians, greedy tokens checked against ``generate()``), perplexity on the same windows in each dtype, prefill of
    the same 512-token window (last-position logits). The eager fast-path rows stay in the JSON (``pytorch``)."""
    rows = []
    window = ctx.windows["austen"][:1]
    models = {**ctx.folders, **ctx.pytorch_only}
    for label in ctx.args.pytorch_models:
        if label not in models:
            raise SystemExit(f"--pytorch-models: '{label}' is not a model of this run; accepted: {', '.join(models)}")
        folder = models[label]
        speed = pytorch_rows(str(folder), ctx.args.decode, 18, rounds=3)
        ctx.pytorch[label] = speed
        for dtype in ("float32", "bfloat16"):
            model, _ = load_model(str(folder), dtype=dtype)
            ppl = {c: perplexity(model, w).perplexity for c, w in ctx.windows.items()}
            prefill = prefill_tokens_per_s(model, window)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
            for r in speed:
                if r["dtype"] != dtype or (r["path"] == "fast" and not r["compiled"]):
                    continue
                row = {"model": label, "runtime": "pytorch " + ("fast, compiled" if r["path"] == "fast"
                                                                 else "generate()"),
                       "weights": dtype, "params": count_parameters(model), "file_mb": size,
                       **{f"ppl_{c}": v for c, v in ppl.items()}, "prefill_tok_s": prefill,
                       "decode_tok_s": r["decode_tokens_per_s"], "fraction_of_limit": r["fraction_of_limit"],
                       "tokens_equal_generate": r["tokens_equal_generate"],
                       "compile_seconds": r["compile_seconds"], "load": os.getloadavg()[0]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


ROWS: list[Callable[[Context], list[dict[str, Any]]]] = [llama_cpp_rows, pytorch_table_rows]


def ridge_sweep(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """``solve_ridge`` of ``modegpt-heads`` chosen on validation windows: the first ``--val-windows`` windows of the
    ``train`` split of each corpus (neither the calibration windows, drawn from ``calib``, nor the ``eval`` windows
    of the table). Each μ in ``--ridges`` compresses SmolLM2 at ``--sweep-ratio``; the score is the geometric mean
    of the validation perplexities over both corpora and the two 4-bit types (the deployment target); bf16 is
    recorded beside it."""
    windows = {c: token_windows(split_token_ids(tokenizer, c, "train"), args.seqlen, args.val_windows)
               for c in CORPORA}
    rows = []
    store = leanfm_home() / "bench" / "deploy" / "ridge-rows.json"  # finished rows, so a stopped sweep resumes
    done = json.loads(store.read_text()) if store.is_file() else {}
    for mu in args.ridges:
        folder, seconds = compressed_folder(args.sweep_ratio, tokenizer, solve_ridge=mu)
        for quant in ("bf16", "q4_0", "q4_1"):
            key = f"{folder.name} {quant} {args.val_windows}x{args.seqlen}"
            if key not in done:
                path, _ = gguf_file(folder, quant, args.threads)
                ppl = {c: gguf_perplexity(path, w, threads=args.threads).perplexity for c, w in windows.items()}
                done[key] = {"solve_ridge": mu, "weights": quant, **{f"ppl_{c}": v for c, v in ppl.items()},
                             "compress_seconds": seconds}
                atomic_write_json(store, done)
            rows.append(done[key])
            print(json.dumps(rows[-1]), flush=True)
    score = {mu: math.exp(statistics.mean(math.log(r[f"ppl_{c}"]) for r in rows if r["solve_ridge"] == mu
                                          and r["weights"] != "bf16" for c in CORPORA)) for mu in args.ridges}
    return {"rows": rows, "score": {str(k): v for k, v in score.items()}, "chosen": min(score, key=score.__getitem__),
            "ratio": args.sweep_ratio, "windows": args.val_windows, "seqlen": args.seqlen, "split": "train",
            "default": DEFAULT_MU}


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
    ax.set_title("SmolLM2-135M: quality vs speed (filled: llama.cpp, hollow: PyTorch)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def verdicts(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """The issue's goals, computed. (1) compressed + 4-bit faster than dense at the same 4-bit type in llama.cpp,
    at a quality loss ``ppl(compressed, q) / ppl(dense, q)`` smaller than the step ``ppl(dense, q4_0) /
    ppl(dense, q8_0)``, per corpus; (2) our bfloat16 decode (compiled fast path, dense) >= 50 tokens/s, with the
    fraction of the bandwidth limit."""
    by = {(r["model"], r["runtime"], r["weights"]): r for r in rows}
    out: dict[str, Any] = {"compressed_4bit": {}}
    dense8, dense4 = by.get(("dense", "llama.cpp", "q8_0")), by.get(("dense", "llama.cpp", "q4_0"))
    if dense8 and dense4:
        step = {c: dense4[f"ppl_{c}"] / dense8[f"ppl_{c}"] for c in CORPORA}
        out["q8_0_to_q4_0_step"] = step
        for label in labels:
            for quant in ("q4_0", "q4_1"):
                comp, base = by.get((label, "llama.cpp", quant)), by.get(("dense", "llama.cpp", quant))
                if not (comp and base):
                    continue
                loss = {c: comp[f"ppl_{c}"] / base[f"ppl_{c}"] for c in CORPORA}
                speedup = comp["decode_vs_dense"]  # per-round ratios, median
                out["compressed_4bit"][f"{label} {quant}"] = {
                    "decode_speedup": speedup, "quality_loss": loss,
                    "met": speedup > 1 and all(loss[c] < step[c] for c in CORPORA)}
    fast = by.get(("dense", "pytorch fast, compiled", "bfloat16"))
    if fast:
        out["bf16_decode"] = {"tok_s": fast["decode_tok_s"], "fraction_of_limit": fast["fraction_of_limit"],
                              "met": fast["decode_tok_s"] >= 50}
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    s = result["settings"]
    lines = ["## Run where users run: llama.cpp (issue 22)", "",
             f"SmolLM2-135M dense and `{METHOD}` (ours: MoDeGPT type I + whole heads) exported with "
             "`leanfm export --gguf`, quantized by llama.cpp, measured through llama-cpp-python "
             f"{result.get('llama_cpp_version', '?')}: perplexity on {s['windows']} x {s['seqlen']} eval windows "
             f"(those of `leanfm eval`), prefill of one {s['seqlen']}-token window, greedy decode of {s['decode']} "
             f"tokens after 32 at batch 1, every GGUF in {s['rounds']} alternating rounds in one process (medians; "
             "`decode vs dense` = median of the per-round ratios to dense at the same weight type); PyTorch rows: "
             "decode after the 18-token prompt of `benchmarks/fast_decode.py`, its paths alternating per model; "
             f"{s['threads']} threads, load {result['load'][0]:.1f} -> "
             f"{result['load'][1]:.1f}; modegpt-heads solve_ridge {result['solve_ridge']:g}.", "",
             "Caveat: the dense float checkpoint is SmolLM2's shipped Q4_1 GGUF de-quantised (the only offline "
             "copy), so dense q4_1 re-quantises weights that already sit on the Q4_1 grid and loses ~nothing; "
             "compressed models are re-solved off that grid and pay the full 4-bit rounding. Dense q4_0 is a real "
             "re-quantisation, so goal 1 uses the q8_0 -> q4_0 step.", "",
             "| model | runtime | weights | params | file MB | PPL Austen | PPL pydocs | prefill tok/s "
             "| decode tok/s | decode vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['decode_vs_dense']:.2f}x" if "decode_vs_dense" in r else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {r['weights']} | {r['params']:,} | {r['file_mb']:.1f} | "
                     f"{r['ppl_austen']:.2f} | {r['ppl_pydocs']:.2f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {ratio} |")
    v = result["verdicts"]
    if "q8_0_to_q4_0_step" in v:
        step = v["q8_0_to_q4_0_step"]
        lines += ["", f"Goal 1, compressed + 4-bit faster than dense at the same 4-bit type with a quality loss below "
                  f"the dense q8_0 -> q4_0 step (PPL x{step['austen']:.3f} Austen, x{step['pydocs']:.3f} pydocs):"]
        for key, item in v["compressed_4bit"].items():
            loss = item["quality_loss"]
            lines.append(f"- {key}: decode {item['decode_speedup']:.2f}x dense, PPL x{loss['austen']:.3f} Austen / "
                         f"x{loss['pydocs']:.3f} pydocs -> **{'met' if item['met'] else 'not met'}**")
    if "bf16_decode" in v:
        b = v["bf16_decode"]
        lines += ["", f"Goal 2, our bfloat16 decode >= 50 tokens/s (dense, compiled fast path): {b['tok_s']:.1f} "
                  f"tokens/s, {100 * b['fraction_of_limit']:.0f}% of the bandwidth limit -> "
                  f"**{'met' if b['met'] else 'not met'}**"]
    arch = result.get("arch_check")
    if arch:
        parts = ", ".join(f"{q}: deci {a['deci_decode_tok_s']:.1f} vs llama {a['llama_decode_tok_s']:.1f} tok/s "
                          f"({a['deci_vs_llama']:.2f}x)" for q, a in arch.items())
        lines += ["", "Architecture check (`--arch-check`: the compressed files are `deci`, dense is `llama`; dense "
                  f"exported as `deci` too, timed alternately with dense as `llama`): {parts}. Where this ratio is "
                  "far from 1, part of the compressed files' `decode vs dense` is the architecture's, not the "
                  "compression's; divide by it for the compression's share."]
    for label, error in result.get("export_refusals", {}).items():
        lines += ["", f"`leanfm export --gguf` on {label} (PyTorch rows only): {error or 'exported'}"]
    lines += ["", "![perplexity vs decode speed](results/deploy.png)", "", f"Regenerate: `{command}`"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--quants", nargs="+", default=["bf16", "q8_0", "q4_0", "q4_1"])
    parser.add_argument("--modegpt-ratios", type=float, nargs="*", default=[0.3],
                        help="full MoDeGPT at these ratios, PyTorch rows only (llama.cpp cannot run it)")
    parser.add_argument("--no-pytorch", action="store_true", help="llama.cpp rows only")
    parser.add_argument("--pytorch-models", nargs="+", default=["dense", f"{METHOD}-0.3", "modegpt-0.3"],
                        help="models given PyTorch rows (labels of this run)")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternating speed rounds (medians)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--choose-ridge", action="store_true",
                        help="only the validation sweep of modegpt-heads' solve_ridge (results/deploy_ridge.json)")
    parser.add_argument("--arch-check", action="store_true",
                        help="only dense as llama vs dense as deci, timed alternately (results/deploy_arch.json)")
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1])
    parser.add_argument("--sweep-ratio", type=float, default=0.3)
    parser.add_argument("--val-windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/deploy"))
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    return parser.parse_args(argv)


def sweep_markdown(sweep: dict[str, Any]) -> str:
    lines = [f"### `solve_ridge` of modegpt-heads, chosen on validation ({sweep['windows']} x {sweep['seqlen']} "
             f"windows of the `{sweep['split']}` split of each corpus, ratio {sweep['ratio']})", "",
             "| μ | weights | PPL Austen | PPL pydocs |", "|---|---|---|---|"]
    lines += [f"| {r['solve_ridge']:g} | {r['weights']} | {r['ppl_austen']:.2f} | {r['ppl_pydocs']:.2f} |"
              for r in sweep["rows"]]
    scores = ", ".join(f"μ = {float(k):g}: {v:.2f}" for k, v in sweep["score"].items())
    lines += ["", f"Score (geometric mean over both corpora x q4_0/q4_1): {scores}. Chosen: **μ = "
              f"{sweep['chosen']:g}** (the default is {sweep['default']:g}). Regenerate: "
              "`python benchmarks/deploy.py --choose-ridge`"]
    return "\n".join(lines)


def arch_check(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Whether the compressed files' speed-up is confounded by their architecture: they are ``deci`` (per-layer
    widths), the dense file ``llama``. The dense model is exported as ``deci`` too and both are timed in alternating
    rounds (same protocol as the table); ``deci_vs_llama`` is the median per-round decode ratio."""
    window = token_windows(split_token_ids(tokenizer, "austen", "eval"), args.seqlen, 1)[0]
    out: dict[str, Any] = {}
    for quant in ("bf16", "q4_0"):
        dense = ensure_checkpoint()
        llama, _ = gguf_file(dense, quant, args.threads)
        deci = llama.with_name(f"{dense.name}-as-deci.{quant}.gguf")
        if not deci.is_file():
            export_gguf(dense, deci, quant=quant, arch="deci", threads=args.threads)
        load = os.getloadavg()[0]
        speeds = alternating_speeds({"llama": llama, "deci": deci}, window[:32], window, args.decode, args.rounds,
                                    args.threads)
        out[quant] = {"llama_decode_tok_s": statistics.median(d for d, _ in speeds["llama"]),
                      "deci_decode_tok_s": statistics.median(d for d, _ in speeds["deci"]),
                      "deci_vs_llama": statistics.median(d / b for (d, _), (b, _) in
                                                         zip(speeds["deci"], speeds["llama"], strict=True)),
                      "rounds": speeds, "load": [load, os.getloadavg()[0]]}
        print(json.dumps({k: v for k, v in out[quant].items() if k != "rounds"}), flush=True)
    return out


def export_refusal(folder: Path) -> str:
    """The one-line error ``leanfm export --gguf`` gives for ``folder`` (empty when it exports)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_gguf(folder, Path(tmp) / "x.gguf", quant="bf16")
        except LeanfmError as error:
            return str(error)
    return ""


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    load_before = os.getloadavg()[0]
    tokenizer = smollm2_tokenizer()
    if args.arch_check:
        atomic_write_json(args.out.with_name(args.out.name + "_arch.json"), arch_check(args, tokenizer))
        return
    if args.choose_ridge:
        sweep = ridge_sweep(args, tokenizer)
        sweep["load"] = [load_before, os.getloadavg()[0]]
        atomic_write_json(args.out.with_name(args.out.name + "_ridge.json"), sweep)
        write_section(args.benchmarks_md, "deploy-ridge", sweep_markdown(sweep))
        return
    folders, cost = {"dense": ensure_checkpoint()}, {}
    for ratio in args.ratios:
        folders[f"{METHOD}-{ratio}"], cost[f"{METHOD}-{ratio}"] = compressed_folder(ratio, tokenizer)
    windows = {c: token_windows(split_token_ids(tokenizer, c, "eval"), args.seqlen, args.windows) for c in CORPORA}
    ctx = Context(args, folders, windows, cost)
    refusals = {}
    for ratio in args.modegpt_ratios:
        label = f"modegpt-{ratio}"
        ctx.pytorch_only[label], cost[label] = compressed_folder(ratio, tokenizer, method="modegpt")
        refusals[label] = export_refusal(ctx.pytorch_only[label])
    rows = [row for fn in (ROWS[:1] if args.no_pytorch else ROWS) for row in fn(ctx)]
    arch_file = args.out.with_name(args.out.name + "_arch.json")  # a fresh --arch-check run, if one was made
    arch = json.loads(arch_file.read_text()) if arch_file.is_file() else None
    import llama_cpp

    result = {"rows": rows, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "verdicts": verdicts(rows, [label for label in folders if label != "dense"]),
              "export_refusals": refusals, "pytorch": ctx.pytorch, "compression_seconds": cost, "arch_check": arch,
              "solve_ridge": DEFAULT_MU, "load": [load_before, os.getloadavg()[0]],
              "llama_cpp_version": llama_cpp.__version__, **versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_bytes(args.out.with_suffix(".png"), plot(rows))
    write_section(args.benchmarks_md, "deploy", markdown(result, regenerate_command(args)))


def regenerate_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run: the script plus every setting that differs from its default."""
    defaults = vars(parse_args([]))
    changed = [(k, v) for k, v in vars(args).items() if v != defaults[k]]
    words = []
    for key, value in changed:
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)
        else:
            words.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(["python benchmarks/deploy.py", *words])


if __name__ == "__main__":
    main()
