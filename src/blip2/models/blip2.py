"""BLIP-2 with a language model: Blip2Model and Blip2ForConditionalGeneration.

    pixel_values ─► vision_model (EVA ViT) ─► image_embeds (B, 1+P, Cv)
                                                   │ cross-attention
    query_tokens (1, Q, Cq) ─────────────────► qformer ─► (B, Q, Cq)
                                                   │
                                      language_projection ─► (B, Q, C_lm)
                                                   │ written over the <image> placeholders
    input_ids ─► embed_tokens ─► inputs_embeds ────┴─► language_model (OPT / T5) ─► logits

The image is encoded once per call; generate() prefills the language model once and then
decodes with a preallocated KV cache (see lm.py, generation.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..generation import GenerationConfig, decode, prepare_generation_config, special_tokens
from ..generation.batching import common_prefix, layout, prompt_rows, split_answers
from .base import Blip2PreTrainedModel
from .config import Blip2Config
from .layers import causal_lm_loss
from .lm import build_language_model
from .outputs import BaseModelOutputWithVisionQformerOutputs, Blip2ForConditionalGenerationModelOutput
from .prompt import image_prompt


class _Blip2WithLM(Blip2PreTrainedModel):
    """The parts and the image→prompt path shared by Blip2Model and Blip2ForConditionalGeneration."""

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        self.build_image_side()
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = build_language_model(config.text_config)
        self.generation_config = GenerationConfig.from_model_config(config.text_config)
        # The language model's own fp32 islands (T5's `wo` under fp16) hold inside BLIP-2 too.
        self._keep_in_fp32_modules = type(self)._keep_in_fp32_modules + tuple(
            getattr(self.language_model, "_keep_in_fp32_modules", ())
        )
        self.post_init()

    def fit_to_checkpoint(self, keys):
        # Whether the LM head is tied depends on what the file stores (an untied Flan-T5 head).
        pre = "language_model."
        self.language_model.fit_to_checkpoint(k[len(pre):] for k in keys if k.startswith(pre))

    def tied_weights(self):
        return {f"language_model.{t}": f"language_model.{s}" for t, s in self.language_model.tied_weights().items()}

    # --- embeddings access, as the reference exposes them ---
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_encoder(self):
        return self.language_model.get_encoder()

    # --- image -> language-model inputs ---
    def _image_to_lm(self, pixel_values, interpolate_pos_encoding=False, image_embeds=None, **out_kw):
        """Run ViT, Q-Former and projection once. Returns (vision_out, qformer_out, (B, Q, C_lm)).
        image_embeds: the ViT's output (B, 1+P, Cv) computed earlier (a trainer's cache of the frozen
        encoder); the ViT is then skipped and vision_out is None."""
        vision_out, qformer_out = self.encode_image(pixel_values, interpolate_pos_encoding, image_embeds, **out_kw)
        q = qformer_out.last_hidden_state  # (B, Q, Cq)
        dt = (image_embeds if image_embeds is not None else vision_out.last_hidden_state).dtype
        if q.dtype != dt:  # the Q-Former may be kept in fp32
            q = q.to(dt)
        return vision_out, qformer_out, self.language_projection(q)

    def get_placeholder_mask(self, input_ids, inputs_embeds):
        """(B, T, C) bool mask of the positions that hold the image-token placeholder."""
        if input_ids is None:
            img = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_index, dtype=torch.long, device=inputs_embeds.device)
            )
            m = (inputs_embeds == img).all(-1)
        else:
            m = input_ids == self.config.image_token_index
        return m.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)

    def _merge(self, input_ids, inputs_embeds, lm_inputs):
        """Write the projected queries over the placeholder embeddings."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if lm_inputs.shape[-1] != inputs_embeds.shape[-1]:
            raise ValueError(
                f"language_projection gives {lm_inputs.shape[-1]}-wide vectors but the language model's token "
                f"embeddings are {inputs_embeds.shape[-1]}-wide (text_config.word_embed_proj_dim != hidden_size?); "
                "BLIP-2 needs them equal"
            )
        lm_inputs = lm_inputs.to(inputs_embeds.device, inputs_embeds.dtype)
        mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        n = int(mask[..., 0].sum())
        if n != lm_inputs.shape[0] * lm_inputs.shape[1]:
            raise ValueError(
                f"the prompt holds {n} image-token placeholders (id {self.config.image_token_index}) but the "
                f"images give {lm_inputs.shape[0]}×{lm_inputs.shape[1]} query embeddings. Build the inputs with "
                f"Blip2Processor (num_query_tokens={self.config.num_query_tokens}), which inserts them for you."
            )
        return inputs_embeds.masked_scatter(mask, lm_inputs)

    def _lm_forward(self, inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask, labels, **kw):
        if self.config.use_decoder_only_language_model:
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, **kw)
            logits, loss = out.logits, None
            if labels is not None:
                # Labels cover the text part only: align them with the last positions, then shift.
                logits = logits[:, -labels.size(1) :, :]
                loss = causal_lm_loss(logits, labels)
        else:
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
                return_dict=True,
                **kw,
            )
            logits, loss = out.logits, out.loss
        return loss, logits, out

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> Blip2ForConditionalGenerationModelOutput:
        """image_embeds (ours): the vision model's output for these images, computed earlier; the
        vision model is then skipped (pixel_values may be None) and vision_outputs is None."""
        out_kw = {}
        if output_attentions is not None:
            out_kw["output_attentions"] = output_attentions
        if output_hidden_states is not None:
            out_kw["output_hidden_states"] = output_hidden_states
        vision_out, qformer_out, lm_inputs = self._image_to_lm(pixel_values, interpolate_pos_encoding, image_embeds, **out_kw)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self._merge(input_ids, inputs_embeds, lm_inputs)
        loss, logits, lm_out = self._lm_forward(
            embeds, attention_mask, decoder_input_ids, decoder_attention_mask, labels, **out_kw
        )
        out = Blip2ForConditionalGenerationModelOutput(
            loss=loss, logits=logits, vision_outputs=vision_out, qformer_outputs=qformer_out, language_model_outputs=lm_out
        )
        return out if return_dict is not False else out.to_tuple()


class Blip2Model(_Blip2WithLM):
    """Vision encoder + Q-Former + language model, with feature getters for each stage."""

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        legacy_output: bool = True,
        **kwargs,
    ):
        """Hidden states of the language model's text side: the decoder stack for OPT (after
        project_out), the encoder for T5. legacy_output=False returns the tensor alone."""
        h = self.language_model.text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return h if legacy_output else h.last_hidden_state

    def get_image_features(
        self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False, legacy_output: bool = True, **kwargs
    ):
        """The vision encoder's output (BaseModelOutputWithPooling); legacy_output=False → last_hidden_state."""
        out = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        return out if legacy_output else out.last_hidden_state

    def get_qformer_features(
        self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False, legacy_output: bool | None = None
    ):
        """The Q-Former's query outputs (B, Q, Cq).

        By default this is the tensor, as transformers 5.8.0 returns; legacy_output=True gives
        the full Q-Former output object instead.
        """
        _, qformer_out, _ = self._image_to_lm(pixel_values, interpolate_pos_encoding)
        return qformer_out if legacy_output else qformer_out.last_hidden_state


class Blip2ForConditionalGeneration(_Blip2WithLM):
    """Captioning and visual question answering: image (+ optional prompt) -> text."""

    def get_image_features(
        self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False, legacy_output: bool = True, **kwargs
    ):
        """Projected query outputs (pooler_output, (B, Q, C_lm)) with the vision and Q-Former outputs."""
        vision_out, qformer_out, lm_inputs = self._image_to_lm(pixel_values, interpolate_pos_encoding, **kwargs)
        if not legacy_output:
            return lm_inputs
        return BaseModelOutputWithVisionQformerOutputs(
            last_hidden_state=vision_out.last_hidden_state,
            pooler_output=lm_inputs,
            hidden_states=vision_out.hidden_states,
            attentions=vision_out.attentions,
            vision_outputs=vision_out,
            qformer_outputs=qformer_out,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        interpolate_pos_encoding: bool = False,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate text for each image. Returns what the reference returns: for OPT the prompt
        ids followed by the new ids; for T5 the decoder ids starting with the start token."""
        _, _, lm_inputs = self._image_to_lm(pixel_values, interpolate_pos_encoding)
        B = pixel_values.shape[0]
        if inputs_embeds is None and input_ids is None:
            # No prompt: the image placeholders then BOS, as the reference starts.
            if self.config.text_config.bos_token_id is None:
                raise ValueError("text_config.bos_token_id is not set: pass a prompt (input_ids) to generate from")
            start = image_prompt([self.config.text_config.bos_token_id], self.config.num_query_tokens,
                                 self.config.image_token_index)
            input_ids = torch.tensor([start], dtype=torch.long, device=lm_inputs.device).repeat(B, 1)
        if attention_mask is None:
            ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        embeds = self._merge(input_ids, inputs_embeds, lm_inputs)

        cfg, history = self._decode_config(embeds, input_ids, generation_config, generate_kwargs)
        return self._run_decode(embeds, attention_mask, history, cfg)

    @torch.no_grad()
    def generate_many(
        self,
        pixel_values: torch.FloatTensor,
        prompts,
        attention_mask: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs,
    ) -> list[torch.LongTensor]:
        """Several prompts (questions) about one image, in one batch: the image is encoded once, and
        with OPT the prompts' common prefix (the image queries, BOS and any shared template text)
        goes through the language model once, its keys/values shared by every row.

        pixel_values (1, 3, H, W); prompts: a list of id sequences (each as Blip2Processor makes
        them with the image: placeholders first), or a (k, T) tensor with its attention_mask.
        Returns one LongTensor per prompt, shaped as `generate` returns it for that prompt alone:
        (num_return_sequences, L). Pass max_new_tokens rather than max_length, which would count
        the padded batch's length.
        """
        if pixel_values.shape[0] != 1:
            raise ValueError(f"generate_many takes one image; got a batch of {pixel_values.shape[0]}")
        rows = prompt_rows(prompts, attention_mask)
        if not rows or not all(rows):
            raise ValueError("generate_many needs at least one prompt, and no empty ones")
        _, _, lm_inputs = self._image_to_lm(pixel_values, interpolate_pos_encoding)  # (1, Q, C)
        tc = self.config.text_config
        dec_only = self.config.use_decoder_only_language_model
        P = common_prefix(rows) if dec_only else 0
        ids, am = layout(rows, tc.pad_token_id if tc.pad_token_id is not None else 0, P, dec_only)
        ids, am = ids.to(lm_inputs.device), am.to(lm_inputs.device)
        embeds = self._merge(ids, None, lm_inputs.expand(len(rows), -1, -1))
        cfg, history = self._decode_config(embeds, ids, generation_config, generate_kwargs)
        out = self._run_decode(embeds, am, history, cfg, shared_prefix=P)
        return split_answers(out, rows, history.shape[1], cfg.num_return_sequences or 1, special_tokens(cfg)[0], dec_only)

    def _decode_config(self, embeds, input_ids, generation_config, kwargs):
        """The effective GenerationConfig, and the token history the search starts from and the
        result starts with (what the reference returns): for OPT the prompt ids (none when only
        embeddings were given); for T5 the decoder start token."""
        B = embeds.shape[0]
        tc = self.config.text_config
        dec_only = self.config.use_decoder_only_language_model
        if dec_only:
            history = input_ids if input_ids is not None else embeds.new_zeros((B, 0), dtype=torch.long)
        cfg, unused = prepare_generation_config(
            generation_config, self.generation_config,
            prompt_len=history.shape[1] if dec_only else 1,  # T5: the decoder start token
            inputs_embeds_len=embeds.shape[1] if dec_only else None,
            max_position_embeddings=tc.max_position_embeddings if dec_only else None,
            **kwargs,
        )
        if unused:
            raise TypeError(f"generate() got arguments that are not generation parameters: {sorted(unused)}")
        if dec_only:
            _check_positions(embeds.shape[1], max(cfg.max_length - history.shape[1], 0), self.config)
        else:
            start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.bos_token_id
            history = torch.full((B, 1), start, dtype=torch.long, device=embeds.device)
        return cfg, history

    def _run_decode(self, embeds, attention_mask, history, cfg, shared_prefix: int = 0) -> torch.LongTensor:
        """Prefill the language model once on `embeds` (B, T, C) and run the search (generation/search.py)."""
        max_new = max(cfg.max_length - history.shape[1], 0)
        extra = {"shared_prefix": shared_prefix} if shared_prefix else {}
        session = self.language_model.start(embeds, attention_mask, max_new, **extra)
        return decode(session, history, cfg)


def _check_positions(prompt: int, new: int, config: Blip2Config) -> None:
    """A decoder-only LM has max_position_embeddings positions: the prompt (image queries included)
    and every new token but the last (which is never fed back) must fit, or the position lookup
    fails deep inside the model."""
    limit = config.text_config.max_position_embeddings
    if prompt + max(new, 1) - 1 > limit:
        Q = config.num_query_tokens
        raise ValueError(
            f"prompt of {prompt} positions ({Q} image queries + {prompt - Q} text tokens) + max_new_tokens "
            f"{new} exceeds the language model's max_position_embeddings ({limit}); shorten the prompt "
            f"(at most {limit - Q} text tokens in all) or ask for fewer new tokens"
        )
