"""Build, bind and check the C kernels (kernels.c), once per process.

They are compiled on first use with the system's C compiler (`cc -O3 -march=native -fopenmp`,
about a second) into ~/.cache/blip2/kernels (or $BLIP2_KERNEL_CACHE), loaded with ctypes, and
checked against torch on small products before anything uses them; they share torch's OpenMP
runtime. kernels.c is one source for two instruction sets, chosen from the CPU's flags: AVX-512F
where the CPU has it, else AVX2 + FMA (built with `-mno-avx512f`). BLIP2_KERNEL_ISA=avx2 or avx512
forces one (avx2 on an AVX-512 CPU is how the AVX2 build is tested); `isa()` says which is in use.
Without a compiler, on a CPU with neither (ARM, old x86), or with BLIP2_NO_KERNELS=1, `lib()` is
None and every layer runs torch's kernels, as it would without this backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .layout import BLOCK, blocks_of, to_int4pack

SOURCE = Path(__file__).with_name("kernels.c")
HEADERS = (Path(__file__).with_name("simd.h"),)  # included by kernels.c

# ISA -> the compiler flags that select it in kernels.c (`#ifdef __AVX512F__`) and its vector width,
# which the built library reports (kernels_isa) so that a build is never taken for the other
ISAS = {"avx512": (["-march=native"], 512), "avx2": (["-march=native", "-mno-avx512f"], 256)}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_isa: str | None = None
_reason = "not built yet"
_tried = False


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return ""
    first = text.split("\n\n")[0]
    # x86 names its features "flags", ARM "Features"
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags", "Features")))


def _cache_dir() -> Path:
    env = os.environ.get("BLIP2_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2" / "kernels"


def _cpu_flags(cpu: str) -> set[str]:
    """The feature flags in _cpu_info()'s text ("avx2", "fma", "avx512f", ...)."""
    return set(next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), []))


def _choose(cpu: str) -> tuple[str | None, str]:
    """The ISA to build for here ("avx512", "avx2" or None) and why. Raises ValueError when
    BLIP2_KERNEL_ISA asks for one this CPU cannot run (or is not an ISA)."""
    if os.environ.get("BLIP2_NO_KERNELS", "0") not in ("0", "", "false", "False"):
        return None, "BLIP2_NO_KERNELS is set"
    flags = _cpu_flags(cpu)
    x86 = platform.machine() in ("x86_64", "AMD64")
    best = None if not x86 else "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else None
    want = os.environ.get("BLIP2_KERNEL_ISA", "").strip().lower()
    if want in ("", "auto"):
        if not x86:
            return None, f"{platform.machine()} CPU: the kernels are for x86-64 (AVX2 or AVX-512)"
        if best is None:
            return None, "this CPU has neither AVX-512F nor AVX2 + FMA"
        return best, "AVX-512F on this CPU" if best == "avx512" else "AVX2 + FMA on this CPU, no AVX-512F"
    if want not in ISAS:
        raise ValueError(f"BLIP2_KERNEL_ISA={want!r}: use avx512, avx2 or auto")
    if best is None or (want == "avx512" and best != "avx512"):
        raise ValueError(f"BLIP2_KERNEL_ISA={want}: this CPU cannot run it (best here: {best or 'neither'})")
    return want, f"BLIP2_KERNEL_ISA={want}"


def _compile(cpu: str, isa: str) -> Path:
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", *ISAS[isa][0], "-fopenmp", "-shared", "-fPIC"]
    src = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = hashlib.sha256(src + cpu.encode() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"kernels-{isa}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"`{cc} {' '.join(flags)}` failed on {SOURCE}:\n{r.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: processes building at once each publish a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q8_mm.argtypes = [P, I64, I64, P, I64, P, P, P, I]
    lib.bf16_mm.argtypes = [P, I64, I64, P, I64, P, P, I]
    lib.q8_unpack_f32.argtypes = [P, I64, I64, P, I]
    lib.bf16_unpack_f32.argtypes = [P, I64, I64, P, I]
    lib.q8_mm_bf16.argtypes = lib.q8_mm.argtypes
    lib.bf16_mm_bf16.argtypes = lib.bf16_mm.argtypes
    lib.q4_mm.argtypes = lib.q4_mm_bf16.argtypes = [P, I64, I64, I64, P, I64, P, I, P, P, I]
    lib.q4_unpack_f32.argtypes = [P, I64, I64, I64, P, I, P, I]
    lib.q4_pack.argtypes = lib.q4_unpack.argtypes = [P, P, I64, I64, I]
    lib.attn1_bf16.argtypes = [P, P, P, P, I64, I64, I64, I64, I64, ctypes.c_float, P, I]
    lib.kernels_isa.argtypes, lib.kernels_isa.restype = [], I
    for f in (lib.q8_mm, lib.bf16_mm, lib.q8_unpack_f32, lib.bf16_unpack_f32, lib.q8_mm_bf16, lib.bf16_mm_bf16,
              lib.q4_mm, lib.q4_mm_bf16, lib.q4_unpack_f32, lib.q4_pack, lib.q4_unpack, lib.attn1_bf16):
        f.restype = None
    return lib


def _self_test(lb: ctypes.CDLL, isa: str) -> None:
    """The ISA it was built for, and a small product of each kind against torch's, so that a
    miscompiled library is never used."""
    if lb.kernels_isa() != ISAS[isa][1]:
        raise RuntimeError(f"asked for {isa}, the compiler built {lb.kernels_isa()}-bit vectors")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g)
    for dt in BLOCK:
        N = 64 if dt == torch.uint8 else 16
        y = torch.empty(3, N)
        if dt == torch.uint8:  # int4: q in [0, 15], one (s, z) group per row (s = 1, z = 8: w = q)
            q = torch.randint(0, 16, (N, 128), generator=g, dtype=torch.uint8)
            w, src = torch.empty(N, 64, dtype=torch.uint8), to_int4pack(q)
            lb.q4_pack(src.data_ptr(), w.data_ptr(), N, 128, 1)
            sz = torch.tensor([1.0, 8.0]).expand(1, N, 2).contiguous()
            lb.q4_mm(w.data_ptr(), N, 128, 128, x.data_ptr(), 3, sz.data_ptr(), 1, None, y.data_ptr(), 1)
            w = q
        else:
            w = torch.randint(-100, 100, (N, 128), generator=g, dtype=torch.int8) if dt == torch.int8 \
                else torch.randn(N, 128, generator=g).to(dt)
            p = blocks_of(w, *BLOCK[dt]).contiguous()
            if dt == torch.int8:
                lb.q8_mm(p.data_ptr(), N, 128, x.data_ptr(), 3, None, None, y.data_ptr(), 1)
            else:
                lb.bf16_mm(p.data_ptr(), N, 128, x.data_ptr(), 3, None, y.data_ptr(), 1)
        ref = x @ w.float().T
        if not torch.allclose(y, ref, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"the compiled kernels give wrong {dt} products (max error "
                               f"{(y - ref).abs().max().item():.3g}); not using them")


def load(isa: str) -> ctypes.CDLL:
    """The kernels built for `isa` ("avx512" or "avx2", which this CPU must run): compiled or taken
    from the cache, bound and checked. Raises where that fails. lib() is load() of this CPU's ISA."""
    lb = _bind(_compile(_cpu_info(), isa))
    _self_test(lb, isa)
    return lb


def lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (the reason is warned once, unless
    it is the CPU or BLIP2_NO_KERNELS). Raises ValueError for a BLIP2_KERNEL_ISA this CPU lacks."""
    global _lib, _isa, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        isa, _reason = _choose(_cpu_info())
        if isa is not None:
            try:
                _lib, _isa = load(isa), isa
            except Exception as e:  # no compiler, a read-only home, a wrong result: fall back
                _lib, _reason = None, "build failed: " + (str(e).splitlines() or [type(e).__name__])[0]
                warnings.warn(f"blip2: CPU decode kernels unavailable, using torch's ({e}). "
                              "Install a C compiler (gcc) for faster decoding, or set BLIP2_NO_KERNELS=1 "
                              "to silence this.", RuntimeWarning, stacklevel=2)
        _tried = True
    return _lib


def available() -> bool:
    return lib() is not None


def isa() -> str | None:
    """The instruction set of the kernels in use: "avx512", "avx2", or None (torch's kernels;
    isa_reason() says why)."""
    lib()
    return _isa


def isa_reason() -> str:
    """One line: why isa() is what it is (the CPU's flags, BLIP2_KERNEL_ISA, BLIP2_NO_KERNELS, or
    the build's error)."""
    lib()
    return _reason
