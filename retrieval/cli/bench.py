"""``retrieval bench <topic>``: a thin entry to the top-level ``bench`` package of a source checkout.

The benchmarks live beside the package (``bench/`` next to ``retrieval/``), measure the product from outside and
are not installed with it; ``retrieval bench all --quick`` is ``python -m bench all --quick`` run from the repo root.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from retrieval.errors import UserError


def _bench():
    try:
        return importlib.import_module("bench")
    except ModuleNotFoundError as e:
        if e.name != "bench":
            raise
    root = Path(__file__).resolve().parents[2]  # the checkout holding retrieval/ (an editable install)
    if not (root / "bench" / "__init__.py").is_file():
        raise UserError(f"no bench/ package beside {root / 'retrieval'}: `retrieval bench` needs a source checkout")
    sys.path.insert(0, str(root))
    return importlib.import_module("bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    try:
        _bench().add_arguments(p)
    except UserError as e:  # argparse runs before main's UserError handling
        p.error(str(e))


def run(args: argparse.Namespace) -> int:
    return _bench().run(args)
