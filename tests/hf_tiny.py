"""Tiny random-weight checkpoints written by transformers' own save_pretrained: the test oracle.

Weights are re-drawn fan-in scaled (std 1/sqrt(fan_in) for matrices, O(1) embeddings, norms near
1), so activations stay O(1) and a wrong detail shows up as an O(1) difference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Small but not degenerate: several heads, odd FFN widths, 2+ layers, a cross-attention layer.
VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    image_size=30, patch_size=6, layer_norm_eps=1e-6,
)
QFORMER = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
    vocab_size=99, max_position_embeddings=64, cross_attention_frequency=2,
)
OPT = dict(
    model_type="opt", vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ffn_dim=37, max_position_embeddings=64, word_embed_proj_dim=24, pad_token_id=1, bos_token_id=2,
    eos_token_id=2,
)
T5 = dict(
    model_type="t5", vocab_size=120, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    decoder_start_token_id=0,
)


def blip2_config(text: str | None = "opt", num_query_tokens: int = 4, **over):
    """A transformers Blip2Config for a tiny model. text: "opt", "t5" or None (retrieval).
    Overrides: vision=, qformer=, text_config= dicts; other keys go to Blip2Config."""
    from transformers import Blip2Config

    vision = {**VISION, **over.pop("vision", {})}
    qformer = {**QFORMER, **over.pop("qformer", {})}
    text_over = over.pop("text_config", {})
    kw = dict(vision_config=vision, qformer_config=qformer, num_query_tokens=num_query_tokens,
              image_text_hidden_size=16)
    if text is not None:
        tc = {**(OPT if text == "opt" else T5), **text_over}
        kw["text_config"] = tc
        kw["image_token_index"] = tc["vocab_size"] - 1
    kw.update(over)
    return Blip2Config(**kw)


@torch.no_grad()
def fan_in_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)

    def rn(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2 and "embed" not in name.lower() and "relative_attention_bias" not in name \
                and leaf not in ("query_tokens", "class_embedding", "position_embedding", "shared"):
            fan_in = math.prod(p.shape[1:])
            rn(p, 1.0 / math.sqrt(fan_in))
        elif p.ndim >= 2 or leaf in ("query_tokens", "class_embedding"):
            rn(p, 1.0)  # embeddings, learned queries/positions: O(1)
        elif "norm" in name.lower() and leaf == "weight":
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            rn(p, 0.1)  # biases, q/v biases, norm shifts
    return model


def make_hf(cls_name: str, config, seed: int = 0, dtype=torch.float32):
    """Build transformers' class `cls_name` from `config`, fan-in init, eval mode."""
    import transformers

    cls = getattr(transformers, cls_name)
    model = cls(config)
    fan_in_init_(model, seed)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(dtype).eval()


def save_hf(cls_name: str, config, path, seed: int = 0, **save_kw):
    """Build, init and save_pretrained a transformers model; return it (for the oracle side)."""
    model = make_hf(cls_name, config, seed)
    model.save_pretrained(str(path), **save_kw)
    return model


def assert_close(ours, theirs, rtol=2e-5, atol=None, what=""):
    """Relative closeness measured against the reference's overall scale (O(1) activations)."""
    ours = ours.detach().float()
    theirs = theirs.detach().float()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    scale = theirs.abs().max().clamp_min(1e-6)
    err = (ours - theirs).abs().max()
    tol = atol if atol is not None else rtol * max(float(scale), 1.0)
    assert err <= tol, f"{what}: max abs diff {err:.3e} > tol {tol:.3e} (scale {scale:.3e})"
