"""The demo model's quality on held-out scenes: captions (exact, and parsed back into objects), VQA
by question kind, ITC text-to-image retrieval and ITM for each way of phrasing (phrasing.py), the
captions of the style-shift split; and what bf16 / int8 / int4 change."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ...models.blip2 import Blip2ForConditionalGeneration
from ...models.retrieval import Blip2ForImageTextRetrieval
from ...processing.processor import Blip2Processor
from . import phrasing, scenes
from .shipped import HELDOUT_SEED, QA_PROMPT, demo_checkpoint

_GROUP = re.compile(r"\b(a|one|two|three) (large|small) (" + "|".join(scenes.ALL_COLORS) + ") ("
                    + "|".join(scenes.ALL_SHAPES) + ")s?\\b")
SHIFT_SEED = HELDOUT_SEED + 3  # the style-shift split (scenes.SHIFT_STYLE)
MAIN_VQA = ("color", "shape", "count")
TARGETS = {  # issue 20's targets on held-out scenes: figure -> the least it should be
    "caption_exact": 0.95, "caption_objects_correct": 0.98,
    "vqa_size": 0.90, "vqa_color": 0.97, "vqa_shape": 0.97, "vqa_count": 0.97, "vqa_yesno": 0.90, "vqa_where": 0.90,
    **{f"itc_r1_{f}": 0.90 for f in phrasing.FAMILIES}, **{f"itm_{f}": 0.95 for f in phrasing.FAMILIES},
    "style_shift_caption_objects_correct": 0.90,
}


def targets_met(figures: dict) -> dict[str, bool]:
    """Which of TARGETS the figures reach (figures missing from them count as not reached)."""
    return {k: figures.get(k, -1) >= v for k, v in TARGETS.items()}


def parse_caption(text: str) -> Counter:
    """Count of (colour, shape) named by a caption."""
    n = {"a": 1, "one": 1, "two": 2, "three": 3}
    c: Counter = Counter()
    for num, _, color, shape in _GROUP.findall(text):
        c[(color, shape)] += n[num]
    return c


def objects_right(text: str, s: scenes.Scene) -> bool:
    """Does the caption name every object's colour and shape (and nothing else)?"""
    return parse_caption(text) == Counter((o.color, o.shape) for o in s.objects)


def question_type(q: str) -> str:
    if q.startswith("how many"):
        return "count"
    if q.startswith("is there"):
        return "yesno"
    return "where" if q.startswith("where") else q.split()[1]  # color / size / shape


@torch.no_grad()
def generate_captions(model, proc, images: list, batch: int = 50) -> list[str]:
    """Greedy captions (no prompt), in the model's dtype."""
    out = []
    for i in range(0, len(images), batch):
        inp = proc(images=images[i:i + batch], return_tensors="pt").to(dtype=model.dtype)
        ids = model.generate(**inp, max_new_tokens=30, num_beams=1, do_sample=False)
        out += [t.strip() for t in proc.batch_decode(ids, skip_special_tokens=True)]
    return out


def caption_figures(caps: list[str], scs: list[scenes.Scene], prefix: str = "caption") -> dict:
    n = len(scs)
    return {f"{prefix}_objects_correct": sum(objects_right(c, s) for c, s in zip(caps, scs)) / n,
            f"{prefix}_exact": sum(c == scenes.caption(s) for c, s in zip(caps, scs)) / n}


@torch.no_grad()
def vqa_answers(model, proc, scs: list[scenes.Scene], images: list, batch: int = 50) -> list[tuple[str, str, str]]:
    """(question, right answer, greedy answer) for every question of every scene."""
    out = []
    for i in range(0, len(scs), batch):
        qs = [(j, q, a) for j in range(i, min(len(scs), i + batch)) for q, a in scenes.questions(scs[j])]
        inp = proc(images=[images[j] for j, _, _ in qs], text=[QA_PROMPT.format(q=q) for _, q, _ in qs],
                   return_tensors="pt", padding=True).to(dtype=model.dtype)
        ids = model.generate(**inp, max_new_tokens=4, num_beams=1, do_sample=False)
        L = inp["input_ids"].shape[1]
        got = proc.batch_decode(ids[:, L:], skip_special_tokens=True)  # OPT returns prompt + new tokens
        out += [(q, a, g.strip()) for (_, q, a), g in zip(qs, got)]
    return out


def vqa_figures(answers: list[tuple[str, str, str]]) -> dict:
    right: Counter = Counter()
    total: Counter = Counter()
    for q, a, got in answers:
        total[question_type(q)] += 1
        right[question_type(q)] += got == a
    out = {f"vqa_{t}": right[t] / total[t] for t in sorted(total)}
    out["vqa_color_shape_count"] = sum(right[t] for t in MAIN_VQA) / sum(total[t] for t in MAIN_VQA)
    return out


@torch.no_grad()
def retrieval_figures(ret, rproc, scs: list[scenes.Scene], images: list, family: str, split: str = "held",
                      seed: int = HELDOUT_SEED, batch: int = 50) -> tuple[float, float]:
    """(ITC text -> image recall@1 among groups of 100 images, ITM accuracy) for texts of one
    phrasing family. A hit: the top image is one the text is true of. ITM: each image with a
    text true of it (p > 0.5 wanted) and one false of it, from another scene (p < 0.5)."""
    rng = random.Random(seed)
    n = len(scs)
    texts = [phrasing.describe(s, rng, family, split) for s in scs]
    hits = trials = 0
    G = min(100, n)
    for i in range(0, n - G + 1, G):
        inp = rproc(images=images[i:i + G], text=[t for t, _ in texts[i:i + G]], return_tensors="pt", padding=True)
        top = ret(**inp, use_image_text_matching_head=False).logits_per_text.argmax(dim=1)  # (G texts,)
        hits += sum(phrasing.holds(texts[i + k][1], scs[i + int(j)]) for k, j in enumerate(top))
        trials += G
    g = np.random.default_rng(seed)
    wrong = []
    for k in range(n):
        j = int(g.integers(n))
        while phrasing.holds(texts[j][1], scs[k]):
            j = int(g.integers(n))
        wrong.append(texts[j][0])
    correct = 0
    for i in range(0, n, batch):
        for tx, want in (([t for t, _ in texts[i:i + batch]], 1), (wrong[i:i + batch], 0)):
            inp = rproc(images=images[i:i + batch], text=tx, return_tensors="pt", padding=True)
            p = ret(**inp, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
            correct += int(((p > 0.5).long() == want).sum())
    return hits / trials, correct / (2 * n)


@torch.no_grad()
def evaluate(captioning_dir: str | Path | None = None, retrieval_dir: str | Path | None = None, n: int = 200,
             seed: int = HELDOUT_SEED, batch: int = 50, dtype: torch.dtype = torch.float32,
             quantize: str | None = None, retrieval: bool = True) -> dict:
    """The quality figures on n held-out scenes (fixed seed) and n of the style-shift split, greedy
    decoding; fp32 unless dtype / quantize (the captioning model's language model) say otherwise."""
    cap_dir = Path(captioning_dir) if captioning_dir else demo_checkpoint("captioning")
    ret_dir = Path(retrieval_dir) if retrieval_dir else demo_checkpoint("retrieval")
    scs = scenes.dataset(n, seed=seed)
    images = [scenes.render(s) for s in scs]
    shift = scenes.dataset(n, seed=SHIFT_SEED, style=scenes.SHIFT_STYLE)
    out: dict = {"scenes": n, "seed": seed}

    model = Blip2ForConditionalGeneration.from_pretrained(cap_dir, dtype=dtype, quantize=quantize)
    proc = Blip2Processor.from_pretrained(cap_dir)
    caps = generate_captions(model, proc, images, batch)
    out["captions"] = caps
    out.update(caption_figures(caps, scs))
    out.update(vqa_figures(vqa_answers(model, proc, scs, images, batch)))
    out.update(caption_figures(generate_captions(model, proc, [scenes.render(s) for s in shift], batch), shift,
                               "style_shift_caption"))
    del model
    if retrieval:
        ret = Blip2ForImageTextRetrieval.from_pretrained(ret_dir, dtype=torch.float32)
        rproc = Blip2Processor.from_pretrained(ret_dir)
        for family in phrasing.FAMILIES:
            for split in ("held", "train") if family in ("partial", "paraphrase") else ("held",):
                r1, itm = retrieval_figures(ret, rproc, scs, images, family, split, seed, batch)
                tag = family + ("_seen" if split == "train" else "")
                out[f"itc_r1_{tag}"], out[f"itm_{tag}"] = r1, itm
        # the names the first build's figures had
        out["itc_text_to_image_r1"], out["itm_accuracy"] = out["itc_r1_grammar"], out["itm_grammar"]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def quantization_quality(n: int = 200, seed: int = HELDOUT_SEED) -> dict:
    """Captions of the shipped captioning model in bf16 vs with its language model in int8 / int4
    (bf16 activations): the share of held-out scenes with identical captions, and each one's figures;
    also bf16 vs fp32 and int8 / int4 with fp32 activations vs fp32."""
    rec = {}
    ev = dict(n=n, seed=seed, retrieval=False)
    base = evaluate(dtype=torch.bfloat16, **ev)
    rec["bfloat16"] = {k: v for k, v in base.items() if k != "captions"}
    for q in ("int8", "int4"):
        r = evaluate(dtype=torch.bfloat16, quantize=q, **ev)
        same = sum(a == b for a, b in zip(r.pop("captions"), base["captions"])) / n
        rec[q] = dict(r, captions_identical_to_bf16=round(same, 4))
    # bf16 rounding alone flips near-tie words: the same comparisons against fp32 separate the
    # quantization's share from bf16's
    f32 = evaluate(**ev)
    for name, kw in (("bfloat16", dict(dtype=torch.bfloat16)), ("int8", dict(quantize="int8")), ("int4", dict(quantize="int4"))):
        caps = base["captions"] if name == "bfloat16" else evaluate(**ev, **kw)["captions"]
        key = "captions_identical_to_fp32" if name == "bfloat16" else "fp32_activations_identical_to_fp32"
        rec[name][key] = round(sum(a == b for a, b in zip(caps, f32["captions"])) / n, 4)
    return rec
