"""Block-packed weights and the CPU kernels that stream them (kernels.c), for decode steps.

A decode step is a matrix-vector product per linear layer: its speed is the rate at which the
weights come in from memory. On this project's 2-core AVX-512 VM, torch reads row-major bf16
weights at 19-25 GB/s (`torch.mv`), int8 ones at 13-17 GB/s (`_weight_int8pack_mm`) and int4 ones
at about 18 (`_weight_int4pack_mm_for_cpu`), where a plain fp32 sum reads 28-30; kernels.c reads
weights stored in small row blocks (see its header) at 26-31 GB/s in all three.

How it is used. from_pretrained on CPU loads the language model's eligible weights (`ops.Linear`
in bf16, `quantize.Int8Linear`, `quantize.Int4Linear`) already in the blocked layout and marks
their layers (`PreTrainedModel._pack_plan`); `pack_(module)` does the same in place for a model
built another way. A packed layer keeps its tensors' shapes and dtypes, and the layout is
invisible from outside: state_dict() writes row-major tensors, load_state_dict() takes them, and
a layer that was moved or cast, or that is trained (grad through its weight), unpacks itself at
its next forward. Products with many rows (prefill, batches) unpack into an fp32 buffer for one
GEMM, as the unpacked layers do. Beside the products:
- layers a module lists in `fuse_packed` (OPT's q/k/v) are loaded back to back in one buffer and
  served by one call (ops.fused_linear);
- a tied head, which must stay row-major for the embedding lookup, keeps a packed copy for decode
  steps (Packable.packed_copy), rebuilt when the weight changes;
- attend_one: a decode step's attention, straight from the bf16 KV cache.

The kernels are C, compiled on first use with the system's C compiler (`cc -O3 -march=native
-fopenmp`, about a second) into ~/.cache/blip2/kernels (or $BLIP2_KERNEL_CACHE) and loaded with
ctypes; they share torch's OpenMP runtime. Without a compiler, without AVX-512, or with
BLIP2_NO_KERNELS=1, nothing is packed and torch's kernels run as before.
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
from typing import Optional

import torch
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("kernels.c")
# dtype -> (rows per block, columns per chunk), as kernels.c lays them out. uint8 is int4 (two values
# a byte, quantize.Int4Linear's qweight): 64 rows, chunks of 8 values (4 bytes) per row.
BLOCK = {torch.int8: (8, 64), torch.bfloat16: (4, 32), torch.uint8: (64, 4)}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return ""
    first = text.split("\n\n")[0]
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags")))


def _cache_dir() -> Path:
    env = os.environ.get("BLIP2_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2" / "kernels"


def _build(cpu: str) -> Path:
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + cpu.encode() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"kernels-{key}.so"
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
    lib.attn1_bf16.argtypes = [P, P, P, P, I64, I64, I64, I64, ctypes.c_float, P, I]
    for f in (lib.q8_mm, lib.bf16_mm, lib.q8_unpack_f32, lib.bf16_unpack_f32, lib.q8_mm_bf16, lib.bf16_mm_bf16,
              lib.q4_mm, lib.q4_mm_bf16, lib.q4_unpack_f32, lib.q4_pack, lib.q4_unpack, lib.attn1_bf16):
        f.restype = None
    return lib


def _self_test(lb: ctypes.CDLL) -> None:
    """A small product of each kind against torch's, so a miscompiled library is never used."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g)
    for dt in BLOCK:
        N = 64 if dt == torch.uint8 else 16
        y = torch.empty(3, N)
        if dt == torch.uint8:  # int4: q in [0, 15], one (s, z) group per row (s = 1, z = 8: w = q)
            q = torch.randint(0, 16, (N, 128), generator=g, dtype=torch.uint8)
            from .quantize import pack_int4  # torch's int4pack layout (quantize imports this module)

            w, src = torch.empty(N, 64, dtype=torch.uint8), pack_int4(q)
            lb.q4_pack(src.data_ptr(), w.data_ptr(), N, 128, 1)
            sz = torch.tensor([1.0, 8.0]).expand(1, N, 2).contiguous()
            lb.q4_mm(w.data_ptr(), N, 128, 128, x.data_ptr(), 3, sz.data_ptr(), 1, None, y.data_ptr(), 1)
            w = q
        else:
            w = torch.randint(-100, 100, (N, 128), generator=g, dtype=torch.int8) if dt == torch.int8 \
                else torch.randn(N, 128, generator=g).to(dt)
            p = pack(w, *BLOCK[dt])
            if dt == torch.int8:
                lb.q8_mm(p.data_ptr(), N, 128, x.data_ptr(), 3, None, None, y.data_ptr(), 1)
            else:
                lb.bf16_mm(p.data_ptr(), N, 128, x.data_ptr(), 3, None, y.data_ptr(), 1)
        ref = x @ w.float().T
        if not torch.allclose(y, ref, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"the compiled kernels give wrong {dt} products (max error "
                               f"{(y - ref).abs().max().item():.3g}); not using them")


def lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (the reason is warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        why = None
        cpu = _cpu_info()
        if os.environ.get("BLIP2_NO_KERNELS", "0") not in ("0", "", "false", "False"):
            pass  # asked not to: no warning
        elif platform.machine() not in ("x86_64", "AMD64") or " avx512f" not in cpu:
            pass  # no AVX-512 here: torch's kernels it is, silently
        else:
            try:
                _lib = _bind(_build(cpu))
                _self_test(_lib)
            except Exception as e:  # no compiler, a read-only home, a wrong result: fall back
                _lib, why = None, e
        if why is not None:
            warnings.warn(f"blip2: CPU decode kernels unavailable, using torch's ({why}). "
                          "Install a C compiler (gcc) for faster decoding, or set BLIP2_NO_KERNELS=1 "
                          "to silence this.", RuntimeWarning, stacklevel=2)
        _tried = True
    return _lib


def available() -> bool:
    return lib() is not None


# --- the layout: int8 and bf16 in torch (a reshape and transpose, for any device); int4 in C ---
def block_for(dtype: torch.dtype, shape) -> tuple[int, int] | None:
    """The block a weight of this dtype and shape packs in: int8, bf16 or int4 (uint8), 2-D, a
    whole number of blocks; else None."""
    block = BLOCK.get(dtype)
    if block is None or len(shape) != 2 or shape[0] % block[0] or shape[1] % block[1]:
        return None
    return block


def fits(w: Tensor) -> bool:
    """w can be packed here and now: a packable dtype and shape, contiguous, on CPU."""
    return (block_for(w.dtype, w.shape) is not None and w.device.type == "cpu" and not w.is_meta
            and w.is_contiguous())


def _blocked(w: Tensor, R: int, C: int) -> Tensor:
    N, K = w.shape
    return w.view(N // R, R, K // C, C).transpose(1, 2)  # (N/R, K/C, R, C) view of the row-major


def pack_into(w: Tensor, out: Tensor, R: int, C: int) -> Tensor:
    """Pack row-major w (N, K) into out, a contiguous (N, K) tensor (of w's dtype, or another float
    dtype to convert to) that does not overlap w. Returns out."""
    N, K = w.shape
    if w.dtype == torch.uint8:  # int4: from torch's int4pack layout (needs the library)
        _lib.q4_pack(w.data_ptr(), out.data_ptr(), N, 2 * K, torch.get_num_threads())
    else:
        out.view(N // R, K // C, R, C).copy_(_blocked(w, R, C))
    return out


def pack(w: Tensor, R: int, C: int) -> Tensor:
    """Row-major (N, K) -> blocked, same shape and dtype: always a new tensor (where K == C the
    blocked view is already contiguous, and .contiguous() would hand back w itself)."""
    return pack_into(w.contiguous(), torch.empty_like(w, memory_format=torch.contiguous_format), R, C)


def pack_in_place(w: Tensor, R: int, C: int, scratch: Tensor | None = None) -> Tensor:
    """Pack w's own memory (through a temporary, or `scratch`, a uint8 buffer of at least w's
    bytes that is reused across calls). Returns w."""
    n = w.numel() * w.element_size()
    tmp = scratch[:n].view(w.dtype).view(w.shape) if scratch is not None else torch.empty_like(w)
    w.copy_(pack_into(w, tmp, R, C))
    return w


def unpack(w: Tensor, R: int, C: int) -> Tensor:
    """Blocked (N, K) -> row-major, a new tensor."""
    N, K = w.shape
    if w.dtype == torch.uint8:
        src, out = w.contiguous(), torch.empty_like(w, memory_format=torch.contiguous_format)
        _lib.q4_unpack(src.data_ptr(), out.data_ptr(), N, 2 * K, torch.get_num_threads())
        return out
    return w.view(N // R, K // C, R, C).transpose(1, 2).contiguous().view(N, K)


# --- the products ---
# Up to this many rows the kernels (which convert each weight once per two rows) beat unpacking the
# weight to fp32 for one GEMM (measured on the 2-core AVX-512 VM: 10 vs 15 ms at 32 rows, 21 vs 20
# at 64, for a 10240x2560 layer).
GEMV_MAX_ROWS = 48

def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def _mm(x: Tensor, w: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """x (M, K) fp32 or bf16 contiguous, w packed (N, K) -> (M, N) in x's dtype (computed in fp32).
    For int4 w (uint8, (N, K/2)), scale is its (K/G, N, 2) scales and zeros, bf16 or fp32."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    nt = torch.get_num_threads()
    bf = x.dtype == torch.bfloat16
    if w.dtype == torch.uint8:
        f = _lib.q4_mm_bf16 if bf else _lib.q4_mm
        f(w.data_ptr(), N, K, K // scale.shape[0], x.data_ptr(), M, scale.data_ptr(),
          int(scale.dtype == torch.float32), _ptr(bias), y.data_ptr(), nt)
    elif w.dtype == torch.int8:
        f = _lib.q8_mm_bf16 if bf else _lib.q8_mm
        f(w.data_ptr(), N, K, x.data_ptr(), M, _ptr(scale), _ptr(bias), y.data_ptr(), nt)
    else:
        f = _lib.bf16_mm_bf16 if bf else _lib.bf16_mm
        f(w.data_ptr(), N, K, x.data_ptr(), M, _ptr(bias), y.data_ptr(), nt)
    return y


@torch.library.custom_op("blip2::packed_mm", mutates_args=())
def _packed_mm_op(x: Tensor, w: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    return _mm(x, w, scale, bias)


@_packed_mm_op.register_fake
def _(x, w, scale, bias):
    return x.new_empty(x.shape[0], w.shape[0])  # in x's dtype


def packed_mm(x: Tensor, w: Tensor, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """y = (x @ unpacked(w)^T) * scale + bias computed in fp32; x (M, K) any float dtype, scale and
    bias (N,) fp32 contiguous (Packable.fp32_extras keeps them so; for int4, scale is the (K/G, N, 2)
    scales and zeros, bf16 or fp32). y is bf16 for bf16 x (rounded once, in C), else fp32."""
    x = x.contiguous() if x.dtype == torch.bfloat16 else x.float().contiguous()
    if torch.compiler.is_compiling():
        return _packed_mm_op(x, w, scale, bias)  # opaque to the compiler
    return _mm(x, w, scale, bias)  # eager: skip the op dispatcher (~10 us a call)


def unpack_f32(w: Tensor, out: Tensor, sz: Tensor | None = None) -> Tensor:
    """Blocked int8/bf16 (N, K) -> row-major fp32 values, written into out (N*K fp32 elements).
    Blocked int4 (N, K/2) with its scales and zeros sz -> the dequantized (N, K) weight."""
    nt = torch.get_num_threads()
    if w.dtype == torch.uint8:
        N, K = w.shape[0], 2 * w.shape[1]
        o = out[: N * K].view(N, K)
        _lib.q4_unpack_f32(w.data_ptr(), N, K, K // sz.shape[0], sz.data_ptr(), int(sz.dtype == torch.float32),
                           o.data_ptr(), nt)
        return o
    N, K = w.shape
    o = out[: N * K].view(N, K)
    f = _lib.q8_unpack_f32 if w.dtype == torch.int8 else _lib.bf16_unpack_f32
    f(w.data_ptr(), N, K, o.data_ptr(), nt)
    return o


class Packable:
    """Mixin for a layer whose weight (the attribute named `packed_name`) may be block-packed.
    `block` is (rows, columns) of the layout while packed, else None."""

    packed_name = "weight"
    block: tuple[int, int] | None = None
    # Keep a packed copy of the (row-major) weight for products with few rows: for a weight that
    # is shared and read row-major elsewhere (a head tied to the input embedding), where the
    # kernels' faster streaming pays for the memory (OPT-2.7b's head: 257 MB, 2.9 ms a token).
    packed_copy = False
    # Layers of one class that can share one kernel call when their weights lie back to back (see
    # ops.fused_linear); int4 cannot (its blocked scales would need a concatenated copy).
    fuses = True

    def packed_ok(self, x: Tensor) -> bool:
        """Whether the packed weight serves a product with x: kernels loaded, the weight still on
        CPU in the dtype it was packed in, and no gradient to carry (the kernels have no backward).
        Where not, forward unpacks the layer for good: it was moved, cast, or is being trained."""
        w = getattr(self, self.packed_name)
        return (_lib is not None and w.device.type == "cpu" and BLOCK.get(w.dtype) == self.block
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))

    def kernel_copy(self, x: Tensor) -> Tensor | None:
        """The packed copy of the weight for a product with x, made on first use and again whenever
        the weight changed (its version counter or memory); None where the kernels do not serve x."""
        w = getattr(self, self.packed_name)
        if not self.packed_copy or self.block is not None or torch.compiler.is_compiling():
            return None
        if not fits(w) or lib() is None:  # moved, cast: the copy is of no more use
            self.__dict__.pop("_copy", None)
            return None
        if x.numel() >= GEMV_MAX_ROWS * x.shape[-1] or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return None
        key = (w.data_ptr(), w._version, w.dtype)
        c = self.__dict__.get("_copy")
        if c is None or c[0] != key:
            self.__dict__.pop("_extras", None)
            c = self.__dict__["_copy"] = (key, pack(w.detach(), *BLOCK[w.dtype]))
        return c[1]

    @torch.no_grad()
    def pack_(self) -> bool:
        w = getattr(self, self.packed_name)
        if self.block is None and fits(w) and lib() is not None:
            # in place: a weight mmapped from a checkpoint (copy-on-write) turns into private
            # memory page by page, so resident memory does not hold it twice
            pack_in_place(w, *BLOCK[w.dtype])
            self.mark_packed(BLOCK[w.dtype])
        return self.block is not None

    def mark_packed(self, block: tuple[int, int]) -> None:
        """The weight now holds the blocked layout (packed by pack_, or loaded so): lay out what is
        read alongside it to match (see _companions_)."""
        self.block = block
        self._companions_(pack=True)

    def _companions_(self, pack: bool) -> None:
        """Re-lay, in place, tensors the kernels read alongside the weight (int4's scales); none here."""

    @torch.no_grad()
    def unpack_(self) -> None:
        if self.block is not None:
            w = getattr(self, self.packed_name)
            w.copy_(unpack(w, *self.block))
            self._companions_(pack=False)
            self.block = None
        self.__dict__.pop("_extras", None)
        self.__dict__.pop("_fused", None)

    def fp32_extras(self) -> tuple[Tensor | None, Tensor | None]:
        """(scale, bias) as the kernels take them, fp32 and contiguous, kept while packed: converting
        them on every decode step cost as much time as the rest of the call's Python."""
        c = self.__dict__.get("_extras")
        if c is None:
            b = getattr(self, "bias", None)
            c = (self._kernel_scale(), None if b is None else b.detach().float().contiguous())
            if not torch.compiler.is_compiling():
                self.__dict__["_extras"] = c
        return c

    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes and returns in (for inputs of that dtype)."""
        s = getattr(self, "scales", None)
        return (s if s is not None else getattr(self, self.packed_name)).dtype

    def _kernel_scale(self) -> Tensor | None:
        s = getattr(self, "scales", None)
        return None if s is None else s.detach().float().contiguous()

    def row_major_weight(self) -> Tensor:
        w = getattr(self, self.packed_name)
        return w if self.block is None else unpack(w.detach(), *self.block)

    def row_major(self) -> dict[str, Tensor]:
        """The packed tensors as state_dict has them (new tensors): the weight, and companions."""
        return {self.packed_name: self.row_major_weight()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.block is not None:
            destination.update({prefix + k: t for k, t in self.row_major().items()})

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack_()  # the incoming tensor is row-major, and so is any key it leaves untouched
        super()._load_from_state_dict(*args, **kwargs)


# --- attention in a decode step ---
def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor | None:
    """SDPA for one query per row (a decode step) over a bf16 KV cache, read as it is: q (B, H, 1, D),
    k and v (B, H, S, D) contiguous, mask None or bool broadcastable from (B, 1, 1, S) (True = attend).
    Returns (B, H, 1, D) bf16, computed in fp32 and rounded once; None where this does not apply
    (then use SDPA)."""
    B, H, T, D = q.shape
    if (_lib is None or torch.compiler.is_compiling() or T != 1 or k.shape != (B, H, k.shape[2], D)
            or k.shape != v.shape or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in (q, k, v))
            or not (k.is_contiguous() and v.is_contiguous())
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        return None
    S = k.shape[2]
    m = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != S:
            return None
        m = mask.expand(B, 1, 1, S).reshape(B, S).contiguous().view(torch.uint8)
    qc = q.reshape(B, H, D).contiguous()
    y = torch.empty(B, 1, H, D, dtype=torch.bfloat16)
    _lib.attn1_bf16(qc.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(m), B, H, S, D, scale, y.data_ptr(),
                    torch.get_num_threads())
    return y.transpose(1, 2)


def pack_(module: nn.Module) -> int:
    """Pack every eligible layer in `module`; returns how many were. Weights shared with another
    module (a tied head) are left alone: the other user reads them row-major."""
    if lib() is None:
        return 0
    uses: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    n = 0
    for m in module.modules():
        if isinstance(m, Packable) and uses.get(id(getattr(m, m.packed_name)), 0) <= 1:
            n += m.pack_()
    return n


def unpack_all_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, Packable):
            m.unpack_()
