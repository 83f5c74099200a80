"""The config base: a bag of attributes read from and written to a checkpoint's `config.json`.

Every key found in the file is kept (known or not), so load -> save gives back the same file.
The model families' configs (models/config.py) subclass it with their documented defaults.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from .hub import resolve_dir

CONFIG_NAME = "config.json"


class ConfigError(ValueError):
    """A config whose content cannot describe a model; the message names the file and the key."""


# Integer fields that are sizes or counts of something that must exist (>= 1), and layer counts (>= 0).
_POSITIVE = ("size", "heads", "_dim", "d_model", "d_ff", "d_kv", "max_position", "num_query_tokens",
             "frequency", "num_buckets", "max_distance")
_LAYERS = ("layers",)


def _check_value(key: str, v: Any, default: Any) -> str | None:
    """Why v cannot stand for `key` (whose documented default is `default`), or None if it can."""
    if key.endswith(("token_id", "token_index", "_token_ids")):  # ids: None, >= 0, or a list of them
        ids = v if isinstance(v, list) else [v]
        ok = all(i is None or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in ids)
        return None if ok else f"{v!r} is not a token id"
    if default is None or v is None and not isinstance(default, (int, float)):
        return None
    if isinstance(default, bool):
        return None if isinstance(v, bool) else f"{v!r} is not true/false"
    if isinstance(default, int):
        if not isinstance(v, int) or isinstance(v, bool):
            return f"{v!r} is not an integer"
        if any(s in key for s in _LAYERS):
            return None if v >= 0 else f"{v} is negative"
        if any(s in key for s in _POSITIVE):
            return None if v >= 1 else f"{v} must be at least 1"
        return None
    if isinstance(default, float):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
            return f"{v!r} is not a finite number"
        if ("dropout" in key or "prob" in key) and not 0 <= v <= 1:
            return f"{v} is not in [0, 1]"
        if key.endswith("eps") and v <= 0:
            return f"{v} must be positive"
        return None if v >= 0 or "factor" in key else f"{v} is negative"
    if isinstance(default, str):
        return None if isinstance(v, str) else f"{v!r} is not a string"
    return None


class PretrainedConfig:
    model_type: str = ""
    defaults: dict[str, Any] = {}  # documented fields, dumped by to_dict
    sub_configs: dict[str, type] = {}  # name -> config class (text_config is resolved by model_type)
    attribute_map: dict[str, str] = {}  # alias -> real field name
    # model_types of composite configs this one may be read out of (a vision config from a "blip-2" file)
    nested_in: tuple[str, ...] = ()

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

    def check(self, where: str = "") -> None:
        """Raise ConfigError naming the first documented field whose value has the wrong type or an
        impossible value (a negative size, a layer count given as a string...), nested configs too."""
        for k, default in self.defaults.items():
            why = _check_value(k, getattr(self, k, None), default)
            if why is not None:
                raise ConfigError(f"{where}{k}: {why}")
        for k, v in vars(self).items():
            if isinstance(v, PretrainedConfig):
                v.check(f"{where}{k}.")

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
        if cls.model_type and mt and mt != cls.model_type and mt not in cls.nested_in:
            raise ValueError(
                f"config has model_type {mt!r} but {cls.__name__} expects {cls.model_type!r}: "
                "this checkpoint is for another architecture"
            )
        cfg = cls(**d)
        cfg.check()
        return cfg

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PretrainedConfig":
        """Read a config.json; every problem with it is a ConfigError that names the file."""
        try:
            d = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download the checkpoint's config.json") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, found {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "PretrainedConfig":
        p = Path(path)
        if p.is_file():
            cfg = cls.from_json_file(p)
            for k, v in kwargs.items():
                setattr(cfg, k, v)
            return cfg
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
