"""The Q-Former: a BERT encoder whose first `query_length` positions are learned queries.

Layers are BERT post-LN. Every `cross_attention_frequency`-th layer (0, f, 2f, ...) lets the
queries cross-attend to the image features; the queries then take their own FFN
(`intermediate_query`/`output_query`), text positions the text FFN (`intermediate`/`output`,
built only when `use_qformer_text_input`, as in the retrieval checkpoints).

Masks follow the reference numerically: self-attention adds (1 - mask) * -10000, the image mask
adds (1 - mask) * finfo(dtype).min, both in the Q-Former's weight dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Blip2QFormerConfig
from .layers import Embedding, activation
from .outputs import BaseModelOutputWithPoolingAndCrossAttentions, output_flags
from ..checkpoint.pretrained import PreTrainedModel


class Blip2QFormerMultiHeadAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        C, nh = config.hidden_size, config.num_attention_heads
        if C % nh:
            raise ValueError(f"hidden_size {C} is not a multiple of num_attention_heads {nh}")
        self.n_head, self.head_dim = nh, C // nh
        kv_in = config.encoder_hidden_size if is_cross_attention else C
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(kv_in, C)
        self.value = nn.Linear(kv_in, C)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x, mask=None, kv=None, head_mask=None, output_attentions=False):
        """x (B, T, C); kv (B, S, Ck) for cross-attention else x; mask additive, broadcast to (B, nh, T, S)."""
        src = x if kv is None else kv
        q, k, v = self._heads(self.query(x)), self._heads(self.key(src)), self._heads(self.value(src))
        att = None
        if output_attentions or head_mask is not None:
            att = (q @ k.transpose(-2, -1)) / self.head_dim**0.5
            if mask is not None:
                att = att + mask
            att = att.softmax(dim=-1)
            p = self.dropout(att)
            if head_mask is not None:
                p = p * head_mask
            y = p.to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0
            )
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, -1), att


class Blip2QFormerOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's post-LN sublayer end."""

    def __init__(self, config: Blip2QFormerConfig, d_in: int | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Blip2QFormerAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = Blip2QFormerOutput(config)

    def forward(self, x, mask=None, kv=None, head_mask=None, output_attentions=False):
        y, att = self.attention(x, mask, kv, head_mask, output_attentions)
        return self.output(y, x), att


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Blip2QFormerLayer(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(config, is_cross_attention=True)
        self.has_text_ffn = bool(config.use_qformer_text_input)
        if self.has_text_ffn:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerOutput(config, config.intermediate_size)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerOutput(config, config.intermediate_size)

    def _text_ffn(self, x):
        if not self.has_text_ffn:
            raise ValueError(
                "this Q-Former has no text FFN (qformer_config.use_qformer_text_input is False), so it can "
                "only run query tokens; text input needs a checkpoint built with use_qformer_text_input=True"
            )
        return self.output(self.intermediate(x), x)

    def forward(self, x, mask, enc, enc_mask, query_length, head_mask=None, output_attentions=False):
        """Returns (x, self-attention weights, cross-attention weights or None)."""
        x, att = self.attention(x, mask, head_mask=head_mask, output_attentions=output_attentions)
        if query_length == 0:
            return self._text_ffn(x), att, None
        xq, xatt = x[:, :query_length], None
        if self.has_cross_attention:
            if enc is None:
                raise ValueError("encoder_hidden_states must be given for cross-attention layers")
            xq, xatt = self.crossattention(xq, enc_mask, enc, head_mask, output_attentions)
        y = self.output_query(self.intermediate_query(xq), xq)
        if x.shape[1] > query_length:  # text positions after the queries
            y = torch.cat([y, self._text_ffn(x[:, query_length:])], dim=1)
        return y, att, xatt


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([Blip2QFormerLayer(config, i) for i in range(config.num_hidden_layers)])


class Blip2TextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the retrieval models' text; queries go first.

    The LayerNorm and dropout that BERT puts here are the Q-Former's `layernorm`/`dropout`.
    """

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids is None:
            return query_embeds
        w = self.word_embeddings.weight
        input_ids = input_ids.to(w.device)
        L, limit = input_ids.shape[1], self.position_embeddings.num_embeddings
        if L > limit:  # else the position lookup fails deep inside with an IndexError
            raise ValueError(f"text of {L} tokens is longer than the Q-Former's {limit} positions "
                             "(qformer_config.max_position_embeddings); shorten it, or tokenize with "
                             "truncation=True and a max_length that fits")
        if position_ids is None:  # text positions count from 0, whatever queries come before
            position_ids = torch.arange(L, device=w.device)[None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, L, C)
        if query_embeds is not None:
            # the queries may be kept in fp32; they join the text in the embeddings' dtype
            x = torch.cat([query_embeds.to(x.dtype), x], dim=1)
        return x


def _head_mask(head_mask, n_layers: int):
    """(nh,) or (n_layers, nh) -> per-layer (1, nh, 1, 1) multipliers, or Nones."""
    if head_mask is None:
        return [None] * n_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None].expand(n_layers, -1)
    return [h[None, :, None, None] for h in head_mask]


class Blip2QFormerModel(PreTrainedModel):
    config_class = Blip2QFormerConfig
    part_prefix = "qformer."
    main_input_name = "query_embeds"

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = Blip2QFormerEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return None  # the queries / text embeddings come from the owner

    def _additive(self, mask: torch.Tensor, fill: float, dt: torch.dtype) -> torch.Tensor:
        if mask.dim() == 3:  # (B, T, S) given per query position
            mask = mask[:, None]
        elif mask.dim() == 2:  # (B, S) padding mask
            mask = mask[:, None, None]
        else:
            raise ValueError(f"attention mask must be (B, S) or (B, T, S), got shape {tuple(mask.shape)}")
        return (1.0 - mask.to(dt)) * fill

    def forward(
        self,
        query_embeds: torch.Tensor,
        query_length: int | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple:
        """query_embeds (B, T, C): queries first, then any text; query_length defaults to T.

        attentions: as the reference returns them, the self-attention weights of each layer with
        that layer's cross-attention weights right after it; cross_attentions: the latter alone.
        """
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        query_length = query_embeds.shape[1] if query_length is None else query_length

        dt = self.layernorm.weight.dtype  # the Q-Former may be kept in fp32 inside a half model
        x = self.dropout(self.layernorm(query_embeds.to(dt)))
        B, T, _ = x.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, device=x.device)
        mask = self._additive(attention_mask.to(x.device), -10000.0, dt)
        enc = enc_mask = None
        if encoder_hidden_states is not None:
            enc = encoder_hidden_states.to(dt)
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(enc.shape[:2], device=x.device)
            enc_mask = self._additive(encoder_attention_mask.to(x.device), torch.finfo(dt).min, dt)

        heads = _head_mask(head_mask, len(self.encoder.layer))
        hs, atts, xatts = [x], [], []
        for layer, hm in zip(self.encoder.layer, heads):
            x, att, xatt = layer(x, mask, enc, enc_mask, query_length, hm, output_attentions)
            hs.append(x)
            atts.append(att)
            if xatt is not None:
                atts.append(xatt)
                xatts.append(xatt)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=x,
            pooler_output=x[:, 0],
            hidden_states=tuple(hs) if output_hidden_states else None,
            attentions=tuple(atts) if output_attentions else None,
            cross_attentions=tuple(xatts) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()
