"""Dataset jobs on Ray Data (apps/jobs) against the plain `blip2 caption`, and a simulated cluster.

    .venv/bin/python benchmarks/bench_jobs.py                          # demo model, 32 and 64 images
    .venv/bin/python benchmarks/bench_jobs.py --images 16,32 --model DIR --size 224
    .venv/bin/python benchmarks/bench_jobs.py --multinode              # two Ray nodes on this machine, one stopped mid-run

Throughput: the same drawn scenes captioned by `blip2 caption DIR --jsonl -o FILE` and by
`blip2 caption --ray DIR -o OUT` (a local cluster started by the command), each in its own process,
for two image counts N1 < N2, the sides alternating. Wall times include start-up (model load; for
Ray also the cluster and the actor's process, which varies by tens of seconds on a busy machine),
so the plain steady rate is taken from the difference, (N2 - N1) / (t(N2) - t(N1)) rows/s, and
Ray's from its stats.json (rows after the first batch / time from the first batch to the last);
the overhead is 1 - Ray's rate / the plain rate.

Multi-node: a head node and a worker node (`ray start --block`, each with its own --num-cpus),
a job that joins them with --ray-address and two half-CPU actors, and the worker node stopped
(its process group killed: `ray start`, raylet and workers) once an eighth of the rows are written; the job must finish
with every row once. The record says which nodes made rows before and after the stop.

A record goes to benchmarks/records/<timestamp>-jobs.json with the machine (CPU model and flags)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_caption import machine_info  # noqa: E402

BLIP2 = [sys.executable, "-m", "blip2.apps.cli.main"]


def draw(d: Path, n: int, size: int) -> None:
    from blip2 import scenes

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for i, s in enumerate(scenes.dataset(n, seed=7)):
        scenes.render(s, size).save(d / f"{i:05d}.png")


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.time() - t


def parts_of(p: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(p, columns=["id", "worker"]).to_pylist()


def parts(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("part-*.parquet")) for r in parts_of(p)]


def throughput(args, work: Path) -> dict:
    n1, n2 = args.images
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    walls: dict[str, dict[int, list[float]]] = {"plain": {n1: [], n2: []}, "ray": {n1: [], n2: []}}
    steady: dict[int, list[float]] = {n1: [], n2: []}
    for n in (n1, n2):
        draw(work / f"imgs{n}", n, args.size)
    common = ["--model", args.model, "--batch-size", str(args.batch_size)]
    for rep in range(args.reps):
        for n in (n1, n2):
            for side in ("plain", "ray"):
                out = work / f"out-{side}-{n}"
                if out.is_file():
                    out.unlink()
                shutil.rmtree(out, ignore_errors=True)
                if side == "plain":
                    cmd = [*BLIP2, "caption", str(work / f"imgs{n}"), *common, "--jsonl", "-o", str(out)]
                else:
                    cmd = [*BLIP2, "caption", "--ray", str(work / f"imgs{n}"), *common, "-o", str(out)]
                walls[side][n].append(timed(cmd, env))
                if side == "ray":  # the job's own rate from its first batch to its last
                    steady[n].append(json.loads((out / "stats.json").read_text())["this_run"]["steady_rows_per_s"])
                print(f"rep {rep} {side} {n} images: {walls[side][n][-1]:.1f} s", flush=True)
    best = {s: {n: min(v) for n, v in w.items()} for s, w in walls.items()}
    plain = (n2 - n1) / max(1e-9, best["plain"][n2] - best["plain"][n1])
    ray = max(steady[n2])
    return {"images": [n1, n2], "size": args.size, "model": args.model, "batch_size": args.batch_size,
            "walls_s": walls, "best_wall_s": best, "ray_steady_rows_per_s": steady,
            "steady_rows_per_s": {"plain": round(plain, 3), "ray": ray},
            "ray_overhead": round(1 - ray / plain, 3),
            "end_to_end_wall_ratio": {n: round(best["ray"][n] / best["plain"][n], 3) for n in (n1, n2)}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multinode(args, work: Path) -> dict:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    addr = f"127.0.0.1:{port}"
    # token auth off: `ray start` and the job's driver would each make their own token (loopback only)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_worker_niceness": "0",
           "RAY_AUTH_MODE": "disabled"}
    common = ["--object-store-memory", str(200 << 20), "--block"]
    head = subprocess.Popen([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard", "false", *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(8)
    node = subprocess.Popen([ray_bin, "start", "--address", addr, "--num-cpus", "1", *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(8)
    n = args.multinode_images
    draw(work / "mn-imgs", n, args.size)
    out = work / "mn-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*BLIP2, "caption", "--ray", str(work / "mn-imgs"), "--model", args.model, "-o", str(out),
           "--ray-address", addr, "--actors", "2", "--actor-cpus", "0.5", "--threads", "1",
           "--batch-size", "2", "--shard-rows", "2", "--num-beams", "4", "--num-captions", "4"]  # slower rows
    res: dict = {"images": n, "nodes_started": 2}
    t = time.time()
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while len(parts(out)) < n // 8 and job.poll() is None:
            time.sleep(0.1)
        before = parts(out)
        res["node_stop_at_s"] = round(time.time() - t, 1)
        os.killpg(node.pid, signal.SIGKILL)  # the worker node dies at once: `ray start`, raylet, workers
        node.wait(timeout=120)
        stopped = time.time()
        res["node_gone_at_s"] = round(stopped - t, 1)
        _, err = job.communicate(timeout=1800)
        res["job_exit"] = job.returncode
        res["wall_s"] = round(time.time() - t, 1)
        rows = parts(out)
        ids = [r["id"] for r in rows]
        res.update(rows=len(ids), unique=len(set(ids)), every_row_once=sorted(ids) == sorted(
            str(p) for p in (work / "mn-imgs").glob("*.png")))
        nodes = lambda rs: sorted({r["worker"].split("/")[1].split(":")[0] for r in rs})  # noqa: E731
        res["rows_before_stop"], res["nodes_before_stop"] = len(before), nodes(before)
        late = [p for p in out.glob("part-*.parquet") if p.stat().st_mtime > stopped]  # written once it was gone
        res["rows_after_node_gone"] = sum(len(parts_of(p)) for p in late)
        res["nodes_after_node_gone"] = nodes([r for p in late for r in parts_of(p)])
        res["stderr_tail"] = err[-600:]
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGINT)
            job.wait(timeout=60)
        for p in (node, head):  # each node is a process group of its own (start_new_session)
            for sig in (signal.SIGTERM, signal.SIGKILL):  # then what `ray start` left behind
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="32,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--size", type=int, default=224, help="side of the drawn images")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--multinode", action="store_true")
    ap.add_argument("--multinode-images", type=int, default=24)
    ap.add_argument("--work", default="/tmp/blip2-bench-jobs")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rec = new_record()
    if not args.skip_throughput:
        rec["throughput"] = throughput(args, work)
        print(json.dumps(rec["throughput"], indent=1), flush=True)
    if args.multinode:
        rec["multinode"] = multinode(args, work)
        print(json.dumps(rec["multinode"], indent=1))
    write_record(rec, "jobs")


def loadavg() -> list[str]:
    with open("/proc/loadavg") as fh:
        return fh.read().split()[:3]


def new_record() -> dict:
    """A record's start: when, the command, the machine (CPU model and flags) and how busy it was
    (the machine is shared)."""
    return {"timestamp": dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "command": sys.argv,
            "machine": machine_info(threads=2), "loadavg_at_start": loadavg()}


def write_record(rec: dict, what: str) -> None:
    rec["loadavg_at_end"] = loadavg()
    out = HERE / "records" / f"{rec['timestamp']}-{what}.json"
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
