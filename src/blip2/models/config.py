"""Configs for BLIP-2 and its parts, read from and written to the `config.json` of published checkpoints.

A config is a bag of attributes seeded with the documented defaults. Every key found in a
config.json is kept (known or not), so load -> save gives back the same file. Nested configs
(`vision_config`, `qformer_config`, `text_config`) become config objects of their own; the
text config's class is picked by its `model_type`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"


class PretrainedConfig:
    model_type: str = ""
    defaults: dict[str, Any] = {}  # documented fields, dumped by to_dict
    sub_configs: dict[str, type] = {}  # name -> config class (text_config is resolved by model_type)
    attribute_map: dict[str, str] = {}  # alias -> real field name

    # Settings every config answers to; they live on the class so to_dict only writes what was set.
    output_hidden_states = False
    output_attentions = False
    return_dict = True
    use_return_dict = True
    is_encoder_decoder = False
    tie_word_embeddings = True
    pad_token_id = None
    bos_token_id = None
    eos_token_id = None
    decoder_start_token_id = None

    def __init__(self, **kwargs):
        for k, v in self.defaults.items():
            object.__setattr__(self, k, copy.deepcopy(v))
        kwargs.pop("model_type", None)
        if "torch_dtype" in kwargs and "dtype" not in kwargs:  # older files
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        for k, v in kwargs.items():
            setattr(self, k, v)
        self.__post_init__()

    def __post_init__(self):
        pass

    # aliases (e.g. image_token_id -> image_token_index) read and write the real field
    def __setattr__(self, name, value):
        name = type(self).attribute_map.get(name, name)
        object.__setattr__(self, name, value)

    def __getattr__(self, name):  # only called when normal lookup fails
        real = type(self).attribute_map.get(name)
        if real is not None:
            return getattr(self, real)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __eq__(self, other):
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for k, v in vars(self).items():
            if k.startswith("_") and k not in self.defaults:
                continue
            out[k] = v.to_dict() if isinstance(v, PretrainedConfig) else copy.deepcopy(v)
        if self.model_type:
            out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json_string())

    @classmethod
    def from_dict(cls, d: dict[str, Any], **kwargs) -> "PretrainedConfig":
        d = {**d, **kwargs}
        mt = d.get("model_type")
        if cls.model_type and mt and mt != cls.model_type and not _is_nested_in(cls, mt, d):
            raise ValueError(
                f"config has model_type {mt!r} but {cls.__name__} expects {cls.model_type!r}: "
                "this checkpoint is for another architecture"
            )
        return cls(**d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PretrainedConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint's config.json") from e
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "PretrainedConfig":
        from ..checkpoint.hub import resolve_dir

        p = Path(path)
        if p.is_file():
            return cls.from_dict(json.loads(p.read_text()), **kwargs)
        d = resolve_dir(str(path), [CONFIG_NAME])
        f = d / CONFIG_NAME
        if not f.exists():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {d}: is this a model checkpoint directory?")
        cfg = cls.from_json_file(f)
        for k, v in kwargs.items():
            setattr(cfg, k, v)
        return cfg

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(Path(save_directory) / CONFIG_NAME)


def _is_nested_in(cls, model_type: str, d: dict) -> bool:
    # A vision / Q-Former config may be read out of a full "blip-2" config.json.
    return model_type == "blip-2" and cls in (Blip2VisionConfig, Blip2QFormerConfig)


class Blip2VisionConfig(PretrainedConfig):
    model_type = "blip_2_vision_model"
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


TEXT_CONFIGS: dict[str, type[PretrainedConfig]] = {"opt": OPTConfig, "t5": T5Config}
DECODER_ONLY = {"opt"}


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
            if mt not in TEXT_CONFIGS:
                raise ValueError(
                    f"text_config.model_type {mt!r} is not supported; blip2 has language models for {sorted(TEXT_CONFIGS)}"
                )
            text_config = TEXT_CONFIGS[mt](**text_config)
        object.__setattr__(self, "text_config", _sub(OPTConfig, text_config))
        super().__init__(**kwargs)

    def __post_init__(self):
        # The Q-Former cross-attends to the ViT output, so its width follows the ViT's.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.use_decoder_only_language_model = self.text_config.model_type in DECODER_ONLY
        # Derived from the language model; written only when True, like the reference.
        self.__dict__.pop("is_encoder_decoder", None)
        if self.text_config.is_encoder_decoder:
            self.is_encoder_decoder = True

    @classmethod
    def from_vision_qformer_text_configs(cls, vision_config, qformer_config, text_config=None, **kwargs):
        return cls(vision_config=vision_config, qformer_config=qformer_config, text_config=text_config, **kwargs)

    from_text_vision_configs = from_vision_qformer_text_configs  # the name the docs' example uses
