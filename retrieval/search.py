"""Image-to-image search: embed a query image with the index's model and print its nearest catalogue images.

    retrieval search --index runs/sop/index --image query.jpg --k 10
    retrieval search --index runs/sop/index --image query.jpg --json     # for machines
    retrieval search --index runs/sop/index --queries data/synth/queries.txt --k 10

``--queries`` takes an SOP-format list (``image_id class_id super_class_id path``, paths relative to the
list's folder; ``synth-sop --query-views N`` writes one of new photos of the test products). Its class ids
are the truth: the command then also reports how often the top hit, and any of the top k, is of the query's
class.

The index folder (``retrieval index build``) records which model produced its embeddings
(``index.json`` -> ``model``), so the query is embedded exactly as the catalogue was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from retrieval.errors import UserError
from retrieval.models import InputSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="folder written by `retrieval index build`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", help="query image file(s)")
    what.add_argument("--queries", help="SOP-format list of query images with their class ids (e.g. queries.txt)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="override the model recorded in the index (run folder or model.safetensors)")
    p.add_argument("--batch-size", type=int, default=64, help="query images embedded per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _model_path(index_dir: Path, override: str | None) -> str:
    if override:
        return override
    info_path = index_dir / "index.json"
    if not info_path.is_file():
        raise UserError(f"{info_path} not found: is {index_dir} a folder written by `retrieval index build`?")
    model = json.loads(info_path.read_text()).get("model")
    if not model:
        raise UserError(f"{info_path} names no model (the embeddings had no meta.json); pass --model")
    if not Path(model).exists():
        raise UserError(f"{info_path}: model {model!r} does not exist any more; pass --model")
    return model


def read_queries(list_file: str | Path) -> tuple[list[str], list[int]]:
    """Image paths (resolved against the list's folder) and class ids of an SOP-format query list."""
    from retrieval.data.sop import read_sop_file

    list_file = Path(list_file)
    records = read_sop_file(list_file)
    if not records:
        raise UserError(f"{list_file}: lists no query image")
    return [str(list_file.parent / r.path) for r in records], [r.class_id for r in records]


def _load(path: str, transform) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return transform(im.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise UserError(f"query {path}: cannot read the image ({e})") from None


def embed_images(model, img: InputSpec, paths: list[str], batch_size: int = 64) -> np.ndarray:
    """Embed image files with the eval transform used for the catalogue, a batch at a time, on the GPU if any."""
    from retrieval.data.transforms import eval_transform

    transform = eval_transform(img)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([_load(p, transform) for p in paths[start : start + batch_size]])
            parts.append(model(batch.to(device)).float().cpu().numpy())
    return np.concatenate(parts)


def search(
    index_dir: str | Path, images: list[str], k: int = 10, model_path: str | None = None, batch_size: int = 64
) -> list[dict]:
    """Top-k results per query image: rank, image id, class, path, score."""
    from retrieval.embed import load_model_for_embedding
    from retrieval.index import load_index, search_index

    index_dir = Path(index_dir)
    meta_path = index_dir / "meta.json"
    untrained = bool(json.loads(meta_path.read_text()).get("untrained")) if meta_path.is_file() else False
    model, img, _ = load_model_for_embedding(_model_path(index_dir, model_path), untrained=untrained and not model_path)
    queries = embed_images(model, img, images, batch_size)
    scores, ids = search_index(index_dir, queries, k)
    catalogue = load_index(index_dir)
    lookup = catalogue["lookup"]
    out = []
    for q, path in enumerate(images):
        hits = []
        for rank, (score, image_id) in enumerate(zip(scores[q], ids[q], strict=True), 1):
            if image_id < 0:  # fewer than k images in the index
                break
            row = lookup.get(int(image_id), {})
            hits.append(
                {
                    "rank": rank,
                    "image_id": int(image_id),
                    "class_id": row.get("label"),
                    "path": row.get("path"),
                    "score": float(score),
                }
            )
        out.append({"query": path, "results": hits})
    return out


def same_class_summary(results: list[dict], classes: list[int]) -> dict:
    """How often the top hit, and any of the top k, is of the query's own class (the truth from the list)."""
    top1 = sum(bool(r["results"]) and r["results"][0]["class_id"] == c for r, c in zip(results, classes, strict=True))
    any_k = sum(any(h["class_id"] == c for h in r["results"]) for r, c in zip(results, classes, strict=True))
    n = len(results)
    return {"queries": n, "top1_same_class": top1 / n, "topk_any_same_class": any_k / n}


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.batch_size < 1:
        raise UserError(f"--k and --batch-size: expected positive integers, got {args.k} and {args.batch_size}")
    images, classes = read_queries(args.queries) if args.queries else (args.image, None)
    results = search(args.index, images, args.k, args.model, args.batch_size)
    summary = None
    if classes is not None:
        for res, c in zip(results, classes, strict=True):
            res["query_class_id"] = c
        summary = same_class_summary(results, classes)
    if args.json:
        if summary:
            payload = {"summary": summary, "queries": results}
        else:  # one --image prints its result alone
            payload = results if len(results) > 1 else results[0]
        print(json.dumps(payload, indent=1))
        return 0
    _print_table(results[:5] if summary else results)
    if summary:
        if len(results) > 5:
            print(f"... {len(results) - 5} more queries (--json for all)")
        print(
            f"{summary['queries']} queries: the top hit is of the query's class for {100 * summary['top1_same_class']:.2f}%, "
            f"one of the top {args.k} for {100 * summary['topk_any_same_class']:.2f}%"
        )
    return 0


def _print_table(results: list[dict]) -> None:
    for res in results:
        print(f"query: {res['query']}")
        print(f"{'rank':>4}  {'image_id':>9}  {'class':>6}  {'score':>7}  path")
        for h in res["results"]:
            print(f"{h['rank']:>4}  {h['image_id']:>9}  {h['class_id']!s:>6}  {h['score']:>7.4f}  {h['path']}")
