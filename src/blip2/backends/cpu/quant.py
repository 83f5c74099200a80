"""Weight-only int8 / int4 quantization of a language model's linear layers.

Decoding one token reads every weight of the language model once, so on a CPU its speed is set by
bytes per weight: bf16 2, int8 1, int4 0.5 (+ scales). Activations stay in bf16/fp32; only the
stored weights shrink, and the kernels dequantize on the fly:

    Int8Linear: w ≈ q * s,                 q int8 (N, K), s (N,) per output channel, symmetric
                y = _weight_int8pack_mm(x, q, s) + b
    Int4Linear: w ≈ (q - 8) * s_g + z_g,   q in [0, 15] per group of G input columns, asymmetric
                y = _weight_int4pack_mm_for_cpu(x, int4pack q, G, (s, z)) + b

Those are PyTorch's native CPU kernels; a loaded model's layers run on this backend's own
(kernels.py: the same sums in fp32, rounded once, streaming the weights faster). Elsewhere (CUDA,
or a build without either) both fall back to dequantize + matmul. A quantized layer is called as
any linear layer is, `layer(x)`, and returns x's dtype.

The output head (`lm_head`) stays in float by default: it is small next to the decoder stack in
BLIP-2's LMs, the logits are where quantization error shows first, and it is usually tied to the
input embedding (which is a lookup, not a matmul, and is never quantized).

A quantized model records {"mode", "group_size", "include_head"} as `quantization` on the
language model's config (inside `text_config` of a BLIP-2 config.json), so save_pretrained writes
the int tensors + scales and from_pretrained rebuilds the quantized modules before loading
(loading.py: quantize_on_load).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dispatch, kernels
from .bf16 import fp32_faster, fp32_weight
from .build import lib
from .layout import BLOCK, INT4_BLOCK_N, from_int4pack, scales_blocked, scales_in_rows, to_int4pack
from .linear import Blocked, block_layers_, blocked_linear, unblock_layers_

MODES = ("int8", "int4")


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def quant8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> int8 q (N, K), scales (N,) in w's dtype. Rows are independent, so a block of
    rows quantizes to the same bytes alone as inside the whole matrix (streamed loading relies on it)."""
    wf = w.to(torch.float32, copy=True)  # (N, K); a copy, since the steps below work in place
    # max |w| = max(hi, -lo), exactly; two vectorized reductions beat abs() + amax (no (N, K) temp)
    # and torch.aminmax (not vectorized on CPU in torch 2.13: 6x slower)
    s = torch.maximum(wf.amax(1), wf.amin(1).neg()).clamp_min(1e-12) / 127.0  # (N,)
    s = s.to(w.dtype).float()  # quantize against the scale we will store
    q = wf.div_(s[:, None]).round_().clamp_(-128, 127).to(torch.int8)
    return q, s.to(w.dtype)


def quant4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(N, K) float, N % 64 == 0 -> q (N, K/2) uint8 in torch's int4pack format, scales_and_zeros
    (K/G, N, 2) in w's dtype. Each block of 64 rows is stored on its own, so row blocks that are
    multiples of 64 quantize while streaming."""
    N, K = w.shape
    wg = w.to(torch.float32, copy=True).reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/G)
    s = ((hi - lo).clamp_min(1e-6) / 15).to(w.dtype).float()
    z = (lo + 8 * s).to(w.dtype).float()  # w ≈ (q - 8) s + z, so q = 0 gives lo
    q = wg.sub_(z[..., None]).div_(s[..., None]).add_(8).round_().clamp_(0, 15).reshape(N, K)
    if w.device.type == "cpu" and _has_op("_convert_weight_to_int4pack_for_cpu"):
        q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    else:
        q4 = to_int4pack(q)
    return q4, torch.stack((s, z), -1).transpose(0, 1).to(w.dtype)


def _measure_one(mode: str) -> tuple[str, dict[str, float]]:
    """A decode step's product with an int8 / int4 weight of a wide layer: torch's kernel on its own
    layout against ours on the block layout (int weights are blocked only if ours wins)."""
    w, x = dispatch.synthetic(8192, 2560, scale=0.02), dispatch.synthetic(1, 2560, seed=1)
    if mode == "int8":
        q, s = quant8(w)
        cands = {"torch": (lambda: torch.ops.aten._weight_int8pack_mm(x, q, s)) if _has_op("_weight_int8pack_mm")
                 else (lambda: F.linear(x, q.to(x.dtype)) * s)}
        if lib() is not None:
            qb, sf = kernels.blocked_copy(q, BLOCK[torch.int8]), s.float()
            cands["kernel"] = lambda: kernels.blocked_mm(x, qb, sf)
    else:
        q, sz = quant4(w, 32)
        op = "_weight_int4pack_mm_for_cpu"
        cands = {"torch": (lambda: getattr(torch.ops.aten, op)(x, q, 32, sz)) if _has_op(op)
                 else (lambda: F.linear(x, torch.zeros(8192, 2560, dtype=x.dtype)))}  # dequantize + matmul, at least
        if lib() is not None:
            qb, szb = kernels.blocked_copy(q, BLOCK[torch.uint8]), scales_blocked(sz)
            cands["kernel"] = lambda: kernels.blocked_mm(x, qb, szb)
    times = dispatch.measure(cands)
    return dispatch.pick(times, "torch"), times


dispatch.register("int8.one", "torch", lambda: _measure_one("int8"))
dispatch.register("int4.one", "torch", lambda: _measure_one("int4"))

INT8_UPCAST_MIN_ROWS = 64  # measured crossover (2-core AVX-512 VM): _weight_int8pack_mm wins below


class Int8Linear(Blocked, nn.Module):
    """Linear with int8 weights (N, K), one scale per output channel and an optional float bias.
    On CPU its qweight may be held in the block layout (linear.Blocked), which kernels.c streams faster."""

    weight_name = "qweight"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype=w.dtype, device=w.device)
        if not w.is_meta:
            with torch.no_grad():
                q, s = quant8(w)
                m.qweight.copy_(q)
                m.scales.copy_(s)
                if lin.bias is not None:
                    m.bias.copy_(lin.bias)
        return m

    def dequantize(self) -> Tensor:
        return self.row_major_weight().to(self.scales.dtype) * self.scales[:, None]  # (N, K)

    def forward(self, x: Tensor) -> Tensor:
        dt = self.scales.dtype
        if self.block is not None:
            if self.blocked_serves(x):
                y = blocked_linear(x.to(dt), self.qweight, *self.fp32_extras())  # fp32, scaled, biased
                return y.to(dt).to(x.dtype)
            self.to_rows_()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dt)  # (M, K)
        if fp32_faster(x2) and x2.shape[0] >= INT8_UPCAST_MIN_ROWS:
            # many rows (prefill, batches) where bf16 GEMMs are slower than fp32: the int8 kernel is
            # compute-bound there, and fp32 GEMM on the int8 values (exact in fp32) is up to 1.7x
            # faster; the scales are applied in fp32 and the result rounded to bf16 once
            y = F.linear(x2.float(), fp32_weight(self.qweight)) * self.scales.float()
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(dt).reshape(*lead, self.out_features).to(x.dtype)
        # torch 2.13's bf16 kernel reads past the row when K % 16 != 0 (wrong sums, or a segfault)
        if x2.device.type == "cpu" and self.in_features % 16 == 0 and _has_op("_weight_int8pack_mm"):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)  # (M, N)
        else:
            # x @ q^T then scale the columns: same numbers as dequantizing first, N*K fewer multiplies
            y = F.linear(x2, self.qweight.to(dt)) * self.scales
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(Blocked, nn.Module):
    """Linear with 4-bit weights, one (scale, zero) pair per group of `group_size` input columns.
    On CPU its qweight may be held in the block layout (linear.Blocked)."""

    weight_name = "qweight"
    fuses = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 dtype=torch.float32, device=None):
        super().__init__()
        if out_features % INT4_BLOCK_N or in_features % group_size:
            raise ValueError(f"int4 needs out_features % {INT4_BLOCK_N} == 0 and in_features % group_size == 0; "
                             f"got ({out_features}, {in_features}), group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.qweight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False)
        # (K/G, N, 2): [..., 0] scale, [..., 1] zero, the kernel's layout
        self.scales_and_zeros = nn.Parameter(
            torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @staticmethod
    def supports(lin: nn.Linear, group_size: int) -> bool:
        return lin.out_features % INT4_BLOCK_N == 0 and lin.in_features % group_size == 0

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 32) -> "Int4Linear":
        w = lin.weight
        N, K = w.shape
        m = cls(K, N, lin.bias is not None, group_size, dtype=w.dtype, device=w.device)
        if not w.is_meta:
            with torch.no_grad():
                q4, sz = quant4(w, group_size)
                m.qweight.copy_(q4)
                m.scales_and_zeros.copy_(sz)
                if lin.bias is not None:
                    m.bias.copy_(lin.bias)
        return m

    # While blocked, scales_and_zeros keeps its shape (K/G, N, 2) but holds (N/64, K/G, 64, 2): the
    # kernel reads it block by block, alongside the weight.
    def _companions_(self, blocked: bool) -> None:
        sz = self.scales_and_zeros.data
        sz.copy_(scales_blocked(sz) if blocked else scales_in_rows(sz))

    def row_major(self) -> dict[str, Tensor]:
        sz = self.scales_and_zeros.detach()
        return {"qweight": self.row_major_weight(), "scales_and_zeros": sz if self.block is None else scales_in_rows(sz)}

    def compute_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def _fp32_scale(self) -> Tensor:
        sz = self.scales_and_zeros.detach()  # the kernels read it as it is, in bf16 or fp32
        return sz.contiguous() if sz.dtype in (torch.bfloat16, torch.float32) else sz.float().contiguous()

    def dequantize(self) -> Tensor:
        t = self.row_major()
        q = from_int4pack(t["qweight"]).to(self.scales_and_zeros.dtype)  # (N, K)
        sz = t["scales_and_zeros"].repeat_interleave(self.group_size, 0)  # (K, N, 2)
        return (q - 8) * sz[..., 0].T + sz[..., 1].T

    def forward(self, x: Tensor) -> Tensor:
        dt = self.scales_and_zeros.dtype
        if self.block is not None:
            if self.blocked_serves(x):
                return blocked_linear(x.to(dt), self.qweight, *self.fp32_extras()).to(dt).to(x.dtype)
            self.to_rows_()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dt)  # (M, K)
        if x2.device.type == "cpu" and _has_op("_weight_int4pack_mm_for_cpu"):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.qweight, self.group_size, self.scales_and_zeros)
        else:
            y = F.linear(x2, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def quantize_(module: nn.Module, mode: str = "int8", group_size: int = 32, include_head: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear inside `module` with Int8Linear / Int4Linear.

    `lm_head` is skipped unless include_head (and never when it shares its weight with the
    embedding). int4 leaves in float any layer whose shape the kernel cannot take (out % 64,
    in % group_size). Works on meta modules too (shapes only; used to rebuild before loading).
    Records the settings as `module.config.quantization` when the module has a config.
    """
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: use one of {MODES}")
    if mode == "int4" and group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size {group_size}: use 32, 64, 128 or 256")
    if include_head:
        head = getattr(module, "lm_head", None)
        emb = getattr(module, "get_input_embeddings", lambda: None)()
        if head is not None and emb is not None and head.weight is emb.weight:
            raise ValueError("include_head: the output head is tied to the input embedding; quantizing it "
                             "would untie them. Quantize without include_head")
    blocked = any(getattr(m, "block", None) for m in module.modules())
    unblock_layers_(module)  # quantize from row-major weights
    targets = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if name.split(".")[-1] == "lm_head" and not include_head:
            continue
        if mode == "int4" and not Int4Linear.supports(m, group_size):
            continue
        targets.append((name, m))
    for name, m in targets:
        q = Int8Linear.from_linear(m) if mode == "int8" else Int4Linear.from_linear(m, group_size)
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, q)
    if blocked:
        block_layers_(module)
    cfg = getattr(module, "config", None)
    if cfg is not None:
        cfg.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None,
                            "include_head": include_head}
    return module


def quantize_kwargs(q: dict[str, Any]) -> dict[str, Any]:
    """quantize_'s keyword arguments from a config's saved `quantization`."""
    out = {"mode": q["mode"], "include_head": bool(q.get("include_head", False))}
    if q.get("group_size"):
        out["group_size"] = int(q["group_size"])
    return out
