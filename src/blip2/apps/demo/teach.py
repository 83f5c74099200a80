"""The fine-tuning proof: teach the demo model an object it never saw, through `blip2 finetune`.

    python -m blip2.demo teach -o runs/purple-star -n 400 --rehearsal 1200 -- --train lm --steps 6000 --lr 3e-4

makes `n` scenes in which objects are purple stars with probability TRAIN_NEW_P (a colour and a shape
outside the training world: scenes.EXTRA_COLORS, EXTRA_SHAPES), and `rehearsal` scenes of the known
world, writes them as one JSONL (write_data: captions and question/answer pairs), runs
`blip2 finetune --model demo --data ...` with the options after `--`, and then scores, on held-out
scenes, the share of captions that name the new object right (its colour, shape and count) and
every captioning figure of `python -m blip2.demo eval` before and after (teach.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import scenes
from .evaluation import evaluate, generate_captions, parse_caption
from .shipped import HELDOUT_SEED, demo_checkpoint

NEW_KINDS = (("star", "purple"),)
NEW_P = 0.4  # of the held-out scenes' objects
TRAIN_NEW_P = 0.6  # of the fine-tuning scenes' objects: more scenes with two or three of the new kind,
# whose counts were what the model got wrong most (two stars called one)
DATA_SEED, TEST_SEED = 777, HELDOUT_SEED + 7


def write_data(d: Path, n: int, rehearsal: int = 0) -> Path:
    """n scenes with the new kind (their captions and a third of their QA pairs), and `rehearsal`
    scenes of the world the model knows (their captions and every QA pair, so that it keeps all it
    knew: with a third, shape questions fell most), in one JSONL."""
    lines = []
    for sub, k, kw, every in (("new", n, dict(new_kinds=NEW_KINDS, new_p=TRAIN_NEW_P), 3), ("known", rehearsal, {}, 1)):
        if k:
            cap, qa = scenes.write_jsonl(d / sub, k, seed=DATA_SEED + len(sub), **kw)
            for line in cap.read_text().splitlines() + qa.read_text().splitlines()[::every]:
                rec = json.loads(line)
                lines.append(json.dumps(dict(rec, image=f"{sub}/{rec['image']}")))
    out = d / "data.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def new_object_right(caption: str, s: scenes.Scene) -> bool:
    """Does the caption name the new kind as often as the scene holds it?"""
    return all(parse_caption(caption)[(color, shape)] == sum((o.color, o.shape) == (color, shape) for o in s.objects)
               for shape, color in NEW_KINDS)


def new_object_figure(model_dir: Path, n: int = 100) -> float:
    """Share of n held-out scenes holding the new kind whose caption names it right."""
    from ...models.blip2 import Blip2ForConditionalGeneration
    from ...processing.processor import Blip2Processor

    pool = scenes.dataset(4 * n, seed=TEST_SEED, new_kinds=NEW_KINDS, new_p=NEW_P)
    test = [s for s in pool if any((o.shape, o.color) in NEW_KINDS for o in s.objects)][:n]
    m, p = Blip2ForConditionalGeneration.from_pretrained(model_dir), Blip2Processor.from_pretrained(model_dir)
    caps = generate_captions(m, p, [scenes.render(s) for s in test])
    return sum(new_object_right(c, s) for c, s in zip(caps, test)) / len(test)


def teach(out: Path, n: int = 200, extra_args: tuple[str, ...] = (), model: str = "demo", rehearsal: int = 0) -> dict:
    """The proof (module docstring) on `model` (a captioning checkpoint directory, or "demo");
    returns the record, also written to out/teach.json."""
    from ..cli.main import main as cli

    out.mkdir(parents=True, exist_ok=True)
    data = write_data(out / "data", n, rehearsal)
    t0 = time.perf_counter()
    args = ["finetune", "--model", model, "--data", str(data), "-o", str(out / "model"), *extra_args]
    if cli(args) not in (0,):
        raise RuntimeError("blip2 finetune failed")
    seconds = round(time.perf_counter() - t0, 1)
    base, tuned = demo_checkpoint("captioning") if model == "demo" else Path(model), out / "model"
    before = {k: v for k, v in evaluate(base, retrieval=False).items() if k != "captions"}
    after = {k: v for k, v in evaluate(tuned, retrieval=False).items() if k != "captions"}
    rec = dict(command="blip2 " + " ".join(args), scenes=n, rehearsal_scenes=rehearsal, finetune_seconds=seconds,
               new_object_right_before=new_object_figure(base), new_object_right_after=new_object_figure(tuned),
               figures_before=before, figures_after=after,
               largest_drop=max(before[k] - after[k] for k in before if isinstance(before[k], float)),
               finetune=json.loads((tuned / "finetune.json").read_text()))
    (out / "teach.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec
