"""The feedback round trip (issue 25's acceptance): simulated users judge search results through ``POST /feedback``,
``retrieval feedback export`` turns the log into training input, a continued run trains on it.

    python -m bench.feedback --out /tmp/feedback        # about 25 minutes on 2 shared cores

The demo's catalogue (``synth-sop`` as ``retrieval demo`` draws it: 600 products, 3-8 photos, 96 px) with two new
photos of every test product that are in no split (``--query-views 2``). A model is trained on the train products
(``configs/demo.yaml``); the test products are the catalogue (``embed`` + ``index build``), served by ``retrieval
serve --feedback-dir``. Users are simulated from the ground truth: each new photo (view 0) is searched (top 10); the
first result of its own product is judged "the same", and the results of other products ranked above it "not the
same" (at most two), until ``--same`` and ``--not-same`` judgements are in. Then ``feedback export`` (with the index and
the catalogue's photos), ``shards mix`` (the export plus a replay of half the train products) + ``shards build``, and
a continued run (``model.init_from``, ``data.hard_negatives``); beside it the same continued run on the replay alone,
without the feedback. Measured for each model, on its own re-embedded catalogue:

- R@1 of the judged products' held-out photos (view 1: never judged, never trained on) searching the catalogue;
- R@1 inside the catalogue (the SOP protocol) over the judged products' images, and over the other test products'.

Writes ``feedback.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from bench.common import CONFIGS, child_env, launch_train, retrieval, table
from bench.serve import wait_until_served
from retrieval.data.sop import read_sop_file
from retrieval.embed.embedder import Embedder
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.util import free_port


def _prepare(work: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    sop, shards, run = work / "sop", work / "shards", work / "run-base"
    if not (shards / "stats.json").is_file():
        retrieval("synth-sop", sop, "--classes", a.classes, "--images-per-class", "3-8", "--size", 96, "--seed", 0,
                  "--query-views", 2, "--force")  # fmt: skip
        retrieval("shards", "build", "--sop-root", sop, "--out", shards, "--workers", 1, "--val-classes", 0.1)
    _train(run, shards, a.steps)
    return sop, _catalogue(run, shards)


def _train(run: Path, shards: Path, steps: int, *extra: str) -> None:
    if (run / "summary.json").is_file():
        return
    overrides = [f"data.shards={shards}", f"data.steps_per_epoch={steps // 4}", "train.epochs=4"]
    launch_train(1, CONFIGS / "demo.yaml", run, [*overrides, "log.wandb=disabled", "train.log_every=50", *extra])


def _catalogue(run: Path, shards: Path) -> Path:
    """The test products embedded by ``run``'s model and indexed (Flat): the catalogue users search."""
    emb, index = run / "emb-test", run / "index"
    if not (index / "index.json").is_file():
        retrieval("embed", "--model", run, "--shards", shards, "--split", "test", "--out", emb, "--num-workers", 1)
        retrieval("index", "build", "--embeddings", emb, "--out", index, "--gpu", "none")
    return index


def simulate(url: str, sop: Path, same: int, not_same: int, seed: int = 0) -> dict:
    """Judge results of view-0 photos from the ground truth until ``same`` / ``not_same`` judgements are in."""
    queries = [r for r in read_sop_file(sop / "queries.txt") if r.path.endswith("_q0.JPG")]
    random.Random(seed).shuffle(queries)
    counts = {"same": 0, "not_same": 0, "queries": 0, "judged_products": set()}
    with httpx.Client(timeout=120) as http:
        for q in queries:
            if counts["same"] >= same and counts["not_same"] >= not_same:
                break
            path = str((sop / q.path).resolve())
            hits = http.post(f"{url}/search", json={"path": path, "k": 10}).json()["queries"][0]["results"]
            first = next((i for i, h in enumerate(hits) if h["class_id"] == q.class_id), None)
            judged = [(h, False) for h in hits[: first if first is not None else 1][-2:]]
            judged += [(hits[first], True)] if first is not None else []
            counts["queries"] += 1
            for hit, is_same in judged:
                key = "same" if is_same else "not_same"
                if counts[key] >= (same if is_same else not_same):
                    continue
                body = {"path": path, "result_id": hit["image_id"], "same": is_same}
                http.post(f"{url}/feedback", json=body).raise_for_status()
                counts[key] += 1
                counts["judged_products"].add(q.class_id) if is_same else None
    return {**counts, "judged_products": sorted(counts["judged_products"])}


def recall(run: Path, shards: Path, sop: Path, products: set[int]) -> dict[str, float]:
    """R@1 of ``run``'s model: held-out photos (view 1) of ``products``, and inside its catalogue (judged, other)."""
    emb = _catalogue(run, shards).parent / "emb-test"
    es = EmbeddingSet.load(emb)
    x = es.vectors32()
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    top = es.labels[sim.argmax(1)] == es.labels
    judged = np.isin(es.labels, sorted(products))
    held = [r for r in read_sop_file(sop / "queries.txt") if r.path.endswith("_q1.JPG") and r.class_id in products]
    q = Embedder.load(run).embed([str(sop / r.path) for r in held])
    found = es.labels[(q @ x.T).argmax(1)] == np.array([r.class_id for r in held])
    return {"held_out_photos": float(found.mean()), "catalogue_judged": float(top[judged].mean()),
            "catalogue_other": float(top[~judged].mean()), "held_out_n": len(held)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/retrieval-feedback"))
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of the base run")
    p.add_argument("--continued-steps", type=int, default=400, help="optimizer steps of each continued run")
    p.add_argument("--same", type=int, default=200)
    p.add_argument("--not-same", type=int, default=200)
    a = p.parse_args(argv)
    work = a.out
    work.mkdir(parents=True, exist_ok=True)
    sop, index = _prepare(work, a)
    judgements = _judge(work, sop, index, a)
    export = _export_and_continue(work, sop, index, a)
    products = set(judgements["judged_products"])
    rows = {
        name: recall(work / f"run-{name}", work / "shards", sop, products) for name in ("base", "feedback", "replay")
    }
    result = {"judgements": judgements, "export": export, "rows": rows, "args": {k: str(v) for k, v in vars(a).items()}}
    (work / "feedback.json").write_text(json.dumps(result, indent=1) + "\n")
    labels = {
        "base": "before (the served model)",
        "feedback": "continued, with the feedback",
        "replay": "continued, without",
    }
    headers = ["model", "R@1 judged products' new photos", "R@1 judged products (catalogue)", "R@1 other products"]
    print(table(headers, [[labels[k], f"{v['held_out_photos']:.4f}", f"{v['catalogue_judged']:.4f}",
                           f"{v['catalogue_other']:.4f}"] for k, v in rows.items()]))  # fmt: skip
    return 0


def _judge(work: Path, sop: Path, index: Path, a: argparse.Namespace) -> dict:
    done = work / "judgements.json"
    if not done.is_file():
        port = free_port()
        cmd = [sys.executable, "-m", "retrieval", "serve", "--index", str(index), "--port", str(port)]
        cmd += ["--feedback-dir", str(work / "feedback"), "--path-root", str(sop)]
        proc = subprocess.Popen(cmd, env=child_env())
        try:
            wait_until_served(f"http://127.0.0.1:{port}/healthz", proc)
            done.write_text(json.dumps(simulate(f"http://127.0.0.1:{port}", sop, a.same, a.not_same)) + "\n")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return json.loads(done.read_text())


def _export_and_continue(work: Path, sop: Path, index: Path, a: argparse.Namespace) -> dict:
    fb = work / "fb"
    if not (fb / "summary.json").is_file():
        retrieval("feedback", "export", "--log", work / "feedback", "--index", index, "--images-root", sop, "--out", fb)
    for name, new in (("feedback", ["--new", fb / "feedback.csv"]), ("replay", [])):
        shards = work / f"shards-{name}"
        if not (shards / "stats.json").is_file():
            retrieval("shards", "mix", *new, "--replay", sop, "--replay-classes", 0.5, "--out", work / f"{name}.csv")
            retrieval("shards", "build", "--manifest", work / f"{name}.csv", "--out", shards, "--workers", 1,
                      "--test-classes", 0, "--val-classes", 10)  # fmt: skip
        extra = [f"model.init_from={work / 'run-base'}", "data.class_pool=1024", "train.select_metric=last"]
        extra += [f"data.hard_negatives={fb / 'hard_negatives.tsv'}"] if name == "feedback" else []
        _train(work / f"run-{name}", shards, a.continued_steps, *extra)
    return json.loads((fb / "summary.json").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
