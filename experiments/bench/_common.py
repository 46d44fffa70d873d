"""Helpers shared by the benchmark scripts in this folder: held-out perplexity, interleaved timing,
the CPU Trainer and step timer of the fine-tuning runs, and the rewrite of one section of
docs/benchmarks.md.

The scripts run as ``python experiments/bench/<name>.py``, so this folder is on ``sys.path`` and they
import this module as ``_common``. Lightning is imported only where a Trainer or a step timer is
built: ``quantization.py --gpu`` runs with torch (and ``lightcook``'s own pure modules) alone.
"""

from __future__ import annotations

import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightcook.io import write_text_atomic

if TYPE_CHECKING:
    import lightning as L

BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
_NEW_BENCHMARKS_MD = "# Benchmarks\n\nNumbers pasted from runs of the scripts in experiments/bench/.\n"


# --------------------------------------------------------------------------- quality


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[dict], device: torch.device | None = None) -> float:
    """Token-weighted held-out perplexity of a causal LM called as ``model(input_ids=, labels=)``
    (every block full: ``length - 1`` predicted tokens per row). Leaves ``model`` in eval mode;
    ``device``: move each batch there first."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        n = batch["labels"][:, 1:].numel()
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


# --------------------------------------------------------------------------- timing


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    inner: int = 1,
    sync: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up call each, then ``repeats`` rounds that
    call every function in turn (``inner`` calls per sample; ``sync`` around each sample, e.g.
    ``torch.cuda.synchronize``)."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_runs(
    run: Callable[[str], Sequence[float]], kinds: Sequence[str], repeats: int
) -> tuple[dict[str, float], int]:
    """``repeats`` rounds of one ``run(kind)`` per kind, the order rotated by one every round (no kind
    always goes first); each run returns its timed samples (e.g. step times). Returns the median of
    every kind's samples and the number of samples of the first kind."""
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for repeat in range(repeats):
        shift = repeat % len(kinds)
        for kind in [*kinds[shift:], *kinds[:shift]]:
            times[kind] += run(kind)
    return {kind: statistics.median(ts) for kind, ts in times.items()}, len(times[kinds[0]])


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


# --------------------------------------------------------------------------- training


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


# --------------------------------------------------------------------------- report


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def write_section(text: str, heading: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section of ``path`` that starts with the line ``heading`` (up to the next ``## ``
    heading) by ``text``, or append ``text`` when there is none; every other section stays as it is."""
    old = path.read_text() if path.is_file() else _NEW_BENCHMARKS_MD
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + ("" if end < 0 else "\n" + old[end + 1 :])
    write_text_atomic(path, new.rstrip("\n") + "\n")
