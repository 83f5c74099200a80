"""A few rows against weights that stream from memory, as in a batched decode step: how the time of
one product grows with the rows (1 = a lone request's step, 8 = eight clients' rows in one step).

    .venv/bin/python benchmarks/bench_stream_rows.py                  # 1 and 2 threads, 1-16 rows
    .venv/bin/python benchmarks/bench_stream_rows.py --threads 2 --rows 1,8

kernels_bf16_mm_bf16 runs on blocked bf16 weights (what a decode step uses); torch_linear is
F.linear in bf16 on the same weights row-major (oneDNN). Each is timed over a ring of copies of one
4096 x 2560 weight (OPT-2.7b's fc1 shape) whose total is at least twice the last-level cache, so
that every product reads its weight from memory, as a step through a 1.5-5 GB model does (one
weight timed again and again stays in cache and shows twice the rate). Reported per product: ms,
GB/s of weight read, GFLOP/s. Writes benchmarks/records/<stamp>-stream-rows.json with the CPU, its
flags, the threads and the load average.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_jobs import new_record, write_record  # noqa: E402


def last_level_cache_bytes() -> int:
    """The largest cache sysfs reports for CPU 0 (64 MiB if it says nothing)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()  # "260M", "2048K"
            best = max(best, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
        except (OSError, ValueError):
            pass
    return best or 64 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rows", default="1,2,4,8,16", help="comma-separated row counts")
    ap.add_argument("--reps", type=int, default=5, help="passes over the ring per figure (the median is kept)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from blip2.backends.cpu import dispatch, kernels
    from blip2.backends.cpu.layout import BLOCK

    if kernels.lib() is None:
        raise SystemExit("no C kernels on this machine (no compiler, or no AVX-512/AVX2)")
    N, K = 4096, 2560
    w = dispatch.synthetic(N, K, scale=0.02)
    n = max(8, -(-2 * last_level_cache_bytes() // (N * K * 2)))
    blocked = [kernels.blocked_copy(w, BLOCK[torch.bfloat16]) for _ in range(n)]
    plain = [w.clone() for _ in range(n)]
    paths = {"kernels_bf16_mm_bf16": (blocked, kernels.blocked_mm), "torch_linear": (plain, lambda x, t: F.linear(x, t))}
    rec = new_record()
    rec.update(shape=[N, K], ring=n, ring_bytes=n * N * K * 2, threads=args.threads)
    rows_out = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for m in [int(r) for r in args.rows.split(",")]:
            x = dispatch.synthetic(m, K, seed=m)
            for name, (ws, f) in paths.items():
                for t in ws:  # one untimed pass
                    f(x, t)
                per = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    for t in ws:
                        f(x, t)
                    per.append((time.perf_counter() - t0) / n)
                s = sorted(per)[len(per) // 2]
                row = dict(threads=threads, rows=m, path=name, ms=round(s * 1e3, 4),
                           gb_s=round(N * K * 2 / s / 1e9, 2), gflop_s=round(2 * m * N * K / s / 1e9, 1))
                rows_out.append(row)
                print(f"threads {threads} rows {m:3d} {name:22s} {row['ms']:8.3f} ms {row['gb_s']:6.1f} GB/s "
                      f"{row['gflop_s']:6.1f} GFLOP/s", flush=True)
    rec["results"] = rows_out
    write_record(rec, "stream-rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
