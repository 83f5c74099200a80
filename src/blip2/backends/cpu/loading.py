"""The backend's part in from_pretrained: two load hooks (checkpoint/loading.py), registered by
this package's __init__ in this order.

quantize_on_load: `quantize="int8"/"int4"` or a checkpoint saved quantized. The language model's
linears become Int8Linear / Int4Linear while still on meta; a float checkpoint is then read
through QuantizingReader, which quantizes each float weight block of rows by block of rows as it
is read, so peak memory is about the quantized model, not the float one.

blocks_on_load: on CPU, swap in the backend's modules (convert.py) and, where the kernels run,
load the weights decoding steps stream straight into the block layout: read by pread into the
memory that will hold them (a mapped weight repacked in place would cost a copy-on-write fault
per page, 0.5 GB/s, and a blocked copy would leave the mapped original resident), q/k/v into
one buffer per layer, and tied heads marked to keep a blocked copy.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor, nn

from ...checkpoint.loading import LoadContext, LoadHook
from ...checkpoint.reader import CheckpointError
from . import kernels
from .build import lib
from .convert import BlockPlan, decoding_parts, plan_blocks, swap_modules
from .layout import INT4_BLOCK_N
from .quant import Int4Linear, Int8Linear, quant4, quant8, quantize_, quantize_kwargs

# Float rows quantized per step when streaming: 2M elements (8 MiB as fp32) keeps the temporaries
# small next to any real model, yet large enough that the per-call overhead is noise.
STREAM_ELEMS = 1 << 21


class QuantizingReader:
    """The checkpoint as the quantized model wants it: each float `X.weight` of a quantized layer
    reads as `X.qweight` + `X.scales` (or `X.scales_and_zeros`), quantized block by block of rows
    on first access. The steps are those of from_linear on the weight cast to the load dtype and
    moved to the device, so the result is bitwise what quantize_ gives after a float load."""

    def __init__(self, ctx: LoadContext):
        reader, model = ctx.reader, ctx.model
        self.reader, self.ctx = reader, ctx
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
        return k in self._virt

    def shape(self, k) -> tuple[int, ...]:
        if k not in self._virt:
            return self.reader.shape(k)
        wk, _, m = self._virt[k]
        got = self.reader.shape(wk)
        if got != (m.out_features, m.in_features):
            raise CheckpointError(f"{wk}: checkpoint {list(got)}, model {[m.out_features, m.in_features]}")
        return tuple(getattr(m, k.rpartition(".")[2]).shape)

    def get(self, k, out: Tensor | None = None) -> Tensor:
        """Tensor k; a qweight is quantized into `out` when given (a contiguous tensor of its shape
        and dtype: the loader's slot for it in a fused group's buffer, so no fresh copy is made)."""
        if k not in self._virt:
            return self.reader.get(k, out)
        if k in self._ready:
            t = self._ready.pop(k)
            return out.copy_(t) if out is not None else t
        wk, ours, m = self._virt[k]
        # the dtype a float load would give this weight (fp32 for _keep_in_fp32_modules in fp16)
        want, device = self.ctx.float_dtype(ours + ".weight"), self.ctx.device
        N, K = m.out_features, m.in_features
        qk = f"{k.rpartition('.')[0]}.qweight"
        q = out if out is not None and k == qk else \
            torch.empty(tuple(m.qweight.shape), dtype=m.qweight.dtype, device=device)
        int8 = isinstance(m, Int8Linear)
        s = torch.empty((N,) if int8 else tuple(m.scales_and_zeros.shape), dtype=want, device=device)
        step = max(1, STREAM_ELEMS // K)
        if not int8:
            step = max(INT4_BLOCK_N, step // INT4_BLOCK_N * INT4_BLOCK_N)  # whole int4pack blocks
        with torch.no_grad():
            for r0 in range(0, N, step):
                r1 = min(N, r0 + step)
                w = self.reader.rows(wk, r0, r1).to(device=device, dtype=want)  # (n, K)
                if int8:
                    q[r0:r1], s[r0:r1] = quant8(w)
                else:
                    q[r0:r1], s[:, r0:r1] = quant4(w, m.group_size)
                del w
        base = k.rpartition(".")[0]
        made = {f"{base}.qweight": q, f"{base}.{'scales' if int8 else 'scales_and_zeros'}": s}
        self._ready.update({n: t for n, t in made.items() if n != k})
        return made[k]

    def rows(self, k, r0: int, r1: int, reuse: bool = False) -> Tensor:
        return self.reader.rows(k, r0, r1, reuse)

    def buffer(self, n) -> Tensor:
        return self.reader.buffer(n)

    def close(self) -> None:
        self.reader.close()


def quantize_on_load(ctx: LoadContext) -> None:
    """A checkpoint saved quantized (its LM config has `quantization`): rebuild those modules, then
    load the int tensors. A float checkpoint with quantize="int8"/"int4": build the quantized
    modules on meta, then quantize each float linear as it is read."""
    quantize = ctx.options.pop("quantize", None)
    lms = [m for n, m in decoding_parts(ctx.model) if n]
    saved = getattr(getattr(lms[0], "config", None), "quantization", None) if lms else None
    if quantize is None and not saved:
        return
    if not lms:
        raise ValueError(f"quantize={quantize!r}: {type(ctx.model).__name__} has no language model; quantization "
                         "applies to the language model of Blip2ForConditionalGeneration / Blip2Model")
    if saved:
        if quantize is not None and quantize != saved["mode"]:
            raise ValueError(f"quantize={quantize!r}: {ctx.directory} is already quantized as {saved['mode']}; "
                             "load it without quantize= (or from the float checkpoint)")
        quantize_(lms[0], **quantize_kwargs(saved))
    else:
        mode, _, g = str(quantize).partition("-")  # "int4-128": group size 128
        quantize_(lms[0], mode, group_size=int(g) if g else 32)  # on meta: shapes only
        ctx.reader = QuantizingReader(ctx)


class BlockedLoad(LoadHook):
    def __init__(self, ctx: LoadContext, plan: BlockPlan):
        self.ctx, self.plan = ctx, plan
        self.buffers: dict[str, Tensor] = {}  # fused group -> its buffer

    def tensor(self, key: str, ckpt_key: str) -> Tensor | None:
        block = self.plan.blocks.get(key)
        if block is None:
            return None
        reader = self.ctx.reader
        N, K = reader.shape(ckpt_key)
        out = None
        if key in self.plan.groups:  # this weight's rows of its group's buffer
            g, r0, n, dt = self.plan.groups[key]
            if g not in self.buffers:
                self.buffers[g] = torch.empty(n, K, dtype=dt, device=self.ctx.device)
            out = self.buffers[g][r0:r0 + N]
        if reader.is_fresh(ckpt_key):
            # made for us (quantized while loading, into its group's slot if it has one): lay it out
            # where it is, through the reused buffer (fresh copies freed per layer stay in the
            # allocator's heap: +7% RSS, and +17% when each was then copied into its group)
            t = reader.get(ckpt_key, out)
            return kernels.reblock_in_place(t, block, scratch=reader.buffer(t))
        t = reader.rows(ckpt_key, 0, N, reuse=True)
        return kernels.write_blocks(t, out, block) if out is not None else kernels.blocked_copy(t, block)

    def finish(self) -> None:
        self.ctx.reader.close()  # its row buffer (the largest weight) is free before the heap is trimmed
        model = self.ctx.model
        for key, block in self.plan.blocks.items():
            model.get_submodule(key.rpartition(".")[0]).mark_blocked(block)
        for m in self.plan.copies:
            m.keeps_blocked_copy = True
        if self.plan.blocks:
            _return_free_heap()


def blocks_on_load(ctx: LoadContext) -> BlockedLoad | None:
    if ctx.device.type != "cpu":
        return None
    swap_modules(ctx.model)
    if lib() is None:
        return None
    plan = plan_blocks(ctx.model, lambda key, w: ctx.float_dtype(key) if w.is_floating_point() else w.dtype)
    return BlockedLoad(ctx, plan) if plan.blocks or plan.copies else None


def _return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim). Laying weights out while
    loading frees many weight-sized temporaries; glibc keeps such holes inside its heap resident,
    which measured +17-20% of the model's size for int8 / int4 loads."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

