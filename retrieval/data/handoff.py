"""How batches get from the loader workers to the consumer: the DataLoader both streams use, a worker's UserError
passed as data, and a ring of shared slots for the train images.

Why a ring and not the DataLoader's own transfer: it moves every tensor of a batch as a new shared-memory file whose
descriptor the consumer fetches over a fresh socket connection. On the 2-core dev host that cost about 0.9 ms per
tensor in the consumer's ``next()`` whatever its size, 2.2 ms for a train batch (image, label, image_id), 4.5 % of
the demo's step; with a ring made before the workers start, a batch is a slot number and two lists of ints (0.8-1.0
ms with the copy out of the slot; probe: worker always ahead, consumer busy 30-45 ms between batches). Eval batches
(variable sizes, so no ring) send their integer columns as lists of ints for the same reason: the eval loader's
``next()`` took 1.5-1.8 ms a batch of 64 instead of 3.2-4.6 with four tensors (1 worker, consumer busy 40 ms).

Safety: the DataLoader keeps at most ``PREFETCH x workers`` batches requested and not yet handed over, in order, so
the batch being handed over and every batch a worker may be writing are at most that many apart. With more slots than
that, no slot is written while its batch waits, and the consumer copies the slot out before it asks for the next
batch: a batch it keeps is never changed under it (tests/test_loader.py, a slow consumer against a fast one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset

from retrieval.errors import UserError

PREFETCH = 2  # the DataLoader's prefetch_factor (per worker); passed to it explicitly, the ring's size depends on it
# a batch's integer columns: lists of ints from a worker (see above), int64 tensors for the consumer
INT_COLUMNS = ("label", "image_id", "super_label")


class SlotRing:
    """Image batches of ``shape`` in shared memory, made before the workers fork or are spawned."""

    def __init__(self, workers: int, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.buffer = torch.empty((PREFETCH * workers + 2, *self.shape)).share_memory_()

    def put(self, order: int, images: list[torch.Tensor]) -> int:
        """Worker side: stack ``images`` into the slot of the loader's ``order``-th batch; returns the slot."""
        slot = order % len(self.buffer)
        if len(images) != self.shape[0] or tuple(images[0].shape) != self.shape[1:]:
            raise ValueError(
                f"train batch of {len(images)} x {tuple(images[0].shape)}: expected {self.shape} "
                "(data.classes_per_batch x data.images_per_class images of the model's input size)"
            )
        torch.stack(images, out=self.buffer[slot])
        return slot

    def take(self, slot: int, pin_memory: bool = False) -> torch.Tensor:
        """Consumer side: a copy of ``slot`` (pinned for an asynchronous host-to-device copy when asked)."""
        out = torch.empty(self.shape, pin_memory=pin_memory)
        return out.copy_(self.buffer[slot])


@dataclass(frozen=True)
class Failure:
    """A worker's UserError, yielded as data: the DataLoader would wrap a raised one in a worker traceback."""

    message: str


class _Loader(DataLoader):
    """Re-raises a worker's :class:`Failure` as a plain UserError, takes train images out of their slot and makes
    the integer columns tensors."""

    def __iter__(self):
        return self._handed_over(super().__iter__())  # not a generator itself: iter() starts the workers now

    def _handed_over(self, batches):
        for batch in batches:
            if isinstance(batch, Failure):
                raise UserError(batch.message)
            if "slot" in batch:
                batch = {"image": self.dataset.ring.take(batch.pop("slot"), self.pin_memory), **batch}
            yield self._int_tensors(batch)

    def _int_tensors(self, batch: dict) -> dict:
        """The integer columns a worker sent as lists, as int64 tensors (pinned when the loader pins)."""
        for key in INT_COLUMNS:
            if isinstance(batch.get(key), list):
                column = torch.tensor(batch[key], dtype=torch.int64)
                batch[key] = column.pin_memory() if self.pin_memory else column
        return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the DataLoader does this too; explicit because N workers x M threads thrash


def dataloader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    """The DataLoader of both streams: batches formed by the dataset itself (``batch_size=None``)."""
    return _Loader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=PREFETCH if workers else None,
        worker_init_fn=_worker_init if workers else None,
        # Its own generator: by default iter() draws a worker base seed from the global RNG, which would make a
        # resumed trainer's RNG differ from an uninterrupted one. Randomness here is seeded per batch instead.
        generator=torch.Generator().manual_seed(0),
    )
