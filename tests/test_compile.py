"""Compiled decoding (`generate(..., compile=True)`) gives the same greedy ids as eager decoding.

One tiny OPT BLIP-2; the decode step is compiled once (about 25 s with inductor's C++ backend on
2 cores when inductor's on-disk cache is cold, a few seconds when warm), then reused for every
call with the same number of rows: compiled sessions round their KV cache up to 64 positions.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import blip2_config, save_hf

from blip2.models.blip2 import Blip2ForConditionalGeneration

pytestmark = pytest.mark.slow  # torch.compile


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tiny_opt")
    # word_embed_proj_dim = hidden_size, as BLIP-2 needs; an EOS distinct from BOS
    save_hf("Blip2ForConditionalGeneration",
            blip2_config("opt", text_config=dict(word_embed_proj_dim=32, eos_token_id=50)), d, seed=3)
    m = Blip2ForConditionalGeneration.from_pretrained(d).eval()
    with torch.no_grad():  # O(1) tied embeddings make greedy repeat the current token: shrink them
        m.language_model.get_input_embeddings().weight.mul_(0.1)
    yield m
    torch.set_num_threads(n)


def _prompt(m, rows: list[list[int]]):
    """Image placeholders + BOS + text ids, left padded to the longest row."""
    c = m.config
    pre = [c.image_token_index] * c.num_query_tokens + [c.text_config.bos_token_id]
    T = max(len(r) for r in rows) + len(pre)
    ids = torch.full((len(rows), T), c.text_config.pad_token_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(pre) - len(r):] = torch.tensor(pre + r)
        am[i, T - len(pre) - len(r):] = 1
    return ids, am


def test_compiled_greedy_matches_eager(model):
    c = model.config.vision_config
    px = torch.randn(2, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    ids, am = _prompt(model, [[5, 17, 33], [8]])  # row 1 is left padded
    runs = [
        dict(pixel_values=px, max_new_tokens=14, min_new_tokens=14),  # no prompt: placeholders + BOS
        dict(pixel_values=px, input_ids=ids, attention_mask=am, max_new_tokens=9),  # eos may end rows
        dict(pixel_values=px, max_new_tokens=5, repetition_penalty=1.5),  # processors stay eager
        # beam search reorders the cache rows between compiled steps; 1 image x 2 beams = 2 rows,
        # the batch size of the calls above, so it reuses their graph
        dict(pixel_values=px[:1], max_new_tokens=8, num_beams=2, length_penalty=0.5),
    ]
    seen = set()
    for kw in runs:
        eager = model.generate(**kw)
        comp = model.generate(**kw, compile=True)
        assert comp.tolist() == eager.tolist(), kw
        seen.update(eager[:, -5:].flatten().tolist())
    assert len(seen) > 3, "degenerate decoding: the comparison would not test much"
    # several questions about one image: 2 rows (the graph above), their shared prefix prefilled once
    pre = [model.config.image_token_index] * model.config.num_query_tokens + [model.config.text_config.bos_token_id]
    qs = [pre + [5, 17, 33], pre + [8]]
    eager = model.generate_many(px[:1], qs, max_new_tokens=9)
    comp = model.generate_many(px[:1], qs, max_new_tokens=9, compile=True)
    assert [x.tolist() for x in comp] == [x.tolist() for x in eager]


def test_compile_is_not_saved(model, tmp_path):
    from blip2.generation import GenerationConfig

    g = GenerationConfig(max_new_tokens=3, compile=True)
    g.save_pretrained(tmp_path)
    assert "compile" not in (tmp_path / "generation_config.json").read_text()
