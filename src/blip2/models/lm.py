"""What BLIP-2 asks of its language model, and the preallocated KV cache that decoding writes into.

A language model (opt.py, t5.py; a Llama-family decoder would be one more file and one more line
in config.py's LANGUAGE_MODELS) offers:

    get_input_embeddings() / get_output_embeddings()
    forward(input_ids=, attention_mask=, inputs_embeds=, labels=, ...)   # uncached, full recompute
    text_features(input_ids=, attention_mask=, ...)                       # Blip2Model.get_text_features
    tied_weights() -> {target key: source key}
    start(inputs_embeds, attention_mask, max_new_tokens) -> LMSession    # cached decoding

and its class sets `decodes_tokens = True` (each decoding step reads all of its weights, which tells
a runtime where its memory traffic is); its attention layers call a ScaledDotProduct module.

LMSession, the base of its sessions, implements generation's DecodingSession protocol; it owns
one KVCache per attention layer, sized once for the whole call:

    logits = s.prefill()          # (B, V): next-token logits after the prompt (T5: after the start token)
    logits = s.step(tokens)       # tokens (B,): append one token per row, (B, V) logits for the next
    s.reorder(index)              # rows <- rows[index]: beam reorder, or B -> B*k expansion

Positions are host-side ints: a step writes its cache slots by slice (and reads position
tensors from a preallocated arange), so it does no host sync.

    s.compile(mode)               # opt-in, before prefill: run step() under torch.compile
                                  # (sessions that do not implement it raise NotImplementedError)
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LANGUAGE_MODELS


def build_language_model(config) -> nn.Module:
    family = LANGUAGE_MODELS.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"no language model for model_type {config.model_type!r}; supported: {sorted(LANGUAGE_MODELS)}")
    # imported here: opt.py and t5.py import this module for the KV cache and the session
    return getattr(importlib.import_module(family.module), family.model)(config)


# --- attention ---
def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, is_causal: bool = False,
    scale: float | None = None, dropout_p: float = 0.0, need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """q (B, nh, T, hs), k/v (B, nh, S, hs); mask bool (True = attend) or additive, broadcastable
    to (B, nh, T, S). Returns (B, nh, T, hs) and the (B, nh, T, S) weights when asked for."""
    if not need_weights:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return y, None
    att = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, nh, T, S)
    if is_causal:
        T, S = att.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None and mask.dtype == torch.bool:
        att = att.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        att = att + mask
    w = torch.softmax(att.float(), dim=-1).nan_to_num(0.0).to(q.dtype)  # a fully masked row gives 0, as SDPA does
    w = F.dropout(w, dropout_p) if dropout_p > 0 else w
    return w @ v, w


class ScaledDotProduct(nn.Module):
    """`attend` as a module without weights. The language models' attention layers call it through
    one (`self.sdpa`), so that a runtime can put a module of its own in its place for the
    hardware it runs on, without the layers knowing."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, is_causal: bool = False,
        scale: float | None = None, dropout_p: float = 0.0, need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        return attend(q, k, v, mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p, need_weights=need_weights)


def causal_mask(pad: Tensor, q_pos: Tensor) -> Tensor:
    """pad (B, S) bool key mask, q_pos (T,) absolute query positions -> (B, 1, T, S) bool."""
    k_pos = torch.arange(pad.shape[1], device=pad.device)
    return pad[:, None, None, :] & (k_pos[None, :] <= q_pos[:, None])


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """bool mask -> 0 where True, the dtype's lowest finite value where False (the reference's eager masks)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# --- decoding state ---
class KVCache:
    """Keys and values of one attention layer: k, v (B, nh, T_max, hs), written at input_pos."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    @classmethod
    def empty(cls, B: int, nh: int, T: int, hs: int, dtype: torch.dtype, device) -> "KVCache":
        # zeros, not empty: unwritten slots are masked out, but 0 * NaN garbage would still be NaN
        return cls(torch.zeros(B, nh, T, hs, dtype=dtype, device=device), torch.zeros(B, nh, T, hs, dtype=dtype, device=device))

    def update(self, input_pos: slice | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, nh, T, hs) at input_pos: a slice of T positions (eager sessions: a plain
        copy, 4x cheaper than the index_put a tensor takes, which cost 1 ms a token over OPT-2.7b's
        32 layers) or a (T,) long tensor (compiled steps, which advance it in place). Returns the
        keys and values to attend over: (B, nh, stop, hs) views for a slice, the whole (static)
        buffers for a tensor."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        if isinstance(input_pos, slice):
            # only the positions written so far: those past them are masked out, and attending over
            # the whole capacity cost a decode step time in proportion to max_new_tokens (15 of 173
            # ms at 8 rows and 350 positions)
            return self.k[:, :, : input_pos.stop], self.v[:, :, : input_pos.stop]
        return self.k, self.v

    @staticmethod
    def fit(mask: Tensor | None, k: Tensor) -> Tensor | None:
        """A mask or bias over the cache's capacity (.., T_max) cut to the keys update() returned."""
        return mask[..., : k.shape[2]] if mask is not None and mask.shape[-1] > k.shape[2] else mask

    def reorder(self, index: Tensor) -> None:
        self.k, self.v = reorder_rows(self.k, index), reorder_rows(self.v, index)


def reorder_rows(t: Tensor, index: Tensor) -> Tensor:
    """t[index] along dim 0; written back in place when the batch size is unchanged, so buffers
    keep their addresses from step to step (what CUDA graphs need)."""
    out = t.index_select(0, index)
    if out.shape == t.shape:
        return t.copy_(out)
    return out


class LMSession:
    """Incremental decoding of one batch. Subclasses fill `caches` and name their other per-row
    tensors in `_rows` so that reorder() moves everything together."""

    _rows: tuple[str, ...] = ()

    def __init__(self, capacity: int, device):
        self.caches: list[KVCache] = []
        self.capacity = capacity  # positions the self-attention caches hold
        self.t = 0  # positions written so far (host int: no sync to read it)
        self._arange = torch.arange(capacity, device=device)

    @property
    def batch_size(self) -> int:
        return self.caches[0].k.shape[0]

    def prefill(self) -> Tensor:
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def compile(self, mode: str | None = None) -> None:
        """Run the per-token step under torch.compile from now on (call before prefill)."""
        raise NotImplementedError(f"{type(self).__name__} has no compiled decoding")

    def reorder(self, index: Tensor) -> None:
        index = index.to(self.caches[0].k.device)
        for c in self.caches:
            c.reorder(index)
        for name in self._rows:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, reorder_rows(t, index))

    def _advance(self, n: int) -> slice:
        """Reserve the next n positions; returns them as a slice (self._arange[s]: as a tensor)."""
        if self.t + n > self.capacity:
            raise RuntimeError(
                f"KV cache full: {self.t} positions used, {n} more asked, capacity {self.capacity}; "
                "start() the session with a larger max_new_tokens"
            )
        s = slice(self.t, self.t + n)
        self.t += n
        return s
