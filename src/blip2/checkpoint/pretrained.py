"""PreTrainedModel: config, dtype and device, weight ties, init, from_pretrained and save_pretrained
in the Hugging Face layout.

Our modules carry the same attribute names as the reference's, so a checkpoint key is a module
path and no per-key renaming is needed (reader.KEY_RENAMES holds the few spellings older files
use). from_pretrained builds the model on the meta device and hands it to loading.py, which reads
the files (reader.py) and runs the load hooks other parts register; `generation_config.json`
is read back as save_pretrained writes it, for a model that has a `generation_config`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .configuration import CONFIG_NAME, PretrainedConfig
from .hub import resolve_dir
from .loading import LoadContext, load_weights
from .reader import SAFE_INDEX, SAFE_WEIGHTS, CheckpointError, Reader, checkpoint_files

__all__ = ["CheckpointError", "PreTrainedModel", "as_dtype", "checkpoint_files"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def as_dtype(d: Any) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    s = str(d).replace("torch.", "")
    if s not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of {sorted(set(DTYPES))} or 'auto'")
    return DTYPES[s]


class PreTrainedModel(nn.Module):
    """Base of every model class: config, dtype/device, from_pretrained and save_pretrained."""

    config_class: type[PretrainedConfig] = PretrainedConfig
    # The prefix this class's keys carry inside a composite checkpoint (e.g. "vision_model."
    # for Blip2VisionModel); stripped when the checkpoint is a full BLIP-2 one.
    part_prefix: str = ""
    # Modules kept in fp32 when loading in float16, as the reference does.
    _keep_in_fp32_modules: tuple[str, ...] = ()
    # target key -> source key, for weights that are the same tensor (not stored twice).
    _tied_weights_keys: dict[str, str] = {}
    # True for a language model that decodes token by token (models/lm.py): each step reads all of
    # its weights, so a runtime may lay them out for streaming (found inside composite models too).
    decodes_tokens: bool = False
    main_input_name = "pixel_values"

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config

    # --- properties ---
    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed" in name):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    def tied_weights(self) -> dict[str, str]:
        """Active ties for this config (subclasses may drop some, e.g. untied Flan-T5 heads)."""
        return dict(self._tied_weights_keys)

    def fit_to_checkpoint(self, keys: Iterable[str]) -> None:
        """Adjust the model (still on meta) to what a checkpoint stores before it loads; keys are
        relative to this model. Nothing to adjust here (T5 keeps its head tied only when the file
        stores none)."""

    def tie_weights(self) -> None:
        for tgt, src in self.tied_weights().items():
            *mpath, name = tgt.split(".")
            mod = self.get_submodule(".".join(mpath))
            setattr(mod, name, self.get_parameter(src))

    # --- initialisation of a model built from a config (not from a checkpoint) ---
    def post_init(self) -> None:
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, m: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- loading ---
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        config: PretrainedConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        quantize: str | None = None,
        **config_overrides,
    ):
        """Load a checkpoint directory or hub id written in the Hugging Face layout.

        dtype: None or "auto" keeps the checkpoint's dtype (the config's `dtype` if set);
        a torch dtype (or its name) casts floating weights to it. device: where the weights go.
        quantize: "int8" / "int4" (/ "int4-64", "int4-128": group size) weight-only for the
        language model's linear layers (backends/cpu/quant.py); a checkpoint saved quantized
        reloads as such.
        """
        if dtype is None:
            dtype = torch_dtype
        bnb = _bitsandbytes_mode(config_overrides)
        if bnb is not None:
            if quantize is not None and quantize.partition("-")[0] != bnb:
                raise ValueError(f"quantize={quantize!r} contradicts load_in_{bnb[3:]}bit=True; pass one of them")
            quantize = quantize or bnb
        if device is None and device_map is not None:
            device = _device_from_map(device_map)
        d = resolve_dir(str(pretrained_model_name_or_path))
        if config is None:
            if not (d / CONFIG_NAME).exists():
                raise CheckpointError(f"no {CONFIG_NAME} in {d}: is this a model checkpoint directory?")
            config = cls.config_class.from_json_file(d / CONFIG_NAME)
        for k, v in config_overrides.items():
            setattr(config, k, v)
        reader = Reader(*checkpoint_files(d))

        if dtype is None or dtype == "auto":
            dtype = as_dtype(getattr(config, "dtype", None)) or _first_float_dtype(reader)
        dtype = as_dtype(dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")

        with torch.device("meta"):
            model = cls(config)
        if bnb is not None:
            if not any(getattr(m, "decodes_tokens", False) for m in model.modules()):
                raise NotImplementedError(
                    f"load_in_{bnb[3:]}bit: bitsandbytes quantization is not supported by blip2, and its own "
                    f"{bnb} quantization applies to a language model, which {cls.__name__} has none of; "
                    "load without it (dtype=torch.bfloat16 halves the memory)")
            warnings.warn(f"load_in_{bnb[3:]}bit=True loads blip2's own {bnb} weight-only quantization of the "
                          "language model (quantize=\"" + bnb + "\"); its numerics differ from bitsandbytes'",
                          stacklevel=2)
        ctx = LoadContext(model, reader, d, dtype, device, {} if quantize is None else {"quantize": quantize})
        try:
            load_weights(ctx)
        finally:
            ctx.reader.close()
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:  # as save_pretrained wrote it
                model.generation_config = type(gen).from_pretrained(d)
            except FileNotFoundError:  # none saved: the defaults from the model's config stay
                pass
        model.eval()
        return model

    # --- saving ---
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        **kwargs,
    ) -> None:
        from safetensors.torch import save_file

        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        tied = set(self.tied_weights())
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in tied}
        cfg = self.config
        cfg.architectures = [type(self).__name__]
        cfg.dtype = str(self.dtype).replace("torch.", "")
        cfg.save_pretrained(d)
        gen = getattr(self, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(d)
        for old in list(d.glob("model*.safetensors")) + [d / SAFE_INDEX]:
            if old.exists():
                old.unlink()
        limit = _parse_size(max_shard_size)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if shards[-1] and size + n > limit:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += n
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(d / SAFE_WEIGHTS), metadata=meta)
            return
        weight_map, total = {}, 0
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(d / name), metadata=meta)
            for k, v in sh.items():
                weight_map[k] = name
                total += v.numel() * v.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (d / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")



def _bitsandbytes_mode(options: dict) -> str | None:
    """"int8" / "int4" for the transformers flags load_in_8bit / load_in_4bit (given directly or in
    a quantization_config object or dict), popped from `options`; None when neither is set."""
    flags = {f: bool(options.pop(f, False)) for f in ("load_in_8bit", "load_in_4bit")}
    qc = options.pop("quantization_config", None)
    if qc is not None:
        for f in flags:
            flags[f] |= bool(qc.get(f, False) if isinstance(qc, dict) else getattr(qc, f, False))
        if not any(flags.values()):
            raise NotImplementedError(f"quantization_config {qc!r}: blip2 supports only load_in_8bit / load_in_4bit "
                                      "(its own int8 / int4), or quantize=\"int8\" / \"int4\"")
    if all(flags.values()):
        raise ValueError("load_in_8bit and load_in_4bit are both set; pass one of them")
    return "int8" if flags["load_in_8bit"] else "int4" if flags["load_in_4bit"] else None


def _device_from_map(device_map) -> torch.device | None:
    """One device for the whole model: "cpu", "cuda:0", 0, {"": 0} or "auto" (CUDA if present)."""
    if isinstance(device_map, dict):
        devs = set(device_map.values())
        if len(devs) != 1:
            raise NotImplementedError(f"device_map {device_map}: blip2 places the whole model on one device")
        device_map = devs.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device("cuda", device_map) if isinstance(device_map, int) else torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map={device_map!r} names no device; pass device=\"cpu\" or \"cuda\" instead") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} places the model on CUDA, but this machine has no CUDA device; "
                         "drop device_map (or pass device=\"cpu\")")
    return dev


def _first_float_dtype(reader: Reader) -> torch.dtype:
    for k in reader.keys():
        if reader.is_float(k):
            return reader.dtype(k)
    return torch.float32


def _parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", s, re.I)
    if not m:
        raise ValueError(f"max_shard_size {s!r}: use bytes or a size like '5GB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)
