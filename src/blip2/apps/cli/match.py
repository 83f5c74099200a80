"""`blip2 match IMAGE... --text TEXT...`: the ITM match probability and the ITC similarity of every
image with every text, as a table or as records."""

from __future__ import annotations

import argparse

import torch

from ... import Blip2ForImageTextRetrieval
from .common import args_model_dir, fit_texts, load, pixels, short, text_ids
from .inputs import Report, batches, expand_inputs, load_images
from .sink import Sink


def run(args: argparse.Namespace) -> int:
    args_model_dir(args)
    srcs, bad = expand_inputs(args.images)
    texts = list(dict.fromkeys(args.text))
    rows: list[dict] = []
    with Sink(args, fields=("text",), text=None) as sink, Report(len(srcs), bad) as rep:
        if srcs:
            model, proc = load(args, Blip2ForImageTextRetrieval)
            texts, too_long = fit_texts(proc, model.config.qformer_config.max_position_embeddings, texts, args.truncate)
            for t, why in too_long:
                rep.fail(f"--text {short(t)}", why)
            if texts:
                ids, am = text_ids(proc, model, texts)  # (T, L)
                for chunk in batches(srcs, args.batch_size):
                    new = _score(model, proc, load_images(chunk, rep), texts, ids, am)
                    rows += new
                    for r in new:
                        if not sink.has(r["path"], r["text"]):
                            sink.add(r)
                    rep.step(len(chunk))
        if sink.fmt == "text":
            _print_table(rows)
        return rep.finish(len(srcs) + len(bad) + len(args.text))


def _score(model, proc, imgs: list, texts: list[str], ids: torch.Tensor, am: torch.Tensor) -> list[dict]:
    """A record for every (image, text): ITM p(match) and ITC similarity."""
    if not imgs:
        return []
    pv = pixels(proc, [im for _, im in imgs], model)  # (B, 3, H, W)
    B, T = pv.shape[0], len(texts)
    with torch.inference_mode():
        itc = model(pixel_values=pv, input_ids=ids, attention_mask=am).logits_per_image  # (B, T)
        # ITM scores one (image, text) pair per row: every image with every text.
        itm = model(pixel_values=pv.repeat_interleave(T, 0), input_ids=ids.repeat(B, 1),
                    attention_mask=am.repeat(B, 1), use_image_text_matching_head=True).logits_per_image
        p = itm.float().softmax(-1)[:, 1].view(B, T)
    return [{"path": s, "text": t, "itm": float(p[i, j]), "itc": float(itc[i, j])}
            for i, (s, _) in enumerate(imgs) for j, t in enumerate(texts)]


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    pw = min(max(len("image"), *(len(r["path"]) for r in rows)), 60)
    tw = min(max(len("text"), *(len(r["text"]) for r in rows)), 60)
    print(f"{'image':<{pw}}  {'text':<{tw}}  {'ITM p(match)':>12}  {'ITC sim':>8}")
    for r in rows:
        print(f"{r['path'][-pw:]:<{pw}}  {r['text'][:tw]:<{tw}}  {r['itm']:>12.4f}  {r['itc']:>8.4f}")
