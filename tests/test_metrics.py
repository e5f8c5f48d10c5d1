"""SOP metrics against pytorch-metric-learning's AccuracyCalculator and an independent brute force."""

import json

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from retrieval import metrics as evaluate
from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet


def _random(n: int = 600, d: int = 16, classes: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def _clustered(classes: int = 80, d: int = 16, seed: int = 1):
    """SOP-like: 1..12 images per class (singletons included) around a class centre."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, classes)
    centres = rng.standard_normal((classes, d))
    labels = np.repeat(np.arange(classes), sizes)
    x = (centres[labels] + 0.6 * rng.standard_normal((len(labels), d))).astype(np.float32)
    perm = rng.permutation(len(labels))
    x, labels = x[perm], labels[perm]
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def _pml(x, labels):
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    t, lt = torch.from_numpy(x), torch.from_numpy(labels)
    return calc.get_accuracy(t, lt, t, lt, ref_includes_query=True)


@pytest.mark.parametrize("make", [_random, _clustered], ids=["random", "clustered"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_agrees_with_pml(make, backend):
    x, labels = make()
    ours = evaluate.retrieval_metrics(x, labels, backend=backend)
    ref = _pml(x, labels)
    assert abs(ours["recall@1"] - ref["precision_at_1"]) < 1e-6
    assert abs(ours["r_precision"] - ref["r_precision"]) < 1e-6
    assert abs(ours["map@r"] - ref["mean_average_precision_at_r"]) < 1e-6
    assert ours["num_queries"] + ours["num_excluded"] == len(labels)


def _brute_metrics(x, labels, ks):
    """Independent float64 implementation, loop per query."""
    s = x.astype(np.float64) @ x.astype(np.float64).T
    out = {f"recall@{k}": [] for k in ks} | {"seed_map": [], "map@r": []}
    for i in range(len(x)):
        r = int((labels == labels[i]).sum()) - 1
        if r == 0:
            continue
        order = [j for j in np.argsort(-s[i], kind="stable") if j != i]
        rel = labels[order] == labels[i]
        for k in ks:
            out[f"recall@{k}"].append(rel[:k].any())
        hits = np.flatnonzero(rel[: max(ks)])
        out["seed_map"].append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
        out["map@r"].append(sum((rel[: p + 1].sum() / (p + 1)) for p in range(r) if rel[p]) / r)
    return {key: float(np.mean(v)) for key, v in out.items()}


def test_recall_and_seed_map_brute_force():
    x, labels = _clustered(classes=60, seed=3)
    ks = (1, 5, 20, 100)
    ours = evaluate.retrieval_metrics(x, labels, ks=ks, backend="torch")
    ref = _brute_metrics(x, labels, ks)
    for key, v in ref.items():
        assert abs(ours[key] - v) < 1e-9, key
    assert 0 <= ours["map@100"] <= 1


def test_singletons_are_excluded_and_counted():
    x, _ = _random(n=10)
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    m = evaluate.retrieval_metrics(x, labels, ks=(1, 1000))
    assert m["num_excluded"] == 3 and m["num_queries"] == 7
    assert m["recall@1000"] == 1.0 and m["k"] == 9


def _write(tmp_path, x, labels):
    n = len(labels)
    return EmbeddingSet(x, np.arange(1, n + 1), labels, np.zeros(n, np.int64)).save(tmp_path)


KEYS = {"recall@1", "recall@10", "recall@100", "recall@1000", "map@r", "r_precision", "seed_map", "num_queries"}


def test_cli_writes_metrics(tmp_path, capsys):
    x, labels = _clustered()
    emb = tmp_path / "emb"
    emb.mkdir()
    _write(emb, x, labels)
    assert main(["eval", "--embeddings", str(emb), "--out", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert KEYS <= set(m)
    assert all(0 <= m[k] <= 1 for k in KEYS - {"num_queries"})
    out = capsys.readouterr().out
    assert "Recall@1" in out and "seed-MAP" in out and "peak RSS" in out


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda d: (d / "labels.npy").unlink(), "labels.npy: file not found"),
        (lambda d: np.save(d / "embeddings.npy", np.zeros(5, np.float32)), "embeddings.npy: expected shape (10, d)"),
        (lambda d: np.save(d / "labels.npy", np.zeros(7, np.int64)), "labels.npy: expected 10 integers"),
        (lambda d: (d / "meta.json").unlink(), "meta.json: not found"),
        (lambda d: np.save(d / "embeddings.npy", np.full((10, 4), np.nan, np.float32)), "NaN"),
        (lambda d: (d / "embeddings.npy").write_text("junk"), "not a readable .npy"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, capsys, breakage, message):
    x, labels = _random(n=10, d=4)
    _write(tmp_path, x, labels % 3)
    breakage(tmp_path)
    assert main(["eval", "--embeddings", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_print_table(capsys):
    evaluate.print_table([{"architecture": "SwinV2-B", "training": "finetuned", "recall@1": 0.7522, "map@r": 0.5}])
    out = capsys.readouterr().out
    assert "| SwinV2-B | finetuned | 75.22 |" in out and "| - |" in out
