"""``bench search-gpu``: exact self-search on one GPU with ``retrieval.knn.torch_search`` in every precision,
against the floor of the hardware measured in the same run.

- ``floor fp32`` / ``floor bf16``: the chunked matmul and ``torch.topk`` only (no self-exclusion, no re-scoring,
  results left on the GPU): what any torch implementation of this search must spend;
- ``ours <dtype>``: ``torch_search`` with the results left on the device (what a GPU evaluation uses), and
  ``+host`` with the copy of the N x k ids and scores into host memory;
and the recall@k of each precision's ids against fp32. Runs on CPU too (the smoke test), where some precisions
are not available; their error is reported instead.
"""

from __future__ import annotations

from typing import Any

import torch

from bench import common
from retrieval import knn

SIZES = {"tiny": (1500, 32, 100), "quick": (20_000, 256, 1000), "full": (60_502, 1024, 1000)}  # N, d, k (others)
CHUNK = 4096


def run(opts: common.Options) -> dict:
    n, d, k = SIZES[opts.level]
    dev = common.device()
    x = torch.randn(n, d, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    x /= x.norm(dim=1, keepdim=True)
    exclude = torch.arange(n).numpy()
    reps = common.Repeats(1, 3)
    results: dict[str, Any] = {}
    ids: dict[str, torch.Tensor] = {}
    for name, dt in (("floor fp32", torch.float32), ("floor bf16", torch.bfloat16)):
        results[name], _ = timed(lambda dt=dt: floor(x, k + 1, dt), reps)
    for dtype in knn.DTYPES:
        for host in (False, True) if dtype in ("fp32", "bf16x3") else (False,):
            name = f"ours {dtype}" + (" +host" if host else "")

            def search(dtype=dtype, host=host):
                return knn.torch_search(x, None, k, exclude=exclude, device=dev, dtype=dtype, to_host=host)

            try:
                results[name], (_, found) = timed(search, reps)
            except (RuntimeError, NotImplementedError) as e:  # e.g. no mm(out_dtype=) for bf16x3 on this device
                results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                break
            ids.setdefault(dtype, torch.as_tensor(found))
    recall = {f"{dt} vs fp32": recall_at_k(ids["fp32"], ids[dt]) for dt in ids if dt != "fp32"}
    ratios = {f"ours {dt} / {_floor_of(dt)} (seconds)": common.ratio(results[f"ours {dt}"], results[_floor_of(dt)]) for dt in ids}  # fmt: skip
    ratios["ours bf16x3 / ours fp32 (seconds)"] = common.ratio(results.get("ours bf16x3"), results.get("ours fp32"))
    notes = [
        f"{n} x {n} x {d} random unit vectors, top {k} others (self excluded by index), queries in chunks of {CHUNK}",
        "recall@k of the ids against fp32: " + ", ".join(f"{key} {v:.6f}" for key, v in recall.items()),
    ]
    config = {"n": n, "d": d, "k": k, "chunk": CHUNK, "recall_vs_fp32": recall}
    return common.publish("search-gpu", opts, config, results, ratios, notes)


def _floor_of(dtype: str) -> str:
    return "floor bf16" if dtype.startswith("bf16") else "floor fp32"


def floor(x: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Chunked ``x @ x.T`` + top-k and nothing else (ids stay on the device)."""
    xt = x.to(dtype).T
    ids = torch.empty((len(x), k), dtype=torch.int64, device=x.device)
    for q0 in range(0, len(x), CHUNK):
        ids[q0 : q0 + CHUNK] = torch.topk(x[q0 : q0 + CHUNK].to(dtype) @ xt, k, dim=1).indices
    return ids


def timed(fn, reps: common.Repeats) -> tuple[dict[str, Any], Any]:
    if common.cuda():
        torch.cuda.reset_peak_memory_stats()
    stats, out = common.time_calls(fn, reps)
    return stats | {"peak_mem_gb": common.peak_gb()}, out


def recall_at_k(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref = ref.sort(1).values
    pos = torch.searchsorted(ref, got.to(ref.device)).clamp_max(ref.shape[1] - 1)
    return float((ref.gather(1, pos) == got.to(ref.device)).float().mean())
