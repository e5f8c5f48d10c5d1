"""Image-to-image search over an index folder, from Python and as an HTTP service.

Owns ``searcher`` (``Searcher``: the index's own model embeds the queries exactly as the catalogue was embedded;
the index answers) and ``serve`` (the Starlette JSON service, concurrent requests batched).
May import: ``index``, ``embed``, ``model``, ``data``, ``errors``.
"""
