"""Cross-batch memory (XBM, Wang et al. 2020): a queue of recent embeddings and labels, used as extra pairs.

pml's ``CrossBatchMemory`` as it is, fed the *gathered* global batch on every rank: every rank enqueues the same
rows, so the queues are equal without communication and equal the one process's queue on the concatenated batches
(``tests/test_losses_dist.py``). Its anchors are the batch (the local slice carries gradient), its references the
detached memory (the batch included, self-pairs removed). The queue is checkpointed through ``state_dict``: pml
keeps it in two buffers; the write position and the filled flag travel as the module's extra state. A checkpoint
holds the gathered queue, so it loads on any number of processes (elastic resume).
"""

from __future__ import annotations

from typing import Any

from pytorch_metric_learning.losses import CrossBatchMemory


class GlobalMemory(CrossBatchMemory):
    """``memory(emb_all, labels_all)``: enqueue the gathered batch, return the loss of it against the memory."""

    @property
    def filled(self) -> int:
        """Rows of the memory in use."""
        return self.memory_size if self.has_been_filled else int(self.queue_idx)

    def get_extra_state(self) -> dict[str, Any]:
        return {"queue_idx": int(self.queue_idx), "has_been_filled": bool(self.has_been_filled)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.queue_idx = int(state["queue_idx"])
        self.has_been_filled = bool(state["has_been_filled"])
