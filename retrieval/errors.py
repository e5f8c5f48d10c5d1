"""User-facing errors: the CLI prints their message (which names the file/field) without a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Bad input from the user: a file, a field or a flag. The message says what was expected."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """``module`` imported, or a UserError naming the install command: a missing optional extra is one line and
    exit 2, never a traceback from deep inside a library (``retrieval serve`` without starlette, ONNX export
    without onnxscript, parquet without pyarrow, a tracker without its package)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the package {module!r}: pip install 'retrieval[{extra}]'") from None
