"""`blip2 serve --index DIR` and POST /v1/search against a real uvicorn on a free port of 127.0.0.1:
a FAISS index built by `blip2 embed` + `blip2 index build` over drawn one-object scenes, searched
by their captions and by the images themselves. Hits are compared with the scenes that were drawn
and with SearchIndex run in this process, never with recorded numbers."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest
import torch

from blip2.apps.cli.main import main
from blip2.apps.demo import scenes
from blip2.apps.serve.schemas import MAX_K
from blip2.apps.serve.scheduler import Scheduler
from blip2.apps.serve.server import Running
from serve_helpers import data_url, start_server

pytest.importorskip("faiss")
pytestmark = pytest.mark.slow

KEY = "search-key-9"
# One object each, every (shape, colour, size) different, so each caption names exactly one image.
KINDS = [("circle", "red", "large"), ("square", "blue", "small"), ("triangle", "green", "large"),
         ("square", "yellow", "large"), ("triangle", "red", "small"), ("circle", "blue", "large"),
         ("circle", "green", "small"), ("triangle", "yellow", "small")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The drawn scenes, their captions, and an index over their `blip2 embed` output."""
    d = tmp_path_factory.mktemp("search")
    (d / "imgs").mkdir()
    paths, captions = [], []
    for i, (shape, color, size) in enumerate(KINDS):
        s = scenes.Scene((scenes.Obj(shape, color, size, 0.5, 0.5, scenes.COLORS[color]),), "white", i)
        paths.append(str(d / "imgs" / f"{i:02d}.png"))
        scenes.render(s, 96).save(paths[-1])
        captions.append(scenes.caption(s))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's operations are small; a second thread only waits on a shared machine
    try:
        assert main(["embed", "--model", "demo", str(d / "imgs"), "-o", str(d / "emb.npy")]) == 0
        assert main(["index", "build", str(d / "emb.npy"), "-o", str(d / "ix")]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"index": d / "ix", "paths": paths, "captions": captions}


@pytest.fixture(scope="module")
def server(world):
    srv = start_server("--api-key", KEY, "--index", str(world["index"]), "--max-queue", "2")
    yield srv
    srv.stop()


def _search(http: httpx.Client, **body) -> list[dict]:
    r = http.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["model"] == "demo"
    return out["data"]


def test_text_query_finds_the_image_it_describes(world, http):
    from blip2.apps.index import SearchIndex

    for cap, path in list(zip(world["captions"], world["paths"]))[:4]:
        hits = _search(http, query=cap, k=3, rerank=0)
        assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["path"] == path, (cap, hits)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # ITM re-ranking (the default): the same image first, scored by p(match); the same hits as the
    # library's SearchIndex gives in this process
    cap = world["captions"][5]
    hits = _search(http, query=cap, k=4)
    assert hits[0]["path"] == world["paths"][5] and all(h["score"] == h["itm"] for h in hits)
    local = SearchIndex(world["index"]).search(text=cap, k=4)
    assert [h["path"] for h in hits] == [h["path"] for h in local]
    assert [h["itm"] for h in hits] == pytest.approx([h["itm"] for h in local], abs=1e-4)


def test_image_query_finds_itself(world, http):
    for path in world["paths"][2:5]:
        hits = _search(http, image=data_url(path), k=2)
        assert len(hits) == 2 and hits[0]["path"] == path
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[1]["score"] < hits[0]["score"]


def test_k_limits_the_hits(world, http):
    cap = world["captions"][1]
    assert len(_search(http, query=cap, k=1, rerank=0)) == 1
    five = _search(http, query=cap, k=5, rerank=0)
    assert [h["rank"] for h in five] == [1, 2, 3, 4, 5] and len({h["path"] for h in five}) == 5
    every = _search(http, query=cap, k=MAX_K, rerank=0)  # more than the index holds: each image once
    assert sorted(h["path"] for h in every) == sorted(world["paths"])


@pytest.mark.parametrize("body, param, says", [
    ({}, "query", "neither"),
    ({"query": "a red circle", "image": "data:image/png;base64,AAAA"}, "query", "both"),
    ({"query": ""}, "query", "at least 1 character"),
    ({"query": "a red circle", "k": 0}, "k", "greater than or equal to 1"),
    ({"query": "a red circle", "k": MAX_K + 1}, "k", f"less than or equal to {MAX_K}"),
    ({"query": "a red circle", "rerank": -1}, "rerank", "greater than or equal to 0"),
    ({"query": "a red circle", "limit": 3}, "limit", "Extra inputs are not permitted"),
    ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image", "image"),  # b"not an image"
    ({"image": "/etc/hostname"}, "image", "local file paths"),
    ({"image": "data:image/png;base64,@@@"}, "image", "malformed"),
])
def test_bad_requests_get_a_400_naming_the_field(http, body, param, says):
    r = http.post("/v1/search", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and says in err["message"], err
    assert err["param"] == param


def test_api_key_and_the_model_thread_queue(world, server, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/search", json={"query": "a red circle"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # A search runs on the model thread: while that thread is held it waits, in the queue that
    # --max-queue bounds; with the queue full the next request is refused with 429.
    sched, release, got = server.state.scheduler, threading.Event(), {}
    sched.call(lambda: release.wait(30))
    _until(lambda: not sched.waiting)  # the model thread has taken it and is held
    body = {"query": world["captions"][3], "rerank": 0}
    t = threading.Thread(target=lambda: got.update(r=httpx.post(server.url + "/v1/search", json=body, timeout=60,
                                                                headers={"Authorization": f"Bearer {KEY}"})))
    t.start()
    try:
        _until(lambda: len(sched.waiting) == 1)
        sched.call(lambda: None)  # the queue (2) is full
        r = http.post("/v1/search", json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "r" not in got  # still waiting for the model thread
    finally:
        release.set()
        t.join(30)
    assert got["r"].status_code == 200 and got["r"].json()["data"][0]["path"] == world["paths"][3]


def test_without_an_index_the_endpoint_says_how_to_get_one(server):
    st = server.state  # the same models behind a second server of their own, without --index
    bare = Running(dataclasses.replace(st, index=None, api_key=None,
                                       scheduler=Scheduler(st.model, st.proc.tokenizer).start()))
    try:
        r = httpx.post(bare.url + "/v1/search", json={"query": "a red circle"}, timeout=30)
    finally:
        bare.stop()
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["type"] == "not_found_error" and "--index" in err["message"] and err["code"] == "no_index"


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
