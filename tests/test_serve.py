"""`blip2 serve` against a real uvicorn on a free port of 127.0.0.1, with the demo model: the OpenAI
client (chat, streaming, embeddings), greedy answers equal to `generate` alone whatever else is in
the batch, the endpoints chat cannot express, the API key, cancellation, and a bounded load test.
The expected answers are computed here with the model, never written down."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest
import torch

from blip2.apps.serve.chat import prompt_ids
from blip2.processing.image_load import load_image
from serve_helpers import chat_messages, data_url, examples, metric, reference, start_server

pytestmark = pytest.mark.slow

KEY = "test-key-123"
QUESTIONS = ["what color is the circle?", "how many objects are there?", "what is in the picture?",
             "what shape is the small object in the middle of the picture?", "is there a triangle?", None]


@pytest.fixture(scope="module")
def server():
    srv = start_server("--api-key", KEY, "--max-batch", "16", "--max-body", str(1 << 20))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_and_stream_with_the_openai_client(server, client):
    img = examples()[0]
    want, n_prompt = reference(server.state, img, QUESTIONS[0], max_new_tokens=12)
    r = client.chat.completions.create(model="demo", messages=chat_messages(img, QUESTIONS[0]), max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == n_prompt  # the image's query tokens count as prompt tokens
    assert n_prompt > server.state.model.config.num_query_tokens
    assert r.usage.completion_tokens >= 1

    cap, _ = reference(server.state, img, None, max_new_tokens=20)
    chunks = list(client.chat.completions.create(model="demo", messages=chat_messages(img, None), max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2 and "".join(deltas) == cap  # several chunks, the same text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"],
                                                                                                      ["length"])
    assert chunks[-1].usage.completion_tokens >= len(deltas)


def test_stream_ends_with_done_and_stop_strings_cut(server, http):
    img = examples()[1]
    full, _ = reference(server.state, img, None, max_new_tokens=20)
    word = full.split()[1]
    body = {"messages": chat_messages(img, None), "max_tokens": 20, "stream": True, "stop": [" " + word]}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in map(json.loads, (ln[6:] for ln in lines[:-1])))
    assert text == full[: full.index(" " + word)]


def test_conversation_is_rendered_as_question_answer_turns(server, http):
    img = examples()[2]
    first, _ = reference(server.state, img, QUESTIONS[0], max_new_tokens=10)
    msgs = chat_messages(img, QUESTIONS[0]) + [{"role": "assistant", "content": first},
                                              {"role": "user", "content": QUESTIONS[1]}]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 10}).json()
    # the same prompt, written as one string, through generate alone
    model, proc = server.state.model, server.state.proc
    cfg = model.config
    text = f"Question: {QUESTIONS[0]} Answer: {first} Question: {QUESTIONS[1]} Answer:"
    ids = prompt_ids(proc.tokenizer, text, cfg.num_query_tokens, cfg.image_token_index, cfg.text_config.bos_token_id)
    pv = proc.image_processor([load_image(str(img))], return_tensors="pt")["pixel_values"]
    out = model.generate(pv, torch.tensor([ids]), max_new_tokens=10)
    assert r["choices"][0]["message"]["content"] == proc.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert r["usage"]["prompt_tokens"] == len(ids)


def test_greedy_answers_equal_generate_alone_under_batching(server, http):
    """Requests arrive at different times, with prompts of different lengths, different max_tokens
    and min_tokens (which keeps rows decoding while others join and leave)."""
    rng = random.Random(0)
    jobs = []
    for i in range(16):
        img, q = examples()[i % 6], QUESTIONS[i % len(QUESTIONS)]
        max_tokens = rng.choice([3, 8, 20, 40])
        min_tokens = rng.choice([0, 0, max_tokens // 2, max_tokens])
        want, _ = reference(server.state, img, q, max_new_tokens=max_tokens,
                            **({"min_new_tokens": min_tokens} if min_tokens else {}))
        jobs.append((img, q, max_tokens, min_tokens, want, 0.004 * rng.randrange(0, 25)))
    got: dict[int, str] = {}

    def one(i, img, q, mt, mn, delay):
        time.sleep(delay)
        body = {"messages": chat_messages(img, q), "max_tokens": mt, "min_tokens": mn, "temperature": 0}
        got[i] = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=one, args=(i, *j[:4], j[5])) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {i: got.get(i) for i in range(16)} == {i: j[4] for i, j in enumerate(jobs)}
    m = http.get("/metrics").text
    batched = metric(m, "blip2_decode_batch_rows_count") - metric(m, "blip2_decode_batch_rows_bucket{le=\"1\"}")
    assert batched > 0, "no decode step ran more than one row: the requests were not batched"


def test_sampling_is_reproducible_with_a_seed(http):
    body = {"messages": chat_messages(examples()[3], None), "max_tokens": 15, "temperature": 1.5, "top_p": 0.95,
            "seed": 7, "n": 3}
    a = http.post("/v1/chat/completions", json=body).json()
    b = http.post("/v1/chat/completions", json=body).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert texts == [c["message"]["content"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]


def test_caption_answers_match_embeddings(server, http, client):
    state = server.state
    imgs = examples()[:2]
    r = http.post("/v1/captions", json={"images": [data_url(p) for p in imgs], "max_tokens": 20}).json()
    assert [d["captions"][0] for d in r["data"]] == [reference(state, p, None, max_new_tokens=20)[0] for p in imgs]
    r = http.post("/v1/captions", json={"images": [data_url(imgs[0])], "num_beams": 3, "n": 2}).json()
    assert len(r["data"][0]["captions"]) == 2

    qs = QUESTIONS[:3]
    r = http.post("/v1/answers", json={"image": data_url(imgs[1]), "questions": qs, "max_tokens": 10}).json()
    assert [d["answer"] for d in r["data"]] == [reference(state, imgs[1], q, max_new_tokens=10)[0] for q in qs]

    texts = ["a large red circle", "two small blue squares"]
    r = http.post("/v1/match", json={"images": [data_url(p) for p in imgs], "texts": texts}).json()
    rm, rp = state.rmodel, state.rproc
    pv = rp.image_processor([load_image(str(p)) for p in imgs], return_tensors="pt")["pixel_values"]
    enc = rp.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        itc = rm(pixel_values=pv, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits_per_image
    got = torch.tensor([d["itc"] for d in r["data"]]).view(2, 2)
    torch.testing.assert_close(got, itc.float(), atol=1e-5, rtol=1e-4)
    assert all(0 <= d["itm"] <= 1 for d in r["data"])

    e = client.embeddings.create(model="demo", input=texts)
    vecs = torch.tensor([d.embedding for d in e.data])
    assert vecs.shape == (2, rm.config.image_text_hidden_size)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(2), atol=1e-4, rtol=0)
    img_vec = http.post("/v1/embeddings", json={"input": [{"type": "image_url", "image_url": {"url": data_url(imgs[0])}}]})
    q = torch.tensor(img_vec.json()["data"][0]["embedding"])  # (Q, E)
    torch.testing.assert_close((q @ vecs.T).max(0).values, itc[0].float(), atol=1e-4, rtol=1e-4)


def test_api_key_guards_every_endpoint_but_health(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == "demo"


def test_a_client_that_leaves_frees_its_rows(server, http):
    before = http.get("/metrics").text
    body = {"messages": chat_messages(examples()[4], None), "max_tokens": 100, "min_tokens": 100, "n": 8,
            "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first token arrived: leave
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = http.get("/metrics").text
        if metric(after, "blip2_requests_cancelled_total") > metric(before, "blip2_requests_cancelled_total"):
            break
        time.sleep(0.05)
    assert metric(after, "blip2_requests_cancelled_total") == metric(before, "blip2_requests_cancelled_total") + 1
    made = metric(after, "blip2_generation_tokens_total") - metric(before, "blip2_generation_tokens_total")
    assert made < 8 * 100  # stopped early
    assert metric(after, "blip2_running_rows") == 0


def test_bounded_load_loses_and_duplicates_nothing(server):
    """48 requests from 8 concurrent clients: every answer is the one for its own request."""
    cases = [(examples()[i % 6], QUESTIONS[i % 5], 4 + i % 7) for i in range(48)]
    want = {}
    for img, q, mt in set(cases):
        want[(img, q, mt)] = reference(server.state, img, q, max_new_tokens=mt)[0]

    async def main():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as c:
            async def one(i, img, q, mt):
                async with sem:
                    body = {"messages": chat_messages(img, q), "max_tokens": mt, "user": f"req-{i}"}
                    r = await c.post("/v1/chat/completions", json=body)
                    r.raise_for_status()
                    j = r.json()
                    return i, j["id"], j["choices"][0]["message"]["content"]
            return await asyncio.wait_for(asyncio.gather(*(one(i, *cs) for i, cs in enumerate(cases))), 60)

    results = asyncio.run(main())
    assert sorted(i for i, _, _ in results) == list(range(48))  # nothing lost, nothing twice
    assert len({rid for _, rid, _ in results}) == 48
    assert all(text == want[cases[i]] for i, _, text in results)


def _bomb() -> bytes:
    from PIL import Image
    from serve_helpers import png_bytes
    return png_bytes(Image.new("1", (12000, 12000)))  # 144 Mpx in a few kB: over the 40 Mpx budget


def _bad_requests(server):
    raw = examples()[0].read_bytes()
    img = data_url(raw)
    ok = chat_messages(examples()[0], "what color is it?")
    chat = "/v1/chat/completions"

    def with_url(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what is it?"}]}]}
    return [  # (name, path, raw body or JSON, content type, status, words in the message)
        ("malformed JSON", chat, b'{"messages": [', "application/json", 400, "malformed JSON"),
        ("not UTF-8", chat, b'\xff\xfe{}', "application/json", 400, "malformed JSON"),
        ("wrong content type", chat, b"messages=1", "application/x-www-form-urlencoded", 415, "Content-Type"),
        ("no content type", chat, b"{}", "", 415, "JSON"),
        ("unknown field", chat, {"messages": ok, "frobnicate": 1}, None, 400, "frobnicate"),
        ("unknown part type", chat, {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
         None, 400, "messages"),
        ("bad role", chat, {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "role"),
        ("temperature out of range", chat, {"messages": ok, "temperature": 3}, None, 400, "temperature"),
        ("top_p zero", chat, {"messages": ok, "top_p": 0}, None, 400, "top_p"),
        ("max_tokens zero", chat, {"messages": ok, "max_tokens": 0}, None, 400, "max_tokens"),
        ("max_tokens over the positions", chat, {"messages": ok, "max_tokens": 4000}, None, 400, "positions"),
        ("n too large", chat, {"messages": ok, "n": 1000}, None, 400, "n"),
        ("wrong type", chat, {"messages": ok, "stream": "yes please"}, None, 400, "stream"),
        ("no messages", chat, {"messages": []}, None, 400, "messages"),
        ("no image", chat, {"messages": [{"role": "user", "content": "hello"}]}, None, 400, "exactly one image"),
        ("two images", chat, {"messages": ok + ok}, None, 400, "exactly one image"),
        ("assistant last", chat, {"messages": ok + [{"role": "assistant", "content": "x"}]}, None, 400, "last message"),
        ("not an image", chat, with_url(data_url(b"hello, I am text", "image/png")), None, 400, "not an image"),
        ("not base64", chat, with_url("data:image/png;base64,@@@@"), None, 400, "base64"),
        ("text data URL", chat, with_url("data:text/plain;base64,aGVsbG8="), None, 400, "not an image"),
        ("truncated image", chat, with_url(data_url(raw[: len(raw) // 2])), None, 400, "truncated"),
        ("decompression bomb", chat, with_url(data_url(_bomb())), None, 400, "pixel"),
        ("file path", chat, with_url("/etc/passwd"), None, 400, "file paths"),
        ("file URL", chat, with_url("file:///etc/passwd"), None, 400, "file paths"),
        ("http URL without --allow-remote-images", chat, with_url(server.url + "/static/app.css"), None, 400,
         "--allow-remote-images"),
        ("oversized body", chat, {"messages": ok, "user": "x" * (1 << 20)}, None, 413, "limit"),
        ("caption: no images", "/v1/captions", {"images": []}, None, 400, "images"),
        ("caption: beams out of range", "/v1/captions", {"images": [img], "num_beams": 99}, None, 400, "num_beams"),
        ("answers: bad template", "/v1/answers", {"image": img, "questions": ["q"], "template": "Q: {} {}"}, None,
         400, "template"),
        ("match: no texts", "/v1/match", {"images": [img], "texts": []}, None, 400, "texts"),
        ("embeddings: unknown field", "/v1/embeddings", {"input": "a", "dimensions": 3}, None, 400, "dimensions"),
        ("unknown path", "/v1/nothing", {}, None, 404, "Not Found"),
    ]


def test_every_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, http):
    img = examples()[0]
    want, _ = reference(server.state, img, "what color is it?", max_new_tokens=8)
    for name, path, body, ctype, status, words in _bad_requests(server):
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"Content-Type": ctype} if ctype else {})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, name
        assert words.lower() in err["message"].lower(), (name, err["message"])
        assert "Traceback" not in err["message"]
    r = http.post("/v1/chat/completions", json={"messages": chat_messages(img, "what color is it?"), "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
