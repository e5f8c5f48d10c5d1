"""Worker of tests/test_losses_dist.py: one DDP rank computing triplet losses on its slice of a fixed batch.

    torchrun --nproc_per_node 2 --master_port PORT tests/_dist_loss_worker.py --out DIR

Each rank takes rows ``rank*B:(rank+1)*B`` of the global batch, runs every case (model x miner) through a
torch DDP model (gloo, float64) and saves the loss, stats, mined triplets (global indices) and the
DDP-averaged gradients to ``DIR/rank{r}.pt``. Rank 0 also saves the initial weights. The test computes
the same cases in one process on the whole batch (:func:`run_cases` without a process group) and compares.
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
from retrieval.config import LossConfig
from retrieval.losses import build_loss

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

    backbone = timm.create_model(
        "swinv2_tiny_window8_256",
        pretrained=False,
        img_size=64,
        window_size=4,
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        num_classes=0,
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
    torch.save({"world": world, "results": results}, args.out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(initial, args.out / "initial.pt")
    dist.destroy()


if __name__ == "__main__":
    main()
