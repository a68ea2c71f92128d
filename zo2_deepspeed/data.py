"""The training data loader ``initialize(training_data=...)`` returns: sharded by replica, resumable.

Each data-parallel replica reads a disjoint shard of every epoch (a DistributedSampler seeded from
``zo2.seed``, re-shuffled per epoch); without perturbation parallelism a replica is one rank, with
``zo2.parallel.perturbation`` P the P ranks of a replica read the same shard, since they run the same
micro-batch. The loader's position (epoch, batches consumed) is part of a checkpoint so a resumed
run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .errors import BatchError


def batches_per_epoch(examples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Micro-batches one rank gets per epoch, as ``DistributedSampler`` splits the data and DataLoader batches it."""
    per_rank = examples // world_size if drop_last else -(-examples // world_size)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def require_batches(examples: int, batch_size: int, world_size: int, drop_last: bool, perturbation: int = 1) -> None:
    """Fail at once when an epoch holds no micro-batch: a training loop over it would wait forever.

    The data is sharded over world_size / ``perturbation`` replicas. The message names every size
    that decides it and the two ways out.
    """
    from .config import data_parallel_size, replicas_label
    replicas = data_parallel_size(world_size, perturbation)
    if batches_per_epoch(examples, batch_size, replicas, drop_last) > 0:
        return
    per_replica = examples // replicas if drop_last else -(-examples // replicas)
    label = replicas_label(world_size, perturbation)
    sizes = f"{examples} examples, train_micro_batch_size_per_gpu {batch_size}, {label}, drop_last={drop_last}"
    if examples == 0:
        raise BatchError(f"the training data is empty ({sizes}): give it at least {batch_size * replicas} examples")
    size_name = "world size" if perturbation == 1 else "data-parallel size"
    fixes = [f"give it at least {batch_size * replicas} examples (micro-batch × {size_name})"]
    if per_replica >= 1:
        fixes.append(f"set train_micro_batch_size_per_gpu to at most {per_replica}")
    else:
        fixes.append("run fewer ranks")
    each = "rank" if perturbation == 1 else "replica"
    raise BatchError(f"the training data gives no micro-batch ({sizes}: {per_replica} examples per {each}, fewer than "
                     f"one micro-batch, so a training loop would never get a batch): {' or '.join(fixes)}")


class ZO2DataLoader:
    """An endless-epoch-aware loader: ``iter()`` resumes from the recorded position.

    ``replicas`` and ``replica``: the data-parallel size and this rank's replica (the world size and
    the rank without perturbation parallelism); the ranks of one replica get the same batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, replicas: int, replica: int, seed: int,
                 collate_fn: Optional[Callable] = None, drop_last: bool = True, shuffle: bool = True,
                 num_workers: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=replicas, rank=replica, shuffle=shuffle, seed=seed,
                                          drop_last=drop_last)
        self.collate_fn = collate_fn
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.epoch = 0
        self.batches_consumed = 0

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def require_batches(self) -> None:
        """Raise a BatchError naming the sizes when an epoch holds no micro-batch."""
        require_batches(len(self.dataset), self.batch_size, self.sampler.num_replicas, self.drop_last)

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
