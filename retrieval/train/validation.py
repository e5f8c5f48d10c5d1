"""Validation during training: embed the val split rank-sharded, score it on rank 0, record the selection.

On a small catalogue a validation costs more in decoding and transforming the val images than in the model's
forward pass, and it does so again at every validation although nothing in it changed: the eval transform is
deterministic and the split is the same. Each rank therefore keeps its prepared val batches in memory after the
first validation when they fit ``data.val_cache_mb`` (:class:`BatchCache`), and later validations only run the
model. A split too large for the budget (SOP's 11k val images at 224 px are ~6.6 GB) streams every time, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from retrieval import dist
from retrieval.config.schema import Config
from retrieval.data.loader import Reader, eval_loader
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.embed.sharded import embed_split, gather_embeddings
from retrieval.errors import UserError
from retrieval.metrics import retrieval_metrics
from retrieval.run_folder import TrainerState
from retrieval.train import log as runlog
from retrieval.train import select
from retrieval.train.skips import check_skipped

log = logging.getLogger(__name__)


class BatchCache:
    """A loader's batches, kept after one complete pass when their images fit ``budget`` bytes (0: never kept)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.kept: list[dict] | None = None

    def batches(self, make_loader: Callable[[], Iterable[dict]]) -> Iterator[dict]:
        """The kept batches, else a fresh loader's (recorded on the way while they fit the budget)."""
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[dict] | None = [] if self.budget > 0 else None
        size = 0
        for batch in make_loader():
            if kept is not None:
                size += batch["image"].numel() * batch["image"].element_size()
                if size <= self.budget:
                    kept.append(batch)
                else:  # over budget: this split streams at every validation
                    kept = None
            yield batch
        self.kept = kept  # only a pass that ran to its end is kept


class Validation:
    """The run's validations: the val split embedded by the weights a run selects on, scored, logged, selected."""

    def __init__(self, cfg: Config, accelerator, spec, mlog: runlog.MetricsLog) -> None:
        self.cfg, self.accelerator, self.spec, self.mlog = cfg, accelerator, spec, mlog
        self.cache = BatchCache(cfg.data.val_cache_mb * 2**20)
        self.last: EmbeddingSet | None = None  # the last validation's embeddings (rank 0): the wandb failure gallery

    def run(self, module: torch.nn.Module, state: TrainerState) -> bool:
        """Embed and score at ``state.global_step``; returns True on every rank if the selection improved."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            log.info(
                "validation at step %d: embedding split %r on %d process(es)",
                *(state.global_step, cfg.data.val_split, acc.num_processes),
            )
        merged, skipped = self._embed(module)
        improved = False
        if acc.is_main_process:
            metrics = retrieval_metrics(
                merged.embeddings,
                merged.labels,
                ks=tuple(cfg.eval.ks),
                backend=cfg.eval.backend,
                chunk=cfg.eval.chunk,
                dtype=cfg.eval.dtype,
            )
            improved = self._select(state, {**metrics, "skipped": skipped})
            self.last = merged
        keys = ("best_metric", "best_step", "top_metric", "evals_since_best", "last_metric", "last_step", "val_queries")
        improved, shared = dist.broadcast_object((improved, {k: getattr(state, k) for k in keys}))
        for key, value in shared.items():  # every rank decides alike what comes next (selection, a stop's validation)
            setattr(state, key, value)
        return improved

    def _embed(self, module: torch.nn.Module) -> tuple[EmbeddingSet | None, int]:
        """The val split embedded rank-sharded (from the cache after the first pass), merged on rank 0; skipped
        samples over all ranks, checked against their budget."""
        cfg, acc = self.cfg, self.accelerator
        reader = Reader(acc.process_index, acc.num_processes)

        def loader():
            batch, workers = cfg.data.eval_batch_size, cfg.data.num_workers
            return eval_loader(
                cfg.data.shards, cfg.data.val_split, self.spec, batch, workers, reader, cfg.data.label_key
            )

        local = embed_split(
            module,
            cfg.data.shards,
            cfg.data.val_split,
            self.spec,
            cfg.data.eval_batch_size,
            cfg.data.num_workers,
            acc.device,
            acc.mixed_precision,
            batches=self.cache.batches(loader),
        )
        merged = gather_embeddings(local)
        skipped = int(sum(dist.all_gather_object(int(local.meta["skipped"]))))
        read = skipped + int(dist.all_reduce_sum(torch.tensor(len(local))).item())
        check_skipped(skipped, read, cfg.data.max_skipped_fraction, f"{cfg.data.val_split} samples")
        return merged, skipped

    def _select(self, state: TrainerState, metrics: dict) -> bool:
        """Log a val record and update the selection (main process); True if it improved."""
        train = self.cfg.train
        name = select.scored_metric(train, tuple(self.cfg.eval.ks))
        record = {
            "kind": "val",
            "step": state.global_step,
            "epoch": state.epoch,
            "samples": state.samples_seen,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        self.mlog.write(record)
        log.info(runlog.console(record))
        if name not in metrics:
            raise UserError(f"train.select_metric: {name!r} is not a metric; known: {sorted(metrics)}")
        value, queries = float(metrics[name]), int(metrics.get("num_queries", 0))
        if state.last_step is None:  # the run's first validation: is the split large enough to select with?
            select.warn_if_noisy(name, value, queries, train)
        return state.record_eval(value, queries, select_last=train.select_metric == select.LAST)
