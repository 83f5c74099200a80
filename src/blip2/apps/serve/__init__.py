"""`blip2 serve`: an OpenAI-compatible HTTP server for BLIP-2 with continuous batching.

    server.py     loading the models (as the CLI does), uvicorn in the foreground or a thread
    app.py        FastAPI routes, OpenAI-shaped errors, the API key, the page at /
    schemas.py    what each endpoint accepts (unknown fields and out-of-range numbers refused)
    chat.py       an OpenAI conversation as a BLIP-2 "Question: ... Answer: ..." prompt
    images.py     data: (and, when allowed, http(s)) image URLs with byte and pixel limits
    scheduler.py  the model thread: continuous batching of chat requests, other tasks between steps
    batch.py      joining and shrinking the running OPT batch's KV caches
    tasks.py      captions, questions, match and embeddings (the CLI's helpers, on the model thread)
    metrics.py    Prometheus text for GET /metrics
    static/       the web page (HTML, CSS, JS; no CDN)

Nothing in the library imports this package; FastAPI and uvicorn are the `serve` extra.
"""
