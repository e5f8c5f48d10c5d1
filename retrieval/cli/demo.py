"""``retrieval demo`` (``make demo``): the whole product in miniature.

synthetic SOP-format catalogue -> shards (+ verify) -> untrained baseline -> [pretrained (zero-shot) baseline] ->
2-process training with ``accelerate launch`` -> rank-sharded embedding -> Faiss index -> SOP evaluation -> image
search with new photos of the test products (held-out views, not in the catalogue) -> HTML report.
On a CUDA machine the same command trains and embeds on the GPU(s). Prints a table shaped like the
seed's (untrained, pretrained (zero-shot), fine-tuned) and writes the rows to ``runs/demo/results.json``. Every
step is the real command in a child process.

The zero-shot row needs pretrained weights of the config's architecture: ``--pretrained-file W`` (local) or
``--pretrained`` (timm's hub or its cache). The demo's tiny SwinV2 (64 px, a 24-dim stem) has none anywhere, and
it trains from scratch, so by default the row is reported as not measured rather than made up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retrieval import dist
from retrieval.cli._args import old_spelling
from retrieval.config.io import load_config
from retrieval.metrics import print_table
from retrieval.run_folder import RunFolder

DEMO_OVERRIDES = ["train.eval_every=1", "train.log_every=25", "log.wandb=offline"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--train-classes", type=int, help="train classes of --classes (default: half)")
    p.add_argument("--images-per-class", default="3-8")
    p.add_argument("--query-views", type=int, default=1, help="new photos per test product searched at the end")
    p.add_argument("--size", type=int, default=96, help="synthetic image side in pixels")
    p.add_argument("--processes", type=int, default=0, help="training processes (default: GPUs, else 2 on CPU)")
    old_spelling(p, "--nproc", "--processes", "processes", type=int)
    p.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    p.add_argument("--pretrained", action="store_true", help="zero-shot row: the architecture's hub weights")
    p.add_argument("--pretrained-file", help="zero-shot row: a local weights file of the config's architecture")
    p.add_argument("overrides", nargs="*")


@dataclass
class Demo:
    """The demo's folders, launch settings and the seconds each step took."""

    args: argparse.Namespace
    cpu: bool = field(default_factory=lambda: not torch.cuda.is_available())
    times: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.args.out)
        self.sop, self.shards, self.run = self.out / "sop", self.out / "shards", self.out / "run"
        self.base, self.emb = self.out / "emb-untrained", self.run / "emb-test"
        self.zero_shot = self.out / "emb-zero-shot"
        self.nproc = self.args.processes or (2 if self.cpu else torch.cuda.device_count())
        self.env = dist.launch_env(self.cpu)
        self.workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))

    def sh(self, args: list[str], label: str, nproc: int = 0, stdout: Path | None = None) -> float:
        """Run ``retrieval ARGS`` (under ``accelerate launch`` when ``nproc``) and return its seconds."""
        cmd = dist.accelerate_command(nproc, args) if nproc else [sys.executable, "-m", "retrieval", *args]
        print(f"\n==> {label}\n    $ {' '.join(cmd)}" + (f" > {stdout}" if stdout else ""), flush=True)
        start = time.perf_counter()
        with open(stdout, "w") if stdout else contextlib.nullcontext() as out:
            subprocess.run(cmd, check=True, env=self.env, stdout=out)
        return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    demo = Demo(args)
    if args.fresh:
        shutil.rmtree(demo.out, ignore_errors=True)
    t0 = time.perf_counter()
    _data(demo)
    _baseline(demo)
    zero_shot = _zero_shot(demo)
    _train_and_embed(demo)
    _search(demo)
    rows = _results(args.config, demo.base, zero_shot, demo.emb, RunFolder(demo.run).read_config().loss.name)
    (demo.out / "results.json").write_text(json.dumps(rows, indent=1))
    shutil.copy(demo.out / "results.json", demo.run / "results.json")
    report = ["report", "--run-dir", str(demo.run), "--embeddings", str(demo.emb), "--embeddings", str(demo.base)]
    report += ["--embeddings", str(zero_shot)] if zero_shot else []
    demo.sh(report, "report")
    _print(rows, demo.run, time.perf_counter() - t0, demo.times)
    return 0


def _data(demo: Demo) -> None:
    a = demo.args
    if not (demo.sop / "Ebay_test.txt").is_file():
        synth = ["synth-sop", str(demo.sop), "--classes", str(a.classes), "--images-per-class", a.images_per_class]
        synth += ["--seed", "0", "--size", str(a.size), "--query-views", str(a.query_views)]
        synth += ["--workers", str(demo.workers)]
        synth += ["--train-classes", str(a.train_classes)] if a.train_classes is not None else []
        demo.times["synth"] = demo.sh(synth, "synthetic catalogue")
    build = ["shards", "build", "--sop-root", str(demo.sop), "--out", str(demo.shards), "--workers", str(demo.workers)]
    build += ["--shard-size", "300", "--val-classes", "0.15", "--max-side", str(a.size)]
    demo.times["shards"] = demo.sh(build, "shards")
    demo.sh(["shards", "verify", str(demo.shards)], "verify shards")


def _baseline(demo: Demo) -> None:
    embed = ["embed", "--model", demo.args.config, "--untrained", "--shards", str(demo.shards), "--split", "test"]
    embed += ["--out", str(demo.base), "--workers", "2" if demo.cpu else str(demo.workers)]
    demo.times["untrained"] = demo.sh(embed, "untrained model")
    demo.sh(["eval", "--embeddings", str(demo.base)], "evaluate untrained")


def _zero_shot(demo: Demo) -> Path | None:
    """The seed's "pretrained" row: the config's architecture with pretrained weights, no training, no projection."""
    a = demo.args
    weights = ["--pretrained-file", a.pretrained_file] if a.pretrained_file else ["--pretrained"] * a.pretrained
    if not weights:
        return None
    embed = ["embed", "--model", a.config, *weights, "--shards", str(demo.shards), "--split", "test"]
    embed += ["--out", str(demo.zero_shot), "--workers", "2" if demo.cpu else str(demo.workers)]
    demo.times["zero-shot"] = demo.sh(embed, "pretrained model, zero-shot")
    demo.sh(["eval", "--embeddings", str(demo.zero_shot)], "evaluate pretrained (zero-shot)")
    return demo.zero_shot


def _train_and_embed(demo: Demo) -> None:
    a, n = demo.args, demo.nproc
    shutil.rmtree(demo.run, ignore_errors=True)  # the data above is reused; the run is trained afresh
    train = ["train", "--config", a.config, "--shards", str(demo.shards), "--run-dir", str(demo.run)]
    demo.times["train"] = demo.sh(train + DEMO_OVERRIDES + list(a.overrides), f"train ({n} processes)", nproc=n)
    embed = ["embed", "--model", str(demo.run), "--shards", str(demo.shards), "--split", "test", "--out", str(demo.emb)]
    embed += ["--workers", "1" if demo.cpu else str(demo.workers)]
    demo.times["embed"] = demo.sh(embed, f"embed test split ({n} processes)", nproc=n)
    demo.sh(["index", "build", "--embeddings", str(demo.emb), "--out", str(demo.run / "index")], "index")
    demo.sh(["eval", "--embeddings", str(demo.emb)], "evaluate fine-tuned")


def _search(demo: Demo) -> None:
    queries = demo.sop / "queries.txt"
    if not queries.is_file():
        return
    search = ["search", "--index", str(demo.run / "index"), "--queries", str(queries), "--k", "10", "--json"]
    found = demo.run / "search-queries.json"  # every query's top 10 and the summary (bench/gpu_check.sh keeps it)
    demo.times["search"] = demo.sh(search, "search the index with new photos of the test products", stdout=found)
    hits = json.loads(found.read_text())["summary"]
    print(
        f"{hits['queries']} new photos: the top hit is of the query's product for {100 * hits['top1_same_class']:.2f}%, "
        f"one of the top 10 for {100 * hits['topk_any_same_class']:.2f}%"
    )


def _results(config: str, untrained: Path, zero_shot: Path | None, finetuned: Path, loss: str) -> list[dict]:
    arch = load_config(config).model.name
    rows = []
    folders = [("untrained", untrained), ("pretrained (zero-shot)", zero_shot), ("finetuned", finetuned)]
    for training, folder in [(t, f) for t, f in folders if f is not None]:
        metrics = json.loads((folder / "metrics.json").read_text())
        rows.append(
            {"architecture": arch, "training": training, "loss": loss if training == "finetuned" else "-", **metrics}
        )
    return rows


def _print(rows: list[dict], run: Path, seconds: float, times: dict) -> None:
    print("\n" + "=" * 100)
    print_table(rows)
    if not any(r["training"].startswith("pretrained") for r in rows):
        print(
            "pretrained (zero-shot): not measured: no pretrained weights of this architecture here "
            "(retrieval demo --pretrained-file W, or --pretrained with the hub or its cache)"
        )
    print(f"\nreport: {run / 'report.html'}")
    print(f"results: {run.parent / 'results.json'}")
    print("wall time: " + f"{seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")


def main(argv: list[str] | None = None) -> int:
    """``python -m retrieval.cli.demo [args]``: the same as ``retrieval demo``."""
    from retrieval.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
