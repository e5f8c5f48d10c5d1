"""Exact self-search on one GPU with the torch backend: every precision, against the floor of the hardware.

    python -m retrieval.bench.search_gpu OUT_DIR [N D K_INCLUDING_SELF]     # default 60502 1024 1001 (SOP test)

Times, side by side in one run (1 warm-up + 3 timed runs each, medians):
- ``floor fp32`` / ``floor bf16``: only the chunked matmul and ``torch.topk`` (no self-exclusion, no
  re-scoring, results left on the GPU): what any torch implementation of this search must spend;
- ``ours <dtype>``: :func:`retrieval.knn.torch_search` with the results left on the GPU (``to_host=False``,
  what a GPU evaluation uses) for fp32, tf32, bf16 (+ fp32 re-scoring of the candidates) and bf16x3;
- ``ours <dtype> +host``: the same with the copy of the N x k ids and scores into host memory.
and the recall@k of each precision's neighbour ids against fp32's. Writes ``OUT_DIR/bench-search-gpu.json``.
Needs only torch (Faiss is not imported when it is absent: CUDA 13 hosts have no Faiss GPU wheel).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch

CHUNK = 4096


def _import_knn():
    if importlib.util.find_spec("faiss") is None:  # retrieval.knn imports faiss; its torch backend never calls it
        sys.modules["faiss"] = types.ModuleType("faiss", "placeholder: Faiss is not installed on this host")
    from retrieval import knn

    return knn


def floor_search(x: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Chunked ``x @ x.T`` + top-k and nothing else (ids stay on the device)."""
    xt = x.to(dtype).T
    ids = torch.empty((len(x), k), dtype=torch.int64, device=x.device)
    for q0 in range(0, len(x), CHUNK):
        ids[q0 : q0 + CHUNK] = torch.topk(x[q0 : q0 + CHUNK].to(dtype) @ xt, k, dim=1).indices
    return ids


def _recall(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref = ref.sort(1).values
    pos = torch.searchsorted(ref, got).clamp_max(ref.shape[1] - 1)
    return float((ref.gather(1, pos) == got).float().mean())


def run(out_dir: Path, n: int, d: int, k_with_self: int) -> dict:
    from retrieval.bench import common

    knn = _import_knn()
    k = k_with_self - 1  # self is excluded by index: the top k others == the top k+1 including self
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=g)
    x /= x.norm(dim=1, keepdim=True)
    exclude = torch.arange(n).numpy()
    results: dict[str, Any] = {}
    ids: dict[str, torch.Tensor] = {}
    for name, dt in (("floor fp32", torch.float32), ("floor bf16", torch.bfloat16)):
        stat, _ = common.time_calls(lambda dt=dt: floor_search(x, k_with_self, dt), 3, device, 1, peak_memory=True)
        results[name] = stat | {"queries_per_s": n / stat["min"]}
    for dtype in knn.DTYPES:
        for host in (False, True) if dtype in ("fp32", "bf16x3") else (False,):

            def fn(dtype=dtype, host=host):
                return knn.torch_search(x, None, k, exclude=exclude, device=device, dtype=dtype, to_host=host)

            try:
                stat, (_, found) = common.time_calls(fn, 3, device, 1, peak_memory=True)
            except (RuntimeError, NotImplementedError) as e:  # e.g. a torch without mm(out_dtype=) on CUDA
                results[f"ours {dtype}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                break
            name = f"ours {dtype}" + (" +host" if host else "")
            results[name] = stat | {"queries_per_s": n / stat["min"]}
            if not host:
                ids[dtype] = found
    recall = {f"{dt} vs fp32": _recall(ids["fp32"], ids[dt]) for dt in ids if dt != "fp32"}
    ratios = {
        f"ours {dt} / floor {'bf16' if dt.startswith('bf16') else 'fp32'} seconds": common.ratio(
            results.get(f"ours {dt}"), results["floor bf16" if dt.startswith("bf16") else "floor fp32"]
        )
        for dt in ids
    }
    ratios["ours bf16x3 / ours fp32 seconds"] = common.ratio(results.get("ours bf16x3"), results.get("ours fp32"))
    payload = common.envelope(
        "search-gpu",
        "full" if n >= 60_000 else "tiny",
        device,
        {"n": n, "d": d, "k_including_self": k_with_self, "chunk": CHUNK},
        {"exact": results},
        {key: v for key, v in ratios.items() if v is not None},
        [
            f"{n} x {n} x {d} random unit vectors, top {k} others (self excluded by index), 1 warm-up + 3 timed runs",
            "floor = chunked matmul + torch.topk only; ours = retrieval.knn.torch_search, results left on the "
            "device unless '+host'",
            "recall@k of the neighbour ids against fp32: "
            + ", ".join(f"{key} {value:.6f}" for key, value in recall.items()),
        ],
        recall_vs_fp32=recall,
    )
    return common.publish(out_dir, payload)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 4):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    sizes = [int(v) for v in argv[1:]] or [60502, 1024, 1001]
    run(Path(argv[0]), *sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
