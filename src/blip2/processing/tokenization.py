"""Blip2Tokenizer: the tokenizer of a BLIP-2 checkpoint, with the API of transformers' tokenizers.

It drives a `tokenizers.Tokenizer` rebuilt from the checkpoint's files (tokenizer_backend.py) for
the three families BLIP-2 uses: OPT (GPT-2 byte-level BPE), Flan-T5 (Unigram) and BERT uncased
WordPiece (retrieval checkpoints); ids, special tokens and decoding match transformers 5.x.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors

from ..checkpoint.hub import resolve_dir
from .encoding import BatchEncoding
from .special_tokens import SpecialTokensMixin
from .tokenizer_backend import FAMILY, SPECIAL_TOKEN_NAMES, added_token, as_token, read_tokenizer_dir

VERY_LARGE_INTEGER = int(1e30)  # "no limit", as transformers writes model_max_length
LARGE_INTEGER = int(1e20)

_DEFAULTS = {  # the reference classes' default special tokens
    "gpt2": dict(unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
    "t5": dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>"),
    "bert": dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]"),
    "generic": {},
}
_INPUT_NAMES = {"bert": ["input_ids", "token_type_ids", "attention_mask"]}
# tokenizer_config.json keys that are bookkeeping, not settings
_DROP_ON_SAVE = ("name_or_path", "tokenizer_file", "vocab_file", "merges_file", "added_tokens_decoder",
                 "additional_special_tokens", "add_bos_token", "add_eos_token", "tokenizer_class", "backend")
# tokenizer output key -> its value for one `tokenizers.Encoding`
_OUTPUTS = {"input_ids": lambda e: e.ids, "token_type_ids": lambda e: e.type_ids,
            "attention_mask": lambda e: e.attention_mask, "special_tokens_mask": lambda e: e.special_tokens_mask,
            "offset_mapping": lambda e: e.offsets, "length": lambda e: len(e.ids)}


class Blip2Tokenizer(SpecialTokensMixin):
    """The tokenizer of a BLIP-2 checkpoint, API-compatible with the parts of transformers' tokenizers
    that BLIP-2 code uses. Build it with `from_pretrained(dir_or_hub_id)`."""

    def __init__(self, tokenizer_object: Tokenizer, family: str = "generic", added_tokens_decoder: dict | None = None,
                 **config: Any):
        self._tokenizer = tokenizer_object
        self.family = family
        self.init_kwargs = dict(config)
        cfg = dict(config)
        cfg.pop("tokenizer_class", None)
        for k, v in _DEFAULTS.get(family, {}).items():
            cfg.setdefault(k, v)
        if family == "t5":
            # T5 always carries <extra_id_N> sentinels as extra special tokens (extra_ids=100 by default)
            if not cfg.get("extra_special_tokens"):
                cfg["extra_special_tokens"] = [f"<extra_id_{i}>" for i in range(cfg.get("extra_ids", 100))]
        if "additional_special_tokens" in cfg and "extra_special_tokens" not in cfg:
            cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")

        # tokenizer.json may carry padding / truncation defaults
        trunc, pad = self._tokenizer.truncation, self._tokenizer.padding
        if trunc is not None:
            cfg.setdefault("truncation_side", trunc["direction"])
        if pad is not None:
            cfg.setdefault("pad_token", pad["pad_token"])
            cfg.setdefault("padding_side", pad["direction"])
        self._add_bos_token = bool(cfg.get("add_bos_token", False))
        self._add_eos_token = bool(cfg.get("add_eos_token", False))
        explicit_bos_eos = "add_bos_token" in cfg or "add_eos_token" in cfg

        self._special: dict[str, Any] = {k: None for k in SPECIAL_TOKEN_NAMES}
        self._extra_special: list = []
        for k, v in cfg.items():
            v = as_token(v)
            if k in SPECIAL_TOKEN_NAMES:
                self._special[k] = v
            elif k == "extra_special_tokens" and isinstance(v, dict):
                self._special.update({n: as_token(t) for n, t in v.items()})  # named model-specific tokens
            elif k == "extra_special_tokens" and v is not None:
                self._extra_special = [as_token(t) for t in v]
            elif k.endswith("_token") and isinstance(v, (str, AddedToken)):
                self._special[k] = v  # e.g. image_token

        mml = cfg.get("model_max_length", cfg.get("max_len"))
        self.model_max_length = int(mml) if mml is not None else VERY_LARGE_INTEGER
        self.padding_side = cfg.get("padding_side", "right")
        self.truncation_side = cfg.get("truncation_side", "right")
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise ValueError(f"padding_side / truncation_side must be 'left' or 'right', got {side!r}")
        self.model_input_names = list(cfg.get("model_input_names", _INPUT_NAMES.get(family, ["input_ids", "attention_mask"])))
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._cleanup_bpe = bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self.split_special_tokens = bool(cfg.get("split_special_tokens", False))
        self.add_prefix_space = bool(cfg.get("add_prefix_space", False))
        self.name_or_path = str(cfg.get("name_or_path", ""))

        # Added tokens in id order first (so they get their saved ids), then any special token the
        # backend does not know yet.
        present = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        to_add = [added_token(t) for _, t in sorted((added_tokens_decoder or {}).items())]
        known = present | {t.content for t in to_add}
        named = {str(v) for v in self._special.values() if v is not None}
        for v in list(self._special.values()) + list(self._extra_special):
            if v is None or str(v) in known:
                continue
            if isinstance(v, AddedToken):
                if not v.special and str(v) in named:
                    v.special = True
                to_add.append(v)
            else:
                to_add.append(AddedToken(str(v), special=True))
            known.add(str(v))
        if to_add:
            self._tokenizer.add_tokens(to_add)

        if explicit_bos_eos or self._tokenizer.post_processor is None:
            self.update_post_processor()
        if family == "t5":  # the T5 class always appends </s>
            self._tokenizer.post_processor = processors.TemplateProcessing(
                single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", self.eos_token_id)])
        elif family == "bert":
            cls, sep = str(self.cls_token), str(self.sep_token)
            cid = self.cls_token_id if self.cls_token_id is not None else 2
            sid = self.sep_token_id if self.sep_token_id is not None else 3
            self._tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                special_tokens=[(cls, cid), (sep, sid)])

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> "Blip2Tokenizer":
        """Load from a checkpoint directory (or hub id) holding tokenizer.json, or vocab.json +
        merges.txt (OPT), or vocab.txt (BERT), plus tokenizer_config.json, special_tokens_map.json
        and added_tokens.json when present."""
        d = resolve_dir(str(path_or_id))
        backend, family, added, cfg = read_tokenizer_dir(d, str(path_or_id), kwargs)
        return cls(backend, family=family, added_tokens_decoder=added, **cfg)

    # ------------------------------------------------------------------ vocabulary
    def add_tokens(self, new_tokens: str | AddedToken | list, special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (at the end); returns how many were new."""
        if not new_tokens:
            return 0
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        if special_tokens:
            return self._tokenizer.add_special_tokens(list(new_tokens))
        return self._tokenizer.add_tokens(list(new_tokens))

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items())}

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def convert_tokens_to_ids(self, tokens: str | list[str] | None) -> int | list[int] | None:
        if tokens is None:
            return None
        if isinstance(tokens, str):
            i = self._tokenizer.token_to_id(tokens)
            return i if i is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in _to_list(ids) if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        dec = self._tokenizer.decoder
        return dec.decode(tokens) if dec is not None else " ".join(tokens)

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        enc = self._tokenizer.encode(text, pair, add_special_tokens=add_special_tokens)
        return enc.tokens

    # ------------------------------------------------------------------ encoding
    def _strategies(self, padding, truncation, max_length):
        # transformers' rules: max_length alone turns truncation on; padding=True pads to the longest;
        # an unset max_length falls back to model_max_length unless that is "infinite".
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        pad = "longest" if padding is True else "do_not_pad" if padding in (False, None) else str(getattr(padding, "value", padding))
        if pad not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        trunc = "longest_first" if truncation is True else None if truncation in (False, None, "do_not_truncate") \
            else str(getattr(truncation, "value", truncation))
        if trunc not in (None, "longest_first", "only_first", "only_second"):
            raise ValueError(f"truncation must be True, False or a strategy name, got {truncation!r}")
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad = "do_not_pad"
                else:
                    max_length = self.model_max_length
            if trunc is not None:
                if self.model_max_length > LARGE_INTEGER:
                    trunc = None
                else:
                    max_length = self.model_max_length
        if pad != "do_not_pad" and (self.pad_token is None or self.pad_token_id is None or self.pad_token_id < 0):
            raise ValueError("asked to pad but the tokenizer has no pad_token; set one, e.g. "
                             "tokenizer.pad_token = tokenizer.eos_token")
        return pad, trunc, max_length

    def __call__(self, text: str | list[str] | list[list[str]] | None = None, text_pair: str | list[str] | None = None,
                 add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, stride: int = 0, is_split_into_words: bool = False,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_token_type_ids: bool | None = None,
                 return_attention_mask: bool | None = None, return_overflowing_tokens: bool = False,
                 return_special_tokens_mask: bool = False, return_offsets_mapping: bool = False,
                 return_length: bool = False, verbose: bool = True, split_special_tokens: bool | None = None,
                 **kwargs: Any) -> BatchEncoding:
        if kwargs:
            raise TypeError(f"unexpected tokenizer arguments: {sorted(kwargs)}")
        if text is None:
            raise ValueError("text is required")
        if not _valid_text(text) or (text_pair is not None and not _valid_text(text_pair)):
            raise ValueError("text must be a str, a list of str, or (with is_split_into_words=True) lists of words")
        batched = (isinstance(text, (list, tuple)) and len(text) > 0 and isinstance(text[0], (list, tuple))) \
            if is_split_into_words else isinstance(text, (list, tuple))
        if batched:
            if isinstance(text_pair, str):
                raise TypeError("when text is a batch, text_pair must be a list of the same length")
            if text_pair is not None and len(text) != len(text_pair):
                raise ValueError(f"batch length of text ({len(text)}) and text_pair ({len(text_pair)}) differ")
            inputs = list(zip(text, text_pair)) if text_pair is not None else list(text)
        else:
            inputs = [(text, text_pair)] if text_pair else [text]

        pad, trunc, max_length = self._strategies(padding, truncation, max_length)
        tk = self._tokenizer
        if trunc is None:
            if tk.truncation is not None:
                tk.no_truncation()
        else:
            tk.enable_truncation(max_length=max_length, stride=stride, strategy=trunc, direction=self.truncation_side)
        if pad == "do_not_pad":
            if tk.padding is not None:
                tk.no_padding()
        else:
            tk.enable_padding(direction=padding_side or self.padding_side, pad_id=self.pad_token_id,
                              pad_type_id=self.pad_token_type_id, pad_token=self.pad_token,
                              length=max_length if pad == "max_length" else None, pad_to_multiple_of=pad_to_multiple_of)
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        if tk.encode_special_tokens != split:
            tk.encode_special_tokens = split
        encs = tk.encode_batch(inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_split_into_words)

        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        wanted = {"input_ids": True, "token_type_ids": return_token_type_ids, "attention_mask": return_attention_mask,
                  "special_tokens_mask": return_special_tokens_mask, "offset_mapping": return_offsets_mapping,
                  "length": return_length}
        # (input row, encoding): overflowing windows follow the row they came from
        flat = [(i, x) for i, e in enumerate(encs)
                for x in [e] + (list(e.overflowing) if return_overflowing_tokens else [])]
        data = {k: [_OUTPUTS[k](x) for _, x in flat] for k, on in wanted.items() if on}
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = [i for i, _ in flat]
        if not batched and return_tensors is None and not return_overflowing_tokens:
            data = {k: (v[0] if v and isinstance(v[0], list) else v) for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors, encodings=[x for _, x in flat])

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, **kwargs: Any):
        return self(text, text_pair=text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    # ------------------------------------------------------------------ decoding
    def _decode(self, ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool | None) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        # transformers skips the cleanup for BPE models: it would eat real spaces before punctuation
        if clean and (type(self._tokenizer.model).__name__ != "BPE" or self._cleanup_bpe):
            text = clean_up_tokenization(text)
        return text

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str | list[str]:
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], (list, tuple)):
            # a batch: transformers does not clean up here unless asked explicitly
            clean = kwargs.pop("clean_up_tokenization_spaces", False)
            return [self._decode(list(s), skip_special_tokens, clean) for s in ids]
        return self._decode(ids, skip_special_tokens, kwargs.pop("clean_up_tokenization_spaces", None))

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> list[str]:
        out = self.decode(sequences, skip_special_tokens=skip_special_tokens,
                          clean_up_tokenization_spaces=clean_up_tokenization_spaces)
        return [out] if isinstance(out, str) else out

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, processor_class: str | None = None) -> tuple[str, ...]:
        """Write tokenizer.json and tokenizer_config.json (the transformers 5.x layout)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in self.init_kwargs.items() if k not in _DROP_ON_SAVE}
        cfg = {k: (v.content if isinstance(v, AddedToken) else v) for k, v in cfg.items()
               if not isinstance(v, (AddedToken, dict)) or k not in SPECIAL_TOKEN_NAMES}
        for k in ("padding_side", "truncation_side", "clean_up_tokenization_spaces", "add_prefix_space"):
            if k in cfg:
                cfg[k] = getattr(self, k)
        cfg["model_max_length"] = self.model_max_length
        cfg.update({k: str(v) for k, v in self._special.items() if v is not None})
        if self._extra_special:
            cfg["extra_special_tokens"] = self.extra_special_tokens
        if processor_class is not None:
            cfg["processor_class"] = processor_class
        family_class = {f: c for c, f in FAMILY.items()}.get(self.family, "TokenizersBackend")
        cfg["tokenizer_class"] = self.init_kwargs.get("tokenizer_class") or family_class
        cfg["backend"] = "tokenizers"
        # Leave no padding/truncation state from the last call in the saved file.
        tk = self._tokenizer
        tk.no_padding()
        tk.no_truncation()
        tk.save(str(out / "tokenizer.json"))
        with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(dict(sorted(cfg.items())), indent=2, ensure_ascii=False) + "\n")
        return (str(out / "tokenizer_config.json"), str(out / "tokenizer.json"))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, family={self.family!r}, "
                f"vocab_size={self.vocab_size}, len={len(self)}, padding_side={self.padding_side!r}, "
                f"special_tokens={self.special_tokens_map})")


def clean_up_tokenization(text: str) -> str:
    """Undo the spaces WordPiece-style detokenization leaves before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _valid_text(t: Any) -> bool:
    if isinstance(t, str):
        return True
    if isinstance(t, (list, tuple)):
        if len(t) == 0 or isinstance(t[0], str):
            return True
        if isinstance(t[0], (list, tuple)):
            return len(t[0]) == 0 or isinstance(t[0][0], str)
    return False


def _to_list(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_to_list(v) for v in x]
    return x


AutoTokenizer = Blip2Tokenizer
