"""Batches for the trainer: the images (decoded pixels, or the frozen encoder's cached output) and
the text of each stage.

Stage 1 reads the Q-Former's tokenizer: [CLS] caption [SEP], padded. Stages 2 / caption read the
language model's, in the layout generate() sees (the prompt, then the new tokens):
    decoder-only   [<image> x Q] [BOS] prompt | target [EOS] [PAD ...]
        labels     -100 ....................| target  EOS  -100 ...
    encoder-decoder: the encoder reads [<image> x Q] prompt; the labels are target (+ EOS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..models.prompt import image_prompt
from ..processing.image import ImageLoadError, load_image
from .data import DataError, Example


def pixel_values(examples: list[Example], image_processor, cache: dict | None = None) -> torch.Tensor:
    """Decode and preprocess the examples' images (B, 3, H, W); with a cache dict {path: (3, H, W)},
    each image only once per run."""
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


def image_embeds(vision_model: nn.Module, examples: list[Example], image_processor, device: torch.device,
                 pixel_cache: dict | None = None, embed_cache: dict | None = None) -> torch.Tensor:
    """The image encoder's output (B, 1+N, C) for the examples' images: without gradients, unless
    some of its parameters train (then with them, and without embed_cache).

    embed_cache, a dict {image path: (1+N, C)}, keeps each image's output once computed: the
    encoder never trains and stays in eval mode, so the output is the same at every step, and
    after the first epoch a step costs only the Q-Former (and the frozen LM), with no image
    decoded. Share it only between models whose encoders have the same weights. An output
    computed in another batch can differ in the last bits, so exact resume holds with it off."""
    if embed_cache is None:
        px = pixel_values(examples, image_processor, pixel_cache).to(device)
        # gradients only where some of the encoder trains (`blip2 finetune --train vision`)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in vision_model.parameters())):
            return vision_model(pixel_values=px, return_dict=True).last_hidden_state
    return _cached_embeds(vision_model, examples, image_processor, device, pixel_cache, embed_cache)


@torch.no_grad()
def _cached_embeds(vision_model, examples, image_processor, device, pixel_cache, embed_cache) -> torch.Tensor:
    todo = [ex for ex in examples if ex.image not in embed_cache]
    if todo:
        px = pixel_values(todo, image_processor, pixel_cache).to(device)
        for ex, x in zip(todo, vision_model(pixel_values=px, return_dict=True).last_hidden_state):
            embed_cache[ex.image] = x
    return torch.stack([embed_cache[ex.image] for ex in examples])


def stage1_text(examples: list[Example], tokenizer, max_length: int,
                matches: Callable[[Example, Example], bool] | None = None) -> dict[str, torch.Tensor]:
    """Q-Former text (input_ids, attention_mask) and `positives` (B, B): the pairs that match
    besides the diagonal (the same image file or the same caption twice in one batch, or where
    matches(image example i, text example j) says that text j is true of image i, e.g. a partial
    description such as "a circle" of every image with a circle)."""
    texts = [ex.text if ex.text is not None else f"{ex.question} {ex.answer}" for ex in examples]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    same = [[a.image == b.image or ta == tb or (matches is not None and matches(a, b))
             for b, tb in zip(examples, texts)] for a, ta in zip(examples, texts)]
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                positives=torch.tensor(same, dtype=torch.bool))


def stage1_batch(examples: list[Example], processor, cfg, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """pixel_values + stage1_text: the processor's tokenizer is the Q-Former's (BERT-style) one here."""
    return dict(pixel_values=pixel_values(examples, processor.image_processor, cache),
                **stage1_text(examples, processor.tokenizer, cfg.max_length, getattr(cfg, "matches", None)))


def _prompt_target(ex: Example, cfg) -> tuple[str, str]:
    if ex.is_qa:
        return cfg.qa_prompt.format(q=ex.question), " " + ex.answer
    return cfg.prompt, (" " + ex.text if cfg.prompt else ex.text)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    L = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (L - len(r)) for r in rows], dtype=torch.long)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    L = max(len(r) for r in rows)
    return torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], dtype=torch.long)


def lm_text(examples: list[Example], tokenizer, cfg, model_config) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels for Blip2ForConditionalGeneration (layout: module docstring).

    Prompt and target are tokenized apart, as generate() sees them; the target ends with the
    tokenizer's eos token, so generation learns to stop."""
    Q, img_id = model_config.num_query_tokens, model_config.image_token_index
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: the LM targets end with it")
    if pad is None:
        pad = eos  # padding is masked out everywhere, its id does not matter
    dec_only = model_config.use_decoder_only_language_model
    ids, labels, targets = [], [], []
    for ex in examples:
        prompt, target = _prompt_target(ex, cfg)
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if dec_only or prompt else []
        t = tokenizer(target, add_special_tokens=not dec_only)["input_ids"]  # T5's tokenizer appends </s> itself
        if not t or t[-1] != eos:
            t = t + [eos]
        t = t[: max(1, cfg.max_length - len(p))]
        if dec_only:
            ids.append(image_prompt(p + t, Q, img_id))
            labels.append([-100] * (Q + len(p)) + t)
        else:
            ids.append(image_prompt(p, Q, img_id))
            targets.append(t)
    return dict(input_ids=_pad(ids, pad), attention_mask=_mask(ids),
                labels=_pad(labels if dec_only else targets, -100))


def lm_batch(examples: list[Example], processor, cfg, model_config,
             cache: dict | None = None) -> dict[str, torch.Tensor]:
    """pixel_values + lm_text: the processor's tokenizer is the language model's."""
    return dict(pixel_values=pixel_values(examples, processor.image_processor, cache),
                **lm_text(examples, processor.tokenizer, cfg, model_config))
