"""Benchmarks of ``retrieval`` from outside: the product's commands and public API, each beside a raw baseline
measured in the same run (ratio = ours / baseline). Not part of the installed package; run from a checkout:

    python -m bench all --quick --out /tmp/bench          # every topic, small sizes (`retrieval bench ...` is the same)
    python -m bench train --config configs/x.yaml data.classes_per_batch=16
    python -m bench search-gpu --out bench-gpu-out        # exact search on one GPU against its matmul + top-k floor
    bash bench/gpu_check.sh                               # the one-shot GPU check

Each topic prints a table and writes ``OUT/bench-<topic>.json``: machine, versions, device, config, results (median,
p10/p90, min/max, repeats, warm-up, unit), ratios and notes. Trainer figures are the ones the trainer logs itself in
its run's ``metrics.jsonl``; embedding figures are the ``seconds``/``images_per_s`` of ``retrieval embed``'s meta.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPICS = {
    "loader": "retrieval's streaming train loader, 0..2 workers, vs raw JPEG decode of the same bytes",
    "loader-sources": "the train loader from a local HTTP server and split inside one shard, vs the local folder",
    "shards": "`retrieval shards build` vs a plain PIL decode -> resize -> encode loop",
    "train": "`retrieval train` (figures from metrics.jsonl) vs raw timm forward+backward+AdamW",
    "embed": "`retrieval embed` (meta.json) vs raw timm inference of the same backbone",
    "search": "retrieval.knn.search vs Faiss IndexFlatIP, exact all-vs-all top-k",
    "scaling": "`retrieval train` under accelerate launch, 1 vs 2 (.. N GPUs) processes: weak scaling",
    "search-gpu": "retrieval.knn.torch_search on one GPU, every precision, vs the chunked matmul + top-k floor",
    "recipes": "test Recall@1 / MAP@R of each training recipe (loss, memory, EMA, augmentation), same images",
    "peer": "`retrieval train` vs pytorch-metric-learning's MetricLossOnly trainer: loop, command, test Recall@1",
    "serve-hostile": "`retrieval serve` under 16 clients, alone and with hostile requests: 5xx, 4xx, memory",
}
# whole models trained per row (recipes, peer); a 40 s load that wants the machine to itself (serve-hostile)
NOT_IN_ALL = {"recipes", "peer", "serve-hostile"}
LEVELS = {"tiny": "smallest (the tests)", "quick": "minutes on 2 CPU cores", "full": "real sizes"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    opts = argparse.ArgumentParser(add_help=False)  # after the topic, so overrides may follow the options
    opts.add_argument("--quick", action="store_true", help="small sizes (minutes on 2 CPU cores)")
    opts.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    opts.add_argument("--out", default="bench-out", help="folder for bench-<topic>.json")
    opts.add_argument("--work", help="scratch folder (synthetic shards, runs); default: a temporary folder")
    opts.add_argument("--config", help="experiment YAML for train/embed/scaling (default configs/tiny.yaml)")
    opts.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.classes_per_batch=16")
    sub = p.add_subparsers(dest="topic", required=True, metavar="{" + ",".join([*TOPICS, "all"]) + "}")
    for name, help_ in {**TOPICS, "all": "every topic, each in its own process"}.items():
        sub.add_parser(name, parents=[opts], help=help_, description=help_)


def run(args: argparse.Namespace) -> int:
    from bench import common  # here, not at the top: `bench.scale`'s steps import `bench` without torch

    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(args.work or tmp)
        if args.topic == "all":
            return run_all(args, work)
        opts = common.Options(level, Path(args.out), work, args.config, tuple(args.overrides))
        importlib.import_module(f"bench.{args.topic.replace('-', '_')}").run(opts)
    return 0


def run_all(args: argparse.Namespace, work: Path) -> int:
    """Every topic in a process of its own (the trainer and accelerate leave state behind), sharing ``work``."""
    from bench import common

    start, payloads, failed = time.perf_counter(), {}, []
    flags = [f for f, on in (("--quick", args.quick), ("--tiny", args.tiny)) if on]
    flags += ["--config", args.config] if args.config else []
    for topic in [t for t in TOPICS if (t != "search-gpu" or common.cuda()) and t not in NOT_IN_ALL]:
        cmd = [sys.executable, "-m", "bench", topic, "--out", args.out, "--work", str(work), *flags, *args.overrides]
        sys.stdout.flush()
        result = Path(args.out) / f"bench-{topic}.json"
        result.unlink(missing_ok=True)
        if subprocess.run(cmd, env=common.child_env()).returncode == 0 and result.is_file():
            payloads[topic] = json.loads(result.read_text())
        else:
            failed.append(topic)
    rows = [(t, name, value) for t, p in payloads.items() for name, value in p["ratios"].items()]
    seconds, load = time.perf_counter() - start, [round(x, 2) for x in os.getloadavg()]
    print(f"== bench all: every ratio (ours / baseline), {seconds:.0f} s in all, load average now {load} ==")
    print(common.table(("topic", "ratio", "value"), rows))
    for topic in failed:
        print(f"FAILED {topic}: see its log above")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
