"""An honest throughput timer: time inside training steps and the tokens they processed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


def batch_tokens(batch: Any) -> int:
    """Non-padding input tokens of a batch (``attention_mask`` sum, else ``input_ids`` size).

    Example:
        >>> batch_tokens({"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])})
        3
    """
    if isinstance(batch, Mapping):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


class StepTimer(Callback):
    """Wall time inside training steps and the tokens they saw: from this callback's
    ``on_train_batch_start`` to its ``on_train_batch_end`` (forward, backward, optimizer step, and the
    ``on_train_batch_end`` work of callbacks listed before it, such as re-applying masks).

    Data loading, validation and checkpoint writing (checkpoint callbacks run last) are outside the
    window; on CUDA the device is synchronised at both ends so queued kernels are counted.

    Example:
        >>> timer = StepTimer()
        >>> timer.seconds, timer.tokens
        (0.0, 0)
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0
        self._started: float | None = None

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._started = self._now(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._started is not None:
            self.seconds += self._now(pl_module) - self._started
            self.tokens += batch_tokens(batch)
            self._started = None

    def tokens_per_second(self, trainer: Trainer) -> float | None:
        """All ranks' tokens over the mean per-rank step time (a collective: call on every rank)."""
        device = trainer.strategy.root_device
        totals = torch.tensor([float(self.tokens), self.seconds], dtype=torch.float64, device=device)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        tokens, seconds = float(totals[0]), float(totals[1]) / trainer.world_size
        return round(tokens / seconds, 1) if seconds > 0 and tokens > 0 else None
