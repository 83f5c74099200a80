"""OPT, the decoder-only language model of the blip2-opt-* checkpoints.

    inputs_embeds (B, T, E_w) ─► project_in ─► + embed_positions(positions from the mask) ─► layers
      ─► final_layer_norm ─► project_out ─► lm_head (tied to embed_tokens) ─► logits (B, T, V)

E_w = word_embed_proj_dim (= hidden_size except opt-350m-style configs). Positions are counted
over the attention mask, so a left-padded row starts at position 0 at its first real token.
Module names match the reference's keys (`model.decoder.layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import OPTConfig
from .layers import Embedding, activation, causal_lm_loss
from .lm import KVCache, LMSession, ScaledDotProduct, causal_mask
from .outputs import BaseModelOutput, BaseModelOutputWithPooling, CausalLMOutputWithPast
from ..checkpoint.pretrained import PreTrainedModel


class OPTAttention(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        E, b = c.hidden_size, c.enable_bias
        self.nh = c.num_attention_heads
        self.hs = E // self.nh
        if self.hs * self.nh != E:
            raise ValueError(f"hidden_size {E} is not a multiple of num_attention_heads {self.nh}")
        self.dropout = c.attention_dropout
        self.q_proj = nn.Linear(E, E, bias=b)
        self.k_proj = nn.Linear(E, E, bias=b)
        self.v_proj = nn.Linear(E, E, bias=b)
        self.out_proj = nn.Linear(E, E, bias=b)
        self.sdpa = ScaledDotProduct()

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, E) -> q, k, v (B, T, E) each, unscaled."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, mask=None, cache=None, input_pos=None, need_weights=False):
        B, T, E = x.shape
        q, k, v = self.project(x)
        q = (q * self.hs**-0.5).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.nh, self.hs).transpose(1, 2)
        v = v.view(B, T, self.nh, self.hs).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, nh, S, hs): S positions so far, or T_max
            mask = KVCache.fit(mask, k)
        p = self.dropout if self.training else 0.0
        # scale=1: q is already scaled, in the reference's order (bit-identical)
        y, w = self.sdpa(q, k, v, mask, is_causal=mask is None and T > 1, scale=1.0, dropout_p=p, need_weights=need_weights)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, E)), w


class OPTDecoderLayer(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        E, aff = c.hidden_size, c.layer_norm_elementwise_affine
        self.pre_norm = c.do_layer_norm_before  # False: post-norm (opt-350m)
        self.dropout = c.dropout
        self.act = activation(c.activation_function)
        self.self_attn = OPTAttention(c)
        self.self_attn_layer_norm = nn.LayerNorm(E, elementwise_affine=aff)
        self.fc1 = nn.Linear(E, c.ffn_dim, bias=c.enable_bias)
        self.fc2 = nn.Linear(c.ffn_dim, E, bias=c.enable_bias)
        self.final_layer_norm = nn.LayerNorm(E, elementwise_affine=aff)

    def forward(self, x, mask=None, cache=None, input_pos=None, need_weights=False):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        h, w = self.self_attn(h, mask, cache, input_pos, need_weights)
        x = x + F.dropout(h, self.dropout, self.training)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        h = self.fc2(self.act(self.fc1(h)))
        x = x + F.dropout(h, self.dropout, self.training)
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x, w


class OPTLearnedPositionalEmbedding(Embedding):
    """Learned positions; rows 0 and 1 are reserved (fairseq's padding offset), so position p is row p + 2."""

    offset = 2

    def __init__(self, num_positions: int, dim: int):
        super().__init__(num_positions + self.offset, dim)

    def forward(self, position_ids: Tensor) -> Tensor:
        return super().forward(position_ids + self.offset)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) mask -> (B, T) positions: count of real tokens so far minus one; pads get -1."""
    m = attention_mask.long()
    return torch.cumsum(m, dim=1) * m - 1


class OPTDecoder(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        E, Ew = c.hidden_size, c.word_embed_proj_dim
        self.layerdrop = c.layerdrop
        self.embed_tokens = Embedding(c.vocab_size, Ew, c.pad_token_id)
        self.embed_positions = OPTLearnedPositionalEmbedding(c.max_position_embeddings, E)
        self.project_out = nn.Linear(E, Ew, bias=False) if Ew != E else None
        self.project_in = nn.Linear(Ew, E, bias=False) if Ew != E else None
        keep_final = c.do_layer_norm_before and not c._remove_final_layer_norm
        self.final_layer_norm = nn.LayerNorm(E, elementwise_affine=c.layer_norm_elementwise_affine) if keep_final else None
        self.layers = nn.ModuleList(OPTDecoderLayer(c) for _ in range(c.num_hidden_layers))

    def run(self, x, pos, mask=None, caches=None, input_pos=None, want_h=False, want_att=False):
        """x (B, T, E_w) token embeddings, pos (B, T) positions -> (B, T, E_w), hidden states, attentions."""
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(pos).to(x.device)
        hs, atts = [], []
        for i, layer in enumerate(self.layers):
            if self.training and self.layerdrop > 0 and torch.rand([]) < self.layerdrop:
                continue
            if want_h:
                hs.append(x)
            x, w = layer(x, mask, caches[i] if caches is not None else None, input_pos, want_att)
            if want_att:
                atts.append(w)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if want_h:  # the reference's last entry is the final (normed, projected) output
            hs.append(x)
        return x, (tuple(hs) if want_h else None), (tuple(atts) if want_att else None)

    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None,
        output_hidden_states=None, output_attentions=None, return_dict=None, **extra,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        mask = None  # None: plain causal attention
        if attention_mask is not None:
            attention_mask = attention_mask.to(x.device)
            if not bool(attention_mask.all()):
                mask = causal_mask(attention_mask.bool(), torch.arange(T, device=x.device))  # (B, 1, T, T)
        else:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=x.device)
        pos = positions_from_mask(attention_mask) if position_ids is None else position_ids
        h, hs, atts = self.run(x, pos, mask, want_h=bool(output_hidden_states), want_att=bool(output_attentions))
        out = BaseModelOutput(last_hidden_state=h, hidden_states=hs, attentions=atts)
        return out if return_dict is not False else out.to_tuple()


class OPTModel(nn.Module):
    def __init__(self, c: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(c)

    def forward(self, *args, **kwargs) -> BaseModelOutput:
        return self.decoder(*args, **kwargs)


class OPTForCausalLM(PreTrainedModel):
    config_class = OPTConfig
    main_input_name = "input_ids"
    decodes_tokens = True
    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()

    def tied_weights(self) -> dict[str, str]:
        return dict(self._tied_weights_keys) if self.config.tie_word_embeddings is not False else {}

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def set_input_embeddings(self, e: nn.Embedding) -> None:
        self.model.decoder.embed_tokens = e

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, lm_head: nn.Linear) -> None:
        self.lm_head = lm_head

    def get_decoder(self) -> OPTDecoder:
        return self.model.decoder

    def get_encoder(self) -> OPTModel:  # a decoder-only model is its own text encoder
        return self.model

    def text_features(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kw) -> BaseModelOutputWithPooling:
        """The decoder stack's output (after final norm and project_out): Blip2Model.get_text_features."""
        kw.pop("return_dict", None)
        o = self.model.decoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kw)
        return BaseModelOutputWithPooling(last_hidden_state=o.last_hidden_state, hidden_states=o.hidden_states, attentions=o.attentions)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: Tensor | int | None = None,
        **extra,
    ) -> CausalLMOutputWithPast:
        """Uncached forward over the whole sequence. Loss: token t predicts labels[t+1], -100 ignored."""
        o = self.model.decoder(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, position_ids=position_ids,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        logits = self.lm_head(o.last_hidden_state[:, -logits_to_keep:]).contiguous()  # (B, T, V); -0: all
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=o.hidden_states, attentions=o.attentions)
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def start(self, inputs_embeds: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
              shared_prefix: int = 0) -> "OPTSession":
        """A decoding session over prompt embeddings (B, T, E_w), possibly left padded.
        shared_prefix: the first P positions are the same real tokens in every row (the image
        queries and a common template), so prefill runs them once and copies their keys/values."""
        return OPTSession(self, inputs_embeds, attention_mask, max_new_tokens, shared_prefix)


class OPTSession(LMSession):
    """The growing attention mask is a (B, T + max_new_tokens) bool buffer: the prompt's mask, then
    one column set per step. Each row's next position is its count of real tokens (`npos`)."""

    _rows = ("mask", "npos")

    def __init__(self, lm: OPTForCausalLM, inputs_embeds: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
                 shared_prefix: int = 0):
        B, T, _ = inputs_embeds.shape
        self.P = min(max(shared_prefix, 0), T - 1) if B > 1 else 0  # at least one position left per row
        dev = inputs_embeds.device
        super().__init__(T + max_new_tokens, dev)
        self.lm, self.T = lm, T
        self.embeds = inputs_embeds
        am = attention_mask.to(dev) if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=dev)
        self.prompt_mask = am
        attn = lm.model.decoder.layers[0].self_attn
        # the keys and values come out of the layers in the activations' dtype
        self.caches = [KVCache.empty(B, attn.nh, self.capacity, attn.hs, inputs_embeds.dtype, dev)
                       for _ in lm.model.decoder.layers]
        self.mask = torch.zeros(B, self.capacity, dtype=torch.bool, device=dev)  # (B, T_max)
        self.mask[:, :T] = am.bool()
        self.npos = am.long().sum(1)  # (B,) position of each row's next token

    @property
    def attention_mask(self) -> Tensor:
        """(B, positions so far) long: the reference's mask, grown by a column of ones per step."""
        return self.mask[:, : self.t].long()

    def prefill(self) -> Tensor:
        dec, P = self.lm.model.decoder, self.P
        positions = positions_from_mask(self.prompt_mask)  # (B, T)
        if P:  # the shared prefix through one row; its keys/values then copied to the others
            pos = self._advance(P)
            one = [KVCache(c.k[:1], c.v[:1]) for c in self.caches]  # views: writes land in the caches
            mask = self.mask[:1, None, None, :] & (self._arange[None, :] <= self._arange[pos, None])  # (1, 1, P, T_max)
            dec.run(self.embeds[:1, :P], positions[:1, :P], mask, one, pos)
            for c in self.caches:
                c.k[1:, :, :P] = c.k[:1, :, :P]
                c.v[1:, :, :P] = c.v[:1, :, :P]
        pos = self._advance(self.T - P)  # T - P positions
        mask = self.mask[:, None, None, :] & (self._arange[None, :] <= self._arange[pos, None])  # (B, 1, T - P, T_max)
        x, _, _ = dec.run(self.embeds[:, P:], positions[:, P:], mask, self.caches, pos)
        self.embeds = self.prompt_mask = None  # no longer needed
        return self.lm.lm_head(x[:, -1])  # (B, V)

    def compile(self, mode: str | None = None) -> None:
        """Run step() as one torch.compile'd graph (CPU: inductor's C++; CUDA: Triton).

        Every shape is made static: the capacity is rounded up to a multiple of COMPILE_BUCKET
        (unwritten positions are masked out), so captions and short questions of different
        lengths share one graph per batch size, and the position is a (1,) device tensor that
        the graph advances in place, so the only host sync per step stays the sampled token.
        """
        if self.t:
            raise RuntimeError("compile() must be called before prefill()")
        cap = -(-self.capacity // COMPILE_BUCKET) * COMPILE_BUCKET
        if cap != self.capacity:  # re-allocate the (still empty) buffers at the bucketed size
            c0, B = self.caches[0].k, self.mask.shape[0]
            self.capacity, self._arange = cap, torch.arange(cap, device=c0.device)
            self.caches = [KVCache.empty(B, c0.shape[1], cap, c0.shape[3], c0.dtype, c0.device) for _ in self.caches]
            mask = torch.zeros(B, cap, dtype=torch.bool, device=c0.device)
            mask[:, : self.T] = self.mask[:, : self.T]
            self.mask = mask
        self._step_fn = _compiled_step(mode)
        self._pos = None

    def step(self, tokens: Tensor) -> Tensor:
        if getattr(self, "_step_fn", None) is not None:
            self._advance(1)  # host-side bookkeeping and the capacity check only
            if self._pos is None:  # one small host->device copy per call, not per step
                self._pos = torch.full((1,), self.t - 1, dtype=torch.long, device=self.mask.device)
            return self._step_fn(self.lm.model.decoder, self.lm.lm_head, tokens, self._pos, self.npos, self.mask, self.caches)
        pos = self._advance(1)
        self.mask[:, pos] = True  # columns past pos stay False: causality comes for free
        x = self.lm.model.decoder.embed_tokens(tokens[:, None])  # (B, 1, E_w)
        x, _, _ = self.lm.model.decoder.run(x, self.npos[:, None], self.mask[:, None, None, :], self.caches, pos)
        self.npos += 1
        return self.lm.lm_head(x[:, -1])


# --- compiled decoding ---
COMPILE_BUCKET = 64  # compiled sessions round their capacity up to this: fewer distinct graphs


def _step_impl(dec: OPTDecoder, head: nn.Module, tokens: Tensor, pos: Tensor, npos: Tensor, mask: Tensor,
               caches: list[KVCache]) -> Tensor:
    """OPTSession.step as a pure function of its buffers: tokens (B,), pos (1,) the position to
    write (advanced in place), npos (B,) per-row positions, mask (B, T_max) -> (B, V) logits."""
    mask.index_fill_(1, pos, True)
    x = dec.embed_tokens(tokens[:, None])  # (B, 1, E_w)
    x, _, _ = dec.run(x, npos[:, None], mask[:, None, None, :], caches, pos)
    npos.add_(1)
    pos.add_(1)
    return head(x[:, -1])


_COMPILED: dict = {}


def _compiled_step(mode: str | None):
    """One torch.compile wrapper per mode, shared by all sessions (dynamo caches graphs per
    model and shape on it). dynamic=False: decode shapes are few and static code is faster."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_step_impl, mode=mode, dynamic=False)
    return _COMPILED[mode]
