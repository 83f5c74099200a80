"""The search index (apps/index): built from `blip2 embed` output, real FAISS, searched with the demo
retrieval model. Results are compared with the retrieval model run in process (ITC, ITM), never
with recorded numbers."""

import json
import shutil

import numpy as np
import pytest
import torch

from blip2 import Blip2ForImageTextRetrieval, Blip2Processor, scenes
from blip2.apps.cli.main import main
from blip2.apps.demo.shipped import demo_checkpoint

faiss = pytest.importorskip("faiss")
from blip2.apps.index import SearchIndex, build  # noqa: E402
from blip2.apps.index.build import choose  # noqa: E402

N_IMAGES = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """N_IMAGES drawn scenes, their captions, their `blip2 embed` output and its index."""
    d = tmp_path_factory.mktemp("world")
    shots = scenes.dataset(N_IMAGES, seed=11)
    paths = []
    for i, s in enumerate(shots):
        p = d / "imgs" / f"{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        scenes.render(s, 96).save(p)
        paths.append(str(p))
    assert main(["embed", "--model", "demo", str(d / "imgs"), "-o", str(d / "emb.npy")]) == 0
    assert main(["index", "build", str(d / "emb.npy"), "-o", str(d / "ix")]) == 0
    return {"dir": d, "paths": paths, "captions": [scenes.caption(s) for s in shots]}


def _itc_itm(paths, text):
    """ITC and ITM p(match) of `text` with every image, from the retrieval model in process."""
    d = demo_checkpoint("retrieval")
    model, proc = Blip2ForImageTextRetrieval.from_pretrained(d), Blip2Processor.from_pretrained(d)
    from PIL import Image

    imgs = [Image.open(p).convert("RGB") for p in paths]
    inp = proc(images=imgs, text=[text] * len(imgs), return_tensors="pt", padding=True)
    with torch.inference_mode():
        itc = model(pixel_values=inp["pixel_values"], input_ids=inp["input_ids"][:1],
                    attention_mask=inp["attention_mask"][:1]).logits_per_image[:, 0]
        itm = model(**inp, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    return itc.numpy(), itm.numpy()


@pytest.mark.slow
def test_metadata_round_trip(world):
    meta = json.loads((world["dir"] / "ix" / "index.json").read_text())
    emb = np.load(world["dir"] / "emb.npy")
    assert meta["kind"] == "flat" and meta["items"] == N_IMAGES and meta["vectors"] == emb.shape[0] * emb.shape[1]
    assert (meta["queries"], meta["dim"]) == emb.shape[1:] and meta["model"] == "demo" and meta["fingerprint"]
    ix = SearchIndex(world["dir"] / "ix")
    assert ix.index.ntotal == meta["vectors"]
    assert sorted(ix.items["source"]) == sorted(world["paths"])


@pytest.mark.slow
def test_text_search_is_itc_then_itm(world):
    ix = SearchIndex(world["dir"] / "ix")
    text = world["captions"][3]
    itc, itm = _itc_itm(world["paths"], text)
    got = ix.search(text=text, k=N_IMAGES, rerank=0)
    assert [h["path"] for h in got] == [world["paths"][i] for i in np.argsort(-itc, kind="stable")]
    np.testing.assert_allclose([h["score"] for h in got], np.sort(itc)[::-1], atol=1e-4)
    top = ix.search(text=text, k=3, rerank=5)  # ITM orders the 5 best by ITC
    cands = np.argsort(-itc, kind="stable")[:5]
    want = [world["paths"][i] for i in cands[np.argsort(-itm[cands], kind="stable")]][:3]
    assert [h["path"] for h in top] == want
    np.testing.assert_allclose([h["itm"] for h in top], np.sort(itm[cands])[::-1][:3], atol=1e-4)


@pytest.mark.slow
def test_image_search_finds_itself(world):
    ix = SearchIndex(world["dir"] / "ix")
    for p in world["paths"][:3]:
        hit = ix.search(image=p, k=2)[0]
        assert hit["path"] == p and hit["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_cli_search_json(world, capsys):
    text = world["captions"][0]
    capsys.readouterr()
    assert main(["search", str(world["dir"] / "ix"), text, "-k", "4", "--rerank", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4 and [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert all(set(h) >= {"path", "score", "itc", "itm"} for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits == SearchIndex(world["dir"] / "ix").search(text=text, k=4, rerank=6)
    assert main(["search", str(world["dir"] / "ix"), text, "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split("  ", 1)[1] in world["paths"]


def _synthetic(tmp_path, n, q=16, dim=64, seed=0):
    """n items of q clustered unit vectors, saved as `blip2 embed` saves them (model: demo)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim))
    a = centres[rng.integers(0, 32, n * q)] + 0.3 * rng.standard_normal((n * q, dim))
    a = (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32).reshape(n, q, dim)
    np.save(tmp_path / "syn.npy", a)
    (tmp_path / "syn.json").write_text(json.dumps({"kind": "image", "ids": [f"x{i}" for i in range(n)],
                                                   "model": "demo"}))
    return a


def _exact(a, queries, k):
    s = (a.reshape(-1, a.shape[-1]) @ queries.T).reshape(a.shape[0], a.shape[1], -1).max(axis=1)  # (n, m)
    best = s.max(axis=1)
    return list(np.argsort(-best, kind="stable")[:k]), np.sort(best)[::-1][:k]


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_matches_exact_search(tmp_path, kind):
    a = _synthetic(tmp_path, 400)
    build([str(tmp_path / "syn.npy")], tmp_path / "ix", kind=kind, nlist=16, nprobe=16)  # all lists: exact
    ix = SearchIndex(tmp_path / "ix")
    rng = np.random.default_rng(1)
    for _ in range(5):
        qv = rng.standard_normal((2, 64)).astype(np.float32)
        qv /= np.linalg.norm(qv, axis=1, keepdims=True)
        want, scores = _exact(a, qv, 10)
        got = ix.nearest(qv, 10)
        assert [i for i, _ in got] == want
        np.testing.assert_allclose([s for _, s in got], scores, atol=1e-5)


@pytest.mark.slow
def test_pq_index_reranks_exactly(tmp_path):
    a = _synthetic(tmp_path, 100)
    meta = build([str(tmp_path / "syn.npy")], tmp_path / "ix", kind="ivfpq", nlist=4, nprobe=4)
    assert meta["kind"] == "ivfpq" and "PQ" in meta["factory"] and meta["bytes_per_vector"] < 64 * 4 / 2
    ix = SearchIndex(tmp_path / "ix")
    qv = a[7, :1]  # a stored vector: its item comes first, with the exact score 1
    got = ix.nearest(qv, 5)
    assert got[0][0] == 7 and got[0][1] == pytest.approx(1.0, abs=1e-5)
    want, scores = _exact(a, qv, 5)
    assert len(set(i for i, _ in got) & set(want)) >= 4
    for i, s in got:  # every reported score is the exact one of its item
        assert s == pytest.approx(float((a[i] @ qv[0]).max()), abs=1e-5)


def test_choose_follows_size():
    assert choose(10_000, 256)["kind"] == "flat"
    ivf = choose(1_000_000, 256)
    assert ivf["kind"] == "ivf" and ivf["nlist"] == 4096 and ivf["factory"] == "IVF4096,Flat"
    big = choose(20_000_000, 256)
    assert big["kind"] == "ivfpq" and big["factory"] == "IVF65536_HNSW32,PQ64x8np" and big["refine"] > 0


def _cli_error(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.slow
def test_bad_inputs_have_clear_messages(world, tmp_path, capsys):
    ix = str(world["dir"] / "ix")
    (tmp_path / "empty").mkdir()
    code, err = _cli_error(capsys, ["index", "build", str(tmp_path / "empty"), "-o", str(tmp_path / "i1")])
    assert code == 2 and "empty" in err and "embeddings.json" in err
    code, err = _cli_error(capsys, ["index", "build", str(tmp_path / "nothing.npy"), "-o", str(tmp_path / "i1")])
    assert code == 2 and "no such file" in err
    code, err = _cli_error(capsys, ["search", str(tmp_path / "empty"), "a cat"])
    assert code == 2 and "not an index" in err
    code, err = _cli_error(capsys, ["search", ix, "a cat", "--model", str(tmp_path / "no-model")])
    assert code == 2 and "no-model" in err
    # the captioning demo makes embeddings of another dimension
    code, err = _cli_error(capsys, ["search", ix, "a cat", "--model", str(demo_checkpoint("captioning"))])
    assert code == 2 and "x 64-d" in err and "captioning" in err
    # the same architecture with other weights (a retrained model): refused by fingerprint
    other = tmp_path / "other"
    shutil.copytree(demo_checkpoint("retrieval"), other)
    st = other / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-4096:] = bytes(4096)
    st.write_bytes(bytes(raw))
    code, err = _cli_error(capsys, ["search", ix, "a cat", "--model", str(other)])
    assert code == 2 and "another model" in err and "fingerprint" in err
    code, err = _cli_error(capsys, ["search", ix])
    assert code == 2 and "TEXT or --image" in err
    # shards of two dimensions do not make one index
    _synthetic(tmp_path, 5, dim=32)
    code, err = _cli_error(capsys, ["index", "build", str(world["dir"] / "emb.npy"), str(tmp_path / "syn.npy"),
                                    "-o", str(tmp_path / "i2")])
    assert code == 2 and "syn.npy" in err and "32" in err


@pytest.mark.slow
def test_one_retrieval_model_serves_itc_and_itm(world):
    """The index loads its retrieval model once; a model handed in (a server's) is used, not reloaded,
    and gives the same hits."""
    ix = SearchIndex(world["dir"] / "ix")
    text = world["captions"][5]
    want = ix.search(text=text, k=4, rerank=6)
    models = {m for m, _ in ix._models.values()}
    full = ix._models[Blip2ForImageTextRetrieval][0]
    assert all(m.qformer is full.qformer for m in models)  # text tower, image tower and ITM share it
    d = demo_checkpoint("retrieval")
    mine = Blip2ForImageTextRetrieval.from_pretrained(d).eval()
    ix2 = SearchIndex(world["dir"] / "ix", loaded=(mine, Blip2Processor.from_pretrained(d), d))
    assert ix2._models[Blip2ForImageTextRetrieval][0] is mine
    assert ix2.search(text=text, k=4, rerank=6) == want
    other = SearchIndex(world["dir"] / "ix", loaded=(mine, None, world["dir"]))  # not the index's model
    assert not other._models
