"""Weight-only int8 / int4 quantization of a language model's linear layers.

Decoding one token reads every weight of the language model once, so on a CPU its speed is set by
bytes per weight: bf16 2, int8 1, int4 0.5 (+ scales). Activations stay in bf16/fp32; only the
stored weights shrink, and the kernels dequantize on the fly:

    Int8Linear: w ≈ q * s,                 q int8 (N, K), s (N,) per output channel, symmetric
                y = _weight_int8pack_mm(x, q, s) + b
    Int4Linear: w ≈ (q - 8) * s_g + z_g,   q in [0, 15] per group of G input columns, asymmetric
                y = _weight_int4pack_mm_for_cpu(x, packed q, G, (s, z)) + b

Those are PyTorch's native CPU kernels; a loaded model's layers run on this project's own
(kernels.py: the same sums in fp32, rounded once, streaming the weights faster). Elsewhere (CUDA,
or a build without either) both fall back to dequantize + matmul.

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

from . import kernels

from . import ops

MODES = ("int8", "int4")
INT4_BLOCK_N = 64  # the CPU int4 kernel packs output channels in blocks of 64


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _meta_weight(n: int, k: int, dtype: torch.dtype) -> Tensor:
    # Code that sizes caches from `layer.weight.dtype` / `.shape` keeps working; no data is held.
    return torch.empty((n, k), dtype=dtype, device="meta")


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
    """(N, K) float, N % 64 == 0 -> packed q (N, K/2) uint8, scales_and_zeros (K/G, N, 2) in w's
    dtype. Each block of 64 rows packs on its own, so row blocks that are multiples of 64 stream."""
    N, K = w.shape
    wg = w.to(torch.float32, copy=True).reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/G)
    s = ((hi - lo).clamp_min(1e-6) / 15).to(w.dtype).float()
    z = (lo + 8 * s).to(w.dtype).float()  # w ≈ (q - 8) s + z, so q = 0 gives lo
    q = wg.sub_(z[..., None]).div_(s[..., None]).add_(8).round_().clamp_(0, 15).reshape(N, K)
    if w.device.type == "cpu" and _has_op("_convert_weight_to_int4pack_for_cpu"):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    else:
        packed = pack_int4(q)
    return packed, torch.stack((s, z), -1).transpose(0, 1).to(w.dtype)


INT8_UPCAST_MIN_ROWS = 64  # measured crossover (2-core AVX-512 VM): _weight_int8pack_mm wins below


class Int8Linear(kernels.Packable, nn.Module):
    """Linear with int8 weights (N, K), one scale per output channel and an optional float bias.
    On CPU its qweight may be block-packed for kernels.c (kernels.pack_), which streams it faster."""

    packed_name = "qweight"

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
            if self.packed_ok(x):
                y = ops.packed_linear(x.to(dt), self.qweight, *self.fp32_extras())  # fp32, scaled, biased
                return y.to(dt).to(x.dtype)
            self.unpack_()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dt)  # (M, K)
        if ops.emulated_bf16(x2) and x2.shape[0] >= INT8_UPCAST_MIN_ROWS:
            # many rows (prefill, batches) on a CPU without bf16 instructions: the int8 kernel is
            # compute-bound there, and fp32 GEMM on the int8 values (exact in fp32) is up to 1.7x
            # faster; the scales are applied in fp32 and the result rounded to bf16 once
            y = F.linear(x2.float(), ops.fp32_weight(self.qweight)) * self.scales.float()
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


def _sz_blocked(sz: Tensor) -> Tensor:
    """(K/G, N, 2) -> the same shape holding (N/64, K/G, 64, 2): each block of 64 rows' pairs together."""
    g, N = sz.shape[:2]
    return sz.view(g, N // INT4_BLOCK_N, INT4_BLOCK_N, 2).transpose(0, 1).contiguous().view(g, N, 2)


def _sz_rows(sz: Tensor) -> Tensor:
    """Inverse of _sz_blocked."""
    g, N = sz.shape[:2]
    return sz.view(N // INT4_BLOCK_N, g, INT4_BLOCK_N, 2).transpose(0, 1).contiguous().view(g, N, 2)


class Int4Linear(kernels.Packable, nn.Module):
    """Linear with 4-bit weights, one (scale, zero) pair per group of `group_size` input columns.
    On CPU its qweight may be block-packed for kernels.c (kernels.pack_)."""

    packed_name = "qweight"
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
                packed, sz = quant4(w, group_size)
                m.qweight.copy_(packed)
                m.scales_and_zeros.copy_(sz)
                if lin.bias is not None:
                    m.bias.copy_(lin.bias)
        return m

    # While packed, scales_and_zeros keeps its shape (K/G, N, 2) but holds (N/64, K/G, 64, 2): the
    # kernel reads it block by block, alongside the weight.
    def _companions_(self, pack: bool) -> None:
        sz = self.scales_and_zeros.data
        sz.copy_(_sz_blocked(sz) if pack else _sz_rows(sz))

    def row_major(self) -> dict[str, Tensor]:
        sz = self.scales_and_zeros.detach()
        return {"qweight": self.row_major_weight(), "scales_and_zeros": sz if self.block is None else _sz_rows(sz)}

    def compute_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def _kernel_scale(self) -> Tensor:
        sz = self.scales_and_zeros.detach()  # the kernels read it as it is, in bf16 or fp32
        return sz.contiguous() if sz.dtype in (torch.bfloat16, torch.float32) else sz.float().contiguous()

    def dequantize(self) -> Tensor:
        t = self.row_major()
        q = unpack_int4(t["qweight"]).to(self.scales_and_zeros.dtype)  # (N, K)
        sz = t["scales_and_zeros"].repeat_interleave(self.group_size, 0)  # (K, N, 2)
        return (q - 8) * sz[..., 0].T + sz[..., 1].T

    def forward(self, x: Tensor) -> Tensor:
        dt = self.scales_and_zeros.dtype
        if self.block is not None:
            if self.packed_ok(x):
                return ops.packed_linear(x.to(dt), self.qweight, *self.fp32_extras()).to(dt).to(x.dtype)
            self.unpack_()
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
    packed = any(getattr(m, "block", None) for m in module.modules())
    kernels.unpack_all_(module)  # quantize from row-major weights
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
    if packed:
        kernels.pack_(module)
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


# Float rows quantized per step when streaming: 2M elements (8 MiB as fp32) keeps the temporaries
# small next to any real model, yet large enough that the per-call overhead is noise.
STREAM_ELEMS = 1 << 21
class _StreamingReader:
    """The checkpoint as the quantized model wants it: each float `X.weight` of a quantized layer
    reads as `X.qweight` + `X.scales` (or `X.scales_and_zeros`), quantized block by block of rows
    on first access. The steps are those of from_linear on the weight cast to the load dtype and
    moved to the device, so the result is bitwise what quantize_ gives after a float load."""

    def __init__(self, reader, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.reader, self.model, self.dtype, self.device = reader, model, dtype, device
        from ...checkpoint.pretrained import _RowReader

        self.rows = _RowReader(reader)
        qmods = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
        pre = model.part_prefix
        self.where: dict[str, Any] = {}
        self._virt: dict[str, tuple[str, str, nn.Module]] = {}  # virtual key -> (weight key, our name, module)
        self._ready: dict[str, Tensor] = {}
        for k in reader.keys():
            base = k[: -len(".weight")] if k.endswith(".weight") else None
            ours = base[len(pre):] if base is not None and pre and base.startswith(pre) else base
            m = qmods.get(ours) if ours is not None else None
            if m is None:
                self.where[k] = reader.where[k]
                continue
            for leaf in ("qweight", "scales" if isinstance(m, Int8Linear) else "scales_and_zeros"):
                self.where[f"{base}.{leaf}"] = reader.where[k]
                self._virt[f"{base}.{leaf}"] = (k, ours, m)

    def keys(self):
        return self.where.keys()

    def is_float(self, k) -> bool:
        return k not in self._virt and self.reader.is_float(k)

    def is_fresh(self, k) -> bool:
        """get(k) returns memory made for the caller (may be changed in place), not the file's."""
        return k in self._virt

    def shape(self, k) -> tuple[int, ...]:
        if k not in self._virt:
            return self.reader.shape(k)
        wk, _, m = self._virt[k]
        got = self.reader.shape(wk)
        if got != (m.out_features, m.in_features):
            from ...checkpoint.pretrained import CheckpointError

            raise CheckpointError(f"{wk}: checkpoint {list(got)}, model {[m.out_features, m.in_features]}")
        return tuple(getattr(m, k.rpartition(".")[2]).shape)

    def get(self, k, out: Tensor | None = None) -> Tensor:
        """Tensor k; a qweight is quantized into `out` when given (a contiguous tensor of its shape
        and dtype: the loader's slot for it in a fused group's buffer, so no fresh copy is made)."""
        if k not in self._virt:
            return self.reader.get(k)
        if k in self._ready:
            t = self._ready.pop(k)
            return out.copy_(t) if out is not None else t
        wk, ours, m = self._virt[k]
        # the dtype a float load would give this weight (fp32 for _keep_in_fp32_modules in fp16)
        want = torch.float32 if self.model._fp32_keep(ours + ".weight", self.dtype) else self.dtype
        N, K = m.out_features, m.in_features
        qk = f"{k.rpartition('.')[0]}.qweight"
        q = out if out is not None and k == qk else \
            torch.empty(tuple(m.qweight.shape), dtype=m.qweight.dtype, device=self.device)
        int8 = isinstance(m, Int8Linear)
        s = torch.empty((N,) if int8 else tuple(m.scales_and_zeros.shape), dtype=want, device=self.device)
        step = max(1, STREAM_ELEMS // K)
        if not int8:
            step = max(INT4_BLOCK_N, step // INT4_BLOCK_N * INT4_BLOCK_N)  # whole packing blocks
        with torch.no_grad():
            for r0 in range(0, N, step):
                r1 = min(N, r0 + step)
                w = self.rows.rows(wk, r0, r1, K).to(device=self.device, dtype=want)  # (n, K)
                if int8:
                    q[r0:r1], s[r0:r1] = quant8(w)
                else:
                    q[r0:r1], s[:, r0:r1] = quant4(w, m.group_size)
                del w
        base = k.rpartition(".")[0]
        made = {f"{base}.qweight": q, f"{base}.{'scales' if int8 else 'scales_and_zeros'}": s}
        self._ready.update({n: t for n, t in made.items() if n != k})
        return made[k]

    def close(self) -> None:
        self.rows.close()


def load_and_quantize(model: nn.Module, reader, d, dtype: torch.dtype, device: torch.device, quantize: str | None) -> None:
    """from_pretrained's loading step for quantized models (`model` is still on the meta device).

    A checkpoint saved quantized (its LM config has `quantization`): rebuild those modules, then
    load the int tensors. A float checkpoint with quantize="int8"/"int4": build the quantized
    modules on meta, then quantize each float linear as it is read (_StreamingReader), so peak
    memory is about the quantized model, not the float one.
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
        mode, _, g = str(quantize).partition("-")  # "int4-128": group size 128
        quantize_(lm, mode, group_size=int(g) if g else 32)  # on meta: shapes only
        sr = _StreamingReader(reader, model, dtype, device)
        try:
            model._load_from(sr, d, dtype, device)
        finally:
            sr.close()
