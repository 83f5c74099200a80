"""Blip2Processor: image processor + tokenizer, with the `<image>` placeholder expansion that
transformers 5.x BLIP-2 models expect in front of every prompt."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from ..checkpoint.hub import resolve_dir
from ..models.prompt import image_prompt
from .encoding import BatchEncoding
from .image import IMAGE_PROCESSOR_NAME, BlipImageProcessor
from .tokenization import Blip2Tokenizer

PROCESSOR_NAME = "processor_config.json"
_IMAGE_KWARGS = {"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                 "image_std", "do_convert_rgb", "input_data_format"}
_TEXT_KWARGS = {"text_pair", "add_special_tokens", "padding", "truncation", "max_length", "stride",
                "is_split_into_words", "pad_to_multiple_of", "return_token_type_ids", "return_attention_mask",
                "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping",
                "return_length", "verbose", "padding_side", "split_special_tokens"}
# Blip2Processor's text defaults in transformers (note: no token_type_ids, even for BERT)
_TEXT_DEFAULTS = dict(add_special_tokens=True, padding=False, stride=0, return_overflowing_tokens=False,
                      return_special_tokens_mask=False, return_offsets_mapping=False, return_token_type_ids=False,
                      return_length=False, verbose=True)


class Blip2Processor:
    """Prepares `pixel_values`, `input_ids` and `attention_mask` for the BLIP-2 models."""

    def __init__(self, image_processor: BlipImageProcessor, tokenizer: Blip2Tokenizer,
                 num_query_tokens: int | None = None, **kwargs: Any):
        if not hasattr(tokenizer, "image_token"):
            # As the reference: register <image> as a special token when the tokenizer lacks one.
            self.image_token = AddedToken("<image>", normalized=False, special=True)
            tokenizer.add_tokens([self.image_token], special_tokens=True)
        else:
            self.image_token = tokenizer.image_token
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.extra = dict(kwargs)  # unknown processor_config.json keys, kept for save_pretrained

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(str(self.image_token))

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ io
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> "Blip2Processor":
        """Load from a checkpoint directory or hub id. Reads processor_config.json (newer layout,
        with the image processor nested and num_query_tokens) or preprocessor_config.json (older)."""
        d = resolve_dir(str(path_or_id))
        pc = json.loads((d / PROCESSOR_NAME).read_text(encoding="utf-8")) if (d / PROCESSOR_NAME).is_file() else {}
        ip_cfg = pc.pop("image_processor", None)
        if not isinstance(ip_cfg, dict):
            f = d / IMAGE_PROCESSOR_NAME
            if not f.is_file():
                raise FileNotFoundError(f"no image processor config in {d}: looked for {IMAGE_PROCESSOR_NAME} "
                                        f"and an 'image_processor' entry in {PROCESSOR_NAME}")
            ip_cfg = json.loads(f.read_text(encoding="utf-8"))
        ip_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _IMAGE_KWARGS}
        image_processor = BlipImageProcessor.from_dict(ip_cfg, **ip_kwargs)
        num_query_tokens = kwargs.pop("num_query_tokens", pc.pop("num_query_tokens", None))
        pc.pop("processor_class", None)
        tokenizer = Blip2Tokenizer.from_pretrained(d, **kwargs)
        return cls(image_processor, tokenizer, num_query_tokens=num_query_tokens, **pc)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the transformers 5.x layout: tokenizer files + processor_config.json."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out, processor_class="Blip2Processor")
        cfg = {**self.extra, "image_processor": self.image_processor.to_dict(),
               "num_query_tokens": self.num_query_tokens, "processor_class": "Blip2Processor"}
        if cfg["num_query_tokens"] is None:
            cfg.pop("num_query_tokens")
        (out / PROCESSOR_NAME).write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n", encoding="utf-8")
        return out

    # ------------------------------------------------------------------ call
    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: str | None = None,
                 **kwargs: Any) -> BatchEncoding:
        if images is None and text is None:
            raise ValueError("You have to specify either images or text.")
        text_kw = {**_TEXT_DEFAULTS, **kwargs.pop("text_kwargs", {})}
        image_kw = dict(kwargs.pop("images_kwargs", {}))
        kwargs.pop("common_kwargs", None)
        for k, v in kwargs.items():
            if k in _IMAGE_KWARGS:
                image_kw[k] = v
            elif k in _TEXT_KWARGS:
                text_kw[k] = v
            elif k == "return_tensors":
                return_tensors = v
            else:
                warnings.warn(f"Keyword argument `{k}` is not a valid argument for this processor and will be ignored.")
        text_kw.pop("return_tensors", None)
        if text_kw.get("max_length") is not None and self.num_query_tokens is not None:
            # the image placeholders count toward max_length (always, as in the reference)
            text_kw["max_length"] = text_kw["max_length"] - self.num_query_tokens

        encoding: dict[str, Any] = {}
        if text is not None:
            if isinstance(text, str):
                text = [text]
            elif not isinstance(text, list) or (text and not isinstance(text[0], str)):
                raise ValueError("Invalid input text. Please provide a string, or a list of strings")
            enc = self.tokenizer(text, **text_kw)
            if images is not None and self.num_query_tokens is not None:
                self._put_image_tokens_first(enc)
            encoding.update(enc)
        if images is not None:
            encoding.update(self.image_processor(images, **image_kw))
        return BatchEncoding(encoding, tensor_type=return_tensors)

    def _put_image_tokens_first(self, enc: BatchEncoding) -> None:
        """Prefix every row with the Q image placeholders, in front of everything (BOS and left
        padding included); they are never padded or truncated. Each output holds what the reference
        gets by tokenising "<image>" * Q without special tokens: the image token id, attention 1,
        token type 0, special-token mask 0, and the placeholders' character spans in that string."""
        Q, image_id, n = self.num_query_tokens, self.image_token_id, len(str(self.image_token))
        fill = {"token_type_ids": 0, "attention_mask": 1, "special_tokens_mask": 0}
        for k, rows in list(enc.items()):
            if k == "input_ids":
                enc[k] = [image_prompt(row, Q, image_id) for row in rows]
            elif k in fill:
                enc[k] = [[fill[k]] * Q + row for row in rows]
            elif k == "offset_mapping":
                enc[k] = [[(i * n, (i + 1) * n) for i in range(Q)] + row for row in rows]
            else:  # length, overflow_to_sample_mapping: one number per row, nothing to prefix
                raise TypeError(f"the processor cannot return {k} together with images")

    # ------------------------------------------------------------------ decode
    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str | list[str]:
        return self.tokenizer.decode(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"Blip2Processor(num_query_tokens={self.num_query_tokens},\n  image_processor={self.image_processor!r},"
                f"\n  tokenizer={self.tokenizer!r})")


AutoProcessor = Blip2Processor
