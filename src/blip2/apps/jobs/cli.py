"""`blip2 caption|ask|embed --ray INPUT... -o OUTPUT_DIR`: the --ray options each of those parsers gets
(`ray_options`), and the dispatch their `run` makes when --ray is given (`run`). Ray is imported only
when a job runs."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def ray_options(p: argparse.ArgumentParser, at_least: Callable, in_range: Callable) -> None:
    """Add --ray and the job options to the caption / ask / embed parser `p` (at_least / in_range: the
    CLI's argparse types)."""
    g = p.add_argument_group("dataset jobs on Ray Data (--ray)")
    g.add_argument("--ray", action="store_true",
                   help="run as a Ray Data job: the paths are INPUTs (folders, globs, .parquet / .jsonl tables with a "
                        "path or url column, WebDataset .tar shards) and -o is an OUTPUT_DIR of Parquet parts; "
                        "a re-run resumes")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (default $RAY_ADDRESS; none: start a local one)")
    g.add_argument("--actors", type=at_least(1), default=None, metavar="N",
                   help="model actors (default: as many as fit beside the image-decoding tasks)")
    g.add_argument("--actor-cpus", type=in_range(0), default=1.0, metavar="F", help="CPUs per actor (default 1)")
    g.add_argument("--actor-gpus", type=in_range(0), default=0.0, metavar="F", help="GPUs per actor (default 0)")
    g.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                   help="torch threads per actor (default: a local cluster's cores shared among its actors)")
    g.add_argument("--num-cpus", type=at_least(1), default=None, metavar="N",
                   help="CPUs of the local cluster started without an address (default: all)")
    g.add_argument("--shard-rows", type=at_least(1), default=1000, metavar="N",
                   help="rows per output Parquet part (default 1000)")
    g.add_argument("--path-column", default=None, metavar="NAME",
                   help="the image column of .parquet / .jsonl inputs (default: path, url, image, ...)")


def run(args: argparse.Namespace) -> int:
    """The job for `args` (a caption, ask or embed command line with --ray)."""
    from ..cli.common import UsageError
    from . import DEFAULTS, Resources
    from .inputs import InputError
    from .driver import run_job

    kind = args.command
    if getattr(args, "json", False) or getattr(args, "jsonl", False):
        raise UsageError("--json / --jsonl print records; with --ray the records go to the -o folder")
    if not args.output:
        raise UsageError("--ray needs -o OUTPUT_DIR (the folder the Parquet parts go to)")
    if kind == "embed" and args.text:
        raise UsageError("--text is not embedded by --ray jobs (images only); run `blip2 embed --text ...` without --ray")
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'blip2[ray]'") from None
    inputs = [args.image] if kind == "ask" else args.paths
    if not inputs:
        raise UsageError("--ray needs at least one INPUT: a folder, glob, table or WebDataset shard")
    opts = {k: getattr(args, k) for k in DEFAULTS[kind] if hasattr(args, k)}
    res = Resources(address=args.ray_address, actors=args.actors, actor_cpus=args.actor_cpus,
                    actor_gpus=args.actor_gpus, threads=args.threads, batch_size=args.batch_size,
                    num_cpus=args.num_cpus)
    try:
        stats = run_job(kind, inputs, args.output, args.model, opts, res, shard_rows=args.shard_rows,
                        path_column=args.path_column)
    except InputError as e:
        raise UsageError(str(e)) from None
    print(f"blip2: {stats['rows']} row(s) in {args.output} ({stats['failed']} with an error); "
          f"this run: {stats['this_run']['rows']} row(s) in {stats['this_run']['seconds']:.1f} s", file=sys.stderr)
    return 1 if stats["failed"] or stats["failed_inputs"] else 0
