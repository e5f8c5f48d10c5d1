"""Image-to-image search: the index's model embeds query images exactly as the catalogue was embedded, and the
index returns their nearest catalogue images.

    searcher = Searcher("runs/sop/index")          # model and index loaded once
    results = searcher.search(["query.jpg"], k=10)  # [{"query", "results": [{rank, image_id, class_id, path, score}]}]

The index folder records which model produced its embeddings (``index.json`` -> ``model``, ``untrained``); the
model's :class:`~retrieval.model.network.InputSpec` (size, crop, resize filter) comes with it. ``read_queries`` reads an
SOP-format list (``image_id class_id super_class_id path``) whose class ids are the truth for
:func:`same_class_summary`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.data.sop import read_sop_file
from retrieval.embed.embedder import Embedder, ImageLike
from retrieval.errors import UserError
from retrieval.index.folder import IndexFolder
from retrieval.model.loading import LoadedModel, load_model


def read_queries(list_file: str | Path) -> tuple[list[str], list[int]]:
    """Image paths (resolved against the list's folder) and class ids of an SOP-format query list."""
    list_file = Path(list_file)
    records = read_sop_file(list_file)
    if not records:
        raise UserError(f"{list_file}: lists no query image")
    return [str(list_file.parent / r.path) for r in records], [r.class_id for r in records]


def index_model(index: IndexFolder, override: str | None = None, force: bool = False) -> LoadedModel:
    """The model recorded in the index (or ``override``), at the weights the catalogue was embedded with.

    The index records the sha256 of the weights its catalogue was embedded with: another model (``--model``, or
    the recorded path retrained since) embeds queries into another space, even at the same dimension, and the
    results would be silently meaningless; refused unless ``force``.
    """
    meta = index.catalogue.meta
    model = override or index.info.get("model")
    if not model:
        raise UserError(f"{index.path}/index.json names no model (the embeddings had no provenance); pass --model")
    weights = {}
    if meta.get("zero_shot") and meta.get("model") == model:  # a timm name: its weights as the catalogue's were
        weights = {"pretrained": bool(meta.get("pretrained")), "pretrained_file": meta.get("pretrained_file")}
    if not override and not weights and not Path(model).exists():
        raise UserError(f"{index.path}/index.json: model {model!r} does not exist any more; pass --model")
    untrained = (not override or bool(weights)) and bool(index.info.get("untrained", meta.get("untrained")))
    loaded = load_model(model, untrained=untrained, **weights)
    expected, got = index.info.get("model_sha256"), loaded.provenance.get("model_sha256")
    if expected and got != expected and not force:
        raise UserError(
            f"model {loaded.provenance['model']!r} (weights sha256 {str(got)[:12]}) is not the model the index "
            f"{index.path} was built with ({index.info.get('model')!r}, sha256 {expected[:12]}): its embeddings are "
            "not comparable; use that model, rebuild the index with this one, or pass --force"
        )
    return loaded


class Searcher:
    """A model and an index loaded once; embeds query images in batches (an :class:`Embedder`) and searches them."""

    def __init__(
        self,
        index_dir: str | Path,
        model_path: str | None = None,
        batch_size: int = 64,
        device: str | None = None,
        force: bool = False,
    ) -> None:
        self.index = IndexFolder.load(index_dir)
        self.embedder = Embedder(index_model(self.index, model_path, force), batch_size, device)

    def embed(self, images: list[ImageLike], progress: bool = False) -> np.ndarray:
        return self.embedder.embed(images, progress=progress)

    def search(self, images: list[ImageLike], k: int = 10, progress: bool = False) -> list[dict]:
        """Top-k results per query image (a path, a PIL image or a prepared tensor): rank, image id, class, path,
        score. ``progress``: a bar over the queries while they are embedded (a list of thousands takes minutes)."""
        names = [str(x) if isinstance(x, (str, Path)) else f"<{type(x).__name__} {i}>" for i, x in enumerate(images)]
        return self.search_vectors(self.embed(images, progress), names, k)

    def search_vectors(
        self, vectors: np.ndarray, names: list[str], k: int = 10, index: IndexFolder | None = None
    ) -> list[dict]:
        """Top-k results of embeddings made by :attr:`embedder` (``names`` label the queries) from ``index`` (default:
        the one loaded; a service passes the version it answers a batch from)."""
        if k < 1:
            raise UserError(f"k: expected a positive integer, got {k}")
        index = index or self.index
        scores, ids = index.search(vectors, k)
        cat = index.catalogue
        rows = index.rows(ids)
        out = []
        for q, name in enumerate(names):
            hits = []
            for rank, (score, image_id, row) in enumerate(zip(scores[q], ids[q], rows[q], strict=True), 1):
                if image_id < 0:  # fewer than k images in the index
                    break
                hits.append(
                    {
                        "rank": rank,
                        "image_id": int(image_id),
                        "class_id": int(cat.labels[row]) if row >= 0 else None,
                        "super_class_id": int(cat.super_labels[row]) if row >= 0 else None,
                        "path": cat.paths[row] if row >= 0 and cat.paths else None,
                        "score": float(score),
                    }
                )
            out.append({"query": name, "results": hits})
        return out


def search(
    index_dir: str | Path, images: list[str], k: int = 10, model_path: str | None = None, batch_size: int = 64
) -> list[dict]:
    """One-off search (loads model and index; keep a :class:`Searcher` for many calls)."""
    return Searcher(index_dir, model_path, batch_size).search(images, k)


def same_class_summary(results: list[dict], classes: list[int]) -> dict:
    """How often the top hit, and any of the top k, is of the query's own class (the truth from the list)."""
    top1 = sum(bool(r["results"]) and r["results"][0]["class_id"] == c for r, c in zip(results, classes, strict=True))
    any_k = sum(any(h["class_id"] == c for h in r["results"]) for r, c in zip(results, classes, strict=True))
    n = len(results)
    return {"queries": n, "top1_same_class": top1 / n, "topk_any_same_class": any_k / n}
