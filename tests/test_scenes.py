"""The procedural scene world: determinism, captions and answers true of the scene, pixels true of both."""

import json
import random
from collections import Counter

import numpy as np
from PIL import Image

from blip2 import scenes as S

N = 300
WORD_NUM = {"a": 1, "one": 1, "two": 2, "three": 3}
NUM_WORD = {0: "zero", 1: "one", 2: "two", 3: "three"}


def _parse_caption(c: str) -> Counter:
    """Caption -> Counter of (size, color, shape), read back word by word."""
    head, _, last = c.rpartition(" and ")
    parts = (head.split(", ") if head else []) + [last]
    out = Counter()
    for p in parts:
        num, size, color, shape = p.split(" ")
        n = WORD_NUM[num]
        if n > 1:
            assert shape.endswith("s"), p
            shape = shape[:-1]
        else:
            assert num == "a", p
        out[(size, color, shape)] += n
    return out


def test_deterministic_by_seed():
    a, b = S.dataset(50, seed=7), S.dataset(50, seed=7)
    assert a == b
    assert S.dataset(20, seed=7) == a[:20]  # one stream: shorter sets are prefixes
    assert S.dataset(50, seed=8) != a
    assert np.array_equal(np.asarray(S.render(a[3], 64)), np.asarray(S.render(b[3], 64)))
    noisy = next(s for s in a if s.background == "noise")
    assert np.array_equal(np.asarray(S.render(noisy, 48)), np.asarray(S.render(noisy, 48)))


def test_world_covers_the_spec():
    ds = S.dataset(N, seed=0)
    objs = [o for s in ds for o in s.objects]
    assert {o.shape for o in objs} >= {"circle", "square", "triangle"}
    assert {o.color for o in objs} >= {"red", "green", "blue", "yellow"}
    assert {o.size for o in objs} == {"small", "large"}
    assert {len(s.objects) for s in ds} == {1, 2, 3}
    assert "white" in {s.background for s in ds} and len({s.background for s in ds}) >= 4
    # repeated objects happen, so counts above one are learnable
    assert any(max(Counter((o.shape, o.color, o.size) for o in s.objects).values()) > 1 for s in ds)
    for s in ds:  # inside the image and not overlapping
        for i, o in enumerate(s.objects):
            r = S.RADIUS[o.size]
            assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
            for p in s.objects[i + 1:]:
                assert np.hypot(o.x - p.x, o.y - p.y) > r + S.RADIUS[p.size]


def test_caption_names_every_object():
    for s in S.dataset(N, seed=1):
        c = S.caption(s)
        assert _parse_caption(c) == Counter((o.size, o.color, o.shape) for o in s.objects), c
        # the caption is a function of the set of objects, not of their order in the scene
        shuffled = list(s.objects)
        random.Random(0).shuffle(shuffled)
        assert S.caption(S.Scene(tuple(shuffled), s.background, s.bg_seed, s.bg_rgb)) == c


def test_caption_examples():
    o = lambda shape, color, size: S.Obj(shape, color, size, 0.5, 0.5, S.COLORS[color])  # noqa: E731
    sc = lambda *objs: S.Scene(tuple(objs), "white", 0)  # noqa: E731
    assert S.caption(sc(o("square", "blue", "small"), o("circle", "red", "large"))) == \
        "a large red circle and a small blue square"
    assert S.caption(sc(o("triangle", "green", "small"), o("circle", "yellow", "large"),
                        o("triangle", "green", "small"))) == "a large yellow circle and two small green triangles"
    assert S.caption(sc(o("square", "red", "small"))) == "a small red square"


def test_answers_consistent_with_scene():
    kinds = Counter()
    for s in S.dataset(N, seed=2):
        objs = s.objects
        qa = S.questions(s)
        assert len({q for q, _ in qa}) == len(qa)  # each question once
        for q, a in qa:
            w = q.rstrip("?").split(" ")
            if q.startswith("what color is the "):
                (m,) = [x for x in objs if x.shape == w[-1]]  # asked only when unique
                assert a == m.color
            elif q.startswith("what size is the "):
                (m,) = [x for x in objs if x.shape == w[-1]]
                assert a == m.size
            elif q.startswith("what shape is the "):
                (m,) = [x for x in objs if x.color == w[-2]]
                assert a == m.shape
            elif q == "how many objects are there?":
                assert a == NUM_WORD[len(objs)]
            elif q.startswith("how many") and w[-3] == "objects":
                assert a == NUM_WORD[sum(x.color == w[2] for x in objs)]
            elif q.startswith("how many"):
                assert a == NUM_WORD[sum(x.shape + "s" == w[2] for x in objs)]
            elif q.startswith("is there a "):
                assert a == ("yes" if any((x.color, x.shape) == (w[-2], w[-1]) for x in objs) else "no")
            elif q.startswith("where is the "):
                (m,) = [x for x in objs if (x.color, x.shape) == (w[-2], w[-1])]
                dx, dy = m.x - 0.5, m.y - 0.5
                want = {"left": -dx, "right": dx, "top": -dy, "bottom": dy}
                assert want[a] >= 0.15 and all(want[a] >= 2 * abs(v) for k, v in want.items()
                                               if k != a and {k, a} not in ({"left", "right"}, {"top", "bottom"}))
            else:
                raise AssertionError(q)
            kinds[" ".join(w[:2])] += 1
        # every unique shape gets a colour question, every shape a count question
        for shape in S.SHAPES:
            n = sum(o.shape == shape for o in objs)
            assert (f"what color is the {shape}?" in dict(qa)) == (n == 1)
            assert dict(qa)[f"how many {S.PLURAL[shape]} are there?"] == NUM_WORD[n]
        yn = [a for q, a in qa if q.startswith("is there")]
        assert sorted(yn) == ["no", "yes"]  # one of each per scene: the answers are balanced
    assert {"what color", "what shape", "how many", "is there", "where is"} <= set(kinds)
    # the question kinds the first demo model knew come first (callers take the first few)
    assert all(S.questions(s)[0][0].startswith(("what", "how")) for s in S.dataset(20, seed=2))


def _near(img: np.ndarray, rgb, tol=45) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(rgb)).max(-1) <= tol


def test_render_puts_the_named_colours_in_the_image():
    size = 96
    for s in S.dataset(60, seed=3):
        img = np.asarray(S.render(s, size))
        assert img.shape == (size, size, 3)
        present = {o.color for o in s.objects}
        for name, rgb in S.COLORS.items():
            n = _near(img, rgb).sum()
            if name in present:
                assert n >= 0.5 * (0.10 * size) ** 2, (name, n)  # at least a small triangle's worth
            else:
                assert n == 0, (name, n)  # backgrounds never pass for an object colour
        for o in s.objects:  # each shape covers its centre, in its own colour
            px = img[int(o.y * size), int(o.x * size)]
            assert _near(px[None], S.COLORS[o.color]).all(), (o, px)
        if s.background == "white":  # objects keep off the corners
            assert (img[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()


def test_shapes_differ_in_pixels():
    # a large circle fills more of its bounding box than a square of that box's inner size, and a
    # triangle less: check the areas order as the geometry says (triangle < square < circle)
    size, areas = 128, {}
    for shape in S.SHAPES:
        sc = S.Scene((S.Obj(shape, "red", "large", 0.5, 0.5, S.COLORS["red"]),), "white", 0)
        areas[shape] = _near(np.asarray(S.render(sc, size)), S.COLORS["red"]).sum()
    r = S.RADIUS["large"] * size
    np.testing.assert_allclose(areas["circle"], np.pi * (r + 0.5) ** 2, rtol=0.05)  # PIL's box holds both ends
    np.testing.assert_allclose(areas["square"], (2 * 0.82 * r) ** 2, rtol=0.05)
    np.testing.assert_allclose(areas["triangle"], 3 * np.sqrt(3) / 4 * (r + 1) ** 2, rtol=0.08)  # edges drawn in full


def test_write_jsonl(tmp_path):
    cap, qa = S.write_jsonl(tmp_path, 5, seed=4, size=32)
    caps = [json.loads(x) for x in cap.read_text().splitlines()]
    qas = [json.loads(x) for x in qa.read_text().splitlines()]
    ds = S.dataset(5, seed=4)
    assert [c["text"] for c in caps] == [S.caption(s) for s in ds]
    assert len(qas) == sum(len(S.questions(s)) for s in ds)
    assert set(qas[0]) == {"image", "question", "answer"} and set(caps[0]) == {"image", "text"}
    for c, s in zip(caps, ds):
        img = Image.open(tmp_path / c["image"])
        assert img.size == (32, 32) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(S.render(s, 32)))
    assert {q["image"] for q in qas} == {c["image"] for c in caps}


def test_styles_change_pixels_not_truth():
    plain = S.dataset(40, seed=9)
    styled = S.dataset(40, seed=9, style=S.SHIFT_STYLE)
    assert all(s.look != S.Look() for s in styled) and all(s.look == S.Look() for s in plain)
    assert any(o.outline for s in styled for o in s.objects) and any(o.angle for s in styled for o in s.objects)
    for s in styled[:12]:
        img = S.render(s, 96)
        w, h = S.canvas(s.look, 96)
        assert img.size == (w, h) and min(w, h) == max(8, round(96 * s.look.scale))
        assert np.array_equal(np.asarray(img), np.asarray(S.render(s, 96)))  # deterministic, noise and JPEG too
    touching = [o for s in styled for o in s.objects if min(o.x, o.y, 1 - o.x, 1 - o.y) < S.RADIUS[o.size]]
    assert touching  # SHIFT_STYLE puts some shapes against the border
    # an outline covers less of the canvas than the solid shape
    o = S.Obj("square", "red", "large", 0.5, 0.5, S.COLORS["red"])
    solid, ring = (np.asarray(S.render(S.Scene((x,), "white", 0), 128)) for x in (o, S.Obj(**{**o.__dict__, "outline": True})))
    assert 0.1 * _near(solid, S.COLORS["red"]).sum() < _near(ring, S.COLORS["red"]).sum() < 0.6 * _near(solid, S.COLORS["red"]).sum()
    styled_train = S.dataset(200, seed=9, style=S.TRAIN_STYLE)
    assert 0.15 < sum(s.look != S.Look() for s in styled_train) / 200 < 0.45  # a share, not all


def test_new_kinds_for_finetuning():
    new = (("star", "purple"),)
    ds = S.dataset(200, seed=5, new_kinds=new, new_p=0.4)
    stars = [s for s in ds if any(o.shape == "star" for o in s.objects)]
    assert len(stars) > 50 and all(o.color == "purple" for s in stars for o in s.objects if o.shape == "star")
    assert all(o.shape not in S.EXTRA_SHAPES for s in S.dataset(200, seed=5) for o in s.objects)
    s = next(x for x in stars if len({o.shape for o in x.objects}) > 1)
    assert "purple star" in S.caption(s)
    assert ("how many stars are there?", NUM_WORD[sum(o.shape == "star" for o in s.objects)]) in S.questions(s)
    img = np.asarray(S.render(s, 96))
    assert _near(img, S.EXTRA_COLORS["purple"]).sum() > 20


def test_phrasings_are_true_of_their_scene_and_not_of_most_others():
    from blip2.apps.demo import phrasing as P
    ds = S.dataset(120, seed=6)
    rng = random.Random(0)
    train_words, held_texts = set(), set()
    for fam in P.FAMILIES:
        for split in ("train", "held"):
            share = []
            for s in ds[:60]:
                text, q = P.describe(s, rng, fam, split)
                assert P.holds(q, s), (text, q)
                share.append(sum(P.holds(q, x) for x in ds) / len(ds))
                if split == "train":
                    train_words |= set(text.lower().replace(",", " ").split())
                else:
                    held_texts.add(text.lower())
            assert np.mean(share) < (0.4 if fam in ("partial", "case") else 0.05), (fam, split, np.mean(share))
    assert P.holds(P.Query(((None, None, "red", "circle"),)), S.Scene((S.Obj("circle", "red", "small", .5, .5, (0, 0, 0)),), "white", 0))
    two = S.Scene(tuple(S.Obj("square", "blue", "large", x, .5, (0, 0, 0)) for x in (.2, .8)), "white", 0)
    assert P.holds(P.Query(((2, None, None, "square"),)), two) and not P.holds(P.Query(((1, None, None, "square"),)), two)
    assert P.holds(P.Query((), total=2), two) and not P.holds(P.Query((), total=3), two)
    # held-out phrasings use the training words only, in forms training never uses
    assert all(w.strip(".!?") in train_words | {""} for t in held_texts for w in t.replace(",", " ").split())
    assert not any(t.startswith(("a photo with", "the picture shows", "an image with")) for t in train_words)
