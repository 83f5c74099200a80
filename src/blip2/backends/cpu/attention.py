"""The backend's attention: a decode step's attention in C, and OPT's q/k/v in one kernel call.

`CpuScaledDotProduct` takes the place of the models' ScaledDotProduct modules. For bf16, a decode
step (one query per row, no dropout) reads the bf16 KV cache straight in kernels.attend_one (on a
CPU that emulates bf16, a step over 53 cached positions took 145 us per layer in SDPA, 63 us here);
other calls run SDPA in bf16 or on fp32 copies of q/k/v, whichever dispatch measured faster on this
CPU: for a decode step `sdpa.one` (kernel, bf16 SDPA or fp32 SDPA), for the rest `sdpa.bf16` (fp32
where bf16 is emulated, bf16 where AMX runs it).

`FusedOPTAttention` takes the place of OPTAttention. Its q/k/v layers are listed in
`fused_groups`, which from_pretrained reads to load their blocked weights back to back in one
buffer; a decode step then reads all three in one call (fused_linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.lm import ScaledDotProduct
from ...models.opt import OPTAttention
from . import dispatch, kernels
from .linear import Blocked, blocked_linear, kernel_rows


def _measure_sdpa() -> tuple[str, dict[str, float]]:
    """The vision tower's attention: 16 heads of 88 over 257 positions (ViT-g's shape)."""
    q, k, v = (dispatch.synthetic(1, 16, 257, 88, seed=i) for i in range(3))
    times = dispatch.measure({"bf16": lambda: F.scaled_dot_product_attention(q, k, v),
                              "fp32": lambda: F.scaled_dot_product_attention(
                                  q.float(), k.float(), v.float()).to(torch.bfloat16)})
    return dispatch.pick(times, "bf16"), times


def _measure_sdpa_one() -> tuple[str, dict[str, float]]:
    """A decode step's attention: 32 heads of 80 (OPT-2.7b), one query over 96 cached positions; SDPA
    in bf16, SDPA on fp32 copies, or the C kernel."""
    q = dispatch.synthetic(1, 32, 1, 80)
    k, v = (dispatch.synthetic(1, 32, 96, 80, seed=i) for i in (1, 2))
    cands = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
             "fp32": lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)}
    if kernels.lib() is not None:
        cands["kernel"] = lambda: kernels.attend_one(q, k, v, None, 80 ** -0.5)
    times = dispatch.measure(cands)
    return dispatch.pick(times, "sdpa"), times


dispatch.register("sdpa.bf16", "bf16", _measure_sdpa)
dispatch.register("sdpa.one", "sdpa", _measure_sdpa_one)


class CpuScaledDotProduct(ScaledDotProduct):
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, is_causal: bool = False,
        scale: float | None = None, dropout_p: float = 0.0, need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights or q.dtype != torch.bfloat16 or q.device.type != "cpu":
            return super().forward(q, k, v, mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                                   need_weights=need_weights)
        one = not is_causal and dropout_p == 0.0 and q.shape[-2] == 1  # a decode step
        if one and dispatch.choice("sdpa.one") == "kernel":  # C reads the bf16 cache as it is
            y = kernels.attend_one(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5)
            if y is not None:
                return y, None
        # a decode step follows its own measurement: an fp32 copy of the whole cache at every step
        # cost 7 of a 163 ms step at 8 rows on a CPU whose vision attention is faster in fp32
        in_bf16 = dispatch.choice("sdpa.one") == "sdpa" if one else dispatch.choice("sdpa.bf16") != "fp32"
        if in_bf16:
            return super().forward(q, k, v, mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p)
        m = mask if mask is None or mask.dtype == torch.bool else mask.float()
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, dropout_p=dropout_p,
                                           is_causal=is_causal, scale=scale)
        return y.to(q.dtype), None


class FusedOPTAttention(OPTAttention):
    fused_groups = (("q_proj", "k_proj", "v_proj"),)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))  # (B, T, 3E), or None
        return qkv.split(x.shape[-1], -1) if qkv is not None else super().project(x)


def fusable(layers) -> bool:
    """Layers whose products fused_linear can serve together: two or more of one Blocked class that
    `fuses`, with biases on all or none."""
    kinds = {type(lay) for lay in layers}
    return (len(layers) > 1 and len(kinds) == 1 and issubclass(kinds.pop(), Blocked) and layers[0].fuses
            and len({getattr(lay, "bias", None) is None for lay in layers}) == 1)


def fused_linear(x: Tensor, layers) -> Tensor | None:
    """The outputs of `layers` on x, concatenated on the last dim, from one kernel call; or None where
    that cannot be done (then call the layers). It can when the layers are blocked, their weights lie
    back to back in one buffer (from_pretrained loads the groups a module lists in `fused_groups`
    so), x has few rows and is in the layers' compute dtype: then the result is bitwise that of the
    layers (each output is the same sum, rounded once). One call instead of three saves the per-call
    cost and the kernel's ramp-up at each start: about 1.5 ms a token for OPT-2.7b's q/k/v in int8."""
    if (torch.compiler.is_compiling()
            or not all(isinstance(lay, Blocked) and lay.block is not None and lay.blocked_serves(x) for lay in layers)):
        return None
    first = layers[0]
    if x.dtype != first.compute_dtype() or x.numel() >= kernel_rows(getattr(first, first.weight_name).dtype) * x.shape[-1]:
        return None
    extras = tuple(lay.fp32_extras() for lay in layers)
    ws = [getattr(lay, lay.weight_name) for lay in layers]
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
    return blocked_linear(x, c[2], c[3], c[4]).to(x.dtype)  # fp32 out, as each layer rounds it
