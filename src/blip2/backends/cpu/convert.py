"""Applying the backend to a model: its modules in place of the plain ones, and the block layout
for the weights that decoding steps stream.

`swap_modules` makes each plain module an instance of the backend's subclass of it (nn.Linear ->
linear.Linear, ScaledDotProduct -> CpuScaledDotProduct, OPTAttention -> FusedOPTAttention). The
subclasses add behaviour only, no parameters or buffers: each module keeps its children, tensors,
hooks and ties, so state_dict keys, checkpoints and optimizers see no difference.

`plan_blocks` chooses, inside the parts of a model that decode tokens (classes that declare
`decodes_tokens`: the language model), the weights to hold in the block layout, the groups to lay
back to back (a module's `fused_groups`), and the tied weights that keep a blocked copy instead.
from_pretrained applies it while loading (loading.py); `convert` applies it to a model in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ...models.lm import ScaledDotProduct
from ...models.opt import OPTAttention
from . import dispatch, kernels
from .attention import CpuScaledDotProduct, FusedOPTAttention, fusable
from .build import lib
from .layout import block_for, fits
from .linear import Blocked, Linear

# the dispatch op that decides whether weights of a dtype are blocked (uint8 is int4)
ONE_ROW_OP = {torch.bfloat16: "bf16.one", torch.int8: "int8.one", torch.uint8: "int4.one"}
SWAPS: dict[type, type] = {nn.Linear: Linear, ScaledDotProduct: CpuScaledDotProduct, OPTAttention: FusedOPTAttention}


def swap_modules(model: nn.Module) -> nn.Module:
    """Put the backend's subclasses in place of the plain modules they extend (see above); modules
    of any other class, the backend's own included, stay as they are."""
    for m in model.modules():
        cls = SWAPS.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return model


def decoding_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the language models inside `model` (the model itself for a bare one)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "decodes_tokens", False)]


@dataclass
class BlockPlan:
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)  # weight key -> its block
    # weight key -> (its group's first key, first row, the group's rows, dtype): one buffer per group
    groups: dict[str, tuple[str, int, int, torch.dtype]] = field(default_factory=dict)
    copies: list[Blocked] = field(default_factory=list)  # tied layers that keep a blocked copy


def plan_blocks(model: nn.Module, dtype_of: Callable[[str, Tensor], torch.dtype]) -> BlockPlan:
    """The plan for `model` (after swap_modules; on meta or not) whose weights will have the dtypes
    dtype_of(key, weight) gives. A tied weight is read row-major by its other user (the embedding
    lookup), so its layer keeps a blocked copy for decode steps instead."""
    plan = BlockPlan()
    tied = getattr(model, "tied_weights", dict)()
    tied = set(tied) | set(tied.values())
    final: dict[str, torch.dtype] = {}
    for pre, part in decoding_parts(model):
        pre = f"{pre}." if pre else ""
        for name, m in part.named_modules():
            if not isinstance(m, Blocked):
                continue
            key = f"{pre}{name}.{m.weight_name}"
            w = getattr(m, m.weight_name)
            final[key] = dtype_of(key, w)
            block = block_for(final[key], w.shape)
            if block and dispatch.choice(ONE_ROW_OP[final[key]]) != "kernel":
                block = None  # torch streams such weights at least as fast here: leave them row-major
            if block and key in tied:
                plan.copies.append(m)
            elif block:
                plan.blocks[key] = block
        for name, m in part.named_modules():
            for group in getattr(m, "fused_groups", ()):
                layers = [m.get_submodule(c) for c in group]
                keys = [f"{pre}{name}.{c}.{lay.weight_name}" for c, lay in zip(group, layers)]
                shapes = [getattr(lay, lay.weight_name).shape for lay in layers]
                if (fusable(layers) and all(k in plan.blocks for k in keys) and len({plan.blocks[k] for k in keys}) == 1
                        and len({final[k] for k in keys}) == 1 and len({sh[1] for sh in shapes}) == 1):
                    rows, r0 = sum(sh[0] for sh in shapes), 0
                    for k, sh in zip(keys, shapes):
                        plan.groups[k] = (keys[0], r0, rows, final[k])
                        r0 += sh[0]
    return plan


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Apply the backend to a model built from a config or changed after loading (from_pretrained
    on CPU does this while loading): swap the modules, and where the kernels run, lay out the
    weights decoding steps stream (q/k/v back to back) and give tied heads their blocked copy.
    Call it after quantize_, and after moving the model to the CPU dtype it will run in."""
    swap_modules(model)
    if lib() is None:
        return model
    plan = plan_blocks(model, lambda key, w: w.dtype)
    buffers: dict[str, Tensor] = {}
    for key, block in plan.blocks.items():
        m = model.get_submodule(key.rpartition(".")[0])
        w = getattr(m, m.weight_name)
        if m.block is not None or not fits(w):
            continue
        if key in plan.groups:
            g, r0, n, dt = plan.groups[key]
            if g not in buffers:
                buffers[g] = torch.empty(n, w.shape[1], dtype=dt, device=w.device)
            w.data = kernels.write_blocks(w, buffers[g][r0:r0 + w.shape[0]], block)
            m.mark_blocked(block)
        else:
            m.to_blocks_()
    for m in plan.copies:
        m.keeps_blocked_copy = True
    return model
