"""The demo's text: each scene's caption and QA lines, the language model's documents, and the
two tokenizers trained on that text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ...processing.tokenization import Blip2Tokenizer
from . import scenes
from .shipped import QA_PROMPT


def scene_lines(s: scenes.Scene) -> list[str]:
    """The caption and every "Question: ... Answer: ..." line of a scene."""
    return [scenes.caption(s)] + [QA_PROMPT.format(q=q) + " " + a for q, a in scenes.questions(s)]


def corpus(scs: list[scenes.Scene]) -> list[str]:
    return [line for s in scs for line in scene_lines(s)]


def documents(scs: list[scenes.Scene], n_lines: int, seed: int) -> list[list[str]]:
    """One text document per scene: its caption, then n_lines - 1 of its QA lines in a random
    order, and in half of the documents the caption restated at a random later point.

    A language model trained on these learns what any LM learns from real documents: to use what
    the earlier lines said (a colour named in the caption answers a later question; a restated
    description copies the earlier one). Each line is its own [BOS] ... [EOS] segment, so the
    stage-2 input "[image queries] [BOS] line [EOS]" has the shape of "[earlier lines] [BOS] line
    [EOS]", with the queries standing in for the earlier lines."""
    rng = np.random.default_rng(seed)
    out = []
    for s in scs:
        cap, *qa = scene_lines(s)
        doc = [cap] + [qa[i] for i in rng.permutation(len(qa))[:n_lines - 1]]
        if rng.random() < 0.5:
            doc.insert(int(rng.integers(2, len(doc) + 1)), cap)
        out.append(doc)
    return out


def build_opt_tokenizer(texts: list[str], d: Path, vocab_size: int) -> Blip2Tokenizer:
    """A byte-level BPE in OPT's layout (vocab.json + merges.txt; <s> <pad> </s> <unk> = 0..3;
    "</s>" doubles as BOS and EOS), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    d.mkdir(parents=True, exist_ok=True)
    tk.model.save(str(d))  # vocab.json, merges.txt
    # left padding: batched prompts for generate() end where the new tokens start
    cfg = dict(tokenizer_class="GPT2Tokenizer", add_bos_token=True, add_prefix_space=False, errors="replace",
               padding_side="left",
               bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=128)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Blip2Tokenizer.from_pretrained(d)


def build_bert_tokenizer(texts: list[str], d: Path) -> Blip2Tokenizer:
    """A lower-case WordPiece vocabulary (vocab.txt) holding every word of `texts`, letters and
    digits as a fallback for other words, and [DEC] last (the Q-Former's ITG start token)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'\"-()")
    vocab = specials + words
    vocab += [c for c in chars if c not in vocab] + ["##" + c for c in chars[:36]] + ["[DEC]"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = dict(tokenizer_class="BertTokenizer", do_lower_case=True, model_max_length=64, unk_token="[UNK]",
               sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Blip2Tokenizer.from_pretrained(d)
