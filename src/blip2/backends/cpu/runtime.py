"""What the CPU backend does on this machine: the CPU, the kernels' build, and the path each kind of
product takes (dispatch.py), for `blip2 info --runtime` and the benchmark records."""

from __future__ import annotations

import os
import platform

import torch

from . import build, dispatch

# the CPU features the paths depend on (x86: /proc/cpuinfo "flags"; ARM: "Features")
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
         "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")


def cpu_flags() -> list[str]:
    """The FLAGS this CPU reports, in FLAGS' order."""
    have: set[str] = set()
    for line in build._cpu_info().splitlines():
        if line.startswith(("flags", "Features")):
            have.update(line.split(":", 1)[1].split())
    return [f for f in FLAGS if f in have]


def describe(measure: bool = True, recalibrate: bool = False) -> dict:
    """The runtime as plain data. measure: time the ops not yet measured (a few seconds, once per
    machine); recalibrate: forget this machine's cached choices first."""
    if recalibrate:
        dispatch.forget()
    isa = build.isa()
    return {
        "cpu": dispatch.cpu_model() or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels": f"{isa} ({build.isa_reason()})" if isa else f"none: torch's kernels everywhere ({build.isa_reason()})",
        "dispatch": dispatch.report(measure),
        "dispatch_cache": str(dispatch.cache_file()),
    }
