"""``retrieval bench <what>``: throughput benchmarks that compare our code with a plain baseline in the same run.

    retrieval bench all --quick --out /tmp/bench        # every topic, small sizes (< 5 min on 2 CPU cores)
    retrieval bench train --out bench-out                # trainer vs raw timm (CUDA: both SwinV2-B recipes)
    retrieval bench train --config configs/x.yaml data.classes_per_batch=16
    retrieval bench scaling --quick                      # 1 vs N processes of the real trainer
    bash bench/gpu_check.sh                              # the one-shot GPU check (prints versions first)

Topics: ``loader`` (streaming decode + augment vs raw JPEG decode), ``shards`` (builder vs PIL loop),
``train`` (trainer vs raw timm forward+backward+AdamW), ``embed`` (``embed_split`` vs raw timm inference),
``search`` (exact top-k backends), ``scaling`` (weak scaling of the trainer over processes).
Each prints a table and writes ``OUT/bench-<what>.json``: machine, versions, device, config, and for every
measured item its median, p10/p90, min/max, repeats and warm-up count, then the ratios (ours / baseline).
Each topic module exposes ``run_bench(quick: bool, out_dir: Path) -> dict``; this dispatcher adds what a
module's payload lacks (machine, versions) so every JSON has the same envelope.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOPICS = ("loader", "shards", "train", "embed", "search", "scaling")
OURS = ("train", "embed", "scaling")  # topics that accept config/overrides/work/tiny (modules of this package)


HELP = {
    "loader": "streaming decode + train transforms, 0..N workers, vs raw JPEG decode",
    "shards": "shard builder images/s vs a plain PIL decode -> resize -> encode loop",
    "train": "trainer step vs raw timm forward+backward+AdamW (CUDA: both SwinV2-B recipes)",
    "embed": "embed_split vs raw timm inference of the same model and batch",
    "search": "exact top-k backends at N x N x d vs Faiss IndexFlatIP",
    "scaling": "1, 2, ... processes of the real trainer: weak-scaling efficiency",
    "all": "every topic in turn, each in its own process",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # One subparser per topic so that dotted overrides may follow the options (`train --quick data.x=1`).
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--quick", action="store_true", help="small sizes: tiny model, few steps, small search")
    opts.add_argument("--out", default="bench-out", help="folder for bench-<what>.json and PNG curves")
    opts.add_argument(
        "--config",
        help="experiment YAML for train/embed/scaling (default: configs/tiny.yaml on CPU; "
        "on CUDA both SwinV2-B recipes are added)",
    )
    opts.add_argument(
        "--no-trainer",
        action="store_true",
        help="train/embed: model-side figures only (no shards, no full trainer run)",
    )
    opts.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smaller than --quick: the tests
    opts.add_argument("--work", help=argparse.SUPPRESS)  # scratch folder shared by the topics of `all`
    opts.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.classes_per_batch=16")
    sub = p.add_subparsers(dest="what", required=True, metavar="{" + ",".join((*TOPICS, "all")) + "}")
    for name in (*TOPICS, "all"):
        sub.add_parser(name, parents=[opts], help=HELP[name], description=HELP[name])


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        if args.what != "all":
            run_topic(args.what, args, out, work)
            return 0
        return run_all(args, out, work)


def run_all(args: argparse.Namespace, out: Path, work: Path) -> int:
    """Every topic in its own process, one after the other, sharing ``work`` (synthetic shards).

    Separate processes because topics leave state behind in-process: the trainer installs SIGTERM/SIGUSR1
    handlers, accelerate keeps a global state, and a process pool forked from a process with running
    torch threads can deadlock (seen with the shard builder after the loader benchmark).
    """
    start = time.perf_counter()
    payloads: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for what in TOPICS:
        cmd = [sys.executable, "-m", "retrieval", "bench", what, "--out", str(out), "--work", str(work)]
        cmd += [
            flag
            for flag, on in (("--quick", args.quick), ("--tiny", args.tiny), ("--no-trainer", args.no_trainer))
            if on
        ]
        cmd += ["--config", args.config] if args.config else []
        cmd += list(args.overrides)
        sys.stdout.flush()
        rc = subprocess.run(cmd).returncode
        result = out / f"bench-{what}.json"
        if rc == 0 and result.is_file():
            payloads[what] = json.loads(result.read_text())
        else:
            failures[what] = f"exit code {rc}; see its log above"
    print(summary(payloads, failures, time.perf_counter() - start))
    return 1 if failures else 0


def run_topic(what: str, args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    """Run one topic with the arguments it takes; the topic writes its JSON and prints its table."""
    try:
        module = importlib.import_module(f"retrieval.bench.{what}")
    except ModuleNotFoundError as e:
        if e.name != f"retrieval.bench.{what}":
            raise
        raise RuntimeError(f"retrieval/bench/{what}.py is not there (yet)") from None
    kwargs: dict[str, Any] = {}
    params = inspect.signature(module.run_bench).parameters
    if what in OURS:
        kwargs.update(config=args.config, overrides=tuple(args.overrides), work=work)
        if what != "scaling":
            kwargs["trainer"] = not args.no_trainer
    elif args.config or args.overrides:
        log.warning("bench %s: --config/overrides do not apply to this topic; ignored", what)
    if "tiny" in params:
        kwargs["tiny"] = args.tiny
    if "work" in params:  # shards made once in `work` serve every topic of `bench all`
        kwargs["work"] = work
    return module.run_bench(args.quick or args.tiny, out, **kwargs)  # writes bench-<what>.json, prints its table


def summary(payloads: dict[str, dict], failures: dict[str, str], seconds: float) -> str:
    from retrieval.bench.common import format_table

    rows = []
    for what, payload in payloads.items():
        goals = payload.get("goals") or {}
        for name, value in (payload.get("ratios") or {}).items():
            rows.append((what, name, value, goals.get(name)))
    from retrieval.bench.common import load_average

    text = [
        f"== bench all: every ratio (ours / baseline), {seconds:.0f} s in all, load average now {load_average()} ==",
        format_table(("topic", "ratio", "value", "goal"), rows),
    ]
    text += [f"FAILED {what}: {why}" for what, why in failures.items()]
    return "\n".join(text)
