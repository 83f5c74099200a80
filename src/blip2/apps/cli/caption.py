"""`blip2 caption PATH...`: a caption (or --num-captions of them) for every image, batched; a re-run
with the same --output skips the images already in it."""

from __future__ import annotations

import argparse
import sys

import torch

from ... import Blip2ForConditionalGeneration
from ..jobs import cli as jobs_cli
from .common import (
    TooLong, UsageError, args_model_dir, decode, fit_prompt, gen_kwargs, load, options, pixels, short,
)
from .inputs import Report, batches, expand_inputs, load_images
from .sink import Sink


def _text(rec: dict) -> str:
    return f"{rec['path']}: {rec['text']}" + "".join(f"\n    {c}" for c in rec.get("captions", [])[1:])


def run(args: argparse.Namespace) -> int:
    if args.ray:  # a dataset job on Ray Data (apps/jobs)
        return jobs_cli.run(args)
    args_model_dir(args)  # an unusable --model fails first, before any input is read
    srcs, bad = expand_inputs(args.paths)
    with Sink(args, fields=(), text=_text) as sink:
        todo = [s for s in srcs if not sink.has(s)]
        if len(todo) < len(srcs):
            print(f"blip2: {len(srcs) - len(todo)} image(s) already in {sink.path}, skipping them", file=sys.stderr)
        with Report(len(todo), bad) as rep:
            if todo:
                _caption(args, todo, sink, rep)
            return rep.finish(len(srcs) + len(bad))


def _caption(args: argparse.Namespace, todo: list[str], sink: Sink, rep: Report) -> None:
    model, proc = load(args, Blip2ForConditionalGeneration)
    try:  # the prompt (or, without one, --max-new-tokens) must fit the language model
        ids, used = fit_prompt(proc, model, args, args.prompt or "")
    except TooLong as e:
        raise UsageError(f"--prompt {short(args.prompt)}: {e}") from None
    if args.prompt and used != args.prompt:
        print(f"blip2: warning: --prompt cut to {short(used, 80)} to fit the model", file=sys.stderr)
    kw = gen_kwargs(args)
    n = args.num_captions
    opts = options(args)
    for chunk in batches(todo, args.batch_size):
        imgs = load_images(chunk, rep)
        if imgs:
            pv = pixels(proc, [im for _, im in imgs], model)  # (B, 3, H, W)
            prompt = mask = None  # no prompt: the model starts from the image queries and BOS
            if args.prompt:
                prompt = torch.tensor([ids] * len(imgs), device=model.device)  # (B, Q+T), one prompt for all
                mask = torch.ones_like(prompt)
            with torch.inference_mode():
                out = model.generate(pv, input_ids=prompt, attention_mask=mask, **kw)
            texts = decode(proc, model, out, len(ids))
            for i, (s, _) in enumerate(imgs):
                mine = texts[i * n:(i + 1) * n]
                rec = {"path": s, "text": mine[0], "options": opts}
                if n > 1:
                    rec["captions"] = mine
                sink.add(rec)
        rep.step(len(chunk))
