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
import zipfile
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
            files = [_shard_path(d, d / index, f) for f in sorted(set(_weight_map(d / index).values()))]
            missing = [f.name for f in files if not f.is_file()]
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


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _weight_map(index: Path) -> dict[str, str]:
    """The index's {key: shard file name}, checked for shape (a damaged index is one line, not a traceback)."""
    try:
        wm = json.loads(index.read_bytes())["weight_map"]
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{index} is not a valid shard index: {_first_line(e)}") from e
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index: it has no \"weight_map\" object") from e
    if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
        raise CheckpointError(f"{index} is not a valid shard index: \"weight_map\" must map keys to shard file names")
    return wm


def _shard_path(d: Path, index: Path, name: str) -> Path:
    """d / name, refused unless it stays inside d: an index is data, and must not make us open
    (or load weights from) files elsewhere. A link inside d may point into the Hugging Face cache's
    blobs/ folder of the same repository, as every file of a downloaded snapshot does."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise CheckpointError(f"{index}: shard {name!r} is outside the checkpoint folder {d}; refusing to read it")
    f = d / p
    roots = [d.resolve()]
    if d.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev>/ -> ../../blobs/<hash>
        roots.append((d.parent.parent / "blobs").resolve())
    real = f.resolve()
    if not any(real.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{index}: shard {name!r} links to {real}, outside the checkpoint folder {d}; "
                              "refusing to read it")
    return f


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
            raise CheckpointError(f"cannot read {f}: {_first_line(e)}. The file is damaged or not safetensors; "
                                  "re-download it") from e
        self._handles.append(h)
        for name, e in header.items():
            k = rename(name)
            self.where[k] = f
            self._info[k] = (TORCH_DTYPES[e["dtype"]], tuple(e["shape"]), start + e["data_offsets"][0])
            self._get[k] = lambda h=h, name=name: h.get_tensor(name)

    def _add_bin(self, f: Path) -> None:
        try:
            # torch.load maps only zip-format files; a legacy (pre-1.6) file is read whole, still
            # through the weights-only unpickler, so it can hold nothing but tensors and containers
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} as a weights-only PyTorch file: {_first_line(e)}") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in sd.items()):
            raise CheckpointError(f"{f} holds no state dict of named tensors; it is not a model's weights")
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

