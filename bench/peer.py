"""``bench peer``: ``retrieval train`` beside the plainest peer a user would otherwise pick, pytorch-metric-learning's
own trainer (``bench/peer_loop.py``: ``MetricLossOnly`` + ``MPerClassSampler`` over a Dataset of JPEG files), on the
demo's catalogue, 1 process each, one after the other on the same machine.

Matched: the JPEG bytes and the train classes (the peer reads the train shards' images extracted to files), the
tiny SwinV2 and its seeded starting weights (``initial_model``, post-norm gains set), multi-similarity loss with the
config's alpha/beta/base, AdamW with the head/backbone lr split and no decay on 1-d parameters, linear warmup then
cosine per step, gradient clipping at ``optim.grad_clip``, the train transform (``train_transform`` of the same
input spec), P x K batches and steps, loader workers (``data.num_workers``); torch threads and AdamW's kernels
per peer (below: ours takes 1 thread beside its worker on this machine and fused AdamW).
Not matched (what each does on its own): the data order (our shard stream's P x K planner vs pml's sampler), our
per-epoch validation, checkpoints and exports (the peer has none: they are in our whole-command time), our
divergence/stop checks; layer-wise no-decay names (our groups also exempt SwinV2's position tables and logit
scales); the peer's test is pml's AccuracyCalculator on the test JPEGs, ours `retrieval embed` + `retrieval eval`
of the run's default selection (both are Recall@1 with the query excluded; the peer's embeddings are scored by our
eval too, as a cross-check).

Three peers: ``pml``, as a user writes it (torch's default threads, one per core, and torch's default AdamW, which
on CPU loops over the tensors in Python); ``pml-1thread``, the same on 1 torch thread (as ours sizes itself beside
its loader worker): a different float summation order and nothing else, so its R@1 beside ``pml``'s measures the
noise floor of a per-seed comparison; and ``pml-1thread-fused``, also with the AdamW kernel our trainer picks
(fused): every choice of ours the peer could also make, so that what remains is the loops themselves.

Figures: the training loop's images/s (medians of windows of 25 steps, the first window dropped: ours
from the run's metrics.jsonl, the peer's from an iteration hook), the whole command's images/s (train images over
wall seconds: ours of ``retrieval train``, its validations, checkpoints and exports included, the peer's of its
script, train() and its test), the same with our test added (``retrieval embed`` + ``retrieval eval``, two more
processes), and test Recall@1 of both, per seed, then paired by seed: means, standard
deviations, our wins, the mean difference and its 95 % t-interval (``paired``), for ours against each peer, for
the floor (pml-1thread against pml) and for our default selection against our own final weights.

    python -m bench peer --out bench-out                 # the demo's catalogue, 800 steps, seeds 0..5 (~25 min)
    python -m bench peer --quick                         # one seed
    python -m bench peer --tiny                          # a few steps on a tiny catalogue (what the tests run)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.recipes import catalogue
from retrieval.config.io import load_config
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.run_folder import RunFolder

# level -> (seeds, steps per images/s window (ours: train.log_every), overrides of the demo config). Six seeds in
# full: test R@1 after 800 steps from scratch spreads over 2-12 % between seeds for either trainer, so a
# per-seed win is a coin flip; the paired difference over the seeds is the figure that can say more.
LEVELS = {
    "tiny": ((0,), 2, ["data.steps_per_epoch=3", "train.epochs=2", "data.classes_per_batch=4"]),
    "quick": ((0,), 25, []),
    "full": ((0, 1, 2, 3, 4, 5), 25, []),
}
# two-sided 95 % Student t quantiles by degrees of freedom (no scipy in the project's dependencies)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
# the peer as a user writes it (torch's default threads and AdamW: a Python loop over the tensors on CPU);
# pml-1thread: on 1 torch thread instead of 2, nothing else changed: its R@1 beside pml's is the noise floor (a
# different float summation order alone moves a seed's test R@1 by as much as a different trainer);
# pml-1thread-fused: with our AdamW kernel too, every setting of ours matched: the loops themselves side by side
PEERS = {"pml": [], "pml-1thread": ["--threads", "1"], "pml-1thread-fused": ["--threads", "1", "--adamw", "fused"]}


def extract(shards: Path, split: str, out: Path) -> Path:
    """The split's images as ``out/split/<label>/<key>.jpg`` (the shards' own bytes), once."""
    folder = out / split
    if folder.is_dir():
        return folder
    tmp = out / f".{split}-tmp"
    for tar in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            members: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if ext in ("jpg", "cls"):
                    members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, parts in members.items():
            target = tmp / parts["cls"].decode().strip() / f"{key}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(parts["jpg"])
    tmp.rename(folder)
    return folder


def ours(config: str, shards: Path, run: Path, overrides: list[str], seed: int) -> dict:
    """`retrieval train` (1 process), then `retrieval embed` + `retrieval eval` of its default selection."""
    shutil.rmtree(run, ignore_errors=True)  # a rerun in the same --work measures a fresh run, never a resume
    start = time.perf_counter()
    seeded = [f"data.shards={shards}", f"train.seed={seed}", f"data.seed={seed}", "log.wandb=disabled", *overrides]
    common.launch_train(1, Path(config), run, seeded)
    train_s = time.perf_counter() - start
    recall = score_r1(run, shards, run / "emb-test")
    seconds = time.perf_counter() - start
    rates = [r["images_per_s"] for r in RunFolder(run).read_metrics() if r.get("kind") == "train"]
    # after the timed command: our final weights, what no selection would have exported
    final = score_r1(run / "final", shards, run / "emb-test-final")
    return {"rates": rates, "seconds": seconds, "train_s": train_s, "recall@1": recall, "recall@1_final": final}


def score_r1(model: Path, shards: Path, out: Path) -> float:
    """`retrieval embed` + `retrieval eval` of the test split: Recall@1 of a run's default selection or an export."""
    common.retrieval("embed", "--model", model, "--shards", shards, "--split", "test", "--out", out, "--workers", 1)
    return eval_r1(out)


def eval_r1(embeddings: Path) -> float:
    """`retrieval eval` of an embeddings folder: its Recall@1 (ours and the peer's scored by the same command)."""
    common.retrieval("eval", "--embeddings", embeddings)
    return json.loads((embeddings / "metrics.json").read_text())["recall@1"]


def peer(config: str, images: Path, out: Path, overrides: list[str], seed: int, window: int, flags: list[str]) -> dict:
    """The peer script in its own process; its test embeddings scored by our eval as well (a cross-check)."""
    cmd = [sys.executable, str(common.ROOT / "bench" / "peer_loop.py"), "--config", config, "--images", str(images)]
    cmd += ["--seed", str(seed), "--window", str(window), "--out", str(out), *flags, *overrides]
    proc = subprocess.run(cmd, env=common.child_env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"peer loop exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    emb, labels = np.load(out.with_suffix(".emb.npy")), np.load(out.with_suffix(".labels.npy"))
    folder = out.with_suffix("")
    EmbeddingSet(emb, np.arange(len(labels)), labels, labels, [], {"model": "peer"}).save(folder)
    result["recall@1"] = eval_r1(folder)
    return result


def paired(ours: list[float], other: list[float]) -> dict:
    """Test R@1 of the two trainers over the same seeds (same starting weights per seed): each one's mean and
    standard deviation, our wins (>=), and the mean of the per-seed differences with its 95 % t-interval (None
    for one seed)."""
    a, b = np.asarray(ours, float), np.asarray(other, float)
    diff, n = a - b, len(a)
    sd = float(diff.std(ddof=1)) if n > 1 else None
    half = T975.get(n - 1, 1.96) * sd / np.sqrt(n) if sd is not None else None
    mean = float(diff.mean())
    return {
        "seeds": n,
        "ours_mean": round(float(a.mean()), 2),
        "ours_sd": round(float(a.std(ddof=1)), 2) if n > 1 else None,
        "other_mean": round(float(b.mean()), 2),
        "other_sd": round(float(b.std(ddof=1)), 2) if n > 1 else None,
        "wins": int((diff >= 0).sum()),
        "diff_mean": round(mean, 2),
        "diff_ci95": None if half is None else [round(float(mean - half), 2), round(float(mean + half), 2)],
    }


def r1_over_seeds(results: dict, seeds: tuple[int, ...], peers: dict) -> dict:
    """Test R@1 paired by seed: ours (default selection) vs each peer's final weights, and our default selection
    vs our own final weights (selection against none on the same trajectory)."""

    def r1(name: str, key: str = "recall_at_1") -> list[float]:
        return [results[f"{name}/seed{s}"][key] for s in seeds]

    out = {f"ours vs {name}": paired(r1("ours"), r1(name)) for name in peers}
    if "pml-1thread" in peers:  # the floor: the same peer, only its torch threads changed
        out["floor: pml-1thread vs pml"] = paired(r1("pml-1thread"), r1("pml"))
    return out | {"ours: selected vs final": paired(r1("ours"), r1("ours", "recall_at_1_final"))}


def seed_table(over_seeds: dict) -> str:
    head = ("test R@1 over seeds", "seeds", "ours mean", "sd", "other mean", "sd", "ours >= other", "ours - other",
            "95 % CI")  # fmt: skip
    rows = [(name, p["seeds"], p["ours_mean"], p["ours_sd"], p["other_mean"], p["other_sd"], f"{p['wins']}/{p['seeds']}",
             p["diff_mean"], str(p["diff_ci95"])) for name, p in over_seeds.items()]  # fmt: skip
    return common.table(head, rows)


def run_order(seed: int, peers: list[str]) -> list[str]:
    """Who runs when for a seed: the matched peer (the last of ``peers``) right beside ours, first on odd seeds, then
    the others. This machine's speed drifted by 20-30 % within minutes (the same peer: 527 to 691 images/s from one
    seed to the next), so ours against a peer three runs later compared the drift as much as the trainers."""
    matched, others = peers[-1], peers[:-1]
    return (["ours", matched] if seed % 2 == 0 else [matched, "ours"]) + others


def run(opts: common.Options) -> dict:
    config = opts.config or str(common.ROOT / "configs" / "demo.yaml")
    seeds, window, extra = LEVELS[opts.level]
    overrides = [*extra, f"train.log_every={window}", *opts.overrides]
    work = Path(opts.work)
    shards, _ = catalogue(work, opts.level)
    images = work / f"peer-images-{opts.level}"
    for split in ("train", "test"):
        extract(shards, split, images)
    cfg = load_config(config, overrides)
    per_step = cfg.data.classes_per_batch * cfg.data.images_per_class
    steps = cfg.data.steps_per_epoch * cfg.train.epochs
    rows, results, ratios = [], {}, {}
    peers = PEERS if opts.level != "tiny" else {"pml": []}
    for seed in seeds:
        runs = {}
        for name in run_order(seed, list(peers)):
            if name == "ours":
                runs[name] = ours(config, shards, work / f"peer-ours-{seed}", overrides, seed)
            else:
                runs[name] = peer(
                    config, images, work / f"peer-{name}-{seed}.json", overrides, seed, window, peers[name]
                )
        for name, r in runs.items():
            rates = r["rates"][1:] or r["rates"]
            results[f"{name}/seed{seed}"] = common.summarize(
                rates, "images/s", len(r["rates"]) - len(rates),
                # ours: `retrieval train` alone, then with embed + eval; the peer's script holds its test already
                command_images_per_s=round(steps * per_step / r.get("train_s", r["seconds"]), 1),
                with_test_images_per_s=round(steps * per_step / r["seconds"], 1),
                seconds=round(r["seconds"], 1), recall_at_1=round(100 * r["recall@1"], 2),
                **({"recall_at_1_final": round(100 * r["recall@1_final"], 2)} if "recall@1_final" in r else {}),
            )  # fmt: skip
        o = results[f"ours/seed{seed}"]
        for name in peers:
            p = results[f"{name}/seed{seed}"]
            ratios[f"loop ours/{name} seed{seed}"] = common.ratio(o, p)
            for figure in ("command", "with_test"):
                key = f"{figure}_images_per_s"
                ratios[f"{figure} ours/{name} seed{seed}"] = round(o[key] / p[key], 3)
            rows.append((seed, name, o["median"], p["median"], o["command_images_per_s"], o["with_test_images_per_s"],
                         p["command_images_per_s"], o["recall_at_1"], p["recall_at_1"]))  # fmt: skip
    print(common.table(("seed", "peer", "loop ours", "loop peer", "command ours", "+ test ours", "command peer",
                        "R@1 ours", "R@1 peer"), rows), flush=True)  # fmt: skip
    over_seeds = r1_over_seeds(results, seeds, peers)
    print(seed_table(over_seeds), flush=True)
    results["recall_at_1_over_seeds"] = over_seeds
    notes = [
        f"{steps} steps of {cfg.data.classes_per_batch} x {cfg.data.images_per_class}, 1 process each, run one after "
        f"the other (the matched peer beside ours, in turn first: {run_order(1, list(peers))}); loop = median "
        "images/s of windows of the training loop, command = train images / wall seconds: "
        "ours of `retrieval train` (validations, checkpoints, exports), the peer's of train() + its test; + test "
        "ours: with `retrieval embed` + `retrieval eval` of the test split added",
        "R@1: test Recall@1 (%) by `retrieval eval`, ours of the run's default selection, pml's of its final weights",
        "R@1 over seeds: a seed fixes both trainers' starting weights and their own data orders; the difference is "
        "paired by seed, its interval a t-interval over the seeds",
    ]
    return common.publish("peer", opts, {"config": config, "overrides": overrides, "seeds": seeds}, results,
                          ratios, notes)  # fmt: skip
