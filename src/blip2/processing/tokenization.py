"""Tokenizers for BLIP-2 checkpoints on the `tokenizers` library: OPT (GPT-2 byte-level BPE),
Flan-T5 (Unigram) and BERT uncased WordPiece (retrieval checkpoints).

The backend pipeline is rebuilt per family from the saved vocabulary, as transformers 5.x does
(GPT2Tokenizer / T5Tokenizer / BertTokenizer), so ids, special tokens and decoding match it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram, WordPiece

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # "no limit", as transformers writes model_max_length
LARGE_INTEGER = int(1e20)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt", "vocab.txt")

# tokenizer_class in tokenizer_config.json -> pipeline family
_FAMILY = {"GPT2Tokenizer": "gpt2", "T5Tokenizer": "t5", "BertTokenizer": "bert"}
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


class BatchEncoding(dict):
    """A dict of model inputs with attribute access, tensor conversion and `.to(device, dtype)`.

    `.to(dtype)` casts only floating tensors (pixel_values), so `input_ids` stay integer.
    """

    def __init__(self, data: dict | None = None, tensor_type: str | None = None, encodings: list | None = None):
        super().__init__(data or {})
        self._encodings = encodings
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getstate__(self):
        return {"data": dict(self), "encodings": self._encodings}

    def __setstate__(self, state):
        self.update(state["data"])
        self._encodings = state.get("encodings")

    def __reduce__(self):
        return (self.__class__, (dict(self),), {"data": {}, "encodings": self._encodings})

    @property
    def encodings(self):
        return self._encodings

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self._encodings[batch_index].tokens

    def convert_to_tensors(self, tensor_type: str | None = None) -> "BatchEncoding":
        if tensor_type is None:
            return self
        tensor_type = str(getattr(tensor_type, "value", tensor_type))
        import numpy as np

        for k, v in list(self.items()):
            if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], str)):
                continue
            try:
                if tensor_type == "pt":
                    import torch

                    if torch.is_tensor(v):
                        continue
                    if isinstance(v, (list, tuple)) and v and torch.is_tensor(v[0]):
                        self[k] = torch.stack(list(v))
                    elif isinstance(v, np.ndarray) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], np.ndarray)):
                        self[k] = torch.from_numpy(np.array(v))
                    else:
                        self[k] = torch.tensor(v)
                elif tensor_type == "np":
                    self[k] = np.asarray(v)
                else:
                    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {tensor_type!r}")
            except ValueError as e:
                if "return_tensors must be" in str(e):
                    raise
                raise ValueError(f"cannot make a tensor of '{k}' ({e}); its rows differ in length: pass "
                                 "padding=True (or padding='max_length'), or return_tensors=None") from e
        return self

    def to(self, *args: Any, **kwargs: Any) -> "BatchEncoding":
        """Move tensors to a device; a dtype argument applies to floating tensors only."""
        import torch

        device = kwargs.get("device")
        if device is None and args:
            if isinstance(args[0], torch.dtype):
                pass
            elif isinstance(args[0], (str, int, torch.device)):
                device = args[0]
            else:
                raise ValueError(f"cannot move a BatchEncoding to {args[0]!r}")
        non_blocking = kwargs.get("non_blocking", False)

        def move(v):
            if isinstance(v, torch.Tensor) and torch.is_floating_point(v):
                return v.to(*args, **kwargs)
            if isinstance(v, torch.Tensor) and device is not None:
                return v.to(device=device, non_blocking=non_blocking)
            if isinstance(v, (list, tuple)):
                return type(v)(move(x) for x in v)
            return v

        for k in list(self.keys()):
            self[k] = move(self[k])
        return self


def _added(tok: Any) -> AddedToken:
    """An AddedToken from a config value: a string, a serialized dict or an AddedToken."""
    if isinstance(tok, AddedToken):
        return tok
    if isinstance(tok, dict):
        d = {k: v for k, v in tok.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}
        return AddedToken(**d)
    return AddedToken(str(tok), special=True)


def _as_token(v: Any) -> Any:
    """Config values may be serialized AddedTokens ({"__type": "AddedToken", ...}): make them objects."""
    if isinstance(v, dict) and "content" in v:
        return _added(v)
    return v


def _read_json(p: Path) -> dict:
    with open(p, encoding="utf-8") as f:
        return json.load(f)


class Blip2Tokenizer:
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
            v = _as_token(v)
            if k in SPECIAL_TOKEN_NAMES:
                self._special[k] = v
            elif k == "extra_special_tokens" and isinstance(v, dict):
                self._special.update({n: _as_token(t) for n, t in v.items()})  # named model-specific tokens
            elif k == "extra_special_tokens" and v is not None:
                self._extra_special = [_as_token(t) for t in v]
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
        to_add = [_added(t) for _, t in sorted((added_tokens_decoder or {}).items())]
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
        from ..checkpoint.hub import resolve_dir

        d = resolve_dir(str(path_or_id))
        cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        cls_name = cfg.pop("tokenizer_class", None) or ""
        cfg.pop("init_inputs", None)
        cfg.update(kwargs)
        tj_path = d / "tokenizer.json"
        tj = _read_json(tj_path) if tj_path.is_file() else None
        has_bpe_files = (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
        has_wp_file = (d / "vocab.txt").is_file()
        family = _FAMILY.get(cls_name.removesuffix("Fast"))
        if family is None:
            family = "generic" if tj is not None else "gpt2" if has_bpe_files else "bert" if has_wp_file else None
        ok = tj is not None or (family == "gpt2" and has_bpe_files) or (family == "bert" and has_wp_file)
        if not ok:
            extra = " (a sentencepiece spiece.model alone is not supported: it needs tokenizer.json)" \
                if (d / "spiece.model").is_file() else ""
            raise FileNotFoundError(f"no tokenizer files in {d}: looked for {', '.join(TOKENIZER_FILES)}"
                                    f" for tokenizer class {cls_name or 'unknown'}{extra}")
        if tj is not None:
            # transformers ignores add_bos/eos_token when a tokenizer.json exists: its post-processor rules
            cfg.pop("add_bos_token", None)
            cfg.pop("add_eos_token", None)
        cfg["tokenizer_class"] = cls_name or None
        cfg["name_or_path"] = str(path_or_id)
        if "additional_special_tokens" in cfg:
            cfg.setdefault("extra_special_tokens", cfg.pop("additional_special_tokens"))

        # Added tokens: tokenizer_config's added_tokens_decoder, else the legacy files.
        added: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in cfg:
            added = {int(i): _added(t) for i, t in cfg.pop("added_tokens_decoder").items()}
        else:
            stm = d / "special_tokens_map.json"
            if stm.is_file():
                for k, v in _read_json(stm).items():
                    if k in kwargs and kwargs[k]:
                        continue
                    if isinstance(v, dict) and k != "extra_special_tokens":
                        v = AddedToken(**{**{a: b for a, b in v.items() if a != "special"}, "special": True})
                    elif k == "extra_special_tokens" and isinstance(v, list):
                        old = list(cfg.get("extra_special_tokens") or [])
                        v = old + [t for t in (_added(x) if isinstance(x, dict) else x for x in v) if t not in old]
                    cfg[k] = v
            atj = d / "added_tokens.json"
            if atj.is_file():
                special = {str(_as_token(cfg[k])) for k in SPECIAL_TOKEN_NAMES if cfg.get(k)}
                special |= {str(_as_token(t)) for t in (cfg.get("extra_special_tokens") or [])}
                for tok, i in _read_json(atj).items():
                    sp = tok in special
                    added[int(i)] = AddedToken(tok, rstrip=False, lstrip=False, normalized=not sp, special=sp)
            if tj is not None:
                for t in tj.get("added_tokens", []):
                    t = dict(t)
                    added[int(t.pop("id"))] = _added(t)
        by_content = {t.content: t for t in added.values()}
        for k in SPECIAL_TOKEN_NAMES:
            if cfg.get(k) is not None and by_content:
                cfg[k] = by_content.get(str(_as_token(cfg[k])), _as_token(cfg[k]))

        backend = _build_backend(family, d, tj, cfg)
        return cls(backend, family=family, added_tokens_decoder=added, **cfg)

    # ------------------------------------------------------------------ special tokens
    def _tok(self, name: str) -> str | None:
        v = self._special.get(name)
        return None if v is None else str(v)

    def _tok_id(self, name: str) -> int | None:
        v = self._tok(name)
        return None if v is None else self.convert_tokens_to_ids(v)

    def __getattr__(self, name: str) -> Any:
        # model-specific named tokens (image_token, ...) and their ids; absent ones raise AttributeError
        if name.startswith("_"):
            raise AttributeError(name)
        special = self.__dict__.get("_special", {})
        base = name.removesuffix("_id")
        if base in special and special[base] is not None and base not in SPECIAL_TOKEN_NAMES:
            return self._tok_id(base) if name.endswith("_id") else self._tok(base)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _set_special(self, name: str, value: Any) -> None:
        self._special[name] = value

    bos_token = property(lambda s: s._tok("bos_token"), lambda s, v: s._set_special("bos_token", v))
    eos_token = property(lambda s: s._tok("eos_token"), lambda s, v: s._set_special("eos_token", v))
    unk_token = property(lambda s: s._tok("unk_token"), lambda s, v: s._set_special("unk_token", v))
    sep_token = property(lambda s: s._tok("sep_token"), lambda s, v: s._set_special("sep_token", v))
    pad_token = property(lambda s: s._tok("pad_token"), lambda s, v: s._set_special("pad_token", v))
    cls_token = property(lambda s: s._tok("cls_token"), lambda s, v: s._set_special("cls_token", v))
    mask_token = property(lambda s: s._tok("mask_token"), lambda s, v: s._set_special("mask_token", v))
    bos_token_id = property(lambda s: s._tok_id("bos_token"))
    eos_token_id = property(lambda s: s._tok_id("eos_token"))
    unk_token_id = property(lambda s: s._tok_id("unk_token"))
    sep_token_id = property(lambda s: s._tok_id("sep_token"))
    pad_token_id = property(lambda s: s._tok_id("pad_token"))
    cls_token_id = property(lambda s: s._tok_id("cls_token"))
    mask_token_id = property(lambda s: s._tok_id("mask_token"))
    pad_token_type_id = 0

    @property
    def special_tokens_map(self) -> dict[str, str]:
        out = {k: str(v) for k, v in self._special.items() if v is not None}
        if self._extra_special:
            out["extra_special_tokens"] = [str(t) for t in self._extra_special]
        return out

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra_special]

    additional_special_tokens = extra_special_tokens

    @property
    def all_special_tokens(self) -> list[str]:
        seen: list[str] = []
        for v in list(self._special.values()) + list(self._extra_special):
            if v is not None and str(v) not in seen:
                seen.append(str(v))
        return seen

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, v: bool) -> None:
        self._add_bos_token = bool(v)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, v: bool) -> None:
        self._add_eos_token = bool(v)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Rebuild the template that adds BOS/EOS from add_bos_token / add_eos_token."""
        bos, eos = self.bos_token, self.eos_token
        if bos is None:
            self._add_bos_token = False
        if eos is None:
            self._add_eos_token = False
        b, e = self._add_bos_token, self._add_eos_token
        single = f"{(bos + ':0 ') if b else ''}$A:0{(' ' + eos + ':0') if e else ''}"
        pair = f"{single}{(' ' + bos + ':1') if b else ''} $B:1{(' ' + eos + ':1') if e else ''}"
        st = ([(bos, self.bos_token_id)] if b else []) + ([(eos, self.eos_token_id)] if e else [])
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=st)

    def add_tokens(self, new_tokens: str | AddedToken | list, special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (at the end); returns how many were new."""
        if not new_tokens:
            return 0
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        if special_tokens:
            return self._tokenizer.add_special_tokens(list(new_tokens))
        return self._tokenizer.add_tokens(list(new_tokens))

    def add_special_tokens(self, special_tokens_dict: dict, replace_extra_special_tokens: bool = True) -> int:
        """Set named special tokens (pad_token=..., extra_special_tokens=[...]) and add them."""
        d = dict(special_tokens_dict)
        if "additional_special_tokens" in d:
            d.setdefault("extra_special_tokens", d.pop("additional_special_tokens"))
        new: list = []
        for k, v in d.items():
            if k == "extra_special_tokens":
                toks = [AddedToken(t, normalized=False, special=True) if isinstance(t, str) else t for t in v
                        if replace_extra_special_tokens or str(t) not in self.extra_special_tokens]
                if replace_extra_special_tokens and toks:
                    self._extra_special = list(toks)
                else:
                    self._extra_special.extend(toks)
                new.extend(toks)
            elif k in self._special or k in SPECIAL_TOKEN_NAMES:
                if isinstance(v, str):
                    v = AddedToken(v, normalized=False, special=True)
                self._special[k] = v
                new.append(v)
            else:
                raise ValueError(f"{k} is not a special token name; use one of {SPECIAL_TOKEN_NAMES} or extra_special_tokens")
        return self.add_tokens(new, special_tokens=True)

    # ------------------------------------------------------------------ vocabulary
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
        data: dict[str, list] = {"input_ids": []}
        if return_token_type_ids:
            data["token_type_ids"] = []
        if return_attention_mask:
            data["attention_mask"] = []
        for k in ("special_tokens_mask", "offset_mapping", "length"):
            if {"special_tokens_mask": return_special_tokens_mask, "offset_mapping": return_offsets_mapping,
                    "length": return_length}[k]:
                data[k] = []
        flat, mapping = [], []
        for i, e in enumerate(encs):
            es = [e] + (list(e.overflowing) if return_overflowing_tokens else [])
            for x in es:
                flat.append(x)
                mapping.append(i)
                data["input_ids"].append(x.ids)
                if return_token_type_ids:
                    data["token_type_ids"].append(x.type_ids)
                if return_attention_mask:
                    data["attention_mask"].append(x.attention_mask)
                if return_special_tokens_mask:
                    data["special_tokens_mask"].append(x.special_tokens_mask)
                if return_offsets_mapping:
                    data["offset_mapping"].append(x.offsets)
                if return_length:
                    data["length"].append(len(x.ids))
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = mapping
        if not batched and return_tensors is None and not return_overflowing_tokens:
            data = {k: (v[0] if v and isinstance(v[0], list) else v) for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors, encodings=flat)

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
        cls_name = self.init_kwargs.get("tokenizer_class") or {"gpt2": "GPT2Tokenizer", "t5": "T5Tokenizer",
                                                               "bert": "BertTokenizer"}.get(self.family, "TokenizersBackend")
        cfg["tokenizer_class"] = cls_name
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


def _build_backend(family: str, d: Path, tj: dict | None, cfg: dict) -> Tokenizer:
    """The `tokenizers` pipeline the matching transformers 5.x class builds."""
    if family == "generic":
        return Tokenizer.from_str(json.dumps(tj))
    model = (tj or {}).get("model", {})
    if family == "gpt2":
        if tj is not None:
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        else:
            vocab, merges = BPE.read_file(str(d / "vocab.json"), str(d / "merges.txt"))
        tk = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space", False)))
        tk.decoder = decoders.ByteLevel()
    elif family == "t5":
        tk = Tokenizer(Unigram([tuple(v) for v in model["vocab"]], unk_id=2, byte_fallback=False))
        charsmap = _precompiled_charsmap(tj.get("normalizer"))
        if charsmap is not None:
            tk.normalizer = normalizers.Precompiled(charsmap)
        ms = dict(replacement="▁", prepend_scheme="always", split=True)
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**ms)])
        tk.decoder = decoders.Metaspace(**ms)
    elif family == "bert":
        if tj is not None:
            vocab = model["vocab"]
        else:
            with open(d / "vocab.txt", encoding="utf-8") as f:
                vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        tk = Tokenizer(WordPiece(vocab, unk_token=str(_as_token(cfg.get("unk_token", "[UNK]")))))
        tk.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
            strip_accents=cfg.get("strip_accents"), lowercase=cfg.get("do_lower_case", True))
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece(prefix="##")
    else:
        raise ValueError(f"unknown tokenizer family {family!r}")
    if tj is not None:
        # Keep the saved post-processor (it holds the BOS rule) and padding/truncation settings.
        shell = Tokenizer.from_str(json.dumps({**tj, "model": _empty_model(model), "added_tokens": []})) \
            if model.get("type") in ("BPE", "WordPiece", "WordLevel") else Tokenizer.from_str(json.dumps(tj))
        if shell.post_processor is not None:
            tk.post_processor = shell.post_processor
        if shell.truncation is not None:
            tk.enable_truncation(**shell.truncation)
        if shell.padding is not None:
            tk.enable_padding(**shell.padding)
    return tk


def _empty_model(model: dict) -> dict:
    m = dict(model, vocab={})
    if m.get("type") == "BPE":
        m["merges"] = []
    return m


def _precompiled_charsmap(norm: dict | None) -> bytes | None:
    import base64

    if not norm:
        return None
    items = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
    for n in items:
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return base64.b64decode(n["precompiled_charsmap"])
    return None


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
