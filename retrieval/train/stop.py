"""When training stops early: a preemption signal (SIGUSR1/SIGTERM) or the ``train.max_minutes`` budget, acted on
at the same step on every rank."""

from __future__ import annotations

import logging
import signal
import time

from retrieval import dist

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGUSR1/SIGTERM or by the train.max_minutes budget; acted on at the next log step once all
    ranks agree. ``reason`` is then "signal" (preemption: exit 3) or "time" (budget spent: finish normally)."""

    def __init__(self, max_minutes: float | None = None) -> None:
        self.raised = False
        self.reason: str | None = None
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def restore(self) -> None:
        """Give the signals back (a caller that trains in-process, e.g. a test, keeps its own handling)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.raised = True
        log.warning("received signal %d: checkpointing at the next log step", signum)

    def _out_of_time(self, accelerator) -> bool:
        # rank 0's clock alone decides, so ranks whose clocks straddle the deadline cannot stop a step apart
        return accelerator.is_main_process and self.deadline is not None and time.monotonic() >= self.deadline

    def agreed(self, accelerator) -> bool:
        timed = self._out_of_time(accelerator)  # read once: the trigger and the reason must tell the same story
        if self.raised or timed:
            accelerator.set_trigger()
        if not accelerator.check_trigger():  # one tiny all-reduce: every rank stops at the same step
            return False
        self.reason = "time" if dist.broadcast_object(timed and not self.raised) else "signal"
        return True
