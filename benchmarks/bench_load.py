"""Load time and peak resident memory of from_pretrained, each setting in a fresh process.

    python benchmarks/bench_load.py CKPT_DIR [--quantize none int8 int4] [--dtype bfloat16]

Per setting it prints: load seconds; `base` RSS after importing torch + blip2 (the interpreter's
own share); `peak` ru_maxrss up to the end of the load; `touched` ru_maxrss after reading every
weight once (what a first forward pass makes resident: mmapped weights count only when read);
and `weights`, the bytes of the loaded model's tensors (ViT/Q-Former in dtype, int LM linears,
scales, embeddings, norms). `peak-base` / weights and `decode-base` / weights are the ratios
that matter for a large model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(d: str, quantize: str | None, dtype: str) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import blip2

    base = _rss_now()
    t0 = time.perf_counter()
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(d, dtype=getattr(torch, dtype), quantize=quantize)
    load_s = time.perf_counter() - t0
    peak = _maxrss()
    seen, nbytes = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_meta or id(t) in seen:
            continue
        seen.add(id(t))
        nbytes += t.numel() * t.element_size()
        t.detach().view(-1)[:: max(1, 4096 // t.element_size())].sum()  # touch every page once
    touched = _maxrss()
    head = m.language_model.get_output_embeddings()
    with torch.no_grad():  # one decode-step product: makes what decoding keeps besides the weights (a packed head copy)
        head(torch.zeros(1, head.in_features, dtype=head.weight.dtype))
    decode = _maxrss()
    return {"quantize": quantize or "none", "load_s": round(load_s, 2), "base_MiB": round(base / MiB),
            "peak_MiB": round(peak / MiB), "touched_MiB": round(touched / MiB), "decode_MiB": round(decode / MiB),
            "weights_MiB": round(nbytes / MiB), "peak_minus_base_over_weights": round((peak - base) / nbytes, 3),
            "decode_minus_base_over_weights": round((decode - base) / nbytes, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        q = a.quantize[0]
        print(json.dumps(child(a.ckpt, None if q == "none" else q, a.dtype)))
        return
    for q in a.quantize:
        out = subprocess.run([sys.executable, __file__, a.ckpt, "--child", "--dtype", a.dtype, "--quantize", q],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{q}: failed\n{out.stderr[-2000:]}")
            continue
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
