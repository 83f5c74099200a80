"""The trainer (blip2.train): data readers and their errors, LM targets, both stages lower their
loss, frozen parts stay bit-identical, exact resume, seeds reproduce, checkpoints reload."""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

import hf_tiny
from blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor
from blip2 import scenes
from blip2.models.pretrain import Blip2QFormerForPretraining
from blip2.processing.tokenization import Blip2Tokenizer
from blip2.train import (
    DataError, TrainConfig, lm_batch, lr_factor, read_folder, read_jsonl, train,
)

PX, Q = 32, 4
WORDS = sorted(set(
    "a and , ? : question answer what color size shape is the object objects how many are there".split()
    + list(scenes.SHAPES) + list(scenes.PLURAL.values()) + list(scenes.COLORS) + list(scenes.SIZES)
    + list(scenes.NUMBERS)
))


def _wordlevel(specials):
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def opt_processor():
    tk = _wordlevel(["<unk>", "<pad>", "</s>"])
    tok = Blip2Tokenizer(tk, unk_token="<unk>", pad_token="<pad>", bos_token="</s>", eos_token="</s>",
                         add_bos_token=True)
    ip = BlipImageProcessor(size={"height": PX, "width": PX})
    return Blip2Processor(ip, tok, num_query_tokens=Q)  # adds <image> at the end of the vocabulary


def qformer_processor():
    tk = _wordlevel(["[UNK]", "[PAD]", "[CLS]", "[SEP]"])
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = Blip2Tokenizer(tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    return Blip2Processor(BlipImageProcessor(size={"height": PX, "width": PX}), tok)


VISION = dict(hf_tiny.VISION, image_size=PX, patch_size=8)


def stage2_model(proc, seed=0):
    V = len(proc.tokenizer)
    opt = dict(hf_tiny.OPT, vocab_size=V, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    cfg = Blip2Config(vision_config=VISION, qformer_config=hf_tiny.QFORMER, text_config=opt, num_query_tokens=Q,
                      image_token_index=proc.image_token_id)
    torch.manual_seed(seed)
    m = Blip2ForConditionalGeneration(cfg)
    hf_tiny.fan_in_init_(m, seed)  # O(1) activations: a frozen random LM that still reacts to its inputs
    with torch.no_grad():  # ... with O(1) logits (the LM head is tied to these embeddings)
        m.language_model.get_input_embeddings().weight.mul_(0.4)
    return m


def stage1_model(seed=0):
    qf = dict(hf_tiny.QFORMER, use_qformer_text_input=True)
    cfg = Blip2Config(vision_config=VISION, qformer_config=qf, num_query_tokens=Q, image_text_hidden_size=16)
    torch.manual_seed(seed)
    m = Blip2QFormerForPretraining(cfg)
    hf_tiny.fan_in_init_(m, seed)
    with torch.no_grad():
        m.temp.fill_(0.07)
    return m


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    scenes.write_jsonl(d, 16, seed=3, size=PX)
    return d


def _sd(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cfg(tmp, **kw):
    base = dict(lr=3e-3, warmup_steps=2, batch_size=8, max_steps=20, seed=0, log_every=5, output_dir=str(tmp))
    return TrainConfig(**{**base, **kw})


# --- data ---------------------------------------------------------------------------------------

def test_read_jsonl_bad_lines(data_dir, tmp_path):
    lines = (data_dir / "captions.jsonl").read_text().splitlines()[:5]
    (tmp_path / "images").mkdir()
    for i in range(5):
        src = data_dir / "images" / f"{i:06d}.png"
        (tmp_path / "images" / src.name).write_bytes(src.read_bytes())
    (tmp_path / "images" / "000002.png").write_bytes(b"\x89PNG not really")  # unreadable
    lines.insert(3, json.dumps({"image": "images/missing.png", "text": "a small red circle"}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as e:
        read_jsonl(tmp_path / "c.jsonl")
    assert "c.jsonl:3" in str(e.value) and "000002.png" in str(e.value)  # the first bad line
    ds = read_jsonl(tmp_path / "c.jsonl", skip_bad=True)
    assert len(ds) == 4 and ds.skipped == 2
    assert any("c.jsonl:4" in s and "missing.png" in s for s in ds.skipped_lines)
    assert [ex.text for ex in ds] == [json.loads(lines[i])["text"] for i in (0, 1, 4, 5)]

    (tmp_path / "m.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"m\.jsonl:2"):
        read_jsonl(tmp_path / "m.jsonl")
    (tmp_path / "k.jsonl").write_text(json.dumps({"image": "images/000000.png"}) + "\n")
    with pytest.raises(DataError, match=r"k\.jsonl:1"):
        read_jsonl(tmp_path / "k.jsonl")

    qa = read_jsonl(data_dir / "qa.jsonl")
    first = json.loads((data_dir / "qa.jsonl").read_text().splitlines()[0])
    assert qa[0].is_qa and qa[0].question == first["question"] and qa[0].answer == first["answer"]
    assert qa[0].image == data_dir / first["image"]


def test_read_folder(data_dir, tmp_path):
    for i, name in enumerate(["b", "a", "c"]):
        (tmp_path / f"{name}.png").write_bytes((data_dir / "images" / f"{i:06d}.png").read_bytes())
    (tmp_path / "a.txt").write_text("a large red circle\n")
    (tmp_path / "b.txt").write_text("two small blue squares")
    with pytest.raises(DataError, match=r"c\.png.*c\.txt"):
        read_folder(tmp_path)
    ds = read_folder(tmp_path, skip_bad=True)
    got = [(e.image.name, e.text) for e in ds]
    assert got == [("a.png", "a large red circle"), ("b.png", "two small blue squares")]
    assert ds.skipped == 1


def test_lm_targets(data_dir):
    """Image and prompt tokens and padding are -100; the target is the answer then eos."""
    proc = opt_processor()
    tok = proc.tokenizer
    m = stage2_model(proc)
    exs = read_jsonl(data_dir / "qa.jsonl")[:2] + read_jsonl(data_dir / "captions.jsonl")[:2]
    cfg = TrainConfig(stage="stage2")
    b = lm_batch(exs, proc, cfg, m.config)
    ids, am, lab = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == lab.shape == am.shape and b["pixel_values"].shape == (4, 3, PX, PX)
    for i, ex in enumerate(exs):
        n = int(am[i].sum())
        assert am[i, :n].all() and not am[i, n:].any() and (lab[i, n:] == -100).all()
        assert (ids[i, :Q] == proc.image_token_id).all() and ids[i, Q] == tok.bos_token_id
        tgt = lab[i][lab[i] != -100].tolist()
        want = ex.answer if ex.is_qa else ex.text
        assert tgt[-1] == tok.eos_token_id and tok.decode(tgt[:-1]) == want.lower()
        k = n - len(tgt)  # labels sit exactly on the last n - k real tokens
        assert ids[i, k:n].tolist() == tgt and (lab[i, :k] == -100).all()
        if ex.is_qa:
            want_prompt = tok(f"Question: {ex.question} Answer:", add_special_tokens=False)["input_ids"]
            assert ids[i, Q + 1:k].tolist() == want_prompt and tok.unk_token_id not in want_prompt
        else:
            assert k == Q + 1  # no prompt: image tokens, BOS


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_factor(s, 24, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 24, cfg) == pytest.approx(1.0)
    assert lr_factor(14, 24, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(24, 24, cfg) == pytest.approx(0.1)


# --- training -----------------------------------------------------------------------------------

def test_stage1_lowers_loss_frozen_vit(data_dir, tmp_path):
    proc = qformer_processor()
    m = stage1_model()
    vit0, q0 = _sd(m.vision_model), m.query_tokens.detach().clone()
    data = read_jsonl(data_dir / "captions.jsonl")
    res = train(m, proc, data, _cfg(tmp_path, stage="stage1", max_steps=20))
    assert res.step == 20 and len(res.losses) == 20 and all(math.isfinite(x) for x in res.losses)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < 0.8 * first, res.losses
    assert _same(vit0, _sd(m.vision_model))  # frozen, bit for bit
    assert not torch.equal(q0, m.query_tokens)  # the queries did train
    assert all(not p.requires_grad for p in m.vision_model.parameters()) and not m.vision_model.training

    again = Blip2QFormerForPretraining.from_pretrained(res.checkpoint)  # HF layout, strict keys
    assert _same(_sd(m), _sd(again))


def test_stage2_lowers_loss_frozen_parts(data_dir, tmp_path):
    proc = opt_processor()
    m = stage2_model(proc)
    vit0, lm0, proj0 = _sd(m.vision_model), _sd(m.language_model), _sd(m.language_projection)
    data = read_jsonl(data_dir / "captions.jsonl") + read_jsonl(data_dir / "qa.jsonl")[:16]
    res = train(m, proc, data, _cfg(tmp_path, stage="stage2", max_steps=25, lr=1e-2))
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < 0.85 * first, res.losses
    assert _same(vit0, _sd(m.vision_model)) and _same(lm0, _sd(m.language_model))
    assert not _same(proj0, _sd(m.language_projection))
    assert not m.language_model.training and not m.vision_model.training and m.qformer.training

    # the final checkpoint is a complete Hugging Face directory: model + processor
    assert res.checkpoint.name == "checkpoint-25"
    m2 = Blip2ForConditionalGeneration.from_pretrained(res.checkpoint)
    assert _same(_sd(m), _sd(m2))
    p2 = Blip2Processor.from_pretrained(res.checkpoint)
    assert p2.image_token_id == proc.image_token_id and p2.num_query_tokens == Q
    x = p2(images=scenes.render(scenes.dataset(1)[0], PX), return_tensors="pt")
    out = m2.generate(**x, max_new_tokens=3)
    assert out.shape[0] == 1 and out.shape[1] <= Q + 1 + 3


@pytest.mark.parametrize("stage", ["stage2", "stage1"])
def test_resume_is_exact(data_dir, tmp_path, stage):
    """Interrupt after step 3 of 6 (grad_accum 2, dropout on), resume: the same final weights,
    bit for bit, as the uninterrupted run; a rerun with the same seed is identical too."""
    if stage == "stage1":
        proc, make = qformer_processor(), stage1_model
    else:
        proc = opt_processor()
        make = lambda: stage2_model(proc)  # noqa: E731
    data = read_jsonl(data_dir / "captions.jsonl")
    kw = dict(stage=stage, batch_size=4, grad_accum=2, max_steps=6, save_every=3, log_every=0)

    a = make()
    ra = train(a, proc, data, _cfg(tmp_path / "a", **kw))
    b = make()
    train(b, proc, data, _cfg(tmp_path / "b", **kw), resume_from=tmp_path / "a" / "checkpoint-3")
    assert _same(_sd(a), _sd(b))
    c = make()
    rc = train(c, proc, data, _cfg(tmp_path / "c", **kw))
    assert _same(_sd(a), _sd(c)) and rc.losses == ra.losses
    d = make()
    train(d, proc, data, _cfg(tmp_path / "d", **{**kw, "seed": 1}))
    assert not _same(_sd(a), _sd(d))  # the seed matters (data order, dropout, negatives)


def test_caption_prompt_targets(data_dir):
    """Caption fine-tuning with a prompt: the prompt is masked, the caption (after a space) is the target."""
    proc = opt_processor()
    tok = proc.tokenizer
    m = stage2_model(proc)
    ex = read_jsonl(data_dir / "captions.jsonl")[0]
    b = lm_batch([ex], proc, TrainConfig(stage="caption", prompt="a shape"), m.config)
    ids, lab = b["input_ids"][0].tolist(), b["labels"][0].tolist()
    p = tok("a shape", add_special_tokens=True)["input_ids"]
    t = tok(" " + ex.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == [proc.image_token_id] * Q + p + t and lab == [-100] * (Q + len(p)) + t


def test_t5_stage2(data_dir, tmp_path):
    """Encoder-decoder LM: the encoder reads image tokens + prompt, labels are the answer + </s>."""
    tk = _wordlevel(["<pad>", "</s>", "<unk>"])
    tok = Blip2Tokenizer(tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", add_eos_token=True)
    proc = Blip2Processor(BlipImageProcessor(size={"height": PX, "width": PX}), tok, num_query_tokens=Q)
    t5 = dict(hf_tiny.T5, vocab_size=len(tok))
    cfg = Blip2Config(vision_config=VISION, qformer_config=hf_tiny.QFORMER, text_config=t5, num_query_tokens=Q,
                      image_token_index=proc.image_token_id)
    torch.manual_seed(0)
    m = Blip2ForConditionalGeneration(cfg)
    hf_tiny.fan_in_init_(m, 0)
    qa = read_jsonl(data_dir / "qa.jsonl")
    b = lm_batch(qa[:1], proc, TrainConfig(), m.config)
    prompt = tok(f"Question: {qa[0].question} Answer:")["input_ids"]
    assert b["input_ids"][0].tolist() == [proc.image_token_id] * Q + prompt and prompt[-1] == tok.eos_token_id
    assert b["labels"][0].tolist() == tok(" " + qa[0].answer)["input_ids"]
    lm0 = _sd(m.language_model)
    res = train(m, proc, read_jsonl(data_dir / "captions.jsonl") + qa[:16],
                _cfg(tmp_path, stage="stage2", lr=1e-2, max_steps=20, log_every=0))
    assert sum(res.losses[-3:]) / 3 < 0.9 * sum(res.losses[:3]) / 3, res.losses
    assert _same(lm0, _sd(m.language_model))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_cached_image_embeds(data_dir, tmp_path, stage):
    """cache_image_embeds: the frozen encoder runs once per image, and training follows the
    uncached run (same losses to float rounding, same frozen parts)."""
    if stage == "stage1":
        proc, make = qformer_processor(), stage1_model
    else:
        proc = opt_processor()
        make = lambda: stage2_model(proc)  # noqa: E731
    data = read_jsonl(data_dir / "captions.jsonl")  # 16 images
    kw = dict(stage=stage, batch_size=8, max_steps=6, log_every=0)

    a = make()
    ra = train(a, proc, data, _cfg(tmp_path / "a", **kw))
    b = make()
    runs = []
    b.vision_model.embeddings.register_forward_hook(lambda mod, inp, out: runs.append(out.shape[0]))
    store = {}
    rb = train(b, proc, data, _cfg(tmp_path / "b", **kw, cache_image_embeds=True), embed_cache=store)
    assert sum(runs) == len(data) and len(store) == len(data)  # 6 steps x 8 = 3 epochs, each image encoded once
    assert torch.allclose(torch.tensor(ra.losses), torch.tensor(rb.losses), rtol=1e-4, atol=1e-5)
    sa, sb = _sd(a), _sd(b)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)
    # the cache is a training detail: the model's forward is its own again afterwards
    assert "forward" not in vars(b.vision_model)
    runs.clear()
    px = torch.randn(2, 3, PX, PX)
    assert torch.equal(b.vision_model(pixel_values=px).last_hidden_state, a.vision_model(pixel_values=px).last_hidden_state)
    assert runs == [2]


def test_embed_cache_reads_no_images(data_dir, monkeypatch):
    """Once the frozen encoder's output of an image is cached, a batch needs neither the encoder
    nor the image file; the cached rows are the encoder's output for that batch."""
    from blip2.train import batches, image_embeds

    proc, m = qformer_processor(), stage1_model().eval()
    exs = read_jsonl(data_dir / "captions.jsonl")[:4]
    store = {}
    a = image_embeds(m.vision_model, exs, proc.image_processor, torch.device("cpu"), embed_cache=store)
    assert len(store) == 4 and torch.equal(a, image_embeds(m.vision_model, exs, proc.image_processor, torch.device("cpu")))

    def no(*args, **kw):
        raise AssertionError("decoded an image whose encoder output is cached")

    monkeypatch.setattr(batches, "load_image", no)
    monkeypatch.setattr(m.vision_model, "forward", no)
    b = image_embeds(m.vision_model, exs[::-1], proc.image_processor, torch.device("cpu"), embed_cache=store)
    assert torch.equal(b, a.flip(0))


# --- CSV data, stage-1 matches, partial unfreezing, LoRA --------------------------------------------

def test_read_csv(data_dir, tmp_path):
    from blip2.train import load_data, read_csv

    caps = [json.loads(x) for x in (data_dir / "captions.jsonl").read_text().splitlines()[:3]]
    rows = ["image,text,notes"] + [f'{data_dir / c["image"]},"{c["text"]}, indeed",x' for c in caps]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    ds = load_data(tmp_path / "c.csv")
    assert [ex.text for ex in ds] == [c["text"] + ", indeed" for c in caps]  # quoted commas stay in the text
    assert ds[0].image == data_dir / caps[0]["image"] and ds[1].where.endswith("c.csv:3")
    (tmp_path / "q.csv").write_text(f"image,question,answer\n{data_dir / caps[0]['image']},how many?,two\n")
    assert read_csv(tmp_path / "q.csv")[0].answer == "two"
    (tmp_path / "h.csv").write_text("path,caption\nx.png,a cat\n")
    with pytest.raises(DataError, match=r"h\.csv:1: the header needs"):
        read_csv(tmp_path / "h.csv")
    (tmp_path / "m.csv").write_text(f"image,text\n{tmp_path / 'missing.png'},a cat\n")
    with pytest.raises(DataError, match=r"m\.csv:2"):
        read_csv(tmp_path / "m.csv")
    assert read_csv(tmp_path / "m.csv", skip_bad=True).skipped == 1


def test_stage1_matches_marks_more_positives(data_dir):
    from blip2.train.batches import stage1_text

    exs = read_jsonl(data_dir / "captions.jsonl")[:4]
    plain = stage1_text(exs, qformer_processor().tokenizer, 16)["positives"]
    # a text that "holds" of every image whose caption shares its first word
    marked = stage1_text(exs, qformer_processor().tokenizer, 16,
                         matches=lambda im, tx: im.text.split()[0] == tx.text.split()[0])["positives"]
    want = torch.tensor([[a.text.split()[0] == b.text.split()[0] for b in exs] for a in exs])
    assert torch.equal(marked, plain | want) and marked.diagonal().all()


def test_unfreeze_trains_only_the_named_frozen_weights(data_dir, tmp_path):
    from blip2.train import add_lora, merge_lora

    proc = opt_processor()
    data = read_jsonl(data_dir / "captions.jsonl")
    m = stage2_model(proc)
    names = add_lora(m.language_model, ("q_proj", "fc2"), rank=2, alpha=4)
    assert names and all(n.endswith(("q_proj", "fc2")) for n in names)
    x = lm_batch(data[:4], proc, _cfg(tmp_path), m.config)
    m.eval()  # no dropout in the comparisons
    with torch.no_grad():
        before_out = m(**x).logits  # B starts at zero: the adapters change nothing yet
    sd0 = _sd(m)
    train(m, proc, data, _cfg(tmp_path, max_steps=4, unfreeze=("lora_",), log_every=0))
    sd1 = _sd(m)
    changed = {k for k in sd0 if not torch.equal(sd0[k], sd1[k])}
    lm = {k for k in changed if k.startswith("language_model.")}
    assert lm and all("lora_" in k for k in lm)  # in the LM only the adapters moved
    assert not any(k.startswith("vision_model.") for k in changed)
    m.eval()
    with torch.no_grad():
        wrapped = m(**x).logits
    assert not torch.allclose(wrapped, before_out)
    assert merge_lora(m) == len(names)
    assert not any("lora_" in k or ".base." in k for k in m.state_dict())  # the original keys again
    with torch.no_grad():
        torch.testing.assert_close(m(**x).logits, wrapped, rtol=1e-4, atol=1e-5)  # merged = wrapped
