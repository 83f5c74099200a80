"""Small numeric building blocks shared by the towers.

`Linear` is nn.Linear with one CPU fast path: on CPUs without native bf16 matrix instructions
(no AVX512_BF16 / AMX), oneDNN emulates bf16 GEMMs at a fraction of fp32 speed (measured here:
a 257x1408 @ 1408x6144 product takes 73 ms in bf16 and 16 ms in fp32). For inputs with many rows
(the ViT, prefill, batches) we compute in fp32 from the bf16 weights instead: the products of two
bf16 numbers are exact in fp32 and both paths accumulate in fp32, so only the summation order
differs. Decode steps (few rows) are bandwidth-bound and stay in bf16, which reads half the
bytes; a single row goes through torch.mv, whose bf16 kernel streams the weights faster.
A layer whose weight kernels.py has block-packed (the language model's, on CPU) runs up to 47 rows
through kernels.c instead, and more as an fp32 GEMM on the weight unpacked into a reused buffer.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels


UPCAST_MIN_ROWS = 16  # measured crossover on a 2-core AVX-512 VM: below it the bf16 kernel wins


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
    """x is bf16 on a CPU that only emulates bf16 matrix products (where the fast paths apply)."""
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


def packed_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """(x @ W^T) * scale + bias, computed in fp32, for a block-packed w (see kernels.py); scale and
    bias fp32 (for int4 w, scale is its scales and zeros). Few rows go through the streaming kernels (the result in bf16 for bf16 x, rounded
    once), many as one fp32 GEMM on the weight unpacked into the scratch buffer (fp32). Callers cast."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    N = w.shape[0]
    if x2.shape[0] < kernels.GEMV_MAX_ROWS:
        y = kernels.packed_mm(x2, w, scale, bias)
    elif w.dtype == torch.uint8:  # int4: scale is its scales and zeros, applied while unpacking
        y = F.linear(x2.float(), kernels.unpack_f32(w, scratch_f32(N * x2.shape[1]), scale))
        if bias is not None:
            y = y + bias
    else:
        y = F.linear(x2.float(), kernels.unpack_f32(w, scratch_f32(w.numel())))
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
    return y.view(*x.shape[:-1], N)


# --- layers that share one kernel call ---
def fusable(layers) -> bool:
    """Layers whose products fused_linear can serve together: two or more of one Packable class that
    `fuses`, with biases on all or none."""
    kinds = {type(lay) for lay in layers}
    return (len(layers) > 1 and len(kinds) == 1 and issubclass(kinds.pop(), kernels.Packable) and layers[0].fuses
            and len({getattr(lay, "bias", None) is None for lay in layers}) == 1)


def fused_linear(x: Tensor, layers) -> Tensor | None:
    """The outputs of `layers` on x, concatenated on the last dim, from one kernel call; or None where
    that cannot be done (then call the layers). It can when the layers are packed, their weights lie
    back to back in one buffer (from_pretrained loads the groups a module lists in `fuse_packed` so),
    x has few rows and is in the layers' compute dtype: then the result is bitwise that of the layers
    (each output is the same sum, rounded once). One call instead of three saves the per-call cost
    and the kernel's ramp-up at each start: about 1.5 ms a token for OPT-2.7b's q/k/v in int8."""
    if (torch.compiler.is_compiling() or x.numel() >= kernels.GEMV_MAX_ROWS * x.shape[-1]
            or not all(lay.block is not None and lay.packed_ok(x) for lay in layers)):
        return None
    first = layers[0]
    if x.dtype != first.compute_dtype():
        return None
    extras = tuple(lay.fp32_extras() for lay in layers)
    ws = [getattr(lay, lay.packed_name) for lay in layers]
    ptrs = [w.data_ptr() for w in ws]
    c = first.__dict__.get("_fused")  # (extras, ptrs, W, scale, bias), rebuilt when either changed
    if c is None or any(a is not b for a, b in zip(c[0], extras)) or c[1] != ptrs:
        w0, K, end = ws[0], ws[0].shape[1], ptrs[0]
        for w, p in zip(ws, ptrs):  # back to back in one storage?
            if (p != end or w.shape[1] != K or w.dtype != w0.dtype
                    or w.untyped_storage().data_ptr() != w0.untyped_storage().data_ptr()):
                return None
            end += w.numel() * w.element_size()
        W = w0.new_empty(0).set_(w0.untyped_storage(), w0.storage_offset(), (sum(w.shape[0] for w in ws), K))
        scale, bias = (None if extras[0][i] is None else torch.cat([e[i] for e in extras]) for i in (0, 1))
        c = first.__dict__["_fused"] = (extras, ptrs, W, scale, bias)
    return packed_linear(x, c[2], c[3], c[4])


class Linear(kernels.Packable, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is not None:
            if self.packed_ok(x):
                return packed_linear(x, self.weight, *self.fp32_extras()).to(x.dtype)
            self.unpack_()
        elif self.packed_copy and (w := self.kernel_copy(x)) is not None:
            return packed_linear(x, w, *self.fp32_extras()).to(x.dtype)
        if emulated_bf16(x):
            rows = x.numel() // x.shape[-1]
            if rows == 1 and self.weight.dtype == torch.bfloat16:
                # one row (a decode step): torch.mv's bf16 dot-product kernel streams the weights
                # about 1.5x faster than the GEMM path F.linear takes for a (1, K) input
                x1 = x.reshape(-1)
                y = torch.mv(self.weight, x1) if self.bias is None else torch.addmv(self.bias, self.weight, x1)
                return y.view(*x.shape[:-1], -1)
            if rows >= UPCAST_MIN_ROWS:
                b = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), fp32_weight(self.weight), b).to(x.dtype)
        return F.linear(x, self.weight, self.bias)
