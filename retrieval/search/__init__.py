"""Image-to-image search over an index folder, from Python and as an HTTP service.

Owns ``searcher`` (``Searcher``: the index's own model embeds the queries exactly as the catalogue was embedded;
the index answers), ``serve`` (the Starlette JSON service, concurrent requests batched), ``serve_request`` (one
request read under the service's bounds: bytes, seconds, images, pixels, JSON, paths), ``live`` (the service's
index, swapped for a new version of its folder without a restart), ``feedback`` (the append-only log of users'
judgements, ``POST /feedback`` in ``serve_feedback``) and ``feedback_export`` (the log as training input).
May import: ``index``, ``embed``, ``model``, ``data``, ``errors``.
"""
