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
