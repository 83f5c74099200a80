"""Loading and saving checkpoints in the Hugging Face layout.

Our modules carry the same attribute names as the reference's, so a checkpoint key is a module
path and no per-key renaming is needed; `KEY_RENAMES` holds the few spellings older files use.

Loading builds the model on the meta device (no memory), opens the safetensors files by mmap,
casts each tensor once to the requested dtype/device and assigns it into the module. Peak memory
stays near the size of the weights. A checkpoint that does not fit raises an error that names
the keys and the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends.cpu import kernels

from ..backends.cpu import ops
from .configuration import CONFIG_NAME, PretrainedConfig
from .hub import resolve_dir

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"

# Older spellings of a key -> today's. Applied to every key read, in order.
KEY_RENAMES: list[tuple[str, str]] = [
    (r"\.gamma$", ".weight"),  # pre-2020 LayerNorm names in some BERT-derived files
    (r"\.beta$", ".bias"),
]

# Top-level parts of the BLIP-2 checkpoints. A class that lacks a part skips its keys silently:
# that is how one checkpoint serves several classes (e.g. the projection models read a
# retrieval checkpoint). Keys outside these parts, or inside a part the class has, must fit.
BLIP2_PARTS = (
    "vision_model.",
    "query_tokens",
    "qformer.",
    "language_projection.",
    "language_model.",
    "embeddings.",
    "vision_projection.",
    "text_projection.",
    "itm_head.",
    "temp",  # stage-1 pre-training extras (pretrain.py); inference classes skip them
    "itg_head.",
)

# Keys that some writers include but which are derivable buffers, never weights.
_IGNORABLE = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq|masked_bias|attn\.bias)$")

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


class CheckpointError(ValueError):
    """The files on disk do not fit the model that was asked for."""


def _rename(k: str) -> str:
    for pat, rep in KEY_RENAMES:
        k = re.sub(pat, rep, k)
    return k


def checkpoint_files(d: Path) -> tuple[list[Path], str]:
    """The weight files of a checkpoint directory, and their format ('safetensors' or 'pt')."""
    for index, fmt in ((SAFE_INDEX, "safetensors"), (PT_INDEX, "pt")):
        if (d / index).exists():
            try:
                wm = json.loads((d / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{d / index} is not a valid shard index ({e})") from e
            files = [d / f for f in sorted(set(wm.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{d / index} lists shards that are not in {d}: {missing}; re-download them")
            return files, fmt
    if (d / SAFE_WEIGHTS).exists():
        return [d / SAFE_WEIGHTS], "safetensors"
    if (d / PT_WEIGHTS).exists():
        return [d / PT_WEIGHTS], "pt"
    raise CheckpointError(
        f"no weights in {d}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {PT_WEIGHTS} or {PT_INDEX}"
    )


class _Reader:
    """Key -> (file, lazy tensor getter) over all shards, opened by mmap."""

    def __init__(self, files: list[Path], fmt: str):
        self.where: dict[str, Path] = {}
        self._get: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self._handles = []
        for f in files:
            if fmt == "safetensors":
                from safetensors import safe_open

                try:
                    h = safe_open(str(f), framework="pt", device="cpu")
                except Exception as e:
                    raise CheckpointError(f"cannot read {f}: {e}. The file is damaged or not safetensors; re-download it") from e
                self._handles.append(h)
                for k in h.keys():
                    self._add(k, f, (lambda h=h, k=k: h.get_tensor(k)), (lambda h=h, k=k: h.get_slice(k)))
            else:
                try:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise CheckpointError(f"cannot read {f} as a weights-only PyTorch file: {e}") from e
                if "state_dict" in sd and isinstance(sd["state_dict"], dict):
                    sd = sd["state_dict"]
                for k, v in sd.items():
                    self._add(k, f, (lambda v=v: v), (lambda v=v: v))

    def _add(self, k, f, get, info):
        k = _rename(k)
        self.where[k] = f
        self._get[k] = get
        self._info[k] = info  # something with get_shape()/get_dtype() or a tensor: no data read

    def keys(self):
        return self.where.keys()

    def get(self, k) -> torch.Tensor:
        return self._get[k]()

    def shape(self, k) -> tuple[int, ...]:
        i = self._info[k]()
        return tuple(i.shape) if isinstance(i, torch.Tensor) else tuple(i.get_shape())

    def is_float(self, k) -> bool:
        i = self._info[k]()
        if isinstance(i, torch.Tensor):
            return i.is_floating_point()
        return i.get_dtype() in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8}


class _RowReader:
    """Reads row blocks of one tensor with plain file reads (pread), not through the mmap.

    Pages of an mmap stay in the process's resident set for as long as the mapping lives (the
    loaded embeddings and ViT keep it alive), so reading a weight through it that is then
    quantized or repacked would leave the original resident too. File reads go through the page
    cache, which is not ours, and the row buffer is freed once used. Faster than page faults, too.
    """

    def __init__(self, reader):
        self.reader = reader
        self._headers: dict[Any, dict[str, Any]] = {}
        self._files: dict[Any, Any] = {}

    def _entry(self, k: str):
        f = self.reader.where[k]
        if f not in self._headers:
            hdr: dict[str, Any] = {}
            if str(f).endswith(".safetensors"):
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    meta = json.loads(fh.read(n))
                for key, e in meta.items():
                    if key != "__metadata__" and e.get("dtype") in _ST_DTYPES:
                        hdr[_rename(key)] = (_ST_DTYPES[e["dtype"]], 8 + n + e["data_offsets"][0])
            self._headers[f] = hdr
        return f, self._headers[f].get(k)

    def rows(self, k: str, r0: int, r1: int, K: int, reuse: bool = False) -> torch.Tensor:
        """Rows [r0, r1) of tensor k, (r1 - r0, K). reuse: into a buffer kept by this reader, which
        the next reuse call overwrites (for data that is copied on at once; saves fresh memory,
        which on some VMs costs more to touch the first time than the read itself)."""
        f, e = self._entry(k)
        if e is None:  # a pytorch_model.bin (already mmapped by torch.load) or an odd dtype
            return self.reader.get(k)[r0:r1]
        dt, off = e
        size = torch.empty((), dtype=dt).element_size()
        n = (r1 - r0) * K * size
        if reuse:
            buf = self.buffer(n)
        else:
            buf = torch.empty(n, dtype=torch.uint8)
        if f not in self._files:
            self._files[f] = open(f, "rb", buffering=0)
        fh, mv, pos = self._files[f], memoryview(buf.numpy()), 0
        fh.seek(off + r0 * K * size)
        while pos < len(mv):
            got = fh.readinto(mv[pos:])
            if not got:
                raise EOFError(f"{f}: file ends inside {k}; re-download it")
            pos += got
        return buf.view(dt).reshape(r1 - r0, K)  # safetensors is little-endian, as is every CPU torch runs on

    def buffer(self, n: int | torch.Tensor) -> torch.Tensor:
        """The reused uint8 buffer, at least n bytes (or a tensor's size in bytes)."""
        if isinstance(n, torch.Tensor):
            n = n.numel() * n.element_size()
        if getattr(self, "_buf", None) is None or self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n]

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        self._buf = None


def _return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim). Packing while loading
    frees many weight-sized temporaries; glibc keeps such holes inside its heap resident, which
    measured +17-20% of the model's size for int8 / int4 loads."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _fmt_keys(keys, n=8) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:n])
    return s + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


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
        language model's linear layers (see quantize.py); a checkpoint saved quantized reloads as such.
        """
        if dtype is None:
            dtype = torch_dtype
        for flag in ("load_in_8bit", "load_in_4bit", "quantization_config"):
            if config_overrides.pop(flag, None):
                raise NotImplementedError(
                    f"{flag}: bitsandbytes quantization is not supported by blip2; load with "
                    "dtype=torch.bfloat16 (or float16 on a GPU) instead"
                )
        if device is None and device_map is not None:
            device = _device_from_map(device_map)
        d = resolve_dir(str(pretrained_model_name_or_path))
        if config is None:
            if not (d / CONFIG_NAME).exists():
                raise CheckpointError(f"no {CONFIG_NAME} in {d}: is this a model checkpoint directory?")
            config = cls.config_class.from_json_file(d / CONFIG_NAME)
        for k, v in config_overrides.items():
            setattr(config, k, v)
        files, fmt = checkpoint_files(d)
        reader = _Reader(files, fmt)

        if dtype is None or dtype == "auto":
            dtype = as_dtype(getattr(config, "dtype", None)) or _first_float_dtype(reader)
        dtype = as_dtype(dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")

        with torch.device("meta"):
            model = cls(config)
        lm_cfg = getattr(getattr(model, "language_model", None), "config", None)
        if quantize is not None or getattr(lm_cfg, "quantization", None):
            from ..backends.cpu.quantize import load_and_quantize

            load_and_quantize(model, reader, d, dtype, device, quantize)
        else:
            model._load_from(reader, d, dtype, device)
        model.eval()
        return model

    def _fp32_keep(self, key: str, dtype: torch.dtype) -> bool:
        if dtype != torch.float16:
            return False
        return any(key == m or key.startswith(m + ".") or f".{m}." in f".{key}" for m in self._keep_in_fp32_modules)

    def _pack_plan(self, dtype: torch.dtype, device: torch.device) -> tuple[dict, dict, list]:
        """The weights to load block-packed for kernels.c: on CPU, inside the language model (the
        weights decode steps stream), of layers that can be packed (kernels.Packable) in the dtype
        they will have, and not tied to another weight (whose user reads it row-major).

        Returns ({key: block}, {key: (group, first row, group rows, dtype)}, [layer]): the second
        names the weights to load back to back into one buffer per group, the layers a module lists
        in `fuse_packed` (kernels.fused_linear then serves them with one kernel call); the third, the
        layers whose weight is tied but packable, which keep a packed copy (Packable.packed_copy)."""
        if device.type != "cpu" or not kernels.available():
            return {}, {}, []
        lm = getattr(self, "language_model", None)
        pre = "language_model." if lm is not None else ""
        if lm is None and not hasattr(self, "lm_head"):
            return {}, {}, []
        tied = self.tied_weights()
        tied = set(tied) | set(tied.values())
        plan, final, copies = {}, {}, []
        root = lm if lm is not None else self
        for name, m in root.named_modules():
            if not isinstance(m, kernels.Packable):
                continue
            key = f"{pre}{name}.{m.packed_name}"
            w = getattr(m, m.packed_name)
            final[key] = w.dtype if not w.is_floating_point() else (torch.float32 if self._fp32_keep(key, dtype) else dtype)
            block = kernels.block_for(final[key], w.shape)
            if key in tied and block:
                copies.append(m)
            elif block:
                plan[key] = block
        fuse = {}
        for name, m in root.named_modules():
            for group in getattr(m, "fuse_packed", ()):
                layers = [m.get_submodule(c) for c in group]
                keys = [f"{pre}{name}.{c}.{lay.packed_name}" for c, lay in zip(group, layers)]
                shapes = [getattr(lay, lay.packed_name).shape for lay in layers]
                if (ops.fusable(layers) and all(k in plan for k in keys) and len({plan[k] for k in keys}) == 1
                        and len({final[k] for k in keys}) == 1 and len({sh[1] for sh in shapes}) == 1):
                    rows, r0 = sum(sh[0] for sh in shapes), 0
                    for k, sh in zip(keys, shapes):
                        fuse[k] = (keys[0], r0, rows, final[k])
                        r0 += sh[0]
        return plan, fuse, copies

    def _load_from(self, reader: _Reader, d: Path, dtype: torch.dtype, device: torch.device) -> None:
        ours = {k: t for k, t in self.state_dict(keep_vars=True).items()}
        tied = self.tied_weights()
        ckpt_keys = [k for k in reader.keys() if not _IGNORABLE.search(k)]

        # A part model (e.g. Blip2VisionModel) reading a full BLIP-2 checkpoint takes its prefix.
        mapping: dict[str, str] = {}  # our key -> checkpoint key
        pre = self.part_prefix
        if pre and any(k.startswith(pre) for k in ckpt_keys):
            for k in ckpt_keys:
                if k.startswith(pre):
                    mapping[k[len(pre):]] = k
            skipped = []
        else:
            mapping = {k: k for k in ckpt_keys}
            skipped = []

        unexpected = []
        for ok in list(mapping):
            if ok not in ours:
                ck = mapping.pop(ok)
                if ok in tied:  # a stored copy of a tied weight
                    continue
                part = next((p for p in BLIP2_PARTS if ok.startswith(p)), None)
                has_part = part is not None and any(k.startswith(part) for k in ours)
                if part is not None and not has_part:
                    skipped.append(ck)  # belongs to a sibling class; not ours to load
                else:
                    unexpected.append(ck)
        missing = [k for k in ours if k not in mapping and k not in tied]
        wrong = []
        for ok, ck in mapping.items():
            want = tuple(ours[ok].shape)
            got = reader.shape(ck)
            if want != got:
                wrong.append(f"{ck}: checkpoint {list(got)}, model {list(want)}")
        problems = []
        files = sorted({str(reader.where[k].name) for k in reader.keys()})
        if missing:
            problems.append(f"missing {len(missing)} tensor(s): {_fmt_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} tensor(s): {_fmt_keys(unexpected)}")
        if wrong:
            problems.append(f"wrong shape for {len(wrong)} tensor(s): " + "; ".join(wrong[:6]))
        if problems:
            arch = getattr(self.config, "architectures", None)
            hint = f" (its config names {arch})" if arch else ""
            raise CheckpointError(
                f"checkpoint {d} ({', '.join(files)}){hint} does not fit {type(self).__name__}: "
                + " | ".join(problems)
                + ". Check that the config.json and the weights belong together and to this class."
            )

        pack, fuse, copies = self._pack_plan(dtype, device)  # our key -> block, for kernels.c
        rows = _RowReader(reader) if pack else None
        groups: dict[str, torch.Tensor] = {}  # fused group -> its buffer
        sd = {}
        for ok, ck in mapping.items():
            target = ours[ok]
            out = None
            if ok in fuse:  # this weight's rows of its group's buffer
                g, r0, n, dt = fuse[ok]
                if g not in groups:
                    groups[g] = torch.empty(n, target.shape[1], dtype=dt, device=device)
                out = groups[g][r0:r0 + target.shape[0]]
            if ok in pack and getattr(reader, "is_fresh", lambda k: False)(ck):
                # made for us (quantized while loading, into its group's slot if it has one): pack
                # it where it is, through a reused buffer (fresh copies freed per layer stay in the
                # allocator's heap: +7% RSS, and +17% when each was then copied into its group)
                t = reader.get(ck, out=out) if out is not None else reader.get(ck)
                t = kernels.pack_in_place(t, *pack[ok], scratch=rows.buffer(target))
            elif ok in pack:
                # read by file reads (not the mmap) and laid out in blocks straight into the memory
                # that will hold it: packing a mapped weight in place costs a copy-on-write fault
                # per page (0.5 GB/s), and a packed copy would leave the mapped original resident
                t = rows.rows(ck, 0, target.shape[0], target.shape[1], reuse=True)
                t = kernels.pack_into(t, out, *pack[ok]) if out is not None else kernels.pack(t, *pack[ok])
            else:
                t = reader.get(ck)
            if t.is_floating_point():
                want = torch.float32 if self._fp32_keep(ok, dtype) else dtype
                t = t.to(device=device, dtype=want)
            else:
                t = t.to(device=device, dtype=target.dtype)
            sd[ok] = t
        if rows is not None:
            rows.close()
        self.load_state_dict(sd, strict=False, assign=True)
        for ok, block in pack.items():
            self.get_submodule(ok.rpartition(".")[0]).mark_packed(block)
        for m in copies:
            m.packed_copy = True
        if pack:
            _return_free_heap()
        self.tie_weights()
        # Anything still on meta was neither loaded nor tied: a bug in the class, not the file.
        left = [n for n, p in list(self.named_parameters()) + list(self.named_buffers()) if p.is_meta]
        if left:
            raise RuntimeError(f"{type(self).__name__}: not initialised after loading: {_fmt_keys(left)}")

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


def _device_from_map(device_map) -> torch.device | None:
    """One device for the whole model: "cpu", "cuda:0", 0, {"": 0} or "auto" (CUDA if present)."""
    if isinstance(device_map, dict):
        devs = set(device_map.values())
        if len(devs) != 1:
            raise NotImplementedError(f"device_map {device_map}: blip2 places the whole model on one device")
        device_map = devs.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _first_float_dtype(reader: _Reader) -> torch.dtype:
    for k in reader.keys():
        if reader.is_float(k):
            return reader.get(k).dtype
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
