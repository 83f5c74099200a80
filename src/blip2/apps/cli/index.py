"""`blip2 index build EMBEDDINGS... -o INDEX_DIR` and `blip2 search INDEX_DIR [TEXT] [--image FILE]`:
a FAISS index over `blip2 embed` output, searched with ITC then re-ranked with ITM (apps/index)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def add_parser(sub, at_least: Callable, in_range: Callable) -> list[str]:
    p = sub.add_parser("index", help="build a search index over image embeddings (blip2 embed output)")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    b = isub.add_parser("build", help="a FAISS index from `blip2 embed --ray -o DIR` folders or `blip2 embed -o FILE.npy`")
    b.add_argument("embeddings", nargs="+", metavar="EMBEDDINGS", help="an embed --ray output folder or an embed .npy")
    b.add_argument("--output", "-o", required=True, metavar="INDEX_DIR")
    b.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "ivfpq"],
                   help="auto (default): exact up to 50k vectors, IVF to 4M, IVF-HNSW with PQ codes and an exact "
                        "re-rank above")
    b.add_argument("--nlist", type=at_least(1), default=None, help="IVF lists (default ~4 sqrt(N), 16 sqrt(N) with PQ)")
    b.add_argument("--nprobe", type=at_least(1), default=None, help="IVF lists searched by default at query time")

    s = sub.add_parser("search", help="find images in an index by text (ITC, then ITM re-rank) or by image")
    s.add_argument("index", metavar="INDEX_DIR")
    s.add_argument("text", nargs="?", default=None, metavar="TEXT")
    s.add_argument("--image", default=None, help="search with this image instead of a text (image -> image)")
    s.add_argument("-k", type=at_least(1), default=10, help="results (default 10)")
    s.add_argument("--rerank", type=at_least(0), default=50,
                   help="re-rank the best max(k, N) by ITC with the ITM head (default 50; 0: ITC only)")
    s.add_argument("--model", default=None, help="retrieval model (default: the one recorded in the index)")
    s.add_argument("--nprobe", type=at_least(1), default=None, help="IVF lists to search (default: the index's)")
    s.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: CUDA if present)")
    s.add_argument("--json", action="store_true", help='print a JSON list of {"path", "score", ...}, best first')
    return ["index", "search"]


def run(args: argparse.Namespace) -> int:
    from .common import UsageError

    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UsageError("the index needs faiss: pip install 'blip2[index]'") from None
    if args.command == "index":
        from ..index import build

        meta = build(args.embeddings, args.output, args.kind, args.nlist, args.nprobe)
        print(f"blip2: indexed {meta['items']:,} images ({meta['vectors']:,} vectors of {meta['dim']}) as "
              f"{meta['factory']} in {args.output} ({meta['build_seconds']:.1f} s)", file=sys.stderr)
        return 0
    from ..index import SearchIndex
    from .sink import dumps

    if (args.text is None) == (args.image is None):
        raise UsageError("give a TEXT or --image to search with (one of them)")
    hits = SearchIndex(args.index, args.model, args.device, args.nprobe).search(
        text=args.text, image=args.image, k=args.k, rerank=args.rerank)
    if args.json:
        print(dumps(hits))
    else:
        for h in hits:
            print(f"{h['score']:.4f}  {h['path']}")
    return 0
