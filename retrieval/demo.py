"""The whole product in miniature: ``make demo`` (or ``python -m retrieval.demo``).

synthetic SOP-format catalogue -> shards (+ verify) -> untrained baseline -> 2-process training with
``accelerate launch`` -> rank-sharded embedding -> Faiss index -> SOP evaluation -> image search with new
photos of the test products (held-out views, not in the catalogue) -> HTML report.
On a CUDA machine the same command trains and embeds on the GPU(s). Prints a table shaped like the
seed's and writes the rows to ``runs/demo/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

DEMO_OVERRIDES = ["train.eval_every=1", "train.log_every=25", "log.wandb=offline"]


def _sh(cmd: list[str], label: str, env: dict | None = None, stdout: Path | None = None) -> float:
    print(f"\n==> {label}\n    $ {' '.join(cmd)}" + (f" > {stdout}" if stdout else ""), flush=True)
    start = time.perf_counter()
    with open(stdout, "w") if stdout else contextlib.nullcontext() as out:
        subprocess.run(cmd, check=True, env=env, stdout=out)
    return time.perf_counter() - start


def _workers() -> int:
    import os

    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(nproc: int) -> list[str]:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [
        accelerate,
        "launch",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
    ]
    if nproc > 1:
        cmd.append("--multi_gpu")
    return cmd + ["-m", "retrieval"]


def _env(cpu: bool) -> dict:
    import os

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if cpu:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return env


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="retrieval.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--train-classes", type=int, help="train classes of --classes (default: half)")
    p.add_argument("--images-per-class", default="3-8")
    p.add_argument("--query-views", type=int, default=1, help="new photos per test product searched at the end")
    p.add_argument("--size", type=int, default=96, help="synthetic image side in pixels")
    p.add_argument("--nproc", type=int, default=0, help="training processes (default: GPUs, else 2 on CPU)")
    p.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    cpu = not torch.cuda.is_available()
    nproc = args.nproc or (2 if cpu else torch.cuda.device_count())
    env, py = _env(cpu), [sys.executable, "-m", "retrieval"]
    sop, shards, run = out / "sop", out / "shards", out / "run"
    overrides = DEMO_OVERRIDES + list(args.overrides)
    t0 = time.perf_counter()
    times = {}
    if not (sop / "Ebay_test.txt").is_file():
        times["synth"] = _sh(
            py
            + [
                "synth-sop",
                str(sop),
                "--classes",
                str(args.classes),
                "--images-per-class",
                args.images_per_class,
                "--seed",
                "0",
                "--size",
                str(args.size),
                "--query-views",
                str(args.query_views),
                "--workers",
                str(_workers()),
                *(["--train-classes", str(args.train_classes)] if args.train_classes is not None else []),
            ],
            "synthetic catalogue",
            env,
        )
    times["shards"] = _sh(
        py
        + [
            "shards",
            "build",
            "--sop-root",
            str(sop),
            "--out",
            str(shards),
            "--workers",
            str(_workers()),
            "--shard-size",
            "300",
            "--val-classes",
            "0.15",
            "--max-side",
            str(args.size),
        ],
        "shards",
        env,
    )
    _sh(py + ["shards", "verify", str(shards)], "verify shards", env)
    base = out / "emb-untrained"
    times["untrained"] = _sh(
        py
        + [
            "embed",
            "--model",
            args.config,
            "--untrained",
            "--shards",
            str(shards),
            "--split",
            "test",
            "--out",
            str(base),
            "--num-workers",
            "2" if cpu else str(_workers()),
        ],
        "untrained model",
        env,
    )
    _sh(py + ["eval", "--embeddings", str(base)], "evaluate untrained", env)
    launch = _launcher(nproc)
    shutil.rmtree(run, ignore_errors=True)  # the data above is reused; the run is trained afresh
    times["train"] = _sh(
        launch + ["train", "--config", args.config, "--shards", str(shards), "--run-dir", str(run), *overrides],
        f"train ({nproc} processes)",
        env,
    )
    emb = run / "emb-test"
    times["embed"] = _sh(
        launch
        + [
            "embed",
            "--model",
            str(run),
            "--shards",
            str(shards),
            "--split",
            "test",
            "--out",
            str(emb),
            "--num-workers",
            "1" if cpu else str(_workers()),
        ],
        f"embed test split ({nproc} processes)",
        env,
    )
    _sh(py + ["index", "build", "--embeddings", str(emb), "--out", str(run / "index")], "index", env)
    _sh(py + ["eval", "--embeddings", str(emb)], "evaluate fine-tuned", env)
    if (sop / "queries.txt").is_file():
        search = py + ["search", "--index", str(run / "index"), "--queries", str(sop / "queries.txt"), "--k", "10"]
        found = run / "search-queries.json"  # every query's top 10 and the summary (bench/gpu_check.sh keeps it)
        times["search"] = _sh(search + ["--json"], "search the index with new photos of the test products", env, found)
        hits = json.loads(found.read_text())["summary"]
        print(
            f"{hits['queries']} new photos: the top hit is of the query's product for {100 * hits['top1_same_class']:.2f}%, "
            f"one of the top 10 for {100 * hits['topk_any_same_class']:.2f}%"
        )
    rows = _results(args.config, base, emb)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    shutil.copy(out / "results.json", run / "results.json")
    _sh(py + ["report", str(run), "--embeddings", str(emb), "--embeddings", str(base)], "report", env)
    _print(rows, run, time.perf_counter() - t0, times)
    return 0


def _results(config: str, untrained: Path, finetuned: Path) -> list[dict]:
    from retrieval.config import load_config

    arch = load_config(config).model.name
    rows = []
    for training, folder in (("untrained", untrained), ("finetuned", finetuned)):
        metrics = json.loads((folder / "metrics.json").read_text())
        rows.append({"architecture": arch, "training": training, "loss": "triplet", **metrics})
    return rows


def _print(rows: list[dict], run: Path, seconds: float, times: dict) -> None:
    from retrieval.evaluate import print_table

    print("\n" + "=" * 100)
    print_table(rows)
    print(f"\nreport: {run / 'report.html'}")
    print(f"results: {run.parent / 'results.json'}")
    print("wall time: " + f"{seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")


if __name__ == "__main__":
    sys.exit(main())
