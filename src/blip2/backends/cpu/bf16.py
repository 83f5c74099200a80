"""CPUs that only emulate bf16 matrix products, and the fp32 scratch buffer the faster paths use.

On CPUs without native bf16 matrix instructions (no AVX512_BF16 / AMX), oneDNN emulates bf16 GEMMs
at a fraction of fp32 speed (measured here: a 257x1408 @ 1408x6144 product takes 73 ms in bf16 and
16 ms in fp32). The backend's layers then compute products with many rows in fp32 from the bf16
weights: products of two bf16 numbers are exact in fp32 and both paths accumulate in fp32, so only
the summation order differs.
"""

from __future__ import annotations

import os
import threading

import torch

_native_bf16: bool | None = None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (read once; BLIP2_CPU_NATIVE_BF16=0/1 overrides).
    A plain module global rather than functools.cache, which torch.compile would trace through."""
    global _native_bf16
    if _native_bf16 is None:
        env = os.environ.get("BLIP2_CPU_NATIVE_BF16")
        if env is not None:
            _native_bf16 = env not in ("0", "false", "False")
        else:
            try:
                with open("/proc/cpuinfo") as f:
                    flags = f.read()
                _native_bf16 = any(x in flags for x in ("avx512_bf16", "amx_bf16"))
            except OSError:
                _native_bf16 = True  # not Linux: trust the library's kernels
    return _native_bf16


def emulated_bf16(x: torch.Tensor) -> bool:
    """x is bf16 on a CPU that only emulates bf16 matrix products (where the fp32 paths apply)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_has_native_bf16()


_scratch = threading.local()


def scratch_f32(n: int) -> torch.Tensor:
    """A per-thread fp32 buffer of n elements, kept between calls (for inference only): a fresh
    allocation of a weight's size is an mmap that page-faults on every call (4x slower than a copy)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n]


def fp32_weight(w: torch.Tensor) -> torch.Tensor:
    """w in fp32: in the scratch buffer for inference, a fresh copy with grad enabled (autograd
    keeps it for the backward pass)."""
    if torch.is_grad_enabled():
        return w.float()
    return scratch_f32(w.numel()).view(w.shape).copy_(w)
