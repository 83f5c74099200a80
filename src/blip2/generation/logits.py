"""Logits processors: (ids (N, T), scores (N, V) fp32) -> scores, built in the reference's order.

`build_processors` makes the list transformers 5.8 makes for a config (repetition penalty,
no-repeat n-grams, min length, forced tokens, suppression, temperature / top-k / top-p when
sampling, renormalisation) and refuses the parameters it does not implement.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .config import GenerationConfig, special_tokens

Processor = Callable[[Tensor, Tensor], Tensor]  # (ids (N, T), scores (N, V)) -> scores


def _mask_tokens(scores: Tensor, tokens: Tensor) -> Tensor:
    """scores with the columns `tokens` set to -inf (ids outside the vocabulary mask nothing). By
    index: an isin over the whole vocabulary cost ~2 ms a call for OPT's 50k ids, every step."""
    tokens = tokens[(tokens >= 0) & (tokens < scores.shape[-1])]
    return scores.index_fill(-1, tokens, -math.inf)


def _repetition_penalty(p: float) -> Processor:
    def f(ids, s):
        g = s.gather(1, ids)
        g = torch.where(g < 0, g * p, g / p)  # push seen tokens towards improbable, whatever the sign
        return s.scatter(1, ids, g)
    return f


def _no_repeat_ngram(n: int) -> Processor:
    def f(ids, s):
        N, T = ids.shape
        if T < n:  # no complete n-gram in the history yet
            return s
        win = ids.unfold(1, n, 1)  # (N, T-n+1, n) every n-gram seen
        prefix = ids[:, T - n + 1:]  # (N, n-1) the n-gram the next token would complete
        hit = (win[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, T-n+1)
        banned = torch.zeros_like(s).scatter_add_(1, win[:, :, -1], hit.to(s.dtype)) > 0
        return s.masked_fill(banned, -math.inf)
    return f


def _top_k(k: int) -> Processor:
    def f(ids, s):
        kk = min(k, s.shape[-1])
        return s.masked_fill(s < torch.topk(s, kk)[0][..., -1:], -math.inf)
    return f


def _top_p(p: float, keep: int) -> Processor:
    def f(ids, s):
        srt, idx = torch.sort(s, descending=False)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= (1 - p)  # the low tail holding 1-p of the mass
        drop[..., -keep:] = False
        return s.masked_fill(drop.scatter(1, idx, drop), -math.inf)
    return f


def _unsupported(cfg: GenerationConfig) -> list[str]:
    bad = [k for k in ("sequence_bias", "bad_words_ids", "exponential_decay_length_penalty", "constraints",
                       "force_words_ids", "watermarking_config", "stop_strings", "max_time", "dola_layers",
                       "assistant_early_exit", "prompt_lookup_num_tokens")
           if getattr(cfg, k, None) is not None]
    for k, off in (("guidance_scale", 1), ("encoder_repetition_penalty", 1.0), ("encoder_no_repeat_ngram_size", 0),
                   ("num_beam_groups", 1), ("remove_invalid_values", False), ("return_dict_in_generate", False),
                   ("token_healing", False), ("low_memory", False)):
        if getattr(cfg, k, None) not in (None, off):
            bad.append(k)
    if (cfg.penalty_alpha or 0) > 0 and (cfg.top_k or 0) > 1 and not cfg.do_sample:
        bad.append("penalty_alpha")
    if cfg.do_sample:
        bad += [k for k in ("min_p", "top_h") if getattr(cfg, k) is not None]
        bad += [k for k, off in (("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0))
                if getattr(cfg, k) not in (None, off) and 0 < getattr(cfg, k) < 1]
    return bad


def build_processors(cfg: GenerationConfig, prompt_len: int, device) -> list[Processor]:
    """The reference's default processor list for `cfg` (in its order)."""
    bad = _unsupported(cfg)
    if bad:
        raise NotImplementedError(f"blip2.generate does not implement {bad}")
    eos, _ = special_tokens(cfg)
    eos_t = torch.tensor(eos, device=device) if eos else None
    procs: list[Processor] = []
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        procs.append(_repetition_penalty(float(cfg.repetition_penalty)))
    if cfg.no_repeat_ngram_size:
        procs.append(_no_repeat_ngram(int(cfg.no_repeat_ngram_size)))
    if cfg.min_length and eos_t is not None:
        ml = cfg.min_length
        procs.append(lambda ids, s: _mask_tokens(s, eos_t) if ids.shape[-1] < ml else s)
    if cfg.min_new_tokens and eos_t is not None:
        mn = cfg.min_new_tokens
        procs.append(lambda ids, s: _mask_tokens(s, eos_t) if ids.shape[-1] - prompt_len < mn else s)
    if cfg.forced_bos_token_id is not None:
        procs.append(_force(lambda ids: ids.shape[-1] == 1, cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None:
        L = cfg.max_length
        procs.append(_force(lambda ids: ids.shape[-1] == L - 1, cfg.forced_eos_token_id))
    if cfg.suppress_tokens is not None:
        sup = torch.tensor(list(cfg.suppress_tokens), device=device)
        procs.append(lambda ids, s: _mask_tokens(s, sup))
    if cfg.begin_suppress_tokens is not None:
        bsup = torch.tensor(list(cfg.begin_suppress_tokens), device=device)
        begin = prompt_len if (prompt_len > 1 or cfg.forced_bos_token_id is None) else prompt_len + 1
        procs.append(lambda ids, s: _mask_tokens(s, bsup) if ids.shape[-1] == begin else s)
    if cfg.do_sample:
        # beams keep one more candidate than there are eos tokens, so a beam can always continue
        keep = (len(eos) + 1 if eos else 2) if (cfg.num_beams or 1) > 1 else 1
        if cfg.temperature is not None and cfg.temperature != 1.0:
            t = float(cfg.temperature)
            if not t > 0:
                raise ValueError(f"`temperature` (={t}) has to be a strictly positive float")
            procs.append(lambda ids, s: s / t)
        if cfg.top_k is not None and cfg.top_k != 0:
            procs.append(_top_k(max(int(cfg.top_k), keep)))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(_top_p(float(cfg.top_p), keep))
    if cfg.renormalize_logits is True:
        procs.append(lambda ids, s: s.log_softmax(-1))
    return procs


def _force(when: Callable[[Tensor], bool], token) -> Processor:
    def f(ids, s):
        if not when(ids):
            return s
        out = torch.full_like(s, -math.inf)
        out[:, token] = 0
        return out
    return f


def apply_processors(procs: list[Processor], ids: Tensor, s: Tensor) -> Tensor:
    """Run the processors in order on the scores `s` (N, V) after the history `ids` (N, T)."""
    for p in procs:
        s = p(ids, s)
    return s

