"""Decoding: greedy, multinomial sampling and beam search over a `DecodingSession`.

The decoding rules reproduce transformers 5.8.0 `generate` token for token: the same length
bookkeeping, the same logits processors in the same order (in fp32), the same RNG calls when
sampling, and the same vectorized beam search (top 2*num_beams candidates per step, length
penalty applied when a hypothesis is finalised, the same early-stopping heuristic).

The language model is only seen through the `DecodingSession` protocol, so the loop is the same
for a decoder-only LM (OPT, prompt given as embeddings) and an encoder-decoder one (T5):

    cfg, unused = prepare_generation_config(gen_cfg, model_gen_cfg, prompt_len=T0, ...)
    session = lm.start(..., max_new_tokens=cfg.max_length - T0)   # step() is called < that many times
    out = decode(session, input_ids, cfg)

`input_ids` (B, T0) is the token history the logits processors see and the output starts with:
  - decoder-only with an ids prompt (BLIP-2 OPT: transformers passes inputs_embeds AND input_ids
    of the same length): the prompt ids incl. image placeholders and left padding;
  - decoder-only with only inputs_embeds (B, Te, E): an empty (B, 0) long tensor, with
    inputs_embeds_len=Te given to prepare_generation_config; the output is then only the new tokens;
  - encoder-decoder (BLIP-2 T5, encoder fed inputs_embeds): (B, 1) filled with
    decoder_start_token_id (falling back to bos_token_id).

`compile=True` (or a torch.compile mode such as "max-autotune") in the generation parameters runs
each decode step as one compiled graph over the session's static KV cache (see OPTSession.compile);
the prefill and the logits processors stay eager. Greedy ids are the same as eager decoding.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import GenerationConfig, special_tokens
from .logits import Processor, apply_processors, build_processors


class DecodingSession(Protocol):
    """What decoding needs of a language model: the LM primed with a prompt of B rows, holding
    whatever state (KV caches, encoder output) it needs to continue it. After prefill the search
    expands it to B*k rows with `reorder` (k = num_beams for beam search, num_return_sequences for
    sampling). The LMs' sessions (models/lm.py) implement it with preallocated KV caches."""

    @property
    def batch_size(self) -> int: ...

    def prefill(self) -> Tensor:
        """(B, V) next-token logits after the prompt (encoder-decoder: after the decoder start token)."""
        ...

    def step(self, tokens: Tensor) -> Tensor:
        """Append `tokens` (B,), one per row; return the (B, V) logits for the token after it."""
        ...

    def reorder(self, index: Tensor) -> None:
        """Rows <- rows[index] (beam reorder; also B -> B*k expansion with a longer index)."""
        ...

    def compile(self, mode: str | None) -> None:
        """Run step() under torch.compile from now on (called before prefill, only when the config
        sets `compile`); mode None is torch.compile's default."""
        ...


def decode(session: DecodingSession, input_ids: Tensor, cfg: GenerationConfig) -> Tensor:
    """Run the decoding strategy `cfg` selects on a config from `prepare_generation_config`."""
    T0 = input_ids.shape[1]
    if T0 >= cfg.max_length:
        raise ValueError(
            f"Input length of input_ids is {T0}, but `max_length` is set to {cfg.max_length}. "
            "Increase `max_length` or, better, set `max_new_tokens`.")
    if session.batch_size != input_ids.shape[0]:
        raise ValueError(f"session has {session.batch_size} rows but input_ids has {input_ids.shape[0]}")
    procs = build_processors(cfg, T0, input_ids.device)
    if cfg.compile:  # True: torch.compile's default mode; a string names the mode
        session.compile(None if cfg.compile is True else str(cfg.compile))
    if (cfg.num_beams or 1) > 1:
        return _beam_search(session, input_ids, cfg, procs)
    return _sample(session, input_ids, cfg, procs)


def _prefill_expanded(session: DecodingSession, k: int) -> Tensor:
    logits = session.prefill()
    if k > 1:  # the reference repeats every input row k times (row-major: b0,b0,b1,b1,...)
        B = logits.shape[0]
        session.reorder(torch.arange(B, device=logits.device).repeat_interleave(k))
        logits = logits.repeat_interleave(k, dim=0)
    return logits


@torch.no_grad()
def _sample(session: DecodingSession, input_ids: Tensor, cfg: GenerationConfig, procs: list[Processor]) -> Tensor:
    """Greedy (argmax) or multinomial sampling, one token per row per step."""
    eos, pad = special_tokens(cfg)
    k = cfg.num_return_sequences or 1
    ids0 = input_ids.repeat_interleave(k, dim=0) if k > 1 else input_ids
    N, T0 = ids0.shape
    L = cfg.max_length
    ids = torch.zeros((N, L), dtype=torch.long, device=ids0.device)  # the whole history, preallocated
    ids[:, :T0] = ids0
    eos_t = torch.tensor(eos, device=ids.device) if eos else None
    alive = torch.ones(N, dtype=torch.bool, device=ids.device)
    logits = _prefill_expanded(session, k)
    t = T0
    while True:
        s = apply_processors(procs, ids[:, :t], logits.to(torch.float32))  # scores in fp32 whatever the LM dtype
        if cfg.do_sample:
            nxt = torch.multinomial(F.softmax(s, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(s, dim=-1)
        if eos_t is not None:
            nxt = torch.where(alive, nxt, pad)  # finished rows are padded
            alive &= ~torch.isin(nxt, eos_t)
        ids[:, t] = nxt
        t += 1
        if t >= L or (eos_t is not None and not bool(alive.any())):  # the one host sync per step
            break
        logits = session.step(nxt)
    return ids[:, :t].contiguous()


@torch.no_grad()
def _beam_search(session: DecodingSession, input_ids: Tensor, cfg: GenerationConfig, procs: list[Processor]) -> Tensor:
    """The reference's vectorized beam search (and beam sampling when do_sample).

    Per input b: `run` holds num_beams live hypotheses, `fin` the num_beams best finished ones.
    Each step takes the top K = 2*num_beams (more with several eos) continuations over all live
    beams, finalises those among the first num_beams that hit eos / max_length (score divided by
    gen_len ** length_penalty), and keeps the best num_beams unfinished ones running.
    """
    eos, pad = special_tokens(cfg)
    nb, L = cfg.num_beams, cfg.max_length
    lp, es = cfg.length_penalty, cfg.early_stopping
    nrs = cfg.num_return_sequences or 1
    dev = input_ids.device
    B, T0 = input_ids.shape
    K = max(2, 1 + (len(eos) if eos else 0)) * nb
    top_nb = torch.arange(K, device=dev) < nb  # only these may be finalised

    fill = (pad or eos[0]) if eos else -1  # as the reference fills (note: pad id 0 falls back to eos)
    run = torch.full((B, nb, L), fill, dtype=torch.long, device=dev)  # (B, nb, L)
    run[:, :, :T0] = input_ids[:, None, :]
    fin = run.clone()
    run_score = torch.zeros((B, nb), dtype=torch.float32, device=dev)
    run_score[:, 1:] = -1e9  # only beam 0 is real at the start: no duplicate continuations
    fin_score = torch.full((B, nb), -1e9, dtype=torch.float32, device=dev)
    fin_done = torch.zeros((B, nb), dtype=torch.bool, device=dev)
    fin_len = torch.zeros((B, nb), dtype=torch.long, device=dev)  # generated tokens per finished hyp
    improvable = torch.ones((B, 1), dtype=torch.bool, device=dev)
    offset = torch.arange(B, device=dev)[:, None] * nb
    eos_t = torch.tensor(eos, device=dev) if eos else None

    logits = _prefill_expanded(session, nb)
    t = T0
    while True:
        logp = F.log_softmax(logits.to(torch.float32), dim=-1)  # (B*nb, V)
        logp = apply_processors(procs, run[:, :, :t].reshape(B * nb, t), logp)
        V = logp.shape[-1]
        acc = (logp.view(B, nb, V) + run_score[:, :, None]).view(B, nb * V)
        if cfg.do_sample:
            top_i = torch.multinomial(F.softmax(acc, dim=-1), num_samples=K)
            top_lp = acc.gather(1, top_i)
        else:
            top_lp, top_i = torch.topk(acc, K)  # (B, K)
        src = top_i // V  # which beam each candidate extends
        tok = top_i % V
        cand = torch.take_along_dim(run, src[:, :, None], dim=1)  # (B, K, L)
        cand[:, :, t] = tok
        hits = torch.full_like(tok, t + 1 >= L, dtype=torch.bool)
        if eos_t is not None:
            hits |= torch.isin(tok, eos_t)

        # live beams for the next step: the best candidates that did not just finish
        run_lp = top_lp + hits.to(torch.float32) * -1.0e9
        keep = torch.topk(run_lp, k=nb)[1]  # (B, nb)
        run = torch.take_along_dim(cand, keep[:, :, None], dim=1)
        run_score = run_lp.gather(1, keep)
        beam_idx = (src.gather(1, keep) + offset).view(-1)  # flat source row of each live beam

        # finished hypotheses: merge the new ones into the best-nb list
        just = hits & top_nb[None, :]
        cand_score = top_lp / ((t + 1 - T0) ** lp)
        full = fin_done.all(-1, keepdim=True) & (es is True)
        cand_score += full.to(torch.float32) * -1.0e9
        cand_score += (~improvable).to(torch.float32) * -1.0e9
        cand_score += (~just) * -1.0e9
        m_score = torch.cat((fin_score, cand_score), dim=1)
        sel = torch.topk(m_score, k=nb)[1]
        fin = torch.take_along_dim(torch.cat((fin, cand), dim=1), sel[:, :, None], dim=1)
        fin_score = m_score.gather(1, sel)
        fin_len = torch.cat((fin_len, torch.full_like(tok, t + 1 - T0)), dim=1).gather(1, sel)
        fin_done = torch.cat((fin_done, just), dim=1).gather(1, sel)

        t += 1
        # can a live beam still beat the worst finished one? (the reference's heuristic)
        best_len = (L - T0) if (es == "never" and lp > 0.0) else (t - T0)
        best_run = run_score[:, :1] / (best_len ** lp)
        worst_fin = torch.where(fin_done, fin_score.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_run > worst_fin).any(dim=-1, keepdim=True)
        go = improvable.any() & ~(fin_done.all() & (es is True)) & ~hits.all()
        if not bool(go):  # the one host sync per step
            break
        session.reorder(beam_idx)
        logits = session.step(run[:, :, t - 1].reshape(-1))

    out = fin[:, :nrs].reshape(B * nrs, L)
    n_gen = int(fin_len[:, :nrs].max())
    return out[:, :T0 + n_gen].contiguous()
