"""The `blip2` command: caption, ask, match and embed images from the terminal; describe a checkpoint.

    blip2 caption photos/ "shots/*.jpg" https://example.com/cat.png --output captions.jsonl
    blip2 ask cat.png "what color is the cat?" "how many cats are there?"
    blip2 match a.png b.png --text "a cat" "a dog"
    blip2 embed photos/ --text "a cat" --output emb.npy
    blip2 info Salesforce/blip2-opt-2.7b

Every subcommand is a module with `run(args) -> int`; `main` parses and dispatches through COMMANDS.
Bad inputs are reported on stderr with their path and skipped; the exit status is 1 when any input
failed, 2 when the model, the output or the command line is unusable (one line on stderr, no
traceback), 130 on Ctrl-C, and 141 (as for a process killed by SIGPIPE) when stdout is closed
early, e.g. by `| head -1`; what was written to --output before then stays, and a re-run resumes.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Callable

from ... import CheckpointError
from ...checkpoint.configuration import ConfigError
from ...checkpoint.header import HeaderError
from ...processing.image_load import max_image_pixels
from . import ask, caption, embed, info, match
from ..jobs.cli import ray_options
from .common import DEFAULT_ITM_MODEL, DEFAULT_LM_MODEL, UsageError, pick_device

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "caption": caption.run,
    "ask": ask.run,
    "match": match.run,
    "embed": embed.run,
    "info": info.run,
}

# Commands that live in their own module with `add_parser(sub, at_least, in_range)` and `run(args)`.
# Such a module imports its heavy dependencies (FastAPI, Ray, faiss) inside `run`, so building the
# parser stays cheap and `blip2 caption` never imports a server.
PLUGIN_COMMANDS: tuple[str, ...] = ("serve", "index", "finetune")


def at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= lo."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{s} is less than {lo}")
        return v
    return parse


def in_range(lo: float, hi: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a number in (lo, hi]."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not lo < v <= hi or math.isinf(v):
            raise argparse.ArgumentTypeError(f"{s} is not in ({lo}, {hi}]" if hi < math.inf else
                                             f"{s} is not a finite number above {lo}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blip2", description="BLIP-2 from the terminal: caption, ask, match, embed.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, default_model, output=True, batch=8, batch_help="images per forward pass"):
        p.add_argument("--model", default=default_model,
                       help=f"local checkpoint directory, hub id, or 'demo' (default {default_model})")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights dtype (auto: float16 on CUDA, float32 on CPU)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: CUDA if present)")
        p.add_argument("--batch-size", type=at_least(1), default=batch, help=batch_help)
        if default_model == DEFAULT_LM_MODEL:  # caption / ask: a language model to quantize
            p.add_argument("--quantize", choices=["int8", "int4", "int4-64", "int4-128"],
                           help="weight-only quantized language model (less memory, faster decoding on CPU)")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--json", action="store_true", help="print a JSON array of records")
        g.add_argument("--jsonl", action="store_true", help="print one JSON record per line")
        if output:
            p.add_argument("--output", "-o", help="write records to FILE (.json array, otherwise JSONL); "
                           "a re-run with the same file skips what it already holds; "
                           "one run at a time writes a file")

    def generation(p):
        p.add_argument("--max-new-tokens", type=at_least(1), default=30)
        p.add_argument("--num-beams", type=at_least(1), default=None)
        p.add_argument("--temperature", type=in_range(0), default=None, help="sample with this temperature (> 0)")
        p.add_argument("--top-p", type=in_range(0, 1), default=None, help="nucleus sampling, in (0, 1]")

    def truncate(p, what):
        p.add_argument("--truncate", action="store_true",
                       help=f"cut {what} longer than the model's positions to fit (its start is kept); "
                            "without it such an item fails with an error and the others go on")

    p = sub.add_parser("caption", help="caption images: files, folders, globs, URLs")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("--num-captions", type=at_least(1), default=1,
                   help="captions per image (beam search widens to at least this many beams unless sampling)")
    generation(p)
    truncate(p, "a --prompt")
    common(p, DEFAULT_LM_MODEL)
    ray_options(p, at_least, in_range)

    p = sub.add_parser("ask", help="ask questions about one image (encoded once)")
    p.add_argument("image")
    p.add_argument("questions", nargs="*", metavar="QUESTION")
    p.add_argument("--template", default="Question: {} Answer:",
                   help="prompt format: exactly one {} (the question); write literal braces as {{ }}")
    generation(p)
    truncate(p, "questions")
    p.set_defaults(max_new_tokens=20)
    common(p, DEFAULT_LM_MODEL, batch_help="questions decoded together (the image is encoded once)")
    ray_options(p, at_least, in_range)

    p = sub.add_parser("match", help="ITM probability and ITC similarity for every image x text")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--text", nargs="+", required=True)
    truncate(p, "texts")
    common(p, DEFAULT_ITM_MODEL)
    p.set_defaults(demo_kind="retrieval")

    p = sub.add_parser("embed", help="image (query) and/or text embeddings to .npy or .parquet")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--text", nargs="+", default=None, help="texts to embed")
    truncate(p, "texts")
    common(p, DEFAULT_ITM_MODEL, output=False)
    p.set_defaults(demo_kind="retrieval")
    p.add_argument("--output", "-o", required=True,
                   help="FILE.npy (+ FILE.json of ids; FILE.image.npy / FILE.text.npy when both) or FILE.parquet")
    ray_options(p, at_least, in_range)

    p = sub.add_parser("info", help="what a checkpoint is (architecture, parts, parameters, dtype, files); "
                       "with --runtime, what the CPU backend does on this machine")
    p.add_argument("model_name", metavar="MODEL", nargs="?", help="local directory, hub id or 'demo'")
    p.add_argument("--json", action="store_true")
    p.add_argument("--runtime", action="store_true",
                   help="print the CPU, its features, the C kernels' build and the path each kind of product "
                        "takes here, with the timings that chose it (measured once per machine, then cached)")
    p.add_argument("--recalibrate", action="store_true", help="measure the paths again (implies --runtime)")

    for name in PLUGIN_COMMANDS:
        mod = importlib.import_module(f"{__package__}.{name}")
        for command in mod.add_parser(sub, at_least, in_range):
            COMMANDS[command] = mod.run
    return ap


def main(argv: list[str] | None = None) -> int:
    # File names that are not UTF-8 arrive as surrogate escapes: stdout gives back their bytes (as
    # ls does), messages on stderr show them escaped; neither may end the run.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "device"):
            pick_device(args.device)  # a device that is not here fails before anything is read
        try:
            max_image_pixels()  # a malformed $BLIP2_MAX_IMAGE_PIXELS, before any image is read
        except ValueError as e:
            raise UsageError(str(e)) from None
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader left (`| head -1`): stop quietly. stdout goes to /dev/null so that the flush at
        # exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("blip2: interrupted; what was written to --output stays, and a re-run resumes", file=sys.stderr)
        return 130
    except (UsageError, ConfigError, HeaderError, CheckpointError, OSError) as e:
        print(f"blip2: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
