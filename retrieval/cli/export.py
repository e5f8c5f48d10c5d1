"""``retrieval export``: the trained model in another ecosystem's format.

    retrieval export runs/sop --format timm --out exports/sop-timm   # timm.create_model("local-dir:exports/sop-timm")
    retrieval export runs/sop --format onnx --out exports/sop-onnx   # model.onnx (dynamic batch) + input.json

``RUN`` is a run folder (its best model), an export folder or a ``model.safetensors``. The timm folder is in
timm's hub format: ``timm.models.push_to_hub`` publishes it as is. See :mod:`retrieval.model.formats`.
"""

from __future__ import annotations

import argparse

from retrieval.model.formats import FORMATS, export


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, export folder or model.safetensors")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    print(export(args.run, args.format, args.out))
    return 0
