"""OPT and T5 language models against transformers' OPTForCausalLM / T5ForConditionalGeneration.

Each test builds the reference from a tiny config (fan-in init), loads its state_dict into ours
by key identity (strict), and compares logits, losses, hidden states, and the cached session
(prefill + steps + reorder) against the reference's uncached forward over the same sequences.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_tiny import OPT, T5, assert_close, make_hf, save_hf

from blip2.models.config import OPTConfig, T5Config
from blip2.models.lm import build_language_model
from blip2.models.opt import OPTForCausalLM
from blip2.models.t5 import T5ForConditionalGeneration



@pytest.fixture(autouse=True)
def _no_grad():
    # every test here is inference-only; scoped so other test files keep autograd
    with torch.no_grad():
        yield

OPT_VARIANTS = {
    "proj_prenorm": {},  # word_embed_proj_dim 24 != hidden 32: project_in/out (opt-350m shape, pre-norm)
    "postnorm": dict(do_layer_norm_before=False, activation_function="gelu"),  # opt-350m: no final norm
    "nobias_noaffine": dict(word_embed_proj_dim=32, enable_bias=False, layer_norm_elementwise_affine=False,
                            _remove_final_layer_norm=True, activation_function="gelu_new"),
}
T5_VARIANTS = {
    # Flan-T5: gated-gelu, tie_word_embeddings=False -> no output scaling and its own lm_head
    "flan_untied": dict(),
    # T5 v1.0: relu, head tied to `shared`, outputs scaled by d_model**-0.5
    "t5_tied_relu": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # a Flan config whose head stayed tied (what transformers 5.x builds and saves from it)
    "flan_tied_head": dict(),
}


def load_into(ours, hf):
    """Our model gets the reference's weights by key identity (tied keys appear under every name on both sides)."""
    theirs = hf.state_dict()
    assert set(ours.state_dict()) == set(theirs), set(ours.state_dict()) ^ set(theirs)
    ours.load_state_dict(theirs, strict=True)
    ours.tie_weights()
    return ours.eval()


def opt_pair(variant="proj_prenorm", dtype=torch.float32):
    cfg = {**OPT, **OPT_VARIANTS[variant]}
    hf = make_hf("OPTForCausalLM", transformers.OPTConfig(**cfg))
    ours = load_into(OPTForCausalLM(OPTConfig(**cfg)), hf)
    return ours.to(dtype), hf.to(dtype)


def t5_pair(variant="flan_untied", dtype=torch.float32):
    cfg = {**T5, **T5_VARIANTS[variant]}
    hf = make_hf("T5ForConditionalGeneration", transformers.T5Config(**cfg))
    if variant == "flan_untied":
        # a real Flan-T5 checkpoint carries its own head; transformers then unties it on load
        g = torch.Generator().manual_seed(1)
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(hf.lm_head.weight.shape, generator=g))
    ours = T5ForConditionalGeneration(T5Config(**cfg))
    ours.fit_ties(["lm_head.weight"] if variant == "flan_untied" else ["shared.weight"])
    ours = load_into(ours, hf)
    return ours.to(dtype), hf.to(dtype)


def left_padded(B=3, T=7, V=120, pads=(0, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 1, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = 1, 0
    return ids, mask


# ---------------------------------------------------------------- OPT
@pytest.mark.parametrize("variant", list(OPT_VARIANTS))
def test_opt_forward_matches_reference(variant):
    ours, hf = opt_pair(variant)
    assert (ours.model.decoder.project_in is not None) == (variant != "nobias_noaffine")
    assert (ours.model.decoder.final_layer_norm is None) == (variant != "proj_prenorm")
    ids, mask = left_padded()
    for kw in (dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask)):
        ref = hf(**kw, output_hidden_states=True)
        out = ours(**kw, output_hidden_states=True)
        assert_close(out.logits, ref.logits, what=f"{variant} logits {sorted(kw)}")
        assert len(out.hidden_states) == len(ref.hidden_states)
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_close(a, b, what=f"hidden state {i}")
    # inputs_embeds path (how BLIP-2 calls it)
    emb = hf.get_input_embeddings()(ids) + 0.1 * torch.randn(*ids.shape, OPT_VARIANTS[variant].get("word_embed_proj_dim", 24))
    assert_close(ours(inputs_embeds=emb, attention_mask=mask).logits, hf(inputs_embeds=emb, attention_mask=mask).logits)
    # text_features = the reference's base model output
    tf = ours.text_features(input_ids=ids, attention_mask=mask)
    assert_close(tf.last_hidden_state, hf.model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_opt_loss_and_tuple_output():
    ours, hf = opt_pair()
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, -2] = -100
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref.loss, what="loss")
    tup = ours(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert_close(tup[0], ref.loss) and assert_close(tup[1], ref.logits)
    # gradients flow through our model (training path)
    ours.train()
    with torch.enable_grad():
        ours.config.dropout = 0.0
        for m in ours.modules():
            if hasattr(m, "dropout"):
                m.dropout = 0.0
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    assert_close(loss.detach(), ref.loss)
    assert ours.lm_head.weight.grad is not None and ours.lm_head.weight is ours.get_input_embeddings().weight


def test_opt_attentions_match_eager_reference():
    cfg = dict(OPT)
    hf = make_hf("OPTForCausalLM", transformers.OPTConfig(**cfg, attn_implementation="eager"))
    ours = load_into(OPTForCausalLM(OPTConfig(**cfg)), hf)
    ids, _ = left_padded()
    ref, out = hf(input_ids=ids, output_attentions=True), ours(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == OPT["num_hidden_layers"]
    for a, b in zip(out.attentions, ref.attentions):
        assert_close(a, b, what="attention weights")
    assert_close(out.logits, ref.logits)


def opt_reference_last_logits(hf, prompt_emb, mask, new_ids):
    """The reference's uncached forward over prompt embeddings + new tokens; logits at the last position."""
    emb = torch.cat([prompt_emb, hf.get_input_embeddings()(new_ids)], 1) if new_ids.shape[1] else prompt_emb
    m = torch.cat([mask, torch.ones_like(new_ids)], 1)
    return hf(inputs_embeds=emb, attention_mask=m).logits[:, -1]


@pytest.mark.parametrize("variant", ["proj_prenorm", "postnorm"])
def test_opt_session_matches_uncached(variant):
    ours, hf = opt_pair(variant)
    ids, mask = left_padded()
    emb = hf.get_input_embeddings()(ids)
    s = ours.start(emb, mask, max_new_tokens=6)
    assert s.batch_size == 3 and s.capacity == ids.shape[1] + 6
    logits = s.prefill()
    assert_close(logits, hf(inputs_embeds=emb, attention_mask=mask).logits[:, -1], what="prefill")
    new = torch.empty(3, 0, dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        tok = torch.randint(3, 119, (3,), generator=g)  # arbitrary tokens, not only the argmax
        new = torch.cat([new, tok[:, None]], 1)
        logits = s.step(tok)
        assert_close(logits, opt_reference_last_logits(hf, emb, mask, new), what=f"step {i}")
        # our own uncached forward over the same sequence agrees too (same code path, ~exact)
        full = ours(inputs_embeds=torch.cat([emb, ours.get_input_embeddings()(new)], 1),
                    attention_mask=torch.cat([mask, torch.ones_like(new)], 1)).logits[:, -1]
        assert_close(logits, full, atol=1e-5, what="session vs our forward")
    assert torch.equal(s.attention_mask, torch.cat([mask, torch.ones_like(new)], 1))


def test_opt_session_reorder_and_expand():
    ours, hf = opt_pair()
    ids, mask = left_padded(B=2, pads=(2, 0))
    emb = hf.get_input_embeddings()(ids)
    s = ours.start(emb, mask, max_new_tokens=5)
    s.prefill()
    # B -> B*3 beams (rows repeated in place, as beam search expands)
    s.reorder(torch.tensor([0, 0, 0, 1, 1, 1]))
    assert s.batch_size == 6
    hist = [[] for _ in range(6)]
    src = [0, 0, 0, 1, 1, 1]
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        tok = torch.randint(3, 119, (6,), generator=g)
        for r in range(6):
            hist[r].append(int(tok[r]))
        logits = s.step(tok)
        new = torch.tensor(hist)
        ref = opt_reference_last_logits(hf, emb[src], mask[src], new)
        assert_close(logits, ref, what=f"beam step {step}")
        # beam reorder: rows pick other rows' histories (with duplicates)
        perm = [[2, 0, 1, 5, 5, 3], [1, 1, 0, 4, 3, 5], [0, 1, 2, 3, 4, 5]][step]
        s.reorder(torch.tensor(perm))
        hist = [list(hist[p]) for p in perm]
        src = [src[p] for p in perm]


def greedy(session, n):
    """Test driver only: argmax decoding through the session contract."""
    logits, toks = session.prefill(), []
    for i in range(n):
        t = logits.float().argmax(-1)
        toks.append(t)
        if i + 1 < n:
            logits = session.step(t)
    return torch.stack(toks, 1)


def test_opt_session_greedy_matches_reference_generate():
    ours, hf = opt_pair()
    ids, mask = left_padded()
    emb = hf.get_input_embeddings()(ids)
    hf.generation_config.eos_token_id = None
    ref = hf.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(greedy(ours.start(emb, mask, 8), 8), ref[:, -8:])


def test_opt_bf16():
    ours, hf = opt_pair(dtype=torch.bfloat16)
    ids, mask = left_padded()
    assert_close(ours(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits, rtol=3e-2)
    emb = ours.get_input_embeddings()(ids)
    s = ours.start(emb, mask, 3)
    assert s.caches[0].k.dtype == torch.bfloat16
    l0 = s.prefill()
    assert l0.dtype == torch.bfloat16
    tok = l0.float().argmax(-1)
    l1 = s.step(tok)
    full = ours(inputs_embeds=torch.cat([emb, ours.get_input_embeddings()(tok[:, None])], 1),
                attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)).logits[:, -1]
    assert_close(l1, full, rtol=3e-2, what="bf16 session vs forward")


# ---------------------------------------------------------------- T5
def t5_inputs(B=3, S=6, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(2, 119, (B, S), generator=g)
    emask = torch.ones(B, S, dtype=torch.long)
    emask[1, 4:] = 0  # right padding (tokenizer style)
    emask[2, :2] = 0  # and left padding: relative positions make both legal
    dec = torch.randint(2, 119, (B, T), generator=g)
    dec[:, 0] = 0  # decoder_start_token_id
    return enc, emask, dec


@pytest.mark.parametrize("variant", list(T5_VARIANTS))
def test_t5_forward_matches_reference(variant):
    ours, hf = t5_pair(variant)
    assert ours.scale_output == (variant == "t5_tied_relu") == hf.config.scale_decoder_outputs
    assert (ours.lm_head.weight is ours.shared.weight) == (variant != "flan_untied")
    enc, emask, dec = t5_inputs()
    dmask = torch.ones_like(dec)
    dmask[0, -2:] = 0
    for kw in (
        dict(input_ids=enc, decoder_input_ids=dec),
        dict(input_ids=enc, attention_mask=emask, decoder_input_ids=dec, decoder_attention_mask=dmask),
    ):
        ref = hf(**kw, output_hidden_states=True, output_attentions=True)
        out = ours(**kw, output_hidden_states=True, output_attentions=True)
        assert_close(out.logits, ref.logits, what=f"{variant} logits")
        assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state)
        for name in ("encoder_hidden_states", "decoder_hidden_states", "encoder_attentions", "decoder_attentions",
                     "cross_attentions"):
            a, b = getattr(out, name), getattr(ref, name)
            assert len(a) == len(b), name
            for x, y in zip(a, b):
                assert_close(x, y, what=name)
    # inputs_embeds (how BLIP-2 calls it) and precomputed encoder_outputs
    emb = hf.shared(enc) + 0.1 * torch.randn(*enc.shape, T5["d_model"])
    ref = hf(inputs_embeds=emb, attention_mask=emask, decoder_input_ids=dec)
    assert_close(ours(inputs_embeds=emb, attention_mask=emask, decoder_input_ids=dec).logits, ref.logits)
    eo = ours.get_encoder()(inputs_embeds=emb, attention_mask=emask)
    assert_close(ours(encoder_outputs=eo, attention_mask=emask, decoder_input_ids=dec).logits, ref.logits)
    assert_close(ours(encoder_outputs=(eo.last_hidden_state,), attention_mask=emask, decoder_input_ids=dec).logits, ref.logits)
    assert_close(ours.text_features(input_ids=enc, attention_mask=emask).last_hidden_state,
                 hf.get_encoder()(input_ids=enc, attention_mask=emask).last_hidden_state)


@pytest.mark.parametrize("variant", ["flan_untied", "t5_tied_relu"])
def test_t5_labels_loss(variant):
    ours, hf = t5_pair(variant)
    enc, emask, dec = t5_inputs()
    labels = dec.clone()
    labels[0, -2:] = -100
    labels[2, 1] = -100
    ref = hf(input_ids=enc, attention_mask=emask, labels=labels)
    out = ours(input_ids=enc, attention_mask=emask, labels=labels)
    assert_close(out.loss, ref.loss, what="loss")
    assert_close(out.logits, ref.logits, what="logits from shifted labels")
    assert torch.equal(ours._shift_right(labels), hf._shift_right(labels))


def t5_reference_logits(hf, emb, emask, dec_ids):
    return hf(inputs_embeds=emb, attention_mask=emask, decoder_input_ids=dec_ids).logits[:, -1]


@pytest.mark.parametrize("variant", ["flan_untied", "t5_tied_relu"])
def test_t5_session_matches_uncached(variant):
    ours, hf = t5_pair(variant)
    enc, emask, _ = t5_inputs()
    emb = hf.shared(enc)
    s = ours.start(emb, emask, max_new_tokens=5)
    dec = torch.zeros(3, 1, dtype=torch.long)  # the start token
    assert_close(s.prefill(), t5_reference_logits(hf, emb, emask, dec), what="prefill")
    g = torch.Generator().manual_seed(2)
    for i in range(4):
        tok = torch.randint(2, 119, (3,), generator=g)
        dec = torch.cat([dec, tok[:, None]], 1)
        logits = s.step(tok)
        assert_close(logits, t5_reference_logits(hf, emb, emask, dec), what=f"step {i}")
        assert_close(logits, ours(inputs_embeds=emb, attention_mask=emask, decoder_input_ids=dec).logits[:, -1],
                     atol=1e-5, what="session vs our forward")
    s.step(tok)
    with pytest.raises(RuntimeError, match="KV cache full"):
        s.step(tok)


def test_t5_session_reorder_and_expand():
    ours, hf = t5_pair()
    enc, emask, _ = t5_inputs()
    emb = hf.shared(enc)
    s = ours.start(emb, emask, max_new_tokens=6)
    s.prefill()
    s.reorder(torch.tensor([1, 1, 2, 2]))  # 2 beams for each of the two padded rows; row 0 dropped
    src, hist = [1, 1, 2, 2], [[0] for _ in range(4)]
    g = torch.Generator().manual_seed(4)
    for step, perm in enumerate([[1, 0, 3, 3], [0, 0, 2, 3], [1, 1, 3, 2]]):
        tok = torch.randint(2, 119, (4,), generator=g)
        for r in range(4):
            hist[r].append(int(tok[r]))
        logits = s.step(tok)
        assert_close(logits, t5_reference_logits(hf, emb[src], emask[src], torch.tensor(hist)), what=f"beam step {step}")
        s.reorder(torch.tensor(perm))
        hist, src = [list(hist[p]) for p in perm], [src[p] for p in perm]


def test_t5_session_greedy_matches_reference_generate():
    ours, hf = t5_pair()
    enc, emask, _ = t5_inputs()
    emb = hf.shared(enc)
    hf.generation_config.eos_token_id = None
    ref = hf.generate(inputs_embeds=emb, attention_mask=emask, max_new_tokens=7, do_sample=False)
    assert torch.equal(greedy(ours.start(emb, emask, 7), 7), ref[:, 1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_half(dtype):
    ours, hf = t5_pair(dtype=dtype)
    if dtype == torch.float16:  # the reference keeps every `wo` in fp32 under fp16 (_keep_in_fp32_modules)
        for m in (ours, hf):
            for n, mod in m.named_modules():
                if n.endswith(".wo"):
                    mod.float()
    enc, emask, dec = t5_inputs()
    ref = hf(input_ids=enc, attention_mask=emask, decoder_input_ids=dec).logits
    out = ours(input_ids=enc, attention_mask=emask, decoder_input_ids=dec).logits
    assert out.dtype == ref.dtype
    assert_close(out, ref, rtol=3e-2, what=str(dtype))
    s = ours.start(ours.shared(enc), emask, 4)
    assert_close(s.prefill(), out[:, 0], rtol=3e-2)
    assert_close(s.step(dec[:, 1]), out[:, 1], rtol=3e-2)


def test_fp16_clamp_keeps_t5_finite():
    ours, hf = t5_pair("t5_tied_relu", dtype=torch.float16)
    for m in (ours, hf):  # force an fp16 overflow in the first encoder FFN
        w = m.encoder.block[0].layer[-1].DenseReluDense.wo.weight
        w.data = torch.sign(w.data) * 3e4
    enc, emask, dec = t5_inputs()
    out = ours(input_ids=enc, attention_mask=emask, decoder_input_ids=dec)
    ref = hf(input_ids=enc, attention_mask=emask, decoder_input_ids=dec)
    assert torch.isfinite(out.encoder_last_hidden_state).all() and torch.isfinite(out.logits).all()
    assert_close(out.logits, ref.logits, rtol=3e-2)


# ---------------------------------------------------------------- weights and ties
def test_t5_head_ties_follow_the_checkpoint():
    cfg = T5Config(**T5)  # tie_word_embeddings=False, as Flan-T5's config.json says
    m = T5ForConditionalGeneration(cfg)
    assert not m.scale_output and "lm_head.weight" not in m.tied_weights()
    m.fit_ties(["shared.weight"])  # saved by transformers 5.x from such a config: head stored tied
    m.tie_weights()
    assert m.lm_head.weight is m.shared.weight and "lm_head.weight" in m.tied_weights()
    m.fit_ties(["shared.weight", "lm_head.weight"])  # a real Flan-T5 file
    m.tie_weights()
    assert m.lm_head.weight is not m.shared.weight
    assert m.encoder.embed_tokens.weight is m.shared.weight is m.decoder.embed_tokens.weight
    # a config written by 5.x after loading Flan-T5 keeps the reference's scaling choice
    assert not T5ForConditionalGeneration(T5Config(**{**T5, "tie_word_embeddings": True, "scale_decoder_outputs": False})).scale_output
    assert T5ForConditionalGeneration(T5Config(**{k: v for k, v in T5.items() if k != "tie_word_embeddings"})).scale_output


def test_build_language_model_and_meta_construction():
    with torch.device("meta"):
        opt = build_language_model(OPTConfig(**OPT))
        t5 = build_language_model(T5Config(**T5))
    assert isinstance(opt, OPTForCausalLM) and isinstance(t5, T5ForConditionalGeneration)
    assert opt.lm_head.weight is opt.get_input_embeddings().weight
    assert list(opt.buffers()) == [] and list(t5.buffers()) == []
    with pytest.raises(ValueError, match="no language model"):
        build_language_model(type("C", (), {"model_type": "gpt2"})())


@pytest.mark.parametrize("head", ["saved_tied", "own_head"])
def test_from_pretrained_reads_reference_checkpoints(tmp_path, head):
    """Files written by transformers' save_pretrained load by key identity; T5's head tie follows the file."""
    hf = save_hf("OPTForCausalLM", transformers.OPTConfig(**OPT), tmp_path / "opt")
    ours = OPTForCausalLM.from_pretrained(tmp_path / "opt")
    ids, mask = left_padded()
    assert_close(ours(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits)
    assert ours.lm_head.weight is ours.get_input_embeddings().weight

    hf = make_hf("T5ForConditionalGeneration", transformers.T5Config(**T5))
    if head == "own_head":  # what a real Flan-T5 checkpoint holds
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(hf.lm_head.weight.shape))
    hf.save_pretrained(str(tmp_path / "t5"))
    ours = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5")
    assert (ours.lm_head.weight is ours.shared.weight) == (head == "saved_tied")
    enc, emask, dec = t5_inputs()
    assert_close(ours(input_ids=enc, attention_mask=emask, decoder_input_ids=dec).logits,
                 hf(input_ids=enc, attention_mask=emask, decoder_input_ids=dec).logits)
