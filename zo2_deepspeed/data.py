"""The training data loader ``initialize(training_data=...)`` returns: sharded by rank, resumable.

Each rank reads a disjoint shard of every epoch (a DistributedSampler seeded from ``zo2.seed``,
re-shuffled per epoch), and the loader's position (epoch, batches consumed) is part of a
checkpoint so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ZO2DataLoader:
    """An endless-epoch-aware loader: ``iter()`` resumes from the recorded position."""

    def __init__(self, dataset: Dataset, batch_size: int, world_size: int, rank: int, seed: int,
                 collate_fn: Optional[Callable] = None, drop_last: bool = True, shuffle: bool = True,
                 num_workers: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                          drop_last=drop_last)
        self.collate_fn = collate_fn
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.epoch = 0
        self.batches_consumed = 0

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        """Batches of the current epoch from the current position; the next call starts the next epoch."""
        self.sampler.set_epoch(self.epoch)
        remaining = list(self.sampler)[self.batches_consumed * self.batch_size:]
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=remaining,
                            collate_fn=self.collate_fn, drop_last=self.drop_last, num_workers=self.num_workers)
        for batch in loader:
            self.batches_consumed += 1
            yield batch
        self.epoch += 1
        self.batches_consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
