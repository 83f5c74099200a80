"""Cheap checks of `blip2 serve`'s request side, without a model: how a conversation becomes a
BLIP-2 prompt, what the request schemas refuse, and which image URLs are accepted."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from blip2.apps.serve.chat import ChatError, render
from blip2.apps.serve.images import ImageError, ImagePolicy, fetch_image
from blip2.apps.serve.schemas import ChatRequest

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(t):
    return {"type": "text", "text": t}


def test_a_conversation_is_question_answer_turns():
    r = render([user(IMG, text("what is it?"))])
    assert (r.text, r.image_url) == ("Question: what is it? Answer:", IMG["image_url"]["url"])
    r = render([{"role": "system", "content": "Be brief."}, user(IMG, text(" what is it? ")),
                {"role": "assistant", "content": "a cat"}, {"role": "user", "content": "what color?"}])
    assert r.text == "Be brief. Question: what is it? Answer: a cat Question: what color? Answer:"
    assert render([user(IMG)]).text == ""  # no text: a caption
    assert render([user(IMG), {"role": "user", "content": "and this?"}]).text == "Question: and this? Answer:"


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": "hi"}], "exactly one image"),
    ([user(IMG, text("a")), user(IMG, text("b"))], "exactly one image"),
    ([user(IMG, text("a")), {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "assistant", "content": "b"}, user(IMG)], "must answer"),
    ([user(IMG), {"role": "system", "content": "late"}, user(text("q"))], "before the conversation"),
    ([{"role": "assistant", "content": [IMG]}], "user messages"),
])
def test_conversations_that_cannot_be_rendered(messages, words):
    with pytest.raises(ChatError, match=words):
        render(messages)


@pytest.mark.parametrize("extra, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"n": 17}, "n"),
    ({"seed": -1}, "seed"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {}}, "logit_bias"),
    ({"stream": [1]}, "stream"), ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages"),
])
def test_chat_schema_refuses_out_of_range_and_unknown_fields(extra, field):
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate({"messages": [user(IMG)], **extra})
    assert field in ".".join(map(str, e.value.errors()[0]["loc"]))


def _png(size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_image_urls_data_only_unless_remote_is_allowed():
    ok = "data:image/png;base64," + base64.b64encode(_png()).decode()
    assert fetch_image(ok, ImagePolicy()).size == (8, 8)
    for url, words in [("/etc/passwd", "file paths"), ("file:///etc/passwd", "file paths"),
                       ("http://127.0.0.1:9/x.png", "--allow-remote-images"), ("data:image/png,abc", "base64"),
                       ("data:image/png;base64,!!", "malformed"), ("data:text/html;base64,PGI+", "not an image"),
                       ("data:image/png;base64," + base64.b64encode(b"GIF89a nope").decode(), "not an image")]:
        with pytest.raises(ImageError, match=words):
            fetch_image(url, ImagePolicy())
    bomb = "data:image/png;base64," + base64.b64encode(_png((1100, 1000), "1")).decode()
    with pytest.raises(ImageError, match="pixel"):
        fetch_image(bomb, ImagePolicy(max_pixels=1_000_000))
    with pytest.raises(ImageError, match="byte limit"):
        fetch_image(ok, ImagePolicy(max_bytes=10))


def test_remote_images_when_allowed_with_a_byte_cap():
    """--allow-remote-images: an http URL is fetched (here from a server on 127.0.0.1), within the cap."""
    import http.server
    import threading

    png = _png((5, 7))

    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/x.png"
        assert fetch_image(url, ImagePolicy(allow_remote=True)).size == (5, 7)
        with pytest.raises(ImageError, match="byte limit"):
            fetch_image(url, ImagePolicy(allow_remote=True, max_bytes=len(png) - 1))
        with pytest.raises(ImageError, match="cannot fetch"):
            fetch_image(url.replace("/x.png", ":x"), ImagePolicy(allow_remote=True))
    finally:
        srv.shutdown()
        srv.server_close()
