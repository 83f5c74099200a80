"""Weight-only int8 / int4 quantization: layer accuracy, the kernels against the fallback path,
a tiny BLIP-2 quantized through from_pretrained, and save -> reload."""

import json

import hf_tiny
import pytest
import torch
from safetensors import safe_open
import torch.nn.functional as F
from torch import nn

import blip2
import blip2.backends.cpu.loading as backend_loading
import blip2.backends.cpu.quant as Q
from blip2.backends.cpu.layout import from_int4pack, to_int4pack
from blip2.backends.cpu.quant import Int4Linear, Int8Linear, quantize_
from blip2.checkpoint.reader import Reader
from blip2.models.opt import OPTForCausalLM

# LM widths that are multiples of 64 so int4 takes the attention layers; int4 must leave in float
# what its kernel cannot take: project_in / project_out (48 wide), fc1 (160 rows), fc2 at g64.
OPT64 = dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=48)
BLIP_OPT = dict(hidden_size=64, ffn_dim=160, word_embed_proj_dim=64)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_linear(K=256, N=192, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * K**-0.5)
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    return lin.to(dtype).requires_grad_(False)


# int8: per-channel steps of absmax/127 give ~0.7% rms error on Gaussian rows. int4: 16 levels over
# a group's min..max (about 4 sigma for 32 normals) give ~8% for g32 and ~10% for g128; that is the
# rate of 4-bit round-to-nearest, not a defect.
CASES = [("int8", None, 0.01), ("int4", 32, 0.09), ("int4", 128, 0.12)]


def build(lin, mode, g):
    return Int8Linear.from_linear(lin) if mode == "int8" else Int4Linear.from_linear(lin, g)


@pytest.mark.parametrize("mode,g,tol", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(3,), (2, 5)])
def test_linear_close_to_float(mode, g, tol, dtype, lead):
    lin = make_linear(dtype=dtype)
    q = build(lin, mode, g)
    x = torch.randn(*lead, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (*lead, 192)
    assert rel(y, lin(x)) < tol
    # no float `.weight`, not even a data-less stand-in: the layer itself reports its compute dtype
    # and the float shape (the KV cache takes its dtype from the activations)
    assert not hasattr(q, "weight") and q.compute_dtype() == dtype and q.dequantize().shape == lin.weight.shape


@pytest.mark.parametrize("K", [8, 37, 72])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_odd_widths(K, dtype):
    """Widths the bf16 int8 kernel gets wrong (K % 16 != 0) still give the right numbers."""
    lin = make_linear(K=K, N=40, dtype=dtype)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert rel(Int8Linear.from_linear(lin)(x), lin(x)) < 0.02


@pytest.mark.parametrize("mode,g,tol", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantize_fallback(mode, g, tol, dtype, monkeypatch):
    """The native CPU kernels and the dequantize + matmul path (used off-CPU) compute the same map."""
    lin = make_linear(dtype=dtype)
    q = build(lin, mode, g)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    fast = q(x)
    monkeypatch.setattr(Q, "_has_op", lambda name: False)
    slow = q(x)
    assert rel(fast, slow) < (1e-5 if dtype == torch.float32 else 1e-2)
    # and a layer quantized without the packing op stores the same bytes
    q2 = build(lin, mode, g)
    assert torch.equal(q2.qweight, q.qweight)


@pytest.mark.parametrize("rows", [Q.INT8_UPCAST_MIN_ROWS - 1, Q.INT8_UPCAST_MIN_ROWS, 200])
def test_int8_many_rows_fp32_path(rows):
    """bf16 inputs with many rows on a CPU without native bf16 run as an fp32 product of the int8
    values (exact in fp32) scaled in fp32: the dequantized layer's exact output, rounded once."""
    from blip2.backends.cpu import dispatch

    with dispatch.force(**{"bf16.many": 1}):  # fp32 for products of any size
        _int8_many_rows(rows)


def _int8_many_rows(rows):
    lin = make_linear(dtype=torch.bfloat16)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    exact = (F.linear(x.double(), q.qweight.double()) * q.scales.double() + q.bias.double())
    with torch.no_grad():
        y = q(x)
        assert torch.equal(q(x[None])[0], y)  # (B, T, K) inputs: the same rows
    err = (y.double() - exact).abs() / exact.abs().clamp_min(1e-3)
    if rows >= Q.INT8_UPCAST_MIN_ROWS:
        assert (err <= 2**-8).all()  # one rounding to bf16
        assert torch.equal(q(x), y)  # with grad enabled: a fresh fp32 copy, the same numbers
    assert rel(y, lin(x)) < 0.02


def test_int4_pack_layout_matches_torch():
    w = torch.randint(0, 16, (192, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    p = to_int4pack(w)
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        assert torch.equal(p, torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1))
    assert torch.equal(from_int4pack(p).int(), w)


def test_quantize_replaces_linears_but_not_head_or_embedding():
    lm = OPTForCausalLM(blip2.OPTConfig(**{**hf_tiny.OPT, **OPT64}))
    emb = lm.get_input_embeddings().weight
    n_lin = sum(isinstance(m, nn.Linear) for m in lm.modules())
    quantize_(lm, "int8")
    assert isinstance(lm.lm_head, nn.Linear)
    assert lm.lm_head.weight is lm.get_input_embeddings().weight is emb  # the tie survives
    assert sum(isinstance(m, Int8Linear) for m in lm.modules()) == n_lin - 1
    assert lm.config.quantization["mode"] == "int8"
    with pytest.raises(ValueError, match="tied"):
        quantize_(OPTForCausalLM(blip2.OPTConfig(**hf_tiny.OPT)), "int8", include_head=True)
    with pytest.raises(ValueError, match="int3"):
        quantize_(lm, "int3")

    lm4 = quantize_(OPTForCausalLM(blip2.OPTConfig(**{**hf_tiny.OPT, **OPT64})), "int4", group_size=32)
    dec = lm4.model.decoder
    assert isinstance(dec.layers[0].fc1, Int4Linear) and isinstance(dec.layers[0].self_attn.q_proj, Int4Linear)
    assert type(dec.project_in) is not Int4Linear and type(dec.project_out) is not Int4Linear  # 48 columns/rows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("q_tiny")
    hf_tiny.save_hf("Blip2ForConditionalGeneration", hf_tiny.blip2_config("opt", text_config=BLIP_OPT), d)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, 30, 30, generator=g)
    text = torch.randint(3, 110, (2, 7), generator=g)
    ids = torch.cat((torch.full((2, 4), 119), text), 1)  # 4 image placeholders (id vocab-1), then text
    return d, px, ids


def logits(m, px, ids):
    with torch.no_grad():
        return m(pixel_values=px, input_ids=ids).logits.float()


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.15)])
def test_tiny_blip2_quantized_close_and_generates(ckpt, mode, tol):
    d, px, ids = ckpt
    ref = blip2.Blip2ForConditionalGeneration.from_pretrained(d)
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(d, quantize=mode)
    qcls = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(m.language_model.model.decoder.layers[1].self_attn.out_proj, qcls)
    assert isinstance(m.language_model.model.decoder.layers[1].fc1, Int8Linear if mode == "int8" else nn.Linear)
    assert type(m.vision_model.encoder.layers[0].mlp.fc1) is not qcls  # only the language model
    assert rel(logits(m, px, ids), logits(ref, px, ids)) < tol
    # same as loading in float and quantizing by hand: the same stored tensors (state_dict gives
    # them row-major even where from_pretrained block-packed them for the CPU kernels), and the
    # same logits up to the kernels' summation order
    quantize_(ref.language_model, mode)
    sd, sd_ref = m.language_model.state_dict(), ref.language_model.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    torch.testing.assert_close(logits(m, px, ids), logits(ref, px, ids), rtol=1e-5, atol=1e-5)
    # min_new_tokens keeps the tiny model from stopping at EOS, so the decode loop really runs
    out = m.generate(pixel_values=px, max_new_tokens=5, min_new_tokens=5)
    assert out.shape == (2, 4 + 1 + 5) and int(out.max()) < 120


def test_quantized_bf16(ckpt):
    d, px, ids = ckpt
    ref = blip2.Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16)
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16, quantize="int8")
    assert m.language_model.model.decoder.layers[0].fc2.scales.dtype == torch.bfloat16
    with torch.no_grad():
        out = m(pixel_values=px.bfloat16(), input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    assert rel(out, logits(ref, px.bfloat16(), ids)) < 0.03
    assert m.generate(pixel_values=px.bfloat16(), max_new_tokens=3, min_new_tokens=3).shape == (2, 8)


@pytest.mark.parametrize("mode", ["int8", "int4-64"])
def test_save_reload_identical(ckpt, tmp_path, mode):
    d, px, ids = ckpt
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(d, quantize=mode)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    q = cfg["text_config"]["quantization"]
    assert q["mode"] == mode[:4] and q["group_size"] == (64 if mode == "int4-64" else None)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        pre = "language_model.model.decoder.layers.0."
        assert f.get_tensor(pre + "self_attn.v_proj.qweight").dtype == (torch.int8 if mode == "int8" else torch.uint8)
        assert pre + "self_attn.v_proj.weight" not in f.keys()
        # int4 leaves fc1 (160 rows) and fc2 (160 columns, g64) in float; reload must agree
        assert (pre + "fc2.weight" in f.keys()) == (mode != "int8")
    r = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    types = lambda mod: [type(x) for x in mod.language_model.modules()]  # noqa: E731
    assert types(r) == types(m)
    assert torch.equal(logits(r, px, ids), logits(m, px, ids))
    kw = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2)
    assert torch.equal(r.generate(pixel_values=px, **kw), m.generate(pixel_values=px, **kw))
    with pytest.raises(ValueError, match="already quantized"):
        blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path, quantize="int4" if mode == "int8" else "int8")


def test_quantize_needs_a_language_model(ckpt):
    d, _, _ = ckpt
    with pytest.raises(ValueError, match="no language model"):
        blip2.Blip2VisionModel.from_pretrained(d, quantize="int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_blip2_t5_int8(tmp_path, dtype):
    """T5 too (d_ff 37: the fallback path; wo casts its input to its scales' dtype)."""
    hf_tiny.save_hf("Blip2ForConditionalGeneration", hf_tiny.blip2_config("t5"), tmp_path)
    g = torch.Generator().manual_seed(5)
    px = torch.randn(2, 3, 30, 30, generator=g).to(dtype)
    ids = torch.cat((torch.full((2, 4), 119), torch.randint(3, 110, (2, 6), generator=g)), 1)
    dec = torch.randint(3, 110, (2, 3), generator=g)
    ref = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype, quantize="int8")
    assert isinstance(m.language_model.decoder.block[0].layer[-1].DenseReluDense.wo, Int8Linear)
    with torch.no_grad():
        a = m(pixel_values=px, input_ids=ids, decoder_input_ids=dec).logits
        b = ref(pixel_values=px, input_ids=ids, decoder_input_ids=dec).logits
    assert a.dtype == dtype and rel(a, b) < 0.08  # measured 0.04-0.05: int8 error through 4 stacks
    assert m.generate(pixel_values=px, max_new_tokens=4, min_new_tokens=4).shape == (2, 5)


# Streamed quantize-at-load (each float linear read by rows and quantized as it is read) must give
# bitwise what quantize_ gives on the float-loaded model. Widths are multiples of 64 so int4 takes
# the attention and MLP layers; fc1 / wi_* have 192 / 128 rows, i.e. several int4 blocks of 64.
STREAM_TEXT = {
    "opt": dict(hidden_size=64, ffn_dim=192, word_embed_proj_dim=64),
    "t5": dict(d_model=64, d_kv=16, d_ff=128),
}


@pytest.fixture(scope="module")
def stream_ckpts(tmp_path_factory):
    out = {}
    for text, over in STREAM_TEXT.items():
        d = tmp_path_factory.mktemp(f"stream_{text}")
        hf_tiny.save_hf("Blip2ForConditionalGeneration", hf_tiny.blip2_config(text, text_config=over), d)
        out[text] = d
    return out


@pytest.mark.parametrize("text", ["opt", "t5"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streamed_equals_quantize_after_load(stream_ckpts, text, mode, monkeypatch):
    d = stream_ckpts[text]
    monkeypatch.setattr(backend_loading, "STREAM_ELEMS", 64 * 64)  # 64 rows a step at K=64: several steps per layer
    fetched = []
    get = Reader.get
    monkeypatch.setattr(Reader, "get", lambda self, k, out=None: fetched.append(k) or get(self, k, out))
    qcls = Int8Linear if mode == "int8" else Int4Linear
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = blip2.Blip2ForConditionalGeneration.from_pretrained(d, dtype=dtype)
        quantize_(ref.language_model, mode)
        fetched.clear()
        m = blip2.Blip2ForConditionalGeneration.from_pretrained(d, dtype=dtype, quantize=mode)
        qnames = [n for n, x in m.language_model.named_modules() if isinstance(x, qcls)]
        assert len(qnames) >= 8 and [type(x) for x in m.modules()] == [type(x) for x in ref.modules()]
        # the float weights of quantized layers are read by rows from the file, never through the mmap
        assert not [k for k in fetched if k.endswith(".weight") and k[len("language_model."):-7] in qnames]
        a, b = m.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        if text == "t5" and dtype == torch.float16:  # wo stays fp32 in fp16 (keep-in-fp32), so do its scales
            wo = m.language_model.decoder.block[0].layer[-1].DenseReluDense.wo
            assert isinstance(wo, qcls) and (wo.scales if mode == "int8" else wo.scales_and_zeros).dtype == torch.float32
        assert m.language_model.config.quantization["mode"] == mode
