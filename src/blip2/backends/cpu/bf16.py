"""bf16 products with many rows, and the scratch buffers the faster paths use.

Whether bf16 matrix products run faster in bf16 or in fp32 depends on the CPU, and its flags do not
tell (dispatch.py): oneDNN's bf16 GEMM is several times fp32's speed with AMX, but where bf16 is
emulated it is a fraction of it (a 257x1408 @ 1408x6144 product: 73 ms in bf16, 16 ms in fp32 on
an AVX-512 VM without bf16 instructions), and on a VM that reports AVX512_BF16 but hides AMX it was
still 1.6x slower for an image's 257 rows (yet faster for a prompt's 33). So `bf16.many` is
measured: from the row count where fp32 wins, the backend's layers compute products in fp32 from
the bf16 weights, upcast into a reused buffer (a fresh fp32 copy of a weight costs 7x the copy into
a warm buffer: page faults). Products of two bf16 numbers are exact in
fp32 and both paths accumulate in fp32, so only the summation order differs.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import dispatch

def _measure_many() -> tuple[int, dict[str, float]]:
    """The fewest rows from which fp32 beats bf16 on a ViT-g-sized weight (4224 x 1408, its fused
    q/k/v): 256 rows first (an image is 257 tokens), then halving while fp32 still wins; 0 if it does
    not win at 256. Prefill of a short prompt (tens of rows) may stay in bf16 while the ViT goes fp32."""
    w = dispatch.synthetic(4224, 1408, scale=0.02)
    times: dict[str, float] = {}
    rows = 0
    for m in (256, 128, 64, 32, 16):
        x = dispatch.synthetic(m, 1408, seed=m)
        t = dispatch.measure({"bf16": lambda: F.linear(x, w),
                              "fp32": lambda: F.linear(x.float(), fp32_weight(w)).to(torch.bfloat16)},
                             budget_s=0.6)
        times[f"bf16@{m}"], times[f"fp32@{m}"] = t["bf16"], t["fp32"]
        if dispatch.pick(t, "bf16") != "fp32":
            break
        rows = m
    return rows, times


dispatch.register("bf16.many", 0, _measure_many)


def fp32_faster(x: torch.Tensor) -> bool:
    """x is bf16 on CPU with enough rows that its product runs faster in fp32 here (as measured)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    rows = int(dispatch.choice("bf16.many"))
    return 0 < rows <= x.numel() // x.shape[-1]


_scratch = threading.local()


def scratch(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-thread buffer of n elements of dtype, kept between calls (for inference only): a fresh
    allocation of a weight's size is an mmap that page-faults on every call (4x slower than a copy)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


def fp32_weight(w: torch.Tensor) -> torch.Tensor:
    """w in fp32: in the scratch buffer for inference, a fresh copy with grad enabled (autograd
    keeps it for the backward pass)."""
    if torch.is_grad_enabled():
        return w.float()
    return scratch(w.numel()).view(w.shape).copy_(w)
