"""retrieval: distributed training and evaluation for image retrieval (deep metric learning).

The Python API (README, "Python API")::

    from retrieval import Embedder, Index, Searcher

The names are imported on first use (``__getattr__``), so ``import retrieval`` stays light: no torch, timm or faiss.
(No ``TYPE_CHECKING`` imports either: tests/test_layers.py reads every import statement, and the package root
importing its modules would be a cycle.)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "Embedder": ("retrieval.embed.embedder", "Embedder"),
    "Index": ("retrieval.index.folder", "IndexFolder"),
    "Searcher": ("retrieval.search.searcher", "Searcher"),
}
__all__ = ["Embedder", "Index", "Searcher", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
