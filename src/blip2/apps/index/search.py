"""Searching an index with BLIP-2's own retrieval recipe: the ITC embedding of the query finds the
nearest query vectors in the index, an image's ITC score is its best query vector's (as
Blip2ForImageTextRetrieval scores it), and ITM (the matching head) re-ranks the best `rerank`
images for a text query.

    from blip2.apps.index import SearchIndex

    ix = SearchIndex("index/")                        # the model recorded in the index
    ix.search(text="a red circle on grey", k=10, rerank=50)
    ix.search(image="query.png", k=5)                 # image -> image (ITC only)

Each hit is {"rank", "path", "id", "score", "itc"} (+ "itm" when re-ranked): score is ITM's
p(match) for re-ranked hits, else the ITC similarity; best first."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import Blip2ForImageTextRetrieval, Blip2Model, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from ...models.retrieval import itc_towers
from ...processing.image import ImageLoadError
from ..cli.common import UsageError, load, model_dir, pick_device, text_ids
from ..cli.common import has_keys
from ..cli.match import _score
from ..jobs.inputs import load_source
from .build import FAISS_FILE, ITEMS_FILE
from .store import META, model_fingerprint, normalise, read_json


class SearchIndex:
    """An index folder written by `blip2 index build`, opened for search with `model` (default: the
    one recorded in the index; another model's weights or dimension is a UsageError). A retrieval
    checkpoint is loaded once, as Blip2ForImageTextRetrieval, and serves the text and image
    embeddings (its own modules, models.retrieval.itc_towers) as well as ITM. `loaded`: a (model,
    processor, directory) already in memory (a server's), used when it is the index's model."""

    def __init__(self, path: str | Path, model: str | None = None, device: str = "auto", nprobe: int | None = None,
                 loaded: tuple | None = None):
        import faiss
        import pyarrow.parquet as pq

        self.dir = Path(path)
        self.meta = read_json(self.dir / META)
        if self.meta is None:
            raise UsageError(f"{self.dir}: not an index (no readable {META}); build one with `blip2 index build`")
        try:
            self.index = faiss.read_index(str(self.dir / FAISS_FILE))
            self.items = pq.read_table(self.dir / ITEMS_FILE).to_pydict()
        except Exception as e:
            raise UsageError(f"{self.dir}: the index files cannot be read ({' '.join(str(e).split())})") from None
        if self.meta["nlist"]:
            faiss.extract_index_ivf(self.index).nprobe = nprobe or self.meta["nprobe"]
        self.model_name = model or self.meta["model"]
        self.device = device
        self._check_model()
        self._models: dict[type, Any] = {}
        if loaded is not None and self.retrieval and Path(loaded[2]).resolve() == self.model_path.resolve():
            self._share(*loaded[:2])

    def _check_model(self) -> None:
        d = self.model_path = model_dir(self.model_name, "retrieval")
        self.retrieval = has_keys(d, "vision_projection.")
        from ... import Blip2Config

        c = Blip2Config.from_pretrained(d)
        dim = c.image_text_hidden_size if self.retrieval else c.qformer_config.hidden_size
        if dim != self.meta["dim"] or c.num_query_tokens != self.meta["queries"]:
            raise UsageError(f"{self.dir} holds {self.meta['queries']} x {self.meta['dim']}-d embeddings per image; "
                             f"model {self.model_name} makes {c.num_query_tokens} x {dim}-d ones")
        want = self.meta.get("fingerprint")
        if want and model_fingerprint(d) != want:
            raise UsageError(f"{self.dir} holds embeddings of model {self.meta['model']!r} (fingerprint {want}); "
                             f"--model {self.model_name} is another model (or was retrained): search with that "
                             "model, or rebuild the index from this model's embeddings")

    def _model(self, cls: type) -> tuple[Any, Any]:
        if cls not in self._models:
            args = argparse.Namespace(model=self.model_name, demo_kind="retrieval", device=self.device, dtype="auto")
            pick_device(self.device)
            if self.retrieval:  # one model for ITC (both towers) and ITM
                self._share(*load(args, Blip2ForImageTextRetrieval))
            else:
                self._models[cls] = load(args, cls)
        return self._models[cls]

    def _share(self, model: Any, proc: Any) -> None:
        text, vision = itc_towers(model)
        self._models.update({Blip2ForImageTextRetrieval: (model, proc), Blip2TextModelWithProjection: (text, proc),
                             Blip2VisionModelWithProjection: (vision, proc)})

    def embed_text(self, text: str) -> np.ndarray:
        """(1, E): the text's ITC embedding (its [CLS] token's), as `blip2 embed --text`."""
        if not self.retrieval:
            raise UsageError(f"{self.dir} holds Q-Former features of a checkpoint without ITC projections; "
                             "text search needs a retrieval checkpoint's embeddings (search with --image)")
        model, proc = self._model(Blip2TextModelWithProjection)
        ids, am = text_ids(proc, model, [text])  # (1, L)
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=am).text_embeds[:, 0].float().cpu().numpy()

    def embed_image(self, image: Any) -> np.ndarray:
        """(Q, E): the image's query vectors, as the index holds them."""
        model, proc = self._model(Blip2VisionModelWithProjection if self.retrieval else Blip2Model)
        img = load_source(str(image)) if isinstance(image, (str, Path)) else image
        pv = proc.image_processor(img, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        with torch.inference_mode():
            e = model(pixel_values=pv).image_embeds if self.retrieval else model.get_qformer_features(pv)
        return e[0].float().cpu().numpy()

    def nearest(self, queries: np.ndarray, n: int) -> list[tuple[int, float]]:
        """The n best items (item, ITC score) for query vectors (m, E): an item scores its best
        (query, vector) pair. Exact on a Flat index: n * Q hits always hold n distinct items."""
        Q, total = self.meta["queries"], self.index.ntotal
        want = min(total, n * Q)
        refine = self.meta.get("refine", 0)
        D, I = self.index.search(normalise(queries), min(total, want * max(refine, 1)))
        if refine:
            D, I = self._rerank_exact(queries, I, want)
        items, scores = I.ravel() // Q, D.ravel()
        keep = I.ravel() >= 0
        items, scores = items[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")
        _, first = np.unique(items[order], return_index=True)
        best = order[np.sort(first)][:n]
        return [(int(items[j]), float(scores[j])) for j in best]

    def _rerank_exact(self, queries: np.ndarray, I: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ scores are approximate: score the candidates with the vectors kept in the shards."""
        vecs = self._stored(np.unique(I[I >= 0]))
        D = np.full(I.shape, -np.inf, dtype=np.float32)
        for r in range(I.shape[0]):
            ok = I[r] >= 0
            D[r, ok] = np.array([vecs[i] for i in I[r, ok]]) @ normalise(queries[r:r + 1])[0]
        order = np.argsort(-D, axis=1)[:, :want]
        return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)

    def _stored(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        out, start = {}, 0
        dim = self.meta["dim"]
        for s in self.meta["shards"]:
            c = s["items"] * self.meta["queries"]
            mine = ids[(ids >= start) & (ids < start + c)]
            if len(mine):
                a = np.load(s["path"], mmap_mode="r").reshape(-1, dim)
                out.update(zip(mine.tolist(), normalise(np.asarray(a[mine - start], dtype=np.float32))))
            start += c
        return out

    def search(self, text: str | None = None, image: Any = None, k: int = 10, rerank: int = 50) -> list[dict]:
        """The k best images for `text` (ITC, then ITM re-ranks the best max(k, rerank) when rerank > 0)
        or for `image` (a path, URL or PIL image; ITC only). Exactly one of them."""
        if (text is None) == (image is None):
            raise UsageError("give a text or an image to search with (one of them)")
        q = self.embed_text(text) if text is not None else self.embed_image(image)
        n = max(k, rerank) if text is not None and rerank else k
        hits = [self._hit(i, s) for i, s in self.nearest(q, n)]
        if text is not None and rerank:
            hits = self._itm(text, hits)
        for r, h in enumerate(hits[:k]):
            h["rank"] = r + 1
            del h["item"]
        return hits[:k]

    def _hit(self, i: int, itc: float) -> dict:
        return {"path": self.items["source"][i], "id": self.items["id"][i], "score": itc, "itc": itc, "item": i}

    def _itm(self, text: str, hits: list[dict], batch: int = 8) -> list[dict]:
        """Re-rank by ITM p(match) (match.py's scoring); hits whose image cannot be read keep their
        ITC score and go after the re-ranked ones."""
        model, proc = self._model(Blip2ForImageTextRetrieval)
        ids, am = text_ids(proc, model, [text])
        scored, lost = [], []
        for j in range(0, len(hits), batch):
            imgs = []
            for h in hits[j:j + batch]:
                i = h["item"]
                try:
                    imgs.append((h, load_source(h["path"], self.items["offset"][i], self.items["size"][i])))
                except (ImageLoadError, OSError) as e:
                    lost.append({**h, "error": str(e)})
            for (h, _), rec in zip(imgs, _score(model, proc, imgs, [text], ids, am)):
                scored.append({**h, "itm": rec["itm"], "score": rec["itm"]})
        scored.sort(key=lambda h: -h["itm"])
        return scored + lost
