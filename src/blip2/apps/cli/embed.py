"""`blip2 embed PATH... [--text TEXT...] -o FILE`: image embeddings (the projected query vectors of a
retrieval checkpoint, else the Q-Former's output) and text embeddings to .npy or .parquet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import Blip2Model, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from ..jobs import cli as jobs_cli
from .common import DEFAULT_ITM_MODEL, UsageError, args_model_dir, fit_texts, has_keys, load, pixels, short, text_ids
from .inputs import Report, batches, expand_inputs, load_images
from .sink import dumps, writable, write_atomic


def run(args: argparse.Namespace) -> int:
    if args.ray:  # a dataset job on Ray Data (apps/jobs)
        return jobs_cli.run(args)
    out = Path(args.output)
    fmt = out.suffix.lower()
    if fmt not in (".npy", ".parquet"):
        raise UsageError(f"--output {out}: use a .npy or .parquet file name")
    if fmt == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--output .parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow), or write .npy instead") from None
    writable(out)  # before any work
    d = args_model_dir(args)
    srcs, bad = expand_inputs(args.paths) if args.paths else ([], [])
    texts = list(dict.fromkeys(args.text or []))
    if not srcs and not bad and not texts:
        raise UsageError("nothing to embed: give image paths and/or --text")
    with Report(len(srcs), bad) as rep:
        retrieval = has_keys(d, "vision_projection.")
        if texts and not retrieval:
            raise UsageError(f"text embeddings need a retrieval checkpoint with a text projection "
                             f"(e.g. {DEFAULT_ITM_MODEL}); {args.model} has none")
        results: dict[str, tuple[list[str], Any]] = {}
        if srcs:
            model, proc = load(args, Blip2VisionModelWithProjection if retrieval else Blip2Model)
            ids, vecs = [], []
            for chunk in batches(srcs, args.batch_size):
                imgs = load_images(chunk, rep)
                if imgs:
                    pv = pixels(proc, [im for _, im in imgs], model)
                    with torch.inference_mode():
                        e = model(pixel_values=pv).image_embeds if retrieval else model.get_qformer_features(pv)
                    vecs.append(e.float().cpu().numpy())  # (B, Q, E)
                    ids += [s for s, _ in imgs]
                rep.step(len(chunk))
            if ids:
                results["image"] = (ids, np.concatenate(vecs))
        if texts:
            model, proc = load(args, Blip2TextModelWithProjection)
            texts, too_long = fit_texts(proc, model.config.qformer_config.max_position_embeddings, texts, args.truncate)
            for t, why in too_long:
                rep.fail(f"--text {short(t)}", why)
            vecs = []
            for chunk in batches(texts, args.batch_size):
                input_ids, am = text_ids(proc, model, chunk)  # (B, L)
                with torch.inference_mode():
                    e = model(input_ids=input_ids, attention_mask=am).text_embeds[:, 0]
                vecs.append(e.float().cpu().numpy())  # (B, E): the [CLS] token's, as ITC uses
            if texts:
                results["text"] = (texts, np.concatenate(vecs))
        for p in _write_embeddings(out, results, args):
            print(f"blip2: wrote {p}", file=sys.stderr)
        return rep.finish(len(srcs) + len(bad) + len(args.text or []))


def _write_embeddings(out: Path, results: dict, args: argparse.Namespace) -> list[Path]:
    """.npy: one array per kind (FILE, or FILE.image.npy / FILE.text.npy when both) with a .json
    sidecar of ids; .parquet: one row per id with kind, shape and the flattened vector. Each file is
    written whole beside its name and renamed over it."""
    written = []
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa  # optional: only .parquet needs it
        import pyarrow.parquet as pq

        cols: dict[str, list] = {"id": [], "kind": [], "shape": [], "embedding": []}
        for kind, (ids, a) in results.items():
            for i, v in zip(ids, a):
                cols["id"].append(i)
                cols["kind"].append(kind)
                cols["shape"].append(list(v.shape))
                cols["embedding"].append(v.reshape(-1).tolist())
        write_atomic(out, lambda fh: pq.write_table(pa.table(cols), fh))
        return [out]
    for kind, (ids, a) in results.items():
        p = out if len(results) == 1 else out.with_name(f"{out.stem}.{kind}.npy")
        write_atomic(p, lambda fh: np.save(fh, a))
        side = p.with_suffix(".json")
        text = dumps({"kind": kind, "ids": ids, "shape": list(a.shape), "model": args.model}, indent=2) + "\n"
        write_atomic(side, lambda fh: fh.write(text.encode("utf-8")))
        written += [p, side]
    return written
