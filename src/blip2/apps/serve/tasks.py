"""What chat cannot express, run on the model thread between two decode steps (Scheduler.call):
captions of several images (beam search, several captions each), several questions about one
image (`generate_many`: the image encoded once), image-text matching and embeddings (the
retrieval checkpoint), and search in an index (`blip2 index`'s SearchIndex). They call the library
as the CLI's commands do and reuse their helpers."""

from __future__ import annotations

import argparse

import torch

from ...generation import special_tokens
from ...models.base import itc_embedding
from ..cli.common import TooLong, UsageError, decode, fit_prompt, fit_texts, gen_kwargs, prompt_ids, text_ids
from ..cli.match import _score


class TaskError(ValueError):
    """A request the model cannot serve as asked (a prompt too long...): a 400."""


def _options(max_tokens: int, num_beams, temperature, top_p, n: int = 1) -> argparse.Namespace:
    # temperature 0 means greedy, as in chat
    t = temperature if temperature else None
    return argparse.Namespace(max_new_tokens=max_tokens, num_beams=num_beams, temperature=t, top_p=top_p,
                              num_captions=n, truncate=False)


def _fit(proc, model, args, text: str, fmt: str = "{}") -> list[int]:
    try:
        return fit_prompt(proc, model, args, text, fmt)[0]
    except (TooLong, UsageError) as e:
        raise TaskError(str(e)) from None


def _completion_tokens(out: torch.Tensor, eos) -> int:
    """New tokens up to and with each row's first EOS (the rest is padding)."""
    n = 0
    for row in out.tolist():
        n += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return n


def caption(model, proc, pv: torch.Tensor, prompt: str | None, max_tokens: int, num_beams, temperature, top_p,
            n: int, seed: int | None) -> tuple[list[list[str]], int, int]:
    """pv (B, 3, H, W) -> (n captions per image, prompt tokens, completion tokens)."""
    args = _options(max_tokens, num_beams, temperature, top_p, n)
    kw = gen_kwargs(args)
    B = pv.shape[0]
    ids = am = None
    plen = model.config.num_query_tokens + 1
    if prompt:
        plen = len(_fit(proc, model, args, prompt))
        ids, am = prompt_ids(proc, model, [prompt] * B)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        out = model.generate(pv, ids, am, **kw)  # (B * n, L)
    except (ValueError, NotImplementedError) as e:
        raise TaskError(str(e)) from None
    texts = decode(proc, model, out, ids.shape[1] if ids is not None else plen)
    start = plen if model.config.use_decoder_only_language_model else 1
    used = _completion_tokens(out[:, start:], set(special_tokens(model.generation_config)[0] or []))
    k = len(texts) // B
    return [texts[i * k : (i + 1) * k] for i in range(B)], plen * B, used


def ask(model, proc, pv: torch.Tensor, questions: list[str], template: str, max_tokens: int, num_beams,
        temperature, top_p, seed: int | None) -> tuple[list[str], int, int]:
    """pv (1, 3, H, W) -> (one answer per question, prompt tokens, completion tokens)."""
    args = _options(max_tokens, num_beams, temperature, top_p)
    rows = [_fit(proc, model, args, q, template) for q in questions]
    if seed is not None:
        torch.manual_seed(seed)
    try:
        outs = model.generate_many(pv, rows, **gen_kwargs(args))
    except (ValueError, NotImplementedError) as e:
        raise TaskError(str(e)) from None
    answers = [decode(proc, model, o, len(r))[0] for o, r in zip(outs, rows)]
    start = (lambda r: len(r)) if model.config.use_decoder_only_language_model else (lambda r: 1)
    used = sum(o.shape[1] - start(r) for o, r in zip(outs, rows))
    return answers, sum(map(len, rows)), used


def match(model, proc, images: list, texts: list[str]) -> list[dict]:
    """ITM probability and ITC similarity of every image with every text: records with the image's
    index, the text, "itm" and "itc"."""
    ok, bad = fit_texts(proc, model.config.qformer_config.max_position_embeddings, texts, truncate=False)
    if bad:
        raise TaskError(f"texts[{texts.index(bad[0][0])}]: {bad[0][1]}")
    ids, am = text_ids(proc, model, ok)  # (T, L)
    return _score(model, proc, [(i, im) for i, im in enumerate(images)], ok, ids, am)


def embed(model, proc, pv: torch.Tensor | None, texts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Image embeddings (N, Q, E) (one vector per query; a text's ITC similarity is the best query's
    dot product) and text embeddings (T, E) of a retrieval checkpoint, normalised as ITC uses them."""
    img = txt = None
    if pv is not None:
        q = model.query_image(model.vision_model(pixel_values=pv).last_hidden_state).last_hidden_state
        img = itc_embedding(model.vision_projection, q)  # (N, Q, E)
    if texts:
        ok, bad = fit_texts(proc, model.config.qformer_config.max_position_embeddings, texts, truncate=False)
        if bad:
            raise TaskError(f"input: {bad[0][1]}")
        ids, am = text_ids(proc, model, ok)
        h = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=am).last_hidden_state
        txt = itc_embedding(model.text_projection, h[:, 0])  # (T, E): the [CLS] token's
    return img, txt


def search(index, text: str | None, image, k: int, rerank: int) -> list[dict]:
    """The k best images of `index` (a SearchIndex) for a text (ITC, then ITM re-ranks the best
    max(k, rerank)) or an image (a PIL image; ITC): its hits, best first."""
    try:
        return index.search(text=text, image=image, k=k, rerank=rerank)
    except UsageError as e:  # e.g. a text query on an index of features without ITC projections
        raise TaskError(str(e)) from None
