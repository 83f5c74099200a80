"""Tokenizer files -> a `tokenizers.Tokenizer`: the backend the Blip2Tokenizer facade drives.

A checkpoint's tokenizer comes as tokenizer.json, or vocab.json + merges.txt (OPT, GPT-2 byte-level
BPE), or vocab.txt (BERT uncased WordPiece), beside tokenizer_config.json, special_tokens_map.json
and added_tokens.json. The pipeline is rebuilt per family (GPT-2 BPE, Flan-T5 Unigram, BERT
WordPiece) as transformers 5.x does (GPT2Tokenizer / T5Tokenizer / BertTokenizer), so ids, special
tokens and decoding match it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram, WordPiece

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt", "vocab.txt")
# tokenizer_class in tokenizer_config.json -> pipeline family
FAMILY = {"GPT2Tokenizer": "gpt2", "T5Tokenizer": "t5", "BertTokenizer": "bert"}


def added_token(tok: Any) -> AddedToken:
    """An AddedToken from a config value: a string, a serialized dict or an AddedToken."""
    if isinstance(tok, AddedToken):
        return tok
    if isinstance(tok, dict):
        d = {k: v for k, v in tok.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}
        return AddedToken(**d)
    return AddedToken(str(tok), special=True)


def as_token(v: Any) -> Any:
    """Config values may be serialized AddedTokens ({"__type": "AddedToken", ...}): make them objects."""
    if isinstance(v, dict) and "content" in v:
        return added_token(v)
    return v


def _read_json(p: Path) -> dict:
    """A JSON object from a tokenizer file; a damaged one is a one-line error naming it."""
    try:
        with open(p, encoding="utf-8") as f:
            v = json.load(f)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
        raise ValueError(f"{p} is not valid JSON ({str(e)[:200]}); the tokenizer files are damaged") from e
    if not isinstance(v, dict):
        raise ValueError(f"{p} holds a JSON {type(v).__name__}, not an object; the tokenizer files are damaged")
    return v


def _damaged(p: Path, e: Exception) -> ValueError:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ValueError(f"{p}: the tokenizers library cannot build a tokenizer from it ({type(e).__name__}: {why}); "
                      "the file is damaged")


def read_tokenizer_dir(d: Path, name_or_path: str, kwargs: dict) -> tuple[Tokenizer, str, dict[int, AddedToken], dict]:
    """The backend, its family, the added tokens by id and the facade's config for directory `d`;
    `kwargs` override tokenizer_config.json."""
    cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    cls_name = cfg.pop("tokenizer_class", None) or ""
    cfg.pop("init_inputs", None)
    cfg.update(kwargs)
    tj_path = d / "tokenizer.json"
    tj = _read_json(tj_path) if tj_path.is_file() else None
    has_bpe_files = (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    has_wp_file = (d / "vocab.txt").is_file()
    family = FAMILY.get(cls_name.removesuffix("Fast"))
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
    cfg["name_or_path"] = name_or_path
    if "additional_special_tokens" in cfg:
        cfg.setdefault("extra_special_tokens", cfg.pop("additional_special_tokens"))

    # Added tokens: tokenizer_config's added_tokens_decoder, else the legacy files.
    added: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in cfg:
        added = {int(i): added_token(t) for i, t in cfg.pop("added_tokens_decoder").items()}
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
                    v = old + [t for t in (added_token(x) if isinstance(x, dict) else x for x in v) if t not in old]
                cfg[k] = v
        atj = d / "added_tokens.json"
        if atj.is_file():
            special = {str(as_token(cfg[k])) for k in SPECIAL_TOKEN_NAMES if cfg.get(k)}
            special |= {str(as_token(t)) for t in (cfg.get("extra_special_tokens") or [])}
            for tok, i in _read_json(atj).items():
                sp = tok in special
                added[int(i)] = AddedToken(tok, rstrip=False, lstrip=False, normalized=not sp, special=sp)
        if tj is not None:
            try:
                for t in tj.get("added_tokens", []):
                    t = dict(t)
                    added[int(t.pop("id"))] = added_token(t)
            except (KeyError, TypeError, ValueError) as e:
                raise _damaged(tj_path, e) from e
    by_content = {t.content: t for t in added.values()}
    for k in SPECIAL_TOKEN_NAMES:
        if cfg.get(k) is not None and by_content:
            cfg[k] = by_content.get(str(as_token(cfg[k])), as_token(cfg[k]))

    try:
        backend = build_backend(family, d, tj, cfg)
    except Exception as e:  # tokenizers raises bare Exceptions for a file it cannot read
        if tj is None:
            raise
        raise _damaged(tj_path, e) from e
    return backend, family, added, cfg


def build_backend(family: str, d: Path, tj: dict | None, cfg: dict) -> Tokenizer:
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
        tk = Tokenizer(WordPiece(vocab, unk_token=str(as_token(cfg.get("unk_token", "[UNK]")))))
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
    """The saved model without its vocabulary: loading it back is then cheap (only the post-processor
    and padding/truncation settings are wanted from it)."""
    m = dict(model, vocab={})
    if m.get("type") == "BPE":
        m["merges"] = []
    return m


def _precompiled_charsmap(norm: dict | None) -> bytes | None:
    """T5's sentencepiece normalisation table, as tokenizer.json's normalizer stores it."""
    if not norm:
        return None
    items = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
    for n in items:
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return base64.b64decode(n["precompiled_charsmap"])
    return None
