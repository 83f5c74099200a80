"""Products of a few to a few hundred rows against a blocked bf16 weight: the kernels against
unblocking the weight for one torch GEMM, at each row count, on 1 and 2 threads.

    .venv/bin/python benchmarks/bench_kernel_rows.py                      # the table, and a record
    .venv/bin/python benchmarks/bench_kernel_rows.py --against HEAD       # also the kernels of a git revision

Columns (ms a product; bf16 x and a bf16 result unless said):
    old      bf16_mm_bf16 of the kernels.c at --against (compiled here with the same flags)
    fma      bf16_mm_bf16: each weight converted to fp32 (one op per 16 values), FMA on 4 x rows at a time
    dot      bf16_dot_mm: bf16 x bf16 by VDPBF16PS (CPUs with AVX512_BF16 only)
    kernel   what blocked_mm runs for bf16 x here (dot where dispatch `bf16.dot` chose it, else fma)
    gemm16   the weight unblocked into a reused bf16 buffer, then F.linear in bf16 (oneDNN)
    gemm32   the weight unblocked into a reused fp32 buffer, then F.linear in fp32
Each is timed by dispatch.measure (the candidates take turns; each is scored by the median of its
per-round ratios to gemm16, so a burst of load elsewhere does not decide). Run it on a quiet
machine: the record keeps the load average before and after. Writes
benchmarks/records/<stamp>-kernel-rows.json with the CPU, its flags, the threads and the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_jobs import new_record, write_record  # noqa: E402
SRC = "src/blip2/backends/cpu"


def old_kernels(rev: str):
    """kernels.c and simd.h of git revision `rev`, compiled for this CPU's ISA with build.py's flags."""
    from blip2.backends.cpu import build

    root = HERE.parent
    d = Path(tempfile.mkdtemp(prefix="blip2-old-kernels-"))
    for name in ("kernels.c", "simd.h"):
        text = subprocess.run(["git", "show", f"{rev}:{SRC}/{name}"], cwd=root, capture_output=True, text=True,
                              check=True).stdout
        (d / name).write_text(text)
    out = d / "kernels.so"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O3", *build.ISAS[build.isa()][0], "-fopenmp", "-shared", "-fPIC", "-o", str(out),
                    str(d / "kernels.c")], check=True)
    return build._bind(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rows", default="1,8,16,33,64,128,257", help="comma-separated row counts")
    ap.add_argument("--shapes", default="2560x2560,10240x2560", help="weights, N x K (N a multiple of 4, K of 32)")
    ap.add_argument("--against", default=None, help="a git revision whose kernels are timed as `old`")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row count, at most")
    args = ap.parse_args()

    import torch

    from blip2.backends.cpu import build, dispatch, kernels, runtime
    from blip2.backends.cpu.layout import BLOCK
    from blip2.backends.cpu.linear import unblocked_product

    if build.lib() is None:
        raise SystemExit(f"no kernels here: {build.isa_reason()}")
    old = old_kernels(args.against) if args.against else None
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            N, K = (int(v) for v in shape.split("x"))
            wb = kernels.blocked_copy(dispatch.synthetic(N, K, scale=0.02), BLOCK[torch.bfloat16])
            print(f"\n{N}x{K} bf16 weight, {threads} thread(s): ms a product (GFLOP/s)")
            for m in (int(r) for r in args.rows.split(",")):
                xb = dispatch.synthetic(m, K, seed=m)

                def gemm(many):
                    def f():
                        with dispatch.force(**{"bf16.many": many}):
                            return unblocked_product(xb, wb, None, None).bfloat16()
                    return f

                cands = {"gemm16": gemm(0), "gemm32": gemm(1), "fma": lambda: kernels._mm(xb, wb, None, None, dot=False),
                         "kernel": lambda: kernels.blocked_mm(xb, wb)}
                if kernels.dot_built():
                    cands["dot"] = lambda: kernels.bf16_dot(xb, wb)
                if old is not None:
                    def run_old():
                        y = torch.empty(m, N, dtype=torch.bfloat16)
                        old.bf16_mm_bf16(wb.data_ptr(), N, K, xb.data_ptr(), m, None, y.data_ptr(), threads)
                    cands["old"] = run_old
                with torch.no_grad():
                    t = dispatch.measure(cands, reps=15, budget_s=args.budget)
                flop = 2 * m * N * K
                cells = "  ".join(f"{k} {v * 1e3:8.2f} ({flop / v / 1e9:5.0f})" for k, v in t.items())
                print(f"  M={m:4d}  {cells}", flush=True)
                results.append(dict(threads=threads, N=N, K=K, rows=m, ms={k: round(v * 1e3, 3) for k, v in t.items()},
                                    gflops={k: round(flop / v / 1e9, 1) for k, v in t.items()}))
    rec = new_record()
    rec.update(against=args.against, kernels=runtime.describe(measure=False)["kernels"],
               dot_built=kernels.dot_built(), bf16_dot=str(dispatch.choice("bf16.dot")), results=results)
    write_record(rec, "kernel-rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
