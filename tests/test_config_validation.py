"""A broken config.json gives one ConfigError naming the file and the key, never a deep traceback
or a model built with impossible shapes."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blip2 import Blip2Config, Blip2VisionConfig
from blip2.checkpoint.configuration import ConfigError


def _write(tmp_path, content) -> str:
    p = tmp_path / "config.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


@pytest.mark.parametrize("content, says", [
    ("", "not valid JSON"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "found list"),
    ("42", "found int"),
    ({"text_config": {"model_type": "llama"}}, "llama"),
    ({"text_config": {"model_type": "opt", "hidden_size": -96}}, "text_config.hidden_size"),
    ({"vision_config": {"num_hidden_layers": "3"}}, "vision_config.num_hidden_layers"),
    ({"qformer_config": {"hidden_dropout_prob": 3.0}}, "qformer_config.hidden_dropout_prob"),
    ({"num_query_tokens": 0}, "num_query_tokens"),
    ({"vision_config": {"layer_norm_eps": -1}}, "vision_config.layer_norm_eps"),
    ({"vision_config": {"qkv_bias": "yes"}}, "vision_config.qkv_bias"),
    ({"text_config": {"model_type": "opt", "eos_token_id": -2}}, "text_config.eos_token_id"),
])
def test_broken_config_names_file_and_key(tmp_path, content, says):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        Blip2Config.from_json_file(path)
    msg = str(e.value)
    assert path in msg and says in msg and "\n" not in msg


def test_published_shapes_still_load(tmp_path):
    # lists of eos ids, null pad ids, int where a float is documented: all valid
    cfg = Blip2Config.from_json_file(_write(tmp_path, {
        "text_config": {"model_type": "opt", "eos_token_id": [2, 50118], "pad_token_id": None, "dropout": 0},
        "vision_config": {"initializer_range": 1}, "num_query_tokens": 32}))
    assert cfg.text_config.eos_token_id == [2, 50118]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=8,
)
_KEYS = st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "image_size", "patch_size", "layer_norm_eps", "attention_dropout", "qkv_bias",
                         "hidden_act", "initializer_range", "model_type"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(over=st.dictionaries(_KEYS, _JSON, max_size=4))
def test_any_vision_config_is_accepted_or_refused_clearly(tmp_path, over):
    path = _write(tmp_path, over)
    try:
        cfg = Blip2VisionConfig.from_json_file(path)
    except ConfigError as e:
        assert str(e).startswith(path)
        return
    # accepted: every documented int field is a real int, sizes positive
    for k in ("hidden_size", "num_attention_heads", "intermediate_size", "image_size", "patch_size"):
        v = getattr(cfg, k)
        assert isinstance(v, int) and not isinstance(v, bool) and v >= 1
    assert isinstance(cfg.num_hidden_layers, int) and cfg.num_hidden_layers >= 0
