"""The index folder: a Faiss index over an embeddings set, built, saved, loaded once and searched.

Owns ``folder`` (``IndexFolder``: ``index.faiss`` + ``index.json`` + the catalogue's columns; id -> row) and
``auto`` (``--factory auto``: choose an index for N, d and a memory budget and tune it against exact search).
May import: ``embed.embeddings`` (numpy only), ``knn``, ``errors``, ``util``; never torch.
"""
