"""``retrieval search``: embed query images with the index's model and print their nearest catalogue images.

    retrieval search --index runs/sop/index --image query.jpg --k 10
    retrieval search --index runs/sop/index --image query.jpg --json     # for machines
    retrieval search --index runs/sop/index --queries data/synth/queries.txt --k 10
    retrieval search --index runs/sop/index --image query.jpg --nprobe 64     # override index.json's setting

``--queries`` takes an SOP-format list (``image_id class_id super_class_id path``, paths relative to the
list's folder; ``synth-sop --query-views N`` writes one of new photos of the test products). Its class ids
are the truth: the command then also reports how often the top hit, and any of the top k, is of the query's
class, shows a progress bar over the queries (on stderr) and saves that summary as ``INDEX/search-queries.json``,
where ``retrieval report`` finds it.
"""

from __future__ import annotations

import argparse
import json

from retrieval import cpus
from retrieval.errors import UserError
from retrieval.search.searcher import Searcher, read_queries, same_class_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="folder written by `retrieval index build`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", help="query image file(s)")
    what.add_argument("--queries", help="SOP-format list of query images with their class ids (e.g. queries.txt)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="override the model recorded in the index (run folder or model.safetensors)")
    p.add_argument("--batch-size", type=int, default=64, help="query images embedded per forward pass")
    p.add_argument("--force", action="store_true", help="search with a --model other than the index's own")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--nprobe", type=int, help="IVF lists searched (default: index.json's, tuned by --factory auto)")
    p.add_argument("--ef", type=int, help="HNSW efSearch (default: index.json's)")


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.batch_size < 1:
        raise UserError(f"--k and --batch-size: expected positive integers, got {args.k} and {args.batch_size}")
    images, classes = read_queries(args.queries) if args.queries else (args.image, None)
    cpus.use_cpu_share(0, "search")  # torch threads from the CPUs this process has, not the host's cores
    searcher = Searcher(args.index, args.model, args.batch_size, force=args.force)
    searcher.index.set_params(nprobe=args.nprobe, ef_search=args.ef)
    results = searcher.search(images, args.k, progress=args.queries is not None)
    summary = None
    if classes is not None:
        for res, c in zip(results, classes, strict=True):
            res["query_class_id"] = c
        summary = same_class_summary(results, classes)
        searcher.index.save_search_summary(summary, str(args.queries), args.k)  # for `retrieval report`
    if args.json:
        print(json.dumps(_payload(results, summary), indent=1))
        return 0
    _print_table(results[:5] if summary else results)
    if summary:
        if len(results) > 5:
            print(f"... {len(results) - 5} more queries (--json for all)")
        print(
            f"{summary['queries']} queries: the top hit is of the query's class for {100 * summary['top1_same_class']:.2f}%, "
            f"one of the top {args.k} for {100 * summary['topk_any_same_class']:.2f}%"
        )
    return 0


def _payload(results: list[dict], summary: dict | None) -> dict | list:
    if summary:
        return {"summary": summary, "queries": results}
    return results if len(results) > 1 else results[0]  # one --image prints its result alone


def _print_table(results: list[dict]) -> None:
    for res in results:
        print(f"query: {res['query']}")
        print(f"{'rank':>4}  {'image_id':>9}  {'class':>6}  {'score':>7}  path")
        for h in res["results"]:
            print(f"{h['rank']:>4}  {h['image_id']:>9}  {h['class_id']!s:>6}  {h['score']:>7.4f}  {h['path']}")
