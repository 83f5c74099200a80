"""Blip2Model / Blip2ForConditionalGeneration against transformers 5.8.0: forward outputs, loss,
features, and generated token ids (greedy, beam, sampling), for OPT and Flan-T5."""

import pytest
import torch

import blip2

import hf_tiny

Q = 4  # query tokens in the tiny configs


def _ckpt(tmp_path_factory, cls, text, **over):
    """transformers writes the checkpoint; we load it. OPT with word_embed_proj_dim == hidden (as
    every BLIP-2 OPT is); Flan-T5 with its own untied lm_head stored in the file, as on the hub."""
    import transformers
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp(f"{cls}-{text}")
    if text == "opt":
        over.setdefault("text_config", dict(word_embed_proj_dim=hf_tiny.OPT["hidden_size"]))
    hf = hf_tiny.save_hf(cls, hf_tiny.blip2_config(text, **over), d)
    if text == "t5":
        sd = load_file(str(d / "model.safetensors"))
        w = sd["language_model.shared.weight"]
        g = torch.Generator().manual_seed(7)
        sd["language_model.lm_head.weight"] = torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        hf = getattr(transformers, cls).from_pretrained(str(d)).eval()
        lm = hf.language_model
        assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()  # the oracle is untied too
    ours = getattr(blip2, cls).from_pretrained(d)
    return hf, ours, d


@pytest.fixture(scope="module", params=["opt", "t5"])
def gen_pair(request, tmp_path_factory):
    return _ckpt(tmp_path_factory, "Blip2ForConditionalGeneration", request.param)


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    return _ckpt(tmp_path_factory, "Blip2Model", "opt")


def _prompt(config, B=2, T=5, left_pad=(0, 2), seed=0):
    """[image]*Q + text ids with left padding (what Blip2Processor gives a decoder-only LM)."""
    g = torch.Generator().manual_seed(seed)
    V = config.text_config.vocab_size
    img = config.image_token_index
    pad = config.text_config.pad_token_id
    text = torch.randint(3, V - 2, (B, T), generator=g)
    ids = torch.cat([torch.full((B, Q), img), text], 1)
    mask = torch.ones_like(ids)
    for b, n in enumerate(left_pad[:B]):
        # the reference processor puts pads between the image tokens and the text
        ids[b, Q : Q + n] = pad
        mask[b, Q : Q + n] = 0
    return ids, mask


def _pixels(B=2, size=30, seed=1):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_forward_logits_and_parts(gen_pair):
    hf, ours, _ = gen_pair
    px = _pixels()
    ids, mask = _prompt(hf.config)
    kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask)
    if not hf.config.use_decoder_only_language_model:
        kw["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 3]])
    a, b = ours(**kw), hf(**kw)
    hf_tiny.assert_close(a.logits, b.logits, what="logits")
    hf_tiny.assert_close(a.vision_outputs.last_hidden_state, b.vision_outputs.last_hidden_state, what="vision")
    hf_tiny.assert_close(a.qformer_outputs.last_hidden_state, b.qformer_outputs.last_hidden_state, what="qformer")
    hf_tiny.assert_close(
        a.language_model_outputs.logits, b.language_model_outputs.logits, what="language_model_outputs"
    )


@torch.no_grad()
def test_loss_with_labels(gen_pair):
    hf, ours, _ = gen_pair
    px = _pixels()
    ids, mask = _prompt(hf.config, left_pad=(0, 0))
    if hf.config.use_decoder_only_language_model:
        labels = ids[:, Q:].clone()
        labels[:, :2] = -100  # prompt part ignored
        kw = dict(labels=labels)
    else:
        labels = torch.tensor([[5, 9, 1], [7, -100, -100]])
        kw = dict(labels=labels)
    a = ours(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    b = hf(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    hf_tiny.assert_close(a.loss, b.loss, what="loss")
    hf_tiny.assert_close(a.logits, b.logits, what="logits")


@torch.no_grad()
def test_image_features_of_generation_model(gen_pair):
    hf, ours, _ = gen_pair
    px = _pixels(size=42)
    a = ours.get_image_features(px, interpolate_pos_encoding=True)
    b = hf.get_image_features(px, interpolate_pos_encoding=True)
    hf_tiny.assert_close(a.pooler_output, b.pooler_output, what="projected queries")
    hf_tiny.assert_close(a.last_hidden_state, b.last_hidden_state, what="vision")


def _gen_cases(decoder_only):
    cases = [
        dict(),  # defaults from the generation config
        dict(max_new_tokens=7),
        dict(max_new_tokens=6, num_beams=3),
        dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.6),
        dict(max_new_tokens=8, repetition_penalty=1.7, no_repeat_ngram_size=2),
        dict(max_new_tokens=5, min_new_tokens=3, num_beams=2, early_stopping=True),
    ]
    return cases


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("with_prompt", [False, True])
@torch.no_grad()
def test_generate_same_tokens(gen_pair, case, with_prompt):
    hf, ours, _ = gen_pair
    kw = _gen_cases(hf.config.use_decoder_only_language_model)[case]
    px = _pixels()
    inputs = dict(pixel_values=px)
    if with_prompt:
        ids, mask = _prompt(hf.config)
        inputs.update(input_ids=ids, attention_mask=mask)
    a = ours.generate(**inputs, **kw)
    b = hf.generate(**inputs, **kw)
    assert a.tolist() == b.tolist()


@torch.no_grad()
def test_generate_sampling_seeded(gen_pair):
    hf, ours, _ = gen_pair
    px = _pixels()
    kw = dict(do_sample=True, max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=2)
    torch.manual_seed(123)
    a = ours.generate(pixel_values=px, **kw)
    torch.manual_seed(123)
    b = hf.generate(pixel_values=px, **kw)
    assert a.tolist() == b.tolist()


@torch.no_grad()
def test_eos_stops_and_pads(gen_pair):
    """Make EOS a token the model actually produces, so stopping and padding are exercised."""
    hf, ours, _ = gen_pair
    px = _pixels()
    first = hf.generate(pixel_values=px, max_new_tokens=6)
    eos = int(first[0, -3])
    kw = dict(max_new_tokens=6, eos_token_id=eos)
    assert ours.generate(pixel_values=px, **kw).tolist() == hf.generate(pixel_values=px, **kw).tolist()
    kw["num_beams"] = 2
    assert ours.generate(pixel_values=px, **kw).tolist() == hf.generate(pixel_values=px, **kw).tolist()


def _questions(config, seed=3):
    """Prompts about one image as Blip2Processor makes them: the placeholders, a shared template
    start, then questions of different lengths (one of them the shortest possible)."""
    g = torch.Generator().manual_seed(seed)
    V = config.text_config.vocab_size
    head = [config.image_token_index] * Q + torch.randint(3, V - 2, (3,), generator=g).tolist()
    return [head + torch.randint(3, V - 2, (n,), generator=g).tolist() for n in (4, 1, 6, 4)]


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=7),
    dict(max_new_tokens=6, num_beams=3, num_return_sequences=2),
    dict(max_new_tokens=6, eos_token_id="produced"),
])
@torch.no_grad()
def test_generate_many_equals_one_prompt_at_a_time(gen_pair, kw):
    """k questions in one batch, the shared prefix run once (OPT): each answer is the reference's
    answer to that question asked alone, with the same length (no padding past its eos)."""
    hf, ours, _ = gen_pair
    px = _pixels(1)
    qs = _questions(hf.config)
    kw = dict(kw)
    if kw.get("eos_token_id") == "produced":  # a token some answers produce early, others not at all
        first = hf.generate(pixel_values=px, input_ids=torch.tensor([qs[0]]), max_new_tokens=6)
        kw["eos_token_id"] = int(first[0, -4])
    got = ours.generate_many(px, qs, **kw)
    ref = [hf.generate(pixel_values=px, input_ids=torch.tensor([q]), **kw) for q in qs]
    assert [g.tolist() for g in got] == [r.tolist() for r in ref]
    if "eos_token_id" in kw:
        assert len({r.shape[1] for r in ref}) > 1  # the answers really stop at different lengths


@torch.no_grad()
def test_generate_many_prefix_and_input_forms(gen_pair, monkeypatch):
    """The shared prefix is what all prompts have in common, capped so every row keeps a token of
    its own; a padded (k, T) tensor with its mask gives the same answers as the list."""
    hf, ours, _ = gen_pair
    px = _pixels(1)
    qs = _questions(hf.config)
    same = [qs[0], qs[0]]  # identical prompts: all but the last token shared
    nested = [qs[0][:-2], qs[0]]  # one prompt a prefix of the other
    seen = []
    start = ours.language_model.start
    monkeypatch.setattr(ours.language_model, "start",
                        lambda e, m, n, **kw: seen.append(kw.get("shared_prefix", 0)) or start(e, m, n, **kw))
    for prompts in (same, nested):
        got = ours.generate_many(px, prompts, max_new_tokens=5)
        ref = [hf.generate(pixel_values=px, input_ids=torch.tensor([q]), max_new_tokens=5) for q in prompts]
        assert [g.tolist() for g in got] == [r.tolist() for r in ref]
    if hf.config.use_decoder_only_language_model:
        assert seen == [len(qs[0]) - 1, len(qs[0]) - 3]
    else:
        assert seen == [0, 0]  # T5's encoder sees the whole prompt: nothing to share
    L = max(map(len, qs))
    pad = hf.config.text_config.pad_token_id
    ids = torch.tensor([[pad] * (L - len(q)) + q for q in qs])
    mask = torch.tensor([[0] * (L - len(q)) + [1] * len(q) for q in qs])
    a = ours.generate_many(px, ids, attention_mask=mask, max_new_tokens=4)
    b = ours.generate_many(px, qs, max_new_tokens=4)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    with pytest.raises(ValueError, match="one image"):
        ours.generate_many(_pixels(2), qs)


@torch.no_grad()
def test_blip2model_features(model_pair):
    hf, ours, _ = model_pair
    px = _pixels()
    ids, mask = _prompt(hf.config)
    hf_tiny.assert_close(ours(pixel_values=px, input_ids=ids, attention_mask=mask).logits,
                         hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits, what="logits")
    hf_tiny.assert_close(ours.get_qformer_features(px), hf.get_qformer_features(px), what="qformer features")
    hf_tiny.assert_close(ours.get_image_features(px).last_hidden_state,
                         hf.get_image_features(px).last_hidden_state, what="image features")
    text = ids[:, Q:]
    tm = mask[:, Q:]
    hf_tiny.assert_close(ours.get_text_features(text, attention_mask=tm).last_hidden_state,
                         hf.get_text_features(text, attention_mask=tm).last_hidden_state, what="text features")


@torch.no_grad()
def test_bf16_close(gen_pair):
    hf, _, d = gen_pair
    ours = blip2.Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16)
    assert ours.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    px = _pixels()
    ids, mask = _prompt(hf.config)
    kw = dict(input_ids=ids, attention_mask=mask)
    if not hf.config.use_decoder_only_language_model:
        kw["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 3]])
    a = ours(pixel_values=px.bfloat16(), **kw).logits.float()
    b = hf(pixel_values=px, **kw).logits
    rel = (a - b).abs().max() / b.abs().max()
    assert rel < 0.1, rel


def test_fp16_keeps_qformer_in_fp32(tmp_path):
    hf_tiny.save_hf("Blip2ForConditionalGeneration", hf_tiny.blip2_config("opt"), tmp_path)
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16)
    assert m.query_tokens.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in m.qformer.parameters())
    assert m.language_projection.weight.dtype == torch.float16
    assert m.vision_model.post_layernorm.weight.dtype == torch.float16


def test_placeholder_count_mismatch_is_explained(gen_pair):
    hf, ours, _ = gen_pair
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="placeholders"):
        ours(pixel_values=_pixels(1), input_ids=ids)


class _Uncached:
    """An LMSession that recomputes the whole forward every step: the reference for the cache."""

    def __init__(self, lm, embeds, mask, decoder_only, start_id):
        self.lm, self.e, self.m, self.dec_only = lm, embeds, mask, decoder_only
        self.dec = torch.full((embeds.shape[0], 1), start_id or 0, dtype=torch.long)

    @property
    def batch_size(self):
        return self.e.shape[0]

    def _logits(self):
        if self.dec_only:
            return self.lm(inputs_embeds=self.e, attention_mask=self.m).logits[:, -1]
        return self.lm(inputs_embeds=self.e, attention_mask=self.m, decoder_input_ids=self.dec).logits[:, -1]

    def prefill(self):
        return self._logits()

    def step(self, tokens):
        if self.dec_only:
            self.e = torch.cat([self.e, self.lm.get_input_embeddings()(tokens)[:, None]], 1)
            self.m = torch.cat([self.m, torch.ones_like(self.m[:, :1])], 1)
        else:
            self.dec = torch.cat([self.dec, tokens[:, None]], 1)
        return self._logits()

    def reorder(self, index):
        self.e, self.m, self.dec = self.e[index], self.m[index], self.dec[index]


@pytest.mark.parametrize("kw", [dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)])
@torch.no_grad()
def test_cached_equals_uncached_decoding(gen_pair, kw, monkeypatch):
    _, ours, _ = gen_pair
    px = _pixels()
    ids, mask = _prompt(ours.config)
    cached = ours.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    tc = ours.config.text_config
    dec_only = ours.config.use_decoder_only_language_model
    monkeypatch.setattr(ours.language_model, "start",
                        lambda e, m, n: _Uncached(ours.language_model, e, m, dec_only, tc.decoder_start_token_id))
    uncached = ours.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    assert cached.tolist() == uncached.tolist()


def test_opt_checkpoint_with_stored_lm_head(tmp_path):
    """Published OPT BLIP-2 files store lm_head.weight (a copy of the tied embeddings): accepted, tied."""
    from safetensors.torch import load_file, save_file

    cfg = hf_tiny.blip2_config("opt", text_config=dict(word_embed_proj_dim=hf_tiny.OPT["hidden_size"]))
    hf = hf_tiny.save_hf("Blip2ForConditionalGeneration", cfg, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert "language_model.lm_head.weight" not in sd
    sd["language_model.lm_head.weight"] = sd["language_model.model.decoder.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert m.language_model.lm_head.weight is m.language_model.get_input_embeddings().weight
    px = _pixels()
    with torch.no_grad():
        assert m.generate(pixel_values=px, max_new_tokens=5).tolist() == hf.generate(pixel_values=px, max_new_tokens=5).tolist()


@torch.no_grad()
def test_our_save_loads_in_transformers(gen_pair, tmp_path):
    import transformers

    _, ours, _ = gen_pair
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").exists()
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    px = _pixels()
    ids, mask = _prompt(ours.config)
    kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask)
    if not ours.config.use_decoder_only_language_model:
        kw["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 3]])
    hf_tiny.assert_close(ours(**kw).logits, back(**kw).logits, what="reloaded by transformers")
    again = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert again.generate(pixel_values=px, max_new_tokens=5).tolist() == ours.generate(pixel_values=px, max_new_tokens=5).tolist()
