"""Blip2VisionModel and Blip2QFormerModel against transformers 5.8.0: every output field, position
interpolation, masks, dtypes, and loading a part out of a composite checkpoint."""

import pytest
import torch
import transformers

import hf_tiny
from blip2.models.config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from blip2.models.qformer import Blip2QFormerModel
from blip2.models.vision import Blip2VisionModel

Q = 4  # query tokens in the tiny configs


def compare(ours, theirs, rtol=2e-5, what="out"):
    """Same fields in the same order, every tensor close (tuples element by element)."""
    if isinstance(theirs, torch.Tensor):
        hf_tiny.assert_close(ours, theirs, rtol=rtol, what=what)
        return
    if hasattr(theirs, "keys"):
        assert list(ours.keys()) == list(theirs.keys()), f"{what}: {list(ours.keys())} != {list(theirs.keys())}"
        for k in theirs.keys():
            compare(ours[k], theirs[k], rtol, f"{what}.{k}")
        return
    assert isinstance(ours, tuple) and isinstance(theirs, tuple), what
    assert len(ours) == len(theirs), f"{what}: {len(ours)} entries != {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        compare(a, b, rtol, f"{what}[{i}]")


def _cfg(**qformer):
    return hf_tiny.blip2_config(text=None, qformer=dict(use_qformer_text_input=True, **qformer))


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision")
    hf = hf_tiny.save_hf("Blip2VisionModel", _cfg().vision_config, d)
    # transformers' default SDPA path returns no attention weights; its eager path does.
    hf_eager = transformers.Blip2VisionModel.from_pretrained(d, attn_implementation="eager").eval()
    return hf, hf_eager, Blip2VisionModel.from_pretrained(d), d


@pytest.fixture(scope="module")
def qformer(tmp_path_factory):
    d = tmp_path_factory.mktemp("qformer")
    hf = hf_tiny.save_hf("Blip2QFormerModel", _cfg().qformer_config, d)
    return hf, Blip2QFormerModel.from_pretrained(d), d


def _pixels(B=2, H=30, W=30, seed=0):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


# --- vision -----------------------------------------------------------------------------------


@torch.no_grad()
def test_vision_all_fields(vision):
    _, hf_eager, ours, _ = vision
    x = _pixels()
    kw = dict(output_attentions=True, output_hidden_states=True)
    a, b = ours(x, **kw), hf_eager(x, **kw)
    assert len(a.hidden_states) == len(a.attentions) + 1 == ours.config.num_hidden_layers + 1
    compare(a, b)
    compare(ours(x, return_dict=False, **kw), hf_eager(x, return_dict=False, **kw))


@torch.no_grad()
def test_vision_default_outputs_and_pooler_quirk(vision):
    hf, _, ours, _ = vision
    x = _pixels(seed=1)
    a = ours(x)
    compare(a, hf(x))
    assert list(a.keys()) == ["last_hidden_state", "pooler_output"]
    # pooler_output is the already-normed CLS normed again (LAVIS' ln_vision applied twice)
    torch.testing.assert_close(a.pooler_output, ours.post_layernorm(a.last_hidden_state[:, 0]))
    assert not torch.allclose(a.pooler_output, a.last_hidden_state[:, 0], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("hw", [(30, 30), (42, 42), (36, 48), (44, 31), (23, 40), (18, 18)])
def test_vision_interpolate_pos_encoding(vision, hw):
    hf, _, ours, _ = vision
    x = _pixels(2, *hw, seed=2)
    a = ours(x, interpolate_pos_encoding=True, output_hidden_states=True)
    compare(a, hf(x, interpolate_pos_encoding=True, output_hidden_states=True))
    assert a.last_hidden_state.shape[1] == 1 + (hw[0] // 6) * (hw[1] // 6)


@torch.no_grad()
def test_vision_smaller_image_without_interpolation_takes_first_positions(vision):
    hf, _, ours, _ = vision
    x = _pixels(1, 18, 18, seed=3)
    compare(ours(x), hf(x))


@torch.no_grad()
def test_vision_bf16(vision):
    hf, _, _, d = vision
    ours = Blip2VisionModel.from_pretrained(d, dtype=torch.bfloat16)
    theirs = transformers.Blip2VisionModel.from_pretrained(d, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    x = _pixels(seed=4)  # fp32 pixels are cast to the weights' dtype
    a, b = ours(x, interpolate_pos_encoding=True), theirs(x, interpolate_pos_encoding=True)
    assert a.last_hidden_state.dtype == torch.bfloat16
    compare(a, b, rtol=3e-2)
    compare(a, hf(x), rtol=1e-1)  # and still near the fp32 model


# --- Q-Former ---------------------------------------------------------------------------------


def _qformer_inputs(B=2, L=5, S=26, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, Q + L, 32, generator=g)
    mask = torch.ones(B, Q + L, dtype=torch.long)
    mask[1, -2:] = 0  # padded text in the batch
    enc = torch.randn(B, S, 32, generator=g)
    enc_mask = torch.ones(B, S, dtype=torch.long)
    enc_mask[0, -7:] = 0
    return emb, mask, enc, enc_mask


@torch.no_grad()
def test_qformer_queries_and_padded_text(qformer):
    hf, ours, _ = qformer
    emb, mask, enc, enc_mask = _qformer_inputs()
    kw = dict(query_length=Q, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
              output_attentions=True, output_hidden_states=True)
    a = ours(emb, **kw)
    # attentions interleave each layer's self- and cross-attention weights, as transformers 5.8 returns them
    n = ours.config.num_hidden_layers
    assert len(a.hidden_states) == n + 1 and len(a.cross_attentions) == 2 and len(a.attentions) == n + 2
    compare(a, hf(emb, **kw))
    compare(ours(emb, return_dict=False, **kw), hf(emb, return_dict=False, **kw))


@torch.no_grad()
def test_qformer_masks_matter(qformer):
    _, ours, _ = qformer
    emb, mask, enc, enc_mask = _qformer_inputs(seed=1)
    full = ours(emb, query_length=Q, encoder_hidden_states=enc).last_hidden_state
    padded = ours(emb, query_length=Q, attention_mask=mask, encoder_hidden_states=enc,
                  encoder_attention_mask=enc_mask).last_hidden_state
    # row 1 has padded text, row 0 a padded image: both rows change; nothing else does
    assert (full - padded)[0].abs().max() > 1e-3 and (full - padded)[1].abs().max() > 1e-3


@torch.no_grad()
def test_qformer_query_only_text_only_and_3d_mask(qformer):
    hf, ours, _ = qformer
    emb, mask, enc, enc_mask = _qformer_inputs(seed=2)
    q = emb[:, :Q]
    compare(ours(q, encoder_hidden_states=enc), hf(q, encoder_hidden_states=enc))
    t = emb[:, Q:]
    kw = dict(query_length=0, attention_mask=mask[:, Q:], output_attentions=True, output_hidden_states=True)
    compare(ours(t, **kw), hf(t, **kw))
    m3 = torch.tril(torch.ones(2, Q + 5, Q + 5))  # a per-position mask (B, T, S)
    kw = dict(query_length=Q, attention_mask=m3, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    compare(ours(emb, **kw), hf(emb, **kw))


@torch.no_grad()
def test_qformer_head_mask(qformer):
    _, ours, _ = qformer
    emb, mask, enc, _ = _qformer_inputs(seed=3)
    kw = dict(query_length=Q, attention_mask=mask, encoder_hidden_states=enc)
    base = ours(emb, **kw).last_hidden_state
    n, h = ours.config.num_hidden_layers, ours.config.num_attention_heads
    hf_tiny.assert_close(ours(emb, head_mask=torch.ones(n, h), **kw).last_hidden_state, base, what="ones")
    hm = torch.ones(h)
    hm[1] = 0
    assert (ours(emb, head_mask=hm, **kw).last_hidden_state - base).abs().max() > 1e-3


@torch.no_grad()
def test_qformer_without_text_ffn(tmp_path):
    cfg = hf_tiny.blip2_config(text=None).qformer_config  # use_qformer_text_input=False: queries only
    hf = hf_tiny.save_hf("Blip2QFormerModel", cfg, tmp_path)
    ours = Blip2QFormerModel.from_pretrained(tmp_path)
    assert not hasattr(ours.encoder.layer[0], "intermediate")
    emb, _, enc, enc_mask = _qformer_inputs(seed=4)
    q = emb[:, :Q]
    compare(ours(q, encoder_hidden_states=enc, encoder_attention_mask=enc_mask),
            hf(q, encoder_hidden_states=enc, encoder_attention_mask=enc_mask))
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        ours(emb, query_length=Q, encoder_hidden_states=enc)


@torch.no_grad()
def test_qformer_bf16(qformer):
    hf, _, d = qformer
    ours = Blip2QFormerModel.from_pretrained(d, dtype="bfloat16")
    theirs = transformers.Blip2QFormerModel.from_pretrained(d, dtype=torch.bfloat16).eval()
    emb, mask, enc, enc_mask = _qformer_inputs(seed=5)
    kw = dict(query_length=Q, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    a = ours(emb, **kw)  # fp32 inputs are cast to the Q-Former's dtype
    assert a.last_hidden_state.dtype == torch.bfloat16
    compare(a, theirs(emb, **kw), rtol=3e-2)


# --- parts out of a composite checkpoint; models built from a config ----------------------------


@torch.no_grad()
def test_parts_load_from_composite_checkpoint(tmp_path):
    # transformers 5.8's Blip2VisionModel/Blip2QFormerModel.from_pretrained on such a checkpoint
    # reads the right sub-config but leaves every weight random (all keys "unexpected"); ours
    # takes the vision_model. / qformer. tensors.
    hf = hf_tiny.save_hf("Blip2ForConditionalGeneration", hf_tiny.blip2_config("opt"), tmp_path)
    vis = Blip2VisionModel.from_pretrained(tmp_path)
    qf = Blip2QFormerModel.from_pretrained(tmp_path)
    assert isinstance(vis.config, Blip2VisionConfig) and isinstance(qf.config, Blip2QFormerConfig)
    x = _pixels(seed=6)
    v = vis(x, output_hidden_states=True)
    compare(v, hf.vision_model(x, output_hidden_states=True))
    q = hf.query_tokens.expand(2, -1, -1)
    compare(qf(q, encoder_hidden_states=v.last_hidden_state),
            hf.qformer(q, encoder_hidden_states=v.last_hidden_state))


@torch.no_grad()
def test_built_from_config_saves_what_transformers_loads(tmp_path):
    hf_cfg = _cfg()
    cfg = Blip2Config(**hf_cfg.to_dict())
    vis = Blip2VisionModel(cfg.vision_config).eval()
    qf = Blip2QFormerModel(cfg.qformer_config).eval()
    assert not any(p.is_meta for p in vis.parameters())
    hf_tiny.fan_in_init_(vis, seed=7)  # the reference's init scale (1e-10) gives a near-constant ViT
    x = _pixels(seed=7)
    v = vis(x)
    assert torch.isfinite(v.last_hidden_state).all()
    vis.save_pretrained(tmp_path / "v")
    qf.save_pretrained(tmp_path / "q")
    compare(v, transformers.Blip2VisionModel.from_pretrained(tmp_path / "v").eval()(x))
    q = torch.randn(2, Q, 32)
    hf_qf = transformers.Blip2QFormerModel.from_pretrained(tmp_path / "q").eval()
    compare(qf(q, encoder_hidden_states=v.last_hidden_state), hf_qf(q, encoder_hidden_states=v.last_hidden_state))
