"""Small building blocks shared by the towers: activations by their config names, an embedding
that skips its throw-away init, and the causal-LM loss."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --- activations, by the names config files use ---
def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation spelled out term by term, as the reference computes it (bit-for-bit)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACT:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(ACT)}")
    return ACT[name]


class Embedding(nn.Embedding):
    """nn.Embedding that leaves its table uninitialised at construction.

    Models are built on the meta device and then loaded, or initialised once by post_init; the
    default random init would only be thrown away, and on the meta device torch's `normal_`
    imports torch._dynamo (about 1.5 s on the first model of a process).
    """

    def reset_parameters(self) -> None:
        pass


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None,
                   label_smoothing: float = 0.0) -> Tensor:
    """logits (B, T, V), labels (B, T): token t predicts label t+1; -100 is ignored; fp32, as the
    reference computes it. num_items_in_batch: sum and divide by it (gradient accumulation)."""
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    red = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100,
                           reduction=red, label_smoothing=label_smoothing)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss
