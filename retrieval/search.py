"""Image-to-image search: embed a query image with the index's model and print its nearest catalogue images.

    retrieval search --index runs/sop/index --image query.jpg --k 10
    retrieval search --index runs/sop/index --image query.jpg --json     # for machines

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="folder written by `retrieval index build`")
    p.add_argument("--image", required=True, nargs="+", help="query image file(s)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="override the model recorded in the index (run folder or model.safetensors)")
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


def embed_images(model, img: dict, paths: list[str]) -> np.ndarray:
    """Embed image files with the eval transform used for the catalogue."""
    from retrieval.data.transforms import eval_transform

    transform = eval_transform(img["img_size"], img["mean"], img["std"], img["crop_pct"])
    batch = []
    for path in paths:
        try:
            with Image.open(path) as im:
                batch.append(transform(im.convert("RGB")))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise UserError(f"--image {path}: cannot read the image ({e})") from None
    model.eval()
    with torch.no_grad():
        return model(torch.stack(batch)).float().numpy()


def search(index_dir: str | Path, images: list[str], k: int = 10, model_path: str | None = None) -> list[dict]:
    """Top-k results per query image: rank, image id, class, path, score."""
    from retrieval.embed import load_model_for_embedding
    from retrieval.index import load_index, search_index

    index_dir = Path(index_dir)
    meta_path = index_dir / "meta.json"
    untrained = bool(json.loads(meta_path.read_text()).get("untrained")) if meta_path.is_file() else False
    model, img, _ = load_model_for_embedding(_model_path(index_dir, model_path), untrained=untrained and not model_path)
    queries = embed_images(model, img, images)
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


def run(args: argparse.Namespace) -> int:
    results = search(args.index, args.image, args.k, args.model)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        return 0
    for res in results:
        print(f"query: {res['query']}")
        print(f"{'rank':>4}  {'image_id':>9}  {'class':>6}  {'score':>7}  path")
        for h in res["results"]:
            print(f"{h['rank']:>4}  {h['image_id']:>9}  {h['class_id']!s:>6}  {h['score']:>7.4f}  {h['path']}")
    return 0
