"""Several prompts about one input, decoded as one batch (generate_many), each answer the one a
lone call gives.

A decoder-only batch is laid out [shared prefix | pads | the rest of each prompt]: every row ends
on its own last token (where its next-token logits are read) and the prefix sits at the same
positions in every row, so the language model can run it once for all rows. An encoder-decoder's
encoder takes the prompts right-padded.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prompt_rows(prompts, attention_mask: Tensor | None = None) -> list[list[int]]:
    """Prompts as plain id lists: a list of sequences as given, or the rows of a (k, T) tensor
    without the positions its attention mask marks as padding."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts as a tensor must be (k, T); got shape {tuple(prompts.shape)}")
        m = attention_mask.bool() if attention_mask is not None else torch.ones_like(prompts, dtype=torch.bool)
        return [row[keep].tolist() for row, keep in zip(prompts.cpu(), m.cpu())]
    return [torch.as_tensor(p).flatten().tolist() for p in prompts]


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest prefix that all rows share, short of each row's last token (every row
    must end on a token of its own)."""
    n = min(len(r) for r in rows) - 1
    for j in range(n):
        if any(r[j] != rows[0][j] for r in rows[1:]):
            return j
    return n


def layout(rows: list[list[int]], pad: int, shared: int, decoder_only: bool) -> tuple[Tensor, Tensor]:
    """(k, L) ids and attention mask: decoder-only rows as [prefix | pads | rest] (shared = the
    prefix length), encoder rows right-padded."""
    k, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((k, L), pad, dtype=torch.long)
    am = torch.zeros((k, L), dtype=torch.long)
    for i, r in enumerate(rows):
        at = L - len(r) + shared if decoder_only else 0
        ids[i, :shared], am[i, :shared] = torch.tensor(r[:shared], dtype=torch.long), 1
        ids[i, at : at + len(r) - shared] = torch.tensor(r[shared:], dtype=torch.long)
        am[i, at : at + len(r) - shared] = 1
    return ids, am


def split_answers(out: Tensor, rows: list[list[int]], start: int, n: int, eos: list[int] | None,
                  decoder_only: bool) -> list[Tensor]:
    """The batch's output (k*n, T) -> one (n, L_i) tensor per prompt, as a lone call returns it:
    decoder-only, the prompt's own ids (unpadded) then the new ids; encoder-decoder, the decoder's
    history then the new ids. A lone call stops once all its rows have hit eos: the columns past
    that are dropped."""
    eos_t = torch.tensor(eos, device=out.device) if eos else None
    res = []
    for i, r in enumerate(rows):
        new = out[i * n : (i + 1) * n, start:]  # (n, new tokens)
        end = new.shape[1]
        if eos_t is not None and end:
            hit = torch.isin(new, eos_t)
            end = int(torch.where(hit.any(1), hit.int().argmax(1) + 1, end).max())
        head = (torch.tensor(r, dtype=torch.long, device=out.device).expand(n, -1) if decoder_only
                else out[i * n : (i + 1) * n, :start])
        res.append(torch.cat([head, new[:, :end]], 1))
    return res
