"""The C kernels' two builds (backends/cpu: build.py, kernels.c): which instruction set a CPU gets,
and the AVX2 build (forced on an AVX-512 CPU with BLIP2_KERNEL_ISA=avx2) passing the kernel tests
and agreeing with the AVX-512 build symbol by symbol."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip2.backends.cpu import build, layout

pytestmark = pytest.mark.kernels

_FLAGS = build._cpu_flags(build._cpu_info())
_X86 = platform.machine() in ("x86_64", "AMD64")
needs_avx2 = pytest.mark.skipif(not (_X86 and {"avx2", "fma"} <= _FLAGS and build.available()),
                                reason="no kernels here (no AVX2 + FMA, no compiler, or BLIP2_NO_KERNELS)")
needs_both = pytest.mark.skipif(not (_X86 and "avx512f" in _FLAGS and build.available()),
                                reason="no AVX-512 kernels here to compare the AVX2 build with")

AVX512 = "fpu sse2 avx avx2 fma avx512f avx512bw avx512vl"
AVX2 = "fpu sse2 avx avx2 fma"


@pytest.mark.parametrize("machine,flags,env,want", [
    ("x86_64", AVX512, {}, "avx512"),
    ("x86_64", AVX2, {}, "avx2"),
    ("x86_64", "fpu sse2 avx", {}, None),  # AVX without AVX2: torch's kernels
    ("x86_64", "fpu sse2 avx avx2", {}, None),  # AVX2 without FMA
    ("aarch64", "fp asimd sve", {}, None),
    ("x86_64", AVX512, {"BLIP2_KERNEL_ISA": "avx2"}, "avx2"),  # how the AVX2 build is tested
    ("x86_64", AVX512, {"BLIP2_KERNEL_ISA": "auto"}, "avx512"),
    ("x86_64", AVX512, {"BLIP2_NO_KERNELS": "1", "BLIP2_KERNEL_ISA": "avx512"}, None),
    ("x86_64", AVX2, {"BLIP2_KERNEL_ISA": "avx512"}, ValueError),  # asked for what the CPU lacks
    ("x86_64", "fpu sse2 avx", {"BLIP2_KERNEL_ISA": "avx2"}, ValueError),
    ("aarch64", "fp asimd", {"BLIP2_KERNEL_ISA": "avx2"}, ValueError),
    ("x86_64", AVX512, {"BLIP2_KERNEL_ISA": "sse4"}, ValueError),
])
def test_isa_follows_the_cpu_flags_and_the_environment(monkeypatch, machine, flags, env, want):
    monkeypatch.delenv("BLIP2_NO_KERNELS", raising=False)
    monkeypatch.delenv("BLIP2_KERNEL_ISA", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    cpu = f"model name\t: Some CPU\nflags\t\t: {flags}"
    if want is ValueError:
        with pytest.raises(ValueError, match="BLIP2_KERNEL_ISA"):
            build._choose(cpu)
        return
    isa, why = build._choose(cpu)
    assert isa == want and why
    if want is None:  # the reason names what is missing
        assert ("BLIP2_NO_KERNELS" in why) if env else (machine in why or "AVX2 + FMA" in why)
    if env.get("BLIP2_KERNEL_ISA") == "avx2":
        assert why == "BLIP2_KERNEL_ISA=avx2"


@needs_avx2
def test_isa_is_reported():
    want = os.environ.get("BLIP2_KERNEL_ISA") or ("avx512" if "avx512f" in _FLAGS else "avx2")
    assert build.isa() == want and build.isa_reason()
    assert build.lib().kernels_isa() == {"avx512": 512, "avx2": 256}[want]


def _inputs(g: torch.Generator):
    N, K, G = 128, 256, 32
    x = torch.randn(3, K, generator=g)
    w8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    wb = torch.randn(N, K, generator=g).bfloat16()
    q4 = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    sz = torch.stack([torch.rand(K // G, N, generator=g) / 8 + 0.01, torch.randn(K // G, N, generator=g) / 8], -1)
    return x, w8, wb, q4, sz, torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g), G


def _run_all(lb, x, w8, wb, q4, sz, scale, bias, G) -> dict[str, torch.Tensor]:
    """Every product and layout symbol of one library on the same inputs."""
    N, K = w8.shape
    out = {}
    p8 = layout.blocks_of(w8, *layout.BLOCK[torch.int8]).contiguous()
    pb = layout.blocks_of(wb, *layout.BLOCK[torch.bfloat16]).contiguous()
    tl, p4 = layout.to_int4pack(q4), torch.empty(N, K // 2, dtype=torch.uint8)  # torch's int4pack, ours
    lb.q4_pack(tl.data_ptr(), p4.data_ptr(), N, K, 2)
    out["q4_pack"] = p4
    back = torch.empty_like(p4)
    lb.q4_unpack(p4.data_ptr(), back.data_ptr(), N, K, 2)
    out["q4_unpack"] = back
    for M in (1, 2, 3):
        xm, xb = x[:M].contiguous(), x[:M].bfloat16()
        for name, f, args in (("q8_mm", lb.q8_mm, (p8.data_ptr(), N, K)), ("bf16_mm", lb.bf16_mm, (pb.data_ptr(), N, K))):
            extra = (scale.data_ptr(), bias.data_ptr()) if name == "q8_mm" else (bias.data_ptr(),)
            y, yb = torch.empty(M, N), torch.empty(M, N, dtype=torch.bfloat16)
            f(*args, xm.data_ptr(), M, *extra, y.data_ptr(), 2)
            getattr(lb, name + "_bf16")(*args, xb.data_ptr(), M, *extra, yb.data_ptr(), 2)
            out[f"{name}/{M}"], out[f"{name}_bf16/{M}"] = y, yb
        for dt in (torch.float32, torch.bfloat16):
            szb = layout.scales_blocked(sz.to(dt))
            y, yb = torch.empty(M, N), torch.empty(M, N, dtype=torch.bfloat16)
            args = (p4.data_ptr(), N, K, G)
            tail = (szb.data_ptr(), int(dt == torch.float32), bias.data_ptr())
            lb.q4_mm(*args, xm.data_ptr(), M, *tail, y.data_ptr(), 2)
            lb.q4_mm_bf16(*args, xb.data_ptr(), M, *tail, yb.data_ptr(), 2)
            out[f"q4_mm/{dt}/{M}"], out[f"q4_mm_bf16/{dt}/{M}"] = y, yb
    for name, f, p in (("q8_unpack_f32", lb.q8_unpack_f32, p8), ("bf16_unpack_f32", lb.bf16_unpack_f32, pb)):
        o = torch.empty(N, K)
        f(p.data_ptr(), N, K, o.data_ptr(), 2)
        out[name] = o
    o, szb = torch.empty(N, K), layout.scales_blocked(sz)
    lb.q4_unpack_f32(p4.data_ptr(), N, K, G, szb.data_ptr(), 1, o.data_ptr(), 2)
    out["q4_unpack_f32"] = o
    g = torch.Generator().manual_seed(1)
    for S, D in ((37, 20), (9, 80)):  # D not a multiple of 16, and one that is
        B, H = 2, 3
        q, k, v = (torch.randn(B, H, n, D, generator=g).bfloat16() for n in (1, S, S))
        mask = (torch.rand(B, S, generator=g) > 0.3).to(torch.uint8)
        mask[1, : S if D == 20 else S // 2] = 0  # batch row 1: nothing to attend (zeros), or half
        y = torch.empty(B, H, D, dtype=torch.bfloat16)
        lb.attn1_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), B, H, S, D, S * D, D ** -0.5, y.data_ptr(), 2)
        out[f"attn1_bf16/{D}"] = y
    return out


@needs_both
def test_avx2_build_gives_the_avx512_results():
    x, w8, wb, q4, sz, scale, bias, G = inputs = _inputs(torch.Generator().manual_seed(0))
    a, b = build.load("avx512"), build.load("avx2")
    assert (a.kernels_isa(), b.kernels_isa()) == (512, 256)
    ya, yb = _run_all(a, *inputs), _run_all(b, *inputs)
    # how large a product's fp32 rounding can get: the sums of |terms| (int4: in either form,
    # (q - 8) s + z or q s + (z - 8 s))
    w4 = (24 * sz[..., 0].abs() + sz[..., 1].abs()).repeat_interleave(G, 0).T  # (N, K)
    size = {"q8": x.abs() @ (w8.float().abs() * scale[:, None]).T, "bf16": x.abs() @ wb.float().abs().T, "q4": x.abs() @ w4.T}
    for key, u in ya.items():
        v = yb[key]
        assert u.shape == v.shape and u.dtype == v.dtype, key
        if key.startswith(("q4_pack", "q4_unpack", "q8_unpack", "bf16_unpack")):
            assert torch.equal(u, v), key  # layout and conversion: exact
        elif key.startswith("attn1"):  # fp32 inside, one bf16 rounding: at most a last-bit difference, rarely
            assert ((u.float() - v.float()).abs() <= 8e-3 * v.float().abs() + 1e-3).all(), key
            assert (u == v).float().mean() > 0.95, key
        else:
            bound = 2e-6 * size[key.split("_")[0]][: u.shape[0]] + 1e-6
            if u.dtype == torch.bfloat16:  # rounded once from fp32 sums that may differ in the last bits
                bound = bound + u.float().abs() * 2 ** -8
            err = (u.float() - v.float()).abs()
            assert (err <= bound).all(), (key, float((err / bound).max()))
            assert not torch.equal(u, torch.zeros_like(u)), key


@needs_avx2
@pytest.mark.slow
def test_kernel_tests_pass_on_the_avx2_build(tmp_path):
    """tests/test_kernels.py (every kernel: products of 1, 2, 3, odd and many rows in each dtype,
    int4 layouts, decode attention with masks and odd head sizes, packed models) in a child process
    that builds and uses the AVX2 kernels, even on an AVX-512 CPU."""
    root = Path(__file__).resolve().parent.parent
    code = ("import sys, pytest\nfrom blip2.backends.cpu import build\n"
            "rc = pytest.main(['tests/test_kernels.py', '-m', 'kernels and not slow', '-q', '-x', '-p', 'no:cacheprovider'])\n"
            "print('isa:', build.isa(), build.lib().kernels_isa() if build.lib() else None)\nsys.exit(rc)")
    cache = tmp_path / "kernels"  # (the dispatch's measurements go beside it, in tmp_path too)
    env = {**os.environ, "BLIP2_KERNEL_ISA": "avx2", "BLIP2_KERNEL_CACHE": str(cache)}
    env.pop("BLIP2_NO_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert "isa: avx2 256" in r.stdout, tail  # the AVX2 library was built and used
    assert " passed" in r.stdout and "skipped" not in r.stdout, tail  # no test skipped for want of kernels
    built = [p.name for p in cache.glob("kernels-*.so")]
    assert built and all(n.startswith("kernels-avx2-") for n in built), built
