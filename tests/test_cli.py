"""The installed `blip2` command, run in a subprocess on tiny checkpoints built with our classes:
its outputs equal the Python API's; bad inputs are reported and skipped; resume; errors."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

import hf_tiny
from blip2 import (
    Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Model, Blip2Processor,
    Blip2TextModelWithProjection, Blip2VisionModelWithProjection, BlipImageProcessor, scenes,
)
from blip2.processing.image import load_image
from blip2.processing.tokenization import Blip2Tokenizer

pytestmark = pytest.mark.slow  # every test runs the installed command in a subprocess

EXE = str(Path(sys.executable).with_name("blip2"))
PX, Q = 32, 4
WORDS = sorted(set("a an the photo of question answer what is color shape , ? : how many".split()
                   + list(scenes.SHAPES) + list(scenes.COLORS) + list(scenes.SIZES) + list(scenes.NUMBERS)))
VISION = dict(hf_tiny.VISION, image_size=PX, patch_size=8)


def _wordlevel(specials):
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token=specials[0]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def _images(d: Path, n: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"img{i}.png"
        scenes.render(scenes.make_scene(rng), size=40 + 8 * i).save(p)  # sizes differ: resize matters
        out.append(p)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    # captioning checkpoint: OPT, word-level tokenizer, processor adds <image>
    tok = Blip2Tokenizer(_wordlevel(["<unk>", "<pad>", "</s>"]), unk_token="<unk>", pad_token="<pad>",
                         bos_token="</s>", eos_token="</s>", add_bos_token=True)
    proc = Blip2Processor(BlipImageProcessor(size={"height": PX, "width": PX}), tok, num_query_tokens=Q)
    opt = dict(hf_tiny.OPT, vocab_size=len(proc.tokenizer), word_embed_proj_dim=32)
    cfg = Blip2Config(vision_config=VISION, qformer_config=hf_tiny.QFORMER, text_config=opt, num_query_tokens=Q,
                      image_token_index=proc.image_token_id)
    torch.manual_seed(0)
    m = hf_tiny.fan_in_init_(Blip2ForConditionalGeneration(cfg), 0)
    with torch.no_grad():
        m.language_model.get_input_embeddings().weight.mul_(0.4)  # O(1) logits through the tied head
    m.save_pretrained(root / "opt")
    proc.save_pretrained(root / "opt")
    # retrieval checkpoint: BERT-style tokenizer with [CLS] ... [SEP]
    tk = _wordlevel(["[UNK]", "[PAD]", "[CLS]", "[SEP]"])
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    rtok = Blip2Tokenizer(tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    rproc = Blip2Processor(BlipImageProcessor(size={"height": PX, "width": PX}), rtok)
    qf = dict(hf_tiny.QFORMER, vocab_size=len(rproc.tokenizer), pad_token_id=1, use_qformer_text_input=True)
    rcfg = Blip2Config(vision_config=VISION, qformer_config=qf, num_query_tokens=Q, image_text_hidden_size=16)
    torch.manual_seed(1)
    r = hf_tiny.fan_in_init_(Blip2ForImageTextRetrieval(rcfg), 1)
    r.save_pretrained(root / "itm")
    rproc.save_pretrained(root / "itm")
    return root


def run(*args, env=None, cwd=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=e, cwd=cwd, timeout=120)


def _api_captions(d, paths, prompt=None, quantize=None, **kw):
    m = Blip2ForConditionalGeneration.from_pretrained(d, **({"quantize": quantize} if quantize else {}))
    p = Blip2Processor.from_pretrained(d)
    imgs = [load_image(str(x)) for x in paths]
    if prompt is None:
        inp = p(images=imgs, return_tensors="pt")
        n = Q + 1
    else:
        inp = p(images=imgs, text=[prompt] * len(imgs), return_tensors="pt")
        n = inp["input_ids"].shape[1]
    out = m.generate(**inp, **kw)
    return [t.strip() for t in p.batch_decode(out[:, n:], skip_special_tokens=True)]


def test_caption_equals_api(ckpts, tmp_path):
    paths = _images(tmp_path / "imgs", 3)
    r = run("caption", *paths, "--model", ckpts / "opt", "--jsonl", "--max-new-tokens", 6, "--batch-size", 3)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    want = _api_captions(ckpts / "opt", paths, max_new_tokens=6)
    assert [x["path"] for x in recs] == [str(p) for p in paths]
    assert [x["text"] for x in recs] == want and all(want)
    assert recs[0]["options"]["max_new_tokens"] == 6

    # a folder (recursive), a prompt, two beam-search captions each; plain text on stdout
    r = run("caption", tmp_path / "imgs", "--model", ckpts / "opt", "--prompt", "a photo of",
            "--max-new-tokens", 5, "--num-captions", 2, "--batch-size", 3)
    assert r.returncode == 0, r.stderr
    want = _api_captions(ckpts / "opt", paths, prompt="a photo of", max_new_tokens=5, num_beams=2,
                         num_return_sequences=2)
    expect = []
    for i, p in enumerate(paths):
        expect += [f"{p}: {want[2 * i]}", f"    {want[2 * i + 1]}"]
    assert r.stdout.splitlines() == expect


def test_caption_quantized_equals_api(ckpts, tmp_path):
    paths = _images(tmp_path / "imgs", 2)
    r = run("caption", *paths, "--model", ckpts / "opt", "--jsonl", "--max-new-tokens", 5, "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["text"] for x in recs] == _api_captions(ckpts / "opt", paths, quantize="int8", max_new_tokens=5)


def test_ask_encodes_once_equals_api(ckpts, tmp_path):
    img = _images(tmp_path, 1)[0]
    qs = ["what color is the circle?", "how many squares are there?"]
    r = run("ask", img, *qs, "--model", ckpts / "opt", "--json", "--max-new-tokens", 5)
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)
    m = Blip2ForConditionalGeneration.from_pretrained(ckpts / "opt")
    p = Blip2Processor.from_pretrained(ckpts / "opt")
    for rec, q in zip(recs, qs):
        inp = p(images=load_image(str(img)), text=f"Question: {q} Answer:", return_tensors="pt")
        out = m.generate(**inp, max_new_tokens=5)
        want = p.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert rec["question"] == q and rec["text"] == want and rec["path"] == str(img)
    assert len(recs) == 2


def test_match_equals_api(ckpts, tmp_path):
    paths = _images(tmp_path, 2)
    texts = ["a red circle", "two blue squares and a green triangle"]
    out = tmp_path / "m.jsonl"
    r = run("match", *paths, "--text", *texts, "--model", ckpts / "itm", "--output", out)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    lines = r.stdout.splitlines()  # the table, on stdout
    assert "ITM" in lines[0] and len(lines) == 5 and f"{recs[0]['itm']:.4f}" in lines[1]
    assert len(recs) == 4
    m = Blip2ForImageTextRetrieval.from_pretrained(ckpts / "itm")
    p = Blip2Processor.from_pretrained(ckpts / "itm")
    for rec in recs:
        inp = p(images=load_image(rec["path"]), text=rec["text"], return_tensors="pt")
        with torch.no_grad():
            itm = m(**inp, use_image_text_matching_head=True).logits_per_image.softmax(-1)[0, 1].item()
            itc = m(**inp).logits_per_image[0, 0].item()
        assert rec["itm"] == pytest.approx(itm, abs=1e-5) and rec["itc"] == pytest.approx(itc, abs=1e-5)


def test_embed_equals_api(ckpts, tmp_path):
    paths = _images(tmp_path / "e", 3)
    texts = ["a red circle", "a big blue square"]
    out = tmp_path / "emb.npy"
    r = run("embed", *paths, "--text", *texts, "--model", ckpts / "itm", "--output", out, "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    img, txt = np.load(tmp_path / "emb.image.npy"), np.load(tmp_path / "emb.text.npy")
    ids = json.loads((tmp_path / "emb.image.json").read_text())["ids"]
    assert ids == [str(p) for p in paths]
    assert json.loads((tmp_path / "emb.text.json").read_text())["ids"] == texts
    vm = Blip2VisionModelWithProjection.from_pretrained(ckpts / "itm")
    tm = Blip2TextModelWithProjection.from_pretrained(ckpts / "itm")
    p = Blip2Processor.from_pretrained(ckpts / "itm")
    with torch.no_grad():
        want_i = vm(**p(images=[load_image(str(x)) for x in paths], return_tensors="pt")).image_embeds
        want_t = torch.stack([tm(**p.tokenizer(t, return_tensors="pt")).text_embeds[0, 0] for t in texts])
    np.testing.assert_allclose(img, want_i.numpy(), atol=1e-5)
    np.testing.assert_allclose(txt, want_t.numpy(), atol=1e-5)

    # a captioning checkpoint gives the Q-Former features; .parquet without pyarrow is a clear error
    r = run("embed", paths[0], "--model", ckpts / "opt", "--output", tmp_path / "q.npy")
    assert r.returncode == 0, r.stderr
    m = Blip2Model.from_pretrained(ckpts / "opt")
    with torch.no_grad():
        want = m.get_qformer_features(p(images=load_image(str(paths[0])), return_tensors="pt")["pixel_values"])
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), want.numpy(), atol=1e-5)
    r = run("embed", paths[0], "--model", ckpts / "itm", "--output", tmp_path / "e.parquet")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:  # one row per id: kind, shape and the flattened vector, equal to the .npy's
        assert r.returncode == 0, r.stderr
        t = pq.read_table(tmp_path / "e.parquet").to_pydict()
        assert t["id"] == [str(paths[0])] and t["kind"] == ["image"]
        np.testing.assert_allclose(np.array(t["embedding"][0]).reshape(t["shape"][0]), img[0], atol=1e-5)
    else:
        assert r.returncode == 2 and "pyarrow" in r.stderr and "Traceback" not in r.stderr


def test_bad_inputs_reported_and_resume(ckpts, tmp_path):
    """Truncated, non-image, decompression-bomb and missing inputs: each reported, the rest written."""
    from PIL import Image

    d = tmp_path / "mixed"
    good = _images(d / "sub", 3)
    (d / "truncated.png").write_bytes(good[0].read_bytes()[:120])
    (d / "fake.jpg").write_text("not an image at all")
    (d / "notes.txt").write_text("ignored: not an image extension")
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 16  # past Pillow's decompression-bomb refusal
    Image.new("1", (side, side)).save(d / "bomb.png")
    out = tmp_path / "caps.jsonl"
    args = ["--model", ckpts / "opt", "--max-new-tokens", 4, "--output", out, "--batch-size", 2]
    r = run("caption", d, tmp_path / "missing.png", *args)
    assert r.returncode == 1
    for name in ("truncated.png", "fake.jpg", "missing.png", "bomb.png"):
        assert any(name in line for line in r.stderr.splitlines() if "skipped" in line), r.stderr
    assert "decompression bomb" in r.stderr and "truncated" in r.stderr
    assert "6/6 images" in r.stderr  # progress, shown from a handful of images on
    assert r.stderr.strip().splitlines()[-1].startswith("blip2: 4 of 7 input(s) failed")
    assert "Traceback" not in r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["path"] for x in recs) == sorted(str(p) for p in good)
    assert [x["text"] for x in recs] == _api_captions(ckpts / "opt", [x["path"] for x in recs], max_new_tokens=4)

    # re-run: the three finished images are skipped; a new one is added once
    new = _images(d / "more", 1, seed=5)[0]
    r = run("caption", d / "sub", new, *args)
    assert r.returncode == 0, r.stderr
    assert "3 image(s) already in" in r.stderr
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(paths) == sorted([str(p) for p in good] + [str(new)])


def test_model_errors(tmp_path):
    img = _images(tmp_path, 1)[0]
    r = run("caption", img, "--model", "nobody-xyz/no-such-blip2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no-such-blip2" in r.stderr and "huggingface-cli download" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("info", "demo", "--json")  # the shipped demo model resolves offline
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "Blip2ForConditionalGeneration"


def test_info_counts(ckpts):
    r = run("info", ckpts / "opt", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    m = Blip2ForConditionalGeneration.from_pretrained(ckpts / "opt")
    assert info["architecture"] == "Blip2ForConditionalGeneration" and info["language_model"] == "opt"
    assert info["parameters"] == m.num_parameters()
    assert set(info["parts"]) == {"vision_model", "query_tokens", "qformer", "language_projection", "language_model"}
    for part, n in info["parts"].items():
        mod = getattr(m, part)
        assert n == (mod.numel() if isinstance(mod, torch.nn.Parameter) else sum(p.numel() for p in mod.parameters()))
    assert info["files"]["model.safetensors"] == (ckpts / "opt" / "model.safetensors").stat().st_size
    assert info["stored_dtypes"] == {"F32": len(m.state_dict()) - len(m.tied_weights())}

    r = run("info", ckpts / "itm")  # the readable form
    assert r.returncode == 0, r.stderr
    n = Blip2ForImageTextRetrieval.from_pretrained(ckpts / "itm").num_parameters()
    assert "Blip2ForImageTextRetrieval" in r.stdout and f"{n:,}" in r.stdout and n != m.num_parameters()


# --- the shipped demo model: the README's first command and its neighbours ----------------------

def _demo_truth():
    from blip2 import demo

    return demo.example_images(), json.loads((demo.DEMO_DIR / "examples" / "scenes.json").read_text())


def test_demo_caption_shipped_examples():
    """The README's first command: `blip2 caption --model demo` on the shipped examples gives the
    Python API's captions, which name the scenes' shapes and colours."""
    from blip2 import demo

    paths, truth = _demo_truth()
    r = run("caption", *paths, "--model", "demo", "--jsonl")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["path"] for x in recs] == [str(p) for p in paths]
    want = _api_captions(demo.demo_checkpoint("captioning"), paths, max_new_tokens=30)
    assert [x["text"] for x in recs] == want
    for rec in recs:  # every caption is in the world's language: known colours and shapes only
        assert sum(demo.parse_caption(rec["text"]).values()) >= 1, rec


def test_demo_ask_answers():
    from blip2 import demo

    paths, truth = _demo_truth()
    p = paths[0]
    qs = list(truth[p.name]["questions"])[:4]
    r = run("ask", p, *qs, "--model", "demo", "--jsonl")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["question"] for x in recs] == qs
    d = demo.demo_checkpoint("captioning")
    m, proc = Blip2ForConditionalGeneration.from_pretrained(d), Blip2Processor.from_pretrained(d)
    for rec, q in zip(recs, qs):
        inp = proc(images=load_image(str(p)), text=f"Question: {q} Answer:", return_tensors="pt")
        out = m.generate(**inp, max_new_tokens=20)
        assert rec["text"] == proc.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert rec["text"] in ("zero", "one", "two", "three", *scenes.COLORS, *scenes.SHAPES, *scenes.SIZES), rec


def test_demo_match_ranks_true_caption_first():
    paths, truth = _demo_truth()
    paths = paths[:4]
    caps = [truth[p.name]["caption"] for p in paths]
    r = run("match", *paths, "--text", *caps, "--model", "demo", "--jsonl")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 16
    for p, cap in zip(paths, caps):
        mine = [x for x in recs if x["path"] == str(p)]
        assert max(mine, key=lambda x: x["itm"])["text"] == cap
        assert max(mine, key=lambda x: x["itc"])["text"] == cap


def test_demo_embed_equals_api(tmp_path):
    from blip2 import demo

    paths, _ = _demo_truth()
    r = run("embed", *paths[:3], "--model", "demo", "--output", tmp_path / "e.npy")
    assert r.returncode == 0, r.stderr
    d = demo.demo_checkpoint("retrieval")
    vm = Blip2VisionModelWithProjection.from_pretrained(d)
    p = Blip2Processor.from_pretrained(d)
    with torch.no_grad():
        want = vm(**p(images=[load_image(str(x)) for x in paths[:3]], return_tensors="pt")).image_embeds
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want.numpy(), atol=1e-5)
