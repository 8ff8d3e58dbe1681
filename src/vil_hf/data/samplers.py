"""Deterministic, resumable training batches and in-order inference indices, one shard per process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .errors import DataError

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (same parts -> same seed on every machine)."""
    state = 0x5EED
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def _check_replicas(num_replicas: int, rank: int) -> None:
    if num_replicas < 1:
        raise DataError(f"num_replicas must be at least 1; got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise DataError(f"rank must be in 0..{num_replicas - 1} (num_replicas={num_replicas}); got {rank}")


class TrainingBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite per-process training batches of `(index, sample_seed)` keys.

    Epoch `e` shuffles all images with a generator seeded from `(seed, e)`. Global batches of
    `batch_size * num_replicas` images are cut from that order (the leftover at the end of an epoch is
    dropped) and process `rank` takes slice `rank` of each. With `aspect_ratios` (width / height per
    image) every global batch holds only wide (>= 1) or only tall (< 1) images: the shuffled order is
    dealt into the two groups and a batch is emitted whenever a group fills one (detectron2's aspect
    grouping). The key of the image at position `p` of epoch `e`'s batch sequence gets
    `sample_seed = derive_seed(seed, e, p)`, independent of the number of processes.

    `start_iteration=k` starts at global batch `k` (counted from the first epoch), computing only the
    order of the epoch it falls in, so a resumed run sees the batches it would have seen.
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        aspect_ratios: Sequence[float] | None = None,
        start_iteration: int = 0,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size (images per process) must be at least 1; got {batch_size}")
        _check_replicas(num_replicas, rank)
        if start_iteration < 0:
            raise DataError(f"start_iteration must be >= 0; got {start_iteration}")
        global_batch = batch_size * num_replicas
        if num_images < global_batch:
            raise DataError(
                f"the training data has {num_images} images, fewer than one global batch of {global_batch} "
                f"(batch_size {batch_size} x {num_replicas} processes); lower the batch size or use more images"
            )
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.start_iteration = int(start_iteration)
        self.global_batch_size = global_batch
        self._groups: torch.Tensor | None = None
        if aspect_ratios is not None:
            if len(aspect_ratios) != num_images:
                raise DataError(
                    f"aspect_ratios has {len(aspect_ratios)} entries but there are {num_images} images; "
                    "give one width/height ratio per image"
                )
            self._groups = (torch.as_tensor(list(aspect_ratios), dtype=torch.float64) < 1).to(torch.int64)
            sizes = [int((self._groups == g).sum()) for g in (0, 1)]
            self.batches_per_epoch = sum(size // global_batch for size in sizes)
            if self.batches_per_epoch == 0:
                raise DataError(
                    f"with aspect grouping no global batch of {global_batch} fits: {sizes[0]} wide and {sizes[1]} "
                    "tall images; lower the batch size or turn aspect grouping off"
                )
        else:
            self.batches_per_epoch = num_images // global_batch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_images, generator=generator)

    def _epoch_batches(self, epoch: int) -> Iterator[list[int]]:
        """Global batches (lists of image indices) of one epoch, in order."""
        order = self._epoch_order(epoch)
        size = self.global_batch_size
        if self._groups is None:
            for start in range(0, self.batches_per_epoch * size, size):
                yield order[start : start + size].tolist()
            return
        buckets: tuple[list[int], list[int]] = ([], [])
        for index, group in zip(order.tolist(), self._groups[order].tolist()):
            bucket = buckets[group]
            bucket.append(index)
            if len(bucket) == size:
                yield list(bucket)
                bucket.clear()

    def global_batches(self, start_iteration: int | None = None) -> Iterator[list[tuple[int, int]]]:
        """Infinite global batches of `(index, sample_seed)` keys (every process's images), from `start_iteration`."""
        start = self.start_iteration if start_iteration is None else int(start_iteration)
        epoch, skip = divmod(start, self.batches_per_epoch)
        size = self.global_batch_size
        while True:
            for number, batch in enumerate(self._epoch_batches(epoch)):
                if number < skip:
                    continue
                base = number * size
                yield [(index, derive_seed(self.seed, epoch, base + slot)) for slot, index in enumerate(batch)]
            skip = 0
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        low = self.rank * self.batch_size
        for batch in self.global_batches():
            yield batch[low : low + self.batch_size]


class InferenceSampler(Sampler[int]):
    """Indices `rank, rank + num_replicas, ...` in order: every image once over all processes."""

    def __init__(self, num_images: int, num_replicas: int = 1, rank: int = 0) -> None:
        _check_replicas(num_replicas, rank)
        if num_images < 0:
            raise DataError(f"num_images must be >= 0; got {num_images}")
        self.num_images = int(num_images)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_images, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_images, self.num_replicas))


__all__ = ["InferenceSampler", "TrainingBatchSampler", "derive_seed"]
