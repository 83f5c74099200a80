"""The two stages of a job's pipeline: `decode_batch` (a Ray task: open and preprocess images) and the
model actors (callable classes for `map_batches`: the model is loaded once per actor, then each
batch of pixels is captioned, answered or embedded with the CLI's own code paths).

Batches are dicts of numpy arrays (Ray Data's "numpy" format). A row that failed earlier keeps
its `error` and zero pixels; actors pass it through untouched, so a bad image never fails a job."""

from __future__ import annotations

import argparse
import functools
import os
import socket
from typing import Any

import numpy as np
import torch

from ... import (
    Blip2ForConditionalGeneration, Blip2Model, Blip2Processor, Blip2VisionModelWithProjection, ImageLoadError,
)
from ..cli.common import TooLong, decode, fit_prompt, gen_kwargs, load, model_dir, unusable
from ..cli.common import has_keys
from .inputs import load_source

Batch = dict[str, np.ndarray]


@functools.lru_cache(maxsize=4)
def processor(model: str, demo_kind: str) -> Blip2Processor:
    """The checkpoint's processor, read once per worker process."""
    d = model_dir(model, demo_kind)
    try:
        return Blip2Processor.from_pretrained(d)
    except Exception as e:
        raise unusable(d, e, "the tokenizer / processor files") from e


def decode_batch(batch: Batch, model: str, demo_kind: str) -> Batch:
    """Open each row's image and preprocess it as the model's processor does: adds `pixel_values`
    (B, 3, H, W) float32; a row whose image cannot be read gets zeros and its `error`."""
    ip = processor(model, demo_kind).image_processor
    n = len(batch["id"])
    err = np.array([str(e) for e in batch["error"]], dtype=object)
    pix = None
    for i in range(n):
        if err[i]:
            continue
        try:
            img = load_source(str(batch["source"][i]), int(batch["offset"][i]), int(batch["size"][i]))
            a = ip(img, return_tensors="np")["pixel_values"][0]  # (3, H, W)
        except (ImageLoadError, OSError) as e:
            err[i] = " ".join(str(e).split()) or type(e).__name__
            continue
        if pix is None:
            pix = np.zeros((n, *a.shape), dtype=np.float32)
        pix[i] = a
    if pix is None:  # nothing in the batch opened: any shape will do, the actors skip these rows
        size = ip.size
        h, w = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        pix = np.zeros((n, 3, h, w), dtype=np.float32)
    return {**batch, "error": err, "pixel_values": pix}


class _ModelActor:
    """Loads `cls` from `model` once (the CLI's loader: --device, --dtype, --quantize), with `threads`
    torch threads; `opts` are the command's options (as the CLI's argparse names them)."""

    cls: Any = None

    def __init__(self, model: str, demo_kind: str, opts: dict, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.args = argparse.Namespace(model=model, demo_kind=demo_kind, **opts)
        self.model, self.proc = load(self.args, self.model_class())
        import ray

        # which node and process made a row: shows how a job spread, and names the process to kill in tests
        self.worker = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"

    def model_class(self) -> type:
        return self.cls

    def __call__(self, batch: Batch) -> Batch:
        err = np.array([str(e) for e in batch["error"]], dtype=object)
        ok = np.flatnonzero(err == "")
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        out["error"] = err
        out["worker"] = np.array([self.worker] * len(err), dtype=object)
        pv = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][ok])) if len(ok) else None
        with torch.inference_mode():
            self.run(out, ok, pv)
        return out

    def run(self, out: Batch, ok: np.ndarray, pv: torch.Tensor | None) -> None:
        raise NotImplementedError


class Captioner(_ModelActor):
    """Adds `text` (the caption) and, with num_captions > 1, `captions` (all of them)."""

    cls = Blip2ForConditionalGeneration

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.prompt_ids, _ = fit_prompt(self.proc, self.model, self.args, self.args.prompt or "")
        self.kw = gen_kwargs(self.args)

    def run(self, out: Batch, ok: np.ndarray, pv: torch.Tensor | None) -> None:
        n = self.args.num_captions
        texts = np.array([None] * len(out["id"]), dtype=object)
        alls = np.array([None] * len(out["id"]), dtype=object)
        if pv is not None:
            pv = pv.to(self.model.device, self.model.dtype)  # (B, 3, H, W)
            prompt = mask = None
            if self.args.prompt:
                prompt = torch.tensor([self.prompt_ids] * len(ok), device=self.model.device)  # (B, Q+T)
                mask = torch.ones_like(prompt)
            gen = self.model.generate(pv, input_ids=prompt, attention_mask=mask, **self.kw)
            got = decode(self.proc, self.model, gen, len(self.prompt_ids))
            for j, i in enumerate(ok):
                texts[i] = got[j * n]
                alls[i] = got[j * n:(j + 1) * n]
        out["text"] = texts
        if n > 1:
            out["captions"] = alls


class Asker(_ModelActor):
    """Adds `answers`, one per question: the row's own questions, then those of the command line;
    each image is encoded once and its questions decoded as one batch (`generate_many`)."""

    cls = Blip2ForConditionalGeneration

    def run(self, out: Batch, ok: np.ndarray, pv: torch.Tensor | None) -> None:
        B = len(out["id"])
        qs_all = np.array([None] * B, dtype=object)
        answers = np.array([None] * B, dtype=object)
        kw = gen_kwargs(self.args)
        for j, i in enumerate(ok):
            qs = list(dict.fromkeys([*map(str, out["questions"][i]), *self.args.questions]))
            qs_all[i] = qs
            if not qs:
                out["error"][i] = "no question: give a question column or questions on the command line"
                continue
            fitted, failed = [], []
            for q in qs:
                try:
                    fitted.append(fit_prompt(self.proc, self.model, self.args, q, self.args.template)[0])
                except TooLong as e:
                    failed.append(f"question {q!r}: {e}")
                    fitted.append(None)
            got = self.model.generate_many(pv[j:j + 1].to(self.model.device, self.model.dtype),
                                           [f for f in fitted if f is not None], **kw) if len(failed) < len(qs) else []
            it = iter(got)
            answers[i] = [None if f is None else decode(self.proc, self.model, next(it), len(f))[0] for f in fitted]
            if failed:
                out["error"][i] = "; ".join(failed)
        out["questions"] = qs_all
        out["answers"] = answers


class Embedder(_ModelActor):
    """Adds `embedding` (B, Q, E): a retrieval checkpoint's projected, normalised query vectors
    (Blip2VisionModelWithProjection.image_embeds), else the Q-Former's output, as `blip2 embed`."""

    def model_class(self) -> type:
        self.retrieval = has_keys(model_dir(self.args.model, self.args.demo_kind), "vision_projection.")
        return Blip2VisionModelWithProjection if self.retrieval else Blip2Model

    def run(self, out: Batch, ok: np.ndarray, pv: torch.Tensor | None) -> None:
        c = self.model.config
        dim = c.image_text_hidden_size if self.retrieval else c.qformer_config.hidden_size
        emb = np.zeros((len(out["id"]), c.num_query_tokens, dim), dtype=np.float32)  # (B, Q, E)
        if pv is not None:
            pv = pv.to(self.model.device, self.model.dtype)
            e = self.model(pixel_values=pv).image_embeds if self.retrieval else self.model.get_qformer_features(pv)
            emb[ok] = e.float().cpu().numpy()
        out["embedding"] = emb


ACTORS = {"caption": Captioner, "ask": Asker, "embed": Embedder}
