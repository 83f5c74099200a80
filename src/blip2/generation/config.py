"""GenerationConfig: the decoding parameters of transformers' `generation_config.json`, and
`prepare_generation_config`, which merges them with the model's defaults and the call's keyword
arguments and resolves the lengths, as the reference's `generate` does."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.hub import resolve_dir

GENERATION_CONFIG_NAME = "generation_config.json"

# Every field the reference's GenerationConfig knows, all defaulting to None: a None means "not
# set", which is what lets generate() tell a user's max_length from the built-in one. The global
# defaults below are filled in only at generate time.
FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time",
    "stop_strings", "do_sample", "num_beams", "use_cache", "cache_implementation", "cache_config",
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "sequence_bias", "token_healing", "guidance_scale", "watermarking_config",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "output_logits", "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id",
    "encoder_no_repeat_ngram_size", "decoder_start_token_id", "is_assistant", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "prompt_lookup_num_tokens",
    "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "compile_config", "disable_compile", "continuous_batching_config", "low_memory", "penalty_alpha",
    "dola_layers", "diversity_penalty", "num_beam_groups", "constraints", "force_words_ids",
    "prefill_chunk_size", "_from_model_config", "transformers_version",
    "compile",  # blip2's own: True or a torch.compile mode runs the decode step compiled (never saved)
)

# What an unset field means at generate time (the reference's global defaults).
DEFAULTS: dict[str, Any] = dict(
    max_length=20, min_length=0, do_sample=False, use_cache=True, early_stopping=False, num_beams=1,
    temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, length_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, num_return_sequences=1,
    output_scores=False, return_dict_in_generate=False, remove_invalid_values=False,
    epsilon_cutoff=0.0, eta_cutoff=0.0, encoder_repetition_penalty=1.0, num_assistant_tokens=20,
    num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.4,
    assistant_lookbehind=10, target_lookbehind=10, num_beam_groups=1, diversity_penalty=0.0,
)

_NOT_SERIALIZED = ("_commit_hash", "_original_object_hash")
_METADATA = ("_from_model_config", "_commit_hash", "_original_object_hash", "transformers_version")


class GenerationConfig:
    """Decoding parameters, read from / written to a checkpoint's `generation_config.json`.

    Unknown keys are kept as attributes and written back, so load -> save reproduces the file.
    """

    def __init__(self, **kwargs):
        for k in FIELDS:
            setattr(self, k, kwargs.pop(k, None))
        kwargs.pop("_commit_hash", None)
        if not self._from_model_config:
            for k, v in kwargs.items():  # custom entries ride along
                setattr(self, k, v)
        elif kwargs.get("force_bos_token_to_be_generated", False):  # old BART-style configs
            self.forced_bos_token_id = self.bos_token_id
        self.validate()

    def validate(self) -> None:
        """Raise on parameter combinations the reference rejects outright."""
        if self.early_stopping not in {None, True, False, "never"}:
            raise ValueError(f"`early_stopping` must be a boolean or 'never', but is {self.early_stopping}.")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {self.max_new_tokens}.")
        if self.num_return_sequences is not None and self.num_return_sequences > 1:
            if self.num_beams is None or self.num_beams == 1:
                if not self.do_sample:
                    raise ValueError(
                        "Greedy methods (do_sample != True) without beam search do not support "
                        f"`num_return_sequences` different than 1 (got {self.num_return_sequences})."
                    )
            elif self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to "
                    f"`num_beams` ({self.num_beams})."
                )

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs) -> dict:
        """Set the attributes named in kwargs; return the kwargs that are not attributes (unused).

        defaults_only: only fill attributes that are unset (None). allow_custom_entries: unknown
        keys become attributes instead of being returned.
        """
        used = []
        for k, v in kwargs.items():
            if k in vars(self):
                if not defaults_only or getattr(self, k) is None:
                    setattr(self, k, v)
                    used.append(k)
            elif allow_custom_entries:
                setattr(self, k, v)
                used.append(k)
        self.validate()
        return {k: v for k, v in kwargs.items() if k not in used}

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in _NOT_SERIALIZED}

    def to_diff_dict(self) -> dict[str, Any]:
        """Only what differs from a fresh GenerationConfig(): what generation_config.json holds."""
        known = set(FIELDS)
        return {k: v for k, v in self.to_dict().items() if (k not in known or v is not None)}

    def to_json_string(self, use_diff: bool = True) -> str:
        d = self.to_diff_dict() if use_diff else self.to_dict()
        d.pop("compile_config", None)
        d.pop("compile", None)  # a run-time choice, not a property of the checkpoint
        return json.dumps(_str_keys(d), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained expects a directory")
        os.makedirs(save_directory, exist_ok=True)
        path = Path(save_directory) / (config_file_name or GENERATION_CONFIG_NAME)
        path.write_text(self.to_json_string(use_diff=True), encoding="utf-8")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "GenerationConfig":
        return_unused = kwargs.pop("return_unused_kwargs", False)
        cfg = cls(**{**config_dict, **kwargs})
        unused = cfg.update(**kwargs)
        return (cfg, unused) if return_unused else cfg

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs) -> "GenerationConfig":
        """Read `generation_config.json` from a checkpoint directory, a file, or a hub id."""
        name = config_file_name or GENERATION_CONFIG_NAME
        p = Path(os.path.expanduser(str(path_or_id)))
        if p.is_file():
            f = p
        else:
            f = resolve_dir(str(path_or_id), [name]) / name
        if not f.exists():
            raise FileNotFoundError(f"no {name} in {f.parent}")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON ({e})") from e
        if kwargs.pop("_from_model_config", False):
            return cls.from_model_config(d)
        return cls.from_dict(d, **kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "GenerationConfig":
        """The generation defaults a model config implies (special tokens, and any generation keys
        set on the text/decoder sub-config), as the reference builds `model.generation_config`."""
        d = model_config if isinstance(model_config, dict) else model_config.to_dict()
        d = {k: v for k, v in d.items() if v is not None and k != "_from_model_config"}
        cfg = cls(**d, _from_model_config=True)
        if isinstance(model_config, dict):
            text = next((model_config[k] for k in ("decoder", "generator", "text_config") if model_config.get(k)),
                        model_config)
        else:
            text = getattr(model_config, "text_config", None) or getattr(model_config, "decoder", None) or model_config
            text = text.to_dict()
        for k in list(vars(cfg)):
            if k in text and getattr(cfg, k) is None:
                setattr(cfg, k, text[k])
        flags = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
        if not cfg.return_dict_in_generate and any(getattr(cfg, f, False) for f in flags):
            cfg.return_dict_in_generate = True
        return cfg

    def __eq__(self, other) -> bool:
        if not isinstance(other, GenerationConfig):
            return False
        strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in _METADATA}  # noqa: E731
        return strip(self) == strip(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _str_keys(o):
    if isinstance(o, dict):
        return {str(k): _str_keys(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_str_keys(v) for v in o]
    return o


def prepare_generation_config(
    generation_config: GenerationConfig | None = None,
    model_generation_config: GenerationConfig | None = None,
    *,
    prompt_len: int,
    inputs_embeds_len: int | None = None,
    max_position_embeddings: int | None = None,
    **kwargs,
) -> tuple[GenerationConfig, dict]:
    """Merge the parameters as the reference does and resolve the lengths.

    Priority: kwargs > `generation_config` > `model_generation_config` > global defaults.
    Returns (config, unused kwargs). In the returned config `max_length` / `min_length` are total
    lengths of the token history (`prompt_len` + new tokens), ready for `decode`.

    model_generation_config: the LM's defaults (special tokens ...). transformers 5.8's Blip2
        generate calls `language_model.generate`, whose config is
        `GenerationConfig.from_model_config(config.text_config)`: the checkpoint's
        generation_config.json is not consulted there.

    prompt_len: length T0 of the `input_ids` given to `decode` (decoder-only: the prompt ids,
        incl. image placeholders and padding, 0 when the prompt is only embeddings;
        encoder-decoder: 1, the decoder start token).
    inputs_embeds_len: decoder-only LMs prefilled from `inputs_embeds`: its length. When it differs
        from `prompt_len` (embeddings without ids), a user-set max_length / min_length count the
        embedded prompt and are shortened by it. None for id prompts and for encoder-decoder LMs.
    max_position_embeddings: the LM config's; caps the *default* max_length (OPT yes, T5 none).
    """
    cfg = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if model_generation_config is not None:
        cfg.update(**model_generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    default_max = cfg.max_length is None and kwargs.get("max_length") is None
    cfg.update(**DEFAULTS, defaults_only=True)
    unused = cfg.update(**kwargs)

    embeds_only = inputs_embeds_len is not None and inputs_embeds_len != prompt_len
    if cfg.max_new_tokens is not None:
        cfg.max_length = cfg.max_new_tokens + prompt_len
    elif embeds_only and not default_max:
        cfg.max_length -= inputs_embeds_len
    elif default_max:  # 20 new tokens by default
        cfg.max_length = cfg.max_length + prompt_len
        if max_position_embeddings is not None:
            cfg.max_length = min(cfg.max_length, max_position_embeddings)
    if cfg.min_new_tokens is not None:
        cfg.min_length = cfg.min_new_tokens + prompt_len
    elif embeds_only:
        cfg.min_length = max(cfg.min_length - inputs_embeds_len, 0)
    return cfg, unused


def special_tokens(cfg: GenerationConfig) -> tuple[list[int] | None, int | None]:
    """(eos ids or None, pad id): what stops a row and what fills it once it has stopped."""
    eos = cfg.eos_token_id
    if eos is not None:
        eos = torch.as_tensor(eos).flatten().tolist()
    pad = cfg.pad_token_id
    if pad is None and eos:  # open-end generation pads finished rows with the (first) eos
        pad = eos[0]
    return eos, pad
