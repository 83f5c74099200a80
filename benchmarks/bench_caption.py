"""Captioning speed: `blip2` against transformers 5.8.0 on the same BLIP-2 OPT-2.7b checkpoint.

    .venv/bin/python benchmarks/bench_caption.py                # full size, bf16, 3 reps each
    .venv/bin/python benchmarks/bench_caption.py --tiny         # the same flow in seconds
    .venv/bin/python benchmarks/bench_caption.py --layers 2     # full widths, 2 layers per tower
    .venv/bin/python benchmarks/bench_caption.py --tiny --only transformers
    .venv/bin/python benchmarks/bench_caption.py --layers 2 --reps 1 --threads 1 --compile --quantize int8

Figures per implementation: load and load + first caption, peak RSS, batch-1 caption latency split
into image+prefill and decode ms/token, the decode bandwidth floor (LM weight bytes per token / the
measured read bandwidth), captions/s per --batches size, and k questions about one image.

The checkpoint has random weights and the architecture of Salesforce/blip2-opt-2.7b; it is built once
with transformers' own save_pretrained (bf16 safetensors) under benchmarks/.cache/. Every
measurement runs in a fresh child process (this same file with --_child), alternating the two
implementations, so load time and peak RSS belong to one implementation and memory never adds up.
The parent never imports torch: it only starts children, collects their JSON and prints.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMPLS = ("transformers", "blip2")

# Questions about one image, as token ids (the random checkpoint has no tokenizer). Their lengths are
# those of GPT-2/OPT tokenisations of "Question: what is in the picture? Answer:" style prompts;
# the ids are arbitrary ordinary tokens, the same on both sides.
QUESTIONS = [
    [24361, 35, 99, 16, 11, 5, 2170, 116, 31652, 35],
    [24361, 35, 99, 3195, 16, 5, 4884, 116, 31652, 35],
    [24361, 35, 141, 171, 82, 32, 89, 116, 31652, 35],
    [24361, 35, 147, 16, 42, 2170, 551, 116, 31652, 35],
]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]
RESULT_TAG = "@@RESULT@@ "  # the child's last stdout line starting with this carries its JSON

# Salesforce/blip2-opt-2.7b config.json as published on the hub (transformers_version 4.47.0.dev0).
# Only the keys that differ from the Blip2Config / Blip2VisionConfig / Blip2QFormerConfig / OPTConfig
# defaults are listed; the vision and Q-Former towers are the defaults (ViT-g 39x1408, Q-Former 12x768).
OPT_2_7B_TEXT = dict(
    model_type="opt", vocab_size=50304,  # 50272 real tokens padded to a multiple of 64 (+ image token 50265)
    hidden_size=2560, word_embed_proj_dim=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
    eos_token_id=50118,  # "\n": captions stop at a newline, as in LAVIS
    activation_dropout=0.0, prefix="</s>",
)
OPT_2_7B = dict(image_token_index=50265, num_query_tokens=32, image_text_hidden_size=256)

# Tiny towers for --tiny (the shapes of tests/hf_tiny.py, slightly wider so there is work to time).
TINY = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=56, patch_size=14),
    qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=99, max_position_embeddings=64),
    text=dict(model_type="opt", vocab_size=128, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
              num_attention_heads=4, ffn_dim=128, max_position_embeddings=128,
              eos_token_id=50),  # an EOS distinct from BOS (2), as in the real config
    top=dict(image_token_index=127, num_query_tokens=8, image_text_hidden_size=32),
)

# CLIP normalisation (BlipImageProcessor's defaults for BLIP-2): pixel values look like real inputs.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# checkpoint

def config_kwargs(tiny: bool, layers: int | None) -> dict:
    """Keyword arguments for transformers.Blip2Config (plain data, so the parent can log it)."""
    if tiny:
        kw = dict(vision_config=dict(TINY["vision"]), qformer_config=dict(TINY["qformer"]),
                  text_config=dict(TINY["text"]), **TINY["top"])
    else:
        kw = dict(vision_config={}, qformer_config={}, text_config=dict(OPT_2_7B_TEXT), **OPT_2_7B)
    if layers is not None:  # same widths, fewer layers: exercises the build at full width cheaply
        for k in ("vision_config", "qformer_config", "text_config"):
            kw[k]["num_hidden_layers"] = layers
    return kw


def ckpt_name(tiny: bool, layers: int | None, seed: int) -> str:
    return ("tiny" if tiny else "blip2-opt-2.7b") + (f"-L{layers}" if layers is not None else "") + \
        (f"-s{seed}" if seed else "") + "-random-bf16"


def build(out: Path, kw: dict, n_images: int, seed: int) -> dict:
    """Write a random bf16 checkpoint with transformers' save_pretrained, plus fixed pixel inputs.

    Built on the meta device and materialised straight in bf16 (to_empty), so the peak is one bf16
    copy of the weights (~7.5 GB full size), not an fp32 model plus a cast.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.Blip2Config(**kw)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.Blip2ForConditionalGeneration(config)
    model = model.to(torch.bfloat16)  # still meta: free
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the tied lm_head its own storage; re-tie before filling
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr(), "lm_head not tied"
    assert not list(model.buffers()), "buffers would be left uninitialised by to_empty"

    # Fan-in init (as tests/hf_tiny.py): matrices (the patch conv included) std 1/sqrt(fan_in),
    # learned queries / class / position embeddings O(1), norm scales near 1, small biases.
    # Activations stay O(1)-ish through the deep towers. normal_ fills bf16 in place.
    # OPT's token/position embeddings get OPT's own init std 0.02 instead: the lm_head is tied to
    # embed_tokens, and with O(1) embeddings the current token's own logit (|e|^2 ~ d) wins every
    # step, so greedy decoding just repeats BOS -- a useless check of token ids.
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():  # named_parameters skips the tied duplicate
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith("language_model.") and "embed" in name:
                p.normal_(0.0, 0.02, generator=g)
            elif leaf in ("query_tokens", "class_embedding", "position_embedding"):
                p.normal_(0.0, 1.0, generator=g)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=g)
            elif "norm" in name.lower() and leaf == "weight":
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)
            n += p.numel()
    t_init = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(str(out))
    t_save = time.perf_counter() - t0 - t_init

    vc = config.vision_config
    px = torch.rand(n_images, 3, vc.image_size, vc.image_size, generator=torch.Generator().manual_seed(seed + 1))
    px = (px - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    save_file({"pixel_values": px.contiguous()}, str(out / "inputs.safetensors"))
    info = dict(params=n, init_s=round(t_init, 2), save_s=round(t_save, 2), image_size=vc.image_size,
                n_images=n_images, seed=seed, config=kw, transformers=transformers.__version__)
    (out / "BUILD_OK.json").write_text(json.dumps(info, indent=1))  # written last: marks a complete build
    return info


# ----------------------------------------------------------------------------------------------
# child: one implementation, one process

def rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(spec: dict) -> dict:
    """Load, warm up, time. A failure is caught and returned with whatever was measured before it
    (e.g. load time and RSS still count when generate raises)."""
    r: dict = dict(impl=spec["impl"], stage="import")
    try:
        _measure(spec, r)
    except Exception as e:  # reported to the parent, which prints it
        r["error"] = f"{r['stage']}: {type(e).__name__}: {e}"[:400]
        r["stderr_tail"] = "\n".join(traceback.format_exc().strip().splitlines()[-12:])
    r.pop("stage", None)
    return r


def read_bandwidth(dev, gib: float = 1.0, reps: int = 5) -> float:
    """The machine's memory read bandwidth in bytes/s: best of `reps` sums over a `gib` GiB fp32
    tensor (far larger than any cache, so every byte comes from DRAM / HBM)."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=dev)
    x.sum()  # first touch, thread pool / kernel warm-up
    best = math.inf
    for _ in range(reps):
        t = clock(dev)
        x.sum().item()
        best = min(best, clock(dev) - t)
    n = x.numel() * x.element_size()
    del x
    return n / best


def clock(dev) -> float:
    """perf_counter after the device has finished its queued work."""
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)
    return time.perf_counter()


def matmul_rate(dev, dtype) -> float:
    """The best matrix-product rate in FLOP/s of (512, 2048) @ (2048, 2048) in dtype and in fp32 (the
    CPU's best precision decides the compute floor of the image + prefill phase)."""
    import torch

    best = 0.0
    for dt in {dtype, torch.float32}:
        a, b = torch.randn(512, 2048, device=dev, dtype=dt), torch.randn(2048, 2048, device=dev, dtype=dt)
        a @ b
        for _ in range(5):
            t = clock(dev)
            a @ b
            best = max(best, 2 * 512 * 2048 * 2048 / (clock(dev) - t))
    return best


def image_prefill_flops(c, prompt_len: int) -> float:
    """FLOPs of the vision tower, the Q-Former and the LM prefill (+ one head row) for one image: 2 per
    multiply-add of every matrix product, attention included."""
    v, q, t = c.vision_config, c.qformer_config, c.text_config
    T = (v.image_size // v.patch_size) ** 2 + 1
    f = 2 * T * 3 * v.patch_size**2 * v.hidden_size  # patch embedding
    f += v.num_hidden_layers * (2 * T * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
                                + 4 * T * T * v.hidden_size)
    Q = c.num_query_tokens
    per = 2 * Q * (4 * q.hidden_size**2 + 2 * q.hidden_size * q.intermediate_size) + 4 * Q * Q * q.hidden_size
    cross = 2 * Q * 2 * q.hidden_size**2 + 2 * T * 2 * v.hidden_size * q.hidden_size + 4 * Q * T * q.hidden_size
    f += q.num_hidden_layers * per + (q.num_hidden_layers + 1) // 2 * cross
    f += 2 * Q * q.hidden_size * t.hidden_size  # language projection
    P = prompt_len
    f += t.num_hidden_layers * (2 * P * (4 * t.hidden_size**2 + 2 * t.hidden_size * t.ffn_dim) + 4 * P * P * t.hidden_size)
    f += 2 * t.hidden_size * t.vocab_size  # the last position's logits
    return float(f)


def lm_bytes_per_token(model) -> int:
    """Bytes of language-model weights one decode step reads: every tensor of the LM (int8/int4
    weights with their scales, norms, biases) except embedding tables, which are looked up one row
    at a time -- unless the table is also the lm_head matrix (tied), which is read in full."""
    from torch import nn

    lm = model.language_model
    head = model.get_output_embeddings()
    head_ptrs = {t.data_ptr() for t in head.parameters()}
    emb_ptrs = {m.weight.data_ptr() for m in lm.modules() if isinstance(m, nn.Embedding)}
    tensors = [*lm.parameters(), *lm.buffers(), *head.parameters()]
    seen, total = set(), 0
    for t in tensors:
        p = t.data_ptr()
        if t.is_meta or p in seen or (p in emb_ptrs and p not in head_ptrs):
            continue
        seen.add(p)
        total += t.numel() * t.element_size()
    return total


def _measure(spec: dict, r: dict) -> None:
    """Fill r stage by stage; r["stage"] names the one running, for the error message."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"] if spec["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    r["device"] = str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    blip2_side = spec["impl"] == "blip2"
    if not blip2_side:
        import transformers

        transformers.logging.set_verbosity_error()
        Model = transformers.Blip2ForConditionalGeneration
        r["version"] = transformers.__version__
    else:
        try:
            from blip2 import Blip2ForConditionalGeneration as Model
        except ImportError:  # not re-exported from the package yet
            from blip2.models.blip2 import Blip2ForConditionalGeneration as Model
        import blip2

        r["version"] = getattr(blip2, "__version__", "?")
    from safetensors.torch import load_file

    dtype = getattr(torch, spec["dtype"])
    px8 = load_file(str(Path(spec["ckpt"]) / "inputs.safetensors"))["pixel_values"].to(dev, dtype)
    r["import_s"] = time.perf_counter() - t0

    def pixels(b: int):  # b images: the stored ones, repeated when b is larger
        return px8.repeat((b + len(px8) - 1) // len(px8), 1, 1, 1)[:b]

    r["stage"] = "load"
    t = clock(dev)
    q = spec.get("quantize") if blip2_side else None
    kw = {"quantize": q} if q else {}
    if dev.type != "cpu":
        kw["device_map"] = str(dev)
    model = Model.from_pretrained(spec["ckpt"], dtype=dtype, **kw)
    model.eval()
    r["load_s"] = clock(dev) - t
    r["rss_after_load_gib"] = rss_gib()
    r["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    r["lm_bytes_per_token"] = lm_bytes_per_token(model)

    N = spec["new_tokens"]
    extra = dict(compile=True) if blip2_side and spec.get("compile") else {}
    gen = dict(max_new_tokens=N, min_new_tokens=N, **extra)
    prompt_len = model.config.num_query_tokens + 1  # image placeholders + BOS

    def generate(b: int, n: int = N):
        ids = model.generate(pixel_values=pixels(b), max_new_tokens=n, min_new_tokens=n, **extra)
        assert tuple(ids.shape) == (b, prompt_len + n), f"generated shape {tuple(ids.shape)}"
        return ids

    r["stage"] = "warm-up generate"
    t = clock(dev)
    for i in range(spec["warmup"]):
        generate(1)
        if i == 0:  # a lazy (mmap) loader pays its page faults here: count them with the load
            r["first_caption_s"] = clock(dev) - t
            r["load_to_first_caption_s"] = r["load_s"] + r["first_caption_s"]
    if extra:  # compiled decoding: one graph per batch size, built here and not in a timed call
        r["stage"] = "compile warm-up"
        for b in spec["batches"]:
            generate(b, 2)
        r["compile_warmup_s"] = clock(dev) - t

    r["stage"] = "vision tower"
    vis = []
    with torch.inference_mode():
        for _ in range(max(3, spec["inner"])):
            t = clock(dev)
            model.vision_model(pixel_values=pixels(1))
            vis.append(clock(dev) - t)
    r["vision_s"] = statistics.median(vis)

    def timed(b: int, n: int = N):
        r["stage"] = f"batch-{b} generate ({n} tokens)"
        t = clock(dev)
        ids = generate(b, n)
        return clock(dev) - t, ids.tolist()

    # batch 1: the caption, and a 1-token generate (image + prefill + one argmax) to split it
    cap, pre = [], []
    for _ in range(spec["inner"]):
        s, r["ids_b1"] = timed(1)
        cap.append(s)
        pre.append(timed(1, 1)[0])
    r["caption_s"], r["prefill_s"] = statistics.median(cap), statistics.median(pre)
    r["decode_ms_per_token"] = 1e3 * (r["caption_s"] - r["prefill_s"]) / max(N - 1, 1)

    for b in spec["batches"]:
        s, r[f"ids_batch{b}"] = timed(b)
        r[f"batch{b}_s"], r[f"batch{b}_captions_per_s"] = s, b / s

    # several questions about one image (batch 1, greedy, q_new_tokens each)
    r["stage"] = "questions"
    c = model.config
    pre_ids = [c.image_token_index] * c.num_query_tokens + [c.text_config.bos_token_id]
    qgen = dict(max_new_tokens=spec["q_new_tokens"], min_new_tokens=spec["q_new_tokens"], **extra)

    def ask(questions: list[list[int]]) -> list[list[int]]:
        prompts = [pre_ids + [x % (c.text_config.vocab_size - 2) for x in qi] for qi in questions]  # tiny vocab
        if blip2_side:  # one batch: the image encoded once, the shared prefix (queries, BOS) run once
            return [o[0].tolist() for o in model.generate_many(pixels(1), prompts, **qgen)]
        outs = []
        for p in prompts:  # transformers: one generate per question, each re-encoding the image
            ids = torch.tensor([p], dtype=torch.long, device=dev)
            out = model.generate(pixel_values=pixels(1), input_ids=ids, attention_mask=torch.ones_like(ids), **qgen)
            outs.append(out[0].tolist())
        return outs

    with torch.inference_mode():
        if extra:
            ask(spec["questions"][:1])  # the compiled graph for this prompt length, untimed
        for k in spec["ks"]:
            t = clock(dev)
            r[f"ids_q{k}"] = ask(spec["questions"][:k])
            r[f"questions{k}_s"] = clock(dev) - t
            r[f"questions{k}_vs_bound"] = r[f"questions{k}_s"] / (r["caption_s"] * (1 + 0.3 * k))
    if blip2_side and dev.type == "cpu":  # the paths the CPU backend took here, and why
        from blip2.backends.cpu import runtime

        rt = runtime.describe(measure=False)
        r["runtime"] = dict(kernels=rt["kernels"], dispatch={d["op"]: d["choice"] for d in rt["dispatch"]})
    r["peak_rss_gib"] = rss_gib()  # only for complete runs: a failed run's peak is not comparable
    if dev.type == "cuda":
        r["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30

    # the bandwidth floor: after the peak RSS was taken (the probe allocates its own GiB)
    r["stage"] = "bandwidth"
    r["read_gb_per_s"] = read_bandwidth(dev, gib=spec["bw_gib"]) / 1e9
    r["floor_ms_per_token"] = r["lm_bytes_per_token"] / (r["read_gb_per_s"] * 1e9) * 1e3
    r["decode_vs_floor"] = r["decode_ms_per_token"] / r["floor_ms_per_token"]
    r["stage"] = "matmul rate"
    r["matmul_tflops"] = matmul_rate(dev, dtype) / 1e12
    r["prefill_floor_s"] = image_prefill_flops(model.config, prompt_len) / (r["matmul_tflops"] * 1e12)
    r["prefill_vs_floor"] = r["prefill_s"] / r["prefill_floor_s"]


def run_child(impl: str, args, ckpt: Path) -> dict:
    spec = dict(impl=impl, ckpt=str(ckpt), dtype=args.dtype, threads=args.threads, warmup=args.warmup,
                new_tokens=args.new_tokens, batches=args.batches, quantize=args.quantize, compile=args.compile,
                device=args.device, inner=args.inner, questions=QUESTIONS, ks=args.ks,
                q_new_tokens=args.q_new_tokens, bw_gib=args.bw_gib)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bar: noise in stderr
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, error=f"timed out after {args.timeout} s")
    wall = time.perf_counter() - t
    lines = [l for l in p.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if p.returncode == 0 and lines:  # complete, or failed with partial figures and its traceback
        r = json.loads(lines[-1][len(RESULT_TAG):])
        r["wall_s"] = wall
        return r
    tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-12:])
    return dict(impl=impl, error=f"exit {p.returncode}", stderr_tail=tail, wall_s=wall)


# ----------------------------------------------------------------------------------------------
# parent: build, alternate, summarise

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")


def machine_info(threads: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20  # MemTotal, GiB
    except (OSError, ValueError, IndexError):
        pass

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    return dict(
        cpu=cpu, cores=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)),
        mem_gib=round(mem, 1) if mem else None, python=platform.python_version(), platform=platform.platform(),
        torch=ver("torch"), transformers=ver("transformers"), blip2=ver("blip2"), git_commit=commit,
        # the paths' speed hinges on these (bf16 GEMMs on AMX / AVX512-BF16, the kernels' ISA)
        cpu_flags=[f for f in CPU_FLAGS if f in flags.split()], threads=threads,
    )


def med(rs: list[dict], key: str):
    v = [r[key] for r in rs if key in r]
    return statistics.median(v) if v else None


def compare_ids(a: list[list[int]], b: list[list[int]], new_tokens: int) -> str:
    """'' when identical, else where the first differing row diverges (counted in new tokens)."""
    if a == b:
        return ""
    rows = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or not rows:
        return f"{len(a)} vs {len(b)} rows"
    x, y = a[rows[0]], b[rows[0]]
    j = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    k = j - (len(x) - new_tokens)  # 0 = the first generated token
    return f"{len(rows)}/{len(a)} rows differ; row {rows[0]} first at new token {k} ({x[j:j + 3]} vs {y[j:j + 3]})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config: seconds, for developing the harness")
    ap.add_argument("--layers", type=int, default=None, help="layers per tower (vision, Q-Former, OPT); widths stay")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--reps", type=int, default=3, help="child processes per implementation (alternating)")
    ap.add_argument("--batches", type=ints, default=None,
                    help="batch sizes of the throughput runs, comma separated (8 images are stored and repeated)")
    ap.add_argument("--batch", type=int, default=None, help="one throughput batch size (same as --batches N)")
    ap.add_argument("--questions", dest="ks", type=ints, default=None,
                    help="numbers of questions asked about one image, comma separated (at most 4)")
    ap.add_argument("--q-new-tokens", type=int, default=10, help="new tokens per answer")
    ap.add_argument("--inner", type=int, default=1,
                    help="batch-1 caption and 1-token generate repeats inside a child (median)")
    ap.add_argument("--compile", action="store_true",
                    help="blip2 side only: decode steps under torch.compile (generate(..., compile=True))")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--bw-gib", type=float, default=1.0, help="size of the read-bandwidth probe tensor")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1, help="untimed batch-1 generate calls before timing")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: cores)")
    ap.add_argument("--only", choices=IMPLS, help="run one implementation only")
    ap.add_argument("--quantize", choices=("int8", "int4", "int4-64", "int4-128"), default=None,
                    help="blip2 side only: weight-only quantized language model (transformers stays at --dtype)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="with --only: take the other implementation's runs from this earlier results JSON "
                         "(same checkpoint, dtype and machine) instead of re-running them")
    ap.add_argument("--phases", action="store_true",
                    help="the phase table only: vision, image+prefill+1 token, decode ms/token, batch 8 "
                         "(sets --batches 8 --questions 1 unless given)")
    ap.add_argument("--build-only", action="store_true", help="build (or check) the checkpoint and stop")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child before it is killed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:  # child mode: print one tagged JSON line, or fail with a traceback on stderr
        r = child(json.loads(args._child))
        print(RESULT_TAG + json.dumps(r), flush=True)
        return 0
    if args._build:
        b = json.loads(args._build)
        build(Path(b["out"]), b["kw"], b["n_images"], b["seed"])
        return 0
    if args.batch is not None:
        args.batches = [args.batch]
    if args.batches is None:
        args.batches = [8] if args.phases else [8, 16]
    if args.ks is None:
        args.ks = [1] if args.phases else [1, 2, 4]
    if args.baseline and not args.only:
        ap.error("--baseline needs --only (the implementation to run; the other comes from the file)")
    if min(args.batches) < 1 or not 1 <= min(args.ks) <= max(args.ks) <= len(QUESTIONS):
        ap.error(f"batch sizes must be >= 1 and question counts between 1 and {len(QUESTIONS)}")

    # 1. checkpoint (built in its own process so this one stays small)
    kw = config_kwargs(args.tiny, args.layers)
    ckpt = args.cache / ckpt_name(args.tiny, args.layers, args.seed)
    ok = ckpt / "BUILD_OK.json"
    if args.rebuild or not ok.exists():
        print(f"building {ckpt} ...", flush=True)
        t = time.perf_counter()
        spec = json.dumps(dict(out=str(ckpt), kw=kw, n_images=8, seed=args.seed))
        env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1")
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_build", spec], env=env)
        if p.returncode != 0 or not ok.exists():
            print(f"build failed (exit {p.returncode})", file=sys.stderr)
            return 1
        print(f"built in {time.perf_counter() - t:.1f} s", flush=True)
    built = json.loads(ok.read_text())
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors") if f.name != "inputs.safetensors")
    print(f"checkpoint {ckpt}: {built['params'] / 1e6:,.1f} M params, {size / 2**30:.2f} GiB on disk "
          f"(built in {built['init_s'] + built['save_s']:.0f} s)")
    if args.build_only:
        return 0

    # 2. children, alternating so drift (thermal, other load) hits both alike
    impls = (args.only,) if args.only else IMPLS
    machine = machine_info(args.threads)
    print(f"{machine['cpu']} | {args.threads} threads | torch {machine['torch']} | "
          f"transformers {machine['transformers']} | dtype {args.dtype} | {args.new_tokens} new tokens | "
          f"batches {args.batches} | {args.ks} questions | {args.reps} reps"
          f"{' | blip2 int ' + args.quantize if args.quantize else ''}{' | blip2 compiled' if args.compile else ''}",
          flush=True)
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for rep in range(args.reps):
        for impl in impls:
            r = run_child(impl, args, ckpt)
            r["rep"] = rep
            runs[impl].append(r)
            if "error" not in r:
                bs = " | ".join(f"batch {b}: {r[f'batch{b}_captions_per_s']:6.3f}/s" for b in args.batches)
                print(f"  rep {rep} {impl:12s} load {r['load_s']:6.2f} s | caption {r['caption_s']:7.3f} s | "
                      f"decode {r['decode_ms_per_token']:7.3g} ms/tok (floor {r['floor_ms_per_token']:.3g}) | "
                      f"{bs} | peak RSS {r['peak_rss_gib']:5.2f} GiB", flush=True)
            else:
                got = f" (load {r['load_s']:.2f} s, RSS {r['rss_after_load_gib']:.2f} GiB)" if "load_s" in r else ""
                print(f"  rep {rep} {impl:12s} FAILED{got}: {r['error']}\n" +
                      "\n".join("      " + l for l in r.get("stderr_tail", "").splitlines()), flush=True)

    if args.baseline:  # the other side's runs as recorded earlier on this machine and checkpoint
        base = json.loads(args.baseline.read_text())
        bs = base["settings"]
        if bs["dtype"] != args.dtype or Path(base["checkpoint"]["path"]).name != ckpt.name:
            print(f"--baseline {args.baseline}: recorded with dtype {bs['dtype']} on {base['checkpoint']['path']}, "
                  f"not {args.dtype} on {ckpt}", file=sys.stderr)
            return 2
        for i in IMPLS:
            if i not in impls:
                runs[i] = base["runs"].get(i, [])
                print(f"  {i}: {len(runs[i])} runs from {args.baseline} ({base['timestamp']}, "
                      f"{base['machine'].get('cpu', '?')})", flush=True)

    # 3. summary: medians over the successful reps
    # medians over every run that measured the figure: a run whose generate failed still gives its
    # load time and RSS after load; timings, peak RSS and token ids come from complete runs only
    ok_runs = runs
    # (label, key, format, higher_better): the ratio is transformers / blip2 when lower is better
    # (times, memory), blip2 / transformers when higher is better; None: no ratio (machine figures)
    rows = [
        ("load time (s)", "load_s", "{:.2f}", False),
        ("load + 1st caption (s)", "load_to_first_caption_s", "{:.2f}", False),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}", False),
        ("RSS after load (GiB)", "rss_after_load_gib", "{:.2f}", False),
        ("peak GPU memory (GiB)", "peak_gpu_mem_gib", "{:.2f}", False),
        (f"s / caption (b1, {args.new_tokens} tok)", "caption_s", "{:.3f}", False),
        ("vision tower (s, 1 image)", "vision_s", "{:.3f}", False),
        ("image+prefill+1 tok (s)", "prefill_s", "{:.3f}", False),
        ("decode (ms / token)", "decode_ms_per_token", "{:.3g}", False),
        ("LM bytes / token (MB)", "lm_mb_per_token", "{:.4g}", False),
        ("read bandwidth (GB/s)", "read_gb_per_s", "{:.2f}", None),
        ("floor (ms / token)", "floor_ms_per_token", "{:.3g}", False),
        ("decode / floor", "decode_vs_floor", "{:.2f}", False),
        ("matmul rate (TFLOP/s)", "matmul_tflops", "{:.3f}", None),
        ("image+prefill floor (s)", "prefill_floor_s", "{:.3f}", None),
        ("image+prefill / floor", "prefill_vs_floor", "{:.2f}", False),
        *[(f"captions / s (batch {b})", f"batch{b}_captions_per_s", "{:.3f}", True) for b in args.batches],
        *[(f"{k} question{'s' if k > 1 else ''} (s)", f"questions{k}_s", "{:.3f}", False) for k in args.ks],
        *[(f"  / (1 + 0.3*{k}) caption", f"questions{k}_vs_bound", "{:.2f}", False) for k in args.ks],
    ]
    if args.phases:  # the phase table: each phase of a caption, and batch throughput
        keep = {"vision_s", "prefill_s", "decode_ms_per_token", "caption_s", "read_gb_per_s",
                "floor_ms_per_token", "decode_vs_floor", "matmul_tflops", "prefill_floor_s", "prefill_vs_floor", *(f"batch{b}_captions_per_s" for b in args.batches)}
        rows = [row for row in rows if row[1] in keep]
    for rs in runs.values():
        for r in rs:
            if "lm_bytes_per_token" in r:
                r["lm_mb_per_token"] = r["lm_bytes_per_token"] / 1e6
    summary = {}
    print()
    print(f"{'median of ' + str(args.reps) + ' reps':28s}" + "".join(f"{i:>14s}" for i in IMPLS) + f"{'tr / blip2':>14s}")
    for label, key, fmt, higher_better in rows:
        v = {i: med(ok_runs.get(i, []), key) for i in IMPLS}
        if all(x is None for x in v.values()):
            continue  # e.g. GPU memory on a CPU run
        ratio = None
        if v["transformers"] and v["blip2"] and higher_better is not None:
            ratio = v["blip2"] / v["transformers"] if higher_better else v["transformers"] / v["blip2"]
        summary[key] = dict(v, ratio=ratio)
        cells = "".join(f"{fmt.format(v[i]) if v[i] is not None else '-':>14s}" for i in IMPLS)
        print(f"{label:28s}{cells}{(f'{ratio:.2f}x' if ratio else '-'):>14s}")
    print("(ratio: speed-up of blip2, i.e. transformers time / blip2 time; for memory, transformers / blip2;\n"
          " floor: LM weight bytes read per token / measured read bandwidth; questions: k answers of "
          f"{args.q_new_tokens} tokens about one image,\n then that time over (1 + 0.3 k) batch-1 captions: "
          "below 1 meets the target)")

    # token ids: every run of every implementation must agree with the first one
    match = {}
    checks = [("ids_b1", "batch 1", args.new_tokens)]
    checks += [(f"ids_batch{b}", f"batch {b}", args.new_tokens) for b in args.batches]
    checks += [(f"ids_q{max(args.ks)}", f"{max(args.ks)} questions", args.q_new_tokens)]
    for key, what, n_new in checks:
        all_runs = [r for i in IMPLS for r in ok_runs.get(i, []) if key in r]
        if not all_runs:
            match[key] = "no successful run"
        else:
            ref = all_runs[0]
            diffs = [f"{r['impl']} rep {r['rep']}: {d}" for r in all_runs[1:] if (d := compare_ids(ref[key], r[key], n_new))]
            ran = [i for i in IMPLS if any(key in r for r in ok_runs.get(i, []))]
            if diffs:
                match[key] = f"MISMATCH vs {ref['impl']} rep {ref['rep']}: " + "; ".join(diffs)
            else:  # across reps only, when one implementation did not run
                match[key] = "MATCH" + ("" if len(ran) == 2 else f" (across {ran[0]} reps only)")
        print(f"token ids, {what}: {match[key]}")
    if args.dtype != "float32" and any(m.startswith("MISMATCH") for m in match.values()):
        print(f"  note: in {args.dtype}, greedy decoding on random weights meets near-ties (top-2 logits a few "
              "ulps apart) where either implementation's rounding may win; --dtype float32 is the strict check")
    failed = [f"{r['impl']} rep {r['rep']}" for rs in runs.values() for r in rs if "error" in r]
    if failed:
        print("FAILED runs: " + ", ".join(failed))

    # 4. record
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rec = dict(
        timestamp=stamp, command=sys.argv, machine=machine, checkpoint=dict(path=str(ckpt), bytes=size, **built),
        baseline=str(args.baseline) if args.baseline else None,
        settings=dict(dtype=args.dtype, threads=args.threads, reps=args.reps, batches=args.batches,
                      new_tokens=args.new_tokens, warmup=args.warmup, only=args.only, tiny=args.tiny, layers=args.layers,
                      quantize=args.quantize, compile=args.compile, device=args.device, inner=args.inner,
                      questions=args.ks, q_new_tokens=args.q_new_tokens, question_ids=QUESTIONS),
        summary=summary, token_ids_match=match, runs=runs,
    )
    path = args.results / f"{stamp}{'-tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(rec, indent=1))
    print(f"wrote {path}")
    return 1 if failed or any(m.startswith("MISMATCH") for m in match.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
