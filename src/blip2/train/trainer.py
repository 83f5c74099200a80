"""Training BLIP-2: stage 1 (Q-Former pre-training), stage 2 (through a frozen language model)
and caption / VQA fine-tuning, with exact resume.

    data = read_jsonl("train/captions.jsonl")                   # or read_folder("photos/")
    cfg = TrainConfig(stage="stage2", lr=1e-4, max_steps=1000, output_dir="runs/s2")
    result = train(model, processor, data, cfg)                 # resume_from="runs/s2/checkpoint-500"

What trains:
  stage1   Blip2QFormerForPretraining: ITC + ITM + ITG (pretrain.py). Everything but the ViT.
  stage2   Blip2ForConditionalGeneration: LM loss through the frozen language model. Only the
           query tokens, the Q-Former and the language projection train.
  caption  the same loss and frozen parts as stage 2, meant for fine-tuning a stage-2 model on
           captions / QA with a prompt (cfg.prompt); kept separate so the run records its purpose.
The image encoder (and in stage 2 / caption the language model) get requires_grad False and
stay in eval mode (no dropout), so they are bit-for-bit unchanged.

Targets for the language model (decoder-only, OPT):
    [<image> x Q] [BOS] prompt-tokens | target-tokens [EOS] [PAD ...]
    labels: -100 ....................| target-tokens  EOS  -100 ...
The prompt is "" for captions (cfg.prompt) and "Question: {q} Answer:" for QA (cfg.qa_prompt).
The target ends with the tokenizer's eos token, so generate() learns to stop. (Salesforce's OPT
recipe ends captions with "\\n", which real OPT checkpoints treat as end of text; our tokenizers
have a real eos, so we use it.) Prompt and target are tokenized separately, the way generate()
sees them: the prompt alone, then new tokens. For T5 the encoder reads the images and the prompt
and the labels are the target (the T5 tokenizer appends </s> itself; otherwise we append eos).

Exact resume: a checkpoint directory holds the model (save_pretrained: config.json +
model.safetensors, loadable by from_pretrained), the processor, and trainer_state.pt with the
optimizer, the LR schedule, the step, the data order (this epoch's permutation, the position in
it and the order generator) and every RNG (torch CPU/CUDA, python, numpy, the ITM negative
sampler). Resuming from step k therefore replays steps k+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..processing.image import ImageLoadError, load_image
from ..models.outputs import BaseModelOutputWithPooling

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
STATE_NAME = "trainer_state.pt"
STAGES = ("stage1", "stage2", "caption")


# --- data -----------------------------------------------------------------------------------

class DataError(ValueError):
    """A data file is malformed or points at an image that cannot be read; the message names the line."""


@dataclass
class Example:
    image: Path
    text: str | None = None  # a caption
    question: str | None = None
    answer: str | None = None
    where: str = ""  # "file:line" for error messages

    @property
    def is_qa(self) -> bool:
        return self.question is not None


class Dataset(list):
    """A list of Examples plus what was skipped while reading (skip_bad=True)."""

    def __init__(self, items=(), skipped: list[str] | None = None):
        super().__init__(items)
        self.skipped_lines: list[str] = list(skipped or [])  # "file:line: reason"

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)


def _check_image(path: Path) -> None:
    load_image(path)  # a full decode: truncated files fail here, not mid-run


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """Read `{"image": path, "text": caption}` or `{"image", "question", "answer"}` lines.

    Image paths are relative to the JSONL's folder (absolute ones are kept). A malformed line
    raises DataError naming it; so does a missing or unreadable image unless skip_bad, which
    skips the line and counts it (`Dataset.skipped`, `Dataset.skipped_lines`).
    """
    path = Path(path)
    root = path.parent
    out, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise DataError(f"{where}: each line needs an \"image\" path (a string)")
            has_text = isinstance(rec.get("text"), str)
            has_qa = isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str)
            if not (has_text or has_qa):
                raise DataError(f"{where}: each line needs \"text\", or \"question\" and \"answer\" (strings)")
            img = root / rec["image"]
            if check_images:
                try:
                    _check_image(img)
                except (ImageLoadError, OSError) as e:
                    msg = f"{where}: cannot read image {img}: {e}"
                    if not skip_bad:
                        raise DataError(msg + " (pass skip_bad=True to skip such lines)") from e
                    skipped.append(msg)
                    continue
            out.append(Example(img, rec.get("text") if has_text else None,
                               rec["question"] if has_qa else None, rec["answer"] if has_qa else None, where))
    if skipped:
        print(f"read_jsonl: skipped {len(skipped)} line(s) of {path} with unreadable images", file=sys.stderr)
    return Dataset(out, skipped)


def read_folder(path: str | os.PathLike, skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """Images in a folder, each captioned by the .txt file of the same stem (a.png + a.txt).

    An image without a caption file, or one that cannot be read, raises DataError naming it
    unless skip_bad (then it is skipped and counted).
    """
    d = Path(path)
    out, skipped = [], []
    for img in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        txt = img.with_suffix(".txt")
        try:
            if not txt.is_file():
                raise DataError(f"{img}: no caption file {txt.name}")
            if check_images:
                try:
                    _check_image(img)
                except (ImageLoadError, OSError) as e:
                    raise DataError(f"{img}: cannot read image: {e}") from e
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        out.append(Example(img, txt.read_text(encoding="utf-8").strip(), where=str(img)))
    if skipped:
        print(f"read_folder: skipped {len(skipped)} image(s) of {d}", file=sys.stderr)
    return Dataset(out, skipped)


def load_data(path: str | os.PathLike, skip_bad: bool = False) -> Dataset:
    """A folder of images + captions, or a JSONL file."""
    return read_folder(path, skip_bad) if Path(path).is_dir() else read_jsonl(path, skip_bad)


# --- config -----------------------------------------------------------------------------------

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
    log_every: int = 10  # optimizer steps between progress lines (0: never)
    save_every: int = 0  # optimizer steps between checkpoints (0: only the final one)
    output_dir: str = "blip2-output"
    max_length: int = 32  # text tokens (prompt + target), image tokens not counted
    prompt: str = ""  # prompt before a caption (stage 2 / caption)
    qa_prompt: str = "Question: {q} Answer:"
    cache_images: bool = False  # keep each preprocessed image in memory (3*H*W floats each) after first use
    cache_image_embeds: bool = False  # run the frozen image encoder once per image and keep its output
    flush_denormal: bool = True  # CPU: tiny gradients as denormal floats make matmuls several times slower
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, saved with the state

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


# --- batches ----------------------------------------------------------------------------------

def _images(examples: list[Example], image_processor, cache: dict | None = None) -> torch.Tensor:
    """Decode and preprocess the batch's images; with a cache dict, each image only once per run."""
    out = []
    for ex in examples:
        px = cache.get(ex.image) if cache is not None else None
        if px is None:
            try:
                im = load_image(ex.image)
            except ImageLoadError as e:
                raise DataError(f"{ex.where}: cannot read image {ex.image}: {e}") from e
            px = image_processor(im, return_tensors="pt")["pixel_values"][0]
            if cache is not None:
                cache[ex.image] = px
        out.append(px)
    return torch.stack(out)


def stage1_batch(examples: list[Example], processor, cfg: TrainConfig, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """pixel_values + Q-Former text ([CLS] caption [SEP], padded): the processor's tokenizer is the
    Q-Former's (BERT-style) one here. `positives` (B, B) marks pairs that match besides the
    diagonal: the same image file or the same caption text twice in one batch."""
    texts = [ex.text if ex.text is not None else f"{ex.question} {ex.answer}" for ex in examples]
    enc = processor.tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt")
    same = [[a.image == b.image or ta == tb for b, tb in zip(examples, texts)] for a, ta in zip(examples, texts)]
    return dict(pixel_values=_images(examples, processor.image_processor, cache),
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                positives=torch.tensor(same, dtype=torch.bool))


def _prompt_target(ex: Example, cfg: TrainConfig) -> tuple[str, str]:
    if ex.is_qa:
        return cfg.qa_prompt.format(q=ex.question), " " + ex.answer
    return cfg.prompt, (" " + ex.text if cfg.prompt else ex.text)


def lm_batch(examples: list[Example], processor, cfg: TrainConfig, model_config,
             cache: dict | None = None) -> dict[str, torch.Tensor]:
    """pixel_values, input_ids, attention_mask, labels for Blip2ForConditionalGeneration.

    Decoder-only: one right-padded sequence, labels -100 except on the target and its eos.
    Encoder-decoder: the encoder reads images + prompt; labels are the target (+ eos)."""
    tok = processor.tokenizer
    Q, img_id = model_config.num_query_tokens, model_config.image_token_index
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: the LM targets end with it")
    if pad is None:
        pad = eos  # padding is masked out everywhere, its id does not matter
    dec_only = model_config.use_decoder_only_language_model
    ids, labels, enc_ids, tgt_ids = [], [], [], []
    for ex in examples:
        prompt, target = _prompt_target(ex, cfg)
        p = tok(prompt, add_special_tokens=True)["input_ids"] if dec_only or prompt else []
        t = tok(target, add_special_tokens=not dec_only)["input_ids"]
        if not t or t[-1] != eos:
            t = t + [eos]
        t = t[: max(1, cfg.max_length - len(p))]
        if dec_only:
            ids.append([img_id] * Q + p + t)
            labels.append([-100] * (Q + len(p)) + t)
        else:
            enc_ids.append([img_id] * Q + p)
            tgt_ids.append(t)

    def pad_to(rows, value):
        L = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (L - len(r)) for r in rows], dtype=torch.long)

    def mask(rows):
        L = max(len(r) for r in rows)
        return torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], dtype=torch.long)

    out = dict(pixel_values=_images(examples, processor.image_processor, cache))
    if dec_only:
        out.update(input_ids=pad_to(ids, pad), attention_mask=mask(ids), labels=pad_to(labels, -100))
    else:
        out.update(input_ids=pad_to(enc_ids, pad), attention_mask=mask(enc_ids), labels=pad_to(tgt_ids, -100))
    return out


class EncoderCache:
    """Memoises a frozen image encoder's output per image, keyed by the image's path.

    The encoder never trains and stays in eval mode, so an image's output is the same at every
    step: after the first epoch a step costs only the Q-Former (and the frozen LM). Costs
    (1+N)*C floats per image. Set `keys` to the batch's image paths before each forward; calls
    that ask for attentions or hidden states, or come without keys, run the encoder as usual.
    (A resumed run recomputes its cache; outputs computed in other batches can differ in the last
    bits, so exact resume holds with this cache off.)"""

    def __init__(self, vision_model: nn.Module, store: dict | None = None):
        self.vm, self.store, self.keys = vision_model, {} if store is None else store, None

    def __enter__(self) -> "EncoderCache":
        run = self.vm.forward

        def forward(pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kw):
            keys = self.keys
            if keys is None or output_attentions or output_hidden_states or len(keys) != len(pixel_values):
                return run(pixel_values=pixel_values, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, return_dict=return_dict, **kw)
            todo = [i for i, k in enumerate(keys) if k not in self.store]
            if todo:
                h = run(pixel_values=pixel_values[todo], return_dict=True, **kw).last_hidden_state
                for i, x in zip(todo, h):
                    self.store[keys[i]] = x
            x = torch.stack([self.store[k] for k in keys])  # (B, 1+N, C)
            out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=self.vm.post_layernorm(x[:, 0]))
            return out if return_dict is not False else out.to_tuple()

        self.vm.forward = forward  # instance attribute: nn.Module.__call__ finds it first
        return self

    def __exit__(self, *exc) -> None:
        del self.vm.forward


# --- freezing, optimizer, schedule ------------------------------------------------------------

def frozen_parts(model: nn.Module, stage: str) -> list[nn.Module]:
    parts = [model.vision_model]
    if stage != "stage1":
        parts.append(model.language_model)
    return parts


def set_train_mode(model: nn.Module, stage: str) -> None:
    """model.train(), then the frozen parts back to eval (no dropout) with requires_grad False."""
    model.train()
    for m in frozen_parts(model, stage):
        m.requires_grad_(False)
        m.eval()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
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


def _autocast(device: torch.device, cfg: TrainConfig):
    ok = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=ok)


# --- checkpoints ------------------------------------------------------------------------------

def _rng_state(gens: dict[str, torch.Generator]) -> dict:
    s = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
             generators={k: g.get_state() for k, g in gens.items()})
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict, gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    for k, g in gens.items():
        g.set_state(s["generators"][k])


def save_checkpoint(d: Path, model, processor, state: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(d)
    tmp = d / (STATE_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, d / STATE_NAME)  # a checkpoint with a state file is complete
    return d


def load_weights_into(model: nn.Module, d: Path) -> None:
    """Copy a save_pretrained checkpoint's weights into `model` in place (parameters keep their identity)."""
    from safetensors.torch import load_file

    from ..checkpoint.pretrained import checkpoint_files

    files, fmt = checkpoint_files(d)
    sd = {}
    for f in files:
        sd.update(load_file(str(f)) if fmt == "safetensors" else torch.load(f, map_location="cpu", weights_only=True))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(model.tied_weights()) if hasattr(model, "tied_weights") else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {d} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint-<step> directory with the highest step, or None."""
    ds = [p for p in Path(output_dir).glob("checkpoint-*") if (p / STATE_NAME).is_file()]
    ds = [p for p in ds if p.name.split("-", 1)[1].isdigit()]
    return max(ds, key=lambda p: int(p.name.split("-", 1)[1])) if ds else None


# --- the loop ---------------------------------------------------------------------------------

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
    if cfg.stage == "stage1" and not hasattr(model, "itg_head"):
        raise TypeError("stage 1 trains a Blip2QFormerForPretraining")
    if cfg.stage != "stage1" and not hasattr(model, "language_model"):
        raise TypeError(f"{cfg.stage} trains a Blip2ForConditionalGeneration")
    N = len(data)
    if N < cfg.batch_size:
        raise ValueError(f"{N} examples is fewer than one batch of {cfg.batch_size}")
    device = next(model.parameters()).device
    out_dir = Path(cfg.output_dir)

    micro_per_epoch = N // cfg.batch_size  # drop_last: every batch has batch_size pairs
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    # Seed everything; a resume then overwrites all of it with the saved states.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    neg_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    gens = {"order": order_gen, "negatives": neg_gen}

    if cfg.flush_denormal:
        torch.set_flush_denormal(True)  # process-wide; a no-op where the CPU cannot
    set_train_mode(model, cfg.stage)
    step, epoch, pos, perm, losses = 0, 0, 0, None, []
    if resume_from is not None:
        rd = latest_checkpoint(out_dir) if str(resume_from) == "latest" else Path(resume_from)
        if rd is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {out_dir}")
        load_weights_into(model, rd)
        st = torch.load(rd / STATE_NAME, map_location="cpu", weights_only=False)
        if st["stage"] != cfg.stage:
            raise ValueError(f"{rd} is a {st['stage']} checkpoint, this run is {cfg.stage}")
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))
    if resume_from is not None:
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        step, epoch, pos, perm, losses = st["step"], st["epoch"], st["pos"], st["perm"], list(st["losses"])
        _set_rng_state(st["rng"], gens)
        print(f"resumed from {rd} at step {step}", file=sys.stderr)

    def next_examples() -> list[Example]:
        nonlocal epoch, pos, perm
        if perm is None or pos + cfg.batch_size > len(perm):
            if perm is not None:
                epoch += 1
            perm, pos = torch.randperm(N, generator=order_gen), 0
        idx = perm[pos: pos + cfg.batch_size].tolist()
        pos += cfg.batch_size
        return [data[i] for i in idx]

    cache = image_cache if image_cache is not None else {} if cfg.cache_images else None

    def batch_for(exs):
        if cfg.stage == "stage1":
            return stage1_batch(exs, processor, cfg, cache)
        return lm_batch(exs, processor, cfg, model.config, cache)

    def state_dict() -> dict:
        return dict(stage=cfg.stage, step=step, epoch=epoch, pos=pos, perm=perm, losses=losses,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    rng=_rng_state(gens), config=asdict(cfg))

    params = [p for g in optimizer.param_groups for p in g["params"]]
    enc = EncoderCache(model.vision_model, embed_cache).__enter__() if cfg.cache_image_embeds else None
    last_ckpt, t0, seen, t_log, seen_log = None, time.perf_counter(), 0, time.perf_counter(), 0
    try:
        while step < total:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                exs = next_examples()
                if enc is not None:
                    enc.keys = [ex.image for ex in exs]
                b = {k: v.to(device) for k, v in batch_for(exs).items()}
                with _autocast(device, cfg):
                    if cfg.stage == "stage1":
                        loss = model(**b, generator=neg_gen)["loss"]
                    else:
                        loss = model(**b, return_dict=True).loss
                (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
                seen += b["pixel_values"].shape[0]
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(step_loss)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}; lower the lr or check the data")
            if cfg.log_every and (step % cfg.log_every == 0 or step == total):
                now = time.perf_counter()
                ips = (seen - seen_log) / max(now - t_log, 1e-9)
                t_log, seen_log = now, seen
                bar = "#" * int(20 * step / total)
                print(f"[{bar:<20}] step {step}/{total} loss {step_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"{ips:.1f} img/s", file=sys.stderr, flush=True)
            if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                last_ckpt = save_checkpoint(out_dir / f"checkpoint-{step}", model, processor, state_dict())
    finally:
        if enc is not None:
            enc.__exit__()

    skipped = getattr(data, "skipped", 0)
    if skipped:
        print(f"note: {skipped} data line(s) were skipped for unreadable images", file=sys.stderr)
    ips = seen / max(time.perf_counter() - t0, 1e-9)
    return TrainResult(step=step, losses=losses, checkpoint=last_ckpt, skipped=skipped, images_per_s=ips)
