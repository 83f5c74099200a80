"""Checkpoints of a training run, for exact resume.

A checkpoint directory holds the model (save_pretrained: config.json + model.safetensors,
loadable by from_pretrained), the processor, and trainer_state.pt with the optimizer, the LR
schedule, the step, the data order (this epoch's permutation, the position in it and the order
generator) and every RNG (torch CPU/CUDA, python, numpy, the ITM negative sampler). Resuming from
step k therefore replays steps k+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..checkpoint.pretrained import checkpoint_files

STATE_NAME = "trainer_state.pt"


def rng_state(gens: dict[str, torch.Generator]) -> dict:
    s = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
             generators={k: g.get_state() for k, g in gens.items()})
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict, gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    for k, g in gens.items():
        g.set_state(s["generators"][k])


def save_checkpoint(d: Path, model, processor, state: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(d)
    tmp = d / (STATE_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, d / STATE_NAME)  # a checkpoint with a state file is complete
    return d


def load_weights_into(model: nn.Module, d: Path) -> None:
    """Copy a save_pretrained checkpoint's weights into `model` in place (parameters keep their identity)."""
    files, fmt = checkpoint_files(d)
    sd = {}
    for f in files:
        sd.update(load_file(str(f)) if fmt == "safetensors" else torch.load(f, map_location="cpu", weights_only=True))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(model.tied_weights()) if hasattr(model, "tied_weights") else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {d} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint-<step> directory with the highest step, or None."""
    ds = [p for p in Path(output_dir).glob("checkpoint-*") if (p / STATE_NAME).is_file()]
    ds = [p for p in ds if p.name.split("-", 1)[1].isdigit()]
    return max(ds, key=lambda p: int(p.name.split("-", 1)[1])) if ds else None


def read_state(d: Path, model: nn.Module, stage: str) -> dict:
    """Load checkpoint d's weights into model and return its trainer state (checked to be `stage`'s)."""
    load_weights_into(model, d)
    st = torch.load(d / STATE_NAME, map_location="cpu", weights_only=False)
    if st["stage"] != stage:
        raise ValueError(f"{d} is a {st['stage']} checkpoint, this run is {stage}")
    return st
