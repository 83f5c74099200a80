"""The BLIP-2 prompt: Q image placeholders, then the text.

The language model sees the image as Q query vectors written over Q placeholder tokens that stand
before everything else in the prompt (BOS and any left padding included); they are never padded
or truncated. The processor, the CLI, the trainer and `generate` all build prompts here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def image_prompt(ids: list[int], num_query_tokens: int, image_token_index: int) -> list[int]:
    """One prompt as ids: [image]*Q + ids."""
    return [image_token_index] * num_query_tokens + list(ids)


def image_prompt_batch(
    ids: Tensor, num_query_tokens: int, image_token_index: int, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A tokenised batch (B, T) -> ((B, Q+T) ids, (B, Q+T) mask) with the placeholders in front;
    the placeholders are always attended to. The mask defaults to all ones."""
    B = ids.shape[0]
    img = torch.full((B, num_query_tokens), image_token_index, dtype=ids.dtype, device=ids.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    ones = torch.ones((B, num_query_tokens), dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([img, ids], 1), torch.cat([ones, attention_mask], 1)
