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

Worker processes (`data.num_workers`, `plan_workers`): results never depend on them (property 1); `auto`
picks a count from the device, the dataset's storage and the CPU cores (see `resolve_num_workers`).
"""
from __future__ import annotations

import math
import numbers
import os
import random
import signal
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mozo.seeds import mix_seed

from .base import CorruptImageError, LabelledImages, load_image



class Skipped(NamedTuple):
    """An unreadable image (skip_corrupt=True): dropped from the batch, its index reported."""

    index: int


Sample = "tuple[torch.Tensor, int] | Skipped"


class TransformedDataset(Dataset):
    """A torch Dataset over `LabelledImages`: decode, transform with a per-sample seeded RNG, map the label.

    Args:
        images: the images and labels (from a reader or a scenario task).
        transform: a callable `(pil_image, rng) -> tensor` (see `transforms.make_transform`).
        seed: base seed of the augmentations.
        label_map: optional {original label: new label}; a label missing from it is an error.
        skip_corrupt: if True, an image that cannot be decoded gives None (dropped and counted by
            `collate_skipping`); if False the `CorruptImageError`, which names the file, propagates.
        epoch: augmentation epoch (see `set_epoch`); the RNG of item i is `random.Random(mix_seed(seed,
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
        return random.Random(mix_seed(self.seed, self.epoch, index))

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

    Global order: `torch.randperm(n)` from a `torch.Generator` seeded with mix_seed(seed, epoch) when
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
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
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
    persistent_workers: bool = False,
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
        pin_memory, persistent_workers: passed to the DataLoader (persistent_workers only with workers);
            `plan_workers(...).loader_kwargs()` gives them with num_workers for a device.

    Every batch is `(images, labels, skipped_indices)` (see `collate_skipping`).
    """
    if isinstance(dataset, TransformedDataset):
        dataset.set_epoch(epoch)
    sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle, seed, epoch, start_batch, rank, world_size,
                                 drop_last, pad_last)
    # A private generator: the DataLoader draws its worker base seed from it instead of the global torch
    # RNG, so iterating a loader never perturbs the global random state of the training code.
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, rank))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_skipping,
                      pin_memory=pin_memory, generator=generator, persistent_workers=persistent_workers and num_workers > 0,
                      worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)


# ------------------------------------------------------------------------------------ worker processes
AUTO = "auto"
MAX_AUTO_WORKERS = 16  # `auto`'s cap per training process (reasoning: resolve_num_workers, docs/benchmarks.md)
CHEAP_ARRAY_SIZE = 64  # in-memory arrays transformed to at most this many pixels a side: no workers under auto
PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker keeps ready


class _WorkerSettings(tuple):
    """The allowed `data.num_workers` values, for the configuration's CHOICES check: `in` accepts "auto" and
    any integer >= 0 (not a bool); iterating gives the words an error message lists."""

    def __contains__(self, value: object) -> bool:
        return value == AUTO or (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0)


NUM_WORKERS_CHOICES = _WorkerSettings((AUTO, "an integer >= 0"))


def available_cores() -> int:
    """CPU cores this process may run on: `os.sched_getaffinity` where the OS has it (it honours taskset,
    cgroups' cpusets and SLURM's binding, which `os.cpu_count()` ignores), else `os.cpu_count()`."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def shared_memory_bytes() -> Optional[int]:
    """Free bytes of /dev/shm, through which worker processes hand their batches over (None: unknown).
    Docker gives containers 64 MiB by default, less than one batch of 128 images at 224 px."""
    try:
        st = os.statvfs("/dev/shm")
    except (AttributeError, OSError):
        return None
    return st.f_bavail * st.f_frsize


def holds_arrays(dataset: Any) -> bool:
    """Whether the images are in-memory arrays (CIFAR-100, MNIST, the demo stream), not files to decode.
    `dataset`: a `TransformedDataset` or a `LabelledImages`."""
    images = dataset.images if isinstance(dataset, TransformedDataset) else dataset
    sources = getattr(images, "sources", None)
    return sources is not None and len(sources) > 0 and isinstance(sources[0], np.ndarray)


def _output_size(dataset: Any, image_size: Optional[int]) -> Optional[int]:
    """The side of the transform's output: `image_size`, else the TransformedDataset's transform size."""
    if image_size:
        return int(image_size)
    size = getattr(getattr(dataset, "transform", None), "size", None)
    return int(size) if isinstance(size, numbers.Integral) else None


def _cores_per_process() -> int:
    """Cores per training process: torchrun's LOCAL_WORLD_SIZE processes share this machine's cores."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, available_cores() // local)


class WorkerPlan(NamedTuple):
    """How a loader is fed: worker processes, pinned batches, workers kept between iterations, and why."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    reason: str

    def loader_kwargs(self) -> dict:
        """The keyword arguments of `make_loader` this plan sets."""
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory, "persistent_workers": self.persistent_workers}


def _auto(device: Any, dataset: Any, batch_size: Optional[int], image_size: Optional[int]) -> tuple[int, str]:
    kind = torch.device(device).type
    if kind != "cuda":
        return 0, f"a {kind} run: its training step computes on the same cores"
    size = _output_size(dataset, image_size)
    if dataset is not None and holds_arrays(dataset) and (size is None or size <= CHEAP_ARRAY_SIZE):
        return 0, (f"in-memory arrays transformed to {size or '?'} px: a few thousand images/s per core in the training "
                   f"process, worker start-up and transfer cost more than they save")
    cores = _cores_per_process()
    count = max(0, min(cores - 1, MAX_AUTO_WORKERS))
    what = "in-memory arrays (resize and normalise)" if dataset is not None and holds_arrays(dataset) else "image files"
    reason = f"{what} on cuda: {cores} cores per training process, one left to it, at most {MAX_AUTO_WORKERS}"
    free = shared_memory_bytes()
    if count and free is not None and batch_size and size:
        batch_bytes = int(batch_size) * 3 * size * size * 4  # float32 batches
        fit = max(0, (free // batch_bytes - 1) // PREFETCH_FACTOR)  # every worker holds PREFETCH_FACTOR batches
        if fit < count:
            count = fit
            reason += (f"; /dev/shm has {free / 2**20:.0f} MiB free, room for {fit} worker(s) at {batch_bytes / 2**20:.0f} MiB "
                       f"per batch (docker run --shm-size=8g gives more)")
    return count, reason


def resolve_num_workers(setting: Any, device: Any, dataset: Any = None, batch_size: Optional[int] = None,
                        image_size: Optional[int] = None) -> int:
    """The number of loader worker processes for `data.num_workers=setting` (an integer >= 0 or "auto").

    An integer is used as given. `auto` (`dataset`: the TransformedDataset or LabelledImages to load;
    `batch_size` and `image_size`, the transform's output side, size the shared-memory check):

    - 0 unless `device` is CUDA. On a CPU (or MPS) run the training step itself computes on the CPU
      cores: workers would take cores from it, and such a step consumes far fewer images per second
      than one process prepares (docs/benchmarks.md, Input pipeline).
    - 0 for in-memory arrays transformed to at most 64 px, or to a size not known here (the demo
      stream, tiny backbones; the engine passes the TransformedDataset, whose size is known): nothing is
      decoded and a core prepares thousands of such images per second, so the start-up of the workers (at
      every epoch and every test set, where the loader is rebuilt) and the transfer of every batch
      through shared memory cost more than they save.
    - otherwise (image files: decoding plus the training transform, about 200 images/s per core for
      500x375 JPEGs; or arrays resized to the backbone's 224 px, CIFAR-100, about 1,300 images/s per
      core): min(cores - 1, 16), where cores are those this process may use (`available_cores`, shared
      among torchrun's LOCAL_WORLD_SIZE processes of the machine), one left to the training process,
      which launches the kernels and collates. Sixteen JPEG workers give about 3,200 images/s, the
      order of what one ViT-B/16 step consumes in bf16 on an H200 (estimated 4,300; fp32 about 530,
      docs/benchmarks.md); more would only add start-up and prefetched batches. One core: 0.
    - then at most as many workers as /dev/shm holds `PREFETCH_FACTOR` batches for (a container's
      default 64 MiB holds none at 224 px: 0 rather than a 'bus error' in a worker).

    Raises ValueError naming the allowed values for anything else (a bool, a negative number, a string).
    """
    if setting != AUTO:
        if setting not in NUM_WORKERS_CHOICES:
            raise ValueError(f"data.num_workers must be one of {', '.join(NUM_WORKERS_CHOICES)}, got {setting!r}")
        return int(setting)
    return _auto(device, dataset, batch_size, image_size)[0]


def plan_workers(setting: Any, device: Any, dataset: Any = None, batch_size: Optional[int] = None,
                 image_size: Optional[int] = None) -> WorkerPlan:
    """`resolve_num_workers` with the loader options that go with the count, and the reason for it.

    With workers on a CUDA device, batches are pinned (`pin_memory=True`: the host-to-device copy of a
    pinned batch is a DMA, not a staged copy) and `persistent_workers=True`. Persistent workers never
    change what is loaded: `make_loader` builds a new DataLoader (new sampler, dataset epoch set before
    any worker starts) for every epoch, every resumed start and every test set, and the engine iterates
    each once, so no worker outlives the epoch whose seed and augmentation epoch it was forked with;
    they would only spare the start-up were one DataLoader iterated again. On a CPU nothing is pinned.
    """
    count = resolve_num_workers(setting, device, dataset, batch_size, image_size)
    reason = "set explicitly" if setting != AUTO else _auto(device, dataset, batch_size, image_size)[1]
    cuda = torch.device(device).type == "cuda"
    return WorkerPlan(count, cuda and count > 0, count > 0, reason)


def describe_workers(setting: Any, device: Any, datasets: Mapping[str, Any], batch_size: Optional[int] = None,
                     image_size: Optional[int] = None) -> dict:
    """What `setting` resolves to for each named training set (recorded in the run's `start` event and
    shown in its overview): {"setting", "device", "cores", "per_dataset": {name: workers}, "pin_memory", "reasons"}."""
    plans = {name: plan_workers(setting, device, ds, batch_size, image_size) for name, ds in datasets.items()}
    return {"setting": setting, "device": str(device), "cores": available_cores(),
            "per_dataset": {name: p.num_workers for name, p in plans.items()},
            "pin_memory": any(p.pin_memory for p in plans.values()),
            "reasons": sorted({p.reason for p in plans.values()})}


def workers_summary(record: dict) -> str:
    """One line of a `describe_workers` record, e.g. "auto -> 15 worker(s), pinned batches (16 core(s) here); image files ..."."""
    counts = list(record["per_dataset"].values()) or [0]
    n = f"{counts[0]} worker(s)" if len(set(counts)) == 1 else "per task " + ", ".join(map(str, counts)) + " workers"
    pinned = ", pinned batches" if record["pin_memory"] else ""
    return f"{record['setting']} -> {n}{pinned} ({record['cores']} core(s) here); " + "; ".join(record["reasons"])
