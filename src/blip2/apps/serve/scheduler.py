"""Continuous batching: one thread owns the model and decodes every running request as one batch.

    HTTP handlers ──submit()──► waiting (deque, at most --max-queue) ──admit──► running batch
         ▲                                                                        │ step
         └──────── events (text deltas, finish, error) via the event loop ◄───────┘

The loop, between two decode steps of the running batch:
1. drops waiting requests whose client left or whose deadline passed;
2. runs one queued task (caption, ask, match, embeddings: plain `generate` / `generate_many` /
   retrieval calls, which do not join the batch);
3. admits waiting chat requests while the batch has rows to spare (--max-batch) and the prompt
   tokens prefilled in this gap stay under the token budget (--prefill-budget; at least one is
   admitted): their images go through the ViT and Q-Former once, as one batch; their prompts are
   prefilled as one left-padded batch (as generate_many does); each first token is sampled from
   the prefill's logits, and the n choices of each request join the batch (batch.py: join);
4. runs one decode step for all rows; each row applies its own logits processors (repetition
   penalty, min_tokens, temperature, top-p) and samples with its own torch.Generator (seeded by
   the request's `seed`), or takes the argmax;
5. rows that produced EOS, reached max_tokens, matched a stop string, were cancelled (client gone)
   or passed their deadline leave at once (batch.py: leave).
A row's tokens do not depend on the other rows: its keys and values, mask and positions are its
own, so a greedy answer is the one `generate` gives for that request alone.

Encoder-decoder language models (Flan-T5) take a simpler path: each request keeps a session of its
own (its encoder output and cross-attention caches are per request) and the loop steps them one
after another. Rows still come and go between steps, but they do not share a matrix product.

Compared with vLLM's scheduler: vLLM keeps the KV cache in fixed-size pages (PagedAttention) so
rows of any length share one pool without copying, and it splits long prompts into chunks that
ride along with decode steps (chunked prefill) under a per-step token budget. Here a join copies
the running rows' caches into a new contiguous buffer (right-aligned, as a left-padded batch), and
a prefill runs whole, between steps, under a budget of prompt tokens per gap. On a CPU the
decode step reads every weight once, whatever the batch size, so that copy (a few MB) is small
next to the step it enables; with long prompts and many rows, paging and chunking would win.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...generation import special_tokens
from ...generation.logits import apply_processors, build_processors
from .batch import join, leave, mergeable
from .metrics import Metrics


GATHER_S = 0.02  # seconds an idle scheduler waits for the rest of a burst (a prefill takes 10-1000x that)


class QueueFull(Exception):
    """--max-queue requests are already waiting: the server answers 429."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float | None = None  # None: the checkpoint's generation_config (greedy for BLIP-2); 0: greedy
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1

    def generate_kwargs(self) -> dict:
        kw: dict[str, Any] = {"max_new_tokens": self.max_tokens}
        if self.temperature == 0:
            kw["do_sample"] = False
        elif self.temperature is not None or (self.top_p is not None and self.top_p < 1):
            # OpenAI's sampling knows no top-k: switch the reference's default top_k=50 off
            kw.update(do_sample=True, temperature=self.temperature or 1.0, top_k=0)
            if self.top_p is not None:
                kw["top_p"] = self.top_p
        if self.repetition_penalty is not None:
            kw["repetition_penalty"] = self.repetition_penalty
        if self.min_tokens:
            kw["min_new_tokens"] = self.min_tokens
        return kw


@dataclass
class Request:
    """A chat completion: prompt ids (image placeholders first), the image, and how to sample.
    `emit(event)` is called from the scheduler thread: ("delta", choice, text),
    ("finish", choice, reason, tokens) or ("error", status, message)."""
    ids: list[int]
    pixel_values: torch.Tensor  # (1, 3, H, W)
    sampling: Sampling
    emit: Callable[[tuple], None]
    deadline: float  # time.monotonic() after which it is cancelled
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the handler when the client leaves
    first_token_at: float | None = None
    open_rows: int = 0  # choices still decoding
    ended: bool = False  # an error was sent: nothing more goes out


class Row:
    """One choice of one request in the batch."""

    def __init__(self, req: Request, choice: int, cfg, T0: int, history: torch.Tensor, tok):
        self.req, self.choice = req, choice
        self.max_len = cfg.max_length
        # (1, L): the history the processors see, prompt (or T5's start token) first
        self.hist = torch.zeros(1, self.max_len, dtype=torch.long, device=history.device)
        self.hist[0, :T0] = history[0]
        self.t = T0
        self.T0 = T0
        self.procs = build_processors(cfg, T0, history.device)
        self.sample = bool(cfg.do_sample)
        self.gen = None
        if self.sample:
            self.gen = torch.Generator(device=history.device)
            seed = req.sampling.seed
            self.gen.manual_seed(seed + choice if seed is not None else int(torch.randint(2**62, ())))
        self.eos = set(special_tokens(cfg)[0] or [])
        self.tok = tok  # the tokenizer, for stop strings and text deltas
        self.sent = ""  # text emitted so far
        self.finished: str | None = None

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's (1, V) logits through its processors, in fp32 as generate's _sample scores them."""
        return apply_processors(self.procs, self.hist[:, : self.t], logits.to(torch.float32))

    def draw(self, scores: torch.Tensor) -> int:
        return int(torch.multinomial(F.softmax(scores, -1), 1, generator=self.gen))

    def push(self, token: int) -> None:
        """Record a token, emit the text it makes visible, and decide whether the row is done."""
        self.hist[0, self.t] = token
        self.t += 1
        stop = self.req.sampling.stop
        text = self.tok.decode(self.hist[0, self.T0 : self.t], skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finish("stop", text[:cut])
        elif token in self.eos:
            self.finish("stop", text)
        elif self.t >= self.max_len:
            self.finish("length", text)
        elif not text.endswith("\ufffd"):  # not in the middle of a multi-byte character
            hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = text[: len(text) - hold].rstrip()  # trailing spaces wait: the answer is stripped
            self._emit_upto(safe)

    def _emit_upto(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.req.emit(("delta", self.choice, text[len(self.sent):]))
            self.sent = text

    def finish(self, reason: str, text: str) -> None:
        self._emit_upto(text.rstrip())
        self.finished = reason
        self.req.emit(("finish", self.choice, reason, self.t - self.T0))


class Group:
    """A decoding session and its rows (row i of the session is rows[i])."""

    def __init__(self, session, rows: list[Row], need: int):
        self.session, self.rows, self.need = session, rows, need


class Scheduler:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64, prefill_budget: int = 512,
                 metrics: Metrics | None = None):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_budget = max_batch, max_queue, prefill_budget
        self.metrics = metrics or Metrics()
        self.waiting: collections.deque = collections.deque()  # Requests and (fn, Future) tasks
        self.groups: list[Group] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="blip2-scheduler", daemon=True)
        self.metrics.gauges.update({
            "blip2_queue_depth": ("requests waiting to start", lambda: len(self.waiting)),
            "blip2_running_rows": ("rows in the running decode batch", self.running_rows),
        })

    # --- called from the server's threads ---
    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=30)

    def running_rows(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    def full(self) -> bool:
        return len(self.waiting) >= self.max_queue

    def submit(self, req: Request) -> None:
        self._enqueue(req)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn() on the model thread between two decode steps; raises QueueFull like submit."""
        fut: Future = Future()
        self._enqueue((fn, fut))
        return fut

    def _enqueue(self, item) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                self.metrics.inc("blip2_requests_rejected_total")
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue "
                                f"{self.max_queue}); retry later")
            self.waiting.append(item)
            self.cv.notify()

    # --- the model thread ---
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    idle = not self.groups
                    while not self.stopping and not self.waiting and not self.groups:
                        self.cv.wait(timeout=0.5)
                    if self.stopping:
                        break
                if idle:
                    # Woken from idle by a request: clients that arrive together (a burst, or closed-loop
                    # clients whose answers ended on the same step) reach the queue a few ms apart, as the
                    # HTTP thread parses them one by one. Waiting that long lets one prefill take them all;
                    # else the first is prefilled alone and the rest wait a whole prefill for theirs.
                    time.sleep(GATHER_S)
                try:
                    self._drop_expired()
                    self._run_one_task()
                    self._admit()
                    for g in list(self.groups):
                        self._step(g)
                    time.sleep(0)  # let the HTTP thread take the GIL between steps (it streams, parses, admits)
                except Exception as e:  # a bug must not kill the server: fail what is in flight
                    self._fail_running(f"internal error: {type(e).__name__}: {e}")
        self._fail_running("the server is shutting down")
        self._fail_waiting("the server is shutting down")

    def _drop_expired(self) -> None:
        now = time.monotonic()
        with self.cv:
            for item in list(self.waiting):
                if isinstance(item, Request) and (item.cancelled or now > item.deadline):
                    self.waiting.remove(item)
                    self._end_unstarted(item)

    def _end_unstarted(self, req: Request) -> None:
        if req.cancelled:
            self.metrics.inc("blip2_requests_cancelled_total")
        else:
            self.metrics.inc("blip2_requests_timed_out_total")
            req.emit(("error", 504, "the request passed its deadline (--request-timeout) before it could start"))

    def _run_one_task(self) -> None:
        with self.cv:
            task = next((it for it in self.waiting if isinstance(it, tuple)), None)
            if task is not None:
                self.waiting.remove(task)
        if task is not None:
            fn, fut = task
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)

    def _admit(self) -> None:
        """Take the waiting chat requests that fit, in arrival order, and prefill them together."""
        budget, reqs = self.prefill_budget, []
        with self.cv:
            rows = self.running_rows()
            for req in [it for it in self.waiting if isinstance(it, Request)]:
                if rows + req.sampling.n > self.max_batch and (self.groups or reqs):
                    break  # a request wider than --max-batch still runs, alone
                if reqs and len(req.ids) > budget:
                    break
                self.waiting.remove(req)
                reqs.append(req)
                rows += req.sampling.n
                budget -= len(req.ids)
        if reqs:
            self._prefill(reqs)

    def _encode(self, reqs: list[Request]) -> list[torch.Tensor]:
        """Each request's image through the ViT, Q-Former and projection: (1, Q, C) each. Images of
        one size go through as one batch: the ViT's products get more rows per weight read."""
        out: list = [None] * len(reqs)
        by_size: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            by_size.setdefault(tuple(r.pixel_values.shape[1:]), []).append(i)
        for idx in by_size.values():
            _, _, lm_inputs = self.model._image_to_lm(torch.cat([reqs[i].pixel_values for i in idx]))  # (k, Q, C)
            for j, i in enumerate(idx):
                out[i] = lm_inputs[j : j + 1]
        return out

    def _prefill(self, reqs: list[Request]) -> None:
        """The gap's new requests: images encoded together, then (decoder-only) one left-padded
        prefill of all their prompts, as generate_many runs one; every first token is sampled
        before any goes out, so rows admitted early in a gap do not wait on the later prefills
        between their first and second token (TPOT), and the new rows join the batch at once."""
        m, t0 = self.model, time.monotonic()
        try:
            lm_inputs = self._encode(reqs)
        except Exception as e:  # these requests fail; the running rows go on
            for req in reqs:
                req.emit(("error", 500, f"internal error: {type(e).__name__}: {e}"))
            return
        ready = []  # (request, prompt embeddings (1, T, C), its config, its history (1, T0))
        for req, li in zip(reqs, lm_inputs):
            ids = torch.tensor([req.ids], dtype=torch.long, device=m.device)  # (1, T)
            try:
                embeds = m._merge(ids, None, li)
                cfg, history = m._decode_config(embeds, ids, None, req.sampling.generate_kwargs())
            except (ValueError, NotImplementedError, TypeError) as e:  # a prompt too long, a setting generate refuses
                req.emit(("error", 400, str(e)))
                continue
            ready.append((req, embeds, cfg, history))
        if not ready:
            return
        try:
            if m.config.use_decoder_only_language_model:
                parts = [(self._start(ready), ready)]
            else:  # T5: a session per request (its encoder output is its own)
                parts = [(self._start([r]), [r]) for r in ready]
        except Exception as e:
            for req, *_ in ready:
                req.emit(("error", 500, f"internal error: {type(e).__name__}: {e}"))
            return
        self.metrics.inc("blip2_prefills_total", len(parts))
        self.metrics.prefill.observe(time.monotonic() - t0)
        for (session, need, logits), group in parts:
            index = [i for i, (req, *_) in enumerate(group) for _ in range(req.sampling.n)]  # row -> request
            rows = []
            for req, _, cfg, history in group:
                self.metrics.inc("blip2_prompt_tokens_total", len(req.ids))
                req.open_rows = req.sampling.n
                rows += [Row(req, c, cfg, history.shape[1], history, self.tok) for c in range(req.sampling.n)]
            if index != list(range(len(group))):
                session.reorder(torch.tensor(index, dtype=torch.long, device=m.device))
            self._advance(Group(session, rows, need), logits[index])

    def _start(self, ready: list) -> tuple:
        """One session over the requests' prompts, left padded, and its prefill: (session, the most
        steps a row may take, (k, V) logits of each prompt's last position)."""
        m = self.model
        T = max(e.shape[1] for _, e, _, _ in ready)
        k, C = len(ready), ready[0][1].shape[2]
        embeds = ready[0][1].new_zeros(k, T, C)  # (k, T, C)
        mask = torch.zeros(k, T, dtype=torch.long, device=m.device)  # (k, T)
        for i, (_, e, _, _) in enumerate(ready):
            embeds[i, T - e.shape[1] :] = e[0]
            mask[i, T - e.shape[1] :] = 1
        need = max(cfg.max_length - h.shape[1] for _, _, cfg, h in ready)
        session = m.language_model.start(embeds, mask, need)
        return session, need, session.prefill()

    def _step(self, g: Group) -> None:
        t0 = time.monotonic()
        tokens = torch.tensor([int(r.hist[0, r.t - 1]) for r in g.rows], dtype=torch.long, device=self.model.device)
        logits = g.session.step(tokens)  # (B, V)
        g.need -= 1
        self.metrics.inc("blip2_decode_steps_total")
        self.metrics.step.observe(time.monotonic() - t0)
        self.metrics.rows.observe(len(g.rows))
        self._advance(g, logits)

    def _advance(self, g: Group, logits: torch.Tensor) -> None:
        """Pick each row's token, emit, and let finished rows leave; a new group joins the batch."""
        now = time.monotonic()
        for r in g.rows:
            if r.req.cancelled:
                r.finished = "cancelled"
            elif now > r.req.deadline:
                r.finished = "timeout"
        live = [i for i, r in enumerate(g.rows) if not r.finished]
        scores = logits.to(torch.float32)  # (B, V)
        if any(g.rows[i].procs for i in live):
            scores = scores.clone()
            for i in live:
                if g.rows[i].procs:
                    scores[i : i + 1] = g.rows[i].scores(logits[i : i + 1])
        greedy = scores.argmax(-1).tolist()  # one argmax for the whole batch; sampling rows draw below
        for i in live:
            r = g.rows[i]
            r.push(r.draw(scores[i : i + 1]) if r.sample else greedy[i])
            if r.req.first_token_at is None:
                r.req.first_token_at = now
                self.metrics.ttft.observe(now - r.req.arrived)
        self.metrics.tokens(len(live))
        self._retire(g)
        if g.rows and g not in self.groups:
            self._attach(g)

    def _retire(self, g: Group) -> None:
        gone = [r for r in g.rows if r.finished]
        if not gone:
            return
        keep = [i for i, r in enumerate(g.rows) if not r.finished]
        g.rows = [g.rows[i] for i in keep]  # first out of the batch, then told: a client sees it gone
        if keep:
            leave(g.session, keep)
        elif g in self.groups:
            self.groups.remove(g)
        for r in gone:
            req = r.req
            req.open_rows -= 1
            if r.finished in ("cancelled", "timeout") and not req.ended:
                req.ended = True
                if r.finished == "cancelled":
                    self.metrics.inc("blip2_requests_cancelled_total")
                else:
                    self.metrics.inc("blip2_requests_timed_out_total")
                    req.emit(("error", 504, "the request passed its deadline (--request-timeout) and was cancelled"))
            elif req.open_rows == 0 and not req.ended:
                self.metrics.latency.observe(time.monotonic() - req.arrived)

    def _attach(self, g: Group) -> None:
        """A freshly prefilled group joins the running batch (decoder-only) or runs beside it."""
        run = self.groups[0] if self.groups else None
        if run is not None and mergeable(run.session) and mergeable(g.session):
            run.need = max(run.need, g.need)
            join(run.session, g.session, run.need)
            run.rows += g.rows
        else:
            self.groups.append(g)

    def _fail_running(self, why: str) -> None:
        for g in self.groups:
            for r in g.rows:
                if not r.finished and not r.req.ended:
                    r.req.ended = True
                    r.req.emit(("error", 500, why))
        self.groups = []

    def _fail_waiting(self, why: str) -> None:
        with self.cv:
            while self.waiting:
                it = self.waiting.popleft()
                if isinstance(it, Request):
                    it.emit(("error", 503, why))
                else:
                    it[1].set_exception(RuntimeError(why))
