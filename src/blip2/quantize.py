"""Weight-only int8 / int4 quantization of a language model's linear layers.

Decoding one token reads every weight of the language model once, so on a CPU its speed is set by
bytes per weight: bf16 2, int8 1, int4 0.5 (+ scales). Activations stay in bf16/fp32; only the
stored weights shrink, and PyTorch's native CPU kernels dequantize on the fly:

    Int8Linear: w ≈ q * s,                 q int8 (N, K), s (N,) per output channel, symmetric
                y = _weight_int8pack_mm(x, q, s) + b
    Int4Linear: w ≈ (q - 8) * s_g + z_g,   q in [0, 15] per group of G input columns, asymmetric
                y = _weight_int4pack_mm_for_cpu(x, packed q, G, (s, z)) + b

Elsewhere (CUDA, or a build without the kernels) both fall back to dequantize + matmul.

The output head (`lm_head`) stays in float by default: it is small next to the decoder stack in
BLIP-2's LMs, the logits are where quantization error shows first, and it is usually tied to the
input embedding (which is a lookup, not a matmul, and is never quantized).

A quantized model records {"mode", "group_size", "include_head"} as `quantization` on the
language model's config (inside `text_config` of a BLIP-2 config.json), so save_pretrained writes
the int tensors + scales and from_pretrained rebuilds the quantized modules before loading.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("int8", "int4")
INT4_BLOCK_N = 64  # the CPU int4 kernel packs output channels in blocks of 64


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _meta_weight(n: int, k: int, dtype: torch.dtype) -> Tensor:
    # Code that sizes caches from `layer.weight.dtype` / `.shape` keeps working; no data is held.
    return torch.empty((n, k), dtype=dtype, device="meta")


class Int8Linear(nn.Module):
    """Linear with int8 weights (N, K), one scale per output channel and an optional float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def weight(self) -> Tensor:
        """A data-less stand-in with the compute dtype and the float shape (see `dequantize`)."""
        return _meta_weight(self.out_features, self.in_features, self.scales.dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype=w.dtype, device=w.device)
        if not w.is_meta:
            with torch.no_grad():
                wf = w.float()  # (N, K)
                s = wf.abs().amax(1).clamp_min(1e-12) / 127.0  # (N,)
                s = s.to(w.dtype).float()  # quantize against the scale we will store
                m.qweight.copy_(torch.round(wf / s[:, None]).clamp_(-128, 127).to(torch.int8))
                m.scales.copy_(s.to(w.dtype))
                if lin.bias is not None:
                    m.bias.copy_(lin.bias)
        return m

    def dequantize(self) -> Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]  # (N, K)

    def forward(self, x: Tensor) -> Tensor:
        dt = self.scales.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dt)  # (M, K)
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


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) ints in [0, 15] -> (N, K/2) uint8 in the CPU kernel's layout (N a multiple of 64):
    each block of 64 rows is stored as K rows of 32 bytes; byte (k, j) holds row j's value in its
    low nibble and row 32+j's in its high nibble. Same bytes as _convert_weight_to_int4pack_for_cpu."""
    N, K = q.shape
    q = q.to(torch.uint8).reshape(N // INT4_BLOCK_N, 2, 32, K)  # (nb, hi/lo, j, K)
    b = q[:, 0] | (q[:, 1] << 4)  # (nb, 32, K)
    return b.transpose(1, 2).contiguous().reshape(N, K // 2)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of pack_int4: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    N, K = p.shape[0], p.shape[1] * 2
    b = p.reshape(N // INT4_BLOCK_N, K, 32).transpose(1, 2)  # (nb, 32, K)
    return torch.stack((b & 15, b >> 4), 1).reshape(N, K)


class Int4Linear(nn.Module):
    """Linear with 4-bit weights, one (scale, zero) pair per group of `group_size` input columns."""

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

    @property
    def weight(self) -> Tensor:
        return _meta_weight(self.out_features, self.in_features, self.scales_and_zeros.dtype)

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
                wg = w.float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
                lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/G)
                s = ((hi - lo).clamp_min(1e-6) / 15).to(w.dtype).float()
                z = (lo + 8 * s).to(w.dtype).float()  # w ≈ (q - 8) s + z, so q = 0 gives lo
                q = torch.round((wg - z[..., None]) / s[..., None] + 8).clamp_(0, 15).reshape(N, K)
                if w.device.type == "cpu" and _has_op("_convert_weight_to_int4pack_for_cpu"):
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
                else:
                    packed = pack_int4(q)
                m.qweight.copy_(packed)
                m.scales_and_zeros.copy_(torch.stack((s, z), -1).transpose(0, 1).to(w.dtype))
                if lin.bias is not None:
                    m.bias.copy_(lin.bias)
        return m

    def dequantize(self) -> Tensor:
        q = unpack_int4(self.qweight).to(self.scales_and_zeros.dtype)  # (N, K)
        sz = self.scales_and_zeros.repeat_interleave(self.group_size, 0)  # (K, N, 2)
        return (q - 8) * sz[..., 0].T + sz[..., 1].T

    def forward(self, x: Tensor) -> Tensor:
        dt = self.scales_and_zeros.dtype
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
    cfg = getattr(module, "config", None)
    if cfg is not None:
        cfg.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None,
                            "include_head": include_head}
    return module


def _settings(q: dict[str, Any]) -> dict[str, Any]:
    out = {"mode": q["mode"], "include_head": bool(q.get("include_head", False))}
    if q.get("group_size"):
        out["group_size"] = int(q["group_size"])
    return out


def load_and_quantize(model: nn.Module, reader, d, dtype: torch.dtype, device: torch.device, quantize: str | None) -> None:
    """from_pretrained's loading step for quantized models (`model` is still on the meta device).

    A checkpoint saved quantized (its LM config has `quantization`): rebuild those modules, then
    load the int tensors. A float checkpoint with quantize="int8"/"int4": load, then quantize.
    """
    lm = getattr(model, "language_model", None)
    if lm is None:
        raise ValueError(f"quantize={quantize!r}: {type(model).__name__} has no language model; quantization "
                         "applies to the language model of Blip2ForConditionalGeneration / Blip2Model")
    saved = getattr(getattr(lm, "config", None), "quantization", None)
    if saved:
        if quantize is not None and quantize != saved["mode"]:
            raise ValueError(f"quantize={quantize!r}: {d} is already quantized as {saved['mode']}; "
                             "load it without quantize= (or from the float checkpoint)")
        quantize_(lm, **_settings(saved))
        model._load_from(reader, d, dtype, device)
    else:
        model._load_from(reader, d, dtype, device)
        mode, _, g = str(quantize).partition("-")  # "int4-128": group size 128
        quantize_(lm, mode, group_size=int(g) if g else 32)
