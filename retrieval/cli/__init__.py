"""``retrieval <command>``: one entry point for every job; ``main(argv)`` is callable from tests.

Each command is a thin module of this package, imported only when that command runs (``retrieval --help``
stays fast and does not import torch). A command module provides ``add_arguments(parser)`` and
``run(args) -> int``: it parses, calls the library (``retrieval.*``), writes an artifact. The library never
imports from here (ARCHITECTURE.md; ``tests/test_layers.py`` checks it).

    retrieval synth-sop OUT --classes 200 --images-per-class 6 --seed 0
    retrieval shards build --sop-root OUT --out shards/out --workers 2
    retrieval shards verify shards/out
    retrieval train --config configs/tiny.yaml --shards shards/out --run-dir runs/tiny
    accelerate launch --config_file launch/cpu_2proc.yaml -m retrieval train --config configs/tiny.yaml
    retrieval launch --processes 2 train --config configs/tiny.yaml --shards shards/out --run-dir runs/tiny
    retrieval embed --model runs/tiny --shards shards/out --split test --out runs/tiny/emb-test
    retrieval eval --embeddings runs/tiny/emb-test
    retrieval embeddings export runs/tiny/emb-test --format parquet --out exports/emb
    retrieval index build --embeddings runs/tiny/emb-test --out runs/tiny/index
    retrieval search --index runs/tiny/index --image some.jpg --k 10
    retrieval export --model runs/tiny --format timm --out exports/tiny-timm
    retrieval serve --index runs/tiny/index --port 8080
    retrieval feedback export --log feedback/ --index runs/tiny/index --out fb/
    retrieval report --run-dir runs/tiny
    retrieval demo
    retrieval bench all --quick
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from retrieval.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth-sop": ("retrieval.cli.synth", "write a synthetic catalogue in the exact SOP layout"),
    "shards": (
        "retrieval.cli.shards",
        "build / verify / index WebDataset shards (SOP, a manifest, an image folder; foreign corpora)",
    ),
    "train": (
        "retrieval.cli.train",
        "fine-tune a timm backbone with a metric-learning loss (DDP / DeepSpeed via accelerate)",
    ),
    "launch": ("retrieval.cli.launch", "run a command on N processes (accelerate launch), its one-line error last"),
    "embed": ("retrieval.cli.embed", "embed a split rank-sharded and merge the parts"),
    "eval": ("retrieval.cli.eval", "SOP protocol: Recall@K, MAP@R, R-Precision on saved embeddings"),
    "embeddings": (
        "retrieval.cli.embeddings",
        "export an embeddings set as parquet or plain .npy (what autofaiss and vector databases load)",
    ),
    "index": (
        "retrieval.cli.index",
        "build a Faiss index (CPU / GPU / multi-GPU) over saved embeddings; add, remove rows",
    ),
    "search": ("retrieval.cli.search", "image-to-image search against a built index"),
    "export": ("retrieval.cli.export", "the trained model as a timm hub folder or ONNX"),
    "serve": ("retrieval.cli.serve", "HTTP JSON search service over an index (model and index loaded once)"),
    "feedback": ("retrieval.cli.feedback", "export users' judgements (POST /feedback) as training input"),
    "report": ("retrieval.cli.report", "self-contained HTML report of a run"),
    "demo": ("retrieval.cli.demo", "the whole product in miniature on synthetic data (make demo)"),
    "bench": (
        "retrieval.cli.bench",
        "benchmarks of a checkout's bench/ package (loader, shards, train, embed, search)",
    ),
}


# a missing optional package -> the extra that installs it (pyproject.toml's optional-dependencies)
EXTRAS = {"starlette": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve"}
EXTRAS |= {"onnx": "export", "onnxscript": "export", "onnxruntime": "export", "pyarrow": "interop"}
EXTRAS |= {"tensorboard": "trackers", "tensorboardX": "trackers", "mlflow": "trackers"}


def _usage() -> str:
    lines = ["usage: retrieval <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`retrieval <command> --help` for a command's options."]
    return "\n".join(lines)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # faiss logs every CPU-extension probe at INFO (eight lines per process); its failures still show
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from retrieval import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"retrieval: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    _setup_logging()
    try:
        module = importlib.import_module(module_name)
        args = parse(module, argparse.ArgumentParser(prog=f"retrieval {name}", description=help_), rest)
        return int(module.run(args) or 0)
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if package not in EXTRAS:
            raise
        return _fail(name, UserError(f"needs the package {package!r}: pip install 'retrieval[{EXTRAS[package]}]'"))
    except UserError as e:
        return _fail(name, e)


def parse(module, parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command's arguments; options and positionals (dotted overrides) may come in any order, wherever the
    parser allows it (argparse cannot intermix with subcommands or a REMAINDER: those parse as written)."""
    module.add_arguments(parser)
    try:
        return parser.parse_intermixed_args(argv)
    except TypeError:  # subparsers / REMAINDER: raised before anything is parsed
        return parser.parse_args(argv)


def _fail(name: str, error: UserError) -> int:
    line = f"retrieval {name}: error: {error}"
    print(line, file=sys.stderr, flush=True)
    from retrieval import dist

    dist.record_error(line)  # under a launcher: its failure report names this line, not "enable traceback"
    return 2


if __name__ == "__main__":
    sys.exit(main())
