"""Small numeric building blocks shared by the towers.

`Linear` is nn.Linear with one CPU fast path: on CPUs without native bf16 matrix instructions
(no AVX512_BF16 / AMX), oneDNN emulates bf16 GEMMs at a fraction of fp32 speed (measured here:
a 257x1408 @ 1408x6144 product takes 73 ms in bf16 and 16 ms in fp32). For inputs with many rows
(the ViT, prefill, batches) we compute in fp32 from the bf16 weights instead: the products of two
bf16 numbers are exact in fp32 and both paths accumulate in fp32, so only the summation order
differs. Single-row decode steps are bandwidth-bound and stay in bf16, which reads half the bytes.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


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


UPCAST_MIN_ROWS = 64  # below this, bf16 GEMV-like work is bandwidth-bound and bf16 wins


@functools.cache
def cpu_has_native_bf16() -> bool:
    env = os.environ.get("BLIP2_CPU_NATIVE_BF16")
    if env is not None:
        return env not in ("0", "false", "False")
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True  # not Linux: trust the library's kernels
    return any(x in flags for x in ("avx512_bf16", "amx_bf16"))


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]
            and not cpu_has_native_bf16()
        ):
            b = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), b).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding that leaves its table uninitialised at construction.

    Models are built on the meta device and then loaded, or initialised once by post_init; the
    default random init would only be thrown away, and on the meta device torch's `normal_`
    imports torch._dynamo (about 1.5 s on the first model of a process).
    """

    def reset_parameters(self) -> None:
        pass
