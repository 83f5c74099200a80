"""The model side every command shares: --model to a directory, --device / --dtype, loading, and
the generation options, prompts and decoding that caption and ask have in common."""

from __future__ import annotations

import argparse
import string
from pathlib import Path
from typing import Any, Callable

import torch

from ... import Blip2Processor
from ...checkpoint.header import read_header
from ...checkpoint.hub import resolve_dir
from ...checkpoint.pretrained import as_dtype
from ...checkpoint.reader import checkpoint_files
from ...models.prompt import image_prompt_batch
from ..demo.shipped import demo_checkpoint

DEFAULT_LM_MODEL = "Salesforce/blip2-opt-2.7b"  # caption / ask, as the docs use
DEFAULT_ITM_MODEL = "Salesforce/blip2-itm-vit-g"  # match / embed
DEVICE_TYPES = ("cpu", "cuda", "mps")


class UsageError(Exception):
    """A problem with the model or the command line: one line on stderr, exit 2."""


class TooLong(ValueError):
    """One prompt or text does not fit the model's positions: that item fails, the others go on."""


def model_dir(name: str, demo_kind: str = "captioning") -> Path:
    """The checkpoint directory for --model: a local directory, a hub id, or 'demo' (the shipped
    demo checkpoint: "captioning" for caption/ask/info, "retrieval" for match/embed)."""
    if name != "demo":
        return resolve_dir(name)
    try:
        return demo_checkpoint(demo_kind)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def args_model_dir(args: argparse.Namespace) -> Path:
    return model_dir(args.model, getattr(args, "demo_kind", "captioning"))


def pick_device(name: str) -> torch.device:
    """--device as a torch device that exists here; anything else is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_TYPES:
        raise UsageError(f"--device {name!r}: the command runs on {', '.join(DEVICE_TYPES)} only")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # half precision where it is fast, exact fp32 on the CPU
        return torch.float16 if device.type == "cuda" else torch.float32
    return as_dtype(name)


def check_template(template: str) -> None:
    """--template must hold exactly one `{}` (where the question goes) and no other field."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UsageError(f"--template {template!r}: {e}; write literal braces as {{{{ and }}}}") from None
    if fields != [("", "", None)]:
        raise UsageError(f"--template {template!r} must hold exactly one {{}} (where the question goes) and "
                         "no other {...} field; write literal braces as {{ and }}")


def load(args: argparse.Namespace, cls: type) -> tuple[Any, Blip2Processor]:
    """(model, processor) for --model, on --device in --dtype (--quantize where the command has it).
    Whatever makes the checkpoint unloadable is a UsageError naming the directory."""
    d = args_model_dir(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    q = getattr(args, "quantize", None)
    # Files that are not a usable checkpoint: say so in one line, not a traceback.
    try:
        proc = Blip2Processor.from_pretrained(d)
    except Exception as e:
        raise unusable(d, e, "the tokenizer / processor files") from e
    try:
        model = cls.from_pretrained(d, dtype=dtype, device=device, **({"quantize": q} if q else {}))
    except Exception as e:
        raise unusable(d, e) from e
    return model, proc


def unusable(d: Path, e: Exception, what: str = "the checkpoint") -> UsageError:
    """The one-line error for a checkpoint directory whose files cannot be read as a model."""
    why = " ".join(str(e).split()) or type(e).__name__
    return UsageError(f"cannot use {what} in {d}: {why}")


def pixels(proc, images: list, model) -> torch.Tensor:
    pv = proc.image_processor(images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
    return pv.to(model.device, model.dtype)


def prompt_ids(proc, model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised prompts with the image placeholders in front, as the processor builds them when it
    gets images with the text: ((B, Q+T) ids, (B, Q+T) mask) on the model's device."""
    enc = proc(images=None, text=texts, return_tensors="pt")
    ids, am = image_prompt_batch(enc["input_ids"], model.config.num_query_tokens, model.config.image_token_index,
                                 enc["attention_mask"])
    return ids.to(model.device), am.to(model.device)


def short(text: str, n: int = 40) -> str:
    """A prompt or text as a message shows it: quoted, cut to n characters."""
    return repr(text if len(text) <= n else text[:n] + "...")


def longest_fitting(text: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of `text` that `fits` (token counts grow with the prefix: a binary search)."""
    lo, hi = 0, len(text)  # fits(text[:lo]) holds, fits(text[:hi + 1]) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(text[:mid]) else (lo, mid - 1)
    return text[:lo].rstrip()


def fit_prompt(proc, model, args: argparse.Namespace, text: str, fmt: str = "{}") -> tuple[list[int], str]:
    """(ids of fmt.format(used) with the image placeholders in front, used): `used` is `text`, or
    with --truncate the longest start of it that fits. A decoder-only LM has max_position_embeddings
    positions for the prompt and the new tokens; a prompt that does not fit raises TooLong."""
    def ids_of(t: str) -> list[int]:
        return prompt_ids(proc, model, [fmt.format(t)])[0][0].tolist()

    ids = ids_of(text)
    if not model.config.use_decoder_only_language_model:  # T5: relative positions, no limit
        return ids, text
    limit, new, Q = model.config.text_config.max_position_embeddings, args.max_new_tokens, model.config.num_query_tokens
    room = limit - new + 1  # the prompt's positions; the last new token is never fed back
    if len(ids) <= room:
        return ids, text
    why = (f"prompt of {len(ids) - Q} tokens + {Q} image queries + --max-new-tokens {new} exceeds the "
           f"language model's {limit} positions")
    empty = len(ids_of(""))
    if empty > room:  # not even an empty text fits: --max-new-tokens (or the template) is at fault
        raise UsageError(f"--max-new-tokens {new} is more than the language model has room for ({limit} "
                         f"positions, {empty} of them taken before the text); use at most {limit + 1 - empty}")
    if not args.truncate:
        raise TooLong(f"{why}; shorten it or pass --truncate")
    used = longest_fitting(text, lambda t: len(ids_of(t)) <= room)
    return ids_of(used), used


def fit_texts(proc, limit: int, texts: list[str], truncate: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """The texts that fit the Q-Former's `limit` positions (all of them with --truncate, which the
    tokenizer then cuts) and (text, why) for the others."""
    ok, bad = [], []
    for t in texts:
        n = len(proc.tokenizer(t)["input_ids"])
        if n <= limit or truncate:
            ok.append(t)
        else:
            bad.append((t, f"text of {n} tokens exceeds the Q-Former's {limit} positions; "
                           "shorten it or pass --truncate"))
    return ok, bad


def text_ids(proc, model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, L) ids and mask of texts for the Q-Former, cut at its max_position_embeddings."""
    limit = model.config.qformer_config.max_position_embeddings
    enc = proc.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    return enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)


def gen_kwargs(args: argparse.Namespace) -> dict:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.num_beams is not None:
        kw["num_beams"] = args.num_beams
    if args.temperature is not None:
        kw.update(do_sample=True, temperature=args.temperature)
    if args.top_p is not None:
        kw.update(do_sample=True, top_p=args.top_p)
    n = getattr(args, "num_captions", 1) or 1
    if n > 1:
        kw["num_return_sequences"] = n
        if not kw.get("do_sample") and kw.get("num_beams", 1) < n:
            kw["num_beams"] = n  # several greedy captions need beams (or sampling)
    return kw


def decode(proc, model, out: torch.Tensor, prompt_len: int) -> list[str]:
    # OPT returns the prompt (image placeholders, BOS, text) then the new tokens: keep the new ones.
    if model.config.use_decoder_only_language_model:
        out = out[:, prompt_len:]
    return [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]


def options(args: argparse.Namespace) -> dict:
    """The options a record was made with (stored in each caption / answer record)."""
    o = {"model": args.model}
    for k in ("prompt", "template", "max_new_tokens", "num_beams", "temperature", "top_p", "num_captions"):
        v = getattr(args, k, None)
        if v is not None:
            o[k] = v
    o["dtype"] = args.dtype
    return o


def has_keys(d: Path, prefix: str) -> bool:
    """Whether the checkpoint in `d` holds tensors under `prefix` (read from file headers only)."""
    files, fmt = checkpoint_files(d)
    return fmt == "safetensors" and any(k.startswith(prefix) for f in files for k in read_header(f)[0])
