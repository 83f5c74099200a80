"""A procedural image world for training and checking a small BLIP-2: coloured shapes on a background.

A Scene is a structured description (1-3 objects: shape, colour, size, centre; a background);
the image, the caption and the question/answer pairs are all generated from it, so every text
is true of its image by construction. Everything is deterministic given a seed
(`random.Random`, stable across Python versions).

Captions name objects in a canonical order (shape, then colour, then size, large first) and
group identical objects ("two small red circles"), so a caption is a function of the set of
objects, never of where they happen to lie:

    a large red circle and a small blue square
    two small green triangles and a large yellow circle

Questions are asked only when the answer is unambiguous ("what color is the circle?" only when
the scene has exactly one circle).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB; each has one channel <= 60, so no background (all channels >= 185) resembles it
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
SIZES = ("large", "small")  # caption order: large first
RADIUS = {"small": 0.10, "large": 0.17}  # bounding radius as a fraction of the image side
BACKGROUNDS = ("white", "gray", "beige", "gradient", "checker", "noise")
NUMBERS = ("zero", "one", "two", "three")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLOR_JITTER = 12  # per-channel +- jitter of each object's colour


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the image width
    y: float
    rgb: tuple[int, int, int]  # the jittered colour this object is drawn in


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    bg_seed: int  # drives the background's texture
    bg_rgb: tuple[tuple[int, int, int], tuple[int, int, int]] = field(default=((255, 255, 255), (255, 255, 255)))


def _key(o: Obj) -> tuple[int, int, int]:
    return SHAPES.index(o.shape), list(COLORS).index(o.color), SIZES.index(o.size)


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(200, 250) for _ in range(3))


def make_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """Draw one scene: 1..max_objects objects that do not overlap, on a light background."""
    n = rng.randint(1, max_objects)
    kinds: list[tuple[str, str, str]] = []
    for _ in range(n):
        if kinds and rng.random() < 0.3:  # repeat an object so counts above one are common
            kinds.append(rng.choice(kinds))
        else:
            kinds.append((rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)))
    while True:  # rejection-sample centres so that bounding circles keep a gap
        placed: list[tuple[float, float, float]] = []
        for _, _, size in kinds:
            r = RADIUS[size]
            for _ in range(200):
                x, y = rng.uniform(r + 0.02, 0.98 - r), rng.uniform(r + 0.02, 0.98 - r)
                if all(math.hypot(x - px, y - py) > r + pr + 0.03 for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
            else:
                break
        if len(placed) == n:
            break
    objs = []
    for (shape, color, size), (x, y, _) in zip(kinds, placed):
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color])
        objs.append(Obj(shape, color, size, round(x, 4), round(y, 4), rgb))
    bg = rng.choice(BACKGROUNDS)
    if bg == "white":
        bg_rgb = ((255, 255, 255), (255, 255, 255))
    elif bg == "gray":
        g = rng.randint(205, 235)
        bg_rgb = ((g, g, g), (g, g, g))
    elif bg == "beige":
        bg_rgb = ((rng.randint(240, 250), rng.randint(230, 240), rng.randint(205, 220)),) * 2
    else:
        bg_rgb = (_light(rng), _light(rng))
    return Scene(tuple(objs), bg, rng.randrange(2**31), bg_rgb)


# --- text -------------------------------------------------------------------------------------

def groups(scene: Scene) -> list[tuple[int, str, str, str]]:
    """(count, size, color, shape) for each kind of object, in caption order."""
    out: dict[tuple[int, int, int], list] = {}
    for o in sorted(scene.objects, key=_key):
        out.setdefault(_key(o), [0, o.size, o.color, o.shape])[0] += 1
    return [tuple(v) for v in out.values()]


def caption(scene: Scene) -> str:
    parts = []
    for n, size, color, shape in groups(scene):
        parts.append(f"a {size} {color} {shape}" if n == 1 else f"{NUMBERS[n]} {size} {color} {PLURAL[shape]}")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(scene: Scene) -> list[tuple[str, str]]:
    """(question, answer) pairs about colour, shape, size and count, each with one right answer."""
    objs = scene.objects
    qa = []
    for shape in SHAPES:  # colour / size of a shape that occurs once
        same = [o for o in objs if o.shape == shape]
        if len(same) == 1:
            qa.append((f"what color is the {shape}?", same[0].color))
            qa.append((f"what size is the {shape}?", same[0].size))
    for color in COLORS:  # shape of the one object of a colour
        same = [o for o in objs if o.color == color]
        if len(same) == 1:
            qa.append((f"what shape is the {color} object?", same[0].shape))
    for shape in SHAPES:  # counts, absent shapes included
        qa.append((f"how many {PLURAL[shape]} are there?", NUMBERS[sum(o.shape == shape for o in objs)]))
    for color in COLORS:
        n = sum(o.color == color for o in objs)
        if n:
            qa.append((f"how many {color} objects are there?", NUMBERS[n]))
    qa.append(("how many objects are there?", NUMBERS[len(objs)]))
    return qa


# --- pixels -----------------------------------------------------------------------------------

def _background(scene: Scene, size: int) -> Image.Image:
    (a, b), kind = scene.bg_rgb, scene.background
    if kind in ("white", "gray", "beige"):
        return Image.new("RGB", (size, size), a)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ca, cb = np.array(a, np.float32), np.array(b, np.float32)
    if kind == "gradient":  # top-to-bottom blend
        img = ca + (cb - ca) * t[:, None, None]
        img = np.broadcast_to(img, (size, size, 3))
    elif kind == "checker":
        cell = max(2, size // 8)
        i = np.arange(size) // cell
        on = ((i[:, None] + i[None, :]) % 2).astype(np.float32)[..., None]
        img = ca * (1 - on) + cb * on
    else:  # "noise": speckle around the first colour, reproducible from bg_seed
        rs = np.random.RandomState(scene.bg_seed)
        img = ca + rs.uniform(-15, 15, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 185, 255).astype(np.uint8), "RGB")


def draw_objects(d: ImageDraw.ImageDraw, scene: Scene, size: int, fill=None) -> None:
    """Draw the scene's objects on a size x size canvas; fill(i, obj) overrides each object's colour."""
    for i, o in enumerate(scene.objects):
        c = o.rgb if fill is None else fill(i, o)
        cx, cy, r = o.x * size, o.y * size, RADIUS[o.size] * size
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
        elif o.shape == "square":
            h = r * 0.82  # a square of about the circle's area
            d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=c)
        else:  # upright equilateral triangle inscribed in the bounding circle
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
            d.polygon(pts, fill=c)


def render(scene: Scene, size: int = 224) -> Image.Image:
    """The scene as a size x size RGB image."""
    img = _background(scene, size)
    draw_objects(ImageDraw.Draw(img), scene, size)
    return img


# --- data sets --------------------------------------------------------------------------------

def dataset(n: int, seed: int = 0, max_objects: int = 3) -> list[Scene]:
    """n scenes from one seeded stream: dataset(n, s) is a prefix of dataset(n + k, s)."""
    rng = random.Random(seed)
    return [make_scene(rng, max_objects) for _ in range(n)]


def write_jsonl(
    directory: str | Path, n: int, seed: int = 0, size: int = 224, max_objects: int = 3
) -> tuple[Path, Path]:
    """Write n scenes as PNGs under directory/images, plus

    captions.jsonl: {"image": path, "text": caption}        one line per image
    qa.jsonl:       {"image": path, "question": q, "answer": a}  one line per question

    Image paths are relative to `directory` (where the JSONL files are). Returns both JSONL paths.
    """
    d = Path(directory)
    (d / "images").mkdir(parents=True, exist_ok=True)
    cap_path, qa_path = d / "captions.jsonl", d / "qa.jsonl"
    with open(cap_path, "w") as fc, open(qa_path, "w") as fq:
        for i, s in enumerate(dataset(n, seed, max_objects)):
            rel = f"images/{i:06d}.png"
            render(s, size).save(d / rel)
            fc.write(json.dumps({"image": rel, "text": caption(s)}) + "\n")
            for q, a in questions(s):
                fq.write(json.dumps({"image": rel, "question": q, "answer": a}) + "\n")
    return cap_path, qa_path
