"""Configs: documented defaults, config.json round-trips written by transformers, unknown keys kept."""

import json

import pytest

from blip2 import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config

import hf_tiny


def test_documented_defaults():
    v = Blip2VisionConfig()
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1408, 6144, 39, 16)
    assert (v.image_size, v.patch_size, v.layer_norm_eps, v.qkv_bias) == (224, 14, 1e-6, True)
    q = Blip2QFormerConfig()
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.intermediate_size) == (768, 12, 12, 3072)
    assert (q.cross_attention_frequency, q.encoder_hidden_size, q.vocab_size, q.layer_norm_eps) == (2, 1408, 30522, 1e-12)
    c = Blip2Config()
    assert (c.num_query_tokens, c.image_text_hidden_size, c.image_token_index) == (32, 256, None)
    assert c.text_config.model_type == "opt" and c.use_decoder_only_language_model


@pytest.mark.parametrize("text", ["opt", "t5", None])
def test_roundtrip_of_transformers_config_json(tmp_path, text):
    hf = hf_tiny.blip2_config(text)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    ours = Blip2Config.from_pretrained(tmp_path)
    assert ours.to_dict() == raw  # nothing dropped, nothing added
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == raw
    # same values the reference derives
    assert ours.use_decoder_only_language_model == hf.use_decoder_only_language_model
    assert ours.is_encoder_decoder == hf.is_encoder_decoder
    assert ours.qformer_config.encoder_hidden_size == hf.vision_config.hidden_size


def test_unknown_keys_kept_and_aliases():
    c = Blip2Config.from_dict({"model_type": "blip-2", "my_key": [1, 2], "image_token_id": 7,
                               "text_config": {"model_type": "t5", "custom": "x", "tie_word_embeddings": False}})
    assert c.image_token_index == 7 and c.image_token_id == 7
    d = c.to_dict()
    assert d["my_key"] == [1, 2] and d["text_config"]["custom"] == "x"
    assert isinstance(c.text_config, T5Config) and c.text_config.tie_word_embeddings is False
    assert c.text_config.hidden_size == c.text_config.d_model  # alias
    assert not c.use_decoder_only_language_model and c.is_encoder_decoder


def test_t5_derived_activation():
    t = T5Config(feed_forward_proj="gated-gelu")
    assert t.dense_act_fn == "gelu_new" and t.is_gated_act
    assert T5Config().dense_act_fn == "relu" and not T5Config().is_gated_act
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="a-b-c")


def test_opt_proj_dim_default():
    assert OPTConfig(hidden_size=64).word_embed_proj_dim == 64


def test_wrong_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "hidden_size": 3}))
    with pytest.raises(ValueError, match="llava"):
        Blip2Config.from_pretrained(tmp_path)


def test_unsupported_text_model_is_named():
    with pytest.raises(ValueError, match="gpt_neox"):
        Blip2Config(text_config={"model_type": "gpt_neox"})


def test_from_vision_qformer_text_configs():
    c = Blip2Config.from_vision_qformer_text_configs(Blip2VisionConfig(hidden_size=64), Blip2QFormerConfig(), OPTConfig())
    assert c.qformer_config.encoder_hidden_size == 64
    c2 = Blip2Config.from_text_vision_configs(Blip2VisionConfig(), Blip2QFormerConfig(), T5Config())
    assert c2.is_encoder_decoder
