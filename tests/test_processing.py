"""Parity of blip2's image processor, tokenizers and Blip2Processor with transformers 5.8.0.

Fixtures are built offline: tiny BPE / Unigram / WordPiece vocabularies trained with `tokenizers`,
written to disk by transformers' own save_pretrained (the 5.x layout) or hand-written in the older
hub layout; images are scikit-image photographs in many PIL modes and file formats.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

warnings.filterwarnings("ignore")

from blip2.processing.image import BlipImageProcessor, ImageLoadError, load_image  # noqa: E402
from blip2.processing.processor import Blip2Processor  # noqa: E402
from blip2.processing.encoding import BatchEncoding  # noqa: E402
from blip2.processing.tokenization import Blip2Tokenizer  # noqa: E402

hf = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

CORPUS = [
    "a photo of a cat sitting on a couch", "Question: what is in the image? Answer: a dog.",
    "The quick brown fox jumps over the lazy dog!", "two people riding bicycles down the street",
    "I can't believe it's not butter, isn't it?", "A man in a red shirt is playing tennis .",
    "Question: how many horses are there? Answer: three", "a plate of food with broccoli and rice",
    "café naïve résumé — UPPER case Words", "what's the weather like? it's sunny, isn't it",
] * 4
PROMPTS = ["a photo of a cat", "Question: what is in the image? Answer:", "dog", "",
           "The QUICK brown fox can't stop , isn't it ?", "café naïve  résumé\twith   spaces"]
NQ = 4  # num_query_tokens of the tiny processors


# ----------------------------------------------------------------------------- fixtures
def _hf_image_processor(**kw):
    return hf.BlipImageProcessorPil(**kw)


def _train_bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tr = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, tr)
    merges = json.loads(tk.to_str())["model"]["merges"]
    return tk.get_vocab(), [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def _train_unigram():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tr = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                 show_progress=False)
    tk.train_from_iterator(CORPUS, tr)
    return [tuple(v) for v in json.loads(tk.to_str())["model"]["vocab"]]


def _wordpiece_vocab():
    words = sorted({w.strip(".,!?:").lower() for s in CORPUS for w in s.split()} - {""})
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?:'-—")
    pieces += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##s", "##ing", "##ed"]
    pieces += [w for w in words if w.isascii() and w.isalpha()][:60]
    return {p: i for i, p in enumerate(dict.fromkeys(pieces))}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> directory of a tiny processor checkpoint."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    ip = _hf_image_processor(size={"height": 30, "width": 30})
    vocab, merges = _train_bpe()

    # OPT, written by transformers 5.8 (tokenizer.json + tokenizer_config.json + processor_config.json)
    tok = hf.GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="</s>",
                           pad_token="<pad>", add_bos_token=True)
    hf.Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=NQ).save_pretrained(root / "opt")
    out["opt"] = root / "opt"

    # OPT, older hub layout: vocab.json + merges.txt, no tokenizer.json, preprocessor_config.json
    d = root / "opt_legacy"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok_cfg = {"add_bos_token": True, "add_prefix_space": False, "errors": "replace",
               "bos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True,
                             "rstrip": False, "single_word": False},
               "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True,
                             "rstrip": False, "single_word": False},
               "pad_token": {"__type": "AddedToken", "content": "<pad>", "lstrip": False, "normalized": True,
                             "rstrip": False, "single_word": False},
               "unk_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True,
                             "rstrip": False, "single_word": False},
               "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "GPT2Tokenizer"}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
         "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>"}))
    ip.to_json_file(d / "preprocessor_config.json")
    out["opt_legacy"] = d

    # OPT, late-2024 hub layout: legacy files + tokenizer.json + added_tokens.json (<image>) + processor_config.json
    d = root / "opt_hub"
    d.mkdir()
    for f in (root / "opt_legacy").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    raw = Tokenizer(BPE(vocab=vocab, merges=merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    raw.add_special_tokens(["<pad>", "</s>"])
    raw.add_tokens(["<image>"])
    raw.save(str(d / "tokenizer.json"))
    (d / "added_tokens.json").write_text(json.dumps({"<image>": len(vocab)}))
    (d / "processor_config.json").write_text(json.dumps({"num_query_tokens": NQ, "processor_class": "Blip2Processor"}))
    out["opt_hub"] = d

    # Flan-T5 style Unigram, written by transformers
    uvocab = _train_unigram()
    t5 = hf.T5Tokenizer(vocab=uvocab, extra_ids=3)
    hf.Blip2Processor(image_processor=_hf_image_processor(size={"height": 24, "width": 24}), tokenizer=t5,
                      num_query_tokens=NQ).save_pretrained(root / "t5")
    out["t5"] = root / "t5"

    # T5, hand-written hub-like files: a tokenizer.json whose own normalizer the T5 class ignores
    d = root / "t5_hub"
    d.mkdir()
    from tokenizers import normalizers
    from tokenizers.models import Unigram

    raw = Tokenizer(Unigram(uvocab, unk_id=2))
    raw.normalizer = normalizers.NFKC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    raw.decoder = decoders.Metaspace()
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    raw.add_special_tokens(["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(5)])
    raw.save(str(d / "tokenizer.json"))
    extra = [f"<extra_id_{i}>" for i in range(5)]
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"additional_special_tokens": extra, "eos_token": "</s>", "extra_ids": 5, "model_max_length": 512,
         "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "T5Tokenizer"}))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    _hf_image_processor(size={"height": 24, "width": 24}).to_json_file(d / "preprocessor_config.json")
    (d / "processor_config.json").write_text(json.dumps({"num_query_tokens": NQ, "processor_class": "Blip2Processor"}))
    out["t5_hub"] = d

    # BERT uncased WordPiece + [DEC] bos (retrieval checkpoints), written by transformers
    wp = _wordpiece_vocab()
    bert = hf.BertTokenizer(vocab=wp, model_max_length=32)
    bert.add_special_tokens({"bos_token": "[DEC]"})
    hf.Blip2Processor(image_processor=_hf_image_processor(size={"height": 28, "width": 28}), tokenizer=bert,
                      num_query_tokens=NQ).save_pretrained(root / "bert")
    out["bert"] = root / "bert"

    # BERT, older layout: vocab.txt + tokenizer_config.json with added_tokens_decoder
    d = root / "bert_legacy"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(wp) + "\n")
    sp = lambda c: {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,  # noqa: E731
                    "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(wp[t]): sp(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
         | {str(len(wp)): sp("[DEC]")},
         "bos_token": "[DEC]", "clean_up_tokenization_spaces": True, "cls_token": "[CLS]", "do_basic_tokenize": True,
         "do_lower_case": True, "mask_token": "[MASK]", "model_max_length": 512, "never_split": None,
         "pad_token": "[PAD]", "sep_token": "[SEP]", "strip_accents": None, "tokenize_chinese_chars": True,
         "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]"}))
    _hf_image_processor(size={"height": 28, "width": 28}).to_json_file(d / "preprocessor_config.json")
    out["bert_legacy"] = d
    return out


# ----------------------------------------------------------------------------- images
def _photo(name="astronaut", step=8):
    a = getattr(skdata, name)()
    return a[::step, ::step].copy()


def _mode_image(mode):
    rgb = Image.fromarray(_photo("coffee", 10))  # (40, 60) RGB
    h, w = rgb.height, rgb.width
    gray = np.asarray(Image.fromarray(_photo("camera", 4)).resize((w, h)))
    if mode == "RGBA":
        return Image.fromarray(np.dstack([np.asarray(rgb), gray]), "RGBA")  # varying alpha
    if mode == "LA":
        return Image.fromarray(np.dstack([gray, 255 - gray]), "LA")
    if mode == "PA":
        p = rgb.convert("P").convert("PA")
        p.putalpha(Image.fromarray(gray))
        return p
    if mode == "P_transparency":
        p = rgb.convert("P")
        p.info["transparency"] = 0
        return p
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 3 - 100, "I")  # values outside [0, 255]
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.int32) * 257, "I").convert("I;16")
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255.0 * 300.0, "F")
    if mode == "1":
        return Image.fromarray(gray > 128)
    return rgb.convert(mode)


MODES = ["RGB", "L", "LA", "P", "PA", "P_transparency", "RGBA", "CMYK", "I", "I;16", "F", "1", "YCbCr", "LAB",
         "HSV", "RGBX"]


def _ours_vs_ref(images, ours_kw=None, ref_kw=None, call_kw=None, ref_images=None):
    ours = BlipImageProcessor(**(ours_kw or {}))(images, return_tensors="pt", **(call_kw or {}))["pixel_values"]
    ref = _hf_image_processor(**(ref_kw if ref_kw is not None else ours_kw or {}))(
        ref_images if ref_images is not None else images, return_tensors="pt", **(call_kw or {}))["pixel_values"]
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (ours - ref).abs().max()
    return ours


def _ref_input(mode, im):
    """What the reference must be given to compute our numbers. The one documented difference:
    transformers clips 16-bit grayscale to white (convert("RGB") saturates), we keep its top 8
    bits, so ours on the I;16 image must equal the reference on the same picture in 8 bits."""
    return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L") if mode == "I;16" else im


@pytest.mark.parametrize("mode", MODES)
def test_pil_modes_match_reference(mode):
    im = _mode_image(mode)
    out = _ours_vs_ref(im, dict(size={"height": 24, "width": 32}), ref_images=_ref_input(mode, im))
    assert out.shape == (1, 3, 24, 32) and out.dtype == torch.float32


def test_batch_of_mixed_modes_and_sizes():
    ims = [_mode_image(m) for m in ("RGBA", "L", "CMYK")] + [Image.fromarray(_photo("chelsea", 6))]
    out = _ours_vs_ref(ims, dict(size={"height": 30, "width": 30}))
    assert out.shape == (4, 3, 30, 30)


@pytest.mark.parametrize("resample", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [{"height": 30, "width": 30}, {"height": 17, "width": 41}, 64])
def test_sizes_and_resample(size, resample):
    im = Image.fromarray(_photo("astronaut", 8))  # (64, 64): up- and down-sampling
    _ours_vs_ref(im, dict(size=size, resample=resample))


@pytest.mark.parametrize("flags", [
    dict(do_resize=False), dict(do_rescale=False), dict(do_normalize=False),
    dict(do_rescale=False, do_normalize=False), dict(rescale_factor=1 / 127.5, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    dict(image_mean=0.5, image_std=0.25),
])
def test_flags(flags):
    im = _mode_image("RGBA")
    _ours_vs_ref(im, dict(size={"height": 20, "width": 20}, **flags))
    # the same flags given per call override the configured ones
    _ours_vs_ref(im, dict(size={"height": 20, "width": 20}), call_kw=flags)


def test_numpy_and_torch_inputs():
    hwc = _photo("chelsea", 8)  # (38, 56, 3) uint8
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    kw = dict(size={"height": 22, "width": 26})
    for x in (hwc, chw, hwc.astype(np.float32) / 255.0, hwc.astype(np.float64), torch.from_numpy(chw),
              torch.from_numpy(hwc.astype(np.float32) / 255.0), np.stack([hwc, hwc[::-1]]),
              [hwc, chw], torch.from_numpy(np.stack([chw, chw]))):
        _ours_vs_ref(x, kw)
    # ambiguous/invalid shapes and values raise ValueError, like the reference
    with pytest.raises(ValueError):
        BlipImageProcessor(**kw)(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(ValueError):
        BlipImageProcessor(**kw)(hwc.astype(np.float32) * 2.5)  # floats outside [0, 1] that are not integral


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"),
                                      ("BMP", "P"), ("GIF", "P"), ("TIFF", "I;16"), ("WEBP", "RGBA"), ("PNG", "LA")])
def test_files_match_reference(tmp_path, fmt, mode):
    im = _mode_image(mode)
    p = tmp_path / f"img.{fmt.lower()}"
    im.save(p, format=fmt)
    ref = str(p) if mode != "I;16" else _ref_input(mode, im)
    _ours_vs_ref(str(p), dict(size={"height": 24, "width": 24}), ref_images=ref)
    _ours_vs_ref([p, p], dict(size={"height": 24, "width": 24}), ref_images=[ref, ref])  # Path objects too
    assert load_image(p).mode == "RGB"


def test_exif_orientation_applied_for_paths(tmp_path):
    im = Image.fromarray(_photo("chelsea", 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif)
    assert load_image(p).size == (im.height, im.width)
    _ours_vs_ref(str(p), dict(size={"height": 16, "width": 24}))


def test_image_processor_config_roundtrip(tmp_path):
    cfg = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.5, 0.4, 0.3], "image_processor_type": "BlipImageProcessor", "image_std": [0.2, 0.3, 0.4],
           "processor_class": "Blip2Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
           "size": {"height": 26, "width": 22}, "some_future_key": {"a": 1}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    ours = BlipImageProcessor.from_pretrained(tmp_path)
    assert ours.to_dict() == cfg  # unknown keys survive
    ref = hf.BlipImageProcessorPil.from_pretrained(tmp_path)
    im = _mode_image("RGB")
    a, b = ours(im, return_tensors="pt")["pixel_values"], ref(im, return_tensors="pt")["pixel_values"]
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    out = tmp_path / "saved"
    ours.save_pretrained(out)
    again = hf.BlipImageProcessorPil.from_pretrained(out)(im, return_tensors="pt")["pixel_values"]
    assert torch.allclose(again, b, atol=1e-6, rtol=0)
    # the nested form of processor_config.json
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "processor_config.json").write_text(json.dumps({"image_processor": cfg, "num_query_tokens": 3}))
    assert BlipImageProcessor.from_pretrained(tmp_path / "nested").to_dict() == cfg
    # no return_tensors: a list of float32 numpy arrays, like the reference
    lst = ours([im, im])["pixel_values"]
    assert isinstance(lst, list) and lst[0].dtype == np.float32 and lst[0].shape == (3, 26, 22)


def test_bad_images_raise_clear_errors(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(_photo("astronaut", 4)).save(good)
    missing = tmp_path / "missing.jpg"
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    buf = io.BytesIO()
    Image.fromarray(_photo("astronaut", 4)).save(buf, format="JPEG")
    trunc_jpg = tmp_path / "trunc.jpg"
    trunc_jpg.write_bytes(buf.getvalue()[:600])
    ip = BlipImageProcessor(size={"height": 8, "width": 8})
    for path, why in [(missing, "no such file"), (text, "not an image"), (trunc, "truncated"), (trunc_jpg, "truncated"),
                      (tmp_path, "not a regular file")]:
        with pytest.raises(ImageLoadError) as e:
            ip(str(path))
        assert str(path) in str(e.value) and why in str(e.value), str(e.value)
        assert isinstance(e.value, ValueError)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 128x128 = 16384 > 2 * 1000
    with pytest.raises(ImageLoadError, match="decompression bomb") as e:
        load_image(good)
    assert str(good) in str(e.value)
    for bad in (12, {"a": 1}, b"bytes"):
        with pytest.raises(TypeError, match=type(bad).__name__):
            ip(bad)


# ----------------------------------------------------------------------------- tokenizers
NAMES = ["opt", "opt_legacy", "opt_hub", "t5", "t5_hub", "bert", "bert_legacy"]
TEXTS = PROMPTS + ["ﬁne ＡＢＣ ① <image> </s> [SEP] [dec]"]  # NFKC-sensitive chars, special tokens in text


def _pair(ckpts, name):
    return Blip2Processor.from_pretrained(ckpts[name]), hf.Blip2Processor.from_pretrained(ckpts[name])


def _same(x, y):
    assert list(x.keys()) == list(y.keys())
    for k in y:
        a, b = x[k], y[k]
        if torch.is_tensor(b):
            assert torch.is_tensor(a) and a.dtype == b.dtype and a.shape == b.shape, k
            assert torch.equal(a, b) if not b.is_floating_point() else torch.allclose(a, b, atol=1e-6, rtol=0), k
        elif isinstance(b, list) and b and isinstance(b[0], np.ndarray):  # pixel_values without return_tensors
            assert len(a) == len(b) and all(np.allclose(u, v, atol=1e-6, rtol=0) for u, v in zip(a, b)), k
        else:
            assert a == b, (k, a, b)


def _both(fa, fb):
    """Run both; they must agree on the result, or both raise the same kind of error."""
    try:
        y = fb()
    except (ValueError, TypeError) as e:
        with pytest.raises(type(e)):
            fa()
        return None
    x = fa()
    _same(x, y)
    return x


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_matches_reference(ckpts, name):
    a, b = (p.tokenizer for p in _pair(ckpts, name))
    assert len(a) == len(b) and a.vocab_size == b.vocab_size and a.get_vocab() == b.get_vocab()
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "all_special_ids", "padding_side",
                 "model_max_length", "pad_token", "eos_token", "bos_token", "model_input_names", "all_special_tokens"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert {i: (t.content, t.special) for i, t in a.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in b.added_tokens_decoder.items()}
    for kw in [dict(), dict(padding=True), dict(padding="longest", return_tensors="pt"),
               dict(padding="max_length", max_length=24), dict(truncation=True, max_length=7, padding=True),
               dict(max_length=5), dict(add_special_tokens=False, padding=True, return_tensors="pt"),
               dict(padding=True, return_attention_mask=False), dict(padding="max_length")]:
        for side in ("right", "left"):
            a.padding_side = b.padding_side = side
            _both(lambda: a(TEXTS, **kw), lambda: b(TEXTS, **kw))
            _both(lambda: a(TEXTS[1], **kw), lambda: b(TEXTS[1], **kw))
    a.truncation_side = b.truncation_side = "left"
    _both(lambda: a(TEXTS, truncation=True, max_length=6), lambda: b(TEXTS, truncation=True, max_length=6))
    _both(lambda: a(TEXTS, padding=True, return_tensors="pt", padding_side="left"),
          lambda: b(TEXTS, padding=True, return_tensors="pt", padding_side="left"))
    assert a.encode(TEXTS[4]) == b.encode(TEXTS[4])
    toks = a.convert_ids_to_tokens(a.encode(TEXTS[4]))
    assert toks == b.convert_ids_to_tokens(b.encode(TEXTS[4]))
    assert a.convert_tokens_to_ids(toks) == b.convert_tokens_to_ids(toks)
    assert a.convert_tokens_to_ids("never-seen-token") == b.convert_tokens_to_ids("never-seen-token")
    assert a.tokenize(TEXTS[0]) == b.tokenize(TEXTS[0])


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_reference(ckpts, name):
    a, b = (p.tokenizer for p in _pair(ckpts, name))
    ids = b(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.full((len(TEXTS), 2), b.eos_token_id or b.sep_token_id)], 1)
    for skip in (False, True):
        for clean in (None, True, False):
            assert a.batch_decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                b.batch_decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
            assert a.decode(ids[4], skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                b.decode(ids[4], skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
        assert a.decode(ids.tolist(), skip_special_tokens=skip) == b.decode(ids.tolist(), skip_special_tokens=skip)
        assert a.decode(int(ids[0, 1])) == b.decode(int(ids[0, 1]))


@pytest.mark.parametrize("name", ["opt", "opt_legacy", "t5_hub", "bert_legacy"])
def test_added_tokens_and_save_roundtrip(ckpts, name, tmp_path):
    a, b = (p.tokenizer for p in _pair(ckpts, name))
    for t in (a, b):
        assert t.add_tokens(["brandnew", "<loc_1>"]) == 2
        assert t.add_tokens(["<spec>"], special_tokens=True) == 1
        assert t.add_special_tokens({"extra_special_tokens": ["<x1>", "<x2>"]}) == 2
    text = ["brandnew <loc_1> photo <spec> <x1>x", "dog <x2>"]
    _same(a(text, padding=True), b(text, padding=True))
    assert a.batch_decode(a(text)["input_ids"], skip_special_tokens=True) == \
        b.batch_decode(b(text)["input_ids"], skip_special_tokens=True)
    assert a.all_special_ids == b.all_special_ids and len(a) == len(b)
    a.save_pretrained(tmp_path / "ours")
    ra = Blip2Tokenizer.from_pretrained(tmp_path / "ours")
    rb = hf.AutoTokenizer.from_pretrained(tmp_path / "ours")
    for kw in (dict(), dict(padding=True, return_tensors="pt")):
        _same(ra(text + TEXTS, **kw), b(text + TEXTS, **kw))
        _same(rb(text + TEXTS, **kw), b(text + TEXTS, **kw))
    ids = b(text + TEXTS, padding=True)["input_ids"]
    assert ra.batch_decode(ids, skip_special_tokens=True) == b.batch_decode(ids, skip_special_tokens=True)


def test_setting_pad_token_and_bos(ckpts):
    a, b = (p.tokenizer for p in _pair(ckpts, "opt_legacy"))
    for t in (a, b):
        t.pad_token = t.eos_token
        t.add_bos_token = False
    _same(a(TEXTS, padding=True), b(TEXTS, padding=True))
    assert a.pad_token_id == b.pad_token_id


def test_missing_tokenizer_files_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(FileNotFoundError) as e:
        Blip2Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value) and "merges.txt" in str(e.value)
    BlipImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Blip2Processor.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- processor
@pytest.mark.parametrize("name", NAMES)
def test_processor_matches_reference(ckpts, name):
    a, b = _pair(ckpts, name)
    assert a.num_query_tokens == b.num_query_tokens
    ims = [Image.fromarray(_photo(n, 8)) for n in ("astronaut", "coffee", "chelsea")]
    ims.append(_mode_image("RGBA"))
    texts = TEXTS[:4]
    calls = [dict(images=ims, text=texts, padding=True), dict(images=ims, text=texts, padding="max_length", max_length=24),
             dict(images=ims, text=texts, padding=True, truncation=True, max_length=NQ + 3),
             dict(images=ims, text=texts, max_length=NQ + 4), dict(images=ims[0], text=texts[1]),
             dict(images=ims[:2], text=texts[:2], padding=True, add_special_tokens=False),
             dict(text=texts, padding=True), dict(text=texts, padding=True, max_length=NQ + 5, truncation=True),
             dict(text=texts[0]), dict(images=ims), dict(images=ims[1]),
             dict(images=ims[:2], text=texts[:2], padding=True, size={"height": 12, "width": 16}, resample=2)]
    for kw in calls:
        for side in ("right", "left"):
            a.tokenizer.padding_side = b.tokenizer.padding_side = side
            if b.num_query_tokens is None and "max_length" in kw:
                # transformers 5.8 raises TypeError (None subtraction, #42203); we leave max_length as given
                x = a(**kw)
                assert x["input_ids"] == b.tokenizer(kw["text"], **{k: v for k, v in kw.items() if k != "text"
                                                                    and k != "images"})["input_ids"]
                continue
            _both(lambda: a(**kw, return_tensors="pt"), lambda: b(**kw, return_tensors="pt"))
            if "text" in kw:
                _both(lambda: a(**kw), lambda: b(**kw))
    with pytest.raises(ValueError):
        a()


def test_processor_image_tokens_layout(ckpts):
    p = Blip2Processor.from_pretrained(ckpts["opt"])
    p.tokenizer.padding_side = "left"
    im = Image.fromarray(_photo("astronaut", 8))
    x = p(images=[im, im], text=["a photo of a cat", "dog"], padding=True, return_tensors="pt")
    img_id = p.tokenizer.convert_tokens_to_ids("<image>")
    assert img_id == p.image_token_id and img_id >= p.tokenizer.vocab_size
    assert (x.input_ids[:, :NQ] == img_id).all()
    # left padding sits between the image tokens and BOS
    assert x.input_ids[1, NQ] == p.tokenizer.pad_token_id and x.attention_mask[1, NQ] == 0
    assert x["attention_mask"][:, :NQ].all()
    assert x.pixel_values.shape == (2, 3, 30, 30) and x.pixel_values.dtype == torch.float32


def test_batch_encoding_to_and_unpacking(ckpts):
    p = Blip2Processor.from_pretrained(ckpts["t5"])
    im = Image.fromarray(_photo("coffee", 8))
    x = p(images=im, text="a photo of", return_tensors="pt").to("cpu", torch.float16)
    assert isinstance(x, BatchEncoding)
    assert x.pixel_values.dtype == torch.float16 and x.input_ids.dtype == torch.long
    assert x["attention_mask"].dtype == torch.long
    y = p(images=im, text="a photo of", return_tensors="pt").to(device="cpu", dtype=torch.bfloat16)
    assert y.pixel_values.dtype == torch.bfloat16 and y.input_ids.dtype == torch.long
    z = p(images=im, return_tensors="pt").to(torch.float64)
    assert z.pixel_values.dtype == torch.float64

    def f(pixel_values, input_ids, attention_mask):
        return pixel_values.shape[0] + input_ids.shape[0] + attention_mask.shape[0]

    assert f(**x) == 3
    with pytest.raises(AttributeError):
        x.not_a_key
    with pytest.raises(ValueError, match="padding"):
        p(text=["a", "a photo of a cat on a couch"], return_tensors="pt")


def test_processor_save_roundtrip(ckpts, tmp_path):
    for name in ("opt_hub", "bert_legacy"):
        a, b = _pair(ckpts, name)
        a.num_query_tokens = b.num_query_tokens = NQ
        a.save_pretrained(tmp_path / name)
        cfg = json.loads((tmp_path / name / "processor_config.json").read_text())
        assert cfg["num_query_tokens"] == NQ and cfg["image_processor"]["size"] == b.image_processor.size
        ra = Blip2Processor.from_pretrained(tmp_path / name)
        rb = hf.Blip2Processor.from_pretrained(tmp_path / name)
        im = Image.fromarray(_photo("chelsea", 8))
        kw = dict(images=[im, im], text=TEXTS[:2], padding=True, return_tensors="pt")
        _same(ra(**kw), b(**kw))
        _same(rb(**kw), b(**kw))
        assert ra.batch_decode(b(**kw)["input_ids"]) == b.batch_decode(b(**kw)["input_ids"])
