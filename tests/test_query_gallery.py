"""Query/gallery protocol: metrics against a float64 numpy brute force; In-Shop's list file sharded and evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import metrics
from retrieval.cli import main
from retrieval.data.inshop import load_inshop
from retrieval.embed.embeddings import EmbeddingSet

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _brute(q, ql, g, gl, ks):
    """Independent float64 implementation, loop per query: full ranking of the gallery."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    out = {f"recall@{k}": [] for k in ks} | {"map@r": [], "r_precision": [], f"map@{max(ks)}": []}
    for i in range(len(q)):
        rel = gl[np.argsort(-s[i], kind="stable")] == ql[i]
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(rel[:k].any())
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        out["map@r"].append(float((prec[:r] * rel[:r]).sum() / r))
        out["r_precision"].append(rel[:r].sum() / r)
        kk = max(ks)
        out[f"map@{kk}"].append(float((prec[:kk] * rel[:kk]).sum() / min(r, kk)))
    return {key: float(np.mean(v)) for key, v in out.items()}, len(out["map@r"])


def _sets(seed=0, d=16, classes=40):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    gl = rng.integers(0, classes, 900)
    g = centres[gl] + 0.9 * rng.standard_normal((900, d))
    ql = rng.integers(0, classes + 5, 150)  # classes 40..44 have no gallery image: excluded, counted
    ql[:20] %= classes
    q = centres[ql % classes] + 0.9 * rng.standard_normal((150, d))
    # duplicates: 10 queries appear verbatim in the gallery under another class, 10 under their own
    g[:10], gl[:10] = q[:10], (ql[:10] + 1) % classes
    g[10:20], gl[10:20] = q[10:20], ql[10:20]
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(q), ql, norm(g), gl


@pytest.mark.parametrize("ks", [metrics.QG_KS, (1, 5, 1000)])
def test_query_gallery_equals_brute_force(ks):
    q, ql, g, gl = _sets()
    ours = metrics.query_gallery_metrics(q, ql, g, gl, ks=ks, chunk=37)
    ref, n = _brute(q, ql, g, gl, ks)
    assert ours["num_queries"] == n and ours["num_excluded"] == int((ql >= 40).sum()) > 0
    for key, v in ref.items():
        assert abs(ours[key] - v) < 1e-9, key
    assert ours["protocol"] == "query/gallery" and ours["num_gallery"] == len(gl)


def _write_parts(folder: Path, x: np.ndarray, labels: np.ndarray, rows_per_part: int) -> None:
    """``x`` as two ranks write it: alternate blocks of 50 rows, parts of ``rows_per_part`` rows."""
    writers = [EmbeddingSet.writer(folder, r, rows_per_part) for r in range(2)]
    for b, s0 in enumerate(range(0, len(x), 50)):
        ids = np.arange(s0, min(s0 + 50, len(x)), dtype=np.int64)
        cols = {"ids": ids, "labels": labels[ids], "super_labels": labels[ids] % 3}
        writers[b % 2].add(x[ids], cols, [f"{i}.jpg" for i in ids])
    for w in writers:
        w.close({"seconds": 0.0})
    EmbeddingSet.finish_parts(folder, 2, x.shape[1])
    EmbeddingSet.write_meta(folder, {"model": "test"}, len(x), x.shape[1])


def test_eval_streams_a_parted_gallery_block_by_block(tmp_path, monkeypatch):
    """`retrieval eval --queries --gallery` over a gallery in 6 parts, streamed in blocks of 64 rows: the metrics
    equal the brute force over the whole gallery in memory."""
    q, ql, g, gl = _sets(seed=3)
    _write_parts(tmp_path / "gallery", g, gl, rows_per_part=120)
    _write_parts(tmp_path / "queries", q, ql, rows_per_part=1000)
    assert len(list((tmp_path / "gallery" / "parts").glob("r*-p*"))) == 6
    monkeypatch.setattr(metrics, "GALLERY_BLOCK", 64)
    argv = ["eval", "--queries", str(tmp_path / "queries"), "--gallery", str(tmp_path / "gallery")]
    assert main([*argv, "--out", str(tmp_path / "eval"), "--chunk", "29"]) == 0
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    ref, n = _brute(q, ql, g, gl, metrics.QG_KS)
    assert ours["num_queries"] == n and ours["num_gallery"] == len(g)
    for key, v in ref.items():
        assert abs(ours[key] - v) < 1e-9, key


def _write_inshop(root: Path, rng) -> dict[str, int]:
    """A tiny In-Shop tree: 6 train items, 4 query/gallery items, 3 photos each (colour = item)."""
    rows, counts = [], {"train": 0, "query": 0, "gallery": 0}
    for item in range(1, 11):
        cat = "WOMEN/Dresses" if item % 2 else "MEN/Shirts"
        colour = rng.integers(0, 255, 3)
        for view in range(3):
            path = f"img/{cat}/id_{item:08d}/{view:02d}_1_front.jpg"
            (root / "Img" / path).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(colour + rng.normal(0, 20, (40, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "Img" / path)
            status = "train" if item <= 6 else ("query" if view == 0 else "gallery")
            counts[status] += 1
            rows.append(f"{path} id_{item:08d} {status}")
    (root / "Eval").mkdir()
    (root / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return counts


def test_inshop_builds_and_evaluates(tmp_path):
    root, shards = tmp_path / "inshop", tmp_path / "shards"
    counts = _write_inshop(root, np.random.default_rng(0))
    cat = load_inshop(root, val_classes=2)
    assert {r.super_class_id for r in cat.splits["train"]} == {1, 2} and len(cat.splits["val"]) == 6
    build = ["shards", "build", "--inshop-root", str(root), "--out", str(shards), "--workers", "1"]
    assert main([*build, "--val-classes", "2", "--shard-size", "4"]) == 0
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["query"]["samples"] == counts["query"] == 4 and stats["gallery"]["samples"] == counts["gallery"]
    assert stats["train"]["samples"] + stats["val"]["samples"] == counts["train"] and "test" not in stats
    assert main(["shards", "verify", str(shards)]) == 0  # query and gallery may share items; nothing else may
    for split in ("query", "gallery"):
        embed = ["embed", "--model", TINY, "--untrained", "--shards", str(shards), "--split", split]
        assert main([*embed, "--out", str(tmp_path / split), "--num-workers", "0", "--batch-size", "4"]) == 0
    out = tmp_path / "eval"
    args = ["eval", "--queries", str(tmp_path / "query"), "--gallery", str(tmp_path / "gallery"), "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_queries"] == 4 and m["num_gallery"] == 8 and {"recall@1", "map@r", "map@100"} <= set(m)
    q, g = EmbeddingSet.load(tmp_path / "query"), EmbeddingSet.load(tmp_path / "gallery")
    ref, _ = _brute(q.vectors32(), q.labels, g.vectors32(), g.labels, metrics.QG_KS)
    assert all(abs(m[key] - v) < 1e-6 for key, v in ref.items())


def test_eval_arguments(tmp_path, capsys):
    assert main(["eval", "--queries", str(tmp_path)]) == 2
    assert "--query-embeddings and --gallery-embeddings go together" in capsys.readouterr().err
    assert main(["eval"]) == 2
