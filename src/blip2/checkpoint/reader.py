"""Reading a checkpoint's weight files: safetensors (one file or shards) and PyTorch .bin.

`Reader` knows every tensor's file, dtype and shape without reading data (safetensors headers are
parsed once, by header.read_header), and reads data two ways:
- `get`: through an mmap (safetensors) or torch.load(mmap=True): pages are read when touched and
  are shared with the page cache, so a loaded weight costs no copy;
- `rows`: row blocks by plain file reads (pread). Pages of an mmap stay in the process's resident
  set for as long as the mapping lives (the loaded embeddings and ViT keep it alive), so a weight
  that is converted while loading (quantized, or laid out anew) is read this way instead: the file
  reads go through the page cache, which is not ours, and the row buffer is reused or freed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .header import HeaderError, read_header

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"

# Older spellings of a key -> today's. Applied to every key read, in order.
KEY_RENAMES: list[tuple[str, str]] = [
    (r"\.gamma$", ".weight"),  # pre-2020 LayerNorm names in some BERT-derived files
    (r"\.beta$", ".bias"),
]

# safetensors dtype names -> torch dtypes
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """The files on disk do not fit the model that was asked for."""


def rename(k: str) -> str:
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


class Reader:
    """Key (after KEY_RENAMES) -> tensor, over all of a checkpoint's files."""

    def __init__(self, files: list[Path], fmt: str):
        self.where: dict[str, Path] = {}
        # key -> (dtype, shape, byte offset of its data in the file; None for .bin, read through get)
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...], int | None]] = {}
        self._get: dict[str, Any] = {}
        self._handles = []  # safetensors files, kept open: their tensors are views of the mapping
        self._files: dict[Path, Any] = {}  # opened for rows()
        self._buf: torch.Tensor | None = None
        for f in files:
            if fmt == "safetensors":
                self._add_safetensors(f)
            else:
                self._add_bin(f)

    def _add_safetensors(self, f: Path) -> None:
        try:
            header, start = read_header(f)
            h = safe_open(str(f), framework="pt", device="cpu")
        except HeaderError as e:
            raise CheckpointError(f"{e}; re-download it") from e
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {e}. The file is damaged or not safetensors; re-download it") from e
        self._handles.append(h)
        for name, e in header.items():
            k = rename(name)
            self.where[k] = f
            self._info[k] = (TORCH_DTYPES[e["dtype"]], tuple(e["shape"]), start + e["data_offsets"][0])
            self._get[k] = lambda h=h, name=name: h.get_tensor(name)

    def _add_bin(self, f: Path) -> None:
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {f} as a weights-only PyTorch file: {e}") from e
        if "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        for name, t in sd.items():
            k = rename(name)
            self.where[k] = f
            self._info[k] = (t.dtype, tuple(t.shape), None)
            self._get[k] = lambda t=t: t

    def keys(self):
        return self.where.keys()

    def shape(self, k: str) -> tuple[int, ...]:
        return self._info[k][1]

    def dtype(self, k: str) -> torch.dtype:
        return self._info[k][0]

    def is_float(self, k: str) -> bool:
        return self._info[k][0].is_floating_point

    def get(self, k: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor k as the file holds it (a view of the mapping), or copied into `out` when given."""
        t = self._get[k]()
        return out.copy_(t) if out is not None else t

    def is_fresh(self, k: str) -> bool:
        """Whether get(k) returns memory made for the caller, which it may change in place (a reader
        that converts tensors as they are read says yes; the file's own data is not fresh)."""
        return False

    def rows(self, k: str, r0: int, r1: int, reuse: bool = False) -> torch.Tensor:
        """Rows [r0, r1) of tensor k as (r1 - r0, *rest), read from the file (see the module's
        docstring). reuse: into the buffer kept by this reader, which the next reuse call overwrites
        (for data that is copied on at once; saves fresh memory, which on some VMs costs more to
        touch the first time than the read itself)."""
        dt, shape, off = self._info[k]
        if off is None:  # a pytorch_model.bin, already mmapped by torch.load
            return self.get(k)[r0:r1]
        row = dt.itemsize
        for d in shape[1:]:
            row *= d
        n = (r1 - r0) * row
        buf = self.buffer(n) if reuse else torch.empty(n, dtype=torch.uint8)
        f = self.where[k]
        if f not in self._files:
            self._files[f] = open(f, "rb", buffering=0)
        fh, mv, pos = self._files[f], memoryview(buf.numpy()), 0
        fh.seek(off + r0 * row)
        while pos < len(mv):
            got = fh.readinto(mv[pos:])
            if not got:
                raise EOFError(f"{f}: file ends inside {k}; re-download it")
            pos += got
        return buf.view(dt).reshape(r1 - r0, *shape[1:])  # safetensors is little-endian, as is every CPU torch runs on

    def buffer(self, n: int | torch.Tensor) -> torch.Tensor:
        """The reused uint8 buffer, at least n bytes (or a tensor's size in bytes)."""
        if isinstance(n, torch.Tensor):
            n = n.numel() * n.element_size()
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n]

    def close(self) -> None:
        """Close the files rows() opened and drop the row buffer (tensors from get stay valid)."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        self._buf = None

