"""Dataset jobs on Ray Data: caption, ask and embed whole image collections, on a laptop or a cluster.

    import ray
    from blip2.apps import jobs

    ds = jobs.read(["photos/", "shards/"])                  # rows: id, source, caption, ...
    out = jobs.caption(ds, model="demo", batch_size=8)      # a lazy ray.data.Dataset
    out.write_parquet("captions/")                          # or iterate it, or chain more steps

    stats = jobs.run("caption", ["photos/"], "captions/", model="demo")   # the CLI's resumable job

`caption`, `ask` and `embed` add their columns (text / answers / embedding, plus error and
worker) to the rows of `dataset` (as `read` makes them: id, source, offset, size, caption,
questions, error); the model is loaded once per actor. Ray is imported when they are called, and
a local cluster must be started first (`ray.init()`) unless `run` does it."""

from __future__ import annotations

from typing import Any

from ..cli.common import DEFAULT_ITM_MODEL, DEFAULT_LM_MODEL

COMMON = {"device": "auto", "dtype": "auto"}
DEFAULTS = {
    "caption": {**COMMON, "prompt": None, "num_captions": 1, "max_new_tokens": 30, "num_beams": None,
                "temperature": None, "top_p": None, "truncate": False, "quantize": None},
    "ask": {**COMMON, "questions": [], "template": "Question: {} Answer:", "max_new_tokens": 20, "num_beams": None,
            "temperature": None, "top_p": None, "truncate": False, "quantize": None},
    "embed": dict(COMMON),
}
MODELS = {"caption": DEFAULT_LM_MODEL, "ask": DEFAULT_LM_MODEL, "embed": DEFAULT_ITM_MODEL}


def __getattr__(name: str) -> Any:
    # The driver (and torch, the models) load when first used: the CLI's modules import this
    # package to dispatch --ray, and cli/embed.py is itself imported by the driver's actors.
    if name == "Resources":
        from .driver import Resources

        return Resources
    raise AttributeError(name)


def split_options(kind: str, kw: dict[str, Any]) -> tuple[dict, Any]:
    """(the model options of `kind`, with defaults filled in; the Resources) from keyword arguments."""
    from .driver import Resources

    opts, res = dict(DEFAULTS[kind]), {}
    fields = set(Resources.__dataclass_fields__)
    for k, v in kw.items():
        if k in opts:
            opts[k] = list(v) if k == "questions" else v
        elif k in fields:
            res[k] = v
        else:
            raise TypeError(f"{kind}() got an unexpected keyword argument {k!r}")
    return opts, Resources(**res)


def read(inputs: list[str], path_column: str | None = None) -> Any:
    """A ray.data.Dataset of the rows of `inputs` (folders, globs, Parquet / JSONL tables, WebDataset
    tar shards): see jobs/inputs.py for the fields."""
    import ray

    from .inputs import read_inputs

    rows, bad = read_inputs(list(inputs), path_column)
    if bad:
        raise ValueError("; ".join(f"{s}: {w}" for s, w in bad))
    return ray.data.from_items(rows)


def _job(kind: str, dataset: Any, model: str | None, kw: dict) -> Any:
    from .driver import check_options, pipeline

    model = model or MODELS[kind]
    opts, res = split_options(kind, kw)
    check_options(kind, model, opts)
    return pipeline(dataset, kind, model, opts, res)


def caption(dataset: Any, model: str | None = None, **kw: Any) -> Any:
    """Caption every row: adds `text` (and `captions` with num_captions > 1), `error`, `worker`.
    Options: prompt, num_captions, max_new_tokens, num_beams, temperature, top_p, truncate, quantize,
    device, dtype; resources: batch_size, actors, actor_cpus, actor_gpus, threads, decode_cpus."""
    return _job("caption", dataset, model, kw)


def ask(dataset: Any, questions: list[str] = (), model: str | None = None, **kw: Any) -> Any:
    """Answer each row's own questions (its `questions` field) and `questions`: adds `questions`,
    `answers` (aligned), `error`, `worker`. Options as `caption`, plus template."""
    return _job("ask", dataset, model, {**kw, "questions": list(questions)})


def embed(dataset: Any, model: str | None = None, **kw: Any) -> Any:
    """Embed every row's image: adds `embedding` (Q, E) float32 (zeros where `error` is set), `error`,
    `worker`. A retrieval checkpoint gives its normalised ITC query vectors."""
    return _job("embed", dataset, model, kw)


def run(kind: str, inputs: list[str], output: str, model: str | None = None, *, shard_rows: int = 1000,
        path_column: str | None = None, **kw: Any) -> dict:
    """The resumable job of `blip2 KIND --ray INPUT... -o OUTPUT`: returns the stats it wrote."""
    from .driver import run_job

    opts, res = split_options(kind, kw)
    return run_job(kind, list(inputs), output, model or MODELS[kind], opts, res, shard_rows=shard_rows,
                   path_column=path_column)


__all__ = ["read", "caption", "ask", "embed", "run", "Resources"]
