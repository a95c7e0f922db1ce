"""The fast PyTorch decode path against generate() (issue 22): tokens/s, compile cost, where a token's time goes.

    python benchmarks/fast_decode.py                       # SmolLM2-135M, ~4 min on a quiet 2-core machine
    python benchmarks/fast_decode.py --models smollm2-135m,/path/to/compressed --rounds 3 --out /tmp/fd.json

Protocol (the issue's): greedy, 64 new tokens after an 18-token prompt, batch 1, ``--threads`` threads. Per model,
:func:`leanfm.eval.speed.pytorch_rows` measures ``generate()`` (float32, bfloat16) and the fast path (bfloat16 eager
and compiled, float32 eager) in alternating rounds in one process (medians) and checks the greedy tokens against
``generate()``'s. Then :func:`leanfm.eval.fastdecode.profile` of the compiled bfloat16 decoder (per-part times
against the bandwidth limit), and the compile time a second process pays with the same Inductor cache
(``$LEANFM_HOME/cache/inductor``). The load average is recorded in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leanfm.eval.fastdecode import FastDecoder, inductor_cache_dir, profile
from leanfm.eval.speed import PROMPT_TEXT, pytorch_rows
from leanfm.models import load_model
from leanfm.paths import atomic_write_json
from leanfm.progress import set_quiet


def second_process_compile(model: str, max_len: int, threads: int) -> float:
    """Compile seconds of the bfloat16 step in a fresh process sharing this one's Inductor cache."""
    out = subprocess.run([sys.executable, __file__, "--child", model, "--max-len", str(max_len),
                          "--threads", str(threads)], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["compile_seconds"])


def child(model_name: str, max_len: int) -> None:
    model, _ = load_model(model_name, dtype="bfloat16")
    decoder = FastDecoder(model, torch.bfloat16, "cpu", max_len, compile=True)
    print(json.dumps({"compile_seconds": decoder.compile_seconds}))


def profile_model(model_name: str, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    model, tokenizer = load_model(model_name, dtype="bfloat16")
    ids = torch.tensor([tokenizer(PROMPT_TEXT)["input_ids"][:prompt_tokens]])
    decoder = FastDecoder(model, torch.bfloat16, "cpu", prompt_tokens + new_tokens, compile=True)
    return profile(decoder, ids, new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m", help="comma-separated names or folders")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=18)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/fast_decode.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--max-len", type=int, default=82, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    inductor_cache_dir()
    if args.child:
        child(args.child, args.max_len)
        return
    result: dict[str, Any] = {"threads": args.threads, "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"],
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [], "profiles": {},
                              "second_process_compile_seconds": {}}
    for name in args.models.split(","):
        result["rows"] += pytorch_rows(name, args.new_tokens, args.prompt_tokens, args.rounds,
                                       compile=not args.no_compile)
        if not args.no_compile:
            result["profiles"][name] = profile_model(name, args.prompt_tokens, args.new_tokens)
            max_len = args.prompt_tokens + args.new_tokens
            result["second_process_compile_seconds"][name] = second_process_compile(name, max_len, args.threads)
        atomic_write_json(args.out, result)
    for row in result["rows"]:
        print(f"{row['model']:>16} {row['path']:>8} {row['dtype']:>8} compiled={row['compiled']!s:5} "
              f"decode {row['decode_tokens_per_s']:6.1f} tok/s ({100 * row['fraction_of_limit']:4.1f}% of "
              f"{row['limit_tokens_per_s']:.0f}) prefill {row['prefill_tokens_per_s']:7.1f} "
              f"same tokens={row['tokens_equal_generate']}")


if __name__ == "__main__":
    main()
