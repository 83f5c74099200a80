"""The shipped demo model (blip2.demo): its quality on held-out scenes, that transformers reads it
and captions the same, and that the from-scratch recipe runs end to end."""

import json

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor, scenes
from blip2 import demo
from blip2.demo import demo_checkpoint


def test_demo_checkpoint_names():
    assert demo_checkpoint("captioning").name == "captioning"
    assert (demo_checkpoint("retrieval") / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="captioning"):
        demo_checkpoint("nope")


def test_shipped_size_under_20mb():
    total = sum(p.stat().st_size for p in demo.DEMO_DIR.rglob("*") if p.is_file())
    assert total < 20 * 2**20, total


def test_patch_targets_cover_the_object():
    o = scenes.Obj("square", "red", "large", 0.5, 0.5, scenes.COLORS["red"])
    s = scenes.Scene((o,), "white", 0)
    t = demo.patch_targets(s, grid=8)  # (64, 25)
    assert t.shape == (64, 25)
    torch.testing.assert_close(torch.from_numpy(t.sum(1)), torch.ones(64))
    k = 1 + demo.KINDS.index(("square", "red", "large"))
    assert t[3 * 8 + 3, k] == 1.0 and t[4 * 8 + 4, k] == 1.0  # centre patches: inside the square
    assert t[0, 0] == 1.0  # corner: background
    assert t[:, k].sum() == pytest.approx((2 * scenes.RADIUS["large"] * 0.82) ** 2 * 64, rel=0.1)  # the square's area
    # a wide canvas squeezes the square as the image processor squeezes the image: the same area, wider than tall
    wide = scenes.Scene((o,), "white", 0, look=scenes.Look(aspect=2.0))
    tw = demo.patch_targets(wide, grid=8)[:, k].reshape(8, 8)
    assert tw.sum() == pytest.approx(t[:, k].sum() / 2, rel=0.15) and (tw.sum(1) > 0).sum() > (tw.sum(0) > 0).sum()


def test_parse_caption():
    c = demo.parse_caption("two small red circles, a large blue square and a small red circle")
    assert c == {("red", "circle"): 3, ("blue", "square"): 1}


@pytest.fixture(scope="module")
def quality():
    return demo.evaluate()  # the shipped checkpoints, 200 held-out scenes


TARGETS_4 = {  # issue #4: captions naming every object right, VQA on colour/shape/count, ITC R@1 among 100, ITM
    "caption_objects_correct": 0.95, "vqa_color_shape_count": 0.90, "itc_text_to_image_r1": 0.90, "itm_accuracy": 0.95,
}


@pytest.mark.slow
def test_quality_reaches_targets(quality):
    """The shipped checkpoints reach issue 4's targets; the figures in quality.json (quoted in the
    README) are what the shipped files give, and so is its record of which of issue 20's targets
    are met."""
    rec = json.loads((demo.DEMO_DIR / "quality.json").read_text())
    for k, target in TARGETS_4.items():
        assert quality[k] >= target, (k, quality[k])
    for k, v in rec["figures"].items():
        assert quality[k] == pytest.approx(v, abs=0.011), k
    met = demo.targets_met(quality)
    assert set(met) == set(demo.TARGETS)
    for k, ok in rec["targets_met"].items():
        assert met[k] == ok or abs(quality[k] - demo.TARGETS[k]) < 0.011, k


def test_examples_have_their_scenes():
    truth = json.loads((demo.DEMO_DIR / "examples" / "scenes.json").read_text())
    paths = demo.example_images()
    assert [p.name for p in paths] == sorted(truth) and len(paths) >= 4
    scs = demo.example_scenes(len(paths) // 3)  # the first of each object count in their stream: none picked
    assert len(scs) == len(paths)
    for p, s in zip(paths, scs):
        assert truth[p.name]["caption"] == scenes.caption(s)
        assert truth[p.name]["questions"] == dict(scenes.questions(s))
    # a spread: one, two and three objects, and both sizes alone and together
    assert {len(s.objects) for s in scs} == {1, 2, 3}
    assert {frozenset(o.size for o in s.objects) for s in scs} == {frozenset({"small"}), frozenset({"large"}),
                                                                   frozenset({"small", "large"})}


def _held_out(n, seed=7):
    return [scenes.render(s) for s in scenes.dataset(n, seed=seed)]


def test_captioning_checkpoint_in_transformers():
    """transformers 5.8.0 loads the shipped captioning checkpoint and its processor and produces
    the same token ids, greedy and beam, on held-out scenes."""
    import transformers as hf

    d = demo_checkpoint("captioning")
    images = _held_out(6)
    theirs = hf.Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    hproc = hf.Blip2Processor.from_pretrained(d)
    ours = Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    proc = Blip2Processor.from_pretrained(d)
    prompts = [None, "Question: how many objects are there? Answer:"]
    for prompt in prompts:
        kw = {} if prompt is None else dict(text=[prompt] * len(images))
        a = proc(images=images, return_tensors="pt", **kw)
        b = hproc(images=images, return_tensors="pt", **kw)
        assert set(a) == set(b)
        if "input_ids" in a:
            assert torch.equal(a["input_ids"], b["input_ids"])
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
        for gen in (dict(num_beams=1), dict(num_beams=3)):
            with torch.no_grad():
                x = ours.generate(**a, max_new_tokens=30, **gen)
                y = theirs.generate(**b, max_new_tokens=30, **gen)
            assert x.tolist() == y.tolist(), (prompt, gen)
    assert proc.batch_decode(x, skip_special_tokens=True) == hproc.batch_decode(y, skip_special_tokens=True)


def test_retrieval_checkpoint_in_transformers():
    import transformers as hf

    d = demo_checkpoint("retrieval")
    scs = scenes.dataset(5, seed=11)
    images = [scenes.render(s) for s in scs]
    caps = [scenes.caption(s) for s in scs]
    theirs = hf.Blip2ForImageTextRetrieval.from_pretrained(d, dtype=torch.float32).eval()
    hproc = hf.Blip2Processor.from_pretrained(d)
    ours = Blip2ForImageTextRetrieval.from_pretrained(d, dtype=torch.float32)
    proc = Blip2Processor.from_pretrained(d)
    a = proc(images=images, text=caps, return_tensors="pt", padding=True)
    b = hproc(images=images, text=caps, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        for itm in (True, False):
            x = ours(**a, use_image_text_matching_head=itm).logits_per_image
            y = theirs(**b, use_image_text_matching_head=itm).logits_per_image
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_quick_build_runs_end_to_end(tmp_path):
    """The reproduce command's pipeline on a few steps of each phase: it writes loadable
    checkpoints in the shipped layout (quality is the shipped model's test above)."""
    rec = demo.build(tmp_path / "demo", tmp_path / "work", demo.Recipe(**demo.QUICK), examples=2, eval_scenes=20)
    for name in demo.NAMES:
        d = tmp_path / "demo" / name
        assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {p.name for p in d.iterdir()}
    assert set(rec["seconds"]) == {"data", "tokenizers", "vision", "language", "stage1", "stage2", "ship", "eval"}
    m = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "demo" / "captioning")
    r = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "demo" / "retrieval")
    # the shipped layout: same config shape as the real demo
    assert m.config.num_query_tokens == demo.Recipe().num_query_tokens
    assert r.config.qformer_config.use_qformer_text_input
    assert len(list((tmp_path / "demo" / "examples").glob("*.png"))) == 6  # 2 of each object count
