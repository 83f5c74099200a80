"""The safetensors header, read once and checked: the one place that parses it.

A safetensors file is an 8-byte little-endian length N, N bytes of JSON, then the data. The JSON
maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to
the end of the header), plus an optional "__metadata__" string map. A damaged or hostile file can
claim any N: the cap keeps a bad length from becoming a multi-GB read, and every entry is checked
against the file's size so that a lie shows up here, naming the file, not later as garbage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The safetensors library refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

# dtype name -> bytes per element (the names safetensors writes)
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


class HeaderError(ValueError):
    """A safetensors file whose header is missing, too large, not JSON, or inconsistent."""


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensors, data_start): {name: {"dtype", "shape", "data_offsets"}} without "__metadata__", and
    the byte offset where the data begins. Raises HeaderError naming the file and what is wrong."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise HeaderError(f"{p}: {size} bytes, too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise HeaderError(f"{p}: header length {n} is beyond the file ({size} bytes) or the "
                                  f"{MAX_HEADER_BYTES}-byte limit; the file is damaged")
            raw = fh.read(n)
    except OSError as e:
        raise HeaderError(f"cannot read {p}: {e.strerror or e}") from e
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
        raise HeaderError(f"{p}: the header is not valid JSON ({str(e)[:200]}); the file is damaged") from e
    if not isinstance(meta, dict):
        raise HeaderError(f"{p}: the header is not a JSON object; the file is damaged")
    data = size - 8 - n
    out: dict[str, dict[str, Any]] = {}
    for k, e in meta.items():
        if k == "__metadata__":
            continue
        ok = (isinstance(e, dict) and e.get("dtype") in DTYPE_SIZES and isinstance(e.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(isinstance(o, int) for o in e["data_offsets"]))
        if ok:
            b, end = e["data_offsets"]
            numel = 1
            for d in e["shape"]:
                numel *= d
            ok = 0 <= b <= end <= data and end - b == numel * DTYPE_SIZES[e["dtype"]]
        if not ok:
            raise HeaderError(f"{p}: the header entry for {k!r} is inconsistent ({str(e)[:200]}); the file is damaged")
        out[k] = e
    return out, 8 + n
