"""Named special tokens (bos_token, pad_token, image_token, ...), their ids and the BOS/EOS rule.

A mixin of Blip2Tokenizer, kept apart because it is most of the tokenizer's surface: the tokenizer
holds `_special` (name -> token, None when unset), `_extra_special` (the unnamed ones), the
`tokenizers.Tokenizer` in `_tokenizer`, and provides convert_tokens_to_ids and add_tokens.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, processors

from .tokenizer_backend import SPECIAL_TOKEN_NAMES


class SpecialTokensMixin:
    """bos_token ... mask_token (settable) and their ids, extra special tokens, add_special_tokens()."""

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
