"""The BLIP-2 image encoder: an EVA-style ViT (ViT-g/14 in the published checkpoints).

Pre-norm blocks; one fused `qkv` Linear whose bias is cat(q_bias, 0, v_bias) as stored in the
checkpoints (`qkv.bias`, 3C wide; the k third is zero in every published file). `post_layernorm`
is LAVIS' `ln_vision`: it normalises every token, and the pooled CLS is normalised a second time,
which is what the reference returns as `pooler_output`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Blip2VisionConfig
from .layers import activation
from .outputs import BaseModelOutputWithPooling, output_flags
from ..checkpoint.pretrained import PreTrainedModel


class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        C, P = config.hidden_size, config.patch_size
        self.patch_size = P
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embedding = nn.Conv2d(3, C, P, stride=P)  # P x P patches, no overlap
        self.num_positions = (config.image_size // P) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_positions, C))

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position table resized (bicubic, DINO-style) to the patch grid of a (height, width) image."""
        pos = self.position_embedding  # (1, 1+N, C)
        n_patches, n_pos = embeddings.shape[1] - 1, pos.shape[1] - 1
        if n_patches == n_pos and height == width:
            return pos
        C = embeddings.shape[-1]
        g = int(n_pos**0.5)
        grid = pos[:, 1:].reshape(1, g, g, C).permute(0, 3, 1, 2)  # (1, C, g, g)
        grid = F.interpolate(
            grid, size=(height // self.patch_size, width // self.patch_size), mode="bicubic", align_corners=False
        )
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, C)  # (1, h*w, C)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        dt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dt)).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(B, 1, -1).to(dt)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, C)
        pos = self.interpolate_pos_encoding(x, H, W) if interpolate_pos_encoding else self.position_embedding
        # Without interpolation a smaller image just takes the first positions, as the reference does.
        return x + pos[:, : x.shape[1]].to(dt)


class Blip2Attention(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        C, nh = config.hidden_size, config.num_attention_heads
        if C % nh:
            raise ValueError(f"hidden_size {C} is not a multiple of num_attention_heads {nh}")
        self.n_head, self.head_dim = nh, C // nh
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(C, 3 * C, bias=config.qkv_bias)
        self.projection = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        att = None
        if output_attentions:  # the weights are asked for: spell the softmax out
            att = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            att = att.softmax(dim=-1)
            y = F.dropout(att, p=p, training=self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.projection(y), att


class Blip2MLP(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Blip2EncoderLayer(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = Blip2Attention(config)
        self.layer_norm1 = nn.LayerNorm(C, eps=eps)
        self.mlp = Blip2MLP(config)
        self.layer_norm2 = nn.LayerNorm(C, eps=eps)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        a, att = self.self_attn(self.layer_norm1(x), output_attentions)
        x = x + a
        x = x + self.mlp(self.layer_norm2(x))
        return x, att


class Blip2Encoder(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Blip2EncoderLayer(config) for _ in range(config.num_hidden_layers)])


class Blip2VisionModel(PreTrainedModel):
    config_class = Blip2VisionConfig
    part_prefix = "vision_model."
    main_input_name = "pixel_values"

    def __init__(self, config: Blip2VisionConfig):
        super().__init__(config)
        self.embeddings = Blip2VisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, m: nn.Module) -> None:
        super()._init_weights(m)
        if isinstance(m, Blip2VisionEmbeddings):
            std = self.config.initializer_range
            nn.init.trunc_normal_(m.position_embedding, std=std)
            nn.init.trunc_normal_(m.class_embedding, std=std)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """pixel_values (B, 3, H, W) -> last_hidden_state (B, 1+N, C), pooler_output (B, C).

        hidden_states: the embeddings and every block's output (the last one before
        post_layernorm); attentions: every block's (B, nh, T, T) softmax weights.
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)

        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hs, atts = [x], []
        for layer in self.encoder.layers:
            x, att = layer(x, output_attentions)
            hs.append(x)
            atts.append(att)
        x = self.post_layernorm(x)
        pooled = self.post_layernorm(x[:, 0])  # normed twice: the reference's pooler_output
        out = BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hs) if output_hidden_states else None,
            attentions=tuple(atts) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()
