"""Cross-batch memory (XBM, Wang et al. 2020): a queue of recent embeddings and labels, used as extra pairs.

pml's ``CrossBatchMemory`` as it is, fed the *gathered* global batch on every rank: every rank enqueues the same
rows, so the queues are equal without communication and equal the one process's queue on the concatenated batches
(``tests/test_losses_dist.py``). Its anchors are the batch (the local slice carries gradient), its references the
detached memory (the batch included, self-pairs removed). The queue is checkpointed through ``state_dict``: pml
keeps it in two buffers; the write position and the filled flag travel as the module's extra state, a tensor too,
so the whole state is tensors (a checkpoint saves it as safetensors, never a pickle). A checkpoint holds the
gathered queue, so it loads on any number of processes (elastic resume).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import CrossBatchMemory


class GlobalMemory(CrossBatchMemory):
    """``memory(emb_all, labels_all)``: enqueue the gathered batch, return the loss of it against the memory."""

    @property
    def filled(self) -> int:
        """Rows of the memory in use."""
        return self.memory_size if self.has_been_filled else int(self.queue_idx)

    def get_extra_state(self) -> torch.Tensor:
        """``[queue_idx, has_been_filled]``: the write position and the filled flag."""
        return torch.tensor([int(self.queue_idx), int(bool(self.has_been_filled))], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        queue_idx, filled = (int(x) for x in state.tolist())
        self.queue_idx, self.has_been_filled = queue_idx, bool(filled)
