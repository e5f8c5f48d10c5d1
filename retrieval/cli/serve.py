"""``retrieval serve``: an HTTP JSON search service over an index (model and index loaded once).

    retrieval serve --index runs/sop/index                       # http://127.0.0.1:8080
    retrieval serve --index runs/sop/index --host 0.0.0.0 --port 9000 --max-batch 64 --path-root /data/queries
    RETRIEVAL_SERVE_TOKEN=$(cat token) retrieval serve --index runs/sop/index --host 0.0.0.0  # bearer token
    curl -F image=@query.jpg 'http://127.0.0.1:8080/search?k=10'
    curl --data-binary @query.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8080/search?k=10'
    curl -H 'Content-Type: application/json' -d '{"path": "/data/queries/q.jpg", "k": 5}' http://127.0.0.1:8080/search
    curl http://127.0.0.1:8080/healthz
    curl -H "Authorization: Bearer $(cat token)" -F image=@query.jpg 'http://host:8080/search'   # with a token
    retrieval serve --index runs/sop/index --feedback-dir runs/sop/feedback --path-root /data/queries
    curl -X POST http://127.0.0.1:8080/admin/reload                     # load a new index version now
    curl -F image=@query.jpg -F result_id=17 -F same=false http://127.0.0.1:8080/feedback

One process, one model: concurrent requests are grouped into one forward pass (:mod:`retrieval.search.serve`).
Every request is bounded (bytes, seconds, images, pixels, JSON; README "Export and serve" lists the defaults).
A token is read from ``--token`` or, better (not visible in ``ps``), from ``RETRIEVAL_SERVE_TOKEN``.
A new version of the index folder (``retrieval index add|remove|build``) is answered from within ``--watch-s``
seconds, or at once after ``POST /admin/reload``, without a restart and without a failed or mixed answer
(:mod:`retrieval.search.live`); ``--feedback-dir`` records users' judgements (``POST /feedback``) for
``retrieval feedback export``.
"""

from __future__ import annotations

import argparse
import logging

from retrieval import cpus, dist
from retrieval.errors import UserError
from retrieval.search.searcher import Searcher
from retrieval.search.serve import ServeOptions, create_app

log = logging.getLogger(__name__)
TOKEN_ENV = "RETRIEVAL_SERVE_TOKEN"
# ServeOptions fields set by a flag of the same name (--max-batch -> max_batch; --body-timeout's dest says it)
OPTIONS = ("max_batch", "max_wait_ms", "max_bytes", "max_images", "max_pixels", "max_request_pixels")
OPTIONS += ("body_timeout_s", "decoders", "path_root", "watch_s", "feedback_dir")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="folder written by `retrieval index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model", help="override the model recorded in the index (run folder or model.safetensors)")
    d = ServeOptions()
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per forward pass (larger requests split)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument(
        "--path-root", help='allow JSON {"path": ...} queries, for files under this folder only (default: off)'
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="request body limit, counted while reading")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="pixels per image, from its header")
    p.add_argument(
        "--max-request-pixels", type=int, default=d.max_request_pixels, help="pixels per request, all images"
    )
    p.add_argument(
        "--body-timeout", dest="body_timeout_s", type=float, default=d.body_timeout_s, help="seconds to receive a body"
    )
    p.add_argument("--decoders", type=int, default=d.decoders, help="images decoded at a time (bounds memory)")
    p.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV} if set, else none)",
    )
    p.add_argument("--watch-s", type=float, default=d.watch_s, help="check the index folder for a new version (0: off)")
    p.add_argument("--feedback-dir", help="enables POST /feedback: the folder of the append-only judgement log")
    p.add_argument("--feedback-max-mb", type=float, default=1024, help="the feedback log's bound (log + photos)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    if not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1-65535, got {args.port}")
    options = _options(args)
    cpus.use_cpu_share(0, "serve")  # torch threads from the CPUs this process has, not the host's cores
    searcher = Searcher(args.index, args.model, batch_size=args.max_batch, device=args.device)
    info = searcher.index.info
    log.info("serving %s (version %s, %d images) on http://%s:%d", args.index, info.get("version", 1), info["count"],
             args.host, args.port)  # fmt: skip
    uvicorn.run(create_app(searcher, options), host=args.host, port=args.port, log_level="warning")
    return 0


def _options(args: argparse.Namespace) -> ServeOptions:
    token = args.token or dist.env(TOKEN_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("serving on %s without a token: anyone who reaches the port can search (--token)", args.host)
    given = {name: getattr(args, name) for name in OPTIONS}
    return ServeOptions(**given, token=token, feedback_max_bytes=int(args.feedback_max_mb * 2**20))
