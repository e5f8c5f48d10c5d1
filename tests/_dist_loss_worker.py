"""Worker of tests/test_losses_dist.py: one DDP rank computing every loss on its slice of a fixed batch.

    torchrun --nproc_per_node 2 --master_port PORT tests/_dist_loss_worker.py --out DIR

Each rank takes rows ``rank*B:(rank+1)*B`` of the global batch, runs every case (model x miner) through a
torch DDP model (gloo, float64) and saves the loss, stats, mined triplets (global indices) and the
DDP-averaged gradients to ``DIR/rank{r}.pt``. Rank 0 also saves the initial weights. The test computes
the same cases in one process on the whole batch (:func:`run_cases` without a process group) and compares.
The other losses (:data:`LOSSES`) run on the linear model, each for :data:`STEPS` steps of plain SGD with batches
that change every step, so that the cross-batch memory fills, wraps around and is compared after each step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as td  # a test worker builds its own world; library code goes through retrieval.dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from retrieval import dist
from retrieval.config.schema import LossConfig
from retrieval.losses import build_loss, trainable

MARGIN = 0.5
CASES = {
    "linear": [
        ("batch_hard", "cosine"),
        ("semi_hard", "cosine"),
        ("all", "cosine"),
        ("batch_hard", "squared_l2"),
        ("semi_hard", "squared_l2"),
        ("all", "squared_l2"),
        ("seed", "cosine"),
    ],
    "swin": [("batch_hard", "cosine"), ("semi_hard", "cosine"), ("all", "cosine"), ("seed", "cosine")],
}
NUM_CLASSES = 8
STEPS = 4
LOSSES = {  # name -> loss config; xbm_size 40 = 2.5 gathered batches of 16: the queue wraps at step 3
    "multi_similarity": LossConfig(name="multi_similarity"),
    "contrastive": LossConfig(name="contrastive"),
    "contrastive_l2": LossConfig(name="contrastive", distance="squared_l2", pos_margin=0.0, neg_margin=1.0),
    "supcon": LossConfig(name="supcon"),
    "proxy_anchor": LossConfig(name="proxy_anchor", num_classes=NUM_CLASSES),
    "xbm_triplet": LossConfig(name="triplet", miner="batch_hard", margin=MARGIN, xbm_size=40, xbm_start_step=1),
    "xbm_multi_similarity": LossConfig(name="multi_similarity", xbm_size=40),
    "xbm_contrastive": LossConfig(name="contrastive", xbm_size=40, xbm_start_step=1),
    "xbm_supcon": LossConfig(name="supcon", xbm_size=40, xbm_weight=0.5),
}


class LinearEmbedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x), dim=-1)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return LinearEmbedder().double()
    import timm
    from conftest import tiny_model, tiny_timm_kwargs  # configs/tiny.yaml's SwinV2

    backbone = timm.create_model(
        tiny_model()["name"],
        **tiny_timm_kwargs(),
        drop_path_rate=0.0,
    )  # timm's SwinV2 default is 0.1: random in train mode
    return backbone.double()


def make_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch (2 ranks x B); some classes have images on both ranks, so mining must cross ranks."""
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 4, 4, 5, 5, 2, 6])
        return torch.randn(len(labels), 6, generator=g, dtype=torch.float64), labels
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    return torch.randn(len(labels), 3, 64, 64, generator=g, dtype=torch.float64), labels


def run_cases(kind: str, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, dict]:
    out = {}
    for step, (miner, distance) in enumerate(CASES[kind]):
        model.zero_grad(set_to_none=True)
        criterion = build_loss(LossConfig(miner=miner, distance=distance, margin=MARGIN), seed=3)
        loss, stats = criterion(model(inputs), labels, step=step)
        loss.backward()
        params = model.module if isinstance(model, DistributedDataParallel) else model
        out[f"{miner}/{distance}"] = {
            "loss": loss.detach().clone(),
            "stats": stats,
            "triplets": [t.clone() for t in criterion.last_triplets],
            "grads": {k: p.grad.detach().clone() for k, p in params.named_parameters()},
        }
    return out


def step_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear model's global batch of training step ``step`` (labels in [0, NUM_CLASSES))."""
    g = torch.Generator().manual_seed(100 + step)
    labels = torch.randperm(NUM_CLASSES, generator=g)[torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 4, 4, 5, 5, 2, 6])]
    return torch.randn(len(labels), 6, generator=g, dtype=torch.float64), labels


def run_loss(name: str, rank: int = 0, world: int = 1) -> dict:
    """``STEPS`` SGD steps of loss ``name`` on the linear model (DDP when distributed): per step the loss, stats,
    gradients (the proxies' included) and the memory's state."""
    model = make_model("linear")
    criterion = build_loss(LOSSES[name], seed=5, embedding_size=5).double()
    if trainable(criterion) is not None:
        model.add_module(
            "loss", trainable(criterion)
        )  # as retrieval.train.build does: DDP reduces the proxies' gradient
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for step in range(STEPS):
        inputs, labels = step_batch(step)
        b = len(labels) // world
        local = slice(rank * b, (rank + 1) * b)
        opt.zero_grad(set_to_none=True)
        loss, stats = criterion(ddp(inputs[local]), labels[local], step=step)
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
        memory = (
            None
            if criterion.memory is None
            else {k: v.clone() if torch.is_tensor(v) else v for k, v in criterion.memory.state_dict().items()}
        )
        steps.append({"loss": loss.detach().clone(), "stats": stats, "grads": grads, "memory": memory})
    return {"steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    td.init_process_group(backend=dist.backend_for("cpu"))
    rank, world = dist.rank(), dist.world_size()
    results, initial = {}, {}
    for kind in CASES:
        model = make_model(kind)
        initial[kind] = {k: v.clone() for k, v in model.state_dict().items()}
        inputs, labels = make_batch(kind)
        b = len(labels) // world
        local = slice(rank * b, (rank + 1) * b)
        results[kind] = run_cases(kind, DistributedDataParallel(model), inputs[local], labels[local])
    results["losses"] = {name: run_loss(name, rank, world) for name in LOSSES}
    torch.save({"world": world, "results": results}, args.out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(initial, args.out / "initial.pt")
    dist.destroy()


if __name__ == "__main__":
    main()
