"""The `blip2` command: caption, ask, match and embed images from the terminal; describe a checkpoint.

    blip2 caption photos/ "shots/*.jpg" https://example.com/cat.png --output captions.jsonl
    blip2 ask cat.png "what color is the cat?" "how many cats are there?"
    blip2 match a.png b.png --text "a cat" "a dog"
    blip2 embed photos/ --text "a cat" --output emb.npy
    blip2 info Salesforce/blip2-opt-2.7b

Every subcommand is one function `cmd_<name>(args) -> int`; `main` dispatches through COMMANDS.
Bad inputs are reported on stderr with their path and skipped; the exit status is 1 when any input
failed, 2 when the model (or the command line) is unusable.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

DEFAULT_LM_MODEL = "Salesforce/blip2-opt-2.7b"  # caption / ask, as the docs use
DEFAULT_ITM_MODEL = "Salesforce/blip2-itm-vit-g"  # match / embed
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
PROGRESS_MIN = 6  # show progress from this many images on


class UsageError(Exception):
    """A problem with the model or the command line: one line on stderr, exit 2."""


def demo_dir(kind: str = "captioning") -> Path:
    """The shipped demo checkpoint: "captioning" for caption/ask/info, "retrieval" for match/embed."""
    from ..demo.recipe import demo_checkpoint

    try:
        return demo_checkpoint(kind)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------------------- inputs

def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def expand_inputs(args: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders (recursive, image extensions only), globs and URLs -> (sources, errors)."""
    out, errors = [], []
    for a in args:
        if _is_url(a):
            out.append(a)
        elif os.path.isdir(a):
            found = sorted(
                str(p) for p in Path(a).rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not any(x.startswith(".") for x in p.parts[-1:])
            )
            if not found:
                errors.append((a, "folder holds no image files"))
            out.extend(found)
        elif os.path.exists(a):
            out.append(a)
        elif any(c in a for c in "*?["):
            found = sorted(p for p in glob.glob(a, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append((a, "pattern matches no files"))
            out.extend(found)
        else:
            errors.append((a, "no such file or directory"))
    return list(dict.fromkeys(out)), errors


def open_image(src: str, timeout: float = 20.0):
    """A PIL RGB image from a path or URL; raises ImageLoadError naming `src`."""
    from ...processing.image import ImageLoadError, _open, load_image

    if _is_url(src):
        try:
            req = urllib.request.Request(src, headers={"User-Agent": "blip2-cli"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
        except Exception as e:
            raise ImageLoadError(f"cannot download image {src}: {e}") from e
        from PIL import ImageOps

        return ImageOps.exif_transpose(_open(io.BytesIO(data), src)).convert("RGB")
    return load_image(src)


class Report:
    """Failed inputs, progress and the closing summary, all on stderr."""

    def __init__(self, total: int = 0, label: str = "images", quiet: bool = False):
        self.failed: list[tuple[str, str]] = []
        self.total, self.label, self.n = total, label, 0
        self.show = total >= PROGRESS_MIN and not quiet
        self.tty = sys.stderr.isatty()

    def fail(self, src: str, why: str) -> None:
        self.failed.append((src, why))
        why = why if src in why else f"{src}: {why}"
        self._clear()
        print(f"blip2: skipped {why}", file=sys.stderr, flush=True)

    def step(self, k: int = 1) -> None:
        self.n += k
        if not self.show:
            return
        msg = f"{self.n}/{self.total} {self.label}"
        if self.tty:
            sys.stderr.write(f"\r[{'#' * (20 * self.n // max(self.total, 1)):<20}] {msg}")
            if self.n >= self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def _clear(self) -> None:
        if self.show and self.tty and 0 < self.n < self.total:
            sys.stderr.write("\n")

    def finish(self, n_inputs: int) -> int:
        if not self.failed:
            return 0
        print(f"blip2: {len(self.failed)} of {n_inputs} input(s) failed: "
              + ", ".join(s for s, _ in self.failed[:5]) + (" ..." if len(self.failed) > 5 else ""),
              file=sys.stderr, flush=True)
        return 1


def load_images(srcs: list[str], report: Report) -> list[tuple[str, Any]]:
    from ...processing.image import ImageLoadError

    ok = []
    for s in srcs:
        try:
            ok.append((s, open_image(s)))
        except (ImageLoadError, OSError) as e:
            report.fail(s, str(e))
    return ok


def batches(xs: list, n: int) -> Iterable[list]:
    for i in range(0, len(xs), max(n, 1)):
        yield xs[i:i + max(n, 1)]


# ----------------------------------------------------------------------------------------- output

class Sink:
    """Records to stdout (text / --json / --jsonl) and to --output FILE (.json array, else JSONL).

    A JSONL --output is appended to record by record, so an interrupted run keeps what it did;
    `done` holds the keys already in it, which a re-run skips.
    """

    def __init__(self, args, key: Callable[[dict], Any], text: Callable[[dict], str]):
        self.fmt = "json" if args.json else "jsonl" if args.jsonl else "text"
        self.key, self.text = key, text
        self.records: list[dict] = []
        self.path = Path(args.output) if getattr(args, "output", None) else None
        self.done: set = set()
        self.old: list[dict] = []
        self.fh = None
        if self.path is not None:
            self.file_json = self.path.suffix.lower() == ".json"
            if self.path.exists():
                self.old = self._read_old()
                self.done = {key(r) for r in self.old}
            if not self.file_json:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(self.path, "a", encoding="utf-8")

    def _read_old(self) -> list[dict]:
        txt = self.path.read_text(encoding="utf-8")
        try:
            if self.file_json:
                return list(json.loads(txt)) if txt.strip() else []
            return [json.loads(line) for line in txt.splitlines() if line.strip()]
        except (json.JSONDecodeError, TypeError) as e:
            raise UsageError(f"cannot resume from {self.path}: not a {'JSON' if self.file_json else 'JSONL'} "
                             f"file written by blip2 ({e}); remove it or pass another --output") from e

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        if self.fh is not None:
            self.fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.fh.flush()
        if self.fmt == "jsonl":
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        elif self.fmt == "text" and self.path is None:
            print(self.text(rec), flush=True)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.path is not None and self.file_json:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.old + self.records, ensure_ascii=False, indent=2) + "\n",
                                 encoding="utf-8")
        if self.fmt == "json":
            print(json.dumps(self.records, ensure_ascii=False, indent=2))


# ----------------------------------------------------------------------------------------- model

def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device):
    import torch

    from ...checkpoint.pretrained import as_dtype

    if name == "auto":  # half precision where it is fast, exact fp32 on the CPU
        return torch.float16 if device.type == "cuda" else torch.float32
    return as_dtype(name)


def model_dir(name: str, demo_kind: str = "captioning") -> Path:
    from ...checkpoint.hub import resolve_dir

    if name == "demo":
        return demo_dir(demo_kind)
    return resolve_dir(name)


def args_model_dir(args) -> Path:
    return model_dir(args.model, getattr(args, "demo_kind", "captioning"))


def load(args, cls, with_processor: bool = True):
    """(model, processor, dir) for --model, on --device in --dtype."""
    d = args_model_dir(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    proc = None
    if with_processor:
        from ...processing.processor import Blip2Processor

        proc = Blip2Processor.from_pretrained(d)
    q = getattr(args, "quantize", None)
    model = cls.from_pretrained(d, dtype=dtype, device=device, **({"quantize": q} if q else {}))
    return model, proc, d


def _pixels(proc, images, model):
    pv = proc.image_processor(images, return_tensors="pt")["pixel_values"]
    return pv.to(model.device, model.dtype)


def gen_kwargs(args) -> dict:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.num_beams is not None:
        kw["num_beams"] = args.num_beams
    if args.temperature is not None:
        kw.update(do_sample=True, temperature=args.temperature)
    if args.top_p is not None:
        kw.update(do_sample=True, top_p=args.top_p)
    n = getattr(args, "num_captions", 1) or 1
    if n > 1:
        kw["num_return_sequences"] = n
        if not kw.get("do_sample") and kw.get("num_beams", 1) < n:
            kw["num_beams"] = n  # several greedy captions need beams (or sampling)
    return kw


def _decode(proc, model, out, prompt_len: int) -> list[str]:
    # OPT returns the prompt (image placeholders, BOS, text) then the new tokens: keep the new ones.
    if model.config.use_decoder_only_language_model:
        out = out[:, prompt_len:]
    return [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]


def _options(args, **extra) -> dict:
    o = {"model": args.model}
    for k in ("prompt", "template", "max_new_tokens", "num_beams", "temperature", "top_p", "num_captions"):
        v = getattr(args, k, None)
        if v is not None:
            o[k] = v
    o.update(extra)
    o["dtype"] = args.dtype
    return o


# ----------------------------------------------------------------------------------------- commands

def cmd_caption(args) -> int:
    import torch

    from ...models.blip2 import Blip2ForConditionalGeneration

    args_model_dir(args)  # an unusable --model fails first, before any input is read
    srcs, bad = expand_inputs(args.paths)
    sink = Sink(args, key=lambda r: r.get("path"), text=lambda r: f"{r['path']}: {r['text']}" + "".join(
        f"\n    {c}" for c in r.get("captions", [])[1:]))
    todo = [s for s in srcs if s not in sink.done]
    if len(todo) < len(srcs):
        print(f"blip2: {len(srcs) - len(todo)} image(s) already in {sink.path}, skipping them", file=sys.stderr)
    rep = Report(len(todo))
    for s, why in bad:
        rep.fail(s, why)
    if todo:
        model, proc, _ = load(args, Blip2ForConditionalGeneration)
        kw = gen_kwargs(args)
        n = max(args.num_captions, 1)
        opts = _options(args)
        for chunk in batches(todo, args.batch_size):
            imgs = load_images(chunk, rep)
            if imgs:
                pv = _pixels(proc, [im for _, im in imgs], model)
                ids = am = None
                plen = model.config.num_query_tokens + 1  # no prompt: placeholders + BOS
                if args.prompt:
                    enc = proc(images=None, text=[args.prompt] * len(imgs), return_tensors="pt")
                    ids, am = _with_placeholders(model, enc["input_ids"], enc["attention_mask"])
                    plen = ids.shape[1]
                with torch.inference_mode():
                    out = model.generate(pv, input_ids=ids, attention_mask=am, **kw)
                texts = _decode(proc, model, out, plen)
                for i, (s, _) in enumerate(imgs):
                    mine = texts[i * n:(i + 1) * n]
                    rec = {"path": s, "text": mine[0], "options": opts}
                    if n > 1:
                        rec["captions"] = mine
                    sink.add(rec)
            rep.step(len(chunk))
    sink.close()
    return rep.finish(len(srcs) + len(bad))


def _with_placeholders(model, ids, am):
    """Put num_query_tokens image placeholders in front of tokenised prompts (B, T), as
    Blip2Processor does when it gets images with the text."""
    import torch

    Q = model.config.num_query_tokens
    img = torch.full((ids.shape[0], Q), model.config.image_token_index, dtype=ids.dtype)
    ids = torch.cat([img, ids], 1).to(model.device)
    am = torch.cat([torch.ones_like(img), am], 1).to(model.device)
    return ids, am


def cmd_ask(args) -> int:
    import torch

    from ...processing.image import ImageLoadError
    from ...models.blip2 import Blip2ForConditionalGeneration

    if "{}" not in args.template:
        raise UsageError(f"--template {args.template!r} must contain {{}} where the question goes")
    args_model_dir(args)
    sink = Sink(args, key=lambda r: (r.get("path"), r.get("question")),
                text=lambda r: f"Q: {r['question']}\nA: {r['text']}")
    todo = [q for q in args.questions if (args.image, q) not in sink.done]
    rep = Report(0)
    if todo:
        try:
            img = open_image(args.image)
        except (ImageLoadError, OSError) as e:
            rep.fail(args.image, str(e))
            sink.close()
            return rep.finish(1)
        model, proc, _ = load(args, Blip2ForConditionalGeneration)
        kw = gen_kwargs(args)
        opts = _options(args)
        with torch.inference_mode():
            pv = _pixels(proc, [img], model)
            for chunk in batches(todo, args.batch_size):
                # one batch per chunk: the image encoded once, the template's shared start run once
                prompts = []
                for q in chunk:
                    enc = proc(images=None, text=args.template.format(q), return_tensors="pt")
                    ids, _ = _with_placeholders(model, enc["input_ids"], enc["attention_mask"])
                    prompts.append(ids[0].tolist())
                for q, ids, out in zip(chunk, prompts, model.generate_many(pv, prompts, **kw)):
                    texts = _decode(proc, model, out, len(ids))
                    rec = {"path": args.image, "question": q, "text": texts[0], "options": opts}
                    if len(texts) > 1:
                        rec["answers"] = texts
                    sink.add(rec)
    sink.close()
    return rep.finish(1)


def cmd_match(args) -> int:
    import torch

    from ...models.retrieval import Blip2ForImageTextRetrieval

    args_model_dir(args)
    srcs, bad = expand_inputs(args.images)
    rep = Report(len(srcs))
    for s, why in bad:
        rep.fail(s, why)
    texts = list(args.text)
    rows: list[dict] = []
    if srcs:
        model, proc, _ = load(args, Blip2ForImageTextRetrieval)
        enc = proc.tokenizer(texts, padding=True, return_tensors="pt")
        ids, am = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
        T = len(texts)
        for chunk in batches(srcs, args.batch_size):
            imgs = load_images(chunk, rep)
            if imgs:
                pv = _pixels(proc, [im for _, im in imgs], model)  # (B, 3, H, W)
                B = pv.shape[0]
                with torch.inference_mode():
                    itc = model(pixel_values=pv, input_ids=ids, attention_mask=am).logits_per_image  # (B, T)
                    # ITM scores one (image, text) pair per row: every image with every text.
                    itm = model(pixel_values=pv.repeat_interleave(T, 0), input_ids=ids.repeat(B, 1),
                                attention_mask=am.repeat(B, 1), use_image_text_matching_head=True).logits_per_image
                    p = itm.float().softmax(-1)[:, 1].view(B, T)
                for i, (s, _) in enumerate(imgs):
                    for j, t in enumerate(texts):
                        rows.append({"path": s, "text": t, "itm": float(p[i, j]), "itc": float(itc[i, j])})
            rep.step(len(chunk))
    sink = Sink(args, key=lambda r: (r.get("path"), r.get("text")), text=lambda r: "")
    if sink.fmt == "text":
        _print_table(rows)
        sink.fmt = "none"
    for r in rows:
        if sink.key(r) not in sink.done:
            sink.add(r)
    sink.close()
    return rep.finish(len(srcs) + len(bad))


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    pw = min(max(len("image"), *(len(r["path"]) for r in rows)), 60)
    tw = min(max(len("text"), *(len(r["text"]) for r in rows)), 60)
    print(f"{'image':<{pw}}  {'text':<{tw}}  {'ITM p(match)':>12}  {'ITC sim':>8}")
    for r in rows:
        print(f"{r['path'][-pw:]:<{pw}}  {r['text'][:tw]:<{tw}}  {r['itm']:>12.4f}  {r['itc']:>8.4f}")


def _has_keys(d: Path, prefix: str) -> bool:
    """Whether the checkpoint in `d` holds tensors under `prefix` (read from file headers only)."""
    from ...checkpoint.pretrained import checkpoint_files

    files, fmt = checkpoint_files(d)
    if fmt != "safetensors":
        return False
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if any(k.startswith(prefix) for k in json.loads(fh.read(n))):
                return True
    return False


def cmd_embed(args) -> int:
    import numpy as np
    import torch

    out = Path(args.output)
    fmt = out.suffix.lower()
    if fmt not in (".npy", ".parquet"):
        raise UsageError(f"--output {out}: use a .npy or .parquet file name")
    if fmt == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--output .parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow), or write .npy instead") from None
    d = args_model_dir(args)
    srcs, bad = expand_inputs(args.paths) if args.paths else ([], [])
    if not srcs and not bad and not args.text:
        raise UsageError("nothing to embed: give image paths and/or --text")
    rep = Report(len(srcs))
    for s, why in bad:
        rep.fail(s, why)
    retrieval = _has_keys(d, "vision_projection.")
    results: dict[str, tuple[list[str], Any]] = {}
    if srcs:
        if retrieval:
            from ...models.retrieval import Blip2VisionModelWithProjection as cls
        else:
            from ...models.blip2 import Blip2Model as cls
        model, proc, _ = load(args, cls)
        ids, vecs = [], []
        for chunk in batches(srcs, args.batch_size):
            imgs = load_images(chunk, rep)
            if imgs:
                pv = _pixels(proc, [im for _, im in imgs], model)
                with torch.inference_mode():
                    e = model(pixel_values=pv).image_embeds if retrieval else model.get_qformer_features(pv)
                vecs.append(e.float().cpu().numpy())  # (B, Q, E)
                ids += [s for s, _ in imgs]
            rep.step(len(chunk))
        if ids:
            results["image"] = (ids, np.concatenate(vecs))
    if args.text:
        if not retrieval:
            raise UsageError(f"text embeddings need a retrieval checkpoint with a text projection "
                             f"(e.g. {DEFAULT_ITM_MODEL}); {args.model} has none")
        from ...models.retrieval import Blip2TextModelWithProjection

        model, proc, _ = load(args, Blip2TextModelWithProjection)
        vecs = []
        for chunk in batches(list(args.text), args.batch_size):
            enc = proc.tokenizer(chunk, padding=True, return_tensors="pt").to(model.device)
            with torch.inference_mode():
                e = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds[:, 0]
            vecs.append(e.float().cpu().numpy())  # (B, E): the [CLS] token's, as ITC uses
        results["text"] = (list(args.text), np.concatenate(vecs))
    written = _write_embeddings(out, results, args)
    for p in written:
        print(f"blip2: wrote {p}", file=sys.stderr)
    return rep.finish(len(srcs) + len(bad))


def _write_embeddings(out: Path, results: dict, args) -> list[Path]:
    """.npy: one array per kind (FILE, or FILE.image.npy / FILE.text.npy when both) with a .json
    sidecar of ids; .parquet: one row per id with kind, shape and the flattened vector."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: dict[str, list] = {"id": [], "kind": [], "shape": [], "embedding": []}
        for kind, (ids, a) in results.items():
            for i, v in zip(ids, a):
                cols["id"].append(i)
                cols["kind"].append(kind)
                cols["shape"].append(list(v.shape))
                cols["embedding"].append(v.reshape(-1).tolist())
        pq.write_table(pa.table(cols), out)
        return [out]
    for kind, (ids, a) in results.items():
        p = out if len(results) == 1 else out.with_name(f"{out.stem}.{kind}.npy")
        np.save(p, a)
        side = p.with_suffix(".json")
        side.write_text(json.dumps({"kind": kind, "ids": ids, "shape": list(a.shape), "model": args.model},
                                   ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        written += [p, side]
    return written


def _fmt_n(n: int) -> str:
    for unit, k in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def model_class(config) -> type:
    from ...models import blip2 as m
    from ...models import pretrain
    from ...models import retrieval

    names = {c.__name__: c for c in (
        m.Blip2ForConditionalGeneration, m.Blip2Model, retrieval.Blip2ForImageTextRetrieval,
        retrieval.Blip2TextModelWithProjection, retrieval.Blip2VisionModelWithProjection,
        pretrain.Blip2QFormerForPretraining)}
    for a in getattr(config, "architectures", None) or []:
        if a in names:
            return names[a]
    has_lm = getattr(config, "text_config", None) is not None and "text_config" in config.to_dict()
    return m.Blip2ForConditionalGeneration if has_lm else retrieval.Blip2ForImageTextRetrieval


def describe(d: Path) -> dict:
    """What the checkpoint in `d` is, without loading its weights (the model is built on meta)."""
    import torch

    from ...models.config import CONFIG_NAME, Blip2Config
    from ...checkpoint.pretrained import CheckpointError

    if not (d / CONFIG_NAME).is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {d}: is this a model checkpoint directory?")
    cfg = Blip2Config.from_json_file(d / CONFIG_NAME)
    cls = model_class(cfg)
    with torch.device("meta"):
        model = cls(cfg)
    parts, seen = {}, set()
    for name, child in model.named_children():
        ps = [p for p in child.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        parts[name] = sum(p.numel() for p in ps)
    for name, p in model.named_parameters(recurse=False):
        parts[name] = p.numel()
    files = sorted((p for p in d.iterdir() if p.is_file()), key=lambda p: p.name)
    dtypes: dict[str, int] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                for k, v in json.loads(fh.read(n)).items():
                    if k != "__metadata__":
                        dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + 1
    c = cfg.to_dict()
    tc = c.get("text_config") if cls.__name__ in ("Blip2ForConditionalGeneration", "Blip2Model") else None
    return {
        "path": str(d),
        "architecture": cls.__name__,
        "config_architectures": getattr(cfg, "architectures", None),
        "language_model": (tc or {}).get("model_type"),
        "num_query_tokens": cfg.num_query_tokens,
        "vision": {k: c["vision_config"].get(k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
        "qformer": {k: c["qformer_config"].get(k) for k in ("hidden_size", "num_hidden_layers")},
        "parameters": model.num_parameters(),
        "parts": parts,
        "config_dtype": getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None),
        "stored_dtypes": dtypes,
        "files": {p.name: p.stat().st_size for p in files},
    }


def cmd_info(args) -> int:
    info = describe(model_dir(args.model_name))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}")
    print(f"  architecture     {info['architecture']}" + (f" (language model: {info['language_model']})"
                                                          if info["language_model"] else ""))
    v, q = info["vision"], info["qformer"]
    print(f"  vision           ViT {v['num_hidden_layers']} layers x {v['hidden_size']}, "
          f"{v['image_size']}px images, {v['patch_size']}px patches")
    print(f"  Q-Former         {q['num_hidden_layers']} layers x {q['hidden_size']}, "
          f"{info['num_query_tokens']} queries")
    print(f"  parameters       {info['parameters']:,} ({_fmt_n(info['parameters'])})")
    for name, n in info["parts"].items():
        print(f"    {name:<22} {n:>15,}")
    stored = ", ".join(f"{k} x{n}" for k, n in info["stored_dtypes"].items()) or "unknown"
    print(f"  dtype            {info['config_dtype'] or 'not set in config'} (stored tensors: {stored})")
    print(f"  files            {_fmt_bytes(sum(info['files'].values()))} in all")
    for name, n in info["files"].items():
        print(f"    {name:<40} {_fmt_bytes(n):>10}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "caption": cmd_caption,
    "ask": cmd_ask,
    "match": cmd_match,
    "embed": cmd_embed,
    "info": cmd_info,
}


# ----------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blip2", description="BLIP-2 from the terminal: caption, ask, match, embed.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, default_model, output=True, batch=8, batch_help="images per forward pass"):
        p.add_argument("--model", default=default_model,
                       help=f"local checkpoint directory, hub id, or 'demo' (default {default_model})")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights dtype (auto: float16 on CUDA, float32 on CPU)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: CUDA if present)")
        p.add_argument("--batch-size", type=int, default=batch, help=batch_help)
        if default_model == DEFAULT_LM_MODEL:  # caption / ask: a language model to quantize
            p.add_argument("--quantize", choices=["int8", "int4", "int4-64", "int4-128"],
                           help="weight-only quantized language model (less memory, faster decoding on CPU)")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--json", action="store_true", help="print a JSON array of records")
        g.add_argument("--jsonl", action="store_true", help="print one JSON record per line")
        if output:
            p.add_argument("--output", "-o", help="write records to FILE (.json array, otherwise JSONL); "
                           "a re-run with the same JSONL file skips what it already holds")

    def generation(p):
        p.add_argument("--max-new-tokens", type=int, default=30)
        p.add_argument("--num-beams", type=int, default=None)
        p.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
        p.add_argument("--top-p", type=float, default=None, help="nucleus sampling")

    p = sub.add_parser("caption", help="caption images: files, folders, globs, URLs")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("--num-captions", type=int, default=1, help="captions per image")
    generation(p)
    common(p, DEFAULT_LM_MODEL)

    p = sub.add_parser("ask", help="ask questions about one image (encoded once)")
    p.add_argument("image")
    p.add_argument("questions", nargs="+", metavar="QUESTION")
    p.add_argument("--template", default="Question: {} Answer:", help="prompt format; {} is the question")
    generation(p)
    p.set_defaults(max_new_tokens=20)
    common(p, DEFAULT_LM_MODEL, batch_help="questions decoded together (the image is encoded once)")

    p = sub.add_parser("match", help="ITM probability and ITC similarity for every image x text")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--text", nargs="+", required=True)
    common(p, DEFAULT_ITM_MODEL)
    p.set_defaults(demo_kind="retrieval")

    p = sub.add_parser("embed", help="image (query) and/or text embeddings to .npy or .parquet")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--text", nargs="+", default=None, help="texts to embed")
    common(p, DEFAULT_ITM_MODEL, output=False)
    p.set_defaults(demo_kind="retrieval")
    p.add_argument("--output", "-o", required=True,
                   help="FILE.npy (+ FILE.json of ids; FILE.image.npy / FILE.text.npy when both) or FILE.parquet")

    p = sub.add_parser("info", help="what a checkpoint is: architecture, parts, parameters, dtype, files")
    p.add_argument("model_name", metavar="MODEL", help="local directory, hub id or 'demo'")
    p.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ...checkpoint.pretrained import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        print(f"blip2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blip2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
