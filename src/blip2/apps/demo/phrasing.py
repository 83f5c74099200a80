"""How people describe a scene, for the retrieval model's text side: besides the canonical caption,
partial descriptions ("red circle", "a circle", "two squares", "something blue", "three
objects"), reordered or paraphrased full ones ("a square that is blue", "one big green
triangle", "a picture with two small red squares"), and changes of case and punctuation.

Every text comes with a Query, what it claims, so that whether it is true of any scene can be
checked (`holds`): retrieval counts a hit when the top image is one the text is true of, and
training marks every such image-text pair of a batch as a match (`Matcher`).

Templates are split: `split="train"` draws from the ones training uses, `split="held"` from
held-out ones that training never sees (other word orders, wrappers and joiners, made of the
words the training templates use, so that the vocabulary is the same).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from . import scenes

FAMILIES = ("grammar", "partial", "paraphrase", "case")

# (count or None for "at least one", size, color, shape); None: any
Term = tuple[int | None, str | None, str | None, str | None]


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...]
    total: int | None = None  # the number of objects, when the text says it
    exclusive: bool = False  # the terms are all the scene holds (a full description)


def _matching(s: scenes.Scene, size, color, shape) -> int:
    return sum((size in (None, o.size)) and (color in (None, o.color)) and (shape in (None, o.shape))
               for o in s.objects)


def holds(q: Query, s: scenes.Scene) -> bool:
    """Is the text whose claim is q true of scene s?"""
    if q.exclusive:
        want = Counter({(size, color, shape): n for n, size, color, shape in q.terms})
        return want == Counter((o.size, o.color, o.shape) for o in s.objects)
    if q.total is not None and len(s.objects) != q.total:
        return False
    return all((_matching(s, *t[1:]) >= 1) if t[0] is None else _matching(s, *t[1:]) == t[0] for t in q.terms)


# --- words and templates ------------------------------------------------------------------------
# {n}: a number word ("a" means at least one, a numeral exactly that many); {size} {color} {shape}
# (plural when n > 1); {be}: is / are; {obj}: object(s) / shape(s) / thing(s)

NUM = {1: ("one", "1"), 2: ("two", "2"), 3: ("three", "3")}
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}
OBJ = (("object", "objects"), ("shape", "shapes"), ("thing", "things"))

GROUP = {  # one kind of object, fully described
    "train": ("{n} {size} {color} {shape}", "{n} {color} {size} {shape}", "{n} {color} {shape} that {be} {size}",
              "{n} {shape} that {be} {size} and {color}"),
    "held": ("{n} {size} {shape} that {be} {color}", "{n} {shape} that {be} {color} and {size}"),
}
PARTIAL = {  # one kind of object, some attributes left out
    "train": ("{n} {color} {shape}", "{n} {shape}", "{n} {size} {shape}", "{n} {color} {obj}",
              "something {color}", "{n} {shape} that {be} {color}", "{n} {size} {obj}", "{n} {obj}"),
    "held": ("{color} {shape}", "{n} {size} {color} {obj}", "{n} {shape} that {be} {size}", "something {size}",
             "{n} {color} {obj} that {be} {size}"),
}
WRAP = {
    "train": ("{}", "{}", "{}", "a picture with {}", "an image of {}", "there {be} {}", "this image shows {}",
              "a photo of {}", "{} in the picture", "i see {}", "we can see {}"),
    "held": ("{}", "a photo with {}", "the picture shows {}", "{} in this image", "an image with {}", "i can see {}"),
}
JOIN = {"train": (" and ", ", ", " with ", " plus "), "held": (", and ", ", with ")}


def _fill(t: str, rng: random.Random, n: int | None, size=None, color=None, shape=None) -> str:
    """A template with its slots filled; n None: "a" / "an" (at least one)."""
    many = n is not None and n > 1
    num = ("an" if (color or size or shape or "o")[0] in "aeiou" else "a") if n is None else rng.choice(NUM[n])
    obj = rng.choice(OBJ)[many]
    out = t.format(n=num, size=rng.choice(SIZE_WORDS[size]) if size else "", color=color or "",
                   shape=(scenes.PLURAL[shape] if many else shape) if shape else "", be="are" if many else "is", obj=obj)
    out = " ".join(out.split())
    if out.startswith(("a ", "an ")):  # the article agrees with the word after it
        rest = out.split(" ", 1)[1]
        out = ("an " if rest[0] in "aeiou" else "a ") + rest
    return out


def _wrap(rng: random.Random, split: str, body: str, many: bool) -> str:
    return rng.choice(WRAP[split]).replace("{be}", "are" if many else "is").format(body)


def full(s: scenes.Scene, rng: random.Random, split: str) -> tuple[str, Query]:
    """Every object, in a random order, with the split's group forms, joiners and wrappers."""
    gs = scenes.groups(s)
    rng.shuffle(gs)
    parts = [_fill(rng.choice(GROUP[split]), rng, n if n > 1 or rng.random() < 0.3 else None, size, color, shape)
             for n, size, color, shape in gs]
    body = parts[0] if len(parts) == 1 else rng.choice(JOIN[split]).join(parts) if len(parts) == 2 else \
        ", ".join(parts[:-1]) + rng.choice(JOIN[split]) + parts[-1]
    q = Query(tuple((n, size, color, shape) for n, size, color, shape in gs), exclusive=True)
    return _wrap(rng, split, body, gs[0][0] > 1), q


def partial(s: scenes.Scene, rng: random.Random, split: str) -> tuple[str, Query]:
    """Something true of the scene that leaves things out: one object's kind in part, or the count."""
    t = rng.choice(PARTIAL[split])
    o = rng.choice(s.objects)
    size = o.size if "{size}" in t else None
    color = o.color if "{color}" in t else None
    shape = o.shape if "{shape}" in t else None
    if t.startswith("something"):
        return _wrap(rng, split, _fill(t, rng, None, size, color, shape), False), Query(((None, size, color, shape),))
    if not (size or color or shape):  # "{n} objects": the whole scene's count
        n = len(s.objects)
        return _wrap(rng, split, _fill(t, rng, n), n > 1), Query((), total=n)
    exact = _matching(s, size, color, shape)
    n = exact if exact > 1 or rng.random() < 0.5 else None  # "a red circle" or "one red circle"
    text = _fill(t, rng, n, size, color, shape)
    if t.startswith("{color} {shape}"):  # a bare "red circle": at least one
        n, text = None, _fill(t, rng, 1, size, color, shape)
    return _wrap(rng, split, text, (n or 1) > 1), Query(((n, size, color, shape),))


def restyle(text: str, rng: random.Random) -> str:
    """The same words in another case, with punctuation: "A Red Circle.", "RED CIRCLE!", "a red circle, ..."."""
    case = rng.choice((str.upper, str.capitalize, str.title, str.lower))
    text = case(text)
    if rng.random() < 0.5:
        text = text.replace(" and ", ", and ", 1) if rng.random() < 0.5 else text.replace(",", " ,")
    return text + rng.choice((".", "!", "", "...", " .", "?"))


def describe(s: scenes.Scene, rng: random.Random, family: str, split: str = "train") -> tuple[str, Query]:
    """A text of `family` (FAMILIES) true of s, and its claim. "grammar" is the canonical caption;
    "case" restyles the caption or a paraphrase."""
    if family == "grammar":
        return scenes.caption(s), Query(tuple((n, sz, c, sh) for n, sz, c, sh in scenes.groups(s)), exclusive=True)
    if family == "partial":
        return partial(s, rng, split)
    if family == "paraphrase":
        return full(s, rng, split)
    if family == "case":
        text, q = describe(s, rng, rng.choice(("grammar", "paraphrase", "partial")), split)
        return restyle(text, rng), q
    raise ValueError(f"phrasing families are {FAMILIES}, not {family!r}")


def training_texts(s: scenes.Scene, rng: random.Random, k: int) -> list[tuple[str, Query]]:
    """k texts of the training templates for one training scene, families mixed."""
    return [describe(s, rng, rng.choice(("partial", "partial", "paraphrase", "case"))) for _ in range(k)]


class Matcher:
    """For the trainer's stage 1 (TrainConfig.matches): does an example's text hold of another
    example's image? Knows each training image's scene and each training text's claim."""

    def __init__(self, scene_of: dict, query_of: dict[str, Query]):
        self.scene_of, self.query_of = scene_of, query_of

    def __call__(self, image_example, text_example) -> bool:
        q, s = self.query_of.get(text_example.text), self.scene_of.get(image_example.image)
        return q is not None and s is not None and holds(q, s)
