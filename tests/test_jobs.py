"""Dataset jobs on Ray Data (apps/jobs): the input readers, and jobs on a real local Ray cluster
(one per module) with the demo models. Results are compared with the CLI run in process (the
non-Ray path), never with recorded outputs."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from subprocs import default_sigint
from blip2 import scenes
from blip2.apps.cli.main import main
from blip2.apps.jobs.inputs import InputError, load_source, read_inputs

pq = pytest.importorskip("pyarrow.parquet")


def _draw(d: Path, n: int, seed: int, fmt: str = "png") -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(scenes.dataset(n, seed=seed)):
        p = d / f"{i:03d}.{fmt}"
        scenes.render(s, 96).save(p, quality=95) if fmt == "jpg" else scenes.render(s, 96).save(p)
        out.append(p)
    return out


def _shard(path: Path, jpgs: list[Path], start: int = 0) -> list[str]:
    """A WebDataset shard as img2dataset writes one: KEY.jpg, KEY.txt, KEY.json per sample."""
    keys = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i, p in enumerate(jpgs):
            key = f"{start + i:09d}"
            keys.append(key)
            for ext, data in ((".jpg", p.read_bytes()), (".txt", f"caption {i}".encode()),
                              (".json", json.dumps({"key": key, "url": f"http://example.invalid/{i}"}).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return keys


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of PNGs, a Parquet table and a JSONL table pointing at more, a WebDataset shard of
    JPEGs (the same JPEGs also as files, for the CLI to read), and a corrupt image."""
    d = tmp_path_factory.mktemp("jobs")
    folder = _draw(d / "folder", 4, seed=1)
    (d / "folder" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    more = _draw(d / "more", 3, seed=2)
    pq.write_table(__import__("pyarrow").table({
        "id": ["t0", "t1", "t2", "t-missing"], "path": [f"more/{p.name}" for p in more] + ["more/none.png"],
        "caption": ["a", "b", "c", "d"]}), d / "table.parquet")
    (d / "table.jsonl").write_text(json.dumps({"url": str(more[0]), "question": "what color is the circle?"})
                                   + "\n{not json\n" + json.dumps({"url": str(folder[1])}) + "\n")
    jpgs = _draw(d / "jpg", 3, seed=3, fmt="jpg")
    keys = _shard(d / "shards" / "00000.tar", jpgs)
    return {"dir": d, "folder": folder, "more": more, "jpgs": jpgs, "keys": keys}


def test_read_inputs_every_kind(data):
    d = data["dir"]
    rows, bad = read_inputs([str(d / "folder"), str(d / "table.parquet"), str(d / "table.jsonl"),
                             str(d / "shards"), str(d / "nothing" / "*.png")])
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 5 + 4 + 3 + 3
    assert bad == [(str(d / "nothing" / "*.png"), "pattern matches no files")]
    by = {r["id"]: r for r in rows}
    assert by["t1"]["source"] == str(data["more"][1]) and by["t1"]["caption"] == "b"  # relative to the table
    assert by["table.jsonl:0"]["questions"] == ["what color is the circle?"]
    assert "not JSON" in by["table.jsonl:1"]["error"]
    for key, jpg in zip(data["keys"], data["jpgs"]):
        r = by[key]
        assert r["caption"] == f"caption {data['keys'].index(key)}" and r["source"].endswith(f"::{key}.jpg")
        got = np.asarray(load_source(r["source"], r["offset"], r["size"]))
        assert np.array_equal(got, np.asarray(load_source(str(jpg))))  # the member's bytes, read in place


def test_read_inputs_refusals(data, tmp_path):
    d = data["dir"]
    with pytest.raises(InputError, match="appears twice"):
        read_inputs([str(d / "shards"), str(d / "shards" / "00000.tar")])
    (tmp_path / "t.jsonl").write_text(json.dumps({"file_name": "x.png"}) + "\n")
    with pytest.raises(InputError, match="no image column.*file_name"):
        read_inputs([str(tmp_path / "t.jsonl")])
    assert read_inputs([str(tmp_path / "t.jsonl")], path_column="file_name")[0][0]["source"] == str(tmp_path / "x.png")


@pytest.mark.parametrize("argv, words", [
    (["caption", "--ray", "x", "--model", "demo", "--json", "-o", "o"], "--json / --jsonl"),
    (["caption", "--ray", "x", "--model", "demo"], "needs -o"),
    (["embed", "--ray", "x", "--model", "demo", "--text", "a", "-o", "o"], "--text is not embedded"),
    (["ask", "img.png", "--model", "demo"], "at least one QUESTION"),
])
def test_cli_usage_errors(argv, words, capsys):
    assert main(argv) == 2
    assert words in capsys.readouterr().err


# ---------------------------------------------------------------- on a local Ray cluster

@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_worker_niceness", "0")  # as driver.start_ray: not starved on a busy machine
    ray.init(address="local", num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


def _rows(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def _cli_json(capsys, argv) -> list[dict]:
    capsys.readouterr()
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_caption_folder_table_and_shards(cluster, data, tmp_path, capsys):
    from blip2.apps import jobs

    d = data["dir"]
    stats = jobs.run("caption", [str(d / "folder"), str(d / "table.parquet"), str(d / "shards")], str(tmp_path / "o"),
                     model="demo", batch_size=2, shard_rows=4)
    rows = _rows(tmp_path / "o")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 5 + 4 + 3 and stats["rows"] == 12 and stats["failed"] == 2
    assert stats["failures"] == {"bad_image": 1, "missing": 1}
    assert (tmp_path / "o" / "_SUCCESS").exists() and json.loads((tmp_path / "o" / "stats.json").read_text()) == stats
    by_src = {r["source"]: r for r in rows}
    assert by_src[str(d / "folder" / "broken.png")]["error"] and by_src[str(d / "more" / "none.png")]["text"] is None
    files = [*map(str, data["folder"]), *map(str, data["more"]), *map(str, data["jpgs"])]
    want = {r["path"]: r["text"] for r in _cli_json(capsys, ["caption", "--model", "demo", *files, "--batch-size", "2"])}
    got = {r["source"]: r["text"] for r in rows if not r["error"]}
    for key, jpg in zip(data["keys"], data["jpgs"]):
        got[str(jpg)] = got.pop(f"{d / 'shards' / '00000.tar'}::{key}.jpg")
    assert got == want
    assert {r["caption"] for r in rows if r["id"].startswith("t")} == {"a", "b", "c", "d"}


@pytest.mark.slow
def test_killed_worker_every_row_once(cluster, tmp_path):
    from blip2.apps.jobs import Resources
    from blip2.apps.jobs.driver import run_job

    imgs = _draw(tmp_path / "imgs", 10, seed=4)
    killed = []

    def kill_first_worker(batch):
        if not killed:
            pid = int(str(batch["worker"][0]).rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    opts = {"device": "cpu", "dtype": "auto", "prompt": None, "num_captions": 1, "max_new_tokens": 30,
            "num_beams": None, "temperature": None, "top_p": None, "truncate": False, "quantize": None}
    stats = run_job("caption", [str(tmp_path / "imgs")], tmp_path / "o", "demo", opts, Resources(batch_size=2),
                    shard_rows=100, on_batch=kill_first_worker)
    rows = _rows(tmp_path / "o")
    assert sorted(r["id"] for r in rows) == sorted(map(str, imgs)) and stats["failed"] == 0
    workers = {r["worker"] for r in rows}
    assert killed and len(workers) >= 2, "no batch ran after the kill: the job was not cut mid-run"
    assert all(r["text"] for r in rows)


@pytest.mark.slow
def test_interrupt_then_resume(cluster, tmp_path):
    from blip2.apps import jobs

    _draw(tmp_path / "imgs", 12, seed=5)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "blip2.apps.cli.main", "caption", "--ray", "--model", "demo", str(tmp_path / "imgs"),
           "-o", str(out), "--batch-size", "1", "--shard-rows", "1",
           "--ray-address", cluster.get_runtime_context().gcs_address]  # the driver joins the test's cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while len(list(out.glob("part-*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    first = _rows(out)
    assert 2 <= len(first) < 12 and not (out / "_SUCCESS").exists()
    assert len({r["id"] for r in first}) == len(first)
    stats = jobs.run("caption", [str(tmp_path / "imgs")], str(out), model="demo", batch_size=1, shard_rows=1)
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == sorted(str(p) for p in (tmp_path / "imgs").glob("*.png"))
    assert stats["this_run"]["rows"] == 12 - len(first) and (out / "_SUCCESS").exists()
    assert {r["id"]: r["text"] for r in first} == {r["id"]: r["text"] for r in rows if r["id"] in {f["id"] for f in first}}


@pytest.mark.slow
def test_ask_questions_from_table_and_command_line(cluster, data, tmp_path, capsys):
    from blip2.apps import jobs

    d = data["dir"]
    q = "how many objects are there?"
    jobs.run("ask", [str(d / "table.jsonl")], str(tmp_path / "o"), model="demo", questions=[q], batch_size=2)
    rows = {r["id"]: r for r in _rows(tmp_path / "o")}
    assert set(rows) == {"table.jsonl:0", "table.jsonl:1", "table.jsonl:2"} and rows["table.jsonl:1"]["error"]
    one = rows["table.jsonl:0"]
    assert one["questions"] == ["what color is the circle?", q] and len(one["answers"]) == 2
    want = _cli_json(capsys, ["ask", "--model", "demo", str(data["more"][0]), "what color is the circle?", q])
    assert one["answers"] == [r["text"] for r in want]
    assert rows["table.jsonl:2"]["questions"] == [q]


@pytest.mark.slow
def test_embed_job_feeds_the_index(cluster, data, tmp_path, capsys):
    pytest.importorskip("faiss")
    from blip2.apps.index import SearchIndex

    d, out = data["dir"], tmp_path / "emb"
    assert main(["embed", "--ray", "--model", "demo", str(d / "folder"), str(d / "shards"), "-o", str(out),
                 "--shard-rows", "3", "--batch-size", "2"]) == 1  # broken.png: one row with an error
    meta = json.loads((out / "embeddings.json").read_text())
    vecs = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    ids = [i for p in sorted((out / "metadata").glob("*.parquet")) for i in pq.read_table(p)["id"].to_pylist()]
    assert vecs.shape == (7, meta["queries"], meta["dim"]) and len(set(ids)) == 7
    files = [*map(str, data["folder"]), *map(str, data["jpgs"])]
    assert main(["embed", "--model", "demo", *files, "-o", str(tmp_path / "ref.npy")]) == 0
    ref = dict(zip(json.loads((tmp_path / "ref.json").read_text())["ids"], np.load(tmp_path / "ref.npy")))
    srcs = [s for p in sorted((out / "metadata").glob("*.parquet")) for s in pq.read_table(p)["source"].to_pylist()]
    for s, v in zip(srcs, vecs):
        key = s.rsplit("::", 1)[-1].split(".")[0]
        f = str(data["jpgs"][data["keys"].index(key)]) if "::" in s else s
        np.testing.assert_allclose(v, ref[f], atol=1e-5)
    assert main(["index", "build", str(out), "-o", str(tmp_path / "ix")]) == 0
    ix = SearchIndex(tmp_path / "ix")
    tar_row = next(s for s in srcs if "::" in s)
    assert ix.search(image=str(data["jpgs"][data["keys"].index(tar_row.rsplit("::")[-1][:9])]), k=1)[0]["path"] == tar_row
    hit = ix.search(text="a red circle", k=2, rerank=4)  # ITM reads tar members from their offsets too
    assert len(hit) == 2 and all("itm" in h for h in hit)
