"""`blip2 ask IMAGE QUESTION...`: the image encoded once, the questions decoded --batch-size at a time
with `generate_many`; each question is put in --template. A question that does not fit the model
fails alone: the others are answered."""

from __future__ import annotations

import argparse

import torch

from ... import Blip2ForConditionalGeneration, ImageLoadError
from ..jobs import cli as jobs_cli
from .common import (
    TooLong, UsageError, args_model_dir, check_template, decode, fit_prompt, gen_kwargs, load, options, pixels, short,
)
from .inputs import Report, batches, open_image
from .sink import Sink


def run(args: argparse.Namespace) -> int:
    if args.ray:  # a dataset job on Ray Data (apps/jobs)
        return jobs_cli.run(args)
    if not args.questions:
        raise UsageError("give at least one QUESTION (or --ray with a table that has a question column)")
    check_template(args.template)
    args_model_dir(args)
    questions = list(dict.fromkeys(args.questions))  # a question asked twice is answered once
    with Sink(args, fields=("question",), text=lambda r: f"Q: {r['question']}\nA: {r['text']}") as sink:
        todo = [q for q in questions if not sink.has(args.image, q)]
        with Report() as rep:
            if todo:
                _ask(args, todo, sink, rep)
            return rep.finish(1 + len(questions))


def _ask(args: argparse.Namespace, todo: list[str], sink: Sink, rep: Report) -> None:
    try:
        img = open_image(args.image)
    except (ImageLoadError, OSError) as e:
        rep.fail(args.image, str(e))
        return
    model, proc = load(args, Blip2ForConditionalGeneration)
    kw = gen_kwargs(args)
    opts = options(args)
    fitted = []  # (question, prompt ids, whether --truncate cut it)
    for q in todo:
        try:
            ids, used = fit_prompt(proc, model, args, q, args.template)
            fitted.append((q, ids, used != q))
        except TooLong as e:
            rep.fail(f"question {short(q)}", str(e))
    with torch.inference_mode():
        pv = pixels(proc, [img], model)  # (1, 3, H, W)
        for chunk in batches(fitted, args.batch_size):
            # one batch per chunk: the image encoded once, the template's shared start run once
            outs = model.generate_many(pv, [ids for _, ids, _ in chunk], **kw)
            for (q, ids, cut), out in zip(chunk, outs):
                texts = decode(proc, model, out, len(ids))
                rec = {"path": args.image, "question": q, "text": texts[0], "options": opts}
                if len(texts) > 1:
                    rec["answers"] = texts
                if cut:
                    rec["truncated"] = True
                sink.add(rec)
