"""A FAISS index over image embeddings and BLIP-2 retrieval on it (ITC top-k, ITM re-rank).

    from blip2.apps.index import build, SearchIndex

    build(["emb_dir/"], "index/")                         # `blip2 index build emb_dir -o index`
    SearchIndex("index/").search(text="a red circle", k=10, rerank=50)

faiss is imported when an index is built or opened."""

from .build import build
from .search import SearchIndex

__all__ = ["build", "SearchIndex"]
