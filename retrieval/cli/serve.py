"""``retrieval serve``: an HTTP JSON search service over an index (model and index loaded once).

    retrieval serve --index runs/sop/index                       # http://127.0.0.1:8080
    retrieval serve --index runs/sop/index --host 0.0.0.0 --port 9000 --max-batch 64 --path-root /data/queries
    curl -F image=@query.jpg 'http://127.0.0.1:8080/search?k=10'
    curl --data-binary @query.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8080/search?k=10'
    curl -H 'Content-Type: application/json' -d '{"path": "/data/queries/q.jpg", "k": 5}' http://127.0.0.1:8080/search
    curl http://127.0.0.1:8080/healthz
    retrieval serve --index runs/sop/index --admin-token "$TOKEN" --feedback-dir runs/sop/feedback
    curl -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/admin/reload
    curl -F image=@query.jpg -F result_id=17 -F same=false http://127.0.0.1:8080/feedback

One process, one model: concurrent requests are grouped into one forward pass (:mod:`retrieval.search.serve`).
A new version of the index folder (``retrieval index add|remove``) is answered from within ``--watch-s`` seconds,
or at once after ``POST /admin/reload``, without a restart and without a failed or mixed answer
(:mod:`retrieval.search.live`); ``--feedback-dir`` records users' judgements (``POST /feedback``) for
``retrieval feedback export``.
"""

from __future__ import annotations

import argparse
import logging

from retrieval import dist
from retrieval.errors import UserError
from retrieval.search.searcher import Searcher
from retrieval.search.serve import ServeOptions, create_app

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="folder written by `retrieval index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model", help="override the model recorded in the index (run folder or model.safetensors)")
    p.add_argument("--max-batch", type=int, default=32, help="images per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--path-root", help='JSON {"path": ...} queries must lie under this folder')
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--watch-s", type=float, default=2.0, help="check the index folder for a new version (0: off)")
    p.add_argument("--admin-token", help="enables POST /admin/reload for requests with Authorization: Bearer TOKEN")
    p.add_argument("--feedback-dir", help="enables POST /feedback: the folder of the append-only judgement log")
    p.add_argument("--feedback-max-mb", type=float, default=1024, help="the feedback log's bound (log + photos)")


# `serve` options passed to ServeOptions as they are
OPTIONS = ("max_batch", "max_wait_ms", "path_root", "watch_s", "admin_token", "feedback_dir")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    if not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1-65535, got {args.port}")
    given = {key: getattr(args, key) for key in OPTIONS}
    options = ServeOptions(**given, feedback_max_bytes=int(args.feedback_max_mb * 2**20))
    dist.use_cpu_share(0, "serve")  # torch threads from the CPUs this process has, not the host's cores
    searcher = Searcher(args.index, args.model, batch_size=args.max_batch, device=args.device)
    info = searcher.index.info
    log.info("serving %s (version %s, %d images) on http://%s:%d", args.index, info.get("version", 1), info["count"],
             args.host, args.port)  # fmt: skip
    uvicorn.run(create_app(searcher, options), host=args.host, port=args.port, log_level="warning")
    return 0
