"""The demo model: a small BLIP-2 trained here, from scratch, on the shapes world of scenes.py.

    python -m blip2.demo build      # everything from scratch into src/blip2/apps/assets/demo (2 CPU cores: see README)
    python -m blip2.demo eval       # the quality figures on 200 held-out scenes

    blip2.demo_checkpoint("captioning")   # -> the shipped Blip2ForConditionalGeneration directory
    blip2.demo_checkpoint("retrieval")    # -> the shipped Blip2ForImageTextRetrieval directory

The recipe follows the paper's order, with every part small and trained honestly here:
 1. data        TRAIN scenes rendered at 224 px, with captions.jsonl and qa.jsonl (scenes.write_jsonl)
 2. tokenizers  a byte-level BPE for OPT trained on the caption/QA text; a WordPiece vocabulary for the
                Q-Former (BERT-style, lower case, with [DEC] last for ITG)
 3. vision      an EVA-style Blip2VisionModel pre-trained with supervision from the scene description:
                each patch predicts which object covers it (soft labels over background + 24 kinds),
                the class token predicts the counts. Then frozen.
 4. language    an OPTForCausalLM pre-trained text-only on the caption and QA text. Then frozen.
 5. stage 1     Blip2QFormerForPretraining on captions with train(stage="stage1"): ITC + ITM + ITG
 6. stage 2     Blip2ForConditionalGeneration (stage-1 Q-Former, frozen ViT and OPT) with
                train(stage="stage2") on captions and question/answer pairs
 7. ship        captioning/ (stage 2) and retrieval/ (stage 1 as Blip2ForImageTextRetrieval), fp32,
                Hugging Face layout: config.json, model.safetensors, tokenizer and processor files
Everything is seeded, so a rebuild gives the same weights on the same machine and torch version.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from . import scenes
from ...models.config import Blip2Config, Blip2VisionConfig, OPTConfig
from ...processing.image import BlipImageProcessor
from ...models.blip2 import Blip2ForConditionalGeneration
from ...models.opt import OPTForCausalLM
from ...models.pretrain import Blip2QFormerForPretraining
from ...processing.processor import Blip2Processor
from ...models.retrieval import Blip2ForImageTextRetrieval
from ...processing.tokenization import Blip2Tokenizer
from ...train.trainer import TrainConfig, read_jsonl, train
from ...models.vision import Blip2VisionModel

DEMO_DIR = Path(__file__).parents[1] / "assets" / "demo"
NAMES = ("captioning", "retrieval")
HELDOUT_SEED = 20231  # held-out scenes; training scenes use Recipe.seed
QA_PROMPT = "Question: {q} Answer:"


def demo_checkpoint(name: str = "captioning") -> Path:
    """The directory of a shipped demo checkpoint: "captioning" (Blip2ForConditionalGeneration,
    captions and VQA) or "retrieval" (Blip2ForImageTextRetrieval, ITM/ITC)."""
    if name not in NAMES:
        raise ValueError(f"demo checkpoints are {NAMES}, not {name!r}")
    d = DEMO_DIR / name
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"the demo checkpoint {d} is missing; rebuild it with `python -m blip2.demo build`")
    return d


def example_images() -> list[Path]:
    """The example images shipped with the package (held-out scenes)."""
    return sorted((DEMO_DIR / "examples").glob("*.png"))


# --- the recipe -------------------------------------------------------------------------------

@dataclass
class Recipe:
    seed: int = 0
    n_train: int = 16000  # scenes
    image_size: int = 96
    patch_size: int = 12
    vision: dict = field(default_factory=lambda: dict(
        hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, layer_norm_eps=1e-6))
    qformer: dict = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        cross_attention_frequency=1, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    opt: dict = field(default_factory=lambda: dict(
        hidden_size=128, ffn_dim=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, dropout=0.0, attention_dropout=0.0))
    num_query_tokens: int = 16
    embed_dim: int = 64  # ITC projection
    bpe_vocab: int = 384
    # step counts and learning rates per phase
    vit_epochs: int = 10
    vit_lr: float = 3e-3
    lm_steps: int = 2000
    lm_doc_lines: int = 6  # lines per text document (one scene: its caption and QA lines, shuffled)
    lm_lr: float = 3e-3
    s1_steps: int = 1600
    s1_lr: float = 5e-4
    s1_batch: int = 48
    s2_steps: int = 4000
    s2_lr: float = 1e-3
    s2_batch: int = 32
    s2_qa_per_scene: int = 3  # question/answer lines per training scene used in stage 2 (plus its caption)


QUICK = dict(n_train=256, vit_epochs=1, lm_steps=20, s1_steps=10, s1_batch=16, s2_steps=10, s2_batch=16)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- text -------------------------------------------------------------------------------------

def scene_lines(s: scenes.Scene) -> list[str]:
    """The caption and every "Question: ... Answer: ..." line of a scene."""
    return [scenes.caption(s)] + [QA_PROMPT.format(q=q) + " " + a for q, a in scenes.questions(s)]


def corpus(scs: list[scenes.Scene]) -> list[str]:
    return [line for s in scs for line in scene_lines(s)]


def documents(scs: list[scenes.Scene], n_lines: int, seed: int) -> list[list[str]]:
    """One text document per scene: its caption, then n_lines - 1 of its QA lines in a random
    order, and in half of the documents the caption restated at a random later point.

    A language model trained on these learns what any LM learns from real documents: to use what
    the earlier lines said (a colour named in the caption answers a later question; a restated
    description copies the earlier one). Each line is its own [BOS] ... [EOS] segment, so the
    stage-2 input "[image queries] [BOS] line [EOS]" has the shape of "[earlier lines] [BOS] line
    [EOS]", with the queries standing in for the earlier lines."""
    rng = np.random.default_rng(seed)
    out = []
    for s in scs:
        cap, *qa = scene_lines(s)
        doc = [cap] + [qa[i] for i in rng.permutation(len(qa))[:n_lines - 1]]
        if rng.random() < 0.5:
            doc.insert(int(rng.integers(2, len(doc) + 1)), cap)
        out.append(doc)
    return out


def build_opt_tokenizer(texts: list[str], d: Path, vocab_size: int) -> Blip2Tokenizer:
    """A byte-level BPE in OPT's layout (vocab.json + merges.txt; <s> <pad> </s> <unk> = 0..3;
    "</s>" doubles as BOS and EOS), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    d.mkdir(parents=True, exist_ok=True)
    tk.model.save(str(d))  # vocab.json, merges.txt
    # left padding: batched prompts for generate() end where the new tokens start
    cfg = dict(tokenizer_class="GPT2Tokenizer", add_bos_token=True, add_prefix_space=False, errors="replace",
               padding_side="left",
               bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=128)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Blip2Tokenizer.from_pretrained(d)


def build_bert_tokenizer(texts: list[str], d: Path) -> Blip2Tokenizer:
    """A lower-case WordPiece vocabulary (vocab.txt) holding every word of `texts`, letters and
    digits as a fallback for other words, and [DEC] last (the Q-Former's ITG start token)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'\"-()")
    vocab = specials + words
    vocab += [c for c in chars if c not in vocab] + ["##" + c for c in chars[:36]] + ["[DEC]"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = dict(tokenizer_class="BertTokenizer", do_lower_case=True, model_max_length=64, unk_token="[UNK]",
               sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Blip2Tokenizer.from_pretrained(d)


# --- images -----------------------------------------------------------------------------------

KINDS = [(sh, c, sz) for sh in scenes.SHAPES for c in scenes.COLORS for sz in scenes.SIZES]  # 24
COUNT_HEADS = [("shape", s) for s in scenes.SHAPES] + [("color", c) for c in scenes.COLORS] + [("all", None)]


def patch_targets(scene: scenes.Scene, grid: int, sub: int = 8) -> np.ndarray:
    """(grid*grid, 1+24): the fraction of each patch covered by background / each object kind."""
    S = grid * sub
    lab = Image.new("L", (S, S), 0)
    scenes.draw_objects(ImageDraw.Draw(lab), scene, S, fill=lambda i, o: 1 + KINDS.index((o.shape, o.color, o.size)))
    a = np.asarray(lab).reshape(grid, sub, grid, sub).transpose(0, 2, 1, 3).reshape(grid * grid, sub * sub)
    return np.eye(1 + len(KINDS), dtype=np.float32)[a].mean(axis=1)


def count_targets(scene: scenes.Scene) -> list[int]:
    out = []
    for kind, v in COUNT_HEADS:
        if kind == "shape":
            out.append(sum(o.shape == v for o in scene.objects))
        elif kind == "color":
            out.append(sum(o.color == v for o in scene.objects))
        else:
            out.append(len(scene.objects))
    return out


class VisionHeads(nn.Module):
    """Pre-training heads on top of the ViT's output (dropped after pre-training)."""

    def __init__(self, C: int):
        super().__init__()
        self.patch = nn.Linear(C, 1 + len(KINDS))
        self.count = nn.Linear(C, 4 * len(COUNT_HEADS))

    def forward(self, h: torch.Tensor, patch_t: torch.Tensor, count_t: torch.Tensor) -> torch.Tensor:
        # h (B, 1+N, C): class token, then patches in row-major order
        logp = self.patch(h[:, 1:]).log_softmax(-1)  # (B, N, K)
        loss_patch = -(patch_t * logp).sum(-1).mean()
        logits = self.count(h[:, 0]).view(-1, len(COUNT_HEADS), 4)  # (B, H, 4)
        loss_count = F.cross_entropy(logits.reshape(-1, 4), count_t.reshape(-1))
        return loss_patch + loss_count


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vision(r: Recipe, scs: list[scenes.Scene], pixels: torch.Tensor) -> tuple[Blip2VisionModel, VisionHeads]:
    """-> the trained ViT (eval mode) and its pre-training heads (for vision_probe)."""
    cfg = Blip2VisionConfig(**r.vision, image_size=r.image_size, patch_size=r.patch_size)
    torch.manual_seed(r.seed)
    vit = Blip2VisionModel(cfg)
    _fan_in_reinit(vit)
    heads = VisionHeads(cfg.hidden_size)
    grid = r.image_size // r.patch_size
    pt = torch.from_numpy(np.stack([patch_targets(s, grid) for s in scs]))  # (N, G*G, K)
    ct = torch.tensor([count_targets(s) for s in scs])  # (N, H)
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=r.vit_lr, weight_decay=0.05)
    B, N = 64, len(scs)
    total = r.vit_epochs * (N // B)
    g = torch.Generator().manual_seed(r.seed)
    vit.train()
    step = 0
    for _ in range(r.vit_epochs):
        perm = torch.randperm(N, generator=g)
        for i in range(N // B):
            idx = perm[i * B:(i + 1) * B]
            for grp in opt.param_groups:
                grp["lr"] = r.vit_lr * _cosine(step, total, 50)
            h = vit(pixel_values=pixels[idx].float()).last_hidden_state
            loss = heads(h, pt[idx], ct[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 100 == 0 or step == total:
                _log(f"vision step {step}/{total} loss {loss.item():.4f}")
    return vit.eval(), heads.eval()


@torch.no_grad()
def vision_probe(vit: Blip2VisionModel, heads: VisionHeads, scs: list[scenes.Scene], pixels: torch.Tensor) -> dict:
    """How well the pre-trained ViT sees held-out scenes, through its own heads: the share of
    object patches (more than half covered by one object) whose predicted kind has the right
    shape / colour / size, and the share of scenes with every count right. Everything later
    stages learn about the image passes through these features."""
    grid = vit.config.image_size // vit.config.patch_size
    h = vit(pixel_values=pixels.float()).last_hidden_state
    pred = heads.patch(h[:, 1:]).argmax(-1)  # (B, N)
    pt = torch.from_numpy(np.stack([patch_targets(s, grid) for s in scs]))
    tgt = pt.argmax(-1)
    obj = (tgt > 0) & (pt.max(-1).values > 0.5)
    out = {}
    for i, name in enumerate(("shape", "color", "size")):
        attr = torch.tensor([-1] + [(scenes.SHAPES, list(scenes.COLORS), scenes.SIZES)[i].index(k[i]) for k in KINDS])
        out[f"patch_{name}"] = round(float((attr[pred] == attr[tgt])[obj].float().mean()), 4)
    counts = heads.count(h[:, 0]).view(len(scs), len(COUNT_HEADS), 4).argmax(-1)
    out["counts"] = round(float((counts == torch.tensor([count_targets(s) for s in scs])).all(1).float().mean()), 4)
    return out


@torch.no_grad()
def _fan_in_reinit(m: nn.Module) -> None:
    """Matrices std 1/sqrt(fan_in): a trainable start for small models (the 0.02 / 1e-10 defaults
    of the BLIP-2 configs suit fine-tuning from pre-trained weights, not training from scratch)."""
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            mod.weight.normal_(0, fan_in ** -0.5)
            if mod.bias is not None:
                mod.bias.zero_()
    for name, p in m.named_parameters():
        if name.endswith(("class_embedding", "position_embedding")):
            p.normal_(0, 0.02)


# --- the language model -----------------------------------------------------------------------

def pretrain_lm(r: Recipe, tok: Blip2Tokenizer, docs: list[list[str]]) -> OPTForCausalLM:
    V = len(tok)  # includes <image>, which text never uses
    cfg = OPTConfig(**r.opt, vocab_size=V, word_embed_proj_dim=r.opt["hidden_size"], pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(r.seed + 1)
    lm = OPTForCausalLM(cfg)
    Lmax = r.opt["max_position_embeddings"]
    rows = [sum((tok(t)["input_ids"] + [tok.eos_token_id] for t in doc), [])[:Lmax] for doc in docs]  # [BOS] line [EOS] ...
    L = max(len(x) for x in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id)
    for i, x in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
    am = (torch.arange(L)[None] < torch.tensor([len(x) for x in rows])[:, None]).long()
    opt = torch.optim.AdamW(lm.parameters(), lr=r.lm_lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(r.seed + 1)
    B = 64
    lm.train()
    for step in range(r.lm_steps):
        idx = torch.randint(len(rows), (B,), generator=g)
        n = int(am[idx].sum(1).max())
        x, m = ids[idx, :n], am[idx, :n]
        for grp in opt.param_groups:
            grp["lr"] = r.lm_lr * _cosine(step, r.lm_steps, 30)
        logits = lm(input_ids=x, attention_mask=m).logits
        y = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == r.lm_steps:
            _log(f"language step {step + 1}/{r.lm_steps} loss {loss.item():.4f}")
    return lm.eval()


@torch.no_grad()
def lm_reads_context(lm: OPTForCausalLM, tok: Blip2Tokenizer, scs: list[scenes.Scene]) -> float:
    """Share of questions the text-only LM answers right (greedy first token) when the scene's
    caption is the line before: how well it uses context, which stage 2 relies on."""
    ok = n = 0
    for s in scs:
        ctx = tok(scenes.caption(s))["input_ids"] + [tok.eos_token_id]
        for q, a in scenes.questions(s):
            ids = torch.tensor([ctx + tok(QA_PROMPT.format(q=q))["input_ids"]])
            want = tok(" " + a, add_special_tokens=False)["input_ids"][0]
            ok += int(lm(input_ids=ids).logits[0, -1].argmax()) == want
            n += 1
    return ok / n


# --- the pipeline -----------------------------------------------------------------------------

def _processors(r: Recipe, work: Path, texts: list[str]) -> tuple[Blip2Processor, Blip2Processor]:
    ip = BlipImageProcessor(size={"height": r.image_size, "width": r.image_size})
    opt_tok = build_opt_tokenizer(texts, work / "tok-opt", r.bpe_vocab)
    bert_tok = build_bert_tokenizer(texts, work / "tok-bert")
    cap = Blip2Processor(ip, opt_tok, num_query_tokens=r.num_query_tokens)  # adds <image>
    ret = Blip2Processor(ip, bert_tok)
    return cap, ret


def _pixels(ip: BlipImageProcessor, images: list) -> torch.Tensor:
    """Preprocessed pixels (N, 3, H, W) in fp16 of image paths or PIL images."""
    out = torch.empty(len(images), 3, ip.size["height"], ip.size["width"], dtype=torch.float16)
    for i, im in enumerate(images):
        if isinstance(im, (str, Path)):
            with Image.open(im) as f:
                im = f.convert("RGB")
        out[i] = ip(im, return_tensors="pt")["pixel_values"][0].half()
    return out


def build(out_dir: str | Path = DEMO_DIR, work_dir: str | Path | None = None, recipe: Recipe | None = None,
          examples: int = 6, eval_scenes: int = 200) -> dict:
    """Train the demo model from scratch and write captioning/ and retrieval/ (and examples/) to out_dir.
    Returns the evaluation figures (also written to out_dir/quality.json)."""
    r = recipe or Recipe()
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    out, work = Path(out_dir), Path(work_dir) if work_dir else Path.cwd() / "demo-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    times = {}

    def lap(name: str, t: list[float] = [t0]) -> None:
        now = time.perf_counter()
        times[name] = round(now - t[0], 1)
        t[0] = now
        _log(f"{name} done in {times[name]} s")

    # 1. data
    cap_path, qa_path = scenes.write_jsonl(work / "data", r.n_train, seed=r.seed)
    scs = scenes.dataset(r.n_train, seed=r.seed)
    texts = corpus(scs)
    lap("data")
    # 2. tokenizers
    cap_proc, ret_proc = _processors(r, work, texts)
    lap("tokenizers")
    # 3. vision
    captions = read_jsonl(cap_path, check_images=False)
    pixels = _pixels(cap_proc.image_processor, [ex.image for ex in captions])
    vit, heads = pretrain_vision(r, scs, pixels)
    vit.save_pretrained(work / "vision")  # the frozen image encoder, loadable on its own
    held = scenes.dataset(200, seed=HELDOUT_SEED + 2)
    probe = vision_probe(vit, heads, held, _pixels(cap_proc.image_processor, [scenes.render(s) for s in held]))
    _log(f"vision probe on held-out scenes: {probe}")
    lap("vision")
    # 4. language
    lm = pretrain_lm(r, cap_proc.tokenizer, documents(scs, r.lm_doc_lines, r.seed))
    lm.save_pretrained(work / "language")
    cap_proc.tokenizer.save_pretrained(work / "language")
    lm_context = lm_reads_context(lm, cap_proc.tokenizer, scenes.dataset(30, seed=HELDOUT_SEED + 2))
    _log(f"language model answers {lm_context:.1%} of held-out questions from a caption in context")
    lap("language")
    # 5. stage 1
    qf = dict(r.qformer, vocab_size=len(ret_proc.tokenizer), encoder_hidden_size=vit.config.hidden_size,
              use_qformer_text_input=True)
    s1cfg = Blip2Config(vision_config=vit.config.to_dict(), qformer_config=qf, num_query_tokens=r.num_query_tokens,
                        image_text_hidden_size=r.embed_dim)
    torch.manual_seed(r.seed + 2)
    s1 = Blip2QFormerForPretraining(s1cfg)
    s1.vision_model.load_state_dict(vit.state_dict())
    # pixels decoded once and the frozen ViT run once per image, both shared by the two stages
    cache = {ex.image: px.float() for ex, px in zip(captions, pixels)}
    embeds: dict = {}
    tc1 = TrainConfig(stage="stage1", lr=r.s1_lr, warmup_steps=50, batch_size=r.s1_batch, max_steps=r.s1_steps,
                      seed=r.seed, output_dir=str(work / "stage1"), log_every=50, cache_images=True,
                      cache_image_embeds=True, weight_decay=0.05)
    res1 = train(s1, ret_proc, captions, tc1, image_cache=cache, embed_cache=embeds)
    lap("stage1")
    # 6. stage 2
    qa = read_jsonl(qa_path, check_images=False)
    by_image: dict[Path, list] = {}
    for ex in qa:
        by_image.setdefault(ex.image, []).append(ex)
    g = np.random.default_rng(r.seed)
    s2_data = list(captions)
    for exs in by_image.values():
        s2_data += [exs[i] for i in g.choice(len(exs), size=min(r.s2_qa_per_scene, len(exs)), replace=False)]
    tcfg = lm.config.to_dict()
    s2cfg = Blip2Config(vision_config=vit.config.to_dict(), qformer_config=dict(qf, use_qformer_text_input=False),
                        text_config=tcfg, num_query_tokens=r.num_query_tokens, image_token_index=cap_proc.image_token_id)
    torch.manual_seed(r.seed + 3)
    s2 = Blip2ForConditionalGeneration(s2cfg)
    missing, unexpected = s2.load_state_dict(s1.state_dict(), strict=False)
    assert all(k.startswith(("language_model.", "language_projection.")) for k in missing), missing
    s2.language_model.load_state_dict(lm.state_dict())
    tc2 = TrainConfig(stage="stage2", lr=r.s2_lr, warmup_steps=50, batch_size=r.s2_batch, max_steps=r.s2_steps,
                      seed=r.seed, output_dir=str(work / "stage2"), log_every=50, cache_images=True,
                      cache_image_embeds=True, max_length=40, qa_prompt=QA_PROMPT)
    res2 = train(s2, cap_proc, s2_data, tc2, image_cache=cache, embed_cache=embeds)
    lap("stage2")
    # 7. ship
    out.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        if (out / name).exists():
            shutil.rmtree(out / name)
    s2.eval()
    s2.generation_config.max_new_tokens = 30
    s2.save_pretrained(out / "captioning")
    cap_proc.save_pretrained(out / "captioning")
    ret = s1.to_retrieval().eval()
    ret.save_pretrained(out / "retrieval")
    ret_proc.save_pretrained(out / "retrieval")
    _write_examples(out / "examples", examples)
    lap("ship")
    figures = evaluate(out / "captioning", out / "retrieval", n=eval_scenes)
    figures.pop("captions")
    lap("eval")
    record = dict(figures=figures, seconds=times, total_seconds=round(time.perf_counter() - t0, 1),
                  vision_probe=probe, lm_answers_from_context=round(lm_context, 4), stage1_final_loss=res1.losses[-1], stage2_final_loss=res2.losses[-1],
                  recipe=asdict(r), torch=torch.__version__, threads=torch.get_num_threads())
    (out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"built in {record['total_seconds']} s: {json.dumps(figures)}")
    return record


def _write_examples(d: Path, n: int) -> None:
    """n held-out scenes as PNGs named after their captions' first words, plus captions.json."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    truth = {}
    for i, s in enumerate(scenes.dataset(n, seed=HELDOUT_SEED + 1)):
        name = f"{i + 1:02d}-" + "-".join(scenes.caption(s).replace(",", "").split()[:3]) + ".png"
        scenes.render(s).save(d / name)
        truth[name] = dict(caption=scenes.caption(s), questions=dict(scenes.questions(s)))
    (d / "scenes.json").write_text(json.dumps(truth, indent=2) + "\n")


# --- evaluation -------------------------------------------------------------------------------

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


# --- command line -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip2.demo", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the demo model from scratch")
    b.add_argument("--output", default=str(DEMO_DIR))
    b.add_argument("--work-dir", default=None, help="data and intermediate checkpoints (default: ./demo-work)")
    b.add_argument("--quick", action="store_true", help="a few steps of everything: checks the pipeline, not the quality")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields")
    e = sub.add_parser("eval", help="quality figures on held-out scenes")
    e.add_argument("--captioning", default=None)
    e.add_argument("--retrieval", default=None)
    e.add_argument("-n", type=int, default=200)
    e.add_argument("--quantized", action="store_true", help="bf16 vs int8 / int4 language model (shipped model)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        kw = dict(QUICK) if a.quick else {}
        for kv in a.set:
            k, v = kv.split("=", 1)
            kw[k] = type(getattr(Recipe(), k))(v)
        if a.threads:
            torch.set_num_threads(a.threads)
        rec = build(a.output, a.work_dir, Recipe(**kw))
        print(json.dumps(rec["figures"], indent=2))
    else:
        if a.quantized:
            print(json.dumps(quantization_quality(n=a.n), indent=2))
        else:
            fig = evaluate(a.captioning, a.retrieval, n=a.n)
            fig.pop("captions")
            print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
