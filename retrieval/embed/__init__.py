"""Embeddings: the embeddings-set artifact, embedding a split rank-sharded, and the Python ``Embedder``.

Owns ``embeddings`` (``EmbeddingSet``: numpy only, so eval and index build never import torch), ``_store`` (the
set's files: merged or parted layout, the part writer, memory-mapped parts; imported by ``embeddings`` only),
``sharded`` (each rank embeds its shards into parts; rank 0 checks completeness and writes ``meta.json`` last)
and ``embedder`` (a model loaded once embeds paths, PIL images or tensors).
May import: ``model``, ``data``, ``knn``, ``dist``, ``config``, ``errors``, ``util``. This ``__init__`` imports
nothing, so that ``retrieval.embed.embeddings`` stays free of torch.
"""
