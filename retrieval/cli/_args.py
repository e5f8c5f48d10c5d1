"""Arguments that several commands share: the model a command takes, and old flag spellings kept for one release.

One name per meaning across commands (README, "Flags"): a renamed flag keeps its old spelling as a hidden alias
(absent from ``--help``) that still works and says once, on stderr, what the new name is.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

MODEL_HELP = (
    "run folder, export folder or model.safetensors, timm export folder, a timm model name with --pretrained / "
    "--pretrained-file (zero-shot), or a config YAML with --untrained"
)


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model`` and the flags that choose its weights (:func:`retrieval.model.loading.load_model`)."""
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument(
        "--untrained", action="store_true", help="the architecture at its starting weights (timm name: timm's init)"
    )
    p.add_argument("--pretrained", action="store_true", help="timm model name: timm's pretrained weights (hub/cache)")
    p.add_argument("--pretrained-file", help="timm model name: its weights from a local .safetensors/.pth (offline)")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``load_model`` beside the model itself."""
    return {"untrained": args.untrained, "pretrained": args.pretrained, "pretrained_file": args.pretrained_file}


class _OldSpelling(argparse.Action):
    """A renamed flag's old spelling: stores into the new flag's ``dest`` and says the new name once."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"{parser.prog}: {option_string} is now {self.new} (the old name goes in a later release)", file=sys.stderr
        )
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def old_spelling(p: argparse.ArgumentParser | Any, old: str, new: str, dest: str, flag: bool = False, **kw) -> None:
    """Accept ``old`` as a hidden alias of the option ``new`` (whose value lands in ``dest``)."""
    if flag:
        kw["nargs"] = 0
    p.add_argument(
        old, dest=dest, new=new, action=_OldSpelling, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw
    )


def add_source_arguments(p: argparse.ArgumentParser | Any) -> None:
    """How another tool's embeddings are read (``--embeddings X.npy`` or clip-retrieval's folder)."""
    p.add_argument("--labels", help="with a plain .npy of vectors: a .npy of one integer class per row")
    p.add_argument("--ids", help="with a plain .npy of vectors: a .npy of one integer image id per row (default: rows)")
    p.add_argument("--label-column", default="label", help="clip-retrieval metadata: the class column (default label)")


def source_columns(args: argparse.Namespace):
    from retrieval.embed.interop import Columns

    return Columns(args.labels, args.ids, args.label_column)
