"""The demo model's quality on held-out scenes: captions (parsed back into objects), VQA by
question type, ITC text-to-image retrieval and ITM; and what bf16 / int8 / int4 change."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ...models.blip2 import Blip2ForConditionalGeneration
from ...models.retrieval import Blip2ForImageTextRetrieval
from ...processing.processor import Blip2Processor
from . import scenes
from .shipped import HELDOUT_SEED, QA_PROMPT, demo_checkpoint

_GROUP = re.compile(r"(a|one|two|three) (large|small) (red|green|blue|yellow) (circle|square|triangle)s?")


def parse_caption(text: str) -> Counter:
    """Count of (colour, shape) named by a caption."""
    n = {"a": 1, "one": 1, "two": 2, "three": 3}
    c: Counter = Counter()
    for num, _, color, shape in _GROUP.findall(text):
        c[(color, shape)] += n[num]
    return c


def _truth(s: scenes.Scene) -> Counter:
    return Counter((o.color, o.shape) for o in s.objects)


def question_type(q: str) -> str:
    return "count" if q.startswith("how many") else q.split()[1]  # color / size / shape


@torch.no_grad()
def generate_captions(model, proc, images: list, batch: int = 50) -> list[str]:
    """Greedy captions (no prompt), in the model's dtype."""
    out = []
    for i in range(0, len(images), batch):
        inp = proc(images=images[i:i + batch], return_tensors="pt").to(dtype=model.dtype)
        ids = model.generate(**inp, max_new_tokens=30, num_beams=1, do_sample=False)
        out += [t.strip() for t in proc.batch_decode(ids, skip_special_tokens=True)]
    return out


@torch.no_grad()
def evaluate(captioning_dir: str | Path | None = None, retrieval_dir: str | Path | None = None, n: int = 200,
             seed: int = HELDOUT_SEED, batch: int = 50, dtype: torch.dtype = torch.float32,
             quantize: str | None = None) -> dict:
    """The four quality figures on n held-out scenes (fixed seed), greedy decoding; fp32 unless
    dtype / quantize (the captioning model's language model) say otherwise."""
    cap_dir = Path(captioning_dir) if captioning_dir else demo_checkpoint("captioning")
    ret_dir = Path(retrieval_dir) if retrieval_dir else demo_checkpoint("retrieval")
    scs = scenes.dataset(n, seed=seed)
    images = [scenes.render(s) for s in scs]
    out: dict = {"scenes": n, "seed": seed}

    model = Blip2ForConditionalGeneration.from_pretrained(cap_dir, dtype=dtype, quantize=quantize)
    proc = Blip2Processor.from_pretrained(cap_dir)
    caps = generate_captions(model, proc, images, batch)
    out["captions"] = caps
    out["caption_objects_correct"] = sum(parse_caption(c) == _truth(s) for c, s in zip(caps, scs)) / n
    out["caption_exact"] = sum(c == scenes.caption(s) for c, s in zip(caps, scs)) / n

    right: Counter = Counter()
    total: Counter = Counter()
    for i in range(0, n, batch):
        qs = [(j, q, a) for j in range(i, min(n, i + batch)) for q, a in scenes.questions(scs[j])]
        inp = proc(images=[images[j] for j, _, _ in qs], text=[QA_PROMPT.format(q=q) for _, q, _ in qs],
                   return_tensors="pt", padding=True).to(dtype=dtype)
        ids = model.generate(**inp, max_new_tokens=4, num_beams=1, do_sample=False)
        L = inp["input_ids"].shape[1]
        answers = proc.batch_decode(ids[:, L:], skip_special_tokens=True)  # OPT returns prompt + new tokens
        for (_, q, a), got in zip(qs, answers):
            t = question_type(q)
            total[t] += 1
            right[t] += got.strip() == a
    for t in sorted(total):
        out[f"vqa_{t}"] = right[t] / total[t]
    main = ("color", "shape", "count")
    out["vqa_color_shape_count"] = sum(right[t] for t in main) / sum(total[t] for t in main)
    del model

    ret = Blip2ForImageTextRetrieval.from_pretrained(ret_dir, dtype=torch.float32)
    rproc = Blip2Processor.from_pretrained(ret_dir)
    caps = [scenes.caption(s) for s in scs]
    hits = trials = 0
    G = min(100, n)
    for i in range(0, n - G + 1, G):  # text -> image among 100 images (ITC)
        inp = rproc(images=images[i:i + G], text=caps[i:i + G], return_tensors="pt", padding=True)
        sim = ret(**inp, use_image_text_matching_head=False).logits_per_text  # (100 texts, 100 images)
        top = sim.argmax(dim=1)
        hits += sum(caps[i + int(t)] == caps[i + k] for k, t in enumerate(top))  # an identical caption is a match
        trials += G
    out["itc_text_to_image_r1"] = hits / trials
    # ITM: each image with its caption and with the caption of another scene (a different one)
    g = np.random.default_rng(seed)
    wrong = []
    for k in range(n):
        j = int(g.integers(n))
        while caps[j] == caps[k]:
            j = int(g.integers(n))
        wrong.append(caps[j])
    correct = 0
    for i in range(0, n, batch):
        ims = images[i:i + batch]
        for texts, want in ((caps[i:i + batch], 1), (wrong[i:i + batch], 0)):
            inp = rproc(images=ims, text=texts, return_tensors="pt", padding=True)
            p = ret(**inp, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
            correct += int(((p > 0.5).long() == want).sum())
    out["itm_accuracy"] = correct / (2 * n)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def quantization_quality(n: int = 200, seed: int = HELDOUT_SEED) -> dict:
    """Captions of the shipped captioning model in bf16 vs with its language model in int8 / int4
    (bf16 activations): the share of held-out scenes with identical captions, and each one's figures;
    also bf16 vs fp32 and int8 / int4 with fp32 activations vs fp32."""
    rec = {}
    base = evaluate(n=n, seed=seed, dtype=torch.bfloat16)
    rec["bfloat16"] = {k: v for k, v in base.items() if k != "captions"}
    for q in ("int8", "int4"):
        r = evaluate(n=n, seed=seed, dtype=torch.bfloat16, quantize=q)
        same = sum(a == b for a, b in zip(r.pop("captions"), base["captions"])) / n
        rec[q] = dict(r, captions_identical_to_bf16=round(same, 4))
    # bf16 rounding alone flips near-tie words: the same comparisons against fp32 separate the
    # quantization's share from bf16's
    f32 = evaluate(n=n, seed=seed)
    for name, kw in (("bfloat16", dict(dtype=torch.bfloat16)), ("int8", dict(quantize="int8")), ("int4", dict(quantize="int4"))):
        caps = base["captions"] if name == "bfloat16" else evaluate(n=n, seed=seed, **kw)["captions"]
        key = "captions_identical_to_fp32" if name == "bfloat16" else "fp32_activations_identical_to_fp32"
        rec[name][key] = round(sum(a == b for a, b in zip(caps, f32["captions"])) / n, 4)
    return rec
