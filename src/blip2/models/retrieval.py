"""BLIP-2 stage-1 models: image-text matching (ITM), contrastive similarity (ITC) and the two
projection encoders that give the ITC embeddings separately (e.g. Salesforce/blip2-itm-vit-g).

ITC: image -> 32 query outputs -> vision_projection, normalised (B, Q, E); text -> CLS ->
text_projection, normalised (N, E); similarity = max over the queries (no temperature).
ITM: queries and text go through the Q-Former together, the queries cross-attend to the image;
itm_head on the query outputs, averaged over the queries -> (B, 2) [no-match, match] logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Blip2PreTrainedModel, itc_embedding
from .config import Blip2Config
from .outputs import (
    Blip2ImageTextMatchingModelOutput,
    Blip2TextModelOutput,
    Blip2VisionModelOutput,
    output_flags,
)


class _Blip2Stage1(Blip2PreTrainedModel):
    """The stage-1 classes: their word embeddings keep a zero padding row when built from a config."""

    def _init_weights(self, m: nn.Module) -> None:
        super()._init_weights(m)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()


class Blip2ForImageTextRetrieval(_Blip2Stage1):
    main_input_name = "pixel_values"

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        C, E = config.qformer_config.hidden_size, config.image_text_hidden_size
        self.build_image_side(text_embeddings=True)
        self.vision_projection = nn.Linear(C, E)
        self.text_projection = nn.Linear(C, E)
        self.itm_head = nn.Linear(C, 2)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def _carries_image_tokens(self, input_ids: torch.Tensor) -> bool:
        # Blip2Processor puts num_query_tokens image tokens before the text when it gets images.
        # The reference drops the first num_query_tokens ids whenever image_token_index is set;
        # we drop them only when they are those tokens, so text tokenised on its own still works.
        tok, Q = self.config.image_token_index, self.config.num_query_tokens
        return tok is not None and input_ids.shape[1] >= Q and bool((input_ids[:, :Q] == tok).all())

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        use_image_text_matching_head: bool | None = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> Blip2ImageTextMatchingModelOutput | tuple:
        """ITM (use_image_text_matching_head=True): image i with text i -> logits_per_image (B, 2).
        ITC: every image with every text -> logits_per_image (N_img, N_txt) cosine similarities.
        output_attentions / output_hidden_states apply to the vision model, as in the reference."""
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        vision_out = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                       output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                       return_dict=True)
        image_embeds = vision_out.last_hidden_state  # (B, 1+N, Cv)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        strip = self._carries_image_tokens(input_ids)
        Q = self.query_tokens.shape[1]
        if strip:
            input_ids = input_ids[:, Q:]

        if use_image_text_matching_head:
            if not strip:  # the image-token positions of the mask stand for the queries; add them
                qmask = torch.ones(attention_mask.shape[0], Q, dtype=attention_mask.dtype, device=attention_mask.device)
                attention_mask = torch.cat([qmask, attention_mask.to(qmask.device)], dim=1)
            queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            text_out = self.qformer(
                query_embeds=self.embeddings(input_ids=input_ids, query_embeds=queries),
                query_length=Q,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                return_dict=True,
            )
            text_embeds = text_out.last_hidden_state.to(self.itm_head.weight.dtype)  # (B, Q+L, C)
            logits_per_image = self.itm_head(text_embeds[:, :Q]).mean(dim=1)  # (B, 2)
        else:
            q = self.query_image(image_embeds).last_hidden_state
            if strip:
                attention_mask = attention_mask[:, Q:]
            text_out = self.qformer(
                query_embeds=self.embeddings(input_ids=input_ids),
                query_length=0,
                attention_mask=attention_mask,
                return_dict=True,
            )
            image_embeds = itc_embedding(self.vision_projection, q)  # (B, Q, E)
            text_embeds = itc_embedding(self.text_projection, text_out.last_hidden_state[:, 0])  # (N, E)
            logits_per_image = (image_embeds @ text_embeds.t()).max(dim=1).values  # (B, N): best query
        logits_per_text = logits_per_image.t()

        if not return_dict:
            return (
                logits_per_image, logits_per_text, text_embeds, image_embeds, text_out.to_tuple(), vision_out.to_tuple()
            )
        return Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_out,
            vision_model_output=vision_out,
        )


class Blip2TextModelWithProjection(_Blip2Stage1):
    main_input_name = "input_ids"

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        # no vision model; query_tokens is unused by the text path but kept, so checkpoints match
        self.build_image_side(vision=False, text_embeddings=True)
        self.text_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> Blip2TextModelOutput | tuple:
        """text_embeds: every token's projected, normalised embedding (B, L, E); index 0 is the ITC one."""
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids, position_ids=position_ids),
            query_length=0,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        res = Blip2TextModelOutput(
            text_embeds=itc_embedding(self.text_projection, out.last_hidden_state),
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return res if return_dict else res.to_tuple()


class Blip2VisionModelWithProjection(_Blip2Stage1):
    main_input_name = "pixel_values"

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        self.build_image_side()
        self.vision_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> Blip2VisionModelOutput | tuple:
        """image_embeds: the projected, normalised query outputs (B, Q, E); the rest is the ViT's."""
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        vision_out = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                       output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                       return_dict=True)
        q = self.query_image(vision_out.last_hidden_state).last_hidden_state
        res = Blip2VisionModelOutput(
            image_embeds=itc_embedding(self.vision_projection, q),
            last_hidden_state=vision_out.last_hidden_state,
            hidden_states=vision_out.hidden_states,
            attentions=vision_out.attentions,
        )
        return res if return_dict else res.to_tuple()


def itc_towers(model: Blip2ForImageTextRetrieval) -> tuple[Blip2TextModelWithProjection, Blip2VisionModelWithProjection]:
    """The two ITC encoders of a loaded retrieval model, made of its own modules (no weight is
    copied or loaded again): what a search needs beside ITM, at the memory of one model."""
    with torch.device("meta"):  # built empty; every module is then replaced by the model's own
        text, vision = Blip2TextModelWithProjection(model.config), Blip2VisionModelWithProjection(model.config)
    text.embeddings, text.qformer, text.text_projection = model.embeddings, model.qformer, model.text_projection
    vision.vision_model, vision.qformer, vision.vision_projection = model.vision_model, model.qformer, model.vision_projection
    text.query_tokens = vision.query_tokens = model.query_tokens
    return text.eval(), vision.eval()
