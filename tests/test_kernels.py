"""Block-packed weights and the C kernels (kernels.py / kernels.c).

Products are checked against float64 references; packed layers against the same layers unpacked;
a packed model against itself unpacked (same greedy ids), through save/reload and compile. The
kernels need a C compiler and AVX-512: where they cannot build, the tests that need them skip
(and the fallback tests still run).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hf_tiny import blip2_config, save_hf

import blip2
from blip2 import kernels, ops
from blip2.quantize import quantize_

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler or no AVX-512 here")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_pack_round_trip_and_layout(dtype):
    R, C = kernels.BLOCK[dtype]
    w = torch.arange(2 * R * 3 * C).reshape(2 * R, 3 * C).to(dtype)  # distinct values (mod 256 for int8)
    p = kernels.pack(w, R, C)
    assert p.shape == w.shape and p.dtype == dtype
    # chunk (block 1, column chunk 2) holds rows R..2R-1, columns 2C..3C-1, one row after another
    blk = p.view(-1)[(1 * 3 + 2) * R * C:][: R * C].view(R, C)
    assert torch.equal(blk, w[R:2 * R, 2 * C:3 * C])
    assert torch.equal(kernels.unpack(p, R, C), w)
    assert kernels.fits(w) and not kernels.fits(w[:, :C + 1].contiguous()) and not kernels.fits(w.float())
    one = w[:R, :C].contiguous()  # one chunk: the blocked view is contiguous, yet pack must copy
    assert kernels.pack(one, R, C).data_ptr() != one.data_ptr()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 7, kernels.GEMV_MAX_ROWS - 1, kernels.GEMV_MAX_ROWS, 70])
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_packed_products(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    N, K = 48, 256
    w = (torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8) if dtype == torch.int8
         else torch.randn(N, K, generator=g).to(dtype))
    x = torch.randn(rows, K, generator=g)
    scale = torch.rand(N, generator=g) + 0.5 if dtype == torch.int8 else None
    bias = torch.randn(N, generator=g)
    ref = x.double() @ w.double().T
    if scale is not None:
        ref = ref * scale.double()
    ref = ref + bias.double()
    p = kernels.pack(w, *kernels.BLOCK[dtype])
    y = ops.packed_linear(x, p, scale, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * float(ref.abs().mean()))
    # bf16 activations: the same fp32 sums (of the bf16 x), rounded to bf16 once
    xb = x.bfloat16()
    yb = ops.packed_linear(xb, p, scale, bias)
    want = ops.packed_linear(xb.float(), p, scale, bias).bfloat16()
    assert yb.shape == (rows, N)
    if rows < kernels.GEMV_MAX_ROWS:
        assert yb.dtype == torch.bfloat16 and torch.equal(yb, want)
    else:
        torch.testing.assert_close(yb.float(), want.float(), rtol=1e-2, atol=1e-2)


def _layers(dtype):
    g = torch.Generator().manual_seed(1)
    lin = ops.Linear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=g) / 128 ** 0.5)
        lin.bias.copy_(torch.randn(64, generator=g))
    return lin.to(dtype) if dtype != "int8" else quantize_(torch.nn.Sequential(lin), "int8")[0]


@needs_kernels
@pytest.mark.parametrize("kind", [torch.bfloat16, "int8"])
def test_packed_layer_matches_unpacked_and_saves_row_major(kind):
    ref = _layers(kind)
    lay = _layers(kind)
    assert lay.pack_() and lay.block is not None
    name = lay.packed_name
    assert not torch.equal(getattr(lay, name), getattr(ref, name))  # really rearranged in place
    dt = torch.bfloat16 if kind == torch.bfloat16 else torch.float32
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(2)).to(dt)
    with torch.no_grad():
        for rows in (x[:1, :1], x, torch.randn(1, 60, 128).to(dt)):  # decode step, few rows, many rows
            torch.testing.assert_close(lay(rows), ref(rows), rtol=2e-2 if dt == torch.bfloat16 else 1e-5, atol=1e-2 if dt == torch.bfloat16 else 1e-5)
    # the layout stays inside: state_dict is row-major; load_state_dict takes row-major
    sd = lay.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    assert lay.block is not None
    if kind == "int8":
        assert torch.equal(lay.dequantize(), ref.dequantize())
    other = _layers(kind)
    other.pack_()
    other.load_state_dict(sd)
    assert other.block is None and torch.equal(getattr(other, name), getattr(ref, name))


@needs_kernels
def test_moved_cast_or_trained_layer_unpacks():
    ref, lay = _layers(torch.bfloat16), _layers(torch.bfloat16)
    lay.pack_()
    x = torch.randn(1, 128)
    lay.float()  # cast: the block layout belongs to bf16
    with torch.no_grad():
        torch.testing.assert_close(lay(x), ref.float()(x))
    assert lay.block is None
    lay = _layers(torch.bfloat16)
    lay.pack_()
    xb = x.bfloat16().requires_grad_()
    y = lay(xb)  # grad flows to x: the kernels have no backward, so the layer unpacks for good
    assert lay.block is None
    y.float().sum().backward()
    assert xb.grad is not None and xb.grad.abs().sum() > 0


TEXT = dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_attention_heads=4, eos_token_id=50)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    save_hf("Blip2ForConditionalGeneration", blip2_config("opt", text_config=TEXT), d, seed=5)
    return d


def _shrink_embeddings(m):
    with torch.no_grad():  # O(1) tied embeddings make greedy repeat the current token: shrink them
        m.language_model.get_input_embeddings().weight.mul_(0.1)
    return m


@needs_kernels
@pytest.mark.parametrize("dtype,quantize", [(torch.bfloat16, None), (torch.float32, "int8")])
def test_from_pretrained_packs_the_language_model(ckpt, tmp_path, dtype, quantize):
    m = _shrink_embeddings(blip2.Blip2ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, quantize=quantize))
    lm = m.language_model
    packed = [n for n, x in lm.named_modules() if getattr(x, "block", None)]
    # every decoder linear; not the head, which is tied to the embedding table
    assert len(packed) == 6 * len(lm.model.decoder.layers) and not lm.lm_head.block
    assert not any(getattr(x, "block", None) for x in m.vision_model.modules())
    px = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    kw = dict(pixel_values=px, max_new_tokens=8, min_new_tokens=8)
    got = m.generate(**kw)
    # saved from the packed model: the files are row-major, and reload (packed again) decodes the same
    m.save_pretrained(tmp_path)
    again = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    assert torch.equal(again.generate(**kw), got)
    kernels.unpack_all_(m)
    assert not any(getattr(x, "block", None) for x in m.modules())
    assert torch.equal(m.generate(**kw), got)  # torch's kernels, same greedy ids


@needs_kernels
def test_compiled_decoding_with_packed_weights(ckpt):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = _shrink_embeddings(blip2.Blip2ForConditionalGeneration.from_pretrained(ckpt, quantize="int8"))
        assert m.language_model.model.decoder.layers[0].fc1.block is not None
        px = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(1))
        kw = dict(pixel_values=px, max_new_tokens=6, min_new_tokens=6)
        assert torch.equal(m.generate(**kw, compile=True), m.generate(**kw))
    finally:
        torch.set_num_threads(n)


def _fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_fallback_without_kernels(tmp_path):
    # asked not to: nothing packs, no warning
    code = ("import warnings, torch; warnings.simplefilter('error'); from blip2 import kernels, ops\n"
            "lin = ops.Linear(64, 8).bfloat16(); print(kernels.lib(), kernels.pack_(lin), lin.block)")
    r = _fresh_python(code, BLIP2_NO_KERNELS="1")
    assert r.returncode == 0 and r.stdout.split() == ["None", "0", "None"], r.stderr
    # no working compiler: a warning that says what to do, then torch's kernels
    if kernels.available():
        r = _fresh_python("from blip2 import kernels; print(kernels.lib())", CC="false", BLIP2_KERNEL_CACHE=str(tmp_path))
        assert r.returncode == 0 and r.stdout.strip() == "None"
        assert "CPU decode kernels unavailable" in r.stderr and "C compiler" in r.stderr
