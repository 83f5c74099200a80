"""`blip2 serve`: an OpenAI-compatible HTTP server with continuous batching and a web page
(src/blip2/apps/serve/). FastAPI and uvicorn are imported only when the command runs
(`pip install blip2[serve]`)."""

from __future__ import annotations

import argparse
import sys

from ...processing.image_load import max_image_pixels
from .common import UsageError


def add_parser(sub, at_least, in_range) -> list[str]:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (chat, captions, match, embeddings) and a web page")
    p.add_argument("--model", default="demo", help="local checkpoint directory, hub id, or 'demo' (default demo)")
    p.add_argument("--retrieval-model", default=None,
                   help="a retrieval checkpoint for /v1/match and /v1/embeddings (default: the demo's with --model demo)")
    p.add_argument("--index", default=None, metavar="INDEX_DIR",
                   help="a folder written by `blip2 index build`: serves POST /v1/search (needs blip2[index])")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=at_least(0), default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights dtype (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: CUDA if present)")
    p.add_argument("--quantize", choices=["int8", "int4", "int4-64", "int4-128"],
                   help="weight-only quantized language model")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--max-batch", type=at_least(1), default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=at_least(1), default=64,
                   help="requests waiting to start; more are refused with 429 (default 64)")
    p.add_argument("--prefill-budget", type=at_least(1), default=512,
                   help="prompt tokens prefilled between two decode steps (at least one request; default 512)")
    p.add_argument("--request-timeout", type=in_range(0), default=300.0,
                   help="seconds a request may take, queue included, before it is cancelled (default 300)")
    p.add_argument("--max-body", type=at_least(1024), default=32 * 1024 * 1024,
                   help="largest request body in bytes (default 32 MiB)")
    p.add_argument("--max-image-bytes", type=at_least(1), default=20 * 1024 * 1024,
                   help="largest encoded image in bytes (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=at_least(1), default=None,
                   help="largest image in pixels, checked before decoding (default: $BLIP2_MAX_IMAGE_PIXELS or 40 Mpx)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="also fetch http(s) image URLs (off by default; data: URLs always work, file paths never)")
    p.add_argument("--fetch-timeout", type=in_range(0), default=10.0, help="seconds to fetch a remote image (default 10)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch threads of the model (default: torch's, one per core); 1 suits small models "
                        "and machines shared with other work")
    return ["serve"]


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("blip2 serve needs FastAPI and uvicorn: pip install 'blip2[serve]'") from None
    from ..serve.server import build_state, listen, serve_forever

    if args.max_image_pixels is None:
        args.max_image_pixels = max_image_pixels()
    sock = listen(args.host, args.port)  # a busy port fails before the model loads
    state = build_state(args)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"blip2: serving {args.model} on http://{shown}:{port} (page at /, API at /v1, Ctrl-C stops)",
          file=sys.stderr, flush=True)
    serve_forever(state, sock)
    return 0
