"""Starting the server: the models loaded as the CLI loads them, the scheduler thread, and uvicorn,
in the foreground (`blip2 serve`) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import argparse
import socket
import threading
import time

import torch
from PIL import Image

from ... import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from ..cli.common import UsageError, args_model_dir, load
from ..index import SearchIndex
from .app import State, create_app
from .images import ImagePolicy
from .scheduler import Scheduler


def build_state(args: argparse.Namespace) -> State:
    """Load --model (and --retrieval-model: by default the demo's retrieval checkpoint when --model
    is demo), open --index, and start the scheduler thread. Raises UsageError for an unusable model
    or index."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)  # before loading: the backend's kernels use torch's threads
    model, proc = load(args, Blip2ForConditionalGeneration)
    rmodel = rproc = None
    rname = args.retrieval_model or ("demo-retrieval" if args.model == "demo" else None)
    if rname:
        rargs = argparse.Namespace(**{**vars(args), "model": "demo" if rname == "demo-retrieval" else rname,
                                      "demo_kind": "retrieval", "quantize": None})
        rmodel, rproc = load(rargs, Blip2ForImageTextRetrieval)
    loaded = (rmodel, rproc, args_model_dir(rargs)) if rmodel is not None else None
    index = open_index(args.index, args.device, loaded) if args.index else None
    sched = Scheduler(model, proc.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                      prefill_budget=args.prefill_budget).start()
    policy = ImagePolicy(allow_remote=args.allow_remote_images, max_bytes=args.max_image_bytes,
                         max_pixels=args.max_image_pixels, fetch_timeout=args.fetch_timeout)
    return State(model=model, proc=proc, scheduler=sched, name=args.model, rmodel=rmodel, rproc=rproc, rname=rname,
                 index=index, api_key=args.api_key, policy=policy, max_body=args.max_body,
                 request_timeout=args.request_timeout)


def open_index(path: str, device: str, loaded: tuple | None = None) -> SearchIndex:
    """--index: a `blip2 index build` folder as a SearchIndex, with the retrieval model it records
    (the server's own --retrieval-model when that is the one: `loaded` = (model, processor, dir)).
    Its models are loaded now, by a search of each kind, rather than by the first request (which
    would hold the model thread, and every chat row with it, while they load)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UsageError("--index needs faiss: pip install 'blip2[index]'") from None
    ix = SearchIndex(path, device=device, loaded=loaded)
    ix.search(image=Image.new("RGB", (32, 32), "white"), k=1)
    if ix.retrieval:  # text search (and its ITM re-rank) needs the ITC projections
        ix.search(text="a picture", k=1, rerank=1)
    return ix


def _server(state: State, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    return uvicorn.Server(config)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one clear line (UsageError)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise UsageError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None


def serve_forever(state: State, sock: socket.socket) -> None:
    """Serve on `sock` until Ctrl-C / SIGTERM (uvicorn handles both), then stop the scheduler."""
    host, port = sock.getsockname()[:2]
    try:
        _server(state, host, port).run(sockets=[sock])
    finally:
        state.scheduler.stop()


class Running:
    """A server on a background thread: `url`, and `stop()` (which restores torch's thread count to
    `threads` when given: a test process shares it with other tests)."""

    def __init__(self, state: State, host: str = "127.0.0.1", port: int = 0, threads: int | None = None):
        self.state = state
        self.threads = threads  # torch's thread count to restore on stop (build_state may have changed it)
        sock = listen(host, port)  # port 0: the system picks a free one
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = _server(state, host, self.port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="blip2-uvicorn",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.state.scheduler.stop()
        if self.threads:
            torch.set_num_threads(self.threads)
