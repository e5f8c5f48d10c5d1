"""After training: `retrieval search` with new photos of the test products (held-out views that are not in the
catalogue) finds their product clearly more often than the untrained model; the metrics of the trained
embeddings agree with pytorch-metric-learning's AccuracyCalculator.

One tiny SwinV2 is trained here for about a minute on CPU (600 steps on 300 products), so the effect is measured
against the untrained model on the same catalogue (100 test products, ~500 images) and the same 200 new photos.
The thresholds hold on any machine, not on one CPU's trajectory: issue 18 saw a 60-query, +0.15 margin test pass
on one CPU family and fail on another. Spread measured over train.seed 0-4 on this suite's recipe is quoted at
each assertion; on failure the message carries the machine facts that decide float trajectories. The slow test
runs `make demo-long` (~22 min on 2 cores), long enough that the top hit is the query's product for most photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from retrieval import metrics as evaluate
from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet

REPO = Path(__file__).resolve().parents[1]
DEMO_LONG = [  # `make demo-long`
    *("--config", str(REPO / "configs" / "demo_long.yaml")),
    *("--classes", "2700", "--train-classes", "2400", "--query-views", "2"),
]
# multi-similarity, not tiny.yaml's triplet loss: with fused AdamW the triplet recipe collapsed at train.seed 0
# (every embedding within 1e-5 cosine of the others: top-10 0.16 against 0.13 untrained, and R@1 decided by float
# rounding, 1 query of 508 apart from pml's); over seeds 0-4 multi-similarity never did
TRAIN = ["log.wandb=disabled", "data.num_workers=0", "train.epochs=3", "data.steps_per_epoch=200", "train.eval_every=0"]
TRAIN += ["loss.name=multi_similarity"]


def machine() -> str:
    """What decides a float trajectory on CPU, for the failure message: CPU model, ISA, threads, versions."""
    import platform

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    return (
        f"cpu={cpu!r} isa={torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} numpy={np.__version__} python={platform.python_version()}"
    )


def _ok(argv: list[str]) -> None:
    assert main(argv) == 0, argv


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Catalogue with 2 held-out photos per test product; a trained and an untrained index of its test split."""
    root = tmp_path_factory.mktemp("trained-search")
    sop, shards, run = root / "sop", root / "shards", root / "run"
    synth = ["synth-sop", str(sop), "--classes", "400", "--train-classes", "300", "--images-per-class", "4-6"]
    _ok([*synth, "--size", "64", "--query-views", "2"])
    _ok(["shards", "build", "--sop-root", str(sop), "--out", str(shards), "--shard-size", "100", "--val-classes", "10"])
    _ok(["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run), *TRAIN])
    out = {"sop": sop, "run": run}
    for name, model in (("trained", [str(run)]), ("untrained", [TINY, "--untrained"])):
        emb, index = root / f"emb-{name}", root / f"index-{name}"
        split = ["--shards", str(shards), "--split", "test", "--out", str(emb), "--num-workers", "0"]
        _ok(["embed", "--model", *model, *split])
        _ok(["index", "build", "--embeddings", str(emb), "--out", str(index)])
        out |= {f"emb-{name}": emb, f"index-{name}": index}
    return out


def _search(index: Path, queries: Path, capsys) -> dict:
    capsys.readouterr()
    _ok(["search", "--index", str(index), "--queries", str(queries), "--k", "10", "--json"])
    return json.loads(capsys.readouterr().out)


def test_new_photos_find_their_product_after_training(world, capsys):
    queries = world["sop"] / "queries.txt"
    trained = _search(world["index-trained"], queries, capsys)
    untrained = _search(world["index-untrained"], queries, capsys)
    t, u = trained["summary"], untrained["summary"]
    assert t["queries"] == u["queries"] == 200  # 100 test products x 2 new photos
    # every query carries its truth, and the summary counts exactly the queries whose top hit is of that class
    top1 = np.mean([q["results"][0]["class_id"] == q["query_class_id"] for q in trained["queries"]])
    assert t["top1_same_class"] == pytest.approx(top1)
    # one of the top 10 is the product: untrained 0.13; trained 0.42 / 0.335 / 0.365 / 0.32 / 0.255 for train.seed
    # 0-4 (+0.125 to +0.29; seed 4 learns least), measured on a 2-core Xeon: the margin holds at the weakest seed
    assert t["topk_any_same_class"] >= u["topk_any_same_class"] + 0.05, (t, u, machine())
    assert all(h["path"] and not h["path"].startswith("queries/") for q in trained["queries"] for h in q["results"])


def test_trained_metrics_agree_with_pml(world):
    trained = EmbeddingSet.load(world["emb-trained"])
    emb, labels = trained.vectors32(), trained.labels
    ours = evaluate.retrieval_metrics(emb, labels)
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    t, lt = torch.from_numpy(emb), torch.from_numpy(labels)
    ref = calc.get_accuracy(t, lt, t, lt, ref_includes_query=True)
    assert abs(ours["recall@1"] - ref["precision_at_1"]) < 1e-6
    assert abs(ours["r_precision"] - ref["r_precision"]) < 1e-6
    assert abs(ours["map@r"] - ref["mean_average_precision_at_r"]) < 1e-6
    untrained = evaluate.retrieval_metrics(EmbeddingSet.load(world["emb-untrained"]).vectors32(), labels)
    # MAP@R over the whole test split (~500 queries, a steadier statistic than 200 photos' top hits): untrained
    # 0.0073; trained 0.0271 / 0.0189 / 0.0268 / 0.0203 / 0.0178 for train.seed 0-4 (x2.4 to x3.7)
    assert ours["map@r"] >= 1.25 * untrained["map@r"], (ours["map@r"], untrained["map@r"], machine())


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~22 min on 2 cores; the suite's default is 600 s
def test_long_cpu_training_finds_the_product_first(tmp_path, capsys):
    """`make demo-long`: after ~22 min of training on 2 CPU cores most new photos find their own product first."""
    assert main(["demo", *DEMO_LONG, "--out", str(tmp_path)]) == 0
    trained = json.loads((tmp_path / "run" / "search-queries.json").read_text())["summary"]
    _ok(["index", "build", "--embeddings", str(tmp_path / "emb-untrained"), "--out", str(tmp_path / "index-untrained")])
    untrained = _search(tmp_path / "index-untrained", tmp_path / "sop" / "queries.txt", capsys)["summary"]
    assert trained["queries"] == untrained["queries"] == 600  # 300 test products x 2 new photos
    assert trained["top1_same_class"] > 0.5, trained  # measured 0.565 with foreach AdamW, 0.745 fused (the default)
    assert untrained["top1_same_class"] < 0.05, untrained  # measured 0.007
