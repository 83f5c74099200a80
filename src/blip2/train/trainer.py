"""Training BLIP-2: stage 1 (Q-Former pre-training), stage 2 (through a frozen language model)
and caption / VQA fine-tuning, with exact resume.

    data = read_jsonl("train/captions.jsonl")                   # or read_folder("photos/")
    cfg = TrainConfig(stage="stage2", lr=1e-4, max_steps=1000, output_dir="runs/s2")
    result = train(model, processor, data, cfg)                 # resume_from="runs/s2/checkpoint-500"

What trains:
  stage1   Blip2QFormerForPretraining: ITC + ITM + ITG (models/pretrain.py). Everything but the ViT.
  stage2   Blip2ForConditionalGeneration: LM loss through the frozen language model. Only the
           query tokens, the Q-Former and the language projection train.
  caption  the same loss and frozen parts as stage 2, meant for fine-tuning a stage-2 model on
           captions / QA with a prompt (cfg.prompt); kept separate so the run records its purpose.
The image encoder (and in stage 2 / caption the language model) get requires_grad False and
stay in eval mode (no dropout), so they are bit-for-bit unchanged. The loop runs the frozen
encoder itself and hands its output to the model (`image_embeds=`), optionally from a cache
(cfg.cache_image_embeds; batches.image_embeds).

The prompt is "" for captions (cfg.prompt) and "Question: {q} Answer:" for QA (cfg.qa_prompt);
the targets end with the tokenizer's eos (batches.py shows the layout). (Salesforce's OPT recipe
ends captions with "\\n", which real OPT checkpoints treat as end of text; our tokenizers have a
real eos, so we use it.) Exact resume: state.py.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .batches import image_embeds, lm_text, stage1_text
from .data import Example
from .state import latest_checkpoint, read_state, rng_state, save_checkpoint, set_rng_state

STAGES = ("stage1", "stage2", "caption")


@dataclass
class TrainConfig:
    stage: str = "stage2"  # "stage1" | "stage2" | "caption"
    lr: float = 1e-4
    min_lr: float = 0.0  # the cosine ends here
    weight_decay: float = 0.05  # not on biases, norms, or other 1-d parameters
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warmup from 0, then cosine decay over the remaining steps
    batch_size: int = 8  # per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps; None: epochs * steps per epoch
    epochs: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16, used only on a CUDA device that supports it
    log_every: int = 10  # optimizer steps between updates of the progress bar's loss (0: no bar)
    save_every: int = 0  # optimizer steps between checkpoints (0: only the final one)
    output_dir: str = "blip2-output"
    max_length: int = 32  # text tokens (prompt + target), image tokens not counted
    prompt: str = ""  # prompt before a caption (stage 2 / caption)
    qa_prompt: str = "Question: {q} Answer:"
    cache_images: bool = False  # keep each preprocessed image in memory (3*H*W floats each) after first use
    cache_image_embeds: bool = False  # run the frozen image encoder once per image and keep its output
    flush_denormal: bool = True  # CPU: tiny gradients as denormal floats make matmuls several times slower
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, saved with the state
    # stage 1: matches(image example, text example) -> True where that text also holds of that
    # image (besides the same image or the same text): those pairs are not ITC / ITM negatives
    matches: Callable[[Example, Example], bool] | None = None
    # stage 2 / caption: names of parameters of the frozen parts that train all the same (a
    # parameter trains when its name contains one of them, e.g. "lora_" for LoRA adapters)
    unfreeze: tuple[str, ...] = ()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.stage == "stage1" and self.batch_size < 2:
            raise ValueError("stage 1 needs batch_size >= 2 (ITC/ITM contrast the pairs of a batch)")


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # mean loss of each optimizer step
    checkpoint: Path | None  # the last checkpoint written
    skipped: int  # data lines skipped while reading
    images_per_s: float


# --- freezing, optimizer, schedule, one step ----------------------------------------------------

def frozen_parts(model: nn.Module, stage: str) -> list[nn.Module]:
    parts = [model.vision_model]
    if stage != "stage1":
        parts.append(model.language_model)
    return parts


def set_train_mode(model: nn.Module, stage: str, unfreeze: Sequence[str] = ()) -> None:
    """model.train(), then the frozen parts back to eval (no dropout) with requires_grad False,
    except the parameters whose names contain one of `unfreeze` (they train, in eval mode)."""
    model.train()
    for m in frozen_parts(model, stage):
        m.requires_grad_(False)
        m.eval()
    for name, p in model.named_parameters():
        if unfreeze and any(u in name for u in unfreeze):
            p.requires_grad_(True)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    lo = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def cosine_schedule(optimizer: torch.optim.Optimizer, total: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_factor as a scheduler over `total` optimizer steps; the optimizer's lr is cfg.lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total=total, cfg=cfg))


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, loss_fn: Callable[[Any], torch.Tensor],
                   micro_batches: Sequence, max_grad_norm: float | None) -> float:
    """One optimizer step over micro_batches; returns their mean loss.

    Each micro-batch's loss is backpropagated before the next one runs (one graph alive at a
    time), scaled so the gradients are those of the mean; then clipping, the step, the schedule."""
    optimizer.zero_grad(set_to_none=True)
    n, mean = len(micro_batches), 0.0
    for b in micro_batches:
        loss = loss_fn(b)
        (loss / n).backward()
        mean += float(loss.detach()) / n
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    scheduler.step()
    return mean


# --- the data order ---------------------------------------------------------------------------------

@dataclass
class DataOrder:
    """Shuffled full batches, epoch after epoch (drop_last); its fields are all a resume needs."""
    n: int
    generator: torch.Generator
    epoch: int = 0
    pos: int = 0
    perm: torch.Tensor | None = None  # this epoch's order

    def next(self, batch_size: int) -> list[int]:
        if self.perm is None or self.pos + batch_size > len(self.perm):
            if self.perm is not None:
                self.epoch += 1
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos: self.pos + batch_size].tolist()
        self.pos += batch_size
        return idx


# --- the loop -----------------------------------------------------------------------------------

def _autocast(device: torch.device, cfg: TrainConfig):
    ok = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=ok)


def make_batch(model: nn.Module, processor, examples: list[Example], cfg: TrainConfig,
               pixel_cache: dict | None, embed_cache: dict | None) -> dict[str, torch.Tensor]:
    """The model's inputs for a micro-batch: the frozen encoder's output (image_embeds) and the stage's text."""
    device = next(model.parameters()).device
    if cfg.stage == "stage1":
        text = stage1_text(examples, processor.tokenizer, cfg.max_length, cfg.matches)
    else:
        text = lm_text(examples, processor.tokenizer, cfg, model.config)
    with _autocast(device, cfg):
        img = image_embeds(model.vision_model, examples, processor.image_processor, device, pixel_cache, embed_cache)
    return dict(image_embeds=img, **{k: v.to(device) for k, v in text.items()})


def batch_loss(model: nn.Module, cfg: TrainConfig, negatives: torch.Generator, batch: dict) -> torch.Tensor:
    with _autocast(batch["image_embeds"].device, cfg):
        if cfg.stage == "stage1":
            return model(pixel_values=None, **batch, generator=negatives)["loss"]
        return model(pixel_values=None, **batch, return_dict=True).loss


def run_state(cfg: TrainConfig, step: int, losses: list[float], order: DataOrder, optimizer, scheduler,
              gens: dict[str, torch.Generator]) -> dict:
    """What trainer_state.pt holds (state.py)."""
    return dict(stage=cfg.stage, step=step, epoch=order.epoch, pos=order.pos, perm=order.perm, losses=losses,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                rng=rng_state(gens), config=asdict(replace(cfg, matches=None)))  # a function is no state


def _check(model: nn.Module, data: list[Example], cfg: TrainConfig) -> None:
    if cfg.stage == "stage1" and not hasattr(model, "itg_head"):
        raise TypeError("stage 1 trains a Blip2QFormerForPretraining")
    if cfg.stage != "stage1" and not hasattr(model, "language_model"):
        raise TypeError(f"{cfg.stage} trains a Blip2ForConditionalGeneration")
    if len(data) < cfg.batch_size:
        raise ValueError(f"{len(data)} examples is fewer than one batch of {cfg.batch_size}")


def train(model: nn.Module, processor, data: list[Example], cfg: TrainConfig,
          resume_from: str | os.PathLike | None = None, image_cache: dict | None = None,
          embed_cache: dict | None = None) -> TrainResult:
    """Train `model` in place on `data` (Examples, e.g. from read_jsonl) and return a TrainResult.

    model: Blip2QFormerForPretraining for stage 1, Blip2ForConditionalGeneration otherwise.
    processor: a Blip2Processor (stage 1: its tokenizer is the Q-Former's; otherwise the LM's).
    resume_from: a checkpoint directory written by an earlier run with the same cfg and data,
    or "latest" for the newest one in cfg.output_dir.
    image_cache: a dict {image path: preprocessed (3, H, W) tensor} to use and fill, e.g. shared
    by the runs of several stages (cfg.cache_images alone keeps a cache for this run only).
    embed_cache: with cfg.cache_image_embeds, a dict {image path: frozen encoder output} to use
    and fill; share it only between runs whose image encoders have the same weights.
    """
    _check(model, data, cfg)
    device = next(model.parameters()).device
    out_dir = Path(cfg.output_dir)
    steps_per_epoch = max(1, len(data) // cfg.batch_size // cfg.grad_accum)  # drop_last: full batches only
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    # Seed everything; a resume then overwrites all of it with the saved states.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    gens = {"order": torch.Generator().manual_seed(cfg.seed),
            "negatives": torch.Generator(device=device).manual_seed(cfg.seed + 1)}
    if cfg.flush_denormal:
        torch.set_flush_denormal(True)  # process-wide; a no-op where the CPU cannot
    set_train_mode(model, cfg.stage, cfg.unfreeze)
    st = None
    if resume_from is not None:
        rd = latest_checkpoint(out_dir) if str(resume_from) == "latest" else Path(resume_from)
        if rd is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {out_dir}")
        st = read_state(rd, model, cfg.stage)
    optimizer = make_optimizer(model, cfg)
    scheduler = cosine_schedule(optimizer, total, cfg)
    order, step, losses = DataOrder(len(data), gens["order"]), 0, []
    if st is not None:
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        step, losses = st["step"], list(st["losses"])
        order.epoch, order.pos, order.perm = st["epoch"], st["pos"], st["perm"]
        set_rng_state(st["rng"], gens)
        print(f"resumed from {rd} at step {step}", file=sys.stderr)

    pixel_cache = image_cache if image_cache is not None else {} if cfg.cache_images else None
    embeds = (embed_cache if embed_cache is not None else {}) if cfg.cache_image_embeds else None
    loss_fn = partial(batch_loss, model, cfg, gens["negatives"])
    bar = tqdm(total=total, initial=step, desc=cfg.stage, unit="step", disable=not cfg.log_every, file=sys.stderr)
    last_ckpt, t0, seen, t_log, seen_log = None, time.perf_counter(), 0, time.perf_counter(), 0
    while step < total:
        micro = [[data[i] for i in order.next(cfg.batch_size)] for _ in range(cfg.grad_accum)]
        batches = [make_batch(model, processor, exs, cfg, pixel_cache, embeds) for exs in micro]
        step_loss = optimizer_step(optimizer, scheduler, loss_fn, batches, cfg.max_grad_norm)
        step += 1
        seen += cfg.batch_size * cfg.grad_accum
        losses.append(step_loss)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step}; lower the lr or check the data")
        if cfg.log_every and (step % cfg.log_every == 0 or step == total):
            now = time.perf_counter()
            ips = (seen - seen_log) / max(now - t_log, 1e-9)
            t_log, seen_log = now, seen
            bar.set_postfix_str(f"loss {step_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} {ips:.1f} img/s",
                                refresh=False)
        bar.update()
        if (cfg.save_every and step % cfg.save_every == 0) or step == total:
            state = run_state(cfg, step, losses, order, optimizer, scheduler, gens)
            last_ckpt = save_checkpoint(out_dir / f"checkpoint-{step}", model, processor, state)
    bar.close()

    skipped = getattr(data, "skipped", 0)
    if skipped:
        print(f"note: {skipped} data line(s) were skipped for unreadable images", file=sys.stderr)
    ips = seen / max(time.perf_counter() - t0, 1e-9)
    return TrainResult(step=step, losses=losses, checkpoint=last_ckpt, skipped=skipped, images_per_s=ips)
