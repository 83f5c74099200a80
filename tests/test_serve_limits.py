"""`blip2 serve` at its limits: a full queue answers 429 at once, a request past its deadline is
cancelled (504), and the server keeps serving. One server, one row at a time, a queue of one and
requests that ask for a 0.05 s deadline (the `timeout` extension): a long answer (60 forced
tokens, 0.1 s or more here) cannot finish in time."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve_helpers import chat_messages, examples, metric, start_server

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 60, "min_tokens": 60}


@pytest.fixture(scope="module")
def server():
    srv = start_server("--max-batch", "1", "--max-queue", "1")
    yield srv
    srv.stop()


def _short(c: httpx.Client):
    r = c.post("/v1/chat/completions", json={"messages": chat_messages(examples()[0], "what color is it?"),
                                             "max_tokens": 3})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_deadline_cancels_and_the_server_keeps_serving(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = metric(c.get("/metrics").text, "blip2_requests_timed_out_total")
        r = c.post("/v1/chat/completions", json={"messages": chat_messages(examples()[1], None), **LONG,
                                                 "timeout": 0.05})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": chat_messages(examples()[1], None), **LONG, "stream": True,
                            "timeout": 0.05}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and '"timeout_error"' in lines[-2]
        m = c.get("/metrics").text
        assert metric(m, "blip2_requests_timed_out_total") == before + 2
        assert metric(m, "blip2_running_rows") == 0
        assert _short(c)


def test_full_queue_answers_429_at_once(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            body = {"messages": chat_messages(examples()[2], None), **LONG, "timeout": 0.5}  # ends soon either way
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(6)))

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert 429 in codes and set(codes) <= {200, 429, 504}, codes
    busy = next(r for r in rs if r.status_code == 429).json()["error"]
    assert busy["type"] == "rate_limit_error" and "--max-queue" in busy["message"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert metric(c.get("/metrics").text, "blip2_requests_rejected_total") == codes.count(429)
        assert _short(c)
