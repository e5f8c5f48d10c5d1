"""DDP equivalence: 2 ranks x batch B (gloo, float64) == 1 process x batch 2B, for every miner and every loss.

Same mined triplets (global indices), same loss (the returned loss carries the ``* world_size`` factor,
``stats["loss"]`` does not) and same DDP-averaged gradients to 1e-10, for a Linear+normalise model and a
tiny SwinV2. Every other loss (multi_similarity, contrastive, supcon, proxy_anchor, and the cross-batch memory
with triplet/multi_similarity/contrastive/supcon) over several SGD steps: same loss, gradients (ProxyAnchor's
proxies' included) and memory after every step. The worker is ``tests/_dist_loss_worker.py``, started once with
torchrun.
"""

from __future__ import annotations

import sys

import _dist_loss_worker as worker
import pytest
import torch
from _launch import cpu_env, free_port, run

pytestmark = pytest.mark.dist
TOL = 1e-10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist_loss")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        worker.__file__,
        "--out",
        str(out),
    ]
    run(cmd, env=cpu_env(), timeout=300)
    initial = torch.load(out / "initial.pt")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    return [{"initial": initial, **r} for r in results]


def _single_process(kind: str, initial: dict) -> dict:
    model = worker.make_model(kind)
    model.load_state_dict(initial[kind])  # exactly rank 0's weights (DDP broadcast them)
    inputs, labels = worker.make_batch(kind)
    return worker.run_cases(kind, model, inputs, labels)


@pytest.mark.parametrize("kind", list(worker.CASES))
def test_ddp_equals_single_process(ranks: list[dict], kind: str) -> None:
    single = _single_process(kind, ranks[0]["initial"])
    for case, ref in single.items():
        assert ref["stats"]["num_triplets"] > 0, case
        for rank, result in enumerate(ranks):
            got = result["results"][kind][case]
            where = f"{kind} {case} rank {rank}"
            for mined, expected in zip(got["triplets"], ref["triplets"], strict=True):
                assert torch.equal(mined, expected), f"{where}: mined triplets differ"
            assert abs(got["loss"].item() - 2 * ref["loss"].item()) < TOL, where  # the * world_size factor
            assert abs(got["stats"]["loss"] - ref["stats"]["loss"]) < TOL, where
            assert got["stats"]["num_triplets"] == ref["stats"]["num_triplets"], where
            assert got["stats"]["active_fraction"] == pytest.approx(ref["stats"]["active_fraction"]), where
            for name, grad in ref["grads"].items():
                err = (got["grads"][name] - grad).abs().max().item()
                assert err < TOL, f"{where}: gradient of {name} differs by {err:.2e}"
        assert any(g.abs().max() > 0 for g in ref["grads"].values()), f"{kind} {case}: no gradient at all"


@pytest.mark.parametrize("name", list(worker.LOSSES))
def test_each_loss_and_memory_ddp_equals_single_process(ranks: list[dict], name: str) -> None:
    """2 ranks x 8 for 4 steps == 1 process x 16 for 4 steps: losses, DDP-averaged gradients, memories."""
    single = worker.run_loss(name)["steps"]
    for step, ref in enumerate(single):
        assert any(g.abs().max() > 0 for g in ref["grads"].values()), f"{name} step {step}: no gradient at all"
        for rank, result in enumerate(ranks):
            got = result["results"]["losses"][name]["steps"][step]
            where = f"{name} step {step} rank {rank}"
            assert abs(got["loss"].item() - 2 * ref["loss"].item()) < TOL, where  # the * world_size factor
            assert abs(got["stats"]["loss"] - ref["stats"]["loss"]) < TOL, where
            assert got["grads"].keys() == ref["grads"].keys(), where
            for key, grad in ref["grads"].items():
                err = (got["grads"][key] - grad).abs().max().item()
                assert err < TOL, f"{where}: gradient of {key} differs by {err:.2e}"
            if ref["memory"] is not None:
                assert torch.equal(got["memory"]["_extra_state"], ref["memory"]["_extra_state"]), where  # idx, filled
                for key in ("embedding_memory", "label_memory"):
                    err = (got["memory"][key] - ref["memory"][key]).abs().max().item()
                    assert err < TOL, f"{where}: memory {key} differs by {err:.2e}"
    if worker.LOSSES[name].xbm_size:
        assert single[-1]["memory"]["_extra_state"][1] == 1, f"{name}: the memory never wrapped"  # has_been_filled
    if name == "proxy_anchor":
        assert single[0]["grads"]["loss.proxies"].abs().max() > 0
