"""T5 / Flan-T5, the encoder-decoder language model of the blip2-flan-t5-* checkpoints.

    encoder: inputs_embeds ─► blocks [self-attn + bidirectional position bias, FFN] ─► RMS norm
    decoder: ids ─► shared ─► blocks [causal self-attn + bias, cross-attn to encoder, FFN] ─► RMS norm
             ─► (× d_model**-0.5 when the head is the tied embedding) ─► lm_head ─► logits

No absolute positions: block 0 of each stack owns a bucketed relative-position bias that all of
its blocks add to the attention scores (unscaled dot products). Module names match the
reference's keys (`encoder.block.N.layer.0.SelfAttention.q`, ...).

Head and scaling, as transformers 5.8.0 decides them: the config's `scale_decoder_outputs`
(written by 5.x) is the rule; without it the output is scaled unless `tie_word_embeddings` is
false (Flan-T5). 5.x then ties lm_head to `shared` at construction and unties it only when a
checkpoint stores a distinct `lm_head.weight` (every Flan-T5 one does); a checkpoint that has
no `lm_head.weight` keeps the tie. `tie_head` holds that choice here; see `fit_ties`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import T5Config
from .lm import KVCache, LMSession, ScaledDotProduct, additive
from .layers import Embedding, activation
from .outputs import BaseModelOutput, BaseModelOutputWithPooling, Seq2SeqLMOutput
from ..checkpoint.pretrained import PreTrainedModel


def scales_decoder_outputs(c: T5Config) -> bool:
    s = getattr(c, "scale_decoder_outputs", None)
    return bool(s) if s is not None else c.tie_word_embeddings is not False


def float_dtype(m: nn.Module) -> torch.dtype:
    """The dtype of m's floating-point parameters: a linear layer's weight, or the scales of one
    whose weight is stored as integers."""
    return next(p.dtype for p in m.parameters() if p.is_floating_point())


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; the variance in fp32, the result cast to a half weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)  # fp32 when x is half: promoted by var
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """Relative position (key - query) -> bucket: exact for small distances, log-spaced up to
    max_distance, saturating beyond. Bidirectional: half the buckets for keys after the query.
    Causal: keys after the query all fall in bucket 0 (they are masked anyway)."""
    out = torch.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        out = out + (rel > 0).long() * n
        rel = rel.abs()
    else:
        rel = (-rel).clamp(min=0)
    exact = n // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (n - exact)).long()
    large = large.clamp(max=n - 1)
    return out + torch.where(rel < exact, rel, large)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool = False, causal: bool = False):
        super().__init__()
        self.nh, self.hs = c.num_heads, c.d_kv
        self.causal = causal
        self.num_buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        self.dropout = c.dropout_rate
        inner = self.nh * self.hs
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.sdpa = ScaledDotProduct()
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(self.num_buckets, self.nh)

    def compute_bias(self, T: int, S: int, q_offset: int = 0, device=None) -> Tensor:
        """(1, nh, T, S) bias for queries at q_offset.. and keys at 0..S-1."""
        dev = device if device is not None else self.relative_attention_bias.weight.device
        rel = torch.arange(S, device=dev)[None, :] - (torch.arange(T, device=dev)[:, None] + q_offset)  # (T, S)
        b = relative_bucket(rel, not self.causal, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)

    def split(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x, bias=None, kv=None, cache=None, input_pos=None, need_weights=False):
        """x (B, T, d); bias: additive (.., T, S) position bias + mask; kv: (B, S, d) states to
        cross-attend to; cache: written at input_pos (self-attention) or, without input_pos,
        read as precomputed cross-attention keys/values."""
        B, T, _ = x.shape
        q = self.split(self.q(x))
        if cache is not None and input_pos is None:
            k, v = cache.k, cache.v
        else:
            src = x if kv is None else kv
            k, v = self.split(self.k(src)), self.split(self.v(src))
            if cache is not None:
                k, v = cache.update(input_pos, k, v)
                bias = KVCache.fit(bias, k)
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        p = self.dropout if self.training else 0.0
        y, w = self.sdpa(q, k, v, bias, scale=1.0, dropout_p=p, need_weights=need_weights)  # T5 does not scale scores
        return self.o(y.transpose(1, 2).reshape(B, T, self.nh * self.hs)), w


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool, causal: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_attention_bias, causal)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = c.dropout_rate

    def forward(self, x, bias, cache=None, input_pos=None, need_weights=False):
        h, w = self.SelfAttention(self.layer_norm(x), bias, None, cache, input_pos, need_weights)
        return x + F.dropout(h, self.dropout, self.training), w


class T5LayerCrossAttention(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = c.dropout_rate

    def forward(self, x, enc, bias, cache=None, need_weights=False):
        h, w = self.EncDecAttention(self.layer_norm(x), bias, enc, cache, None, need_weights)
        return x + F.dropout(h, self.dropout, self.training), w


class T5DenseReluDense(nn.Module):
    """wo(act(wi x)), or gated: wo(act(wi_0 x) * wi_1 x) for T5 v1.1 / Flan-T5."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.gated = c.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.act = activation(c.dense_act_fn)
        self.dropout = c.dropout_rate

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        h = F.dropout(h, self.dropout, self.training)
        dt = float_dtype(self.wo)
        if h.dtype != dt:
            h = h.to(dt)  # wo may be kept in fp32 under fp16 weights (flan-t5-xxl overflows)
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = c.dropout_rate

    def forward(self, x: Tensor) -> Tensor:
        return x + F.dropout(self.DenseReluDense(self.layer_norm(x)), self.dropout, self.training)


def clamp_fp16(x: Tensor) -> Tensor:
    """Keep fp16 activations finite, as the reference does after every sublayer (no host sync)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    c = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-c, max=c)


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_attention_bias, causal=is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(c))
        self.layer.append(T5LayerFF(c))

    def forward(self, x, bias, enc=None, enc_bias=None, cache=None, cross_cache=None, input_pos=None, need_weights=False):
        x, w = self.layer[0](x, bias, cache, input_pos, need_weights)
        x = clamp_fp16(x)
        cw = None
        if self.is_decoder and (enc is not None or cross_cache is not None):
            x, cw = self.layer[1](x, enc, enc_bias, cross_cache, need_weights)
            x = clamp_fp16(x)
        return clamp_fp16(self.layer[-1](x)), w, cw


class T5Stack(nn.Module):
    def __init__(self, c: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        n = c.num_decoder_layers if is_decoder else c.num_layers
        self.embed_tokens = Embedding(c.vocab_size, c.d_model)  # tied to `shared`
        self.block = nn.ModuleList(T5Block(c, i == 0, is_decoder) for i in range(n))
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = c.dropout_rate

    @property
    def rel_attn(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention

    def run(self, x, bias, enc=None, enc_bias=None, caches=None, cross_caches=None, input_pos=None,
            want_h=False, want_att=False):
        """x (B, T, d) embeddings; bias (.., T, S): position bias + mask, shared by all blocks."""
        x = F.dropout(x, self.dropout, self.training)
        hs, atts, crosses = [], [], []
        for i, blk in enumerate(self.block):
            if want_h:
                hs.append(x)
            x, w, cw = blk(
                x, bias, enc, enc_bias,
                caches[i] if caches is not None else None,
                cross_caches[i] if cross_caches is not None else None,
                input_pos, want_att,
            )
            if want_att:
                atts.append(w)
                crosses.append(cw)
        x = F.dropout(self.final_layer_norm(x), self.dropout, self.training)
        if want_h:
            hs.append(x)
        return x, (tuple(hs) if want_h else None), (tuple(atts) if want_att else None), (tuple(crosses) if want_att else None)

    def self_bias(self, T: int, attention_mask: Tensor | None, dtype: torch.dtype, device) -> Tensor:
        """(B or 1, nh, T, T): relative position bias plus the padding (and, decoding, causal) mask."""
        bias = self.rel_attn.compute_bias(T, T, device=device)
        if not self.is_decoder and attention_mask is None:
            return bias
        keep = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
        if self.is_decoder:
            keep = keep.tril()
        if attention_mask is not None:
            keep = keep & attention_mask.to(device).bool()[:, None, None, :]
        return bias + additive(keep, dtype)

    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, encoder_hidden_states=None,
        encoder_attention_mask=None, output_hidden_states=None, output_attentions=None, return_dict=None, **extra,
    ) -> BaseModelOutput:
        """Uncached pass. Encoder: bidirectional. Decoder: causal, cross-attending to encoder_hidden_states
        (its cross-attention weights are not returned here; T5ForConditionalGeneration returns them)."""
        out, _ = self._forward(input_ids, attention_mask, inputs_embeds, encoder_hidden_states, encoder_attention_mask,
                               output_hidden_states, output_attentions)
        return out if return_dict is not False else out.to_tuple()

    def _forward(self, input_ids, attention_mask, inputs_embeds, enc, enc_mask, want_h, want_att):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bias = self.self_bias(x.shape[1], attention_mask, x.dtype, x.device)
        enc_bias = None
        if enc is not None and enc_mask is not None:
            enc_bias = additive(enc_mask.to(x.device).bool()[:, None, None, :], x.dtype)  # (B, 1, 1, S)
        h, hs, atts, crosses = self.run(x, bias, enc, enc_bias, want_h=bool(want_h), want_att=bool(want_att))
        return BaseModelOutput(last_hidden_state=h, hidden_states=hs, attentions=atts), crosses


class T5ForConditionalGeneration(PreTrainedModel):
    config_class = T5Config
    main_input_name = "input_ids"
    decodes_tokens = True
    _keep_in_fp32_modules = ("wo",)
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
        "lm_head.weight": "shared.weight",
    }

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.model_dim = config.d_model
        self.scale_output = scales_decoder_outputs(config)
        # A config that says "untied" (Flan-T5) comes with its own lm_head.weight; fit_ties() corrects
        # this guess from a checkpoint's keys.
        self.tie_head = self.scale_output
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    # --- weights ---
    def tied_weights(self) -> dict[str, str]:
        t = dict(self._tied_weights_keys)
        if not self.tie_head:
            del t["lm_head.weight"]
        return t

    def fit_ties(self, checkpoint_keys) -> None:
        """Tie the head to `shared` unless the checkpoint stores its own (the reference's rule:
        an untied Flan-T5 head is kept, a head that was saved tied is re-tied). Keys relative to this model."""
        keys = set(checkpoint_keys)
        self.tie_head = "lm_head.weight" not in keys
        if not self.tie_head and self.lm_head.weight is self.shared.weight:
            self.lm_head.weight = nn.Parameter(self.shared.weight.detach().clone())

    def fit_to_checkpoint(self, keys) -> None:
        self.fit_ties(keys)

    def _init_weights(self, m: nn.Module) -> None:
        f, d, c = self.config.initializer_factor, self.config.d_model, self.config
        if isinstance(m, T5LayerNorm):
            nn.init.constant_(m.weight, f)
        elif m is self:
            nn.init.normal_(self.shared.weight, std=f)
            if not self.tie_head:
                nn.init.normal_(self.lm_head.weight, std=f)
        elif isinstance(m, T5DenseReluDense):
            for w in (m.wi_0, m.wi_1) if m.gated else (m.wi,):
                nn.init.normal_(w.weight, std=f * d**-0.5)
            nn.init.normal_(m.wo.weight, std=f * c.d_ff**-0.5)
        elif isinstance(m, T5Attention):
            nn.init.normal_(m.q.weight, std=f * (d * m.hs) ** -0.5)
            nn.init.normal_(m.k.weight, std=f * d**-0.5)
            nn.init.normal_(m.v.weight, std=f * d**-0.5)
            nn.init.normal_(m.o.weight, std=f * (m.nh * m.hs) ** -0.5)
            if hasattr(m, "relative_attention_bias"):
                nn.init.normal_(m.relative_attention_bias.weight, std=f * d**-0.5)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, e: nn.Embedding) -> None:
        self.shared = self.encoder.embed_tokens = self.decoder.embed_tokens = e

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, lm_head: nn.Linear) -> None:
        self.lm_head = lm_head

    def get_encoder(self) -> T5Stack:
        return self.encoder

    def get_decoder(self) -> T5Stack:
        return self.decoder

    def text_features(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kw) -> BaseModelOutputWithPooling:
        """The encoder's output: Blip2Model.get_text_features."""
        kw.pop("return_dict", None)
        o = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kw)
        return BaseModelOutputWithPooling(last_hidden_state=o.last_hidden_state, hidden_states=o.hidden_states, attentions=o.attentions)

    def _shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs for teacher forcing: start token, then labels[:-1]; -100 becomes pad."""
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None or pad is None:
            raise ValueError("config.decoder_start_token_id and config.pad_token_id must be set to train T5 with labels")
        ids = torch.cat([labels.new_full((*labels.shape[:-1], 1), start), labels[..., :-1]], dim=-1)
        return ids.masked_fill(ids == -100, pad)

    def logits(self, h: Tensor) -> Tensor:
        if self.scale_output:  # the tied embedding is O(1): bring the O(sqrt(d)) states back down
            h = h * (self.model_dim**-0.5)
        return self.lm_head(h)

    # --- uncached forward ---
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        decoder_inputs_embeds: Tensor | None = None,
        encoder_outputs=None,
        **extra,
    ) -> Seq2SeqLMOutput:
        """Encode (unless encoder_outputs is given), decode with teacher forcing, score.
        labels without decoder inputs: the decoder reads labels shifted right. Loss: CE, -100 ignored."""
        flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **flags)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            eo = tuple(encoder_outputs)
            encoder_outputs = BaseModelOutput(*(eo + (None,) * (3 - len(eo)))[:3])
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        if decoder_input_ids is not None and decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.shared(decoder_input_ids)
        dec, crosses = self.decoder._forward(
            None, decoder_attention_mask, decoder_inputs_embeds, encoder_outputs.last_hidden_state, attention_mask,
            output_hidden_states, output_attentions,
        )
        logits = self.logits(dec.last_hidden_state)  # (B, T_dec, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1), ignore_index=-100)
        out = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=dec.hidden_states,
            decoder_attentions=dec.attentions,
            cross_attentions=crosses,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def start(self, inputs_embeds: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> "T5Session":
        """A decoding session: encoder inputs (B, S, d) and mask; the decoder begins at decoder_start_token_id."""
        return T5Session(self, inputs_embeds, attention_mask, max_new_tokens)


class T5Session(LMSession):
    """Encoder run once at prefill; cross-attention keys/values computed once from its output.
    The decoder's position bias for every (query, key) slot, causal mask included, is one
    (1, nh, T_max, T_max) table built at prefill; a step reads its row."""

    _rows = ("enc_bias",)

    def __init__(self, lm: T5ForConditionalGeneration, inputs_embeds: Tensor, attention_mask: Tensor | None, max_new_tokens: int):
        B = inputs_embeds.shape[0]
        dev = inputs_embeds.device
        super().__init__(1 + max_new_tokens, dev)  # the start token, then one slot per new token
        self.lm = lm
        self.embeds, self.enc_mask = inputs_embeds, attention_mask
        a = lm.decoder.rel_attn
        # the keys and values come out of the layers in the activations' dtype
        self.caches = [KVCache.empty(B, a.nh, self.capacity, a.hs, inputs_embeds.dtype, dev) for _ in lm.decoder.block]
        self.cross: list[KVCache] = []
        self.enc_bias = self.encoder_last_hidden_state = self.bias = None

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        for c in self.cross:
            c.reorder(index.to(c.k.device))

    def prefill(self) -> Tensor:
        lm, dev = self.lm, self.embeds.device
        enc = lm.encoder(inputs_embeds=self.embeds, attention_mask=self.enc_mask).last_hidden_state  # (B, S, d)
        self.encoder_last_hidden_state = enc  # rows as at prefill (not reordered)
        if self.enc_mask is not None:
            self.enc_bias = additive(self.enc_mask.to(dev).bool()[:, None, None, :], enc.dtype)  # (B, 1, 1, S)
        self.cross = []
        for blk in lm.decoder.block:
            att = blk.layer[1].EncDecAttention
            self.cross.append(KVCache(att.split(att.k(enc)), att.split(att.v(enc))))  # (B, nh, S, hs)
        self.embeds = self.enc_mask = None
        a = lm.decoder.rel_attn
        T = self.capacity
        keep = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        self.bias = a.compute_bias(T, T, device=dev) + additive(keep, a.relative_attention_bias.weight.dtype)
        start = torch.full((self.batch_size,), lm.config.decoder_start_token_id, dtype=torch.long, device=dev)
        return self.step(start)

    def step(self, tokens: Tensor) -> Tensor:
        pos = self._advance(1)
        t = self.t - 1
        x = self.lm.shared(tokens[:, None])  # (B, 1, d)
        bias = self.bias[:, :, t : t + 1]  # (1, nh, 1, T_max)
        h, _, _, _ = self.lm.decoder.run(x, bias, None, self.enc_bias, self.caches, self.cross, pos)
        return self.lm.logits(h[:, -1])  # (B, V)
