"""The continuous-batching scheduler on its own (no HTTP), on tiny random BLIP-2 models with OPT and
with Flan-T5: requests that arrive while others decode, with prompts of different lengths and
different max_tokens, each get the tokens `generate` gives that request alone; a client that
leaves frees its rows; a full queue refuses at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import blip2
import hf_tiny
from blip2.apps.serve.scheduler import QueueFull, Request, Sampling, Scheduler

pytestmark = pytest.mark.slow

Q = 4


class Ids:
    """A stand-in tokenizer: token ids as text, so the text says exactly which tokens came out."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def tiny(text: str):
    tc = {**(hf_tiny.OPT if text == "opt" else hf_tiny.T5)}
    if text == "opt":
        tc.update(word_embed_proj_dim=tc["hidden_size"], eos_token_id=3)  # an EOS that random weights rarely pick
    cfg = blip2.Blip2Config(vision_config=hf_tiny.VISION, qformer_config=hf_tiny.QFORMER, text_config=tc,
                            num_query_tokens=Q, image_token_index=tc["vocab_size"] - 1)
    return hf_tiny.fan_in_init_(blip2.Blip2ForConditionalGeneration(cfg).eval(), seed=1)


def _collect():
    events, done = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if ev[0] in ("finish", "error"):
            done.set()
    return events, done, emit


@pytest.mark.parametrize("text,together", [("opt", False), ("t5", False), ("opt", True)])
def test_greedy_rows_equal_generate_alone_while_others_come_and_go(text, together):
    """together: every request waits before the scheduler starts, so all are admitted in one gap:
    their images go through as one batch and their prompts (of different lengths) as one
    left-padded prefill."""
    model = tiny(text)
    g = torch.Generator().manual_seed(0)
    img_tok = model.config.image_token_index
    jobs = []
    for i, (T, new) in enumerate([(3, 12), (9, 4), (1, 20), (6, 1), (12, 9), (4, 15), (2, 7)]):
        ids = [img_tok] * Q + [2] + torch.randint(4, 100, (T,), generator=g).tolist()
        pv = torch.randn(1, 3, 30, 30, generator=g)
        want = model.generate(pv, torch.tensor([ids]), max_new_tokens=new)
        start = len(ids) if text == "opt" else 1
        jobs.append((ids, pv, new, "".join(f" {t}" for t in want[0, start:].tolist())))
    sched = Scheduler(model, Ids(), max_batch=8)
    if not together:
        sched.start()
    try:
        runs = []
        for ids, pv, new, want in jobs:
            events, done, emit = _collect()
            sched.submit(Request(ids, pv, Sampling(max_tokens=new), emit, deadline=time.monotonic() + 60))
            runs.append((events, done, want))
            if not together:
                time.sleep(0.003)  # arrive while the others decode
        if together:
            sched.start()
        for events, done, want in runs:
            assert done.wait(30)
            assert events[-1][0] == "finish", events[-1]
            assert " " + "".join(e[2] for e in events if e[0] == "delta") == want
        assert sched.running_rows() == 0
        batched = sum(sched.metrics.rows.counts[1:])  # steps that ran more than one row
        assert batched > 0 if text == "opt" else batched == 0  # Flan-T5: one session per request
        if together:
            assert sched.metrics.counters["blip2_prefills_total"][0] == 1
    finally:
        sched.stop()


def test_leaving_client_frees_rows_and_full_queue_refuses():
    model = tiny("opt")
    ids = [model.config.image_token_index] * Q + [2, 5, 6]
    pv = torch.zeros(1, 3, 30, 30)
    sched = Scheduler(model, Ids(), max_batch=4, max_queue=1)
    # not started: the queue fills without anything draining it
    events, done, emit = _collect()
    req = Request(ids, pv, Sampling(max_tokens=50, min_tokens=50, n=2), emit, deadline=time.monotonic() + 60)
    sched.submit(req)
    with pytest.raises(QueueFull, match="--max-queue 1"):
        sched.submit(Request(ids, pv, Sampling(max_tokens=5), emit, deadline=time.monotonic() + 60))
    sched.start()
    try:
        while not any(e[0] == "delta" for e in events):
            time.sleep(0.001)
        req.cancelled = True
        t0 = time.monotonic()
        cancelled = sched.metrics.counters["blip2_requests_cancelled_total"]
        while not cancelled[0] and time.monotonic() - t0 < 10:
            time.sleep(0.001)
        assert sched.running_rows() == 0
        assert not any(e[0] in ("finish", "error") for e in events), events[-3:]  # stopped, not finished
        assert sched.metrics.counters["blip2_requests_cancelled_total"][0] == 1
    finally:
        sched.stop()
