"""Continued training when new products arrive (issue 25's acceptance): the README's table.

    python -m bench.continued --out /tmp/continued          # about 25 minutes on 2 shared cores
    python -m bench.continued --steps 200 --classes 120      # a quick look

Two synthetic catalogues from different seeds: A (the products a model was trained on) and B (new products: each
super class drawn from another archetype, so B's chairs look unlike A's). Every step is the product's own command:
``synth-sop``, ``shards build``, ``shards mix`` + ``shards build --manifest`` for B plus a replay of A, ``train``
(``configs/demo.yaml``, the same number of steps in every run), ``embed`` + ``eval`` on A's and B's test products
(products no run trained on). Four runs:

- A: trained on A;
- A -> B + replay: ``model.init_from`` the A run, trained on B's train products plus 30 % of A's train classes;
- A -> B alone: the same without the replay (what the replay protects against);
- B from scratch: trained on B alone from the seeded init, the comparison row.

Prints the table (Recall@1 on A's and B's test images, train seconds) and writes ``continued.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import CONFIGS, launch_train, retrieval, table


def _catalogue(work: Path, name: str, seed: int, a: argparse.Namespace) -> Path:
    sop, shards = work / f"sop-{name}", work / f"shards-{name}"
    if not (shards / "stats.json").is_file():
        retrieval("synth-sop", sop, "--classes", a.classes, "--images-per-class", "3-8", "--size", 96, "--seed", seed, "--force")  # fmt: skip
        retrieval("shards", "build", "--sop-root", sop, "--out", shards, "--workers", 1, "--val-classes", 0.1)
    return sop


def _mixture(work: Path, new: Path, replay: Path | None, name: str) -> Path:
    shards = work / f"shards-{name}"
    if not (shards / "stats.json").is_file():
        mix = ["shards", "mix", "--new", new, "--new-class-offset", 100_000, "--out", work / f"{name}.csv"]
        retrieval(*mix, *(["--replay", replay, "--replay-classes", 0.3] if replay else []))
        retrieval("shards", "build", "--manifest", work / f"{name}.csv", "--out", shards, "--workers", 1,
                  "--test-classes", 0, "--val-classes", 0.1)  # fmt: skip
    return shards


def _train(work: Path, name: str, shards: Path, a: argparse.Namespace, *extra: str) -> float:
    run = work / f"run-{name}"
    if not (run / "summary.json").is_file():
        overrides = [f"data.shards={shards}", f"data.steps_per_epoch={a.steps // 4}", "train.epochs=4"]
        overrides += ["log.wandb=disabled", "train.log_every=50", *extra]
        t0 = time.perf_counter()
        launch_train(1, CONFIGS / "demo.yaml", run, overrides)
        (run / "bench-seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return float((run / "bench-seconds.txt").read_text())


def _recall(work: Path, run: str, catalogue: str) -> float:
    emb = work / f"run-{run}" / f"emb-{catalogue}"
    if not (emb / "metrics.json").is_file():
        retrieval("embed", "--model", work / f"run-{run}", "--shards", work / f"shards-{catalogue}", "--split", "test",
                  "--out", emb, "--num-workers", 1)  # fmt: skip
        retrieval("eval", "--embeddings", emb)
    return float(json.loads((emb / "metrics.json").read_text())["recall@1"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/retrieval-continued"))
    p.add_argument("--classes", type=int, default=400, help="products of each catalogue (half train, half test)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of every run")
    a = p.parse_args(argv)
    work = a.out
    work.mkdir(parents=True, exist_ok=True)
    sop_a, sop_b = _catalogue(work, "a", 1, a), _catalogue(work, "b", 2, a)
    plus, alone = _mixture(work, sop_b, sop_a, "b-replay"), _mixture(work, sop_b, None, "b-alone")
    seconds = {"A": _train(work, "a", work / "shards-a", a)}
    parent = f"model.init_from={work / 'run-a'}"
    seconds["A -> B + replay of A"] = _train(work, "b-replay", plus, a, parent)
    seconds["A -> B alone"] = _train(work, "b-alone", alone, a, parent)
    seconds["B from scratch"] = _train(work, "b-scratch", work / "shards-b", a)
    names = dict(zip(seconds, ("a", "b-replay", "b-alone", "b-scratch"), strict=True))
    rows = {label: {c: _recall(work, run, c) for c in ("a", "b")} for label, run in names.items()}
    result = {"steps": a.steps, "classes": a.classes, "rows": rows, "train_seconds": seconds}
    (work / "continued.json").write_text(json.dumps(result, indent=1) + "\n")
    headers = ["run", "R@1 A's test products", "R@1 B's test products", "train s"]
    print(table(headers, [[k, f"{v['a']:.4f}", f"{v['b']:.4f}", f"{seconds[k]:.0f}"] for k, v in rows.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
