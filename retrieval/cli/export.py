"""``retrieval export``: the trained model in another ecosystem's format.

    retrieval export --model runs/sop --format timm --out exports/sop-timm   # timm.create_model("local-dir:...")
    retrieval export --model runs/sop --format onnx --out exports/sop-onnx   # model.onnx (dynamic batch) + input.json
    retrieval export --model swinv2_base_window16_256 --pretrained-file w.safetensors --format onnx --out E

``--model`` is any model the loader takes (a run folder: its best model; an export folder, a ``model.safetensors``,
a timm name with its weights); the old positional ``RUN`` still works for one release. The timm folder is in
timm's hub format: ``timm.models.push_to_hub`` publishes it as is. See :mod:`retrieval.model.formats`.
"""

from __future__ import annotations

import argparse

from retrieval.cli._args import add_model_arguments, model_options
from retrieval.errors import UserError
from retrieval.model.formats import FORMATS, export


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, required=False)
    p.add_argument("run", nargs="?", help=argparse.SUPPRESS)  # the old positional spelling of --model
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.run is None):
        raise UserError("give the model once: --model RUN (a run folder, export folder or timm name)")
    print(export(args.model or args.run, args.format, args.out, **model_options(args)))
    return 0
