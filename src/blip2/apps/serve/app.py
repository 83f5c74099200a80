"""The HTTP side: FastAPI routes in OpenAI's shapes, errors in OpenAI's error shape, the API key,
and the page at `/`.

    POST /v1/chat/completions   chat (one image per conversation), streaming as Server-Sent Events
    POST /v1/captions           captions of several images (beam search, several per image)
    POST /v1/answers            several questions about one image (generate_many)
    POST /v1/match              ITM probability and ITC similarity, every image x every text
    POST /v1/embeddings         text and image vectors of the retrieval checkpoint
    POST /v1/search             the best images of the index (--index) for a text or an image
    GET  /v1/models, /health, /metrics, /  (the page; its files under /static/)

Handlers validate, decode images and tokenize on the event loop's thread pool; only the scheduler
thread touches the models. Every error is JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..cli.common import pixels
from .chat import ChatError, prompt_ids, render
from .images import ImageError, ImagePolicy, fetch_image
from .metrics import Metrics
from .scheduler import QueueFull, Request, Sampling, Scheduler
from .schemas import AskRequest, CaptionRequest, ChatRequest, EmbeddingRequest, MatchRequest, SearchRequest
from . import tasks

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # no API key needed (the page asks for it)


@dataclass
class State:
    model: Any
    proc: Any
    scheduler: Scheduler
    name: str = "blip2"
    rmodel: Any = None  # the retrieval checkpoint (match, embeddings), if any
    rproc: Any = None
    rname: str | None = None
    index: Any = None  # a SearchIndex (--index), searched on the model thread
    api_key: str | None = None
    policy: ImagePolicy = field(default_factory=ImagePolicy)
    max_body: int = 32 * 1024 * 1024
    request_timeout: float = 300.0

    @property
    def metrics(self) -> Metrics:
        return self.scheduler.metrics


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str | None = None, param=None, code=None) -> JSONResponse:
    type_ = type_ or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                      504: "timeout_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


class Gate:
    """ASGI middleware in front of the routes: counts requests; with an API key, asks every path but
    /health and the page's files for `Authorization: Bearer KEY` (constant-time compare); and when
    the queue is full, answers a POST 429 before its body is even read."""

    def __init__(self, app, key: str | None, sched: Scheduler):
        self.app, self.key, self.sched = app, key, sched

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.sched.metrics.inc("blip2_requests_total")
        if self.key and scope["type"] == "http":
            path = scope["path"]
            if path not in OPEN_PATHS and not path.startswith("/static/"):
                got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(got.encode(), f"Bearer {self.key}".encode()):
                    resp = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                    return await resp(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "POST" and self.sched.full():
            self.sched.metrics.inc("blip2_requests_rejected_total")
            return await error_response(429, f"the server is busy: --max-queue {self.sched.max_queue} requests are "
                                             "waiting; retry later")(scope, receive, send)
        await self.app(scope, receive, send)


async def read_json(request: HTTPRequest, model: type[BaseModel], max_body: int) -> Any:
    """The body as `model`, or an APIError: 415 not JSON, 413 too large, 400 malformed or invalid."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"the body must be JSON (Content-Type: application/json), not {ctype or 'nothing'}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise APIError(413, f"the body is {declared} bytes, over the server's limit of {max_body}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_body:
            raise APIError(413, f"the body is over the server's limit of {max_body} bytes")
    try:
        obj = json.loads(buf)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"malformed JSON: {e}") from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(400, f"{param or 'body'}: {err['msg']}{more}", param=param) from None


def create_app(state: State) -> FastAPI:
    app = FastAPI(title="blip2 serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.blip2 = state
    model, proc, sched = state.model, state.proc, state.scheduler
    cfg = model.config
    dec_only = cfg.use_decoder_only_language_model

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _any_error(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    async def image(url: str, what: str):
        try:
            return await run_in_threadpool(fetch_image, url, state.policy, what)
        except ImageError as e:
            raise APIError(400, str(e), param=what) from None

    async def on_model_thread(fn, *a):
        try:
            fut = sched.call(lambda: fn(*a))
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), state.request_timeout)
        except tasks.TaskError as e:
            raise APIError(400, str(e)) from None
        except asyncio.TimeoutError:
            raise APIError(504, "the request passed its deadline (--request-timeout)") from None

    def retrieval():
        if state.rmodel is None:
            raise APIError(404, "this server has no retrieval model: start it with --retrieval-model", code="no_model")
        return state.rmodel, state.rproc

    def usage(p: int, c: int) -> dict:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # --- chat ---
    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        arrived = time.monotonic()
        body: ChatRequest = await read_json(request, ChatRequest, state.max_body)
        try:
            r = render([m.model_dump() for m in body.messages])
        except ChatError as e:
            raise APIError(400, str(e), param="messages") from None
        img = await image(r.image_url, "messages")
        pv = await run_in_threadpool(pixels, proc, [img], model)
        ids = prompt_ids(proc.tokenizer, r.text, cfg.num_query_tokens, cfg.image_token_index,
                         cfg.text_config.bos_token_id)
        sampling = Sampling(max_tokens=_max_tokens(body, len(ids)), temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed, repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
                            stop=body.stops(), n=body.n)
        if body.n > sched.max_batch:
            raise APIError(400, f"n={body.n} is more than the server's --max-batch {sched.max_batch}", param="n")
        if sampling.min_tokens > sampling.max_tokens:
            raise APIError(400, f"min_tokens {body.min_tokens} is more than max_tokens {sampling.max_tokens}",
                           param="min_tokens")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(ids, pv, sampling, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                      deadline=arrived + min(body.timeout or state.request_timeout, state.request_timeout),
                      arrived=arrived)
        try:
            sched.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or state.name}
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(req, events, head, len(ids), include), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons, used = [""] * body.n, [None] * body.n, 0
        try:
            while None in reasons:
                try:
                    ev = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancelled = True
                        return error_response(499, "the client closed the connection")
                    continue
                if ev[0] == "delta":
                    texts[ev[1]] += ev[2]
                elif ev[0] == "finish":
                    reasons[ev[1]], used = ev[2], used + ev[3]
                else:
                    return error_response(ev[1], ev[2])
        finally:
            if None in reasons:
                req.cancelled = True
        return {**head, "object": "chat.completion", "usage": usage(len(ids), used),
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                             "finish_reason": f} for i, (t, f) in enumerate(zip(texts, reasons))]}

    def _max_tokens(body: ChatRequest, prompt_len: int) -> int:
        asked = body.max_completion_tokens or body.max_tokens
        room = cfg.text_config.max_position_embeddings - prompt_len + 1 if dec_only else 4096
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens {asked} does not fit: the prompt takes {prompt_len} of the language "
                                f"model's {cfg.text_config.max_position_embeddings} positions ({cfg.num_query_tokens} "
                                f"image queries included), leaving room for {room}", param="max_tokens")
        if room < 1:
            raise APIError(400, f"the prompt ({prompt_len} tokens with the image queries) does not fit the language "
                                f"model's {cfg.text_config.max_position_embeddings} positions", param="messages")
        # unset: the checkpoint's max_new_tokens, else up to 512 (T5 has no position limit to stop at)
        return asked if asked is not None else min(model.generation_config.max_new_tokens or 512, room)

    # --- what chat cannot express ---
    @app.post("/v1/captions")
    async def captions(request: HTTPRequest):
        body: CaptionRequest = await read_json(request, CaptionRequest, state.max_body)
        imgs = [await image(u, f"images.{i}") for i, u in enumerate(body.images)]
        pv = await run_in_threadpool(pixels, proc, imgs, model)
        caps, p, c = await on_model_thread(tasks.caption, model, proc, pv, body.prompt, body.max_tokens or 30,
                                           body.num_beams, body.temperature, body.top_p, body.n, body.seed)
        return {"object": "list", "model": body.model or state.name, "usage": usage(p, c),
                "data": [{"index": i, "captions": cs} for i, cs in enumerate(caps)]}

    @app.post("/v1/answers")
    async def answers(request: HTTPRequest):
        body: AskRequest = await read_json(request, AskRequest, state.max_body)
        if body.template.count("{}") != 1:
            raise APIError(400, "template must hold exactly one {} (where the question goes)", param="template")
        img = await image(body.image, "image")
        pv = await run_in_threadpool(pixels, proc, [img], model)
        ans, p, c = await on_model_thread(tasks.ask, model, proc, pv, body.questions, body.template,
                                          body.max_tokens or 20, body.num_beams, body.temperature, body.top_p, body.seed)
        return {"object": "list", "model": body.model or state.name, "usage": usage(p, c),
                "data": [{"index": i, "question": q, "answer": a} for i, (q, a) in enumerate(zip(body.questions, ans))]}

    @app.post("/v1/match")
    async def match(request: HTTPRequest):
        body: MatchRequest = await read_json(request, MatchRequest, state.max_body)
        rm, rp = retrieval()
        imgs = [await image(u, f"images.{i}") for i, u in enumerate(body.images)]
        recs = await on_model_thread(tasks.match, rm, rp, imgs, body.texts)
        return {"object": "list", "model": state.rname,
                "data": [{"image": r["path"], "text": r["text"], "itm": r["itm"], "itc": r["itc"]} for r in recs]}

    @app.post("/v1/embeddings")
    async def embeddings(request: HTTPRequest):
        body: EmbeddingRequest = await read_json(request, EmbeddingRequest, state.max_body)
        rm, rp = retrieval()
        items = [body.input] if isinstance(body.input, str) else body.input
        texts = [x for x in items if isinstance(x, str)]
        urls = [(i, x.image_url.url) for i, x in enumerate(items) if not isinstance(x, str)]
        imgs = [await image(u, f"input.{i}") for i, u in urls]
        pv = await run_in_threadpool(pixels, rp, imgs, rm) if imgs else None
        img_vecs, txt_vecs = await on_model_thread(tasks.embed, rm, rp, pv, texts)
        it_i, it_t = iter(img_vecs.float().tolist() if imgs else []), iter(txt_vecs.float().tolist() if texts else [])
        data = []
        for i, x in enumerate(items):
            vec, kind = (next(it_t), "text") if isinstance(x, str) else (next(it_i), "image")
            data.append({"object": "embedding", "index": i, "type": kind,
                         "embedding": _encode(vec, body.encoding_format)})
        ntok = sum(len(rp.tokenizer(t)["input_ids"]) for t in texts)
        return {"object": "list", "model": body.model or state.rname, "data": data,
                "usage": {"prompt_tokens": ntok, "total_tokens": ntok}}

    @app.post("/v1/search")
    async def search(request: HTTPRequest):
        if state.index is None:
            raise APIError(404, "this server has no search index: start it with --index DIR (a folder written by "
                                "`blip2 index build`)", code="no_index")
        body: SearchRequest = await read_json(request, SearchRequest, state.max_body)
        if (body.query is None) == (body.image is None):
            raise APIError(400, "give one of query (a text) or image (a data: URL) to search with, not "
                                + ("both" if body.query is not None else "neither"), param="query")
        img = await image(body.image, "image") if body.image is not None else None
        hits = await on_model_thread(tasks.search, state.index, body.query, img, body.k, body.rerank)
        return {"object": "list", "model": body.model or state.index.model_name, "data": hits}

    # --- plumbing ---
    @app.get("/v1/models")
    async def models():
        names = [state.name] + ([state.rname] if state.rname else [])
        if state.index is not None and state.index.model_name not in names:
            names.append(state.index.model_name)  # the index's own retrieval model (POST /v1/search)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "blip2"}
                                           for n in names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": len(sched.waiting), "running": sched.running_rows()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Gate(app, state.api_key, sched)


def _encode(vec, fmt: str):
    if fmt == "float":
        return vec
    return base64.b64encode(np.asarray(vec, dtype=np.float32).tobytes()).decode("ascii")


async def _sse(req: Request, events: asyncio.Queue, head: dict, prompt_tokens: int, include_usage: bool):
    """OpenAI's chunk stream: a role chunk per choice, content deltas, a finish chunk per choice,
    the usage chunk when asked for, then `data: [DONE]`. A client that leaves cancels the rows."""
    def chunk(choices: list, **extra) -> str:
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    n, used, open_ = req.sampling.n, 0, req.sampling.n
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)])
        while open_:
            ev = await events.get()
            if ev[0] == "delta":
                yield chunk([{"index": ev[1], "delta": {"content": ev[2]}, "logprobs": None, "finish_reason": None}])
            elif ev[0] == "finish":
                open_, used = open_ - 1, used + ev[3]
                yield chunk([{"index": ev[1], "delta": {}, "logprobs": None, "finish_reason": ev[2]}])
            else:
                open_ = 0
                yield "data: " + json.dumps(error_body(ev[2], "timeout_error" if ev[1] == 504 else "server_error")) + "\n\n"
        if include_usage:
            yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": used,
                                   "total_tokens": prompt_tokens + used})
        yield "data: [DONE]\n\n"
    finally:
        if open_:
            req.cancelled = True
