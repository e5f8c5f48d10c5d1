"""`retrieval bench`: every topic in its tiny mode writes a complete JSON; the GPU-host stand-ins match the real code.

Timings here are not asserted (the machine is shared); only that they exist, are positive and carry their spread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval.bench import common

REPO = Path(__file__).resolve().parents[1]
STAT_KEYS = {"median", "min", "max", "p10", "p90", "mean", "repeats", "warmup", "unit"}
ENVELOPE = {"bench", "level", "machine", "versions", "device", "config", "results", "ratios", "notes"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder of synthetic shards shared by the train/embed/scaling tests (built on first use)."""
    return tmp_path_factory.mktemp("bench-work")


def stats_in(results: dict, prefix: str = "") -> dict[str, dict]:
    out = {}
    for name, value in results.items():
        if isinstance(value, dict) and "median" in value:
            out[prefix + name] = value
        elif isinstance(value, dict):
            out.update(stats_in(value, f"{prefix}{name}/"))
    return out


def check_payload(payload: dict, out: Path, what: str, ratio_parts: tuple[str, ...]) -> dict[str, dict]:
    """The envelope, every measured item's statistics, and a positive ratio for each of ``ratio_parts``."""
    assert ENVELOPE <= set(payload), ENVELOPE - set(payload)
    on_disk = json.loads((out / f"bench-{what}.json").read_text())
    assert on_disk["bench"] == what and on_disk["results"] and ENVELOPE <= set(on_disk)
    machine, versions = on_disk["machine"], on_disk["versions"]
    assert machine["cpu_count"] >= 1 and machine["hostname"] and machine["memory_gb"] > 0
    assert {"python", "torch", "timm", "faiss", "accelerate", "webdataset", "retrieval"} <= set(versions)
    assert versions["torch"] and versions["timm"]
    assert on_disk["device"]["type"] in ("cpu", "cuda")
    items = stats_in(on_disk["results"])
    assert items, on_disk["results"]
    for name, s in items.items():
        assert STAT_KEYS <= set(s), (name, STAT_KEYS - set(s))
        assert 0 < s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"], (name, s)
        assert s["repeats"] >= 1 and s["warmup"] >= 0 and isinstance(s["unit"], str)
    for part in ratio_parts:
        found = [v for k, v in on_disk["ratios"].items() if part in k]
        assert found and all(isinstance(v, float) and v > 0 for v in found), (part, on_disk["ratios"])
    return items


# ------------------------------------------------------------------------------------------- plumbing
def test_summarize_spread_and_ratio():
    s = common.summarize([4.0, 1.0, 3.0, 2.0, 10.0], "images/s", warmup=2)
    assert (s["median"], s["min"], s["max"], s["p10"], s["p90"], s["repeats"]) == (3.0, 1.0, 10.0, 1.0, 10.0, 5)
    assert common.summarize([1.0, 2.0], "s", 0)["median"] == 1.5
    assert common.ratio({"median": 9.0}, {"median": 10.0}) == pytest.approx(0.9)
    assert common.ratio(None, {"median": 1.0}) is None
    calls = []
    r = common.time_rate(lambda: calls.append(1), 8, common.Repeats(warmup=1, repeats=3, block=2))
    assert len(calls) == 8 and r["repeats"] == 3 and r["items_per_call"] == 8 and r["median"] > 0


def test_publish_writes_the_envelope_once_and_prints_it(tmp_path, capsys):
    results = {"a": common.summarize([1.0, 2.0, 3.0], "images/s", 1)}
    p = common.envelope("x", "tiny", torch.device("cpu"), {}, results, {"speedup_vs_faiss": 2.0}, [])
    assert common.publish(tmp_path, p) is p
    written = json.loads((tmp_path / "bench-x.json").read_text())
    assert ENVELOPE <= set(written) and written["ratios"] == {"speedup_vs_faiss": 2.0}
    out = capsys.readouterr().out
    assert "a" in out and "speedup_vs_faiss" in out


def test_unknown_topic_and_plot(tmp_path, capsys):
    from retrieval.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    png = common.plot_curves(tmp_path / "c.png", "t", "x", "y", {"a": ([1, 2], [3.0, 4.0])})
    assert png is not None and png.stat().st_size > 1000


# ------------------------------------------------------------------------ GPU-host stand-ins are faithful
def tiny_cfg(*overrides: str):
    from retrieval.config_io import load_config

    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


def test_torch_batch_hard_equals_retrieval_losses():
    from retrieval.bench.train import TorchBatchHard
    from retrieval.losses import build_loss

    cfg = tiny_cfg("loss.miner=batch_hard")  # the GPU check's stand-in mirrors the batch-hard SOP recipes
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(32, 16, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(8).repeat_interleave(4)
    ours, ours_stats = TorchBatchHard(cfg.loss.margin)(emb, labels)
    ref, ref_stats = build_loss(cfg.loss)(emb, labels)
    assert float(ours) == pytest.approx(float(ref), abs=1e-6)  # the stand-in computes in fp32
    assert ours_stats["active_fraction"] == pytest.approx(ref_stats["active_fraction"])


# ------------------------------------------------------------------------------- each topic, tiny mode
def test_bench_train_tiny(tmp_path, work):
    from retrieval.bench.train import run_bench

    payload = run_bench(True, tmp_path, tiny=True, work=work)
    items = check_payload(payload, tmp_path, "train", ("trainer/raw", "step/raw"))
    assert any(k.endswith("/trainer") for k in items) and any(k.endswith("/raw_timm") for k in items)
    (case,) = payload["results"].values()
    assert case["trainer"]["images_per_s_per_gpu"] > 0 and case["trainer"]["peak_mem_gb"] > 0
    assert case["our_step_in_memory"]["step_impl"] == "retrieval.trainer.Trainer._step"
    assert payload["goals"] and all(v == 0.9 for v in payload["goals"].values())


def test_bench_embed_tiny(tmp_path, work):
    from retrieval.bench.embed import run_bench

    payload = run_bench(True, tmp_path, tiny=True, work=work)
    check_payload(payload, tmp_path, "embed", ("embed_split/raw", "model/raw"))
    (case,) = payload["results"].values()
    assert case["embed_split"]["images_per_pass"] == case["images_per_pass"] > 0  # the same images on both sides


def test_bench_search_tiny_through_the_cli(tmp_path, capsys):
    pytest.importorskip("retrieval.bench.search")
    from retrieval.cli import main

    assert main(["bench", "search", "--tiny", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench-search.json").read_text())
    check_payload(payload, tmp_path, "search", ("speedup",))
    assert "== bench search" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["loader", "shards"])
def test_bench_colleague_topics_tiny(tmp_path, what):
    """Through the CLI in a fresh process: the shard builder forks a process pool, unsafe in a threaded pytest."""
    pytest.importorskip(f"retrieval.bench.{what}")
    cmd = [sys.executable, "-m", "retrieval", "bench", what, "--tiny", "--out", str(tmp_path), "--work", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / f"bench-{what}.json").read_text())
    check_payload(payload, tmp_path, what, ())
    assert payload["ratios"] and f"== bench {what}" in proc.stdout


@pytest.mark.slow
@pytest.mark.dist
def test_bench_scaling_tiny(tmp_path, work):
    """Two real `accelerate launch` runs of the trainer (1 and 2 gloo processes)."""
    from retrieval.bench.scaling import run_bench

    payload = run_bench(True, tmp_path, tiny=True, work=work)
    check_payload(payload, tmp_path, "scaling", ("efficiency 2proc",))
    assert set(payload["results"]) == {"1proc", "2proc"}
    assert (tmp_path / "bench-scaling.png").is_file()
    assert any("share" in n and "cores" in n for n in payload["notes"])


def test_bench_scaling_launch_command():
    from retrieval.bench.scaling import launch_command

    cmd = launch_command(2, Path("c.yaml"), Path("s"), Path("r"), 6, 2, cuda=False, precision="no")
    assert cmd[:1] == ["env"] and "ACCELERATE_USE_CPU=1" in cmd and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "data.num_workers=0" in cmd
    one = launch_command(1, Path("c.yaml"), Path("s"), Path("r"), 6, 2, cuda=True, precision="bf16")
    assert "--multi_gpu" not in one and "ACCELERATE_USE_CPU=1" not in one and "bf16" in one


# ---------------------------------------------------------------------------------------- the GPU check
def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """The whole script on CPU at tiny sizes: versions first, the three checks, the summary, JSON under $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.index("== versions") < out.index("== 1/3 train") < out.index("== 3/3 search") < out.index("== summary")
    for name in ("train", "embed", "search-gpu"):
        assert (tmp_path / f"bench-{name}.json").is_file()
    assert json.loads((tmp_path / "bench-search-gpu.json").read_text())["recall_bf16_vs_fp32"] > 0.99
