"""The plainest peer of ``retrieval train``: pytorch-metric-learning's own trainer, as a user of it would write it.

``trainers.MetricLossOnly`` with ``samplers.MPerClassSampler`` over a ``Dataset`` of JPEG files, a torch AdamW with
a head/backbone lr split, a warmup + cosine ``LambdaLR`` stepped every iteration, gradient clipping, and
``testers``' usual ``AccuracyCalculator`` on the test images at the end. Run by ``bench/peer.py`` in its own
process, beside the product's trainer on the same JPEG bytes, classes, starting weights, loss and budget:

    python bench/peer_loop.py --config configs/demo.yaml --images IMAGES --seed 0 --out result.json

``IMAGES`` holds ``train/<label>/<id>.jpg`` and ``test/<label>/<id>.jpg`` (bench/peer.py extracts them from the
shards). The result JSON: loop images/s per window of ``--window`` iterations, the whole script's seconds (model
build, train, test), test precision@1 (= Recall@1 with the query excluded) and the test embeddings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.config.io import load_config  # noqa: E402
from retrieval.data.input_spec import InputSpec  # noqa: E402
from retrieval.data.transforms import eval_transform, train_transform  # noqa: E402
from retrieval.model.network import initial_model  # noqa: E402


class JpegFolder(torch.utils.data.Dataset):
    """``root/<label>/<id>.jpg`` -> (transformed image, label): a plain map-style dataset over files."""

    def __init__(self, root: Path, transform) -> None:
        self.files = sorted(root.glob("*/*.jpg"), key=lambda p: (int(p.parent.name), p.name))
        self.labels = [int(p.parent.name) for p in self.files]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


def optimizer_and_schedule(model: torch.nn.Module, cfg, total_steps: int, kernels: dict[str, bool]):
    """AdamW: the projection head at optim.lr, the backbone at optim.backbone_lr, no weight decay on 1-d parameters
    (norms, biases); warmup then cosine to optim.min_lr_ratio, per iteration. ``kernels``: torch's AdamW keywords
    (none: torch's default, a Python loop over the tensors on CPU, foreach on CUDA; ``{"fused": True}``)."""
    groups = []
    for part, lr in (("backbone.", cfg.optim.backbone_lr), ("head.", cfg.optim.lr)):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith(part)]
        groups.append({"params": [p for n, p in named if p.ndim > 1], "lr": lr, "weight_decay": cfg.optim.weight_decay})
        groups.append({"params": [p for n, p in named if p.ndim <= 1], "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=tuple(cfg.optim.betas), **kernels)
    warmup, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(cfg, images: Path, seed: int, window: int, kernels: dict[str, bool]) -> tuple[torch.nn.Module, list[float]]:
    from pytorch_metric_learning import losses, samplers, trainers

    model = initial_model(cfg)  # the same seeded starting weights as `retrieval train` (train.seed)
    spec = InputSpec.of(model, cfg.data)
    dataset = JpegFolder(images / "train", train_transform(spec, cfg.data))
    p, k = cfg.data.classes_per_batch, cfg.data.images_per_class
    steps = cfg.data.steps_per_epoch
    sampler = samplers.MPerClassSampler(dataset.labels, m=k, batch_size=p * k, length_before_new_iter=steps * p * k)
    optimizer, schedule = optimizer_and_schedule(model, cfg, steps * cfg.train.epochs, kernels)
    loss = losses.MultiSimilarityLoss(alpha=cfg.loss.ms_alpha, beta=cfg.loss.ms_beta, base=cfg.loss.ms_base)
    trunk, embedder = model.backbone, torch.nn.Sequential(model.head, Normalize())
    stamps: list[tuple[int, float]] = []  # (iterations done, when): every `window` iterations of the whole run
    done = itertools.count(1)

    def every_iteration(trainer) -> None:
        # counted here, not by trainer.iteration: that restarts at 0 every epoch, and a window across an epoch's end
        # (the loader's restart included) was counted as `window` iterations where it held fewer
        n = next(done)
        if n % window == 0:
            stamps.append((n, time.perf_counter()))

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={"trunk_optimizer": optimizer},
        batch_size=p * k,
        loss_funcs={"metric_loss": loss},
        dataset=dataset,
        sampler=sampler,
        iterations_per_epoch=steps,
        dataloader_num_workers=cfg.data.num_workers,
        lr_schedulers={"trunk_scheduler_by_iteration": schedule},
        gradient_clippers={
            "trunk_grad_clipper": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        },
        end_of_iteration_hook=every_iteration,
    )
    # the augmentations' draws (torch) and the sampler's: pml's MPerClassSampler draws from the global numpy
    # generator (c_f.NUMPY_RANDOM), which torch.manual_seed leaves unseeded: the peer was not repeatable without it
    torch.manual_seed(seed)
    np.random.seed(seed)
    trainer.train(num_epochs=cfg.train.epochs)
    rates = [(n1 - n0) * p * k / (t1 - t0) for (n0, t0), (n1, t1) in zip(stamps, stamps[1:], strict=False)]
    return model, rates


class Normalize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=-1)


@torch.no_grad()
def test(model: torch.nn.Module, cfg, images: Path) -> tuple[float, np.ndarray, np.ndarray]:
    """Test precision@1 with pml's AccuracyCalculator (each query excluded from its own references)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    model.eval()
    spec = InputSpec.of(model, cfg.data)
    dataset = JpegFolder(images / "test", eval_transform(spec))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
    emb = torch.cat([model(x) for x, _ in loader])
    labels = torch.tensor(dataset.labels)
    calc = AccuracyCalculator(include=("precision_at_1",), k=1)
    acc = calc.get_accuracy(emb, labels, ref_includes_query=True)
    return float(acc["precision_at_1"]), emb.numpy(), labels.numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=25, help="iterations per images/s window")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--adamw", choices=("default", "foreach", "fused"), default="default", help="AdamW's kernels")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    cfg = load_config(a.config, [*a.overrides, f"train.seed={a.seed}"])
    # torch.optim.AdamW's own keywords, as a user of pml writes them (bench/ imports no trainer internals)
    kernels = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[a.adamw]
    model, rates = train(cfg, a.images, a.seed, a.window, kernels)
    precision, emb, labels = test(model, cfg, a.images)
    seconds = time.perf_counter() - start
    np.save(a.out.with_suffix(".emb.npy"), emb)
    np.save(a.out.with_suffix(".labels.npy"), labels)
    result = {"rates": rates, "seconds": seconds, "precision_at_1": precision, "threads": torch.get_num_threads()}
    a.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
