"""Compression that runs well (issue 14): speed of compressed models with aligned widths, and compression cost.

    python benchmarks/compress_speed.py                  # ~25 min on a quiet 2-core machine
    python benchmarks/compress_speed.py --rounds 1 --models dense,modegpt-0.3 --dtypes bfloat16 --out /tmp/cs

Models (compressed once under ``$LEANFM_HOME/bench/compress-speed``, reused): SmolLM2-135M dense; MoDeGPT 0.3 with
MLP widths rounded to multiples of 32 (the default) and unrounded (``--width-multiple 1``: the old widths, e.g.
1073); DISP 0.5 from ``benchmarks/disp.py`` (``--disp DIR``; skipped if absent); Gemma-3-270M dense and MoDeGPT 0.3
(``--gemma``; skipped without the optional Gemma packages). Speed, per dtype (bfloat16 and float32), alternating the
models in every round in one process: prefill of 1 x 512 tokens computing only the last position's logits
(``logits_to_keep=1``, as a serving stack does) and greedy decode of 64 tokens at batch 1 (prefill subtracted);
medians over rounds, ratios to the dense model of the same round. Cost: ``leanfm compress`` of SmolLM2 at 0.3 in a
fresh process (wall seconds, peak RSS of the child, compared with the float32 model's size). The load average is
recorded before and after. ``--memory`` runs only the peak-memory stage: the CLI's streamed compression, the same
without its fixed mmap threshold, and the model loaded whole, one after the other in child processes, their
checkpoints compared tensor for tensor (results/compress_memory.json, quoted in the section).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.device import fast_bfloat16
from leanfm.eval.speed import decode_tokens_per_s, prefill_tokens_per_s
from leanfm.models import load_model
from leanfm.paths import atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import write_section

SMOL = "smollm2-135m"
EARLIER = Path("results/compress_speed_*.json")  # kept runs from other machines, quoted under the table


def compress(name: str, base: str, method: str, ratio: float, extra: list[str], threads: int) -> tuple[Path, dict]:
    """``leanfm compress`` into the cache folder in a fresh process: (folder, wall seconds and child peak RSS)."""
    out = leanfm_home() / "bench" / "compress-speed" / name
    cost_file = out.parent / f"{name}.cost.json"  # not with_suffix: "modegpt-0.3" has a dot
    if (out / "config.json").is_file():  # reused; its cost only where one was recorded with it
        return out, json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    tick = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "leanfm", "--quiet", "--threads", str(threads), "compress", base,
                              "--method", method, "--ratio", str(ratio), "--out", str(out), "--overwrite", *extra])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS (getrusage would give the largest child)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"leanfm compress {base} --method {method} failed ({child.returncode})")
    cost = {"seconds": time.perf_counter() - tick, "peak_rss_mb": usage.ru_maxrss / 1024,
            "threads": threads, "load": os.getloadavg()[0]}
    atomic_write_json(cost_file, cost)
    return out, cost


# The three ways of compressing SmolLM2 at 0.3 whose peak memory ``--memory`` compares, each run as a child
# ``python -c`` so that the child's own peak RSS is what ``os.wait4`` reports. The patches are of module attributes
# the CLI reads at call time: ``release_memory_eagerly`` (the CLI's fixed 1 MiB mmap threshold) and
# ``open_model_stream`` (a reason string instead of a stream makes ``compress_checkpoint`` load the model whole).
MEMORY_VARIANTS = {
    "streamed": ("streamed, 1 MiB mmap threshold (the CLI's default)", ""),
    "streamed-dynamic-threshold": ("streamed, glibc's dynamic mmap threshold (release_memory_eagerly disabled)",
                                   "import leanfm.cli.compress as c; c.release_memory_eagerly = lambda: False; "),
    "in-memory": ("in memory (the model loaded whole, then compressed; 1 MiB threshold)",
                  "import leanfm.compress.api as a; "
                  "a.open_model_stream = lambda name, device: 'benchmark: in-memory variant'; "),
}


def run_child(code: str) -> dict[str, float]:
    """Run ``python -c code``; its wall, user and system seconds and its own peak RSS (MiB)."""
    tick = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed ({os.waitstatus_to_exitcode(status)}): {code}")
    return {"wall_s": time.perf_counter() - tick, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "max_rss_mib": usage.ru_maxrss / 1024}


def memory_stage(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS and wall time of the three variants, one after the other; checkpoints compared tensor for tensor."""
    from safetensors.torch import load_file

    root = leanfm_home() / "bench" / "compress-memory"
    cli = ["--quiet", "--threads", str(args.threads), "compress", SMOL, "--method", "modegpt", "--ratio", "0.3",
           "--overwrite", "--out"]
    runs, tensors = [], {}
    load_before = os.getloadavg()[0]
    for name, (label, patch) in MEMORY_VARIANTS.items():
        out = root / name
        argv = [*cli, str(out)]
        measured = run_child(f"import sys; {patch}from leanfm.cli import main; sys.exit(main({argv!r}))")
        runs.append({"label": label, **measured, "load": os.getloadavg()[0]})
        print(json.dumps(runs[-1]), flush=True)
        tensors[name] = load_file(str(out / "model.safetensors"))
    reference = tensors["in-memory"]
    same = {name: sorted(t) == sorted(reference) and all(torch.equal(t[k], reference[k]) for k in reference)
            for name, t in tensors.items() if name != "in-memory"}
    dense, _ = load_model(SMOL, dtype="float32")
    return {"command": "leanfm " + " ".join(cli) + " DIR", "cpu": cpu_description(), "threads": args.threads,
            "load_before": load_before, "runs": runs, "tensors": len(reference),
            "float32_model_mib": round(sum(p.numel() * 4 for p in dense.parameters()) / 2**20),
            "identical_checkpoints": same}


def cpu_description() -> str:
    """The CPU's model name and its widest vector extensions: speed ratios depend on them (AVX-512 vs AVX2)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def models(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """label -> (folder or registered name, its dense reference label)."""
    wanted = set(args.models.split(","))
    found: dict[str, tuple[str, str]] = {}
    if "dense" in wanted:
        found["dense"] = (SMOL, "dense")
    for label, extra in (("modegpt-0.3", []), ("modegpt-0.3-unaligned", ["--width-multiple", "1"])):
        if label in wanted:
            folder, _ = compress(label, SMOL, "modegpt", 0.3, extra, args.threads)
            found[label] = (str(folder), "dense")
    if "disp-0.5" in wanted and args.disp is not None and (args.disp / "config.json").is_file():
        found["disp-0.5"] = (str(args.disp), "dense")
    if args.gemma:
        found["gemma dense"] = ("gemma3-270m", "gemma dense")
        folder, _ = compress("gemma-modegpt-0.3", "gemma3-270m", "modegpt", 0.3, ["--calib-seqlen", "1024"],
                             args.threads)
        found["gemma modegpt-0.3"] = (str(folder), "gemma dense")
    return found


def measure(args: argparse.Namespace, found: dict[str, tuple[str, str]], dtype: str) -> dict[str, dict[str, Any]]:
    """Alternating rounds over the models: prefill and decode tokens/s, medians and ratios to the dense model."""
    loaded = {label: load_model(source, dtype=dtype) for label, (source, _) in found.items()}
    tokenizer = next(iter(loaded.values()))[1]
    ids = token_windows(split_token_ids(tokenizer, "austen", "eval"), args.prefill, 1)
    rates: dict[str, dict[str, list[float]]] = {label: {"prefill": [], "decode": []} for label in loaded}
    for round_ in range(args.rounds):
        for label, (model, model_tokenizer) in loaded.items():
            own = ids if model_tokenizer is tokenizer else token_windows(
                split_token_ids(model_tokenizer, "austen", "eval"), args.prefill, 1)
            rates[label]["prefill"].append(prefill_tokens_per_s(model, own, repeats=1))
            rates[label]["decode"].append(decode_tokens_per_s(model, own[:, :32], args.decode, repeats=1))
        print(json.dumps({"dtype": dtype, "round": round_, "load": os.getloadavg()[0]}), flush=True)
    out = {}
    for label, (_, reference) in found.items():
        row: dict[str, Any] = {}
        for kind in ("prefill", "decode"):
            ratios = [a / b for a, b in zip(rates[label][kind], rates[reference][kind], strict=True)]
            row[kind] = statistics.median(rates[label][kind])
            row[f"{kind}_speedup"] = statistics.median(ratios)
        model = loaded[label][0]
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["ratios"] = dict(getattr(model.config, "leanfm_compression", {}) or {})
        report = Path(found[label][0]) / "compression.json"
        if report.is_file():  # how the folder was made: a trained method's steps say what the row stands for
            training = json.loads(report.read_text()).get("training") or {}
            row["training_steps"] = training.get("steps")
        out[label] = row
    return out


def markdown(result: dict, command: str) -> str:
    lines = ["## Compression that runs well (issue 14)", "",
             "Goals: prefill >= 1.3x at 0.3 on SmolLM2 (MoDeGPT, aligned widths), DISP 0.5 >= 1.4x, compression "
             "<= 3 min on 2 cores, peak RSS <= 2x the float32 model.", "",
             f"Prefill 1 x {result['prefill']} tokens (`logits_to_keep=1`), decode {result['decode']} tokens at "
             f"batch 1; {result['rounds']} alternating rounds, {result['threads']} threads, load "
             f"{result['load'][0]:.1f} -> {result['load'][1]:.1f}; CPU: {result.get('cpu', 'not recorded')}.", ""]
    for dtype, rows in result["speed"].items():
        lines += [f"**{dtype}**", "", "| model | parameters | prefill tok/s | speed-up | decode tok/s | speed-up |",
                  "|---|---|---|---|---|---|"]
        for label, r in rows.items():
            made = f" ({r['training_steps']} training steps)" if r.get("training_steps") else ""
            lines.append(f"| {label}{made} | {r['parameters']:,} | {r['prefill']:.0f} | {r['prefill_speedup']:.2f}x | "
                         f"{r['decode']:.1f} | {r['decode_speedup']:.2f}x |")
        lines.append("")
    if result["cost"]:  # SmolLM2's own compression cost is the --memory stage's (below)
        lines += ["Compression cost (`leanfm compress` in a fresh process): " + ", ".join(
            f"{k} {v['seconds']:.0f} s at {v.get('threads', '?')} threads (load {v.get('load', float('nan')):.1f}), "
            f"peak RSS {v['peak_rss_mb']:.0f} MB" for k, v in result["cost"].items()) + ".", ""]
    memory = Path("results/compress_memory.json")  # written by --memory (see memory_stage)
    if memory.is_file():
        record = json.loads(memory.read_text())
        same = ", ".join(f"{name} {'equal' if equal else 'DIFFERENT'}"
                         for name, equal in record["identical_checkpoints"].items())
        lines.append(f"Peak memory of `{record['command']}` ({record['cpu']}, {record['threads']} threads, load "
                     f"{record['load_before']:.1f} before), one variant after the other: " + "; ".join(
                         f"{r['label']} {r['max_rss_mib']:.0f} MiB in {r['wall_s']:.0f} s" for r in record["runs"])
                     + f" (2x the float32 model = {2 * record['float32_model_mib']} MiB). Checkpoints against the "
                     f"in-memory one, all {record['tensors']} tensors: {same}. Regenerate: "
                     "`python benchmarks/compress_speed.py --memory`.")
        lines.append("")
    for path in sorted(EARLIER.parent.glob(EARLIER.name)):  # the same benchmark run on other machines
        earlier = json.loads(path.read_text())
        lines.append(f"Earlier run on another CPU ({earlier.get('cpu', '?')}; {earlier['threads']} thread(s)), "
                     f"`{path.as_posix()}`: prefill speed-ups " + "; ".join(
                         f"{dtype} " + ", ".join(f"{label} {r['prefill_speedup']:.2f}x" for label, r in rows.items()
                                                 if label != "dense") for dtype, rows in earlier["speed"].items())
                     + ".")
        lines.append("")
    lines.append(f"Regenerate: `{command}`")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dense,modegpt-0.3,modegpt-0.3-unaligned,disp-0.5")
    parser.add_argument("--disp", type=Path, default=leanfm_home() / "bench" / "disp-mix" / "disp-0.50")
    parser.add_argument("--gemma", action="store_true", help="also Gemma-3-270M dense and MoDeGPT 0.3")
    parser.add_argument("--dtypes", default="auto",
                        help="comma-separated; auto: bfloat16,float32 where bf16 is native, else float32 only")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/compress_speed"))
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--memory", action="store_true",
                        help="only the peak-memory stage: three compressions in child processes "
                             "-> results/compress_memory.json (~15 min on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    if args.memory:
        atomic_write_json(Path("results/compress_memory.json"), memory_stage(args))
        return
    load_before = os.getloadavg()[0]
    found = models(args)
    dtypes = args.dtypes
    if dtypes == "auto":  # emulated bf16 (no AVX512-BF16/AMX) is ~10x slower than float32: not a serving choice
        dtypes = "bfloat16,float32" if fast_bfloat16(torch.device("cpu")) else "float32"
    speed = {dtype: measure(args, found, dtype) for dtype in dtypes.split(",")}
    costs = {}
    for name in ("modegpt-0.3", "modegpt-0.3-unaligned", "gemma-modegpt-0.3"):
        path = leanfm_home() / "bench" / "compress-speed" / f"{name}.cost.json"
        if path.is_file():
            costs[name] = json.loads(path.read_text())
    dense, _ = load_model(SMOL)
    result = {"speed": speed, "cost": costs, "rounds": args.rounds, "threads": args.threads, "prefill": args.prefill,
              "decode": args.decode, "load": [load_before, os.getloadavg()[0]], "cpu": cpu_description(),
              "model_mb": sum(p.numel() * 4 for p in dense.parameters()) / 2**20}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    command = " ".join(["python benchmarks/compress_speed.py", *sys.argv[1:]]).replace(str(leanfm_home()),
                                                                                    "$LEANFM_HOME")
    write_section(args.benchmarks_md, "compress-speed", markdown(result, command))


if __name__ == "__main__":
    main()
