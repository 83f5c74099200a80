"""`blip2 index build`: a FAISS index over image embeddings, chosen by size as the FAISS guidelines
say, built shard by shard.

An image has Q query vectors (BLIP-2's ITC scores an image by its best query), so the index holds
every query vector, L2-normalised, under inner product; vector v belongs to item v // Q.

    vectors N            index                         memory per vector   search
    N <= 50k             Flat (exact)                  4 d bytes           exact
    50k < N <= 4M        IVF{K},Flat, K ~ 4 sqrt(N)    4 d + 8 bytes       nprobe lists
    N > 4M               IVF{K}_HNSW32,PQ{d/4}x8       d/4 + 8 bytes       nprobe lists, then an exact
                         K ~ 16 sqrt(N), <= 65536                          re-rank from the shards

The guidelines put 1M-10M vectors at IVF65536_HNSW32; at 1M on 2 cores training 65536 centroids
takes hours (each k-means pass compares 1M vectors with every centroid), while IVF4096 trains in a
minute and reaches the recall target (benchmarks/bench_index.py), so the IVF tier keeps K near
4 sqrt(N) and brings in the HNSW coarse quantizer from K = 16384 on.

Training uses a sample read from the shards (at most TRAIN_PER_LIST vectors per list); vectors are
then added a chunk at a time, so no more than one chunk of the embeddings is in memory."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..cli.common import UsageError
from ..cli.sink import write_atomic
from .store import META, Embeddings, iter_vectors, model_identity, normalise, read_embeddings, write_json

FLAT_MAX = 50_000
PQ_MIN = 4_000_000
TRAIN_PER_LIST = 40
HNSW_FROM = 16384
KINDS = ("auto", "flat", "ivf", "ivfpq")
FAISS_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"


def choose(n: int, dim: int, kind: str = "auto", nlist: int | None = None) -> dict:
    """The index for n vectors of dimension dim: {"kind", "factory", "nlist", "nprobe", "refine"}."""
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "ivf" if n <= PQ_MIN else "ivfpq"
    if kind == "flat":
        return {"kind": "flat", "factory": "Flat", "nlist": 0, "nprobe": 0, "refine": 0}
    per = 4 if kind == "ivf" else 16
    k = nlist or min(65536, 2 ** round(math.log2(max(per * math.sqrt(n), 16))))
    k = max(1, min(k, n // 4 or 1))  # every list needs a few training vectors
    coarse = f"IVF{k}_HNSW32" if k >= HNSW_FROM else f"IVF{k}"
    if kind == "ivf":
        return {"kind": "ivf", "factory": f"{coarse},Flat", "nlist": k, "nprobe": max(8, min(k, k // 64)), "refine": 0}
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    # "np": no polysemous training (an annealing of the code order that Hamming filtering needs; we
    # do not filter, and it is most of the training time)
    return {"kind": "ivfpq", "factory": f"{coarse},PQ{m}x8np", "nlist": k, "nprobe": max(16, min(k, k // 32)),
            "refine": 8}


def _sample(emb: Embeddings, n: int, seed: int = 0) -> np.ndarray:
    """n vectors drawn without replacement across the shards, read through memory maps."""
    counts = [len(s.ids) * emb.queries for s in emb.shards]
    total = sum(counts)
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    out, start = [], 0
    for s, c in zip(emb.shards, counts):
        mine = pick[(pick >= start) & (pick < start + c)] - start
        if len(mine):
            out.append(np.asarray(s.load().reshape(-1, emb.dim)[mine], dtype=np.float32))
        start += c
    return normalise(np.concatenate(out))


def build(paths: list[str], out: str | Path, kind: str = "auto", nlist: int | None = None,
          nprobe: int | None = None, log: Any = sys.stderr) -> dict:
    """Build the index of the embeddings at `paths` into the folder `out`; returns its metadata."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    embs = [read_embeddings(p) for p in paths]
    first = embs[0]
    for p, e in zip(paths[1:], embs[1:]):
        if (e.queries, e.dim) != (first.queries, first.dim):
            raise UsageError(f"{p}: embeddings of shape ({e.queries}, {e.dim}) per image, but {paths[0]} has "
                             f"({first.queries}, {first.dim}); an index holds one model's embeddings")
        same = e.fingerprint == first.fingerprint if e.fingerprint and first.fingerprint else e.model == first.model
        if not same:
            raise UsageError(f"{p}: made by model {e.model} ({e.fingerprint}), {paths[0]} by {first.model} "
                             f"({first.fingerprint}); an index holds one model's embeddings")
    emb = Embeddings([s for e in embs for s in e.shards], first.model, first.fingerprint, first.queries, first.dim)
    if not emb.count:
        raise UsageError(f"{', '.join(paths)}: no embeddings to index")
    fingerprint = emb.fingerprint
    if fingerprint is None:  # plain `blip2 embed` output names its model only: identify it now
        try:
            fingerprint = model_identity(emb.model)["fingerprint"]
        except Exception as e:
            print(f"blip2: warning: model {emb.model!r} of the embeddings cannot be read ({e}); the index will "
                  "not check the model it is searched with", file=log)
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise UsageError(f"-o {d} is a file; give a folder for the index")
    d.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    n = emb.count * emb.queries
    plan = choose(n, emb.dim, kind, nlist)
    if nprobe and plan["nlist"]:
        plan["nprobe"] = min(nprobe, plan["nlist"])
    index = faiss.index_factory(emb.dim, plan["factory"], faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        train = _sample(emb, max(plan["nlist"] * TRAIN_PER_LIST, 256 * 64))
        print(f"blip2: training {plan['factory']} on {len(train):,} of {n:,} vectors", file=log)
        index.train(train)
        del train
    for chunk in iter_vectors(emb):
        index.add(chunk)
    write_atomic(d / FAISS_FILE, lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)))
    items = {"id": [], "source": [], "offset": [], "size": []}
    for s in emb.shards:
        items["id"] += s.ids
        items["source"] += [str(x) for x in s.sources]
        items["offset"] += [int(x) for x in s.offsets]
        items["size"] += [int(x) for x in s.sizes]
    write_atomic(d / ITEMS_FILE, lambda fh: pq.write_table(pa.table(items), fh))
    meta = {"version": 1, **plan, "metric": "inner_product", "normalisation": "l2", "model": emb.model,
            "fingerprint": fingerprint, "queries": emb.queries, "dim": emb.dim, "items": emb.count, "vectors": n,
            "bytes_per_vector": round((d / FAISS_FILE).stat().st_size / n, 1),
            "shards": [{"path": str(s.vectors.resolve()), "items": len(s.ids)} for s in emb.shards],
            "build_seconds": round(time.time() - t0, 2)}
    write_json(d / META, meta)
    return meta
