"""Synthetic catalogues of embeddings for the scale benchmark, and the statistics that tie them to a trained model.

Two families (``--data``):

- ``trained`` (default): what a trained metric-learning model writes. Images of a product are its centre plus
  noise; centres gather around ``SUPERS`` super-class centres (SOP has 12 categories); all of it lives in a random
  ``LATENT``-dimensional subspace of d, plus a little isotropic noise (``ISO`` of the spread). 5 images per class
  (SOP: 5.3, the demo: 5). The parameters were set so that the statistics of :func:`describe` match the demo's
  trained multi-similarity model (``python -m bench.scale --compare runs/demo-long/run/emb-test`` prints both):
  within-class cosine, nearest other-class cosine, random-pair cosine, the share of a query's top 10 in its class,
  the dimensions holding 90 % of the variance and the TwoNN intrinsic dimension (Facco et al. 2017). Trained
  embeddings use a few dozen directions of their d; neighbours of a query are its class and the nearest classes
  of its category.
- ``isotropic``: N / 50 classes, each a random centre in all d dimensions plus noise 1.0-1.4 times its norm. Its
  intrinsic dimension is near d and a query's 10 nearest are near-ties among 49 class mates: the worst case for
  IVF and HNSW, and not what a model writes (TwoNN 35 at d = 256 where the demo model's is 9).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

D = 256
# steps run as separate processes: the family and its overrides travel through the environment
DATA = os.environ.get("BENCH_SCALE_DATA", "trained")
SUPERS, SUPER_WEIGHT, ISO = 12, 0.6, 0.2


@dataclass(frozen=True)
class Family:
    name: str
    per_class: int
    spread: tuple[float, float]  # noise norm / centre norm, uniform per class
    latent: int  # 0: all d dimensions


def family(name: str | None = None) -> Family:
    name = name or os.environ.get("BENCH_SCALE_DATA", DATA)
    base = {"trained": Family("trained", 5, (0.5, 0.8), 24), "isotropic": Family("isotropic", 50, (1.0, 1.4), 0)}
    if name not in base:
        raise SystemExit(f"--data: expected one of {sorted(base)}, got {name!r}")
    f = base[name]
    spread = os.environ.get("BENCH_SCALE_SPREAD")
    latent = os.environ.get("BENCH_SCALE_LATENT")
    return Family(
        f.name,
        f.per_class,
        tuple(float(v) for v in spread.split(",")) if spread else f.spread,
        int(latent) if latent else f.latent,
    )


@dataclass
class Classes:
    """The classes of a catalogue of n rows: centres (in the latent space), spreads and the subspace's basis."""

    fam: Family
    centre: np.ndarray
    spread: np.ndarray
    basis: np.ndarray | None  # d x latent, orthonormal columns


def centres(n: int, fam: Family | None = None, d: int = D) -> Classes:
    fam = fam or family()
    rng = np.random.default_rng([n, 0])
    count = max(n // fam.per_class, 10)
    spread = rng.uniform(*fam.spread, count).astype(np.float32)
    if not fam.latent:
        return Classes(fam, rng.standard_normal((count, d)).astype(np.float32), spread, None)
    basis = np.linalg.qr(rng.standard_normal((d, fam.latent)))[0].astype(np.float32)
    own = rng.standard_normal((count, fam.latent)).astype(np.float32)
    supers = rng.standard_normal((SUPERS, fam.latent)).astype(np.float32)
    centre = np.sqrt(SUPER_WEIGHT) * supers[rng.integers(0, SUPERS, count)] + np.sqrt(1 - SUPER_WEIGHT) * own
    return Classes(fam, centre.astype(np.float32), spread, basis)


def clustered(c: Classes, rows: int, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` new images of the classes (labels uniform), L2-normalised float32, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(c.centre), rows)
    noise = rng.standard_normal((rows, c.centre.shape[1]), dtype=np.float32)
    x = c.centre[labels] + c.spread[labels, None] * noise
    if c.basis is not None:
        d, latent = c.basis.shape
        x = x @ c.basis.T
        x += ISO * np.sqrt(latent / d) * c.spread[labels, None] * rng.standard_normal((rows, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


# --------------------------------------------------------------------------------------------- statistics
def describe(x: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, float]:
    """Neighbourhood statistics of a few thousand embeddings (all pairs: keep n small)."""
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    has = same.any(1)
    top = np.argsort(-s, axis=1)[:, :k]
    in_class = same[np.arange(len(x))[:, None], top].sum(1) / np.minimum(same.sum(1), k).clip(1)
    var = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    two = np.sqrt(np.clip(2 - 2 * np.sort(s, axis=1)[:, ::-1][:, :2], 1e-12, None))  # 2 nearest distances
    mu = two[:, 1] / two[:, 0]
    mu = mu[np.isfinite(mu) & (mu > 1)]
    return {
        "n": len(x),
        "d": x.shape[1],
        "within_class_cos": float(np.nanmean(np.where(same, s, np.nan)[has])),
        "nearest_other_class_cos": float(np.where(same, -np.inf, s).max(1).mean()),
        "random_pair_cos": float(s[np.isfinite(s)].mean()),
        "top10_in_class": float(in_class[has].mean()),
        "dims_90pct_variance": int(np.searchsorted(np.cumsum(var) / var.sum(), 0.9)) + 1,
        "twonn_dimension": float(len(mu) / np.log(mu).sum()),
    }


def compare(folder: str, fam: Family | None = None) -> str:
    """The statistics of an embeddings folder beside the synthetic family's at the same size and class count."""
    from retrieval.embed.embeddings import EmbeddingSet

    es = EmbeddingSet.load(folder)
    rows = np.sort(np.random.default_rng(0).permutation(len(es))[:4000])
    real = describe(es.embeddings[rows], es.labels[rows])
    per = len(es) / len(np.unique(es.labels))
    fam = fam or family()
    n = int(round(len(rows) / per * fam.per_class))  # the same number of classes as the sample
    synth = describe(*clustered(centres(n, fam), len(rows), [0, 1]))
    lines = [f"{'statistic':<26}{folder[-34:]:>36}{f'synthetic {fam.name}':>24}"]
    lines += [f"{key:<26}{real[key]:>36.3f}{synth[key]:>24.3f}" for key in real]
    return "\n".join(lines)
