"""The benchmarks (top-level ``bench/``): every topic at its tiny size writes a complete ``bench-<topic>.json``.

Timings are not asserted (the machine is shared): only that they exist, are positive and carry their spread.
The topics share one folder of synthetic shards (built by the product's commands on first use).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import common
from bench import peer as bench_peer
from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
STAT_KEYS = {"median", "min", "max", "p10", "p90", "mean", "repeats", "warmup", "unit"}
ENVELOPE = {"bench", "level", "created", "machine", "versions", "device", "config", "results", "ratios", "notes"}
# what bench/ may import of the product: its commands and public library API, never trainer internals
PUBLIC = {"retrieval", "retrieval.cli", "retrieval.config.schema", "retrieval.config.io", "retrieval.data.input_spec", "retrieval.data.loader", "retrieval.data.sop", "retrieval.data.transforms", "retrieval.errors", "retrieval.dist", "retrieval.embed", "retrieval.embed.embedder", "retrieval.embed.embeddings", "retrieval.model.files", "retrieval.model.network", "retrieval.index", "retrieval.index.folder", "retrieval.knn", "retrieval.run_folder", "retrieval.search.searcher", "retrieval.util"}  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


def check(out: Path, topic: str, ratio_part: str) -> dict:
    """The envelope, every measured item's statistics, and a positive ratio whose name holds ``ratio_part``."""
    payload = json.loads((out / f"bench-{topic}.json").read_text())
    assert ENVELOPE <= set(payload) and payload["bench"] == topic and payload["level"] == "tiny"
    assert payload["machine"]["cpu_count"] >= 1 and payload["machine"]["memory_gb"] > 0
    assert payload["versions"]["torch"] and payload["versions"]["timm"] and payload["versions"]["faiss"]
    assert payload["device"]["type"] in ("cpu", "cuda")
    items = common.stats_in(payload["results"])
    assert items, payload["results"]
    for name, s in items:
        assert STAT_KEYS <= set(s), (name, STAT_KEYS - set(s))
        assert 0 < s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"], (name, s)
        assert s["repeats"] >= 2 and s["warmup"] >= 0, (name, s)
    found = [v for k, v in payload["ratios"].items() if ratio_part in k]
    assert found and all(isinstance(v, float) and v > 0 for v in found), (ratio_part, payload["ratios"])
    return payload


def run_topic(topic: str, out: Path, work: Path) -> dict:
    importlib.import_module(f"bench.{topic.replace('-', '_')}").run(common.Options("tiny", out, work))
    return json.loads((out / f"bench-{topic}.json").read_text())


def test_summarize_ratio_and_table():
    s = common.summarize([4.0, 1.0, 3.0, 2.0, 10.0], "images/s", warmup=2)
    assert (s["median"], s["min"], s["max"], s["p10"], s["p90"], s["repeats"]) == (3.0, 1.0, 10.0, 1.0, 10.0, 5)
    assert common.summarize([1.0, 2.0], "s", 0)["median"] == 1.5
    assert common.ratio({"median": 9.0}, {"median": 10.0}) == pytest.approx(0.9) and common.ratio(None, s) is None
    calls = []
    r = common.time_rate(lambda: calls.append(1), 8, common.Repeats(warmup=1, repeats=3, block=2))
    assert len(calls) == 8 and r["repeats"] == 3 and r["median"] > 0
    assert common.table(("a", "b"), [("x", 1.5)]).splitlines()[2].split() == ["x", "1.5"]


def test_bench_uses_only_the_public_surface():
    """No trainer internals, no fake modules, no global matplotlib backend: the product is measured as shipped."""
    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("retrieval"):
                assert node.module in PUBLIC, (path.name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name in PUBLIC or not a.name.startswith("retrieval") for a in node.names), path.name
        assert "sys.modules[" not in path.read_text() and "matplotlib" not in path.read_text(), path.name


def test_cli_entry(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    assert main(["bench", "search", "--tiny", "--out", str(tmp_path), "--work", str(tmp_path)]) == 0
    payload = check(tmp_path, "search", "/ faiss IndexFlatIP")
    assert all(r["recall_vs_faiss"] > 0.9999 for name, r in payload["results"].items() if name.startswith("knn"))


@pytest.mark.parametrize(
    "topic, ratio_part",
    [
        ("loader", "loader_w0/raw_decode"),
        ("loader-sources", "http/folder"),
        ("shards", "builder_w1/plain_pil_loop"),
        ("search-gpu", "floor fp32"),
    ],
)
def test_topic_tiny(topic, ratio_part, tmp_path, work):
    payload = run_topic(topic, tmp_path, work)
    check(tmp_path, topic, ratio_part)
    if topic == "search-gpu":
        assert {"floor fp32", "floor bf16", "ours fp32", "ours fp32 +host", "ours bf16"} <= set(payload["results"])
        assert all(v > 0.99 for v in payload["config"]["recall_vs_fp32"].values())


def test_train_tiny(tmp_path, work):
    """The real trainer's own metrics.jsonl figures beside the raw timm loop."""
    payload = run_topic("train", tmp_path, work)
    check(tmp_path, "train", "trainer/raw")
    (case,) = payload["results"].values()
    assert case["trainer"]["images_per_s_per_gpu"] > 0 and case["trainer"]["peak_mem_gb"] > 0
    assert 0 <= case["trainer"]["data_wait"] <= 1 and case["trainer"]["source"].endswith("metrics.jsonl")


def test_embed_tiny(tmp_path, work):
    """`retrieval embed` reports its own rate in meta.json; the bench reads it beside raw timm inference."""
    payload = run_topic("embed", tmp_path, work)
    check(tmp_path, "embed", "embed/raw")
    (case,) = payload["results"].values()
    (meta_file,) = work.glob("embed-*/meta.json")
    meta = EmbeddingSet.load(meta_file.parent, vectors=False).meta
    assert meta["seconds"] > 0 and meta["images_per_s"] == pytest.approx(meta["count"] / meta["seconds"], rel=0.01)
    assert case["embed"]["images_per_pass"] == meta["count"] > 0


def test_recipes_tiny_each_row_trains_its_own_loss(tmp_path, work):
    """Each recipe's row is the loss it names, whatever the config's own (the demo's is multi_similarity): the
    triplet baseline once silently trained the config's loss. Two 2-process runs, a few steps each."""
    payload = run_topic("recipes", tmp_path, work)
    assert payload["bench"] == "recipes" and payload["ratios"]["multi_similarity/triplet"] > 0  # one run: no spread
    assert set(payload["results"]) == {"triplet", "multi_similarity"}
    assert all(0 < r["median"] <= 100 and r["unit"] == "R@1 %" for r in payload["results"].values())
    for name in payload["results"]:
        cfg = RunFolder(work / f"recipe-{name}").read_config()
        assert cfg.loss.name == name and (name != "triplet" or cfg.loss.miner == "all"), (name, cfg.loss)


@pytest.mark.slow  # ~50 s on 2 shared cores: three trainer processes (default run stays under ~90 s)
@pytest.mark.dist
def test_scaling_tiny(tmp_path, work):
    """Two real `accelerate launch` runs of the trainer: 1 and 2 gloo processes."""
    payload = run_topic("scaling", tmp_path, work)
    check(tmp_path, "scaling", "efficiency 2proc")
    assert set(payload["results"]) == {"1proc", "2proc"}


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """The whole script on CPU at tiny sizes: versions first, the checks, the summary, JSON under $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=REPO, capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.index("== versions") < proc.stdout.index("== 1/") < proc.stdout.index("== summary")
    for name in ("search-gpu", "train", "embed"):
        assert (tmp_path / f"bench-{name}.json").is_file()


def test_scale_data_families_differ_as_documented():
    """bench.scale's default data has the low intrinsic dimension and mixed-class neighbourhoods of a trained
    model's embeddings (the demo's: TwoNN 9, 70 % of the top 10 in class); the isotropic family is the worst case."""
    from bench.synthetic import centres, clustered, describe, family

    stats = {}
    for name in ("trained", "isotropic"):
        fam = family(name)
        stats[name] = describe(*clustered(centres(300 * fam.per_class, fam), 1500, [0, 1]))  # 300 classes, as the demo
    trained, iso = stats["trained"], stats["isotropic"]
    assert trained["twonn_dimension"] < 16 < 30 < iso["twonn_dimension"]
    assert trained["dims_90pct_variance"] <= 24 < 150 < iso["dims_90pct_variance"]
    assert 0.6 < trained["top10_in_class"] < 0.9 and iso["top10_in_class"] > 0.99
    assert trained["nearest_other_class_cos"] > trained["within_class_cos"] - 0.05


def test_scale_tiny_auto_index_keeps_its_recall_on_new_queries(tmp_path):
    """`python -m bench.scale` at 25k rows: every step runs and reports its peak RSS, and the auto index meets its
    recall@10 target on 1,000 new images against the benchmark's own exact search."""
    cmd = [sys.executable, "-m", "bench.scale", "--sizes", "25000", "--no-eval", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads((tmp_path / "scale.json").read_text())
    assert r["search"]["recall@10"] >= 0.95 and r["search"]["exact_agree"] > 0.99
    assert all(r[step]["peak_rss_gb"] > 0 for step in ("write", "read", "index", "search"))
    assert r["index"]["chosen"]["recall@10"] >= 0.96 and "data trained" in proc.stdout


def test_peer_runs_the_matched_peer_beside_ours_in_turn_first():
    """Machine drift over minutes must hit ours and the matched peer alike: adjacent runs, alternating order."""
    names = list(bench_peer.PEERS)
    assert bench_peer.run_order(0, names) == ["ours", "pml-1thread-fused", "pml", "pml-1thread"]
    assert bench_peer.run_order(1, names) == ["pml-1thread-fused", "ours", "pml", "pml-1thread"]
    assert bench_peer.run_order(3, ["pml"]) == ["pml", "ours"]


def test_peer_tiny_both_trainers_train_and_are_scored_alike(tmp_path, work):
    """Our trainer and pytorch-metric-learning's MetricLossOnly train on the same extracted JPEGs (a few steps),
    each scored by `retrieval eval`; the peer's own AccuracyCalculator agrees with our eval on its embeddings."""
    payload = run_topic("peer", tmp_path, work)
    ours, pml = payload["results"]["ours/seed0"], payload["results"]["pml/seed0"]
    assert ours["median"] > 0 and pml["median"] > 0 and ours["command_images_per_s"] > 0
    assert ours["with_test_images_per_s"] < ours["command_images_per_s"]  # embed + eval come on top of train
    assert 0 <= ours["recall_at_1"] <= 100 and 0 <= pml["recall_at_1"] <= 100
    images = work / "peer-images-tiny"
    train = {p.name for p in (images / "train").glob("*/*.jpg")}
    stats = json.loads((work / "recipes-shards-tiny" / "stats.json").read_text())
    assert len(train) == stats["train"]["samples"]  # every train image, once, under its label
    peer = json.loads((work / "peer-pml-0.json").read_text())
    assert peer["precision_at_1"] * 100 == pytest.approx(pml["recall_at_1"], abs=0.01)
    # windows of 2 iterations over 2 epochs of 3: stamps at iterations 2, 4, 6 of the run (the one across the epoch's
    # end holds 2 iterations too; counted per epoch, it was a window of 1 taken for 2)
    assert len(peer["rates"]) == 2
    # the peer is repeatable: pml's sampler draws from numpy's global generator, which the loop seeds
    _, window, extra = bench_peer.LEVELS["tiny"]
    config = str(common.ROOT / "configs" / "demo.yaml")
    bench_peer.peer(config, images, tmp_path / "again.json", [*extra, f"train.log_every={window}"], 0, window, [])
    assert np.array_equal(np.load(tmp_path / "again.emb.npy"), np.load(work / "peer-pml-0.emb.npy"))


def test_peer_paired_difference_over_seeds():
    """Per-seed R@1 differences (ours - peer) 1, 2, 3: mean 2, sd 1, 95 % t-interval 2 +- 4.303 / sqrt(3)."""
    p = bench_peer.paired([10.0, 8.0, 9.0], [9.0, 6.0, 6.0])
    assert (p["wins"], p["diff_mean"], p["ours_mean"], p["other_mean"]) == (3, 2.0, 9.0, 7.0)
    assert p["diff_ci95"] == [pytest.approx(2 - 2.484, abs=0.01), pytest.approx(2 + 2.484, abs=0.01)]
    one = bench_peer.paired([5.0], [6.0])
    assert one["wins"] == 0 and one["diff_ci95"] is None and one["ours_sd"] is None
    results = {"ours/seed0": {"recall_at_1": 5.0, "recall_at_1_final": 6.0}, "ours/seed1": {"recall_at_1": 7.0, "recall_at_1_final": 7.0}}  # fmt: skip
    results |= {f"{name}/seed{s}": {"recall_at_1": 4.0 + s + (name == "pml")} for name in bench_peer.PEERS for s in (0, 1)}  # fmt: skip
    rows = bench_peer.r1_over_seeds(results, (0, 1), bench_peer.PEERS)
    assert rows["floor: pml-1thread vs pml"]["diff_mean"] == -1.0 and rows["ours vs pml"]["wins"] == 2
    assert rows["ours: selected vs final"]["diff_mean"] == -0.5 and rows["ours: selected vs final"]["wins"] == 1
    assert "floor: pml-1thread vs pml" in bench_peer.seed_table(rows)


def test_index_update_tiny_adds_faster_than_it_rebuilds(tmp_path):
    """bench/index_update.py on 20k rows: the figures of `index add` and of the full rebuild, each in its process."""
    from bench import index_update

    out = tmp_path / "iu"
    assert index_update.main(["--rows", "20000", "--new", "500", "--repeats", "2", "--factories", "HNSW16", "--out", str(out)]) == 0  # fmt: skip
    r = json.loads((out / "index_update.json").read_text())["results"]["HNSW16"]
    assert r["add"]["seconds"]["repeats"] == 2 and r["add"]["peak_rss_gb"]["median"] > 0
    assert r["add"]["seconds"]["median"] < r["rebuild"]["seconds"]["median"]
    assert json.loads((out / "index-HNSW16" / "index.json").read_text())["count"] == 20000


@pytest.mark.slow
def test_continued_and_feedback_tiny(tmp_path):
    """`pytest -m slow tests/test_bench.py -k continued` (about 5 minutes on 2 busy cores): both acceptance
    experiments end to end at a tiny size (the README's tables are their full runs)."""
    from bench import continued, feedback

    assert continued.main(["--out", str(tmp_path / "c"), "--classes", "60", "--steps", "8"]) == 0
    rows = json.loads((tmp_path / "c" / "continued.json").read_text())["rows"]
    assert set(rows) == {"A", "A -> B + replay of A", "A -> B alone", "B from scratch"}
    argv = ["--out", str(tmp_path / "f"), "--classes", "120", "--steps", "8", "--continued-steps", "8"]
    assert feedback.main([*argv, "--same", "10", "--not-same", "10"]) == 0
    result = json.loads((tmp_path / "f" / "feedback.json").read_text())
    assert result["export"]["judgements"] >= 10 and set(result["rows"]) == {"base", "feedback", "replay"}


@pytest.mark.slow
def test_serve_hostile_tiny(tmp_path, work):
    """The service's acceptance at the tiny size (~40 s): 16 clients, the hostile requests at once, memory."""
    payload = run_topic("serve-hostile", tmp_path, work)
    assert all(payload["config"]["acceptance"].values()), payload["config"]
    assert {h["status"] for h in payload["config"]["hostile"].values()} <= {400, 408, 413}
