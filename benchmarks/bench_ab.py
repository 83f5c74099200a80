"""Phase A/B in one process: the vision tower, image + prefill + first token, and a decode step,
transformers 5.8.0 against blip2 on the same checkpoint, call by call in turns.

    .venv/bin/python benchmarks/bench_ab.py --layers 8 --threads 1      # after bench_caption.py --layers 8 --build-only
    .venv/bin/python benchmarks/bench_ab.py --layers 8 --threads 2 --rounds 8 --quantize int8

bench_caption.py runs each library in its own process, which is what a user sees (load time,
memory) but on a machine shared with other work, minutes apart, its runs differ by 2x. Here both
models live in one process and each phase alternates between them round by round, so load from
elsewhere hits both alike; the record gives the best and the median of each, and the ratio of
medians of per-round ratios. Writes benchmarks/records/<stamp>-ab.json with the CPU, its flags, the
threads, the load average and blip2's dispatch choices.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_jobs import new_record, write_record  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="the bench_caption.py checkpoint with this many layers a tower")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--quantize", choices=("int8", "int4"), default=None, help="blip2's language model only")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file

    import blip2
    from blip2.backends.cpu import runtime

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    ck = args.cache / f"blip2-opt-2.7b-L{args.layers}-random-bf16"
    if not (ck / "BUILD_OK.json").exists():
        raise SystemExit(f"{ck} missing: run benchmarks/bench_caption.py --layers {args.layers} --build-only")
    px = load_file(str(ck / "inputs.safetensors"))["pixel_values"][:1].bfloat16()
    models = {
        "transformers": transformers.Blip2ForConditionalGeneration.from_pretrained(ck, dtype=torch.bfloat16).eval(),
        "blip2": blip2.Blip2ForConditionalGeneration.from_pretrained(
            ck, dtype=torch.bfloat16, **({"quantize": args.quantize} if args.quantize else {})).eval(),
    }

    def vision(m):
        m.vision_model(pixel_values=px)

    def prefill(m):
        m.generate(pixel_values=px, max_new_tokens=1, min_new_tokens=1)

    def caption(m):
        m.generate(pixel_values=px, max_new_tokens=9, min_new_tokens=9)

    phases = {"vision_s": vision, "prefill_s": prefill, "caption10_s": caption}
    out: dict = {}
    with torch.inference_mode():
        for name, f in phases.items():
            for m in models.values():
                f(m)  # warm-up (and blip2's one-off dispatch measurements)
            t: dict[str, list[float]] = {k: [] for k in models}
            for r in range(args.rounds):
                for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                    a = time.perf_counter()
                    f(models[k])
                    t[k].append(time.perf_counter() - a)
            ratio = statistics.median(a / b for a, b in zip(t["transformers"], t["blip2"]))
            out[name] = {k: {"best": min(v), "median": statistics.median(v)} for k, v in t.items()}
            out[name]["speedup_median_of_ratios"] = ratio
            print(f"{name:12s} transformers {min(t['transformers']):7.3f} s | blip2 {min(t['blip2']):7.3f} s (best) "
                  f"| speed-up {ratio:.2f}x (median of per-round ratios)", flush=True)
    # decode per token from the 10-token caption and the 1-token prefill
    for k in models:
        out.setdefault("decode_ms_per_token", {})[k] = 1e3 * (out["caption10_s"][k]["median"] - out["prefill_s"][k]["median"]) / 9
    d = out["decode_ms_per_token"]
    print(f"decode       transformers {d['transformers']:7.1f} ms | blip2 {d['blip2']:7.1f} ms per token "
          f"({d['transformers'] / d['blip2']:.2f}x, from medians)")
    rt = runtime.describe(measure=False)
    rec = new_record()
    rec.update(checkpoint=str(ck.name), threads=args.threads, rounds=args.rounds, quantize=args.quantize,
               transformers=transformers.__version__, kernels=rt["kernels"],
               dispatch={r["op"]: r["choice"] for r in rt["dispatch"]}, phases=out)
    write_record(rec, "ab")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
