"""What every BLIP-2 model class shares: the image side, built in one place.

    pixel_values ─► vision_model (EVA ViT) ─► image_embeds (B, 1+P, Cv)
                                                   │ cross-attention
    query_tokens (1, Q, Cq) ─────────────────► qformer ─► query outputs (B, Q, Cq)

The builder assigns flat attributes (`vision_model`, `query_tokens`, `qformer`, and for the
classes that read text through the Q-Former, `embeddings`), so a checkpoint key is the attribute
path, as in the published files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint.pretrained import PreTrainedModel
from .config import Blip2Config
from .qformer import Blip2QFormerModel, Blip2TextEmbeddings
from .vision import Blip2VisionModel


def itc_embedding(projection: nn.Linear, h: Tensor) -> Tensor:
    """An ITC embedding: h (Q-Former states, which may be kept in fp32) in the projection's dtype,
    projected and L2-normalised on the last dim."""
    return F.normalize(projection(h.to(projection.weight.dtype)), dim=-1)


class Blip2PreTrainedModel(PreTrainedModel):
    """Base of the BLIP-2 classes: config, the image-side builder, its init and its forward."""

    config_class = Blip2Config
    # As the reference: in float16 the queries and the Q-Former stay fp32 (bf16 casts everything).
    _keep_in_fp32_modules = ("query_tokens", "qformer")

    def build_image_side(self, vision: bool = True, text_embeddings: bool = False) -> None:
        """vision_model (optional: the text-only projection model has none), query_tokens,
        embeddings (optional: the Q-Former's own text input) and qformer."""
        c = self.config
        qc = c.qformer_config
        if vision:
            self.vision_model = Blip2VisionModel(c.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_query_tokens, qc.hidden_size))
        if text_embeddings:
            self.embeddings = Blip2TextEmbeddings(qc)
        self.qformer = Blip2QFormerModel(qc)

    def _init_weights(self, m: nn.Module) -> None:
        super()._init_weights(m)
        if m is self and hasattr(self, "query_tokens"):
            # The reference zero-fills the queries, which makes all of them identical; LAVIS draws
            # them like BERT weights, which gives a model built from a config distinct queries.
            nn.init.normal_(self.query_tokens, std=self.config.qformer_config.initializer_range)

    def query_image(self, image_embeds: torch.Tensor, **kw):
        """The learned queries (1, Q, Cq) read the ViT output (B, 1+P, Cv) through cross-attention:
        the Q-Former output over the queries alone (every image token visible)."""
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return self.qformer(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=mask,
            return_dict=True,
            **kw,
        )

    def encode_image(self, pixel_values, interpolate_pos_encoding: bool = False, image_embeds=None, **out_kw):
        """ViT then Q-Former, once: (vision output or None, the Q-Former's query output).

        image_embeds: the ViT's output computed earlier (a trainer's cache of the frozen encoder);
        the ViT is then skipped and the vision output is None. out_kw (output_attentions,
        output_hidden_states) go to both towers."""
        vision_out = None
        if image_embeds is None:
            vision_out = self.vision_model(
                pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **out_kw
            )
            image_embeds = vision_out.last_hidden_state  # (B, 1+P, Cv)
        return vision_out, self.query_image(image_embeds, **out_kw)
