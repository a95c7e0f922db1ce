"""Which MLP widths are slow here: the up GEMM ``[512, 576] x [576, W]`` and the down GEMM ``[512, W] x [W, 576]``
(SmolLM2's hidden size, 512 tokens) for W in 1024..1100 and 1392..1440, float32 and bfloat16.

    python benchmarks/gemm_widths.py --threads 1
    python benchmarks/gemm_widths.py --threads 2

Rounds alternate the width order (ascending, then descending) in one process; each figure is the best of the rounds
of 3 back-to-back GEMMs, normalised per 1000 columns. The summary gives, for widths that are multiples of 1, 8, 16,
32, 64, the *worst* and the *mean* time per column relative to the best width: a multiple that "removes the slow
widths" has a worst close to 1. It chose ``leanfm.compress.base.WIDTH_MULTIPLE``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

WIDTHS = list(range(1024, 1101)) + list(range(1392, 1441))
MULTIPLES = (1, 8, 16, 32, 64)


def sweep(dtype: torch.dtype, rounds: int, reps: int = 3) -> dict[tuple[int, str], float]:
    """Best seconds per GEMM for every (width, up/down)."""
    x = torch.randn(512, 576, dtype=dtype)
    mats = {w: (torch.randn(576, w, dtype=dtype), torch.randn(512, w, dtype=dtype), torch.randn(w, 576, dtype=dtype))
            for w in WIDTHS}
    best: dict[tuple[int, str], float] = {}
    for index in range(rounds):
        for w in WIDTHS if index % 2 == 0 else WIDTHS[::-1]:
            up, hidden, down = mats[w]
            for kind, (a, b) in (("up", (x, up)), ("down", (hidden, down))):
                torch.mm(a, b)
                start = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b)
                seconds = (time.perf_counter() - start) / reps
                best[(w, kind)] = min(best.get((w, kind), seconds), seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; worst / mean time per column relative to the best width, by multiple")
    print("dtype     gemm  best ms/1000col  " + "  ".join(f"x{m:<9}" for m in MULTIPLES))
    for dtype in (torch.float32, torch.bfloat16):
        times = sweep(dtype, args.rounds)
        for kind in ("up", "down"):
            per_col = {w: times[(w, kind)] / w * 1e6 for w in WIDTHS}  # ms per 1000 columns
            low = min(per_col.values())
            cells = []
            for m in MULTIPLES:
                chosen = [per_col[w] / low for w in WIDTHS if w % m == 0]
                cells.append(f"{max(chosen):.2f}/{statistics.mean(chosen):.2f}")
            print(f"{str(dtype).removeprefix('torch.'):9} {kind:5} {low:15.3f}  " + "  ".join(f"{c:10}" for c in cells))


if __name__ == "__main__":
    main()
