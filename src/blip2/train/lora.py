"""LoRA adapters (Hu et al. 2021) on the linear layers of a frozen module, and their merge back.

    names = add_lora(model.language_model, ("q_proj", "v_proj"), rank=8, alpha=16)
    train(model, proc, data, TrainConfig(..., unfreeze=("lora_",)))   # only the adapters of the LM train
    merge_lora(model)                                                 # plain nn.Linear again: save_pretrained

A wrapped layer computes base(x) + (x A^T) B^T * alpha / rank; B starts at zero, so the model is
unchanged until it trains. The wrapper keeps the base layer as its child `base`, so a checkpoint of a
wrapped model has keys "...q_proj.base.weight" and "...q_proj.lora_A": it reloads into a model wrapped
the same way (resume). merge_lora folds the update into the base weight and puts the plain layer back,
so the saved model has the original keys and loads anywhere (transformers included).

(peft does this for transformers models; it depends on transformers and accelerate, which the
runtime does not, and a wrapper of a few lines suffices for these models.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base


def add_lora(module: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float = 16.0) -> list[str]:
    """Wrap every nn.Linear inside `module` whose own name is in `targets`; returns their full names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    done = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                done.append(f"{name}.{child_name}" if name else child_name)
    if not done:
        raise ValueError(f"no linear layer named {', '.join(targets)} to put LoRA adapters on")
    return done


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRALinear inside `module` into its base layer, in place; returns how many."""
    n = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                n += 1
    return n
