"""The C kernels (kernels.c) as torch functions: block layout changes, products with blocked
weights, and a decode step's attention over a bf16 KV cache.

Why. A decode step is a matrix-vector product per linear layer: its speed is the rate at which the
weights come in from memory. On this project's 2-core AVX-512 VM, torch reads row-major bf16
weights at 19-25 GB/s (`torch.mv`), int8 ones at 13-17 GB/s (`_weight_int8pack_mm`) and int4 ones
at about 18 (`_weight_int4pack_mm_for_cpu`), where a plain fp32 sum reads 28-30; kernels.c reads
weights stored in small row blocks (layout.py) at 26-31 GB/s in all three.

Every function here needs the library (build.lib() not None); callers check first.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .build import lib
from .layout import BLOCK, blocks_of


# --- the layout ---
def write_blocks(w: Tensor, out: Tensor, block: tuple[int, int]) -> Tensor:
    """Write row-major w (N, K) into out, a contiguous (N, K) tensor (of w's dtype, or another float
    dtype to convert to) that does not overlap w, in the block layout. Returns out."""
    N, K = w.shape
    R, C = block
    if w.dtype == torch.uint8:  # int4, from torch's int4pack format
        lib().q4_pack(w.data_ptr(), out.data_ptr(), N, 2 * K, torch.get_num_threads())
    else:
        out.view(N // R, K // C, R, C).copy_(blocks_of(w, R, C))
    return out


def blocked_copy(w: Tensor, block: tuple[int, int]) -> Tensor:
    """Row-major (N, K) -> blocked, same shape and dtype: always a new tensor (where K == C the
    blocked view is already contiguous, and .contiguous() would hand back w itself)."""
    return write_blocks(w.contiguous(), torch.empty_like(w, memory_format=torch.contiguous_format), block)


def reblock_in_place(w: Tensor, block: tuple[int, int], scratch: Tensor | None = None) -> Tensor:
    """Lay w's own memory out in blocks (through a temporary, or `scratch`, a uint8 buffer of at
    least w's bytes that is reused across calls). Returns w."""
    n = w.numel() * w.element_size()
    tmp = scratch[:n].view(w.dtype).view(w.shape) if scratch is not None else torch.empty_like(w)
    w.copy_(write_blocks(w, tmp, block))
    return w


def row_major_copy(w: Tensor, block: tuple[int, int]) -> Tensor:
    """Blocked (N, K) -> row-major, a new tensor."""
    N, K = w.shape
    R, C = block
    if w.dtype == torch.uint8:
        src, out = w.contiguous(), torch.empty_like(w, memory_format=torch.contiguous_format)
        lib().q4_unpack(src.data_ptr(), out.data_ptr(), N, 2 * K, torch.get_num_threads())
        return out
    return w.view(N // R, K // C, R, C).transpose(1, 2).contiguous().view(N, K)


def to_f32(w: Tensor, out: Tensor, sz: Tensor | None = None) -> Tensor:
    """Blocked int8/bf16 (N, K) -> row-major fp32 values, written into out (N*K fp32 elements).
    Blocked int4 (N, K/2) with its scales and zeros sz -> the dequantized (N, K) weight."""
    nt = torch.get_num_threads()
    lb = lib()
    if w.dtype == torch.uint8:
        N, K = w.shape[0], 2 * w.shape[1]
        o = out[: N * K].view(N, K)
        lb.q4_unpack_f32(w.data_ptr(), N, K, K // sz.shape[0], sz.data_ptr(), int(sz.dtype == torch.float32),
                         o.data_ptr(), nt)
        return o
    N, K = w.shape
    o = out[: N * K].view(N, K)
    f = lb.q8_unpack_f32 if w.dtype == torch.int8 else lb.bf16_unpack_f32
    f(w.data_ptr(), N, K, o.data_ptr(), nt)
    return o


# --- the products ---
def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def _mm(x: Tensor, w: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], dot: bool = True) -> Tensor:
    """x (M, K) fp32 or bf16 contiguous, w blocked (N, K) -> (M, N) in x's dtype (computed in fp32).
    For int4 w (uint8, (N, K/2)), scale is its (K/G, N, 2) scales and zeros, bf16 or fp32. bf16 x
    with bf16 w, several rows: by VDPBF16PS where `bf16.dot` measured it faster (unless dot=False)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    nt = torch.get_num_threads()
    bf = x.dtype == torch.bfloat16
    lb = lib()
    if w.dtype == torch.uint8:
        f = lb.q4_mm_bf16 if bf else lb.q4_mm
        f(w.data_ptr(), N, K, K // scale.shape[0], x.data_ptr(), M, scale.data_ptr(),
          int(scale.dtype == torch.float32), _ptr(bias), y.data_ptr(), nt)
    elif w.dtype == torch.int8:
        f = lb.q8_mm_bf16 if bf else lb.q8_mm
        f(w.data_ptr(), N, K, x.data_ptr(), M, _ptr(scale), _ptr(bias), y.data_ptr(), nt)
    elif bf and dot and M > 1 and dispatch.choice("bf16.dot") == "dot":
        return bf16_dot(x, w, bias)
    else:
        f = lb.bf16_mm_bf16 if bf else lb.bf16_mm
        f(w.data_ptr(), N, K, x.data_ptr(), M, _ptr(bias), y.data_ptr(), nt)
    return y


@torch.library.custom_op("blip2::blocked_mm", mutates_args=())
def _blocked_mm_op(x: Tensor, w: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    return _mm(x, w, scale, bias)


@_blocked_mm_op.register_fake
def _(x, w, scale, bias):
    return x.new_empty(x.shape[0], w.shape[0])  # in x's dtype


def blocked_mm(x: Tensor, w: Tensor, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """y = (x @ row-major(w)^T) * scale + bias computed in fp32; x (M, K) any float dtype, scale and
    bias (N,) fp32 contiguous (Blocked.fp32_extras keeps them so; for int4, scale is the (K/G, N, 2)
    scales and zeros, bf16 or fp32). y is bf16 for bf16 x (rounded once, in C), else fp32."""
    x = x.contiguous() if x.dtype == torch.bfloat16 else x.float().contiguous()
    if torch.compiler.is_compiling():
        return _blocked_mm_op(x, w, scale, bias)  # opaque to the compiler
    return _mm(x, w, scale, bias)  # eager: skip the op dispatcher (~10 us a call)


def dot_built() -> bool:
    """Whether the kernels have bf16_dot_mm here: bf16 x bf16 products by VDPBF16PS (AVX512_BF16)."""
    lb = lib()
    return lb is not None and bool(lb.bf16_dot_built())


def bf16_dot(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (M, K) bf16 @ row-major(w)^T + bias by VDPBF16PS, whatever M and `bf16.dot` say (tests,
    benchmarks, the measurement); needs dot_built()."""
    M, K = x.shape
    N = w.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.bfloat16)
    f = lib().bf16_dot_mm
    f.argtypes, f.restype = lib().bf16_mm.argtypes, None
    f(w.data_ptr(), N, K, x.data_ptr(), M, _ptr(bias), y.data_ptr(), torch.get_num_threads())
    return y


def _measure_dot() -> tuple[str, dict[str, float]]:
    """bf16 x against a blocked bf16 weight, 32 rows (a prompt's prefill): the FMA kernel (each weight
    converted to fp32) or VDPBF16PS, whose speed varies by CPU (slower than fp32 FMA on a Xeon)."""
    if not dot_built():
        return "fma", {}
    wb = blocked_copy(dispatch.synthetic(4096, 2560, scale=0.02), BLOCK[torch.bfloat16])
    x = dispatch.synthetic(32, 2560, seed=32)
    times = dispatch.measure({"fma": lambda: _mm(x, wb, None, None, dot=False), "dot": lambda: bf16_dot(x, wb)},
                             reps=7, budget_s=0.5)
    return dispatch.pick(times, "fma"), times


dispatch.register("bf16.dot", "fma", _measure_dot)


# --- attention in a decode step ---
def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor | None:
    """SDPA for one query per row (a decode step) over a bf16 KV cache, read as it is: q (B, H, 1, D),
    k and v (B, H, S, D) with contiguous (S, D) rows and heads evenly spaced (a whole cache, or the
    live front of one), mask None or bool broadcastable from (B, 1, 1, S) (True = attend).
    Returns (B, H, 1, D) bf16, computed in fp32 and rounded once; None where this does not apply
    (then use SDPA)."""
    B, H, T, D = q.shape
    lb = lib()
    if (lb is None or torch.compiler.is_compiling() or T != 1 or k.shape != (B, H, k.shape[2], D)
            or k.shape != v.shape or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in (q, k, v))
            or k.stride() != v.stride() or k.stride()[2:] != (D, 1) or k.stride(0) != H * k.stride(1)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        return None
    S = k.shape[2]
    m = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != S:
            return None
        m = mask.expand(B, 1, 1, S).reshape(B, S).contiguous().view(torch.uint8)
    qc = q.reshape(B, H, D).contiguous()
    y = torch.empty(B, 1, H, D, dtype=torch.bfloat16)
    lb.attn1_bf16(qc.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(m), B, H, S, D, k.stride(1), scale, y.data_ptr(),
                  torch.get_num_threads())
    return y.transpose(1, 2)
