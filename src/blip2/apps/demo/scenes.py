"""A procedural image world for training and checking a small BLIP-2: coloured shapes on a background.

A Scene is a structured description (1-3 objects: shape, colour, size, centre, turn, outline; a
background; a Look: canvas aspect and scale, anti-aliasing, JPEG, blur, noise); the image, the
caption and the question/answer pairs are all generated from it, so every text is true of its
image by construction. Everything is deterministic given a seed (`random.Random`, stable across
Python versions).

Captions name objects in a canonical order (shape, then colour, then size, large first) and
group identical objects ("two small red circles"), so a caption is a function of the set of
objects, never of where they happen to lie:

    a large red circle and a small blue square
    two small green triangles and a large yellow circle

Questions are asked only when the answer is unambiguous ("what color is the circle?" only when
the scene has exactly one circle; "where is the red circle?" only when it is the only red circle
and clearly nearer one side of the picture than the others).

`make_scene(style=...)` draws the look of a share of the scenes from a Style (TRAIN_STYLE: mild
variation used in training; SHIFT_STYLE: the held-out style-shift split, stronger and other).
`new_kinds` mixes in objects of kinds outside the training world (EXTRA_COLORS, EXTRA_SHAPES),
for teaching a trained model something new.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB; each has one channel <= 60, so no background (all channels >= 185) resembles it
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
EXTRA_SHAPES = ("star",)  # kinds the shipped demo model never saw, for `blip2 finetune`
EXTRA_COLORS = {"purple": (150, 40, 200)}
SIZES = ("large", "small")  # caption order: large first
RADIUS = {"small": 0.10, "large": 0.17}  # bounding radius as a fraction of the canvas' short side
BACKGROUNDS = ("white", "gray", "beige", "gradient", "checker", "noise")
NUMBERS = ("zero", "one", "two", "three")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLOR_JITTER = 12  # per-channel +- jitter of each object's colour
ALL_SHAPES = SHAPES + EXTRA_SHAPES
ALL_COLORS = {**COLORS, **EXTRA_COLORS}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the canvas width
    y: float  # fraction of the height
    rgb: tuple[int, int, int]  # the jittered colour this object is drawn in
    angle: float = 0.0  # turned by this many degrees
    outline: bool = False  # drawn as an outline only


@dataclass(frozen=True)
class Look:
    """How pixels are made beyond the objects; the default is the plain training look."""
    aspect: float = 1.0  # canvas width / height; the short side is the size asked for, times scale
    scale: float = 1.0
    antialias: bool = False  # drawn at 4x and downsampled
    jpeg: int = 0  # JPEG quality the image goes through (0: none)
    blur: float = 0.0  # Gaussian blur radius, in pixels of a 224 px canvas
    noise: float = 0.0  # std of per-pixel Gaussian noise


@dataclass(frozen=True)
class Style:
    """Ranges that make_scene draws a styled scene's look from."""
    p: float  # share of scenes styled (the others keep the plain look)
    rotate: float  # each object turned by up to +- this many degrees
    outline: float  # probability that a scene's objects are outlines
    border: float  # probability that an object touches the canvas border
    aspect: tuple[float, float]  # canvas aspect range (log-uniform)
    scale: tuple[float, float]
    antialias: float  # probability
    jpeg: tuple[int, int]  # quality range; (0, 0): none
    blur: float  # max radius
    noise: float  # max std


TRAIN_STYLE = Style(p=0.3, rotate=45, outline=0.15, border=0.2, aspect=(0.8, 1.25), scale=(1.0, 1.0),
                    antialias=0.5, jpeg=(50, 90), blur=0.6, noise=6)
SHIFT_STYLE = Style(p=1.0, rotate=45, outline=0.3, border=0.35, aspect=(0.6, 1.7), scale=(0.7, 1.45),
                    antialias=0.7, jpeg=(30, 30), blur=1.0, noise=8)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    bg_seed: int  # drives the background's texture (and the look's noise)
    bg_rgb: tuple[tuple[int, int, int], tuple[int, int, int]] = field(default=((255, 255, 255), (255, 255, 255)))
    look: Look = Look()


def _key(o: Obj) -> tuple[int, int, int]:
    return ALL_SHAPES.index(o.shape), list(ALL_COLORS).index(o.color), SIZES.index(o.size)


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(200, 250) for _ in range(3))


def _look(rng: random.Random, st: Style) -> Look:
    lo, hi = st.aspect
    return Look(aspect=round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 3),
                scale=round(rng.uniform(*st.scale), 3), antialias=rng.random() < st.antialias,
                jpeg=rng.randint(*st.jpeg) if st.jpeg[1] and rng.random() < 0.5 + 0.5 * (st.p == 1) else 0,
                blur=round(rng.uniform(0, st.blur), 2) if rng.random() < 0.5 else 0.0,
                noise=round(rng.uniform(0, st.noise), 2) if rng.random() < 0.5 else 0.0)


def _place(rng: random.Random, sizes: list[str], border: list[bool]) -> list[tuple[float, float]] | None:
    """Centres whose bounding circles keep a gap, or None when the draw failed (draw again)."""
    placed: list[tuple[float, float, float]] = []
    for size, edge in zip(sizes, border):
        r = RADIUS[size]
        for _ in range(200):
            x, y = rng.uniform(r + 0.02, 0.98 - r), rng.uniform(r + 0.02, 0.98 - r)
            if edge:  # one coordinate at the border: the shape touches it (a circle is cut a little)
                v = rng.choice((0.8 * r, 1 - 0.8 * r))
                x, y = (v, y) if rng.random() < 0.5 else (x, v)
            if all(math.hypot(x - px, y - py) > r + pr + 0.03 for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def make_scene(rng: random.Random, max_objects: int = 3, style: Style | None = None,
               new_kinds: tuple[tuple[str, str], ...] = (), new_p: float = 0.0) -> Scene:
    """Draw one scene: 1..max_objects objects that do not overlap, on a light background.
    style: a share style.p of the scenes get a look and object turns/outlines drawn from it.
    new_kinds: (shape, colour) pairs each object is drawn from with probability new_p."""
    n = rng.randint(1, max_objects)
    kinds: list[tuple[str, str, str]] = []
    for _ in range(n):
        if kinds and rng.random() < 0.3:  # repeat an object so counts above one are common
            kinds.append(rng.choice(kinds))
        elif new_kinds and rng.random() < new_p:
            shape, color = rng.choice(new_kinds)
            kinds.append((shape, color, rng.choice(SIZES)))
        else:
            kinds.append((rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)))
    styled = style is not None and rng.random() < style.p
    border = [styled and rng.random() < style.border for _ in kinds]
    while (placed := _place(rng, [k[2] for k in kinds], border)) is None:
        pass
    outline = styled and rng.random() < style.outline
    objs = []
    for (shape, color, size), (x, y) in zip(kinds, placed):
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in ALL_COLORS[color])
        angle = round(rng.uniform(-style.rotate, style.rotate), 1) if styled else 0.0
        objs.append(Obj(shape, color, size, round(x, 4), round(y, 4), rgb, angle, outline))
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
    bg_seed = rng.randrange(2**31)
    return Scene(tuple(objs), bg, bg_seed, bg_rgb, _look(rng, style) if styled else Look())


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


def side(o: Obj) -> str | None:
    """"left" / "right" / "top" / "bottom" when the object is clearly nearer that side than any
    other (its offset from the centre on one axis at least 0.15 and twice the other's), else None."""
    dx, dy = o.x - 0.5, o.y - 0.5
    if abs(dx) >= max(0.15, 2 * abs(dy)):
        return "left" if dx < 0 else "right"
    if abs(dy) >= max(0.15, 2 * abs(dx)):
        return "top" if dy < 0 else "bottom"
    return None


def questions(scene: Scene) -> list[tuple[str, str]]:
    """(question, answer) pairs, each with one right answer: colour, size and shape of a unique
    object, counts; then yes/no ("is there a blue square?") and where (left/right/top/bottom)."""
    objs = scene.objects
    shapes = SHAPES + tuple(s for s in EXTRA_SHAPES if any(o.shape == s for o in objs))
    colors = list(COLORS) + [c for c in EXTRA_COLORS if any(o.color == c for o in objs)]
    qa = []
    for shape in shapes:  # colour / size of a shape that occurs once
        same = [o for o in objs if o.shape == shape]
        if len(same) == 1:
            qa.append((f"what color is the {shape}?", same[0].color))
            qa.append((f"what size is the {shape}?", same[0].size))
    for color in colors:  # shape of the one object of a colour
        same = [o for o in objs if o.color == color]
        if len(same) == 1:
            qa.append((f"what shape is the {color} object?", same[0].shape))
    for shape in shapes:  # counts, absent shapes included
        qa.append((f"how many {PLURAL[shape]} are there?", NUMBERS[sum(o.shape == shape for o in objs)]))
    for color in colors:
        n = sum(o.color == color for o in objs)
        if n:
            qa.append((f"how many {color} objects are there?", NUMBERS[n]))
    qa.append(("how many objects are there?", NUMBERS[len(objs)]))
    # yes/no: one kind that is there, one that is not (picked from the scene's own seed)
    r = random.Random(scene.bg_seed)
    present = sorted({(o.color, o.shape) for o in objs})
    absent = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present]
    for (c, s), a in ((r.choice(present), "yes"), (r.choice(absent), "no")):
        qa.append((f"is there a {c} {s}?", a))
    for o in objs:  # where: the only object of its colour and shape, clearly on one side
        if sum((p.color, p.shape) == (o.color, o.shape) for p in objs) == 1 and side(o):
            qa.append((f"where is the {o.color} {o.shape}?", side(o)))
    return qa


# --- pixels -----------------------------------------------------------------------------------

def canvas(look: Look, size: int) -> tuple[int, int]:
    """(width, height) of a scene drawn at `size`: the short side is size * look.scale."""
    s = max(8, round(size * look.scale))
    return (round(s * look.aspect), s) if look.aspect >= 1 else (s, round(s / look.aspect))


def _background(scene: Scene, w: int, h: int) -> Image.Image:
    (a, b), kind = scene.bg_rgb, scene.background
    if kind in ("white", "gray", "beige"):
        return Image.new("RGB", (w, h), a)
    ca, cb = np.array(a, np.float32), np.array(b, np.float32)
    if kind == "gradient":  # top-to-bottom blend
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)
        img = np.broadcast_to(ca + (cb - ca) * t[:, None, None], (h, w, 3))
    elif kind == "checker":
        cell = max(2, min(w, h) // 8)
        on = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(np.float32)[..., None]
        img = ca * (1 - on) + cb * on
    else:  # "noise": speckle around the first colour, reproducible from bg_seed
        rs = np.random.RandomState(scene.bg_seed)
        img = ca + rs.uniform(-15, 15, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 185, 255).astype(np.uint8), "RGB")


def _outline(o: Obj, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a square / triangle / star of bounding radius r, turned by o.angle."""
    if o.shape == "square":
        h = r * 0.82  # a square of about the circle's area
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif o.shape == "triangle":  # upright equilateral, inscribed in the bounding circle
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # star: five points, inner radius 0.45 r
        pts = [((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]


def draw_objects(d: ImageDraw.ImageDraw, scene: Scene, w: int, h: int | None = None, fill=None) -> None:
    """Draw the scene's objects on a w x h canvas (h defaults to w); fill(i, obj) overrides each
    object's colour, and then every object is drawn solid (outline or not)."""
    h = w if h is None else h
    for i, o in enumerate(scene.objects):
        c = o.rgb if fill is None else fill(i, o)
        cx, cy, r = o.x * w, o.y * h, RADIUS[o.size] * min(w, h)
        width = max(2, round(0.22 * r)) if o.outline and fill is None else 0
        if o.shape == "circle":
            box = [cx - r, cy - r, cx + r, cy + r]
            d.ellipse(box, outline=c, width=width) if width else d.ellipse(box, fill=c)
        elif o.shape == "square" and not o.angle and not width:  # as the first demo model saw squares
            e = r * 0.82
            d.rectangle([cx - e, cy - e, cx + e, cy + e], fill=c)
        else:
            pts = _outline(o, cx, cy, r)
            d.polygon(pts, outline=c, width=width) if width else d.polygon(pts, fill=c)


def render(scene: Scene, size: int = 224) -> Image.Image:
    """The scene as an RGB image whose short side is `size` (times the look's scale)."""
    lk = scene.look
    w, h = canvas(lk, size)
    k = 4 if lk.antialias else 1
    img = _background(scene, w * k, h * k)
    draw_objects(ImageDraw.Draw(img), scene, w * k, h * k)
    if k > 1:
        img = img.resize((w, h), Image.LANCZOS)
    if lk.blur:
        img = img.filter(ImageFilter.GaussianBlur(lk.blur * min(w, h) / 224))
    if lk.noise:
        a = np.asarray(img, np.float32) + np.random.RandomState(scene.bg_seed ^ 0x5EED).normal(0, lk.noise, (h, w, 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    if lk.jpeg:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=lk.jpeg)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


# --- data sets --------------------------------------------------------------------------------

def dataset(n: int, seed: int = 0, max_objects: int = 3, style: Style | None = None,
            new_kinds: tuple[tuple[str, str], ...] = (), new_p: float = 0.0) -> list[Scene]:
    """n scenes from one seeded stream: dataset(n, s) is a prefix of dataset(n + k, s)."""
    rng = random.Random(seed)
    return [make_scene(rng, max_objects, style, new_kinds, new_p) for _ in range(n)]


def write_jsonl(directory: str | Path, n: int, seed: int = 0, size: int = 224, max_objects: int = 3,
                style: Style | None = None, new_kinds: tuple[tuple[str, str], ...] = (),
                new_p: float = 0.0) -> tuple[Path, Path]:
    """Write n scenes (dataset(n, seed, ...)) as PNGs under directory/images, plus

    captions.jsonl: {"image": path, "text": caption}        one line per image
    qa.jsonl:       {"image": path, "question": q, "answer": a}  one line per question

    Image paths are relative to `directory` (where the JSONL files are). Returns both JSONL paths.
    """
    d = Path(directory)
    (d / "images").mkdir(parents=True, exist_ok=True)
    cap_path, qa_path = d / "captions.jsonl", d / "qa.jsonl"
    with open(cap_path, "w") as fc, open(qa_path, "w") as fq:
        for i, s in enumerate(dataset(n, seed, max_objects, style, new_kinds, new_p)):
            rel = f"images/{i:06d}.png"
            render(s, size).save(d / rel)
            fc.write(json.dumps({"image": rel, "text": caption(s)}) + "\n")
            for q, a in questions(s):
                fq.write(json.dumps({"image": rel, "question": q, "answer": a}) + "\n")
    return cap_path, qa_path
