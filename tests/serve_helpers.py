"""Shared by the server tests: a real `blip2 serve` (the project's own code: the CLI's parser, the
model loading, uvicorn on a free port of 127.0.0.1, in a background thread), data: URLs of the
shipped example images, and answers computed with `generate` on one request alone."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import torch

from blip2.apps.cli.main import build_parser
from blip2.apps.demo.shipped import example_images
from blip2.apps.serve.chat import prompt_ids
from blip2.apps.serve.server import Running, build_state
from blip2.processing.image_load import load_image, max_image_pixels


def start_server(*options: str) -> Running:
    """The demo model on one torch thread: its operations are small, and on a shared 2-core machine a
    second thread mostly waits for a core (10x slower decode steps under load, measured)."""
    args = build_parser().parse_args(["serve", "--model", "demo", "--port", "0", "--threads", "1", *options])
    if args.max_image_pixels is None:
        args.max_image_pixels = max_image_pixels()
    before = torch.get_num_threads()
    return Running(build_state(args), port=0, threads=before)


def examples() -> list[Path]:
    return example_images()


def data_url(path_or_bytes, mime: str = "image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat_messages(image: Path, question: str | None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if question:
        parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def reference(state, image: Path, question: str | None, **kw) -> tuple[str, int]:
    """(answer, prompt tokens) from `generate` on this request alone, decoded as `blip2 ask` does."""
    model, proc = state.model, state.proc
    cfg = model.config
    text = f"Question: {question} Answer:" if question else ""
    ids = prompt_ids(proc.tokenizer, text, cfg.num_query_tokens, cfg.image_token_index, cfg.text_config.bos_token_id)
    pv = proc.image_processor([load_image(str(image))], return_tensors="pt")["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(pv, torch.tensor([ids]), **kw)
    return proc.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip(), len(ids)


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus text (the first line that starts with `name `)."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
