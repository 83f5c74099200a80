"""The search index (apps/index) at scale and end to end.

    .venv/bin/python benchmarks/bench_index.py                   # 1M synthetic 256-d vectors, default settings
    .venv/bin/python benchmarks/bench_index.py --n 200000        # smaller
    .venv/bin/python benchmarks/bench_index.py --demo 1000       # also: text -> image R@1 on 1,000 demo scenes

Synthetic part: N unit vectors of 256 dimensions drawn around 1,000 cluster centres (a mixture
like the clustered ITC embeddings of the demo world), saved as 8 `blip2 embed`-style .npy shards
(one vector per item). `blip2 index build` runs in a child process (build time and its peak RSS);
recall@10 is measured against exact search (a float32 matrix product over the shards) for 200
held-out queries drawn the same way; latency is one query at a time, p50 and p99.

Demo part: held-out demo scenes embedded with `blip2 embed --model demo`, an index built on them,
and each scene's caption as a text query: R@1 counts a hit when the first image's own caption is
the query (captions repeat across scenes, so the drawn scene itself is not required), with ITC
alone and with ITM re-ranking of the best --rerank.

A record goes to benchmarks/records/<timestamp>-index.json with the machine (CPU model and flags)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_jobs import new_record, write_record  # noqa: E402


def synthetic(d: Path, n: int, dim: int, shards: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """Write n clustered unit vectors as `shards` .npy files + .json ids; returns 200 held-out queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    d.mkdir(parents=True, exist_ok=True)

    def draw(m: int) -> np.ndarray:
        a = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    per = -(-n // shards)
    for s in range(shards):
        m = min(per, n - s * per)
        np.save(d / f"emb{s}.npy", draw(m))
        (d / f"emb{s}.json").write_text(json.dumps({"kind": "image", "ids": [f"v{s}-{i}" for i in range(m)],
                                                    "model": "synthetic"}))
    return draw(200)


def exact_top(d: Path, shards: int, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) global ids of the exact top k, shard by shard."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    start = 0
    for s in range(shards):
        a = np.load(d / f"emb{s}.npy", mmap_mode="r")
        sc = queries @ np.asarray(a).T  # (q, m)
        top = np.argpartition(-sc, k, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], 1)
        best_i = np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
        start += len(a)
    return best_i


def run_synthetic(args, work: Path) -> dict:
    import faiss

    data = work / "syn"
    t = time.time()
    queries = synthetic(data, args.n, args.dim, args.shards)
    gen_s = time.time() - t
    cmd = [sys.executable, "-c",
           "import sys, json, resource; from blip2.apps.index import build; "
           "m = build(sys.argv[1:-1], sys.argv[-1]); "
           "print(json.dumps({'meta': m, 'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))",
           *[str(data / f"emb{s}.npy") for s in range(args.shards)], str(work / "ix")]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    built = json.loads(p.stdout.strip().splitlines()[-1])
    meta = built["meta"]
    index = faiss.read_index(str(work / "ix" / "index.faiss"))
    if meta["nlist"]:
        faiss.extract_index_ivf(index).nprobe = meta["nprobe"]
    truth = exact_top(data, args.shards, queries, 10)
    faiss.omp_set_num_threads(1)  # one query at a time, as a server answers them
    lat, hits = [], 0
    for q, want in zip(queries, truth):
        t = time.perf_counter()
        _, got = index.search(q[None], 10)
        lat.append(time.perf_counter() - t)
        hits += len(set(got[0].tolist()) & set(want.tolist()))
    lat_ms = np.array(lat) * 1e3
    return {"n": args.n, "dim": args.dim, "factory": meta["factory"], "nlist": meta["nlist"], "nprobe": meta["nprobe"],
            "generate_s": round(gen_s, 1), "build_s": meta["build_seconds"], "build_wall_s": round(wall, 1),
            "build_peak_rss_gib": round(built["maxrss_kib"] / 2**20, 2), "bytes_per_vector": meta["bytes_per_vector"],
            "recall_at_10": hits / (10 * len(queries)), "queries": len(queries),
            "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 3),
            "latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 3)}


def run_demo(args, work: Path) -> dict:
    from blip2 import scenes
    from blip2.apps.cli.main import main
    from blip2.apps.demo.shipped import HELDOUT_SEED
    from blip2.apps.index import SearchIndex

    d = work / "demo"
    shots = scenes.dataset(args.demo, seed=HELDOUT_SEED)
    (d / "imgs").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(shots):
        p = d / "imgs" / f"{i:05d}.png"
        scenes.render(s).save(p)
        paths.append(str(p))
    t = time.time()
    assert main(["embed", "--model", "demo", str(d / "imgs"), "-o", str(d / "emb.npy"), "--batch-size", "32"]) == 0
    embed_s = time.time() - t
    assert main(["index", "build", str(d / "emb.npy"), "-o", str(d / "ix")]) == 0
    ix = SearchIndex(d / "ix")
    caption_of = {str(Path(p).resolve()): scenes.caption(s) for p, s in zip(paths, shots)}
    qs = list(zip(paths, shots))[:args.demo_queries]
    out = {"images": args.demo, "queries": len(qs), "embed_s": round(embed_s, 1)}
    for name, rerank in (("itc", 0), ("itc+itm", args.rerank)):
        t, exact, same = time.time(), 0, 0
        for p, s in qs:
            top = ix.search(text=scenes.caption(s), k=1, rerank=rerank)[0]
            exact += top["path"] == str(Path(p).resolve())
            same += caption_of[top["path"]] == scenes.caption(s)
        out[name] = {"r_at_1_caption": same / len(qs), "r_at_1_this_image": exact / len(qs),
                     "seconds_per_query": round((time.time() - t) / len(qs), 3), "rerank": rerank}
    return out


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--demo", type=int, default=0, help="held-out demo scenes for the end-to-end R@1 (0: skip)")
    ap.add_argument("--demo-queries", type=int, default=200)
    ap.add_argument("--rerank", type=int, default=10)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--work", default="/tmp/blip2-bench-index")
    args = ap.parse_args()
    work = Path(args.work)
    rec = new_record()
    if not args.skip_synthetic:
        rec["synthetic"] = run_synthetic(args, work)
        print(json.dumps(rec["synthetic"], indent=1))
    if args.demo:
        rec["demo"] = run_demo(args, work)
        print(json.dumps(rec["demo"], indent=1))
    rec["self_maxrss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    write_record(rec, "index")


if __name__ == "__main__":
    main_()
