"""Configs for BLIP-2 and its parts, read from and written to the `config.json` of published checkpoints.

A config is a bag of attributes seeded with the documented defaults. Every key found in a
config.json is kept (known or not), so load -> save gives back the same file. Nested configs
(`vision_config`, `qformer_config`, `text_config`) become config objects of their own; the
text config's class is picked by its `model_type`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..checkpoint.configuration import CONFIG_NAME, PretrainedConfig  # noqa: F401


class Blip2VisionConfig(PretrainedConfig):
    model_type = "blip_2_vision_model"
    nested_in = ("blip-2",)
    defaults = dict(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        initializer_range=1e-10,
        qkv_bias=True,
    )

    @classmethod
    def from_dict(cls, d, **kwargs):
        if d.get("model_type") == "blip-2":
            d = d.get("vision_config") or {}
        return super().from_dict(d, **kwargs)


class Blip2QFormerConfig(PretrainedConfig):
    model_type = "blip_2_qformer"
    nested_in = ("blip-2",)
    defaults = dict(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        cross_attention_frequency=2,  # layer i has cross-attention when i % freq == 0
        encoder_hidden_size=1408,
        use_qformer_text_input=False,
    )

    @classmethod
    def from_dict(cls, d, **kwargs):
        if d.get("model_type") == "blip-2":
            d = d.get("qformer_config") or {}
        return super().from_dict(d, **kwargs)


class OPTConfig(PretrainedConfig):
    model_type = "opt"
    defaults = dict(
        vocab_size=50272,
        hidden_size=768,
        num_hidden_layers=12,
        ffn_dim=3072,
        max_position_embeddings=2048,
        do_layer_norm_before=True,
        _remove_final_layer_norm=False,
        word_embed_proj_dim=None,  # None -> hidden_size (no project_in/out)
        dropout=0.1,
        attention_dropout=0.0,
        num_attention_heads=12,
        activation_function="relu",
        layerdrop=0.0,
        init_std=0.02,
        use_cache=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        tie_word_embeddings=True,
    )

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size


class T5Config(PretrainedConfig):
    model_type = "t5"
    is_encoder_decoder = True
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }
    defaults = dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=None,
        num_heads=8,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        initializer_factor=1.0,
        feed_forward_proj="relu",
        use_cache=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: use 'gated-ACT' or 'ACT'")
        # derived from feed_forward_proj (and written to config.json, as the reference does)
        self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act[-1]
        self.is_gated_act = act[0] == "gated"


class LanguageModelFamily(NamedTuple):
    config: type[PretrainedConfig]
    module: str  # where the model class lives, imported when one is built (models/lm.py)
    model: str
    decoder_only: bool


# text_config.model_type -> its family. A new language model is a config class above, a model file
# and a line here.
LANGUAGE_MODELS: dict[str, LanguageModelFamily] = {
    "opt": LanguageModelFamily(OPTConfig, "blip2.models.opt", "OPTForCausalLM", decoder_only=True),
    "t5": LanguageModelFamily(T5Config, "blip2.models.t5", "T5ForConditionalGeneration", decoder_only=False),
}


def _sub(cls: type[PretrainedConfig], v) -> PretrainedConfig:
    if v is None:
        return cls()
    if isinstance(v, PretrainedConfig):
        return v
    return cls(**v)


class Blip2Config(PretrainedConfig):
    model_type = "blip-2"
    attribute_map = {"image_token_id": "image_token_index"}
    defaults = dict(
        num_query_tokens=32,
        image_text_hidden_size=256,
        image_token_index=None,
        initializer_factor=1.0,
        initializer_range=0.02,
    )

    def __init__(self, vision_config=None, qformer_config=None, text_config=None, **kwargs):
        object.__setattr__(self, "vision_config", _sub(Blip2VisionConfig, vision_config))
        object.__setattr__(self, "qformer_config", _sub(Blip2QFormerConfig, qformer_config))
        if isinstance(text_config, dict):
            mt = text_config.get("model_type", "opt")
            if mt not in LANGUAGE_MODELS:
                raise ValueError(
                    f"text_config.model_type {mt!r} is not supported; blip2 has language models for {sorted(LANGUAGE_MODELS)}"
                )
            text_config = LANGUAGE_MODELS[mt].config(**text_config)
        object.__setattr__(self, "text_config", _sub(OPTConfig, text_config))
        super().__init__(**kwargs)

    def __post_init__(self):
        # The Q-Former cross-attends to the ViT output, so its width follows the ViT's.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        family = LANGUAGE_MODELS.get(self.text_config.model_type)
        self.use_decoder_only_language_model = family is not None and family.decoder_only
        # Derived from the language model; written only when True, like the reference.
        self.__dict__.pop("is_encoder_decoder", None)
        if self.text_config.is_encoder_decoder:
            self.is_encoder_decoder = True

    @classmethod
    def from_vision_qformer_text_configs(cls, vision_config, qformer_config, text_config=None, **kwargs):
        return cls(vision_config=vision_config, qformer_config=qformer_config, text_config=text_config, **kwargs)

    from_text_vision_configs = from_vision_qformer_text_configs  # the name the docs' example uses
