"""A resumable training order: the batches are a function of ``(seed, epoch)`` only.

:class:`ResumableSampler` gives the same global batches for 1 process × batch 2b and 2 processes ×
batch b, and a restored job (a crash, a Slurm requeue) continues mid-epoch at the batch where it
stopped (Lightning restarts a plain DataLoader's epoch from the start). :func:`use_resumable_order`
wires it into a DataModule.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
from typing_extensions import override


class ResumableSampler(DistributedSampler):
    """One permutation of the dataset per epoch, drawn from ``seed + epoch``; rank ``r`` of ``n`` takes
    every ``n``-th index from ``r`` (:class:`DistributedSampler` semantics, ``drop_last=True``).

    At each ``iter()`` the sampler asks ``position()`` for ``(epoch, batches already trained in that
    epoch)`` and skips those, so a run restored from a mid-epoch checkpoint continues with the batch it
    would have trained next. Being a ``DistributedSampler``, Lightning leaves it in place under DDP.

    Args:
        dataset: the training dataset.
        num_replicas, rank: the world size and this process's global rank.
        shuffle: permute (``True``) or keep the dataset order.
        seed: the permutation seed (the run's ``seed``).
        batch_size: rows per batch on this rank (to turn batches into samples to skip).
        position: callable returning ``(epoch, batches_done)``; ``None`` means ``(self.epoch, 0)``.

    Example:
        >>> data = list(range(8))
        >>> one = list(ResumableSampler(data, 1, 0, shuffle=True, seed=0, batch_size=4))
        >>> two = [list(ResumableSampler(data, 2, r, shuffle=True, seed=0, batch_size=2)) for r in (0, 1)]
        >>> sorted(one[:4]) == sorted(two[0][:2] + two[1][:2])  # the same first global batch
        True
        >>> list(ResumableSampler(data, 1, 0, True, 0, 4, position=lambda: (0, 1))) == one[4:]
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        batch_size: int,
        position: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.position = position

    @override
    def __iter__(self) -> Iterator[int]:
        epoch, done = self.position() if self.position is not None else (self.epoch, 0)
        self.set_epoch(epoch)
        indices = list(super().__iter__())
        return iter(indices[done * self.batch_size :])


def loop_position(trainer: Trainer) -> tuple[int, int]:
    """``(epoch, batches processed in it)`` from Lightning's fit-loop progress (restored on resume)."""
    loop = trainer.fit_loop
    current = loop.epoch_progress.current  # a _ProcessedTracker at runtime; Lightning annotates its base
    return current.processed, loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]


def resumable_loader(loader: Any, trainer: Trainer, seed: int) -> Any:
    """``loader`` rebuilt around a :class:`ResumableSampler`; other loaders are returned unchanged
    (custom samplers, batch samplers, iterable datasets)."""
    plain = type(loader) is DataLoader and isinstance(loader.sampler, RandomSampler | SequentialSampler)
    if not plain or loader.batch_size is None:
        return loader
    # Lightning warns that a mid-epoch resume restarts the epoch of a plain DataLoader; this one does not.
    warnings.filterwarnings(
        "ignore", message=".*ended before the epoch ended and your dataloader is not resumable"
    )
    sampler = ResumableSampler(
        loader.dataset,
        num_replicas=trainer.world_size,
        rank=trainer.global_rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        batch_size=loader.batch_size,
        position=functools.partial(loop_position, trainer),
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
        worker_init_fn=loader.worker_init_fn,
        timeout=loader.timeout,
    )


def use_resumable_order(datamodule: Any, trainer: Trainer, seed: int) -> None:
    """Make ``datamodule.train_dataloader()`` return :func:`resumable_loader` of its loader."""
    original = datamodule.train_dataloader

    @functools.wraps(original)
    def train_dataloader() -> Any:
        return resumable_loader(original(), trainer, seed)

    datamodule.train_dataloader = train_dataloader
