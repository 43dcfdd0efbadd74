"""Samplers: aspect-ratio grouped, deterministic, resumable training batches; sharded inference.

``GroupedBatchSampler`` wraps a per-sample sampler (a ``DistributedSampler``, also used with
one process, so the shuffled order is ``randperm`` seeded by ``seed + epoch`` exactly as
torch's) and groups indices by aspect ratio (wide vs tall images, as torchvision's references
do) so padded batches waste little. It yields lists of ``(index, aug_seed)`` keys: the dataset
draws the flip from ``aug_seed``, which depends only on (seed, epoch, index). So an epoch's
batches AND augmentations are a function of (seed, epoch) alone, whatever the number of
workers, and a resumed run can skip the batches it already did with ``set_start_iter``.
"""
import math
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Sampler


def aspect_ratio_group_ids(aspect_ratios: Sequence[float], grouping: bool = True) -> List[int]:
    """Group 0 = wide (w >= h), 1 = tall; everything in group 0 when ``grouping`` is off."""
    if not grouping:
        return [0] * len(aspect_ratios)
    return [0 if ratio >= 1.0 else 1 for ratio in aspect_ratios]


class GroupedBatchSampler(Sampler):
    """Batches of ``batch_size`` indices from ``sampler`` sharing a group id.

    Per epoch it emits exactly ``ceil(len(sampler) / batch_size)`` batches: full same-group
    batches as soon as a group has ``batch_size`` members, then the leftovers of all groups
    (each < batch_size) concatenated in order and cut into batches (the last may be short).

    Resuming: ``set_epoch(epoch)`` selects the epoch (forwarded to the inner sampler);
    ``set_start_iter(n)`` makes the NEXT iteration skip its first ``n`` batches (one-shot:
    later epochs start at 0). ``len()`` is always the full epoch length.
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.start_iter = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def set_start_iter(self, start_iter: int) -> None:
        self.start_iter = start_iter

    def _aug_seed(self, index: int) -> int:
        # a plain integer mix (no Python hash(): it is salted per process for str)
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (2 ** 63)

    def _batches(self) -> Iterator[List[int]]:
        buckets = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()
        leftovers = [i for g in sorted(buckets) for i in buckets[g]]
        for start in range(0, len(leftovers), self.batch_size):
            yield leftovers[start:start + self.batch_size]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        skip, self.start_iter = self.start_iter, 0
        for n, batch in enumerate(self._batches()):
            if n >= skip:
                yield [(index, self._aug_seed(index)) for index in batch]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class InferenceSampler(Sampler):
    """Contiguous shard of ``range(size)`` for one rank, no padding and no duplicates.

    (``DistributedSampler`` pads with repeated images, which would count them twice in the
    evaluation.)
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        shard = math.ceil(size / world_size)
        self.indices = list(range(min(rank * shard, size), min((rank + 1) * shard, size)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def distributed_rank_and_size() -> Tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not initialized."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
