"""Exact search backends against brute force in float64 numpy (ids and scores), self excluded by index."""

import numpy as np
import pytest
import torch

from retrieval import knn


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q: np.ndarray, xb: np.ndarray, k: int, metric: str, exclude: np.ndarray | None):
    """float64 reference: full score matrix, excluded index set to the worst value, stable argsort."""
    q64, x64 = q.astype(np.float64), xb.astype(np.float64)
    if metric == "ip":
        s = q64 @ x64.T
    else:
        s = -((q64**2).sum(1)[:, None] + (x64**2).sum(1)[None] - 2 * q64 @ x64.T)
    if exclude is not None:
        s[np.arange(len(q)), exclude] = -np.inf
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    sc = np.take_along_axis(s, ids, 1)
    return (sc if metric == "ip" else -sc), ids, s


def _check(got, want, s_full, k: int, metric: str, tol: float = 1e-5) -> None:
    scores, ids = got
    ref_scores, ref_ids, _ = want
    assert scores.shape == ids.shape == ref_ids.shape
    np.testing.assert_allclose(scores, ref_scores, atol=tol)
    # ids identical except where the reference's neighbours are within tolerance of each other (near-ties)
    sorted_s = -np.sort(-s_full, axis=1)
    gaps = np.minimum(np.abs(np.diff(sorted_s[:, : k + 1], axis=1)).min(1), np.inf)
    clear = gaps > 1e-5
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])
    # and every returned id really has the returned score
    assert np.all(ids >= 0)


CASES = [
    ("faiss", {}),
    ("faiss_shards", {"backend": "faiss", "shards": 3}),
    ("torch", {"backend": "torch", "symmetric": False, "device": "cpu"}),
    ("torch_sym", {"backend": "torch", "symmetric": True, "device": "cpu", "chunk": 64}),
    ("auto", {"backend": "auto"}),
]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_self_search_matches_brute_force(name, kw, metric):
    kw = dict(kw)
    kw.setdefault("backend", "faiss")
    x = _unit(700, 24, seed=1)
    if metric == "l2":
        x = x * np.random.default_rng(5).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    k = 50
    want = _brute(x, x, k, metric, np.arange(len(x)))
    got = knn.search(x, None, k, metric=metric, **kw)
    _check(got, want, want[2], k, metric)
    assert not np.any(got[1] == np.arange(len(x))[:, None])


@pytest.mark.parametrize("name,kw", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_query_vs_database(name, kw):
    kw = dict(kw)
    kw.setdefault("backend", "faiss")
    kw.pop("symmetric", None)
    q, xb = _unit(90, 16, seed=2), _unit(500, 16, seed=3)
    want = _brute(q, xb, 20, "ip", None)
    _check(knn.search(q, xb, 20, **kw), want, want[2], 20, "ip")


def test_symmetric_small_tiles_and_starved_rows():
    """Tiles smaller than the data, and a floor so high that every row falls back to exact search."""
    x = _unit(300, 8, seed=4)
    want = _brute(x, x, 30, "ip", np.arange(300))
    for target in (1.5, 0.2):
        got = knn.symmetric_self_search(x, 30, tile=64, sample=128, target=target)
        _check(got, want, want[2], 30, "ip")


@pytest.mark.parametrize(
    "kw",
    [
        {"backend": "faiss"},
        {"backend": "faiss", "shards": 2},
        {"backend": "torch", "symmetric": False, "device": "cpu"},
        {"backend": "torch", "symmetric": True, "device": "cpu"},
    ],
)
def test_duplicates_exclude_self_by_index(kw):
    """Exact duplicates tie with the query itself: the duplicate stays, the query's own row goes."""
    base = _unit(40, 8, seed=6)
    x = np.concatenate([base, base, base[:5]])  # rows i, i+40 (and i+80 for i<5) are identical
    k = 3
    scores, ids = knn.search(x, None, k, **kw)
    n = len(x)
    assert not np.any(ids == np.arange(n)[:, None])
    for i in range(n):
        twins = {j for j in range(n) if j != i and np.array_equal(x[j], x[i])}
        assert twins <= set(ids[i].tolist()), (i, twins, ids[i])
        np.testing.assert_allclose(scores[i, : len(twins)], 1.0, atol=1e-6)


def test_bf16_ranking_rescored_exactly():
    x = _unit(400, 32, seed=7)
    want = _brute(x, x, 10, "ip", np.arange(400))
    scores, ids = knn.torch_search(x, None, 10, exclude=np.arange(400), dtype="bf16", chunk=128)
    # scores are exact fp32 re-scores of whatever was found; recall vs exact is near 1
    found = np.array([len(set(a) & set(b)) for a, b in zip(ids, want[1], strict=True)]).mean() / 10
    assert found > 0.97
    exact = np.einsum("nd,nkd->nk", x.astype(np.float64), x[ids].astype(np.float64))
    np.testing.assert_allclose(scores, exact, atol=1e-5)


def test_bad_k():
    x = _unit(10, 4, seed=0)
    with pytest.raises(ValueError, match="k=10"):
        knn.search(x, None, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16", "bf16x3"])
def test_torch_cuda(dtype):
    x = _unit(2000, 64, seed=8)
    want = _brute(x, x, 20, "ip", np.arange(2000))
    scores, ids = knn.search(x, None, 20, backend="torch", device="cuda", dtype=dtype)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, want[1], strict=True)])
    assert recall > (0.999 if dtype == "fp32" else 0.97)


def test_torch_results_on_device_equal_host_and_bf16x3_is_fp32_on_cpu():
    x = _unit(700, 24, seed=9)
    want_s, want_i = knn.torch_search(x, None, 15, exclude=np.arange(700), chunk=256)
    s, i = knn.torch_search(x, None, 15, exclude=np.arange(700), chunk=256, to_host=False)
    assert isinstance(i, torch.Tensor) and np.array_equal(i.numpy(), want_i) and np.allclose(s.numpy(), want_s)
    s3, i3 = knn.torch_search(x, None, 15, exclude=np.arange(700), chunk=256, dtype="bf16x3")
    assert np.array_equal(i3, want_i) and np.array_equal(s3, want_s)  # no bf16 tensor cores on CPU: plain fp32


@pytest.mark.parametrize("impl", ["stream_topk", "torch_search_blocks"])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_block_streamed_search_matches_brute_force(impl, k):
    """The streamed searches (the index tuner's numpy one, eval's torch one) over uneven blocks with ids that are
    not row numbers: the same ids and scores as the full float64 ranking; an exact duplicate of a query ranks first
    whichever block holds it, and ties keep the order rows were seen in."""
    xb, q = _unit(2000, 24, 0), _unit(120, 24, 1)
    xb[1500], xb[1700] = q[3], q[3]  # two exact duplicates of one query, in later blocks
    ids = np.arange(2000) * 7 + 5
    bounds = [0, 13, 400, 1000, 1001, 1600, 2000]
    blocks = [(ids[a:b], xb[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    kw = {"score_bytes": 4 * 600 * 37} if impl == "stream_topk" else {"chunk": 37}
    scores, found = getattr(knn, impl)(q, blocks, k, **kw)
    ref_s, ref_rows, s_full = _brute(q, xb, k, "ip", None)
    _check((scores, (found - 5) // 7), (ref_s, ref_rows, s_full), s_full, k, "ip")
    assert list(found[3, :2]) == [ids[1500], ids[1700]][:k]
