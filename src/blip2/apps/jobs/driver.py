"""The job driver: a local Ray cluster (or the one at --ray-address), the pipeline, and an output
folder that a re-run resumes.

    OUTPUT_DIR/part-00000.parquet ...   one row per input row: id, source, caption (the input's),
                                        the result (text / questions + answers / embedding), error,
                                        worker, options
    OUTPUT_DIR/img_emb/img_emb_00000.npy, metadata/metadata_00000.parquet   (embed) the vectors of
                                        the part's rows without error, (n, Q, E) float32, and their
                                        id / source, as clip-retrieval lays them out
    OUTPUT_DIR/job.json, embeddings.json   what the job is (kind, model, options) / the vectors' shape
    OUTPUT_DIR/stats.json, _SUCCESS     written when every input row is in a part

Exactly once: the driver receives each finished row once (Ray Data re-runs the batches of a killed
actor and hands their output over once), buffers rows and writes a part every `shard_rows` rows, each
file written beside its name and renamed into place; a part file is its own completion marker. A
re-run reads the ids of the parts present and feeds Ray only the others, so an interrupted job
(Ctrl-C flushes the buffer first; SIGKILL loses only what was buffered) resumes without duplicates."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..cli.common import UsageError, check_template, fit_prompt, model_dir, options, TooLong, short
from ..cli.inputs import Report
from ..cli.sink import lock, write_atomic
from ..index.store import read_json, write_json
from .actors import ACTORS, decode_batch, processor
from .inputs import read_inputs

DEMO_KIND = {"caption": "captioning", "ask": "captioning", "embed": "retrieval"}
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
DROP = ("offset", "size", "pixel_values")  # inputs of the pipeline, not results
TEXT_COLUMNS = ("id", "source", "caption", "text", "error", "worker")
LIST_COLUMNS = ("questions", "answers", "captions")


@dataclass
class Resources:
    """How the job uses the cluster. actors: model actors (None: as many as fit beside the decode
    tasks); actor_cpus / actor_gpus: Ray resources per actor (fractions allowed); threads: torch
    threads per actor (None: this machine's cores shared among the actors on a local cluster, else
    the actor's CPUs); decode_cpus: Ray CPUs per image-decoding task (0: they cannot be starved);
    num_cpus / object_store_mb: the local cluster started when there is no address."""
    address: str | None = None
    actors: int | None = None
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    threads: int | None = None
    decode_cpus: float = 0.0
    batch_size: int = 8
    num_cpus: int | None = None
    object_store_mb: int = 300


def start_ray(res: Resources) -> bool:
    """Join --ray-address / $RAY_ADDRESS, or start a small local cluster; True when we started it
    (and so must stop it). An address that does not answer is a UsageError."""
    import ray

    if ray.is_initialized():
        return False
    address = res.address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = dict(log_to_driver=False, configure_logging=True, logging_level="ERROR")
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            os.environ.pop("RAY_ADDRESS", None)
            # Ray starts its workers at nice 15 (for the raylet's sake); on a machine that also runs
            # other work that starves the model actors, so the local cluster's workers run at nice 0
            os.environ.setdefault("RAY_worker_niceness", "0")
            # address "local": a new cluster of our own, not one that `ray start` left on this machine
            ray.init(address="local", num_cpus=res.num_cpus or os.cpu_count() or 1, object_store_memory=res.object_store_mb << 20,
                     include_dashboard=False, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot start or join a Ray cluster{f' at {address}' if address else ''}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return True


def pipeline(ds: Any, kind: str, model: str, opts: dict, res: Resources) -> Any:
    """rows -> decode tasks -> model actors: the Ray Data plan of a job (lazy)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI's own bar shows progress
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # and Ray Data's periodic log of it is off
    cpus = ray.cluster_resources().get("CPU", 1.0)
    # Leave the decode tasks at least half a CPU: actors that take every CPU starve the reads and the
    # job waits forever (Ray's default pool did this on 2 CPUs).
    fit = int((cpus - max(res.decode_cpus, 0.5)) // res.actor_cpus)
    actors = res.actors or max(1, fit)
    if res.decode_cpus and actors * res.actor_cpus > cpus - res.decode_cpus:
        print(f"blip2: warning: {actors} actor(s) of {res.actor_cpus} CPU leave less than a decode task's "
              f"{res.decode_cpus} of the cluster's {cpus:g} CPUs; the job may wait for CPUs (use fewer "
              "--actors or a smaller --actor-cpus)", file=sys.stderr)
    one_node = sum(1 for n in ray.nodes() if n.get("Alive")) == 1  # then this machine's cores are the cluster's
    threads = res.threads or (max(1, (os.cpu_count() or 1) // actors) if one_node else max(1, math.ceil(res.actor_cpus)))
    kind_of = DEMO_KIND[kind]
    # --actors N: exactly N; by default the pool grows from 1 to what fits while rows queue up
    pool = ray.data.ActorPoolStrategy(**({"size": actors} if res.actors else {"min_size": 1, "max_size": actors}))
    # Decode tasks ask for no CPU by default, so no placement of actors can starve them: after a node
    # is lost, two half-CPU actors restarted on a 1-CPU node left a 0.25-CPU decode task pending
    # for ever. Their number is bounded instead (one per CPU), and `fit` left them real CPU time.
    ds = ds.map_batches(decode_batch, fn_kwargs={"model": model, "demo_kind": kind_of},
                        batch_size=res.batch_size, num_cpus=res.decode_cpus,
                        compute=ray.data.TaskPoolStrategy(size=max(1, int(cpus))))
    return ds.map_batches(ACTORS[kind], fn_constructor_kwargs={"model": model, "demo_kind": kind_of, "opts": opts,
                                                               "threads": threads},
                          batch_size=res.batch_size, compute=pool, num_cpus=res.actor_cpus,
                          num_gpus=res.actor_gpus or None, scheduling_strategy="SPREAD")  # actors on every node


def check_options(kind: str, model: str, opts: dict) -> None:
    """What the CLI checks before loading a model, done on the driver before the cluster starts: the
    model folder, --template, and that --prompt fits (read from the config; no weights loaded)."""
    d = model_dir(model, DEMO_KIND[kind])
    if kind == "ask":
        check_template(opts["template"])
    if kind == "caption":
        from ... import Blip2Config
        import torch

        shell = argparse.Namespace(config=Blip2Config.from_pretrained(d), device=torch.device("cpu"))
        args = argparse.Namespace(**opts)
        try:
            fit_prompt(processor(model, DEMO_KIND[kind]), shell, args, opts.get("prompt") or "")
        except TooLong as e:
            raise UsageError(f"--prompt {short(opts.get('prompt'))}: {e}") from None


class Output:
    """The output folder: locked for one run, its finished ids, and the parts written as rows arrive."""

    def __init__(self, d: Path, kind: str, job: dict, shard_rows: int):
        self.d, self.kind, self.shard_rows = d, kind, shard_rows
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--output {d}: cannot create the folder ({e.strerror or e})") from None
        if not d.is_dir():
            raise UsageError(f"--output {d} is a file; --ray writes a folder")
        self.fd = lock(d / ".lock", d)
        import pyarrow.parquet as pq

        old = read_json(d / "job.json")
        if old is not None and old != job:
            diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            raise UsageError(f"--output {d} holds a job with other settings ({', '.join(diff)}); "
                             "re-run with the same ones to resume, or give another folder")
        _remove_leftovers(d)
        write_json(d / "job.json", job)
        self.parts = sorted(p for p in d.iterdir() if PART_RE.match(p.name))
        self.done: dict[str, str] = {}  # id -> error ("" when fine), of every finished row
        for p in self.parts:
            t = pq.read_table(p, columns=["id", "error"]).to_pydict()
            self.done.update(zip(t["id"], t["error"]))
        self.next = max((int(PART_RE.match(p.name).group(1)) + 1 for p in self.parts), default=0)
        self.buf: list[dict[str, np.ndarray]] = []
        self.buffered = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        drop = ("pixel_values",) if self.kind == "embed" else DROP  # embed: offsets go to metadata/
        drop = drop if self.kind == "ask" else (*drop, "questions")
        self.buf.append({k: v for k, v in batch.items() if k not in drop})
        self.buffered += len(batch["id"])
        for i, e in zip(batch["id"], batch["error"]):
            self.done[str(i)] = str(e)
        if self.buffered >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next part (vectors and metadata first: the part is the marker)."""
        if not self.buffered:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {k: np.concatenate([b[k] for b in self.buf]) for k in self.buf[0]}
        name = f"{self.next:05d}"
        if "embedding" in cols:
            emb = cols.pop("embedding")  # (n, Q, E)
            ok = np.array([not e for e in cols["error"]])
            (self.d / "img_emb").mkdir(exist_ok=True)
            (self.d / "metadata").mkdir(exist_ok=True)
            good = np.ascontiguousarray(emb[ok], dtype=np.float32)
            write_atomic(self.d / "img_emb" / f"img_emb_{name}.npy", lambda fh: np.save(fh, good))
            meta = pa.table({k: _arrow(k, cols[k][ok]) for k in ("id", "source", "offset", "size", "caption")})
            write_atomic(self.d / "metadata" / f"metadata_{name}.parquet", lambda fh: pq.write_table(meta, fh))
            for k in DROP[:2]:
                del cols[k]
            flat = emb.reshape(len(emb), -1)
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        table = pa.table({k: v if isinstance(v, pa.Array) else _arrow(k, v) for k, v in cols.items()})
        write_atomic(self.d / f"part-{name}.parquet", lambda fh: pq.write_table(table, fh))
        self.next += 1
        self.buf, self.buffered = [], 0

    def close(self) -> None:
        os.close(self.fd)


def _arrow(name: str, v: np.ndarray) -> Any:
    """A column as Arrow. Ray hands a missing string (no caption in a row) back as NaN when a block
    holds no string at all: such cells are nulls of the column's type."""
    import pyarrow as pa

    def cell(x: Any) -> Any:
        if x is None or isinstance(x, (float, np.floating)):
            return None
        return x.tolist() if isinstance(x, np.ndarray) else x

    if name in LIST_COLUMNS:
        return pa.array([cell(x) for x in v], type=pa.list_(pa.string()))
    if name in TEXT_COLUMNS:
        return pa.array([cell(x) for x in v], type=pa.string())
    return pa.array(v)


def _remove_leftovers(d: Path) -> None:
    """Temporary files of a run that died, and vectors whose part file was never written."""
    for p in list(d.glob(".*.tmp")) + list(d.glob("*/.*.tmp")):
        p.unlink(missing_ok=True)
    parts = {m.group(1) for p in d.iterdir() if (m := PART_RE.match(p.name))}
    for sub, stem in (("img_emb", "img_emb_"), ("metadata", "metadata_")):
        for p in (d / sub).glob(f"{stem}*") if (d / sub).is_dir() else ():
            if p.name[len(stem):].split(".")[0] not in parts:
                p.unlink()
    (d / "_SUCCESS").unlink(missing_ok=True)


def reason(error: str) -> str:
    """The failure class of an error message, for stats.json."""
    e = error.lower()
    for key, words in (("missing", ("no such file",)), ("download", ("cannot download",)),
                       ("too_large", ("pixel budget", "decompression bomb")), ("too_long", ("exceeds the",)),
                       ("empty", ("is empty",)), ("bad_image", ("corrupt", "truncated", "not an image", "unreadable")),
                       ("bad_row", ("not json", "not an object", "has no", "no question"))):
        if any(w in e for w in words):
            return key
    return "other"


def run_job(kind: str, inputs: list[str], output: str | os.PathLike, model: str, opts: dict,
            res: Resources | None = None, *, shard_rows: int = 1000, path_column: str | None = None,
            on_batch: Callable[[dict], None] | None = None) -> dict:
    """Run `kind` ("caption", "ask", "embed") over `inputs` into the folder `output`; resume what is
    there. Returns the stats written to stats.json. `on_batch(batch)` sees each finished batch."""
    res = res or Resources()
    check_options(kind, model, opts)
    rows, bad = read_inputs(inputs, path_column)
    if not rows and not bad:
        raise UsageError("nothing to do: the inputs hold no rows")
    d = Path(output)
    job = {"kind": kind, "model": model, "options": options(argparse.Namespace(model=model, **opts))}
    if kind == "ask":
        job["options"]["questions"] = list(opts.get("questions") or [])
    out = Output(d, kind, job, shard_rows)
    try:
        if kind == "embed":
            _write_embedding_meta(d, model)
        todo = [r for r in rows if r["id"] not in out.done]
        if len(todo) < len(rows):
            print(f"blip2: {len(rows) - len(todo)} row(s) already in {d}, skipping them", file=sys.stderr)
        t0, timing = time.time(), {}
        with Report(len(todo), bad) as rep:
            if todo:
                timing = _execute(kind, todo, model, opts, res, out, rep, on_batch)
            out.flush()
            stats = _stats(out, rows, kind, model, len(todo), time.time() - t0, timing)
            stats["failed_inputs"] = [{"input": s, "error": w} for s, w in bad]
            write_json(d / "stats.json", stats)
            write_atomic(d / "_SUCCESS", lambda fh: None)
            rep.finish(len(todo) + len(bad))
        return stats
    except BaseException:
        out.flush()  # Ctrl-C or a failure: the finished rows stay, and a re-run resumes after them
        raise
    finally:
        out.close()


def _execute(kind, todo, model, opts, res, out, rep, on_batch) -> dict:
    """Run the pipeline over `todo` into `out`: {"nodes", "first_batch_s", "first_batch_rows", "last_batch_s"}
    (times from the start, so that the steady rate leaves out the cluster's and the actors' start-up)."""
    import ray

    t0 = time.time()
    seen: dict = {}
    started = start_ray(res)
    try:
        ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / res.batch_size)))
        for batch in pipeline(ds, kind, model, opts, res).iter_batches(
                batch_size=None, batch_format="numpy"):
            seen.setdefault("first_batch_s", time.time() - t0)
            seen.setdefault("first_batch_rows", len(batch["id"]))
            seen["last_batch_s"] = time.time() - t0
            out.add(batch)
            for s, e in zip(batch["source"], batch["error"]):
                if e:
                    rep.fail(str(s), str(e))
            rep.step(len(batch["id"]))
            if on_batch is not None:
                on_batch(batch)
        return {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), **seen}
    finally:
        if started:
            ray.shutdown()


def _stats(out: Output, rows: list[dict], kind: str, model: str, n_run: int, seconds: float, timing: dict) -> dict:
    ids = [r["id"] for r in rows]
    errors = [out.done.get(i, "") for i in ids]
    failures: dict[str, int] = {}
    for e in errors:
        if e:
            failures[reason(e)] = failures.get(reason(e), 0) + 1
    return {"kind": kind, "model": model, "rows": len(ids), "ok": len(ids) - sum(failures.values()),
            "failed": sum(failures.values()), "failures": failures, "parts": out.next,
            "this_run": {"rows": n_run, "seconds": round(seconds, 3),
                         "rows_per_s": round(n_run / seconds, 3) if n_run and seconds > 0 else None,
                         "nodes": timing.get("nodes"), "first_batch_s": _round(timing.get("first_batch_s")),
                         "steady_rows_per_s": _steady(n_run, timing)}}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _steady(n_run: int, timing: dict) -> float | None:
    """Rows per second from the first batch received to the last: the rate once everything runs."""
    span = timing.get("last_batch_s", 0) - timing.get("first_batch_s", 0)
    return round((n_run - timing["first_batch_rows"]) / span, 3) if span > 0 and n_run > timing["first_batch_rows"] else None


def _write_embedding_meta(d: Path, model: str) -> None:
    """embeddings.json: the model (name and fingerprint) and the vectors' shape, for `blip2 index build`."""
    from ... import Blip2Config
    from ..cli.common import has_keys
    from ..index.store import EMB_META, model_identity

    md = model_dir(model, "retrieval")
    c = Blip2Config.from_pretrained(md)
    retrieval = has_keys(md, "vision_projection.")
    meta = {**model_identity(model), "queries": c.num_query_tokens,
            "dim": c.image_text_hidden_size if retrieval else c.qformer_config.hidden_size,
            "normalised": retrieval, "dtype": "float32",
            "what": "image_embeds of Blip2VisionModelWithProjection" if retrieval else "Q-Former query outputs"}
    old = read_json(d / EMB_META)
    if old is not None and old.get("fingerprint") != meta["fingerprint"]:
        raise UsageError(f"--output {d} holds embeddings of another model ({old.get('model')}, fingerprint "
                         f"{old.get('fingerprint')}); give another folder")
    write_json(d / EMB_META, meta)
