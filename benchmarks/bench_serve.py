"""Serving under load, in the spirit of vLLM's `bench serve`: `blip2 serve` (and, with --peer,
`transformers serve` 5.8.0) answering N concurrent streaming chat clients.

    .venv/bin/python benchmarks/bench_serve.py --model demo --concurrency 1,8 --requests 32
    .venv/bin/python benchmarks/bench_serve.py --layers 8 --concurrency 1,8 --requests 16 --max-tokens 32
    .venv/bin/python benchmarks/bench_serve.py --layers 8 --rates 0.5,1 --duration 60     # open loop
    .venv/bin/python benchmarks/bench_serve.py --model demo --peer --concurrency 1,8      # + transformers serve

Each run starts the server in its own process (`blip2 serve --port 0`, the port read from its
first line), waits for /health, then drives it with asyncio + httpx clients sending OpenAI chat
requests (one shipped example image as a data: URL and a question, `stream: true`). Closed loop
(--concurrency N): N clients, each sending its next request when the last one ends, until
--requests are done. Open loop (--rates R): Poisson arrivals at R requests/s for --duration s.
Every answer is exactly --max-tokens long (`min_tokens` = `max_tokens`, as vLLM's `ignore_eos`).

Reported per run: request throughput, output tokens/s, TTFT (arrival to first content chunk), TPOT
((last chunk - first chunk) / (tokens - 1) per request), ITL (every gap between two chunks), each
as median and p90; failed requests; the server's peak RSS (VmHWM) against the weights plus the KV
budget (--max-batch rows at the model's full positions).

--layers 8 serves the real-width 8-layer OPT-2.7b-shaped checkpoint that bench_caption.py builds
(`--layers 8 --build-only`, cached in benchmarks/.cache). It has random weights and no tokenizer,
so a serving copy beside it links its weights and adds the demo's BPE tokenizer, extended so that
every id of the 50,304 decodes to a word, and a 224 px processor config. A record with the CPU's
name and flags goes to benchmarks/records/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
EXAMPLES = ROOT / "src/blip2/apps/assets/demo/examples"
DEMO = ROOT / "src/blip2/apps/assets/demo/captioning"
QUESTIONS = ["what is in the picture?", "how many objects are there?", "what color is the large shape?",
             "is there a circle?"]


# --- the checkpoint ---
def serving_copy(layers: int, cache: Path) -> Path:
    """bench_caption.py's random checkpoint (built if missing) plus a tokenizer and a processor."""
    name = f"blip2-opt-2.7b-L{layers}-random-bf16"
    src = cache / name
    if not (src / "BUILD_OK.json").exists():
        subprocess.run([PY, str(HERE / "bench_caption.py"), "--layers", str(layers), "--build-only",
                        "--cache", str(cache)], check=True)
    dst = cache / f"serve-{name}"
    dst.mkdir(exist_ok=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        if not (dst / f).exists():
            (dst / f).symlink_to((src / f).resolve())
    cfg = json.loads((src / "config.json").read_text())
    vocab, image_id = cfg["text_config"]["vocab_size"], cfg["image_token_index"]
    tok = json.loads((DEMO / "tokenizer.json").read_text())
    have = tok["model"]["vocab"]
    taken = set(have.values()) | {t["id"] for t in tok["added_tokens"]}
    for t in tok["added_tokens"]:
        if t["content"] == "<image>":
            t["id"] = image_id
            taken.add(image_id)
    for i in range(vocab):  # "Ġw123" decodes to " w123": every id the random model emits is a word
        if i not in taken:
            have[f"Ġw{i}"] = i
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    tcfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    tcfg["model_max_length"] = cfg["text_config"].get("max_position_embeddings", 2048)
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    pcfg = json.loads((DEMO / "processor_config.json").read_text())
    pcfg["image_processor"]["size"] = {"height": 224, "width": 224}
    pcfg["num_query_tokens"] = cfg.get("num_query_tokens", 32)
    (dst / "processor_config.json").write_text(json.dumps(pcfg, indent=2))
    return dst


def weights_bytes(model: str) -> int:
    d = DEMO if model == "demo" else Path(model)
    return sum(p.stat().st_size for p in d.glob("*.safetensors")) + (
        sum(p.stat().st_size for p in (DEMO.parent / "retrieval").glob("*.safetensors")) if model == "demo" else 0)


def kv_bytes(model: str, rows: int, positions: int | None, dtype_bytes: int) -> int:
    """Keys and values of `rows` rows over `positions` positions (None: the model's maximum)."""
    cfg = json.loads(((DEMO if model == "demo" else Path(model)) / "config.json").read_text())["text_config"]
    E = cfg.get("hidden_size", 2560)
    positions = positions or cfg.get("max_position_embeddings", 2048)
    return rows * positions * cfg.get("num_hidden_layers", 32) * 2 * E * dtype_bytes


# --- the server ---
class Server:
    def __init__(self, cmd: list[str], ready: str, env: dict | None = None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, cwd=ROOT)
        self.lines: list[str] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the server exited:\n" + "".join(self.lines[-20:]))
            self.lines.append(line)
            m = re.search(ready, line)
            if m:
                self.url = m.group(1)
                return
        raise RuntimeError("the server did not start in 600 s")

    def peak_rss(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_blip2(model: str, args) -> Server:
    cmd = [str(ROOT / ".venv/bin/blip2"), "serve", "--model", model, "--port", "0", "--max-batch", str(args.max_batch),
           "--max-queue", "1024", "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
    return Server(cmd, r"serving .* on (http://\S+) ")


# --- the clients ---
def image_url(i: int) -> str:
    files = sorted(EXAMPLES.glob("*.png"))
    return "data:image/png;base64," + base64.b64encode(files[i % len(files)].read_bytes()).decode()


async def one_request(client, url: str, i: int, args, model_name: str) -> dict:
    body = {"model": model_name, "stream": True, "max_tokens": args.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(i)}},
                                                      {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]}
    body.update(args.extra_body)
    t0 = time.perf_counter()
    times, n_tokens, err = [], None, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if obj.get("error"):
                        err = obj["error"].get("message")
                        break
                    if obj.get("usage"):
                        n_tokens = obj["usage"]["completion_tokens"]
                    if any(c.get("delta", {}).get("content") for c in obj.get("choices", [])):
                        times.append(time.perf_counter())
    except Exception as e:  # a failed request is counted, not fatal
        err = f"{type(e).__name__}: {e}"
    if err is None and not times:
        err = "no content"
    return {"start": t0, "end": time.perf_counter(), "times": times, "tokens": n_tokens or len(times), "error": err}


async def closed_loop(url: str, concurrency: int, n: int, args, model_name: str) -> tuple[list[dict], float]:
    import httpx

    results: list[dict] = []
    counter = iter(range(n))
    async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def worker():
            for i in counter:
                results.append(await one_request(c, url, i, args, model_name))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


async def open_loop(url: str, rate: float, duration: float, args, model_name: str) -> tuple[list[dict], float]:
    import httpx

    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=1000)) as c:
        tasks, t0, i = [], time.perf_counter(), 0
        while time.perf_counter() - t0 < duration:
            tasks.append(asyncio.create_task(one_request(c, url, i, args, model_name)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    ttft = [r["times"][0] - r["start"] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in ok if len(r["times"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]

    def q(xs, p):
        return round(statistics.quantiles(xs, n=100, method="inclusive")[p - 1], 4) if len(xs) > 1 else (
            round(xs[0], 4) if xs else None)
    out_tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": round(wall, 2),
            "request_throughput": round(len(ok) / wall, 4), "output_tokens_per_s": round(out_tokens / wall, 3),
            "ttft_s": {"median": q(ttft, 50), "p90": q(ttft, 90)}, "tpot_s": {"median": q(tpot, 50), "p90": q(tpot, 90)},
            "itl_s": {"median": q(itl, 50), "p90": q(itl, 90)},
            "errors": sorted({r["error"] for r in results if r["error"]})[:5]}


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
    flags = re.search(r"flags\s*:\s*(.*)", info).group(1).split()
    import torch

    return {"cpu": name, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg_at_start": os.getloadavg()}


def run_side(label: str, server: Server, args, model_name: str) -> dict:
    url = server.url
    out = {"server": label, "runs": []}
    asyncio.run(closed_loop(url, 1, args.warmup, args, model_name))  # first-call costs stay out of the figures
    for c in args.concurrency:
        res, wall = asyncio.run(closed_loop(url, c, max(args.requests, c), args, model_name))
        s = {"mode": "closed", "concurrency": c, **summarize(res, wall)}
        out["runs"].append(s)
        print(f"[{label}] {c:>3} clients: {s['output_tokens_per_s']:8.2f} tok/s  {s['request_throughput']:.3f} req/s  "
              f"TTFT {s['ttft_s']}  TPOT {s['tpot_s']}  failed {s['failed']}", flush=True)
    for rate in args.rates:
        res, wall = asyncio.run(open_loop(url, rate, args.duration, args, model_name))
        s = {"mode": "open", "rate": rate, **summarize(res, wall)}
        out["runs"].append(s)
        print(f"[{label}] rate {rate}/s: {s['output_tokens_per_s']:8.2f} tok/s  TTFT {s['ttft_s']}  "
              f"failed {s['failed']}", flush=True)
    out["peak_rss_bytes"] = server.peak_rss()
    out["server_metrics"] = server_metrics(url)
    return out


def server_metrics(url: str) -> dict:
    """blip2 serve's own view over all runs: mean decode-step time and rows per step (empty for the peer)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=30).text
    except Exception:
        return {}
    v = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(blip2_\w+) (\S+)$", text, re.M)}
    if not v.get("blip2_decode_step_seconds_count"):
        return {}
    n = v["blip2_decode_step_seconds_count"]
    return {"decode_steps": int(n), "step_mean_s": round(v["blip2_decode_step_seconds_sum"] / n, 4),
            "rows_per_step_mean": round(v["blip2_decode_batch_rows_sum"] / n, 2)}


# --- the peer: transformers serve ---
PEER_PROCESSOR = """from transformers import Blip2Processor


class Blip2ChatProcessor(Blip2Processor):
    \"\"\"Blip2Processor that keeps the chat template it is given (the stock one drops it).\"\"\"

    def __init__(self, image_processor, tokenizer, num_query_tokens=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, num_query_tokens=num_query_tokens, **kwargs)
        self.chat_template = chat_template
"""
# The same prompt as blip2 serve renders: "Question: ... Answer: ..." turns (images are put in front
# by the processor, which expands the query tokens itself).
PEER_TEMPLATE = """{%- set ns = namespace(out='') -%}
{%- for m in messages -%}
{%- set text = (m.content if m.content is string else (m.content | selectattr('type', 'equalto', 'text')
    | map(attribute='text') | join(' '))) | trim -%}
{%- if m.role == 'user' -%}{%- set ns.out = ns.out ~ ' Question: ' ~ text ~ ' Answer:' -%}
{%- elif m.role == 'assistant' -%}{%- set ns.out = ns.out ~ ' ' ~ text -%}{%- endif -%}
{%- endfor -%}
{{- ns.out | trim -}}"""


def peer_copy(model: str) -> Path:
    """A temporary copy of the checkpoint (weights linked) whose processor keeps a chat template,
    loaded by transformers through --trust-remote-code and an auto_map entry."""
    import tempfile

    src = DEMO if model == "demo" else Path(model)
    dst = Path(tempfile.mkdtemp(prefix="blip2-peer-"))
    for f in src.iterdir():
        if f.name != "processor_config.json":
            (dst / f.name).symlink_to(f.resolve())
    pcfg = json.loads((src / "processor_config.json").read_text())
    pcfg.update(processor_class="Blip2ChatProcessor",
                auto_map={"AutoProcessor": "processing_blip2chat.Blip2ChatProcessor"})
    (dst / "processor_config.json").write_text(json.dumps(pcfg, indent=2))
    (dst / "processing_blip2chat.py").write_text(PEER_PROCESSOR)
    (dst / "chat_template.jinja").write_text(PEER_TEMPLATE)
    return dst


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_peer(model: str, args) -> dict:
    d = peer_copy(model)
    port = free_port()
    cmd = [str(ROOT / ".venv/bin/transformers"), "serve", str(d), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", args.dtype, "--trust-remote-code", "--log-level", "info"]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None  # as blip2's --threads
    srv = Server(cmd, r"Uvicorn running on (http://\S+)", env)
    srv.url = srv.url.rstrip("/")
    # transformers serve takes no min_tokens: exact lengths go through its generation_config field
    gen = {"max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens, "do_sample": False}
    peer_args = argparse.Namespace(**{**vars(args), "extra_body": {"generation_config": json.dumps(gen)}})
    try:
        return run_side("transformers serve", srv, peer_args, str(d))
    finally:
        srv.stop()


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="demo or a checkpoint directory (default: demo)")
    ap.add_argument("--layers", type=int, default=None, help="serve bench_caption.py's real-width L-layer checkpoint")
    ap.add_argument("--concurrency", type=ints, default=[1, 8], help="closed-loop client counts (default 1,8)")
    ap.add_argument("--requests", type=int, default=16, help="requests per closed-loop run (at least the clients)")
    ap.add_argument("--rates", type=floats, default=[], help="open-loop request rates (requests/s)")
    ap.add_argument("--duration", type=float, default=60, help="seconds of each open-loop run")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (exactly: min_tokens too)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="server weights dtype (default: float32 for demo, bfloat16 else)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests before the runs")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a client waits for one request")
    ap.add_argument("--peer", action="store_true", help="also measure `transformers serve` on the same checkpoint")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--records", type=Path, default=HERE / "records")
    args = ap.parse_args(argv)

    model = str(serving_copy(args.layers, args.cache)) if args.layers else (args.model or "demo")
    args.dtype = args.dtype or ("float32" if model == "demo" else "bfloat16")
    args.extra_body = {"min_tokens": args.max_tokens}
    record = {"timestamp": dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "command": sys.argv, "machine": machine(),
              "model": "demo" if model == "demo" else f"blip2-opt-2.7b-L{args.layers}-random-bf16",
              "settings": {k: v for k, v in vars(args).items() if k not in ("cache", "records")}, "sides": []}
    srv = start_blip2(model, args)
    try:
        side = run_side("blip2", srv, args, "blip2")
    finally:
        srv.stop()
    wb = weights_bytes(model)  # as stored; served in the same dtype (fp32 demo, bf16 L8)
    nb = 2 if args.dtype in ("bfloat16", "float16") else 4
    kv_full = kv_bytes(model, args.max_batch, None, nb)  # --max-batch rows at the model's full positions
    kv_run = kv_bytes(model, min(args.max_batch, max(args.concurrency)), 64 + args.max_tokens, nb)  # what runs here
    side.update(weights_bytes=wb, kv_full_bytes=kv_full, kv_run_bytes=kv_run,
                rss_over_weights_plus_kv=round(side["peak_rss_bytes"] / (wb + kv_full), 3),
                rss_over_weights_plus_run_kv=round(side["peak_rss_bytes"] / (wb + kv_run), 3))
    record["sides"].append(side)
    if args.peer:
        record["sides"].append(run_peer(model, args))
    record["summary"] = summary(record)
    args.records.mkdir(exist_ok=True)
    path = args.records / f"{record['timestamp']}-serve.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["summary"], indent=1))
    print(f"wrote {path}")
    return 0


def summary(record: dict) -> dict:
    """Ratios the issue's targets are stated in: N clients against one at a time, per server."""
    out = {}
    for side in record["sides"]:
        runs = {r["concurrency"]: r for r in side["runs"] if r["mode"] == "closed"}
        s = {"peak_rss_gib": round(side["peak_rss_bytes"] / 2**30, 3)}
        for k in ("rss_over_weights_plus_kv", "rss_over_weights_plus_run_kv"):
            if k in side:
                s[k] = side[k]
        if 1 in runs:
            for c, r in runs.items():
                if c == 1:
                    continue
                if runs[1]["output_tokens_per_s"]:
                    s[f"tokens_per_s_{c}_over_1"] = round(r["output_tokens_per_s"] / runs[1]["output_tokens_per_s"], 2)
                if runs[1]["tpot_s"]["median"] and r["tpot_s"]["median"]:
                    s[f"tpot_{c}_over_1"] = round(r["tpot_s"]["median"] / runs[1]["tpot_s"]["median"], 2)
                if runs[1]["ttft_s"]["median"] and r["ttft_s"]["median"]:
                    s[f"ttft_{c}_over_1"] = round(r["ttft_s"]["median"] / runs[1]["ttft_s"]["median"], 2)
        s["open_loop"] = [{"rate": r["rate"], "ttft_p90_s": r["ttft_s"]["p90"], "failed": r["failed"]}
                          for r in side["runs"] if r["mode"] == "open"]
        out[side["server"]] = s
    if len(record["sides"]) == 2:  # blip2 against the peer, client count by client count
        a, b = ({r["concurrency"]: r for r in side["runs"] if r["mode"] == "closed"} for side in record["sides"])
        out["blip2_over_peer_tokens_per_s"] = {c: round(a[c]["output_tokens_per_s"] / b[c]["output_tokens_per_s"], 2)
                                               for c in a if c in b and b[c]["output_tokens_per_s"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
