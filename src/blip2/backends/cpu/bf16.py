"""bf16 products with many rows, and the scratch buffers the faster paths use.

Whether bf16 matrix products run faster in bf16 or in fp32 depends on the CPU, and its flags do not
tell (dispatch.py): oneDNN's bf16 GEMM is several times fp32's speed with AMX, but where bf16 is
emulated it is a fraction of it (a 257x1408 @ 1408x6144 product: 73 ms in bf16, 16 ms in fp32 on
an AVX-512 VM without bf16 instructions), and on a VM that reports AVX512_BF16 but hides AMX it was
still 1.6x slower. So `bf16.many` is measured: where fp32 wins, the backend's layers compute
products with many rows in fp32 from the bf16 weights. Products of two bf16 numbers are exact in
fp32 and both paths accumulate in fp32, so only the summation order differs.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import dispatch

MANY_ROWS = 16  # from this many rows a bf16 product counts as `bf16.many` (measured crossover, 2-core AVX-512 VM)


def _measure_many() -> tuple[str, dict[str, float]]:
    """Prefill / vision: 128 rows (a ViT-g image is 257) against a 2048x2048 weight."""
    w, x = dispatch.synthetic(2048, 2048, scale=0.02), dispatch.synthetic(128, 2048, seed=1)
    times = dispatch.measure({"bf16": lambda: F.linear(x, w),
                              "fp32": lambda: F.linear(x.float(), fp32_weight(w)).to(torch.bfloat16)})
    return dispatch.pick(times, "bf16"), times


dispatch.register("bf16.many", "bf16", _measure_many)


def fp32_faster(x: torch.Tensor) -> bool:
    """x is bf16 on a CPU where bf16 products with many rows run faster in fp32 (as measured)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and dispatch.choice("bf16.many") == "fp32"


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
