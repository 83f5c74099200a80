"""What an index is built from and saved with: the embedding sources (a `blip2 embed --ray` output
folder, a plain `blip2 embed -o emb.npy` file), read shard by shard, and the metadata that goes
with an index (ids, paths, model, dimension, normalisation).

Model identity is a fingerprint of the checkpoint's files (sizes, safetensors headers and 16
sampled 64 KiB blocks of each weight file), so a retrained or another model is told apart from the
one that made the embeddings even when both go by the same name ("demo")."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..cli.common import UsageError, model_dir
from ..cli.sink import dumps, write_atomic

META = "index.json"  # beside the FAISS file: how the index was built and from what
EMB_META = "embeddings.json"  # in a `blip2 embed --ray` output folder
SAMPLES, BLOCK = 16, 1 << 16


def model_fingerprint(d: Path) -> str:
    """A short hash naming the checkpoint in folder `d` (its config and sampled weight bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in d.iterdir() if p.suffix in (".json", ".safetensors", ".bin") and p.is_file())
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}\n".encode())
        with open(p, "rb") as fh:
            if p.suffix == ".json" or size <= SAMPLES * BLOCK:
                h.update(fh.read())
                continue
            for i in range(SAMPLES):
                fh.seek(i * (size - BLOCK) // (SAMPLES - 1))
                h.update(fh.read(BLOCK))
    return h.hexdigest()[:16]


def model_identity(name: str, demo_kind: str = "retrieval") -> dict:
    """{"model": name, "fingerprint": ...} of --model `name` (UsageError if it cannot be found)."""
    return {"model": name, "fingerprint": model_fingerprint(model_dir(name, demo_kind))}


@dataclass
class Shard:
    """One array of embeddings on disk, (n, Q, E) or (n, E), and the ids / paths of its rows."""
    vectors: Path
    ids: list[str]
    sources: list[str]
    offsets: list[int]  # a tar member's byte offset and size, -1 elsewhere (see jobs/inputs.py)
    sizes: list[int]

    def load(self) -> np.ndarray:
        return np.load(self.vectors, mmap_mode="r")


@dataclass
class Embeddings:
    """The embeddings found at a path: shards, the model that made them, and their shape."""
    shards: list[Shard]
    model: str
    fingerprint: str | None  # None: plain `blip2 embed` output, which records the model's name only
    queries: int  # vectors per item (Q), 1 for (n, E) arrays
    dim: int

    @property
    def count(self) -> int:
        return sum(len(s.ids) for s in self.shards)


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """The embeddings at `path`: a `blip2 embed --ray` output folder (img_emb/*.npy with
    metadata/*.parquet and embeddings.json) or the .npy of a plain `blip2 embed` (with its .json
    of ids). Raises UsageError naming the file when there is nothing usable."""
    p = Path(path)
    if p.is_dir():
        return _read_job_dir(p)
    if p.suffix.lower() == ".npy" and p.is_file():
        return _read_plain(p)
    if not p.exists():
        raise UsageError(f"{p}: no such file or folder")
    raise UsageError(f"{p}: give a `blip2 embed --ray` output folder or a `blip2 embed -o FILE.npy` file")


def _read_plain(p: Path) -> Embeddings:
    side = p.with_suffix(".json")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        ids = [str(i) for i in meta["ids"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{side}: the ids of {p.name} cannot be read ({e}); it is written by `blip2 embed -o {p.name}`")
    if meta.get("kind", "image") != "image":
        raise UsageError(f"{p}: holds {meta.get('kind')} embeddings; an index is built from image embeddings")
    a = np.load(p, mmap_mode="r")
    _check_shape(a, len(ids), p)
    n = len(ids)
    # ids are the paths as given to `blip2 embed`: a relative one is taken from here, made absolute
    srcs = [os.path.abspath(i) if not i.startswith(("http://", "https://")) and os.path.exists(i) else i for i in ids]
    return Embeddings([Shard(p, ids, srcs, [-1] * n, [-1] * n)], str(meta.get("model", "")), None,
                      *_qe(a.shape))


def _read_job_dir(d: Path) -> Embeddings:
    try:
        meta = json.loads((d / EMB_META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{d}: no {EMB_META}; give the output folder of `blip2 embed --ray`") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{d / EMB_META}: cannot be read ({e})") from None
    import pyarrow.parquet as pq

    shards = []
    for v in sorted((d / "img_emb").glob("img_emb_*.npy")):
        m = d / "metadata" / v.name.replace("img_emb", "metadata").replace(".npy", ".parquet")
        if not (d / v.name.replace("img_emb_", "part-").replace(".npy", ".parquet")).is_file():
            continue  # a shard whose part file was never written: an interrupted run's, redone later
        try:
            t = pq.read_table(m, columns=["id", "source", "offset", "size"]).to_pydict()
        except Exception as e:
            raise UsageError(f"{m}: cannot be read ({' '.join(str(e).split())})") from None
        a = np.load(v, mmap_mode="r")
        _check_shape(a, len(t["id"]), v)
        if a.shape[0]:
            shards.append(Shard(v, [str(i) for i in t["id"]], t["source"], t["offset"], t["size"]))
    if not shards:
        raise UsageError(f"{d}: holds no embeddings (no img_emb/*.npy with rows); run `blip2 embed --ray ... -o {d}`")
    return Embeddings(shards, meta["model"], meta.get("fingerprint"), int(meta["queries"]), int(meta["dim"]))


def _check_shape(a: np.ndarray, n: int, p: Path) -> None:
    if a.ndim not in (2, 3) or a.shape[0] != n:
        raise UsageError(f"{p}: an array of shape {tuple(a.shape)} for {n} ids; expected (n, Q, E) or (n, E)")


def _qe(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[1], shape[2]) if len(shape) == 3 else (1, shape[1])


def iter_vectors(emb: Embeddings, rows: int = 65536) -> Iterator[np.ndarray]:
    """The embeddings as (m, E) float32 L2-normalised vectors, `rows` items at a time, shard by shard:
    item i's Q vectors are rows i*Q ... i*Q+Q-1 of the whole sequence."""
    for s in emb.shards:
        a = s.load()
        for i in range(0, a.shape[0], rows):
            yield normalise(np.asarray(a[i:i + rows], dtype=np.float32).reshape(-1, emb.dim))


def normalise(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(n, 1e-12), dtype=np.float32)


def read_json(p: Path) -> dict | None:
    """The JSON object in file p, or None when it is missing or unreadable."""
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: dict) -> None:
    """obj as indented JSON, written beside `path` and renamed over it."""
    text = dumps(obj, indent=1) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))
