"""Which weights a run exports as its model, and how much the choice means.

``train.select_metric`` names the validation metric that picks ``best`` (the run root's ``model.safetensors``): the
latest validation within one standard error (below) of the highest so far, since the val split cannot tell those
apart and the later weights trained longer (:meth:`retrieval.run_folder.TrainerState.record_eval`);
``last`` exports the last validated weights instead (each validation then becomes ``best``). Either way the summary
and the report show both: the best validation and the last one, with their steps.

A validation metric is a mean over the val split's queries of values in [0, 1] (Recall@K is 0 or 1 per query), so
its standard error is at most ``sqrt(p (1 - p) / n)`` for n queries. When the 95 % half-width (1.96 x that) is
:data:`NOISY` or more, checkpoints closer than it cannot be told apart, and the val-selected ``best`` may be worse
than the last weights on test (issue 29: on real glyphs, 1 process, test R@1 14.6 for ``best`` against 20.8 for the
final weights): the run warns once, at its first validation, and names the way out.
"""

from __future__ import annotations

import logging
import math

from retrieval.config.schema import TrainConfig
from retrieval.run_folder import TrainerState
from retrieval.util import standard_error

log = logging.getLogger(__name__)

LAST = "last"
NOISY = 0.01  # a 95 % half-width of one point: the differences between checkpoints are often that small


def scored_metric(train: TrainConfig, ks: tuple[int, ...]) -> str:
    """The metric validations are scored by: ``train.select_metric``, or with ``last`` the first Recall@K."""
    return f"recall@{ks[0]}" if train.select_metric == LAST else train.select_metric


def warn_if_noisy(name: str, value: float, n: int, train: TrainConfig) -> None:
    """One warning when the val split is too small for the selection to mean much (module docstring)."""
    half = 1.96 * standard_error(value, n)
    if half < NOISY:
        return
    way_out = (
        "the exported model is the last validated weights (train.select_metric=last)"
        if train.select_metric == LAST
        else "`best` may be worse than the last weights: compare both in summary.json, or set train.select_metric=last"
    )
    log.warning(
        "validation: %s %.4f +- %.4f (95 %%) on %d val queries: checkpoints closer than that cannot be told apart; %s "
        "(a larger data.val_split narrows it)",
        *(name, value, half, n, way_out),
    )


def summary(state: TrainerState, train: TrainConfig, name: str) -> dict:
    """The selection as the run's summary shows it: the metric, best and last validation, and the standard error."""
    se = standard_error(state.last_metric, state.val_queries) if state.last_metric is not None else None
    return {
        "select_metric": train.select_metric,
        "metric": name,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "last_metric": state.last_metric,
        "last_step": state.last_step,
        "val_queries": state.val_queries,
        "metric_se": None if se is None or math.isinf(se) else round(se, 6),
    }
