"""GEMM width sweep: [512,576]x[576,W] (up) and [512,W]x[W,576] (down), alternating rounds."""
import sys, time, torch, statistics
threads = int(sys.argv[1]); torch.set_num_threads(threads)
widths = list(range(1024, 1101)) + list(range(1392, 1441))
res = {}
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(512, 576, dtype=dt)
    ups = {w: torch.randn(576, w, dtype=dt) for w in widths}
    hs = {w: torch.randn(512, w, dtype=dt) for w in widths}
    downs = {w: torch.randn(w, 576, dtype=dt) for w in widths}
    t = {(w, k): [] for w in widths for k in ("up", "down")}
    for rnd in range(5):
        order = widths if rnd % 2 == 0 else widths[::-1]
        for w in order:
            for k in ("up", "down"):
                a, b = (x, ups[w]) if k == "up" else (hs[w], downs[w])
                torch.mm(a, b)
                s = time.perf_counter()
                for _ in range(3):
                    torch.mm(a, b)
                t[(w, k)].append((time.perf_counter() - s) / 3)
    for key, v in t.items():
        res[(str(dt).split('.')[-1],) + key] = min(v) * 1e3
import json
json.dump({f"{a}|{w}|{k}": v for (a, w, k), v in res.items()}, open(f"/tmp/gemm_{threads}.json", "w"))
print("done", threads)
