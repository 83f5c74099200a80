"""Output containers with the field names the reference documents.

An output reads like a dataclass (`out.logits`), like a dict (`out["logits"]`) and like a tuple
of its non-None fields (`out[0]`, `out.to_tuple()`), so code written against the docs works.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput(OrderedDict):
    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                super().__setitem__(f.name, v)

    def __getitem__(self, k):
        if isinstance(k, str):
            return dict(self.items())[k]
        return self.to_tuple()[k]

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if value is not None and name in {f.name for f in fields(self)}:
            super().__setitem__(name, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __iter__(self):  # iterate keys like a dict
        return iter(list(self.keys()))

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())


def _out(cls):
    """Make a ModelOutput dataclass whose fields all default to None."""
    return dataclass(eq=False, repr=True)(cls)


T = torch.FloatTensor | None


@_out
class BaseModelOutput(ModelOutput):
    last_hidden_state: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@_out
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@_out
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: tuple | None = None
    past_key_values: Any = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None


@_out
class BaseModelOutputWithVisionQformerOutputs(ModelOutput):
    """get_image_features of the generation model: projected queries plus what produced them."""

    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    vision_outputs: Any = None
    qformer_outputs: Any = None


@_out
class CausalLMOutputWithPast(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@_out
class Seq2SeqLMOutput(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: T = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


@_out
class Blip2ForConditionalGenerationModelOutput(ModelOutput):
    loss: T = None
    logits: T = None
    vision_outputs: Any = None
    qformer_outputs: Any = None
    language_model_outputs: Any = None

    def to_tuple(self):
        return tuple(
            self[k] if k not in ("vision_outputs", "qformer_outputs", "language_model_outputs") else self[k].to_tuple()
            for k in self.keys()
        )


@_out
class Blip2ImageTextMatchingModelOutput(ModelOutput):
    loss: T = None
    logits_per_image: T = None
    logits_per_text: T = None
    text_embeds: T = None
    image_embeds: T = None
    text_model_output: Any = None
    vision_model_output: Any = None

    def to_tuple(self):
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else self[k].to_tuple()
            for k in self.keys()
        )


@_out
class Blip2TextModelOutput(ModelOutput):
    text_embeds: T = None
    last_hidden_state: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@_out
class Blip2VisionModelOutput(ModelOutput):
    image_embeds: T = None
    last_hidden_state: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def output_flags(config, output_attentions, output_hidden_states, return_dict) -> tuple[bool, bool, bool]:
    """A call's (output_attentions, output_hidden_states, return_dict), each defaulting to the config's."""
    return (
        config.output_attentions if output_attentions is None else output_attentions,
        config.output_hidden_states if output_hidden_states is None else output_hidden_states,
        config.return_dict if return_dict is None else return_dict,
    )
