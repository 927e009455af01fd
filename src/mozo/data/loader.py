"""Deterministic, resumable, shardable loading of `LabelledImages`.

Three properties the training engine relies on:

1. Per-sample randomness. `TransformedDataset` seeds the augmentation of sample i from
   (seed, epoch, i) alone, so a sample's crop is the same whichever worker process loads it, in
   whatever order, and on whichever rank.
2. Resumable order. `make_loader` draws the epoch's permutation from a private `torch.Generator` seeded
   from (seed, epoch) (never the global RNG), so a run resumed at epoch e sees the same order, and
   `start_batch` skips the first batches without loading them (resume in the middle of an epoch).
3. Distributed sharding of one global batch. With `world_size` ranks, global batch k (batch_size
   samples) is the same on every rank and rank r takes its contiguous slice
   [r * batch_size // world_size, (r + 1) * batch_size // world_size). The union of the rank batches is
   exactly the single-process batch, so a run gives the same batches whatever the number of ranks.

Corrupt images: with `skip_corrupt=True` an unreadable image yields a `Skipped(index)` marker and
`collate_skipping` drops it and reports its index; every loader batch is therefore a triple
`(images, labels, skipped_indices)`, so callers count distinct images, not failed loads.
"""
from __future__ import annotations

import hashlib
import math
import random
import signal
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .base import CorruptImageError, LabelledImages, load_image



class Skipped(NamedTuple):
    """An unreadable image (skip_corrupt=True): dropped from the batch, its index reported."""

    index: int


Sample = "tuple[torch.Tensor, int] | Skipped"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical on every machine (no dependence on hash() randomisation).

    Used for the per-sample RNG (seed, epoch, index) and the epoch permutation (seed, epoch), so that
    nearby seeds do not give correlated streams.
    """
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TransformedDataset(Dataset):
    """A torch Dataset over `LabelledImages`: decode, transform with a per-sample seeded RNG, map the label.

    Args:
        images: the images and labels (from a reader or a scenario task).
        transform: a callable `(pil_image, rng) -> tensor` (see `transforms.make_transform`).
        seed: base seed of the augmentations.
        label_map: optional {original label: new label}; a label missing from it is an error.
        skip_corrupt: if True, an image that cannot be decoded gives None (dropped and counted by
            `collate_skipping`); if False the `CorruptImageError`, which names the file, propagates.
        epoch: augmentation epoch (see `set_epoch`); the RNG of item i is `random.Random(derive_seed(seed,
            epoch, i))`, so the same image gets a different crop in each epoch but the same crop
            whenever the same (seed, epoch, i) is loaded again.
    """

    def __init__(
        self,
        images: LabelledImages,
        transform: Callable[..., torch.Tensor],
        seed: int = 0,
        label_map: Optional[Mapping[int, int]] = None,
        skip_corrupt: bool = False,
        epoch: int = 0,
    ) -> None:
        self.images = images
        self.transform = transform
        self.seed = int(seed)
        self.label_map = dict(label_map) if label_map is not None else None
        self.skip_corrupt = skip_corrupt
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation epoch (make_loader calls this with its `epoch`)."""
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> random.Random:
        """The RNG of item `index` in the current epoch; depends on nothing else."""
        return random.Random(derive_seed(self.seed, self.epoch, index))

    def _label(self, index: int) -> int:
        label = int(self.images.labels[index])
        if self.label_map is None:
            return label
        try:
            return int(self.label_map[label])
        except KeyError:
            raise KeyError(f"label {label} of item {index} ({self.images.name}) is not in label_map "
                           f"(keys: {sorted(self.label_map)[:10]}...)") from None

    def __getitem__(self, index: int) -> Sample:
        try:
            img = load_image(self.images.sources[index])
        except CorruptImageError:
            if self.skip_corrupt:
                return Skipped(index)
            raise
        return self.transform(img, self.rng_for(index)), self._label(index)


def collate_skipping(batch: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack a batch, dropping the `Skipped` markers left by unreadable images.

    Returns (images [n, 3, H, W] float, labels [n] int64, indices of the skipped images). If every item was
    skipped, images is an empty tensor of shape [0] and labels an empty int64 tensor: callers test
    `len(labels) == 0`.
    """
    kept = [item for item in batch if not isinstance(item, Skipped)]
    skipped = [item.index for item in batch if isinstance(item, Skipped)]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    images = torch.stack([img for img, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels, skipped


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which checkpoints and then shuts them down
    (SLURM and a terminal's Ctrl-C signal every process of the job; a worker dying first would turn a clean
    stop into a 'DataLoader worker exited unexpectedly' crash)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler: seeded epoch order, resumable at a batch, sharded by rank inside each global batch.

    Global order: `torch.randperm(n)` from a `torch.Generator` seeded with derive_seed(seed, epoch) when
    shuffling, else 0..n-1. Global batch k = order[k*batch_size:(k+1)*batch_size]; the last one is
    shorter unless drop_last. Iteration starts at global batch `start_batch` (earlier batches are skipped
    without touching the data) and yields this rank's shard of every global batch:
    positions [rank*b, (rank+1)*b) with b = batch_size // world_size.

    The last, shorter global batch (m < batch_size samples, world_size > 1): with `pad_last=True`
    (training default) it is padded to a multiple of world_size with samples from the start of the
    epoch order and split evenly, so every rank runs the same number of steps (collectives never hang);
    with `pad_last=False` (evaluation: no duplicates) rank r takes positions [r*b, (r+1)*b) ∩ [0, m) and
    a rank whose slice is empty gets no last batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pad_last: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must be divisible by world_size {world_size} "
                             f"(every rank takes batch_size // world_size samples of each global batch)")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.n, self.batch_size, self.shuffle = int(n), int(batch_size), shuffle
        self.seed, self.epoch, self.start_batch = int(seed), int(epoch), int(start_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last, self.pad_last = drop_last, pad_last

    @property
    def num_global_batches(self) -> int:
        """Global batches in the whole epoch (before start_batch is applied)."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def order(self) -> list[int]:
        """The epoch's global sample order (identical on every rank and in every resumed run)."""
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def _shard(self, batch: list[int], order: list[int]) -> list[int]:
        if self.world_size == 1:
            return batch
        per_rank = self.batch_size // self.world_size
        if len(batch) == self.batch_size or not self.pad_last:
            return batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        padded = list(batch)
        i = 0
        while len(padded) % self.world_size:
            padded.append(order[i % len(order)])
            i += 1
        share = len(padded) // self.world_size
        return padded[self.rank * share:(self.rank + 1) * share]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for k in range(self.start_batch, self.num_global_batches):
            shard = self._shard(order[k * self.batch_size:(k + 1) * self.batch_size], order)
            if shard:
                yield shard

    def __len__(self) -> int:
        remaining = max(0, self.num_global_batches - self.start_batch)
        if remaining and not self.pad_last and self.world_size > 1 and not self.drop_last:
            last = self.n - (self.num_global_batches - 1) * self.batch_size
            if last < self.batch_size and last <= self.rank * (self.batch_size // self.world_size):
                remaining -= 1
        return remaining


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pad_last: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with a reproducible epoch order, mid-epoch resume and per-rank shards of global batches.

    Args:
        dataset: usually a `TransformedDataset` (its augmentation epoch is set to `epoch`).
        batch_size: the GLOBAL batch size; each rank gets batch_size // world_size samples of it.
        shuffle: permute the order each epoch with a generator seeded from (seed, epoch).
        seed, epoch: determine the order (and the augmentations of a TransformedDataset).
        num_workers: worker processes; results do not depend on it.
        drop_last: drop the last, shorter global batch.
        start_batch: skip the first `start_batch` global batches of this epoch without loading them, so
            a run resumed after k steps continues with exactly batch k.
        rank, world_size: distributed shard (see `GlobalBatchSampler`).
        pad_last: how the shorter last global batch is shared by ranks (see `GlobalBatchSampler`).

    Every batch is `(images, labels, skipped_indices)` (see `collate_skipping`).
    """
    if isinstance(dataset, TransformedDataset):
        dataset.set_epoch(epoch)
    sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle, seed, epoch, start_batch, rank, world_size,
                                 drop_last, pad_last)
    # A private generator: the DataLoader draws its worker base seed from it instead of the global torch
    # RNG, so iterating a loader never perturbs the global random state of the training code.
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, rank))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_skipping,
                      pin_memory=pin_memory, generator=generator,
                      worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)
