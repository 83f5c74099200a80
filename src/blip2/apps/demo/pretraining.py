"""The demo's unimodal pre-training, before BLIP-2's two stages: the image encoder (supervised by
the scene description) and the language model (text-only), each then frozen.

Both loops run on the trainer's machinery: its cosine schedule (lr_factor), its optimizer step
(clipping, then the step, then the schedule), its shuffled-batch order, and the causal-LM loss.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from ...models.config import Blip2VisionConfig, OPTConfig
from ...models.opt import OPTForCausalLM
from ...models.vision import Blip2VisionModel
from ...processing.tokenization import Blip2Tokenizer
from ...train.trainer import DataOrder, TrainConfig, cosine_schedule, optimizer_step
from . import scenes
from .shipped import QA_PROMPT

KINDS = [(sh, c, sz) for sh in scenes.SHAPES for c in scenes.COLORS for sz in scenes.SIZES]  # 24
# the class token predicts these counts; the sizes' counts make it look at each object's extent,
# which a patch inside an object cannot tell
COUNT_HEADS = ([("shape", s) for s in scenes.SHAPES] + [("color", c) for c in scenes.COLORS]
               + [("size", z) for z in scenes.SIZES] + [("all", None)])
WEIGHT_DECAY = 0.05  # on every parameter, biases and norms too (the shipped model was trained so)


# --- the image encoder ----------------------------------------------------------------------------

def patch_targets(scene: scenes.Scene, grid: int, sub: int = 8) -> np.ndarray:
    """(grid*grid, 1+24): the fraction of each patch covered by background / each object kind."""
    S = grid * sub
    w, h = scenes.canvas(replace(scene.look, scale=1.0), S)  # the scene's own aspect, squeezed to S x S below
    lab = Image.new("L", (w, h), 0)
    scenes.draw_objects(ImageDraw.Draw(lab), scene, w, h, fill=lambda i, o: 1 + KINDS.index((o.shape, o.color, o.size)))
    if (w, h) != (S, S):  # as the image processor resizes the image
        lab = lab.resize((S, S), Image.NEAREST)
    a = np.asarray(lab).reshape(grid, sub, grid, sub).transpose(0, 2, 1, 3).reshape(grid * grid, sub * sub)
    return np.eye(1 + len(KINDS), dtype=np.float32)[a].mean(axis=1)


def count_targets(scene: scenes.Scene) -> list[int]:
    out = []
    for kind, v in COUNT_HEADS:
        if kind in ("shape", "color", "size"):
            out.append(sum(getattr(o, kind) == v for o in scene.objects))
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


def _vision_loss(vit: Blip2VisionModel, heads: VisionHeads, pixels: torch.Tensor, pt: torch.Tensor,
                 ct: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return heads(vit(pixel_values=pixels[idx].float()).last_hidden_state, pt[idx], ct[idx])


def pretrain_vision(cfg: Blip2VisionConfig, scs: list[scenes.Scene], pixels: torch.Tensor, epochs: int, lr: float,
                    seed: int, batch: int = 64, warmup: int = 50) -> tuple[Blip2VisionModel, VisionHeads]:
    """Each patch predicts which object covers it (soft labels over background + 24 kinds), the
    class token predicts the counts. pixels (N, 3, H, W) are the scenes' preprocessed images.
    -> the trained ViT (eval mode) and its pre-training heads (for vision_probe)."""
    torch.manual_seed(seed)
    vit = Blip2VisionModel(cfg)
    _fan_in_reinit(vit)
    heads = VisionHeads(cfg.hidden_size)
    grid = cfg.image_size // cfg.patch_size
    pt = torch.from_numpy(np.stack([patch_targets(s, grid) for s in scs]))  # (N, G*G, K)
    ct = torch.tensor([count_targets(s) for s in scs])  # (N, H)
    total = epochs * (len(scs) // batch)
    tc = TrainConfig(lr=lr, warmup_steps=warmup, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(heads.parameters()), lr=lr, weight_decay=WEIGHT_DECAY)
    sched = cosine_schedule(opt, total, tc)
    order = DataOrder(len(scs), torch.Generator().manual_seed(seed))
    loss_fn = partial(_vision_loss, vit, heads, pixels, pt, ct)
    vit.train()
    with tqdm(total=total, desc="vision", unit="step", file=sys.stderr) as bar:
        for _ in range(total):
            loss = optimizer_step(opt, sched, loss_fn, [order.next(batch)], tc.max_grad_norm)
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.update()
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


# --- the language model -----------------------------------------------------------------------------

def _lm_loss(lm: OPTForCausalLM, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, m = batch  # (B, T) ids and mask; padding is not a target
    return lm(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss


def pretrain_lm(opt: dict, tok: Blip2Tokenizer, docs: list[list[str]], steps: int, lr: float, seed: int,
                batch: int = 64, warmup: int = 30) -> OPTForCausalLM:
    """An OPTForCausalLM (config fields `opt`, vocabulary `tok`) trained text-only on `docs`, each
    document one row of [BOS] line [EOS] segments; rows are drawn at random (with replacement)."""
    cfg = OPTConfig(**opt, vocab_size=len(tok),  # includes <image>, which text never uses
                    word_embed_proj_dim=opt["hidden_size"], pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    lm = OPTForCausalLM(cfg)
    Lmax = cfg.max_position_embeddings
    rows = [sum((tok(t)["input_ids"] + [tok.eos_token_id] for t in doc), [])[:Lmax] for doc in docs]
    L = max(len(x) for x in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id)
    for i, x in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
    am = (torch.arange(L)[None] < torch.tensor([len(x) for x in rows])[:, None]).long()
    tc = TrainConfig(lr=lr, warmup_steps=warmup, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    sched = cosine_schedule(optimizer, steps, tc)
    g = torch.Generator().manual_seed(seed)
    loss_fn = partial(_lm_loss, lm)
    lm.train()
    with tqdm(total=steps, desc="language", unit="step", file=sys.stderr) as bar:
        for _ in range(steps):
            idx = torch.randint(len(rows), (batch,), generator=g)
            n = int(am[idx].sum(1).max())  # the longest row of this batch
            loss = optimizer_step(optimizer, sched, loss_fn, [(ids[idx, :n], am[idx, :n])], tc.max_grad_norm)
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.update()
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
