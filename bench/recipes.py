"""``bench recipes``: which training recipe learns most from the same images (not in ``bench all``: it trains one
model per recipe).

Every recipe trains the demo's tiny SwinV2 (``configs/demo.yaml``, or ``--config``) from scratch on the demo's
synthetic catalogue, on 2 processes (gloo on CPU, else the GPUs), for the config's number of steps: the same
images in the same order for every recipe (the data order is a function of ``data.seed`` only). Each model is then
embedded on the test split and scored with the SOP protocol, exactly as ``retrieval demo`` does. The table lists
test Recall@1/10 and MAP@R per recipe and the training seconds; ``ratio`` rows are each recipe's Recall@1 over
the plain triplet recipe's.

    python -m bench recipes --out bench-out            # the demo's catalogue and budget (about 2-3 min a recipe)
    python -m bench recipes --tiny                     # two recipes, a few steps (what the tests run)
    python -m bench recipes --quick ms_xbm=loss.name=multi_similarity,loss.xbm_size=2048   # add recipes
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from bench import common

# name -> dotted overrides on top of the config. The demo trains from scratch: batch_hard mining collapses there
# (README), so the triplet recipe is batch-all and the memory goes with the pair losses.
# Every recipe names its loss: the config's own (the demo's is multi_similarity) must not stand in for the baseline.
TRIPLET = ["loss.name=triplet", "loss.miner=all", "loss.margin=0.2"]  # the demo's recipe before this comparison
RECIPES: dict[str, list[str]] = {
    "triplet": TRIPLET,
    "multi_similarity": ["loss.name=multi_similarity"],
    "supcon": ["loss.name=supcon", "loss.temperature=0.1"],
    "contrastive": ["loss.name=contrastive"],
    "proxy_anchor": ["loss.name=proxy_anchor", "loss.num_classes={classes}"],
    "ms_xbm": ["loss.name=multi_similarity", "loss.xbm_size=2048", "loss.xbm_start_step=200"],
    "ms_ema": ["loss.name=multi_similarity", "train.ema_decay=0.99"],
    "ms_randaug": ["loss.name=multi_similarity", "data.rand_augment=rand-m7-mstd0.5", "data.random_erasing=0.25"],
}
TINY = {"triplet": TRIPLET, "multi_similarity": ["loss.name=multi_similarity"]}
# level -> (classes, images per class, image side, extra overrides)
DATA = {
    "tiny": (24, "3-5", 64, ["data.steps_per_epoch=3", "train.epochs=1", "data.classes_per_batch=4"]),
    "quick": (600, "3-8", 96, []),
    "full": (600, "3-8", 96, []),
}


def catalogue(work: Path, level: str) -> tuple[Path, int]:
    """The demo's synthetic catalogue as shards (built once per work folder); returns it and the class count."""
    classes, per_class, size, _ = DATA[level]
    sop, shards = work / f"recipes-sop-{level}", work / f"recipes-shards-{level}"
    if not (shards / "stats.json").is_file():
        common.retrieval("synth-sop", sop, "--classes", classes, "--images-per-class", per_class, "--seed", 0, "--size", size, "--force")  # fmt: skip
        common.retrieval("shards", "build", "--sop-root", sop, "--out", shards, "--shard-size", 300, "--val-classes", 0.15, "--max-side", size)  # fmt: skip
    return shards, classes


def train_and_score(config: str, shards: Path, run: Path, overrides: list[str], procs: int) -> dict:
    """Train (the demo's protocol: validate every epoch, keep the best), embed the test split, score it."""
    shutil.rmtree(run, ignore_errors=True)  # every recipe trains afresh
    start = time.perf_counter()
    # one torch thread per process on CPU, as `retrieval demo` launches it (the ranks share the cores)
    launch = [f"data.shards={shards}", "train.eval_every=1", "log.wandb=disabled", *overrides]
    common.launch_train(procs, Path(config), run, launch, one_thread=not common.cuda())
    seconds = time.perf_counter() - start
    emb = run / "emb-test"
    common.retrieval("embed", "--model", run, "--shards", shards, "--split", "test", "--out", emb, "--workers", 1)
    common.retrieval("eval", "--embeddings", emb)
    metrics = json.loads((emb / "metrics.json").read_text())
    return {"recall@1": metrics["recall@1"], "recall@10": metrics["recall@10"], "map@r": metrics["map@r"], "train_s": seconds}  # fmt: skip


def parse_extra(words: tuple[str, ...]) -> dict[str, list[str]]:
    """``name=key=value,key=value`` words: recipes added from the command line."""
    out = {}
    for word in words:
        name, _, rest = word.partition("=")
        out[name] = [x for x in rest.split(",") if x]
    return out


def run(opts: common.Options) -> dict:
    config = opts.config or str(common.ROOT / "configs" / "demo.yaml")
    shards, classes = catalogue(Path(opts.work), opts.level)
    procs = torch.cuda.device_count() if common.cuda() else 2
    recipes = {**(TINY if opts.level == "tiny" else RECIPES), **parse_extra(opts.overrides)}
    scores = {}
    for name, overrides in recipes.items():
        extra = [o.format(classes=classes + 1) for o in overrides] + DATA[opts.level][3]
        scores[name] = train_and_score(config, shards, Path(opts.work) / f"recipe-{name}", extra, procs)
        print(f"{name}: {scores[name]}", flush=True)
    results = {
        name: common.summarize(
            [100 * s["recall@1"]],
            "R@1 %",
            0,
            recall_at_10=100 * s["recall@10"],
            map_at_r=100 * s["map@r"],
            train_s=round(s["train_s"], 1),
        )  # fmt: skip
        for name, s in scores.items()
    }
    rows = [(n, f"{r['median']:.2f}", f"{r['recall_at_10']:.2f}", f"{r['map_at_r']:.2f}", r["train_s"]) for n, r in results.items()]  # fmt: skip
    print(common.table(("recipe", "R@1 %", "R@10 %", "MAP@R %", "train s"), rows), flush=True)
    ratios = {
        f"{name}/triplet": common.ratio(r, results["triplet"]) for name, r in results.items() if name != "triplet"
    }
    notes = [f"{name}: {' '.join(o)}" for name, o in recipes.items()]
    notes += ["MAP@R per recipe (%): " + ", ".join(f"{n} {r['map_at_r']:.2f}" for n, r in results.items())]
    cfg = {"config": config, "classes": classes, "processes": procs, "level": opts.level}
    return common.publish("recipes", opts, cfg, results, ratios, notes)
