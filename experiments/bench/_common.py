"""What only the benchmark scripts in this folder share: where their docs go, the CPU Trainer and
the step timer of their fine-tuning runs, and the "Command / Machine" header of a docs section.

Perplexity, timing, machine facts and bytes come from :mod:`lightcook.measure`; tables, figures and
the rewrite of one section of docs/benchmarks.md from :mod:`lightcook.render` — the same code the
report callback runs. The scripts run as ``python experiments/bench/<name>.py``, so this folder is on
``sys.path`` and they import this module as ``_common``. Lightning is imported only where a Trainer
or a step timer is built: ``quantization.py --gpu`` runs with torch (and lightcook's pure modules).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightcook.measure import machine
from lightcook.render import machine_line

if TYPE_CHECKING:
    import lightning as L

BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def header(script: str, argv: list[str] | None = None, wall: float | None = None) -> list[str]:
    """The first lines of a docs section: the command that produced it, the machine, the wall time."""
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", f"experiments/bench/{script}", *argv])
    took = f" Wall time: {wall:.0f} s." if wall is not None else ""
    return [f"Command: `{command}`  ", f"Machine: {machine_line(machine())}{took}"]


def shakespeare_batches(model: str, eval_batches: int, calibration_batches: int) -> tuple[Any, list, list]:
    """The benchmarks' data: Shakespeare with ``model``'s tokenizer, block 128, batch 4; returns
    ``(datamodule, the first eval_batches validation batches, calibration_batches training batches)``
    (the shuffled training loader seeded with 0, so every run calibrates on the same batches)."""
    import itertools

    import torch

    from lightcook.data import TextDataModule

    data = TextDataModule(tokenizer=model, block_size=128, batch_size=4)
    data.setup("fit")
    val = list(itertools.islice(data.val_dataloader(), eval_batches))
    torch.manual_seed(0)
    return data, val, list(itertools.islice(data.train_dataloader(), calibration_batches))


def __getattr__(name: str) -> Any:
    """``StepTimer`` subclasses ``lightning.Callback``: it is defined on first use, so that importing
    this module does not import Lightning."""
    if name != "StepTimer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import lightning as L

    class StepTimer(L.Callback):
        """Wall time of every training batch (``times``, seconds), from this callback's batch-start
        hook to its batch-end hook: its place in the callback list decides which other callbacks'
        hooks are timed."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self._start)

    globals()[name] = StepTimer
    return StepTimer


def cpu_trainer(
    max_steps: int,
    callbacks: list,
    root: str | Path | None = None,
    gradient_clip_val: float | None = 1.0,
    **kwargs: Any,
) -> L.Trainer:
    """A one-device CPU Trainer for ``max_steps`` steps without validation, logger, checkpoints,
    progress bar or model summary; ``root``: a fresh temporary folder unless given."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        gradient_clip_val=gradient_clip_val,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root if root is not None else tempfile.mkdtemp(prefix="lightcook-bench-"),
        callbacks=callbacks,
        **kwargs,
    )
