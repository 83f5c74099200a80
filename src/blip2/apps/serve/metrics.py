"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms, with
no client library: the scheduler thread and the request handlers bump plain Python numbers (each
update is one bytecode-level operation under the GIL) and GET /metrics renders them."""

from __future__ import annotations

import bisect
import time
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{le}"}} {acc}')
        out += [f"{self.name}_sum {self.sum}", f"{self.name}_count {acc}"]
        return out


class Metrics:
    """Everything /metrics shows. Counters only grow; gauges are read from the scheduler when rendered."""

    def __init__(self):
        self.started = time.monotonic()
        self.counters = {  # name -> [value, help]
            "blip2_requests_total": [0, "requests answered (any status)"],
            "blip2_requests_rejected_total": [0, "requests refused with 429 because the queue was full"],
            "blip2_requests_cancelled_total": [0, "generations stopped because the client left"],
            "blip2_requests_timed_out_total": [0, "generations stopped at their deadline"],
            "blip2_prompt_tokens_total": [0, "prompt tokens prefilled (image queries included)"],
            "blip2_generation_tokens_total": [0, "tokens generated"],
            "blip2_decode_steps_total": [0, "decode steps of the running batch"],
            "blip2_prefills_total": [0, "prefill passes (the requests admitted in one gap share one)"],
        }
        self.ttft = Histogram("blip2_time_to_first_token_seconds", "arrival to first generated token")
        self.latency = Histogram("blip2_request_latency_seconds", "arrival to last token (generation requests)")
        self.step = Histogram("blip2_decode_step_seconds", "one decode step of the whole running batch")
        self.prefill = Histogram("blip2_prefill_seconds", "one gap's image encoding and prefill (all its requests)")
        self.rows = Histogram("blip2_decode_batch_rows", "rows in the batch at each decode step",
                              (1, 2, 4, 8, 16, 32, 64, 128))
        self._recent: list[tuple[float, int]] = []  # (time, tokens) of the last steps, for tokens/s
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name][0] += n

    def tokens(self, n: int) -> None:
        """n tokens came out of one step (or one prefill)."""
        self.inc("blip2_generation_tokens_total", n)
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10.0:
            self._recent.pop(0)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 s."""
        if not self._recent:
            return 0.0
        now = time.monotonic()
        span = min(10.0, max(now - self.started, 1e-3))
        return sum(n for t, n in self._recent if t >= now - span) / span

    def render(self) -> str:
        out = []
        for name, (v, doc) in self.counters.items():
            out += [f"# HELP {name} {doc}", f"# TYPE {name} counter", f"{name} {v}"]
        gauges = {**self.gauges, "blip2_generation_tokens_per_second": ("generated tokens per second, last 10 s",
                                                                       self.tokens_per_second)}
        for name, (doc, read) in gauges.items():
            out += [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name} {float(read())}"]
        for h in (self.ttft, self.latency, self.step, self.prefill, self.rows):
            out += h.render()
        return "\n".join(out) + "\n"
