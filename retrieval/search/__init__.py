"""Image-to-image search over an index folder, from Python and as an HTTP service.

Owns ``searcher`` (``Searcher``: the index's own model embeds the queries exactly as the catalogue was embedded;
the index answers), ``serve`` (the Starlette JSON service, concurrent requests batched) and ``serve_request`` (one
request read under the service's bounds: bytes, seconds, images, pixels, JSON, paths).
May import: ``index``, ``embed``, ``model``, ``data``, ``errors``.
"""
