"""from_pretrained's loading step: match the checkpoint's keys to the model's, read, cast, assign.

The model is built on the meta device (no memory); every tensor is read once (through the mmap),
cast once to its dtype and device, and assigned into its module, so peak memory stays near the size
of the weights. A checkpoint that does not fit raises an error that names the keys and the file.

Load hooks. Other parts take part in loading without this module knowing them: each registers a
function (`register_load_hook`) that is called once per load, in order of registration, while
the model is still on meta. It may change the model (swap modules), wrap `ctx.reader` (e.g. to
convert tensors as they are read), take the from_pretrained options meant for it (popping them
from `ctx.options`), and return a LoadHook that produces chosen tensors its own way (e.g. straight
into memory of its choosing) and finishes the model once everything is assigned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .reader import CheckpointError, Reader

# Top-level parts of the BLIP-2 checkpoints. A class that lacks a part skips its keys silently:
# that is how one checkpoint serves several classes (e.g. the projection models read a
# retrieval checkpoint). Keys outside these parts, or inside a part the class has, must fit.
BLIP2_PARTS = (
    "vision_model.",
    "query_tokens",
    "qformer.",
    "language_projection.",
    "language_model.",
    "embeddings.",
    "vision_projection.",
    "text_projection.",
    "itm_head.",
    "temp",  # stage-1 pre-training extras (pretrain.py); inference classes skip them
    "itg_head.",
)

# Keys that some writers include but which are derivable buffers, never weights.
_IGNORABLE = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq|masked_bias|attn\.bias)$")


@dataclass
class LoadContext:
    """One from_pretrained call, as the hooks see it."""

    model: nn.Module  # a PreTrainedModel, on meta until assignment
    reader: Reader  # hooks may wrap it (keeping its interface)
    directory: Path
    dtype: torch.dtype  # floating tensors load in this (but see float_dtype)
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)  # from_pretrained options for the hooks

    def float_dtype(self, key: str) -> torch.dtype:
        """The dtype a floating tensor of the model loads in: fp32 for the model's fp32 islands
        (`_keep_in_fp32_modules`) under float16, as the reference does; else the load dtype."""
        if self.dtype != torch.float16:
            return self.dtype
        keep = self.model._keep_in_fp32_modules
        return torch.float32 if any(key == m or key.startswith(m + ".") or f".{m}." in f".{key}" for m in keep) \
            else self.dtype


class LoadHook:
    """What a hook does during one load (see the module's docstring); both steps optional."""

    def tensor(self, key: str, ckpt_key: str) -> torch.Tensor | None:
        """The tensor for the model's `key` (stored as `ckpt_key`), produced this hook's way; or
        None to leave it to the next hook or a plain read. The loader still casts it to its dtype."""
        return None

    def finish(self) -> None:
        """After every tensor is assigned and the ties are made."""


_HOOKS: list[Callable[[LoadContext], LoadHook | None]] = []


def register_load_hook(make: Callable[[LoadContext], LoadHook | None]) -> Callable[[LoadContext], LoadHook | None]:
    """Call make(ctx) at the start of every load (after those registered before it)."""
    _HOOKS.append(make)
    return make


def load_weights(ctx: LoadContext) -> None:
    """Fill ctx.model (on meta) from ctx.reader."""
    model = ctx.model
    model.fit_to_checkpoint(ctx.reader.keys())
    # Before the hooks convert anything: a weight that a hook quantizes as it reads must be a float too.
    _check_dtype_classes(_prefix_map(model, ctx.reader.keys()), ctx.reader, model.state_dict(keep_vars=True))
    hooks = [h for h in (make(ctx) for make in _HOOKS) if h is not None]
    if ctx.options:
        raise TypeError(f"from_pretrained() got options that nothing here takes: {sorted(ctx.options)}")
    ours = model.state_dict(keep_vars=True)
    mapping = match_keys(model, ctx.reader, ours, ctx.directory)
    sd = {}
    for ok, ck in mapping.items():
        t = None
        for h in hooks:
            t = h.tensor(ok, ck)
            if t is not None:
                break
        if t is None:
            t = ctx.reader.get(ck)
        want = ctx.float_dtype(ok) if t.is_floating_point() else ours[ok].dtype
        sd[ok] = t.to(device=ctx.device, dtype=want)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    for h in hooks:
        h.finish()
    # Anything still on meta was neither loaded nor tied: a bug in the class, not the file.
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: not initialised after loading: {_fmt_keys(left)}")


def match_keys(model: nn.Module, reader: Reader, ours: dict[str, torch.Tensor], d: Path) -> dict[str, str]:
    """{our key: checkpoint key} for every tensor to load; raises CheckpointError naming what is
    missing, unexpected or of the wrong shape."""
    tied = model.tied_weights()
    mapping = _prefix_map(model, reader.keys())

    unexpected = []
    for ok in list(mapping):
        if ok not in ours:
            ck = mapping.pop(ok)
            if ok in tied:  # a stored copy of a tied weight
                continue
            part = next((p for p in BLIP2_PARTS if ok.startswith(p)), None)
            if part is None or any(k.startswith(part) for k in ours):
                unexpected.append(ck)
            # else: it belongs to a sibling class; not ours to load
    missing = [k for k in ours if k not in mapping and k not in tied]
    wrong = []
    for ok, ck in mapping.items():
        want, got = tuple(ours[ok].shape), reader.shape(ck)
        if want != got:
            wrong.append(f"{ck}: checkpoint {list(got)}, model {list(want)}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shape for {len(wrong)} tensor(s): " + "; ".join(wrong[:6]))
    if problems:
        files = sorted({str(reader.where[k].name) for k in reader.keys()})
        arch = getattr(model.config, "architectures", None)
        hint = f" (its config names {arch})" if arch else ""
        raise CheckpointError(
            f"checkpoint {d} ({', '.join(files)}){hint} does not fit {type(model).__name__}: "
            + " | ".join(problems)
            + ". Check that the config.json and the weights belong together and to this class."
        )
    _check_dtype_classes(mapping, reader, ours)
    return mapping


def _prefix_map(model: nn.Module, keys) -> dict[str, str]:
    """{our key: checkpoint key} for the checkpoint's keys, derivable buffers left out. A part model
    (e.g. Blip2VisionModel) reading a full BLIP-2 checkpoint takes its prefix."""
    ckpt_keys = [k for k in keys if not _IGNORABLE.search(k)]
    pre = model.part_prefix
    if pre and any(k.startswith(pre) for k in ckpt_keys):
        return {k[len(pre):]: k for k in ckpt_keys if k.startswith(pre)}
    return {k: k for k in ckpt_keys}


def _check_dtype_classes(mapping: dict[str, str], reader: Reader, ours: dict[str, torch.Tensor]) -> None:
    """A stored tensor must be of its parameter's class: float for float (any float: that is the
    cast), integer for integer (quantized weights). Casting across would load garbage silently, so
    a float weight stored as I32, or an int8 qweight stored as float, is refused, from the header
    alone. Tensors a hook makes fresh (quantized while read) are checked as their float source."""
    for ok, ck in mapping.items():
        if ok not in ours or reader.is_fresh(ck):
            continue
        want_float, got_float = ours[ok].is_floating_point(), reader.is_float(ck)
        if want_float != got_float:
            got = reader.dtype(ck) if hasattr(reader, "dtype") else ("a float" if got_float else "a non-float")
            raise CheckpointError(
                f"{reader.where[ck]}: tensor {ck} is stored as {got}, but {ok} of the model is {ours[ok].dtype}; "
                "a tensor cannot be cast across float and integer types. The file is damaged or not for this model"
            )


def _fmt_keys(keys, n=8) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:n])
    return s + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
