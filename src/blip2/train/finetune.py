"""Fine-tuning a captioning checkpoint (Blip2ForConditionalGeneration) on one's own captions or
question/answer pairs: what `blip2 finetune` runs.

    run = finetune("path/to/model", load_data("my-data/"), "runs/mine")   # -> the summary dict
    # runs/mine/: the fine-tuned model (config.json, model.safetensors, tokenizer and processor
    # files), finetune.json (options, losses, held-out figures before and after), checkpoint-N/

The data are split by image (a share `eval_split` held out, seeded), the rest trains with the
trainer (trainer.py: stage "caption" or "stage2"; its progress bar shows loss, lr and images/s)
and the held-out part is scored before and after: exact match of greedy captions / answers, and
the token accuracy of the teacher-forced targets. What trains (`train_mode`):
  qformer  the query tokens, the Q-Former and the projection (the trainer's stage 2 / caption)
  lora     those, LoRA adapters on the language model's linear layers (lora.py), merged into
           the saved weights, and its token embeddings
  lm       those, and every weight of the language model (small models)
  vision   those of lm, and the image encoder's last block and final norm (its output is then
           computed at every step instead of once per image: slower)
Re-running with the same out_dir resumes from its newest checkpoint (state.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint.pretrained import checkpoint_files
from ..generation.config import GenerationConfig
from ..models.blip2 import Blip2ForConditionalGeneration
from ..models.config import Blip2Config
from ..processing.image import load_image
from ..processing.processor import Blip2Processor
from .batches import lm_batch
from .data import Example
from .lora import add_lora, merge_lora
from .state import latest_checkpoint, load_weights_into
from .trainer import TrainConfig, train

TRAIN_MODES = ("qformer", "lora", "lm", "vision")
# lora trains the token embeddings (tied to the output layer) too: words the language model never
# saw have untrained embeddings, which adapters on the linear layers cannot produce (measured:
# README, "Fine-tune from the terminal")
UNFREEZE = {"qformer": (), "lora": ("lora_", "embed_tokens.", "language_model.shared."), "lm": ("language_model.",),
            "vision": ("language_model.", "vision_model.post_layernorm.")}  # + the last block, in finetune()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # OPT's names (T5: q, k, v, o, wi, wo)
SUMMARY = "finetune.json"
MAX_EVAL = 500  # held-out examples scored (greedy decoding is the slow part); the rest are only left out


def split_by_image(data: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded share of the images, with every example of theirs, is held out
    (at least one image when share > 0, at most all but one)."""
    images = sorted({str(ex.image) for ex in data})
    random.Random(seed).shuffle(images)
    k = 0 if share <= 0 else min(len(images) - 1, max(1, round(share * len(images))))
    held = set(images[:k])
    return [ex for ex in data if str(ex.image) not in held], [ex for ex in data if str(ex.image) in held]


def default_options(n_train: int, train_mode: str) -> dict:
    """Batch size, steps, learning rate and warmup from the number of training examples: about 10
    epochs for small sets (3 for large ones), 50 to 3000 steps, a higher lr for the adapters."""
    batch = max(2, min(16, n_train // 8))
    epochs = 10 if n_train < 5000 else 3
    steps = max(50, min(3000, math.ceil(epochs * n_train / batch)))
    lr = {"qformer": 3e-4, "lora": 3e-4, "lm": 1e-4, "vision": 1e-4}[train_mode]
    return dict(batch_size=batch, steps=steps, lr=lr, warmup=min(100, steps // 10))


def load_model(d: Path) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """The checkpoint in d as a plain fp32 model for training (no load-time conversions) and its processor."""
    cfg = Blip2Config.from_json_file(d / "config.json")
    archs = getattr(cfg, "architectures", None) or []
    if (archs and "Blip2ForConditionalGeneration" not in archs) or "text_config" not in cfg.to_dict():
        raise ValueError(f"{d} is a {archs[0] if archs else 'model'} with no language model: fine-tuning "
                         "trains a captioning checkpoint (Blip2ForConditionalGeneration)")
    torch.manual_seed(0)  # the weights are all overwritten; keep the initialisation's draws repeatable
    model = Blip2ForConditionalGeneration(cfg)
    checkpoint_files(d)  # a clear error when there are no weights
    load_weights_into(model, d)
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d)
    return model.float().eval(), Blip2Processor.from_pretrained(d)


@torch.no_grad()
def held_out_figures(model, proc, held: list[Example], cfg: TrainConfig, batch: int = 32,
                     max_new_tokens: int = 40) -> dict:
    """Exact match of greedy outputs and teacher-forced token accuracy, for captions and for QA."""
    model.eval()
    dev = next(model.parameters()).device
    out: dict = {}
    for kind, exs in (("caption", [e for e in held if not e.is_qa]), ("qa", [e for e in held if e.is_qa])):
        if not exs:
            continue
        exact = right = total = 0
        for i in range(0, len(exs), batch):
            part = exs[i:i + batch]
            prompts = [cfg.qa_prompt.format(q=e.question) if e.is_qa else cfg.prompt for e in part]
            images = [load_image(e.image) for e in part]
            inp = proc(images=images, text=prompts if any(prompts) else None, return_tensors="pt",
                       padding=True).to(dev)
            ids = model.generate(**inp, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            if any(prompts) and model.config.use_decoder_only_language_model:
                ids = ids[:, inp["input_ids"].shape[1]:]  # a decoder-only LM returns the prompt too
            got = [t.strip() for t in proc.batch_decode(ids, skip_special_tokens=True)]
            exact += sum(g == (e.answer if e.is_qa else e.text).strip() for g, e in zip(got, part))
            b = {k: v.to(dev) for k, v in lm_batch(part, proc, cfg, model.config).items()}
            logits = model(**b, return_dict=True).logits
            if model.config.use_decoder_only_language_model:  # position t predicts token t + 1
                pred, tgt = logits[:, :-1].argmax(-1), b["labels"][:, 1:]
            else:
                pred, tgt = logits.argmax(-1), b["labels"]
            keep = tgt != -100
            right += int((pred[keep] == tgt[keep]).sum())
            total += int(keep.sum())
        out[kind] = dict(examples=len(exs), exact_match=round(exact / len(exs), 4),
                         token_accuracy=round(right / max(total, 1), 4))
    return out


def finetune(model_dir: str | os.PathLike, data: list[Example], out_dir: str | os.PathLike, *,
             stage: str = "caption", train_mode: str = "qformer", steps: int | None = None,
             batch_size: int | None = None, lr: float | None = None, warmup: int | None = None,
             eval_split: float = 0.1, seed: int = 0, prompt: str = "", qa_prompt: str = "Question: {q} Answer:",
             max_length: int = 40, save_every: int | None = None, lora_rank: int = 8, lora_alpha: float = 16.0,
             lora_targets: tuple[str, ...] = LORA_TARGETS, device: str = "cpu", restart: bool = False,
             log_every: int = 10) -> dict:
    """Fine-tune the checkpoint in model_dir on data and write the result to out_dir (module
    docstring); None options come from default_options. Returns the summary (finetune.json)."""
    if train_mode not in TRAIN_MODES:
        raise ValueError(f"train mode must be one of {TRAIN_MODES}, not {train_mode!r}")
    out = Path(out_dir)
    if restart and out.exists():
        for p in out.glob("checkpoint-*"):
            shutil.rmtree(p)
    t0 = time.perf_counter()
    model, proc = load_model(Path(model_dir))
    tr, held = split_by_image(data, eval_split, seed)
    held = held[:MAX_EVAL]
    if not tr:
        raise ValueError("no training examples are left after holding out the evaluation share")
    d = default_options(len(tr), train_mode)
    steps, lr = steps or d["steps"], lr or d["lr"]
    batch_size = min(batch_size or d["batch_size"], len(tr))
    warmup = d["warmup"] if warmup is None else warmup
    unfreeze = UNFREEZE[train_mode]
    if train_mode == "vision":  # the encoder's last block: what a new colour or shape needs first
        unfreeze += (f"vision_model.encoder.layers.{len(model.vision_model.encoder.layers) - 1}.",)
    cfg = TrainConfig(stage=stage, lr=lr, warmup_steps=min(warmup, steps), batch_size=batch_size, max_steps=steps,
                      seed=seed, output_dir=str(out), log_every=log_every,
                      save_every=save_every if save_every is not None else max(1, steps // 4),
                      max_length=max_length, prompt=prompt, qa_prompt=qa_prompt, cache_images=True,
                      cache_image_embeds=train_mode != "vision", unfreeze=unfreeze)
    model.to(device)
    before = held_out_figures(model, proc, held, cfg) if held else {}
    if train_mode == "lora":
        add_lora(model.language_model, lora_targets, lora_rank, lora_alpha)
    resume = latest_checkpoint(out) if out.exists() else None
    res = train(model, proc, tr, cfg, resume_from=resume)
    merge_lora(model)
    model.eval()
    after = held_out_figures(model, proc, held, cfg) if held else {}
    _save_final(model, proc, out)
    summary = dict(model=str(model_dir), examples=len(data), train_examples=len(tr), held_out_examples=len(held),
                   train_mode=train_mode, steps=res.step, batch_size=batch_size, lr=lr, warmup=cfg.warmup_steps,
                   resumed_from=str(resume) if resume else None, final_loss=res.losses[-1] if res.losses else None,
                   images_per_s=round(res.images_per_s, 2), seconds=round(time.perf_counter() - t0, 1),
                   held_out_before=before, held_out_after=after,
                   config={k: v for k, v in asdict(cfg).items() if k not in ("matches", "extra")},
                   lora=dict(rank=lora_rank, alpha=lora_alpha, targets=list(lora_targets)) if train_mode == "lora" else None)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / SUMMARY)
    print(f"fine-tuned {res.step} steps; held-out {json.dumps(before)} -> {json.dumps(after)}", file=sys.stderr)
    return summary


def _save_final(model, proc, out: Path) -> None:
    """The model and processor files into out, each written beside and renamed into place."""
    tmp = out / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()
