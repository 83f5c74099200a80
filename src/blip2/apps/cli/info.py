"""`blip2 info MODEL`: what a checkpoint is (architecture, parts, parameter counts, dtypes, files),
read from its config and safetensors headers without loading a weight."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ... import (
    Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Model,
    Blip2TextModelWithProjection, Blip2VisionModelWithProjection, CheckpointError,
)
from ...checkpoint.configuration import CONFIG_NAME
from ...checkpoint.header import read_header
from ...models.pretrain import Blip2QFormerForPretraining
from .common import UsageError, model_dir, unusable

CLASSES = {c.__name__: c for c in (
    Blip2ForConditionalGeneration, Blip2Model, Blip2ForImageTextRetrieval, Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection, Blip2QFormerForPretraining)}


def model_class(config: Blip2Config) -> type:
    """The class a config is for: its `architectures` when we know one, else by whether it has a
    language model."""
    for a in getattr(config, "architectures", None) or []:
        if a in CLASSES:
            return CLASSES[a]
    has_lm = getattr(config, "text_config", None) is not None and "text_config" in config.to_dict()
    return Blip2ForConditionalGeneration if has_lm else Blip2ForImageTextRetrieval


def describe(d: Path) -> dict:
    """What the checkpoint in `d` is, without loading its weights (the model is built on meta)."""
    if not (d / CONFIG_NAME).is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {d}: is this a model checkpoint directory?")
    cfg = Blip2Config.from_json_file(d / CONFIG_NAME)
    cls = model_class(cfg)
    with torch.device("meta"):
        model = cls(cfg)
    parts, seen = {}, set()
    for name, child in model.named_children():
        ps = [p for p in child.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        parts[name] = sum(p.numel() for p in ps)
    for name, p in model.named_parameters(recurse=False):
        parts[name] = p.numel()
    files = sorted((p for p in d.iterdir() if p.is_file()), key=lambda p: p.name)
    dtypes: dict[str, int] = {}
    for f in files:
        if f.suffix == ".safetensors":
            for v in read_header(f)[0].values():
                dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + 1
    c = cfg.to_dict()
    tc = c.get("text_config") if cls in (Blip2ForConditionalGeneration, Blip2Model) else None
    return {
        "path": str(d),
        "architecture": cls.__name__,
        "config_architectures": getattr(cfg, "architectures", None),
        "language_model": (tc or {}).get("model_type"),
        "num_query_tokens": cfg.num_query_tokens,
        "vision": {k: c["vision_config"].get(k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
        "qformer": {k: c["qformer_config"].get(k) for k in ("hidden_size", "num_hidden_layers")},
        "parameters": model.num_parameters(),
        "parts": parts,
        "config_dtype": getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None),
        "stored_dtypes": dtypes,
        "files": {p.name: p.stat().st_size for p in files},
    }


def _fmt_n(n: int) -> str:
    for unit, k in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def print_runtime(rt: dict) -> None:
    print(f"CPU              {rt['cpu']} ({rt['machine']}, {rt['cores']} cores, torch threads {rt['threads']})")
    print(f"features         {' '.join(rt['flags']) or 'none of note'}")
    print(f"torch            {rt['torch']}")
    print(f"C kernels        {rt['kernels']}")
    print(f"dispatch         (measured here, cached in {rt['dispatch_cache']})")
    for r in rt["dispatch"]:
        times = ", ".join(f"{k} {v:g} ms" for k, v in r["ms"].items())
        why = r["why"]
        if why.startswith("measured"):  # the timings say why; a provisional choice also says so
            why = (times or "not measured") + ("" if why == "measured" else f" ({why})")
        print(f"  {r['op']:<17} {str(r['choice']):<8} {why}")


def run(args: argparse.Namespace) -> int:
    if args.runtime or args.recalibrate:
        from ...backends.cpu import runtime

        rt = runtime.describe(recalibrate=args.recalibrate)
        print(json.dumps(rt, indent=2)) if args.json else print_runtime(rt)
        if args.model_name is None:
            return 0
    if args.model_name is None:
        raise UsageError("info needs a MODEL, or --runtime")
    d = model_dir(args.model_name)
    try:
        info = describe(d)
    except Exception as e:  # a damaged config or header: one line naming it, not a traceback
        raise unusable(d, e) from e
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}")
    print(f"  architecture     {info['architecture']}" + (f" (language model: {info['language_model']})"
                                                          if info["language_model"] else ""))
    v, q = info["vision"], info["qformer"]
    print(f"  vision           ViT {v['num_hidden_layers']} layers x {v['hidden_size']}, "
          f"{v['image_size']}px images, {v['patch_size']}px patches")
    print(f"  Q-Former         {q['num_hidden_layers']} layers x {q['hidden_size']}, "
          f"{info['num_query_tokens']} queries")
    print(f"  parameters       {info['parameters']:,} ({_fmt_n(info['parameters'])})")
    for name, n in info["parts"].items():
        print(f"    {name:<22} {n:>15,}")
    stored = ", ".join(f"{k} x{n}" for k, n in info["stored_dtypes"].items()) or "unknown"
    print(f"  dtype            {info['config_dtype'] or 'not set in config'} (stored tensors: {stored})")
    print(f"  files            {_fmt_bytes(sum(info['files'].values()))} in all")
    for name, n in info["files"].items():
        print(f"    {name:<40} {_fmt_bytes(n):>10}")
    return 0
