"""blip2.generation against transformers' own `generate` on the same tiny models.

The language model side is an uncached adapter around transformers' OPT / T5 (full forward every
step, rows picked by index on reorder), so any difference in output ids is the decoding's.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
import transformers
from hf_tiny import OPT, T5, blip2_config, make_hf

from blip2.generation import GenerationConfig, decode, prepare_generation_config


def _cfg(d):
    return {k: v for k, v in d.items() if k != "model_type"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: extra threads only spin against the other jobs on the machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def opt():
    return make_hf("OPTForCausalLM", transformers.OPTConfig(**_cfg(OPT)), seed=1)


@pytest.fixture(scope="module")
def t5():
    return make_hf("T5ForConditionalGeneration", transformers.T5Config(**_cfg(T5)), seed=2)


class DecoderSession:
    """Uncached decoder-only LM: prompt embeddings + generated ids, recomputed every step."""

    def __init__(self, model, attention_mask, input_ids=None, inputs_embeds=None):
        self.model = model
        self.emb = inputs_embeds if inputs_embeds is not None else model.get_input_embeddings()(input_ids)
        self.mask = attention_mask
        self.gen = torch.zeros((self.mask.shape[0], 0), dtype=torch.long, device=self.mask.device)

    @property
    def batch_size(self):
        return self.mask.shape[0]

    @torch.no_grad()
    def _logits(self):
        emb = torch.cat([self.emb, self.model.get_input_embeddings()(self.gen)], 1)
        mask = torch.cat([self.mask, torch.ones_like(self.gen)], 1)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate computes them
        return self.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits[:, -1]

    def prefill(self):
        return self._logits()

    def step(self, tokens):
        self.gen = torch.cat([self.gen, tokens[:, None]], 1)
        return self._logits()

    def reorder(self, index):
        self.emb, self.mask, self.gen = self.emb[index], self.mask[index], self.gen[index]


class Seq2SeqSession:
    """Uncached encoder-decoder LM: encoder run once, decoder over the whole history every step."""

    def __init__(self, model, attention_mask, start, input_ids=None, inputs_embeds=None):
        self.model = model
        with torch.no_grad():
            self.enc = model.get_encoder()(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                           attention_mask=attention_mask).last_hidden_state
        self.mask = attention_mask
        self.dec = torch.full((self.mask.shape[0], 1), start, dtype=torch.long, device=self.mask.device)

    @property
    def batch_size(self):
        return self.mask.shape[0]

    @torch.no_grad()
    def _logits(self):
        return self.model(encoder_outputs=(self.enc,), attention_mask=self.mask,
                          decoder_input_ids=self.dec).logits[:, -1]

    def prefill(self):
        return self._logits()

    def step(self, tokens):
        self.dec = torch.cat([self.dec, tokens[:, None]], 1)
        return self._logits()

    def reorder(self, index):
        self.enc, self.mask, self.dec = self.enc[index], self.mask[index], self.dec[index]


def generate(session, input_ids, generation_config=None, *, model_generation_config=None,
             inputs_embeds_len=None, max_position_embeddings=None, **kwargs):
    """prepare_generation_config + decode, as a model's generate() runs them: the prompt held by
    `session` continued, (B * num_return_sequences, T) ids; anything not a generation parameter
    is an error."""
    cfg, unused = prepare_generation_config(
        generation_config, model_generation_config, prompt_len=input_ids.shape[1],
        inputs_embeds_len=inputs_embeds_len, max_position_embeddings=max_position_embeddings, **kwargs)
    if unused:
        raise ValueError(f"generate() got arguments that are not generation parameters: {sorted(unused)}")
    return decode(session, input_ids, cfg)


def model_gen_cfg(hf):
    return GenerationConfig.from_dict(hf.generation_config.to_dict())


def prompts(B=2, T=7, V=120, seed=0, pad=1, left_pad=(0, 3)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 1, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(left_pad[:B]):
        ids[b, :n], mask[b, :n] = pad, 0
    return ids, mask


def seeded(fn, seed):
    torch.manual_seed(seed)
    return fn()


def counted(model, fn):
    """fn() and the number of top-level forward calls it made (one per decoding step on both sides)."""
    n = [0]
    h = model.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    try:
        return fn(), n[0]
    finally:
        h.remove()


def run_opt(opt, ids, mask, seed=0, **kw):
    ref, n_ref = counted(opt, lambda: seeded(lambda: opt.generate(input_ids=ids, attention_mask=mask, **kw), seed))
    s = DecoderSession(opt, mask, input_ids=ids)
    ours, n_ours = counted(opt, lambda: seeded(lambda: generate(
        s, ids, model_generation_config=model_gen_cfg(opt),
        max_position_embeddings=opt.config.max_position_embeddings, **kw), seed))
    assert n_ours == n_ref, f"{n_ours} LM steps, the reference took {n_ref}"
    return ours, ref


def run_t5(t5, enc_ids, mask, seed=0, embeds=False, **kw):
    emb = t5.get_input_embeddings()(enc_ids).detach() if embeds else None
    inp = dict(inputs_embeds=emb) if embeds else dict(input_ids=enc_ids)
    ref, n_ref = counted(t5, lambda: seeded(lambda: t5.generate(attention_mask=mask, **inp, **kw), seed))
    s = Seq2SeqSession(t5, mask, t5.config.decoder_start_token_id, **inp)
    start = torch.full((mask.shape[0], 1), t5.config.decoder_start_token_id, dtype=torch.long)
    ours, n_ours = counted(t5, lambda: seeded(lambda: generate(
        s, start, model_generation_config=model_gen_cfg(t5), **kw), seed))
    assert n_ours == n_ref, f"{n_ours} LM steps, the reference took {n_ref}"
    return ours, ref


def same(ours, ref):
    assert ours.shape == ref.shape, f"{tuple(ours.shape)} != {tuple(ref.shape)}\n{ours}\n{ref}"
    assert torch.equal(ours, ref), f"\nours {ours}\nref  {ref}"


def liked_token(model_out, T0, row=0, step=2):
    """A token the model really emits (to use as eos, so stopping and padding happen)."""
    return int(model_out[row, T0 + step])


# ---------------------------------------------------------------------------------------------
# decoder-only (OPT)
# ---------------------------------------------------------------------------------------------

def test_opt_greedy_left_padded(opt):
    ids, mask = prompts()
    same(*run_opt(opt, ids, mask, max_new_tokens=9))


@pytest.mark.parametrize("kw", [dict(), dict(max_length=13), dict(max_new_tokens=4, max_length=30)])
def test_opt_length_arguments(opt, kw):
    ids, mask = prompts(T=8)
    ours, ref = run_opt(opt, ids, mask, **kw)
    same(ours, ref)
    want = {(): 8 + 20, ("max_length",): 13, ("max_length", "max_new_tokens"): 12}[tuple(sorted(kw))]
    assert ours.shape[1] == want


def test_opt_default_length_capped_by_positions(opt):
    ids, mask = prompts(B=1, T=50, left_pad=(0,))  # 50 + 20 > max_position_embeddings 64
    ours, ref = run_opt(opt, ids, mask)
    same(ours, ref)
    assert ours.shape[1] == 64


def test_opt_prompt_too_long_raises(opt):
    ids, mask = prompts(T=8)
    with pytest.raises(ValueError):
        opt.generate(input_ids=ids, attention_mask=mask, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        generate(DecoderSession(opt, mask, input_ids=ids), ids, model_generation_config=model_gen_cfg(opt),
                 max_length=8)


@pytest.fixture(scope="module")
def opt_eos(opt):
    """(prompt, mask, eos, step): greedy decoding emits eos as new token `step` in row 0, not in row 1."""
    ids, mask = prompts(B=3, left_pad=(0, 3, 1), seed=3)
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    T0 = ids.shape[1]
    for step in range(2, 6):
        eos = liked_token(out, T0, 0, step)
        if eos not in out[0, T0:T0 + step].tolist() and eos not in out[1, T0:].tolist():
            return ids, mask, eos, step
    pytest.fail(f"no usable eos in {out[:, T0:]}")


def frequent_tokens(out, n=3):
    """The n tokens greedy decoding emits most: as eos ids they make beams finish early and often."""
    return [t for t, _ in collections.Counter(out.flatten().tolist()).most_common(n)]


@pytest.fixture(scope="module")
def opt_beam_eos(opt, opt_eos):
    ids, mask = opt_eos[:2]
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    return frequent_tokens(out[:, ids.shape[1]:])


def test_opt_greedy_eos_stops_and_pads(opt, opt_eos):
    ids, mask, eos, _ = opt_eos
    ours, ref = run_opt(opt, ids, mask, max_new_tokens=12, eos_token_id=eos)
    same(ours, ref)
    assert (ours[0] == eos).any() and (ours[0, -1] == opt.config.pad_token_id)  # row 0 stopped, padded
    # eos list; pad unset -> pads with the first eos
    same(*run_opt(opt, ids, mask, max_new_tokens=12, eos_token_id=[7, eos], pad_token_id=None))


def test_opt_min_new_tokens_and_min_length(opt, opt_eos):
    ids, mask, eos, step = opt_eos
    T0 = ids.shape[1]
    ours, ref = run_opt(opt, ids, mask, max_new_tokens=12, eos_token_id=eos, min_new_tokens=6)
    same(ours, ref)
    assert not (ours[:, T0:T0 + 6] == eos).any()
    # at the boundary: eos is allowed exactly when `step` tokens are out
    for n in (step, step + 1):
        ours, ref = run_opt(opt, ids, mask, max_new_tokens=12, eos_token_id=eos, min_new_tokens=n)
        same(ours, ref)
        assert (ours[0, T0 + step] == eos) == (n == step)
        same(*run_opt(opt, ids, mask, max_new_tokens=12, eos_token_id=eos, min_length=T0 + n))


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.7), dict(repetition_penalty=0.8),
                                dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1),
                                dict(no_repeat_ngram_size=3, repetition_penalty=1.3, num_beams=2)])
def test_opt_repetition_controls(opt, kw):
    ids, mask = prompts(seed=5)
    ours, ref = run_opt(opt, ids, mask, max_new_tokens=14, **kw)
    same(ours, ref)
    base = run_opt(opt, ids, mask, max_new_tokens=14)[0]
    assert not torch.equal(ours[:, :base.shape[1]], base) or "num_beams" in kw  # the control did something


@pytest.mark.parametrize("kw", [dict(forced_bos_token_id=9), dict(forced_eos_token_id=[4, 9]),
                                dict(suppress_tokens=[98, 112, 38]), dict(begin_suppress_tokens=[38, 99]),
                                dict(do_sample=True, renormalize_logits=True, temperature=0.6, top_k=7),
                                dict(renormalize_logits=True, repetition_penalty=3.0)])
def test_opt_other_processors(opt, opt_eos, kw):
    ids, mask, eos, _ = opt_eos
    for ids_ in (ids, ids[:, -1:]):  # forced bos acts on a one-token history
        same(*run_opt(opt, ids_, mask[:, -ids_.shape[1]:], max_new_tokens=6, eos_token_id=eos, **kw))
    same(*run_opt(opt, ids, mask, max_new_tokens=6, num_beams=2, eos_token_id=eos, **kw))


@pytest.mark.parametrize("es", [True, False, "never"])
@pytest.mark.parametrize("lp", [1.0, 0.6, -0.5, 2.0])
def test_opt_beam_search(opt, opt_eos, opt_beam_eos, es, lp):
    ids, mask, eos, _ = opt_eos
    same(*run_opt(opt, ids, mask, num_beams=3, num_return_sequences=2, length_penalty=lp,
                  early_stopping=es, max_new_tokens=10, eos_token_id=opt_beam_eos))
    same(*run_opt(opt, ids, mask, num_beams=3, num_return_sequences=2, length_penalty=lp,
                  early_stopping=es, max_new_tokens=10, eos_token_id=eos))


def test_opt_beam_search_setup_is_sensitive(opt, opt_eos, opt_beam_eos):
    """The beam tests above can tell the early-stopping modes apart (the reference's own outputs differ)."""
    ids, mask = opt_eos[:2]
    outs = [opt.generate(input_ids=ids, attention_mask=mask, num_beams=3, num_return_sequences=2,
                         early_stopping=es, max_new_tokens=10, eos_token_id=opt_beam_eos)
            for es in (True, False, "never")]
    assert len({(tuple(o.shape), tuple(o.flatten().tolist())) for o in outs}) == 3


def test_opt_beam_search_no_eos_and_max_length(opt):
    ids, mask = prompts(seed=7)
    same(*run_opt(opt, ids, mask, num_beams=4, max_length=15, eos_token_id=None))
    same(*run_opt(opt, ids, mask, num_beams=2, num_return_sequences=2, max_new_tokens=6))


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
                                dict(temperature=1.3, top_k=20, top_p=0.9, num_return_sequences=3)])
def test_opt_sampling(opt, opt_eos, kw):
    ids, mask, eos, _ = opt_eos
    for seed in (0, 1):
        same(*run_opt(opt, ids, mask, seed=seed, do_sample=True, max_new_tokens=10, eos_token_id=eos, **kw))


def test_opt_sampling_depends_on_seed(opt):
    ids, mask = prompts()
    a, _ = run_opt(opt, ids, mask, seed=0, do_sample=True, max_new_tokens=12, top_k=0)
    b, _ = run_opt(opt, ids, mask, seed=1, do_sample=True, max_new_tokens=12, top_k=0)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(top_k=10), dict(top_k=1), dict(top_p=0.05, top_k=0),
                                dict(repetition_penalty=2.0, temperature=0.5)])
def test_opt_beam_sample(opt, opt_eos, opt_beam_eos, kw):
    ids, mask, eos, _ = opt_eos
    for seed in (3, 4):  # top_k=1 / tiny top_p: beams keep len(eos) + 1 candidates anyway
        same(*run_opt(opt, ids, mask, seed=seed, do_sample=True, num_beams=3, num_return_sequences=2,
                      max_new_tokens=8, eos_token_id=opt_beam_eos[:1], **kw))


@pytest.mark.parametrize("rp", [1.6, 0.7])
def test_opt_repetition_penalty_sampled_and_beam(opt, rp):
    # sampling sees every probability, beam search applies the penalty to (negative) log-probs
    ids, mask = prompts(seed=5)
    for seed in (0, 1, 2):
        same(*run_opt(opt, ids, mask, seed=seed, do_sample=True, top_k=0, max_new_tokens=10, repetition_penalty=rp))
    same(*run_opt(opt, ids, mask, num_beams=3, max_new_tokens=10, repetition_penalty=rp))


# BLIP-2 OPT: transformers' Blip2 generate hands the LM inputs_embeds AND input_ids (same length).
def opt_embeds_case(opt, with_ids, seed=0, **kw):
    ids, mask = prompts(seed=11)
    emb = opt.get_input_embeddings()(ids).detach()
    emb[:, -3:] += torch.randn(emb[:, -3:].shape, generator=torch.Generator().manual_seed(0))  # "image" rows
    inp = dict(inputs_embeds=emb, attention_mask=mask)
    if with_ids:
        inp["input_ids"] = ids
    ref = seeded(lambda: opt.generate(**inp, **kw), seed)
    s = DecoderSession(opt, mask, inputs_embeds=emb)
    start = ids if with_ids else torch.zeros((ids.shape[0], 0), dtype=torch.long)
    ours = seeded(lambda: generate(s, start, model_generation_config=model_gen_cfg(opt),
                                   inputs_embeds_len=emb.shape[1],
                                   max_position_embeddings=opt.config.max_position_embeddings, **kw), seed)
    return ours, ref, ids.shape[1]


@pytest.mark.parametrize("kw", [dict(), dict(max_length=12), dict(max_new_tokens=5),
                                dict(max_new_tokens=9, min_length=14, eos_token_id=5)])
@pytest.mark.parametrize("with_ids", [True, False])
def test_opt_inputs_embeds_lengths(opt, with_ids, kw):
    ours, ref, T = opt_embeds_case(opt, with_ids, **kw)
    same(ours, ref)
    if kw == dict(max_length=12):  # a user max_length counts the embedded prompt either way
        assert ours.shape[1] == (12 if with_ids else 12 - T)
    if not kw:
        assert ours.shape[1] == (T + 20 if with_ids else 20)


def test_opt_inputs_embeds_beam(opt):
    same(*opt_embeds_case(opt, True, num_beams=3, max_new_tokens=6)[:2])


# ---------------------------------------------------------------------------------------------
# encoder-decoder (T5): the output starts with the decoder start token
# ---------------------------------------------------------------------------------------------

def t5_prompts():
    ids, mask = prompts(B=2, T=6, seed=21, pad=0, left_pad=(0, 0))
    mask[1, 4:] = 0  # right padding on the encoder side
    return ids, mask


@pytest.fixture(scope="module")
def t5_eos(t5):
    ids, mask = t5_prompts()
    out = t5.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    for step in range(1, 6):
        eos = int(out[0, 1 + step])
        if eos not in out[0, 1:1 + step].tolist() and eos not in out[1, 1:].tolist():
            return eos
    pytest.fail(f"no usable eos in {out}")


@pytest.fixture(scope="module")
def t5_beam_eos(t5):
    ids, mask = t5_prompts()
    return frequent_tokens(t5.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)[:, 1:])


@pytest.mark.parametrize("embeds", [False, True])
def test_t5_greedy(t5, embeds):
    ids, mask = t5_prompts()
    ours, ref = run_t5(t5, ids, mask, embeds=embeds)
    same(ours, ref)
    assert ours.shape[1] == 21 and (ours[:, 0] == t5.config.decoder_start_token_id).all()


def test_t5_eos_and_lengths(t5, t5_eos):
    ids, mask = t5_prompts()
    ours, ref = run_t5(t5, ids, mask, eos_token_id=t5_eos, max_new_tokens=9)
    same(ours, ref)
    assert (ours[0, -1] == t5.config.pad_token_id)
    same(*run_t5(t5, ids, mask, eos_token_id=t5_eos, max_length=7, min_length=5, embeds=True))
    same(*run_t5(t5, ids, mask, eos_token_id=t5_eos, max_new_tokens=9, min_new_tokens=4, no_repeat_ngram_size=2,
                 repetition_penalty=1.5))


@pytest.mark.parametrize("es", [True, False, "never"])
def test_t5_beam(t5, t5_eos, t5_beam_eos, es):
    ids, mask = t5_prompts()
    same(*run_t5(t5, ids, mask, embeds=True, num_beams=3, num_return_sequences=2, length_penalty=1.4,
                 early_stopping=es, max_new_tokens=9, eos_token_id=t5_eos))
    # pad id 0 is falsy, so the reference's beam search pads short hypotheses with eos[0], not pad
    ours, ref = run_t5(t5, ids, mask, num_beams=3, num_return_sequences=2, early_stopping=es,
                       max_new_tokens=10, eos_token_id=t5_beam_eos)
    same(ours, ref)
    if es is False:
        assert (ours[:, -1] == t5_beam_eos[0]).any()


def test_t5_sampling(t5, t5_eos):
    ids, mask = t5_prompts()
    for seed in (0, 5):
        same(*run_t5(t5, ids, mask, seed=seed, do_sample=True, temperature=0.8, top_p=0.9, top_k=30,
                     num_return_sequences=2, max_new_tokens=8, eos_token_id=t5_eos))


# ---------------------------------------------------------------------------------------------
# GenerationConfig
# ---------------------------------------------------------------------------------------------

def test_generation_config_round_trip(tmp_path):
    ref = transformers.GenerationConfig(max_new_tokens=30, num_beams=5, length_penalty=-1.0, min_length=2,
                                        eos_token_id=[2, 50118], pad_token_id=1, bos_token_id=2,
                                        repetition_penalty=1.5, custom_key={"a": [1, 2]})
    ref.save_pretrained(tmp_path / "a")
    text = (tmp_path / "a" / "generation_config.json").read_text()
    ours = GenerationConfig.from_pretrained(tmp_path / "a")
    assert ours.num_beams == 5 and ours.eos_token_id == [2, 50118] and ours.custom_key == {"a": [1, 2]}
    assert ours.max_length is None and ours.top_k is None  # unset stays unset (defaults at generate time)
    ours.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "generation_config.json").read_text() == text
    back = transformers.GenerationConfig.from_pretrained(tmp_path / "b")
    assert back.to_diff_dict() == ref.to_diff_dict()


def test_generation_config_update_and_from_model_config():
    for cls in (GenerationConfig, transformers.GenerationConfig):
        c = cls(max_length=30)
        assert c.update(num_beams=3, attention_mask=1, max_length=7) == {"attention_mask": 1}
        assert (c.num_beams, c.max_length) == (3, 7)
        assert c.update(max_length=9, top_k=4, defaults_only=True) == {"max_length": 9}
        assert (c.max_length, c.top_k) == (7, 4)
    for hf_cfg in (transformers.OPTConfig(**_cfg(OPT)), transformers.T5Config(**_cfg(T5))):
        want = transformers.GenerationConfig.from_model_config(hf_cfg).to_diff_dict()
        got = GenerationConfig.from_model_config(hf_cfg.to_dict()).to_diff_dict()
        want.pop("transformers_version")
        got.pop("transformers_version", None)
        assert got == want
    from blip2.models.config import Blip2Config

    for text in ("opt", "t5"):  # from our own config objects: the text config's special tokens
        hf_cfg = blip2_config(text)
        want = transformers.GenerationConfig.from_model_config(hf_cfg).to_diff_dict()
        got = GenerationConfig.from_model_config(Blip2Config.from_dict(hf_cfg.to_dict())).to_diff_dict()
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            assert got.get(k) == want.get(k), k
    with pytest.raises(ValueError):
        GenerationConfig(num_return_sequences=2)  # greedy cannot return several
    with pytest.raises(ValueError):
        GenerationConfig(num_beams=2, num_return_sequences=3)


def test_prepare_generation_config_priority():
    model = GenerationConfig(max_length=40, num_beams=4, eos_token_id=2)
    cfg, unused = prepare_generation_config(GenerationConfig(num_beams=2), model, prompt_len=5, top_k=3, foo=1)
    assert (cfg.max_length, cfg.num_beams, cfg.top_k, cfg.eos_token_id, cfg.temperature) == (40, 2, 3, 2, 1.0)
    assert unused == {"foo": 1}
    cfg, _ = prepare_generation_config(None, GenerationConfig(), prompt_len=5, max_position_embeddings=22)
    assert cfg.max_length == 22  # default 20 new tokens, capped


def test_unknown_and_unsupported_arguments(opt):
    ids, mask = prompts()
    s = DecoderSession(opt, mask, input_ids=ids)
    with pytest.raises(ValueError, match="not generation parameters"):
        generate(s, ids, max_new_tokens=3, not_a_parameter=1)
    with pytest.raises(NotImplementedError):
        generate(s, ids, max_new_tokens=3, do_sample=True, min_p=0.1)
    cfg, _ = prepare_generation_config(prompt_len=ids.shape[1], max_new_tokens=3)
    assert decode(DecoderSession(opt, mask, input_ids=ids), ids, cfg).shape == (2, ids.shape[1] + 3)
    assert json.loads(GenerationConfig(eos_token_id=2).to_json_string()) == {"eos_token_id": 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_opt_on_cuda(opt, opt_eos, opt_beam_eos):
    import copy

    m = copy.deepcopy(opt).cuda()
    ids, mask, eos, _ = (x.cuda() if torch.is_tensor(x) else x for x in opt_eos)
    same(*run_opt(m, ids, mask, max_new_tokens=10, eos_token_id=eos, no_repeat_ngram_size=2))
    same(*run_opt(m, ids, mask, num_beams=3, num_return_sequences=2, max_new_tokens=8, eos_token_id=opt_beam_eos))
    same(*run_opt(m, ids, mask, seed=1, do_sample=True, top_p=0.9, max_new_tokens=8, eos_token_id=eos))
