"""Blip2ForImageTextRetrieval, Blip2TextModelWithProjection and Blip2VisionModelWithProjection
against transformers 5.8.0: ITM and ITC scores, image-token stripping, padded text, dtypes, and
the projection models reading a retrieval checkpoint."""

import pytest
import torch
import transformers

import hf_tiny
from blip2.models.config import Blip2Config
from blip2.models.retrieval import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from test_vision_qformer import compare

Q = 4
IMG = 98  # image token id (vocab 99) for the configs that have one


def _cfg(image_token_index=None):
    # the retrieval checkpoints (blip2-itm-vit-g) have a Q-Former text FFN
    return hf_tiny.blip2_config(text=None, qformer=dict(use_qformer_text_input=True),
                                image_token_index=image_token_index)


@pytest.fixture(scope="module", params=[None, IMG], ids=["plain", "image-tokens"])
def ret(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("retrieval")
    hf = hf_tiny.save_hf("Blip2ForImageTextRetrieval", _cfg(request.param), d)
    return hf, Blip2ForImageTextRetrieval.from_pretrained(d), d


def _pixels(B=2, seed=0):
    return torch.randn(B, 3, 30, 30, generator=torch.Generator().manual_seed(seed))


def _text(B=2, L=6, pad=(0, 2), image_tokens=False, seed=0):
    """Text ids with right padding; with image_tokens, Q image tokens first (Blip2Processor's layout)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMG, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, n in enumerate(pad[:B]):
        if n:
            ids[b, -n:] = 0
            mask[b, -n:] = 0
    if image_tokens:
        ids = torch.cat([torch.full((B, Q), IMG), ids], 1)
        mask = torch.cat([torch.ones(B, Q, dtype=torch.long), mask], 1)
    return ids, mask


def _has_img(model):
    return model.config.image_token_index is not None


@torch.no_grad()
def test_itm(ret):
    hf, ours, _ = ret
    ids, mask = _text(image_tokens=_has_img(ours))
    x = _pixels()
    a = ours(x, ids, mask, use_image_text_matching_head=True)
    b = hf(x, ids, mask, use_image_text_matching_head=True)
    compare(a, b)
    assert a.logits_per_image.shape == (2, 2) and torch.equal(a.logits_per_text, a.logits_per_image.t())
    assert a.text_embeds.shape == (2, Q + 6, 32)  # Q-Former output over queries + text


@torch.no_grad()
def test_itc(ret):
    hf, ours, _ = ret
    ids, mask = _text(B=3, pad=(0, 2, 3), image_tokens=_has_img(ours), seed=1)
    x = _pixels(2, seed=1)
    a = ours(x, ids, mask)
    compare(a, hf(x, ids, mask))
    assert a.logits_per_image.shape == (2, 3) and a.logits_per_text.shape == (3, 2)
    assert a.image_embeds.shape == (2, Q, 16)
    torch.testing.assert_close(a.image_embeds.norm(dim=-1), torch.ones(2, Q))
    torch.testing.assert_close(a.text_embeds.norm(dim=-1), torch.ones(3))


@torch.no_grad()
@pytest.mark.parametrize("itm", [True, False])
def test_vision_outputs_and_tuples(ret, itm):
    _, ours, d = ret
    eager = transformers.Blip2ForImageTextRetrieval.from_pretrained(d, attn_implementation="eager").eval()
    ids, mask = _text(image_tokens=_has_img(ours), seed=2)
    x = _pixels(seed=2)
    kw = dict(use_image_text_matching_head=itm, output_attentions=True, output_hidden_states=True)
    a = ours(x, ids, mask, **kw)
    assert len(a.vision_model_output.attentions) == ours.config.vision_config.num_hidden_layers
    compare(a, eager(x, ids, mask, **kw))
    compare(ours(x, ids, mask, return_dict=False, **kw), eager(x, ids, mask, return_dict=False, **kw))


@torch.no_grad()
@pytest.mark.parametrize("itm", [True, False])
def test_text_without_image_tokens_on_image_token_config(tmp_path, itm):
    # The reference strips the first num_query_tokens ids whenever image_token_index is set;
    # ours only when they are image tokens, so ids tokenised without the processor score the same.
    d = tmp_path
    hf_tiny.save_hf("Blip2ForImageTextRetrieval", _cfg(IMG), d)
    ours = Blip2ForImageTextRetrieval.from_pretrained(d)
    x = _pixels(seed=3)
    ids, mask = _text(seed=3)
    ids_img, mask_img = _text(seed=3, image_tokens=True)
    a = ours(x, ids, mask, use_image_text_matching_head=itm)
    b = ours(x, ids_img, mask_img, use_image_text_matching_head=itm)
    hf_tiny.assert_close(a.logits_per_image, b.logits_per_image, what="logits")
    # and with no attention mask at all (the reference needs one for ITM without image tokens)
    hf_tiny.assert_close(ours(x[:1], ids[:1], None, use_image_text_matching_head=itm).logits_per_image,
                         ours(x[:1], ids[:1], mask[:1], use_image_text_matching_head=itm).logits_per_image,
                         what="no mask")


@torch.no_grad()
def test_projection_models_read_a_retrieval_checkpoint(ret):
    _, retr, d = ret
    text = Blip2TextModelWithProjection.from_pretrained(d)
    vision = Blip2VisionModelWithProjection.from_pretrained(d)
    assert not hasattr(text, "vision_model") and not hasattr(vision, "embeddings")
    hf_text = transformers.Blip2TextModelWithProjection.from_pretrained(d).eval()
    hf_vision = transformers.Blip2VisionModelWithProjection.from_pretrained(d, attn_implementation="eager").eval()
    ids, mask = _text(seed=4)  # the processor gives text alone no image tokens
    x = _pixels(seed=4)
    kw = dict(output_attentions=True, output_hidden_states=True)
    t = text(ids, mask, **kw)
    compare(t, hf_text(ids, mask, **kw))
    assert t.text_embeds.shape == (2, 6, 16)  # every token, projected and normalised
    v = vision(x, **kw)
    compare(v, hf_vision(x, **kw))
    compare(text(ids, mask, return_dict=False), hf_text(ids, mask, return_dict=False))
    # the two encoders give the retrieval model's ITC scores
    if _has_img(retr):
        ids_r = torch.cat([torch.full((2, Q), IMG), ids], 1)
        mask_r = torch.cat([torch.ones(2, Q, dtype=torch.long), mask], 1)
    else:
        ids_r, mask_r = ids, mask
    sim = (v.image_embeds @ t.text_embeds[:, 0].t()).max(dim=1).values
    hf_tiny.assert_close(sim, retr(x, ids_r, mask_r).logits_per_image, what="itc from the projection models")


@torch.no_grad()
@pytest.mark.parametrize("cls", ["Blip2TextModelWithProjection", "Blip2VisionModelWithProjection"])
def test_projection_model_own_checkpoint(tmp_path, cls):
    hf = hf_tiny.save_hf(cls, _cfg(), tmp_path)
    ours = {"Blip2TextModelWithProjection": Blip2TextModelWithProjection,
            "Blip2VisionModelWithProjection": Blip2VisionModelWithProjection}[cls].from_pretrained(tmp_path)
    if cls == "Blip2TextModelWithProjection":
        ids, mask = _text(seed=5)
        compare(ours(ids, mask, output_hidden_states=True), hf(ids, mask, output_hidden_states=True))
    else:
        x = _pixels(seed=5)
        compare(ours(x, output_hidden_states=True), hf(x, output_hidden_states=True))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(ret, dtype):
    _, _, d = ret
    ours = Blip2ForImageTextRetrieval.from_pretrained(d, dtype=dtype)
    theirs = transformers.Blip2ForImageTextRetrieval.from_pretrained(d, dtype=dtype).eval()
    # float16 keeps query_tokens and the Q-Former in fp32, like the reference; bfloat16 casts all
    want = {k: p.dtype for k, p in theirs.named_parameters()}
    got = {k: p.dtype for k, p in ours.named_parameters()}
    assert got == want
    assert got["qformer.layernorm.weight"] == (torch.float32 if dtype == torch.float16 else dtype)
    ids, mask = _text(image_tokens=_has_img(ours), seed=6)
    x = _pixels(seed=6).to(dtype)
    for itm in (True, False):
        a = ours(x, ids, mask, use_image_text_matching_head=itm)
        b = theirs(x, ids, mask, use_image_text_matching_head=itm)
        assert a.logits_per_image.dtype == b.logits_per_image.dtype
        compare(a.logits_per_image, b.logits_per_image, rtol=3e-2, what=f"{dtype} itm={itm}")
        compare(a.image_embeds, b.image_embeds, rtol=3e-2, what=f"{dtype} itm={itm} image_embeds")
    for cls, hf_cls in ((Blip2TextModelWithProjection, transformers.Blip2TextModelWithProjection),
                        (Blip2VisionModelWithProjection, transformers.Blip2VisionModelWithProjection)):
        m, r = cls.from_pretrained(d, dtype=dtype), hf_cls.from_pretrained(d, dtype=dtype).eval()
        assert {k: p.dtype for k, p in m.named_parameters()} == {k: p.dtype for k, p in r.named_parameters()}


@torch.no_grad()
def test_built_from_config(tmp_path):
    cfg = Blip2Config(**_cfg().to_dict())
    model = Blip2ForImageTextRetrieval(cfg).eval()
    qt = model.query_tokens[0]
    assert torch.isfinite(qt).all() and (qt - qt[0]).abs().max() > 0  # distinct queries, not zeros
    assert model.embeddings.word_embeddings.weight[0].abs().max() == 0  # padding row
    ids, mask = _text(seed=7)
    x = _pixels(seed=7)
    itc = model(x, ids, mask).logits_per_image
    assert itc.shape == (2, 2) and torch.isfinite(itc).all()
    # what we save, transformers reads back to the same scores
    model.save_pretrained(tmp_path)
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    for itm in (True, False):
        compare(model(x, ids, mask, use_image_text_matching_head=itm).logits_per_image,
                hf(x, ids, mask, use_image_text_matching_head=itm).logits_per_image)
    for cls in (Blip2TextModelWithProjection, Blip2VisionModelWithProjection):
        m = cls(cfg)
        assert not any(p.is_meta for p in m.parameters()) and torch.isfinite(m.query_tokens).all()


def test_itc_towers_are_the_retrieval_models_own():
    """itc_towers: the text and image ITC encoders made of a loaded retrieval model's modules give
    exactly what the two classes loaded on their own give."""
    from blip2 import Blip2Processor
    from blip2.apps.demo.shipped import demo_checkpoint
    from blip2.models.retrieval import itc_towers

    d = demo_checkpoint("retrieval")
    text, vision = itc_towers(Blip2ForImageTextRetrieval.from_pretrained(d))
    assert not any(p.is_meta for p in list(text.parameters()) + list(vision.parameters()))
    ids = Blip2Processor.from_pretrained(d).tokenizer(["a large red circle"], return_tensors="pt")["input_ids"]
    px = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(text(input_ids=ids).text_embeds,
                           Blip2TextModelWithProjection.from_pretrained(d)(input_ids=ids).text_embeds)
        assert torch.equal(vision(pixel_values=px).image_embeds,
                           Blip2VisionModelWithProjection.from_pretrained(d)(pixel_values=px).image_embeds)
