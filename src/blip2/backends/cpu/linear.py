"""The backend's linear layers: weights that may be held in the block layout, and nn.Linear's CPU
fast paths.

`Blocked` is the mixin of every layer whose weight kernels.c can stream (this module's `Linear`,
quant.Int8Linear, quant.Int4Linear). A blocked layer keeps its tensors' shapes and dtypes, and the
layout is invisible from outside: state_dict() writes row-major tensors, load_state_dict() takes
them, and a layer that was moved or cast, or that is trained (grad through its weight), returns to
row-major at its next forward. Products with few rows (decode steps) go through the kernels;
with many (prefill, batches), one fp32 GEMM on the weight unblocked into a reused buffer.

`Linear` is nn.Linear (same parameters, so the same checkpoint keys) with those paths, and the
bf16 paths dispatch.py measured fastest on this CPU: one row through torch.mv or F.linear, many
rows in bf16 or as an fp32 GEMM (bf16.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dispatch, kernels
from .bf16 import fp32_faster, fp32_weight, scratch
from .build import lib
from .layout import BLOCK, fits


def kernel_rows(w_dtype: torch.dtype = torch.bfloat16) -> int:
    """Products with a blocked w_dtype weight with fewer rows than this run through the kernels; more
    unblock the weight for one GEMM. The measured crossover plus one: `bf16.kernel_rows` for bf16
    weights (measured with bf16 x, on the kernel `bf16.dot` chose), `int8.kernel_rows` for int8
    and int4 ones."""
    if lib() is None:
        return 0
    return int(dispatch.choice("bf16.kernel_rows" if w_dtype == torch.bfloat16 else "int8.kernel_rows")) + 1


def unblocked_product(x2: Tensor, w: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """(x2 @ W^T) * scale + bias in fp32 for a blocked w, through the weight unblocked into a reused
    buffer: bf16 x2 runs one bf16 GEMM where that is faster than fp32 here (`bf16.many`), else one
    fp32 GEMM. int8 values are exact in bf16, so only a dequantized int4 weight is rounded."""
    N, K = w.shape[0], x2.shape[1]
    sz = scale if w.dtype == torch.uint8 else None  # int4: its scales and zeros, applied while unblocking
    if w.dtype == torch.bfloat16 and x2.dtype == torch.bfloat16 and not fp32_faster(x2):
        R, C = BLOCK[w.dtype]
        wr = scratch(N * K, torch.bfloat16).view(N // R, R, K // C, C)
        wr.copy_(w.view(N // R, K // C, R, C).transpose(1, 2))
        y = F.linear(x2, wr.view(N, K)).float()
    else:
        wf = kernels.to_f32(w, scratch(N * K), sz)
        if x2.dtype == torch.bfloat16 and not fp32_faster(x2):
            y = F.linear(x2, scratch(N * K, torch.bfloat16).view(N, K).copy_(wf)).float()
        else:
            y = F.linear(x2.float(), wf)
    if scale is not None and sz is None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def blocked_linear(x: Tensor, w: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """(x @ W^T) * scale + bias, computed in fp32, for a blocked w; scale and bias fp32 (for int4 w,
    scale is its scales and zeros). Few rows go through the streaming kernels (the result in bf16 for
    bf16 x, rounded once), many through unblocked_product (fp32). Callers cast."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] < kernel_rows(w.dtype):
        y = kernels.blocked_mm(x2, w, scale, bias)
    else:
        y = unblocked_product(x2, w, scale, bias)
    return y.view(*x.shape[:-1], w.shape[0])


def _measure_one() -> tuple[str, dict[str, float]]:
    """A decode step's product: one row against a wide layer's weight (42 MB: it streams from memory)."""
    w, x = dispatch.synthetic(8192, 2560, scale=0.02), dispatch.synthetic(1, 2560, seed=1)
    cands = {"mv": lambda: torch.mv(w, x[0]), "linear": lambda: F.linear(x, w)}
    if lib() is not None:
        wb = kernels.blocked_copy(w, BLOCK[torch.bfloat16])
        cands["kernel"] = lambda: kernels.blocked_mm(x, wb)
    times = dispatch.measure(cands)
    return dispatch.pick(times, "mv"), times


def _crossover(w, scale, rows: tuple[int, ...], name: str) -> tuple[int, dict[str, float]]:
    """The largest of `rows` up to which the kernel beats unblocking the blocked weight w for
    unblocked_product (bf16 x), going up while it wins; 1 if it never does."""
    times: dict[str, float] = {}
    best = 1
    for m in rows:
        x = dispatch.synthetic(m, w.shape[1], seed=m)
        t = dispatch.measure({"kernel": lambda: kernels.blocked_mm(x, w, scale),
                              "unblock": lambda: unblocked_product(x, w, scale, None)}, reps=5, budget_s=0.3)
        tk, tg = times[f"{name}@{m}"], times[f"unblock@{m}"] = t["kernel"], t["unblock"]
        if tk >= tg:
            break
        best = m
    return best, times


def _measure_kernel_rows() -> tuple[int, dict[str, float]]:
    """bf16.kernel_rows: bf16 x against a blocked 4096 x 2560 bf16 weight (2 ... 256 rows), on the
    FMA kernel ("kernel@rows") or VDPBF16PS ("dot@rows"), as `bf16.dot` chose; 0 without kernels."""
    if lib() is None:
        return 0, {}
    wb = kernels.blocked_copy(dispatch.synthetic(4096, 2560, scale=0.02), BLOCK[torch.bfloat16])
    name = "dot" if dispatch.choice("bf16.dot") == "dot" else "kernel"
    return _crossover(wb, None, (2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256), name)


def _measure_int8_rows() -> tuple[int, dict[str, float]]:
    """int8.kernel_rows: the same for an int8 weight (2 ... 64 rows); int4 weights follow it."""
    if lib() is None:
        return 0, {}
    q = torch.randint(-127, 128, (4096, 2560), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    qb = kernels.blocked_copy(q, BLOCK[torch.int8])
    return _crossover(qb, torch.full((4096,), 1e-3), (2, 4, 8, 16, 32, 48, 64), "kernel")


dispatch.register("bf16.one", "mv", _measure_one)
dispatch.register("bf16.kernel_rows", 0, _measure_kernel_rows)
dispatch.register("int8.kernel_rows", 0, _measure_int8_rows)


def one_row_torch() -> str:
    """torch's faster path for a one-row bf16 product ("mv" or "linear"), for weights not blocked."""
    c = dispatch.choice("bf16.one")
    if c != "kernel":
        return c
    t = dispatch.timings("bf16.one")
    return "linear" if t.get("linear", 1.0) < t.get("mv", 1.0) else "mv"


class Blocked:
    """Mixin for a layer whose weight (the attribute named `weight_name`) may be held in the block
    layout. `block` is (rows, columns) of the layout while blocked, else None."""

    weight_name = "weight"
    block: tuple[int, int] | None = None
    # Keep a blocked copy of the (row-major) weight for products with few rows: for a weight that is
    # shared and read row-major elsewhere (a head tied to the input embedding), where the kernels'
    # faster streaming pays for the memory (OPT-2.7b's head: 257 MB, 2.9 ms a token).
    keeps_blocked_copy = False
    # Layers of one class that can share one kernel call when their weights lie back to back (see
    # attention.fused_linear); int4 cannot (its blocked scales would need a concatenated copy).
    fuses = True

    def blocked_serves(self, x: Tensor) -> bool:
        """Whether the blocked weight serves a product with x: kernels loaded, the weight still on
        CPU in the dtype it was blocked in, and no gradient to carry (the kernels have no backward).
        Where not, forward returns the layer to row-major for good: it was moved, cast, or is trained."""
        w = getattr(self, self.weight_name)
        return (lib() is not None and w.device.type == "cpu" and BLOCK.get(w.dtype) == self.block
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))

    def blocked_copy_for(self, x: Tensor) -> Tensor | None:
        """The blocked copy of the weight for a product with x, made on first use and again whenever
        the weight changed (its version counter or memory); None where the kernels do not serve x."""
        w = getattr(self, self.weight_name)
        if not self.keeps_blocked_copy or self.block is not None or torch.compiler.is_compiling():
            return None
        if not fits(w) or lib() is None:  # moved, cast: the copy is of no more use
            self.__dict__.pop("_copy", None)
            return None
        if x.numel() >= kernel_rows(w.dtype) * x.shape[-1] or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return None
        key = (w.data_ptr(), w._version, w.dtype)
        c = self.__dict__.get("_copy")
        if c is None or c[0] != key:
            self.__dict__.pop("_extras", None)
            c = self.__dict__["_copy"] = (key, kernels.blocked_copy(w.detach(), BLOCK[w.dtype]))
        return c[1]

    @torch.no_grad()
    def to_blocks_(self) -> bool:
        """Lay the weight out in blocks where it can be; returns whether it is blocked."""
        w = getattr(self, self.weight_name)
        if self.block is None and fits(w) and lib() is not None:
            # in place: a weight mmapped from a checkpoint (copy-on-write) turns into private
            # memory page by page, so resident memory does not hold it twice
            kernels.reblock_in_place(w, BLOCK[w.dtype])
            self.mark_blocked(BLOCK[w.dtype])
        return self.block is not None

    def mark_blocked(self, block: tuple[int, int]) -> None:
        """The weight now holds the block layout (made by to_blocks_, or loaded so): lay out what is
        read alongside it to match (see _companions_)."""
        self.block = block
        self._companions_(blocked=True)

    def _companions_(self, blocked: bool) -> None:
        """Re-lay, in place, tensors the kernels read alongside the weight (int4's scales); none here."""

    @torch.no_grad()
    def to_rows_(self) -> None:
        """Back to the row-major layout (and drop what was kept for the kernels)."""
        if self.block is not None:
            w = getattr(self, self.weight_name)
            w.copy_(kernels.row_major_copy(w, self.block))
            self._companions_(blocked=False)
            self.block = None
        self.__dict__.pop("_extras", None)
        self.__dict__.pop("_fused", None)

    def fp32_extras(self) -> tuple[Tensor | None, Tensor | None]:
        """(scale, bias) as the kernels take them, fp32 and contiguous, kept while blocked: converting
        them on every decode step cost as much time as the rest of the call's Python."""
        c = self.__dict__.get("_extras")
        if c is None:
            b = getattr(self, "bias", None)
            c = (self._fp32_scale(), None if b is None else b.detach().float().contiguous())
            if not torch.compiler.is_compiling():
                self.__dict__["_extras"] = c
        return c

    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes and returns in (for inputs of that dtype)."""
        s = getattr(self, "scales", None)
        return (s if s is not None else getattr(self, self.weight_name)).dtype

    def _fp32_scale(self) -> Tensor | None:
        s = getattr(self, "scales", None)
        return None if s is None else s.detach().float().contiguous()

    def row_major_weight(self) -> Tensor:
        w = getattr(self, self.weight_name)
        return w if self.block is None else kernels.row_major_copy(w.detach(), self.block)

    def row_major(self) -> dict[str, Tensor]:
        """The blocked tensors as state_dict has them (new tensors): the weight, and companions."""
        return {self.weight_name: self.row_major_weight()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.block is not None:
            destination.update({prefix + k: t for k, t in self.row_major().items()})

    def _load_from_state_dict(self, *args, **kwargs):
        self.to_rows_()  # the incoming tensor is row-major, and so is any key it leaves untouched
        super()._load_from_state_dict(*args, **kwargs)


class Linear(Blocked, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if self.block is not None:
            if self.blocked_serves(x):
                return blocked_linear(x, self.weight, *self.fp32_extras()).to(x.dtype)
            self.to_rows_()
        elif self.keeps_blocked_copy and (w := self.blocked_copy_for(x)) is not None:
            return blocked_linear(x, w, *self.fp32_extras()).to(x.dtype)
        if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            rows = x.numel() // x.shape[-1]
            if rows == 1 and one_row_torch() == "mv":
                # a decode step: on some CPUs torch.mv's bf16 dot-product kernel streams the weights
                # 1.5x faster than the GEMM path F.linear takes for a (1, K) input
                x1 = x.reshape(-1)
                y = torch.mv(self.weight, x1) if self.bias is None else torch.addmv(self.bias, self.weight, x1)
                return y.view(*x.shape[:-1], -1)
            if fp32_faster(x):
                b = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), fp32_weight(self.weight), b).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def block_layers_(module: nn.Module) -> int:
    """Lay out every blockable layer in `module` in blocks; returns how many are. Weights shared
    with another module (a tied head) are left alone: the other user reads them row-major."""
    if lib() is None:
        return 0
    uses: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    n = 0
    for m in module.modules():
        if isinstance(m, Blocked) and uses.get(id(getattr(m, m.weight_name)), 0) <= 1:
            n += m.to_blocks_()
    return n


def unblock_layers_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, Blocked):
            m.to_rows_()
