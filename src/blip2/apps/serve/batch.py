"""The running decode batch of a decoder-only language model (OPT), as the scheduler grows and
shrinks it between steps.

An `OPTSession` holds one KV cache per layer, (B, nh, T_max, hs), one shared write column `t`
(every row writes its next token at the same column), and per row a key mask (B, T_max) and its
next position id `npos` (B,). Positions are per row, columns are shared: a row whose prompt is
shorter simply has masked columns on its left, exactly as `generate_many` left-pads.

    join(a, b, need)   rows of b appended to a: both right-aligned on a common column, the
                       columns no row attends to dropped, room for `need` more steps
    leave(a, keep)     only the rows `keep` stay (a row gather of every cache)

Right alignment keeps every row's past at the columns just before `t`, so the next step writes
all rows at one column; the masked columns change nothing in a row's attention, and a row's
positions come from `npos`, not from its column. That is why a row decodes to the same tokens in
the batch as alone.
"""

from __future__ import annotations

import torch
from ...models.lm import KVCache, LMSession


def first_used(s: LMSession) -> int:
    """The first column that some row attends to (columns before it are padding for every row)."""
    used = s.mask[:, : s.t].any(0).nonzero()
    return int(used[0]) if len(used) else s.t


def join(a: LMSession, b: LMSession, need: int) -> LMSession:
    """a with b's rows appended (a is changed and returned). need: the most steps any row may
    still take; the caches are reallocated to exactly the used width plus that."""
    parts = [(s, first_used(s)) for s in (a, b)]
    W = max(s.t - lo for s, lo in parts)  # the widest past: every row's past ends at column W
    cap = W + need
    B = a.batch_size + b.batch_size
    dev = a.mask.device
    caches, mask = [], torch.zeros(B, cap, dtype=torch.bool, device=dev)  # (B, cap)
    for layer in range(len(a.caches)):
        k0 = a.caches[layer].k
        k = k0.new_zeros(B, k0.shape[1], cap, k0.shape[3])  # (B, nh, cap, hs)
        v = torch.zeros_like(k)
        r = 0
        for s, lo in parts:
            n, w = s.batch_size, s.t - lo
            k[r : r + n, :, W - w : W] = s.caches[layer].k[:, :, lo : s.t]
            v[r : r + n, :, W - w : W] = s.caches[layer].v[:, :, lo : s.t]
            r += n
        caches.append(KVCache(k, v))
    r = 0
    for s, lo in parts:
        n, w = s.batch_size, s.t - lo
        mask[r : r + n, W - w : W] = s.mask[:, lo : s.t]
        r += n
    a.caches, a.mask, a.npos = caches, mask, torch.cat([a.npos, b.npos])
    a.t, a.capacity, a._arange = W, cap, torch.arange(cap, device=dev)
    return a


def leave(s: LMSession, keep: list[int]) -> None:
    """Keep only the rows `keep` (in that order): every per-row tensor is gathered."""
    s.reorder(torch.tensor(keep, dtype=torch.long, device=s.caches[0].k.device))


def mergeable(s: LMSession) -> bool:
    """Sessions this module knows how to join: a KV cache per layer plus a key mask and positions."""
    return hasattr(s, "mask") and hasattr(s, "npos") and not getattr(s, "_step_fn", None)

