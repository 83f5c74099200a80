"""Blocked weights and the C kernels (backends/cpu: layout.py, kernels.py, kernels.c).

Products are checked against float64 references; blocked layers against the same layers row-major;
a blocked model against itself row-major (same greedy ids), through save/reload and compile. The
kernels need a C compiler and AVX-512 or AVX2 + FMA: where they cannot build, the tests that need them skip
(and the fallback tests still run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import blip2_config, save_hf

import blip2
from blip2.backends.cpu import attention, build, dispatch, kernels, layout, linear
from blip2.backends.cpu.convert import convert
from blip2.backends.cpu.quant import quantize_

needs_kernels = pytest.mark.skipif(not build.available(), reason="no C compiler, or neither AVX-512 nor AVX2 here")
KERNEL_ROWS = 48  # products with fewer rows take the kernels in these tests (dispatch measures it otherwise)


@pytest.fixture(autouse=True)
def fixed_crossover():
    with dispatch.force(**{"bf16.kernel_rows": KERNEL_ROWS - 1, "int8.kernel_rows": KERNEL_ROWS - 1, "bf16.one": "kernel",
                           "int8.one": "kernel", "int4.one": "kernel", "bf16.dot": "fma"}):
        yield


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_pack_round_trip_and_layout(dtype):
    R, C = layout.BLOCK[dtype]
    w = torch.arange(2 * R * 3 * C).reshape(2 * R, 3 * C).to(dtype)  # distinct values (mod 256 for int8)
    p = kernels.blocked_copy(w, (R, C))
    assert p.shape == w.shape and p.dtype == dtype
    # chunk (block 1, column chunk 2) holds rows R..2R-1, columns 2C..3C-1, one row after another
    blk = p.view(-1)[(1 * 3 + 2) * R * C:][: R * C].view(R, C)
    assert torch.equal(blk, w[R:2 * R, 2 * C:3 * C])
    assert torch.equal(kernels.row_major_copy(p, (R, C)), w)
    assert layout.fits(w) and not layout.fits(w[:, :C + 1].contiguous()) and not layout.fits(w.float())
    one = w[:R, :C].contiguous()  # one chunk: the blocked view is contiguous, yet blocked_copy must copy
    assert kernels.blocked_copy(one, (R, C)).data_ptr() != one.data_ptr()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 7, KERNEL_ROWS - 1, KERNEL_ROWS, 70])
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
    p = kernels.blocked_copy(w, layout.BLOCK[dtype])
    y = linear.blocked_linear(x, p, scale, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * float(ref.abs().mean()))
    # bf16 activations: the same fp32 sums (of the bf16 x), rounded to bf16 once (on the FMA kernel;
    # test_bf16_products checks VDPBF16PS's)
    xb = x.bfloat16()
    yb = linear.blocked_linear(xb, p, scale, bias)
    want = linear.blocked_linear(xb.float(), p, scale, bias).bfloat16()
    assert yb.shape == (rows, N)
    if rows < KERNEL_ROWS:
        assert yb.dtype == torch.bfloat16 and torch.equal(yb, want)
    else:
        torch.testing.assert_close(yb.float(), want.float(), rtol=1e-2, atol=1e-2)


def _bf16_bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """How far a correct kernel's (M, N) result may be from the float64 one: fp32 sums of exact
    products (a few units of fp32 rounding of the sum of |terms|, far under what one wrong term
    costs), then for a bf16 result one rounding to nearest (at most 2^-8 of the value)."""
    size = x.double().abs() @ w.double().abs().T
    return 1e-6 * size + (2.0 ** -8 * ref.abs() if out == torch.bfloat16 else 0)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 33, 64])
def test_bf16_products(rows):
    """bf16 weights against fp32 x and bf16 x (FMA on converted weights: tiles of 4 x rows on
    AVX-512, 2 on AVX2, and their remainders) and bf16 x by VDPBF16PS (where built: tiles of 4 and
    their remainders, whatever the row count), against float64. N = 13 blocks (an odd share per
    thread), K = 9 chunks; normal values (VDPBF16PS flushes denormals)."""
    g = torch.Generator().manual_seed(100 + rows)
    N, K = 52, 288
    w = torch.randn(N, K, generator=g).bfloat16()
    bias = torch.randn(N, generator=g)
    p = kernels.blocked_copy(w, layout.BLOCK[torch.bfloat16])
    x = torch.randn(rows, K, generator=g)
    xb = x.bfloat16()
    paths = [("fp32 x", x, lambda: kernels.blocked_mm(x, p, None, bias)),
             ("bf16 x", xb, lambda: kernels.blocked_mm(xb, p, None, bias))]
    if kernels.dot_built():
        paths.append(("dot", xb, lambda: kernels.bf16_dot(xb, p, bias)))
        with dispatch.force(**{"bf16.dot": "dot"}):  # as blocked_mm takes it where it measured faster
            paths.append(("dot chosen", xb, lambda y=kernels.blocked_mm(xb, p, None, bias): y))
    for name, xi, f in paths:
        y = f()
        ref = xi.double() @ w.double().T + bias.double()
        assert y.shape == (rows, N) and y.dtype == xi.dtype, name
        err, bound = (y.double() - ref).abs(), _bf16_bound(xi, w, ref, y.dtype)
        assert (err <= bound).all(), (name, float((err / bound).max()))
        if y.dtype == torch.bfloat16:
            assert (y == ref.bfloat16()).double().mean() > 0.95, name  # mostly the correctly rounded value
    # the bounds catch a wrong kernel: one that drops the last chunk, or rounds fp32 x to bf16
    ref = x.double() @ w.double().T
    drop = x[:, :-32].double() @ w[:, :-32].double().T
    assert ((drop - ref).abs() > _bf16_bound(xb, w, ref, torch.bfloat16)).any()
    assert ((xb.double() @ w.double().T - ref).abs() > _bf16_bound(x, w, ref, torch.float32)).any()


@needs_kernels
def test_int4_layout_round_trips_and_state_dict_is_torch_layout():
    from blip2.backends.cpu.quant import Int4Linear

    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (128, 96), generator=g, dtype=torch.uint8)
    tl = layout.to_int4pack(q)  # torch's int4pack layout, Int4Linear's state_dict format
    p = kernels.blocked_copy(tl, layout.BLOCK[torch.uint8])
    # ours: per block of 64 rows and chunk of 8 columns, one dword per row, column t in bits 4t..4t+3
    d = p.view(torch.int32).view(-1)[(1 * 12 + 5) * 64 + 7].item() & 0xFFFFFFFF  # block 1, chunk 5, row 7
    assert [(d >> (4 * t)) & 15 for t in range(8)] == q[64 + 7, 40:48].tolist()
    assert torch.equal(kernels.row_major_copy(p, layout.BLOCK[torch.uint8]), tl)
    lin = torch.nn.Linear(96, 128)
    ref, lay = Int4Linear.from_linear(lin, 32), Int4Linear.from_linear(lin, 32)
    assert lay.to_blocks_() and lay.block == layout.BLOCK[torch.uint8]
    for k in ("qweight", "scales_and_zeros"):  # both re-laid in place, both row-major in state_dict
        assert not torch.equal(getattr(lay, k), getattr(ref, k))
        assert torch.equal(lay.state_dict()[k], getattr(ref, k))
    assert torch.equal(lay.dequantize(), ref.dequantize())
    lay.to_rows_()
    assert torch.equal(lay.qweight, ref.qweight) and torch.equal(lay.scales_and_zeros, ref.scales_and_zeros)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, KERNEL_ROWS - 1, 70])
@pytest.mark.parametrize("dtype,group", [(torch.bfloat16, 32), (torch.float32, 128), (torch.float16, 64)])
def test_int4_packed_products(rows, dtype, group):
    from blip2.backends.cpu.quant import Int4Linear

    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(256, 192)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(192, 256, generator=g) / 16)
    lay = Int4Linear.from_linear(lin.to(dtype), group)
    # the exact product of x with the dequantized weight ((q - 8) s + z, in float64)
    q = layout.from_int4pack(lay.qweight).double()
    sz = lay.scales_and_zeros.double().repeat_interleave(group, 0)  # (K, N, 2)
    w = (q - 8) * sz[..., 0].T + sz[..., 1].T
    x = torch.randn(rows, 256, generator=g).to(dtype)
    ref = x.double() @ w.T + lay.bias.double()
    assert lay.to_blocks_()
    with torch.no_grad():
        y = lay(x)
    assert y.dtype == dtype and y.shape == (rows, 192)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]  # fp32 sums, one rounding to dtype
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().mean()))


@needs_kernels
@pytest.mark.parametrize("S,D", [(53, 80), (17, 20)])
def test_decode_attention_kernel_matches_sdpa(S, D):
    g = torch.Generator().manual_seed(S)
    B, H = 3, 4
    q, k, v = (torch.randn(B, H, n, D, generator=g).bfloat16() for n in (1, S, S))
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[1] = False  # a row with nothing to attend: zeros, as SDPA gives
    y = kernels.attend_one(q, k, v, mask, D ** -0.5)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=D ** -0.5)
    assert y.shape == (B, H, 1, D) and y.dtype == torch.bfloat16
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(ref[1], torch.zeros_like(ref[1]))
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)  # the same fp32 math, one bf16 rounding
    assert (y == ref.bfloat16()).float().mean() > 0.98
    # the live front of a larger cache (a decode step's view): the same answer, garbage past it unread
    big_k, big_v = (torch.full((B, H, S + 9, D), float("nan")).bfloat16() for _ in range(2))
    big_k[:, :, :S], big_v[:, :, :S] = k, v
    assert torch.equal(kernels.attend_one(q, big_k[:, :, :S], big_v[:, :, :S], mask, D ** -0.5), y)
    # what it does not take goes back to SDPA
    assert kernels.attend_one(q.float(), k.float(), v.float(), mask, 1.0) is None
    assert kernels.attend_one(torch.cat([q, q], 2), k, v, None, 1.0) is None  # two queries per row
    assert kernels.attend_one(q, k, v, mask.float(), 1.0) is None  # additive masks


def _layers(dtype):
    g = torch.Generator().manual_seed(1)
    lin = linear.Linear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=g) / 128 ** 0.5)
        lin.bias.copy_(torch.randn(64, generator=g))
    return lin.to(dtype) if dtype != "int8" else quantize_(torch.nn.Sequential(lin), "int8")[0]


@needs_kernels
@pytest.mark.parametrize("kind", [torch.bfloat16, "int8"])
def test_packed_layer_matches_unpacked_and_saves_row_major(kind):
    ref = _layers(kind)
    lay = _layers(kind)
    assert lay.to_blocks_() and lay.block is not None
    name = lay.weight_name
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
    other.to_blocks_()
    other.load_state_dict(sd)
    assert other.block is None and torch.equal(getattr(other, name), getattr(ref, name))


@needs_kernels
def test_moved_cast_or_trained_layer_unpacks():
    ref, lay = _layers(torch.bfloat16), _layers(torch.bfloat16)
    lay.to_blocks_()
    x = torch.randn(1, 128)
    lay.float()  # cast: the block layout belongs to bf16
    with torch.no_grad():
        torch.testing.assert_close(lay(x), ref.float()(x))
    assert lay.block is None
    lay = _layers(torch.bfloat16)
    lay.to_blocks_()
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
@pytest.mark.parametrize("dtype,quantize", [(torch.bfloat16, None), (torch.float32, "int8"), (torch.bfloat16, "int4")])
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
    linear.unblock_layers_(m)
    assert not any(getattr(x, "block", None) for x in m.modules())
    if quantize != "int4":  # (torch's int4 kernel rounds its own way)
        assert torch.equal(m.generate(**kw), got)  # torch's kernels, same greedy ids


@needs_kernels
@pytest.mark.parametrize("dtype,quantize", [(torch.bfloat16, None), (torch.float32, "int8")])
def test_qkv_weights_load_back_to_back_and_share_one_call(ckpt, dtype, quantize):
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, quantize=quantize)
    for layer in m.language_model.model.decoder.layers:
        a = layer.self_attn
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        w = [getattr(x, x.weight_name) for x in qkv]
        assert all(x.block for x in qkv)
        assert [t.data_ptr() for t in w[1:]] == [t.data_ptr() + t.numel() * t.element_size() for t in w[:2]]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        y = attention.fused_linear(x, qkv)
        assert y is not None and torch.equal(y, torch.cat([lay(x) for lay in qkv], -1))  # bitwise the layers'
        assert attention.fused_linear(torch.randn(1, KERNEL_ROWS, 64).to(dtype), qkv) is None  # many rows
        assert attention.fused_linear(x.double(), qkv) is None  # not the layers' dtype
        a.k_proj.to_rows_()
        assert attention.fused_linear(x, qkv) is None  # one row-major: each layer on its own again
        y2 = torch.cat([lay(x) for lay in qkv], -1)
    torch.testing.assert_close(y2, y, rtol=1e-2, atol=1e-2)  # k by torch's kernel now


@needs_kernels
def test_tied_head_keeps_a_packed_copy_that_follows_the_weight(ckpt):
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16)
    lm = m.language_model
    head, emb = lm.lm_head, lm.get_input_embeddings()
    assert head.weight is emb.weight and head.keeps_blocked_copy and head.block is None
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    want = lambda: (x.double() @ emb.weight.double().T)  # noqa: E731
    with torch.no_grad():
        y = head(x)
        copy = head.__dict__["_copy"][1]
        torch.testing.assert_close(y.double(), want(), rtol=1e-2, atol=1e-2)
        assert torch.equal(y, kernels.blocked_mm(x, copy).bfloat16())
        emb.weight.mul_(-2)  # changed in place (as an optimizer step would): the copy follows
        torch.testing.assert_close(head(x).double(), want(), rtol=1e-2, atol=1e-2)
        assert head.__dict__["_copy"][1] is not copy
        # more rows than the kernels take: the row-major weight, no copy needed
        torch.testing.assert_close(head(x.expand(60, 64)).double(), want().expand(60, -1), rtol=1e-2, atol=1e-2)
    assert "_copy" not in m.state_dict() and not any("_copy" in k for k in m.state_dict())
    head.float()  # cast: the copy is dropped at the next call
    with torch.no_grad():
        head(x.float())
    assert "_copy" not in head.__dict__


@needs_kernels
def test_convert_gives_a_built_model_what_from_pretrained_gives(ckpt):
    loaded = _shrink_embeddings(blip2.Blip2ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16))
    built = blip2.Blip2ForConditionalGeneration(loaded.config).to(torch.bfloat16).eval()
    built.load_state_dict(loaded.state_dict())
    assert not any(isinstance(x, linear.Linear) for x in built.modules())  # plain torch until converted
    keys = built.state_dict().keys()
    assert convert(built) is built and built.state_dict().keys() == keys
    assert [type(x) for x in built.modules()] == [type(x) for x in loaded.modules()]
    blocked = lambda m: [n for n, x in m.named_modules() if getattr(x, "block", None)]  # noqa: E731
    assert blocked(built) == blocked(loaded) and len(blocked(built)) == 6 * len(loaded.language_model.model.decoder.layers)
    lm = built.language_model
    assert lm.lm_head.keeps_blocked_copy and lm.lm_head.weight is lm.get_input_embeddings().weight
    a = lm.model.decoder.layers[0].self_attn
    w = [x.weight for x in (a.q_proj, a.k_proj, a.v_proj)]
    assert [t.data_ptr() for t in w[1:]] == [t.data_ptr() + t.numel() * t.element_size() for t in w[:2]]
    px = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    kw = dict(pixel_values=px, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(built.generate(**kw), loaded.generate(**kw))
    sd, ref = built.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)  # row-major as ever


@needs_kernels
@pytest.mark.slow
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


@pytest.mark.slow
def test_fallback_without_kernels(tmp_path):
    # asked not to: nothing is blocked, no warning
    code = ("import warnings, torch; warnings.simplefilter('error'); from blip2.backends.cpu import build, linear\n"
            "lin = linear.Linear(64, 8).bfloat16(); print(build.lib(), linear.block_layers_(lin), lin.block)")
    r = _fresh_python(code, BLIP2_NO_KERNELS="1")
    assert r.returncode == 0 and r.stdout.split() == ["None", "0", "None"], r.stderr
    # no working compiler: a warning that says what to do, then torch's kernels
    if build.available():
        r = _fresh_python("from blip2.backends.cpu import build; print(build.lib())", CC="false", BLIP2_KERNEL_CACHE=str(tmp_path))
        assert r.returncode == 0 and r.stdout.strip() == "None"
        assert "CPU decode kernels unavailable" in r.stderr and "C compiler" in r.stderr


def test_models_know_nothing_of_the_backend():
    """The backend applies itself by swapping modules: no model file names it or what it does."""
    for f in sorted((Path(blip2.__file__).parent / "models").glob("*.py")):
        hits = [line for line in f.read_text().splitlines() if re.search(r"pack|kernel|quantiz|backends", line)]
        assert not hits, (f.name, hits)
