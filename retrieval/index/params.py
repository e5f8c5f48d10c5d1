"""How an index is searched: its parameters (IVF ``nprobe``, HNSW ``efSearch``: index.json holds them, a search may
override them) and the filter that keeps rows removed by ``retrieval index remove`` out of every answer (an IVF list
or an HNSW graph keeps them under negative ids: :mod:`retrieval.index.update`)."""

from __future__ import annotations

import contextlib

import faiss

LIVE_IDS = faiss.IDSelectorRange(0, 2**63 - 1)  # image ids are >= 0; a removed row of an IVF or HNSW has id < -1


def set_search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    """IVF ``nprobe`` (capped at nlist) and HNSW ``efSearch`` of a CPU index (IDMap-wrapped or not) or its GPU form."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and nprobe:
        ivf.nprobe = min(nprobe, ivf.nlist)
    elif nprobe and hasattr(faiss, "GpuParameterSpace"):  # placed on GPU(s): the GPU parameter space reaches it
        with contextlib.suppress(RuntimeError):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    if isinstance(inner, faiss.IndexHNSW) and ef_search:
        inner.hnsw.efSearch = ef_search


def live_params(index: faiss.Index) -> faiss.SearchParameters:
    """Search parameters that skip removed rows (:data:`LIVE_IDS`) and keep the index's nprobe / efSearch."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=LIVE_IDS, nprobe=ivf.nprobe)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=LIVE_IDS, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=LIVE_IDS)


def default_params(factory: str) -> dict[str, int]:
    """Search parameters stored in index.json; searches may override them."""
    params = {}
    if "IVF" in factory.upper():
        params["nprobe"] = 32
    if "HNSW" in factory.upper():
        params["ef_search"] = 128
    return params
