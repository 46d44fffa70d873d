"""What every compression callback shares: target selection, step schedules, the state contract.

A technique callback subclasses :class:`CompressionCallback` and implements ``prepare_model``: the
structural change (module swaps, masks, gates), done once in ``setup`` — before Lightning restores
weights from a checkpoint and before ``configure_optimizers`` — so a resumed run rebuilds the same
structure and the optimizer sees every new parameter. Tensors (masks, scales, gates) live in the
model as buffers or parameters; ``self.state`` holds only primitives (step counters, phases).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> sorted(select_modules(net, ["re:[02]"], owner="demo"))
    ['0', '2']
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

#: Default targets: every Linear inside a repeated block (``layers.3.mlp.up_proj``, ``block.0...``).
#: Token embeddings and the LM head sit outside the block list and are left alone.
BLOCK_LINEARS = ("re:(.*\\.)?\\d+\\..*",)
#: MoE routers (``layers.3.mlp.router.fc1``): not part of the default targets of other techniques.
ROUTERS = ("re:.*\\.router\\..*",)


def linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for Hugging Face's GPT-2 style ``Conv1D`` (a transposed Linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_modules(
    model: nn.Module,
    targets: Sequence[str] = BLOCK_LINEARS,
    exclude: Sequence[str] = (),
    owner: str = "compress",
    predicate: Callable[[nn.Module], bool] = linear_like,
) -> dict[str, nn.Module]:
    """Modules whose qualified names match a target pattern and no exclusion pattern.

    Patterns are globs (``*.mlp.*``) or full-match regular expressions prefixed ``re:``.

    Raises:
        ValueError: a target pattern matches no eligible module, or everything matched is excluded;
            the message names ``owner``, the pattern and a few eligible module names.
    """
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(exclude, str):
        exclude = [exclude]
    eligible = {name: m for name, m in model.named_modules() if name and predicate(m)}
    selected: dict[str, nn.Module] = {}
    for pattern in targets:
        hits = {n: m for n, m in eligible.items() if _matches(n, pattern)}
        if not hits:
            sample = ", ".join(list(eligible)[:4]) or "none"
            raise ValueError(
                f"{owner}.targets: pattern {pattern!r} matches no module (eligible modules look like: {sample})"
            )
        selected.update(hits)
    kept = {n: m for n, m in selected.items() if not any(_matches(n, p) for p in exclude)}
    if not kept:
        raise ValueError(f"{owner}.exclude: {list(exclude)} removes every module matched by {list(targets)}")
    return kept


@dataclass(frozen=True)
class StepSchedule:
    """A window of optimizer steps ``[start_step, end_step)``; ``end_step=None`` means open-ended.

    Example:
        >>> StepSchedule(10, 20).progress(15)
        0.5
    """

    start_step: int = 0
    end_step: int | None = None

    def __post_init__(self) -> None:
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if self.end_step is not None and self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")

    def started(self, step: int) -> bool:
        """Whether ``step`` has reached the window."""
        return step >= self.start_step

    def active(self, step: int) -> bool:
        """Whether ``step`` lies inside the window."""
        return self.started(step) and (self.end_step is None or step < self.end_step)

    def progress(self, step: int) -> float:
        """0 before the window, rising linearly to 1 at ``end_step`` (1 at once when open-ended)."""
        if step < self.start_step:
            return 0.0
        if self.end_step is None or self.end_step == self.start_step:
            return 1.0
        return min(1.0, (step - self.start_step) / (self.end_step - self.start_step))


_PRIMITIVES = (bool, int, float, str, type(None))


def check_primitive(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is built from primitives (loadable with ``weights_only=True``)."""
    if isinstance(value, _PRIMITIVES):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_primitive(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            check_primitive(k, f"{where} key")
            check_primitive(item, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: callback state must hold primitives only, got {type(value).__name__}")


class CompressionCallback(Callback):
    """Base of the technique callbacks.

    Args:
        targets: module-name patterns to compress (glob, or ``re:`` + regex). Default: every
            Linear inside the transformer blocks.
        exclude: patterns removed from the selection.
        name: distinguishes two instances of one callback class (checkpoint ``state_key``).

    Subclasses implement :meth:`prepare_model` and keep primitive counters in ``self.state``.
    """

    #: Prefix for error messages and config keys (``compress.<config_key>``).
    config_key: str = "compress"
    #: Position in the canonical order in which structural changes are applied, whatever the order of
    #: ``Trainer(callbacks=[...])`` or of ``+compress=[...]``: MoEfication split (10) → structured-pruning
    #: gates (20) → N:M / unstructured masks (30) → fake-quant wrap (40) → distillation wrap (50).
    order: int = 100

    def __init__(
        self, targets: Sequence[str] | None = None, exclude: Sequence[str] = (), name: str | None = None
    ):
        super().__init__()
        self.targets = list(
            BLOCK_LINEARS if targets is None else ([targets] if isinstance(targets, str) else targets)
        )
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.name = name
        self.state: dict[str, Any] = {}
        self.exports: dict[str, str] = {}
        self._prepared_model: int | None = None
        self._hook_handles: list[Any] = []

    @property
    @override
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]" if self.name else type(self).__qualname__

    def select(
        self, pl_module: LightningModule, predicate: Callable[[nn.Module], bool] = linear_like
    ) -> dict[str, nn.Module]:
        """Targeted modules of ``pl_module.model`` (or of the module itself when it has no ``model``).
        The default targets leave out MoE routers (added by MoEfication, which prepares first)."""
        exclude = [*self.exclude, *(ROUTERS if self.targets == list(BLOCK_LINEARS) else ())]
        return select_modules(target_model(pl_module), self.targets, exclude, self.config_key, predicate)

    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make the structural change. Called once per model, in ``setup``, deterministically."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The first compression callback to reach setup puts them all in canonical order for every
        # later hook, checks the combination, and prepares all of them, in that order.
        sort_callbacks(trainer)
        destroy_gloo_group_at_exit()
        callbacks = compression_callbacks(trainer.callbacks)
        if callbacks and callbacks[0]._prepared_model != id(pl_module):
            check_combination(callbacks, target_model(pl_module))
        for callback in callbacks:
            callback.prepare_once(trainer, pl_module)

    def check_with(self, others: Sequence[CompressionCallback], model: nn.Module) -> None:
        """Raise ValueError naming both callbacks if this one cannot work with one of ``others``.

        Called once in ``setup``, before any model change, with the other compression callbacks in
        canonical order and the (still uncompressed) network. The default accepts every combination.
        """

    def conflict(self, other: CompressionCallback, why: str) -> ValueError:
        """The error for a combination that cannot work: names both callbacks' config keys."""
        return ValueError(f"{self.config_key} cannot be combined with {other.config_key}: {why}")

    def export_options(self) -> dict[str, Any]:
        """Keyword arguments this technique adds to :func:`lightcook.export.compressed.export_compressed`
        (e.g. ``nm=(2, 4)``, ``architecture=...``); the combined export merges those of all callbacks."""
        return {}

    def prepare_once(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run :meth:`prepare_model` unless it already ran for this LightningModule."""
        if self._prepared_model != id(pl_module):
            self.prepare_model(trainer, pl_module)
            self._prepared_model = id(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        check_primitive(self.state, f"{self.state_key}.state_dict()")
        return dict(self.state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.update(state_dict)

    def after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs after every real optimizer step (all optimizers, accumulation, manual optimization)."""

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()
        for optimizer in trainer.optimizers:
            handle = optimizer.register_step_post_hook(
                lambda *_: self.after_optimizer_step(trainer, pl_module)
            )
            self._hook_handles.append(handle)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Remove the optimizer step hooks this callback registered."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


def compression_callbacks(callbacks: Sequence[Callback]) -> list[CompressionCallback]:
    """The compression callbacks among ``callbacks``, sorted into the canonical order (stable)."""
    return sorted((c for c in callbacks if isinstance(c, CompressionCallback)), key=lambda c: c.order)


def sort_callbacks(trainer: Trainer) -> None:
    """Put the compression callbacks of ``trainer.callbacks`` into canonical order within the slots
    they occupy (other callbacks keep their places), so every later hook — ``on_train_start``,
    ``on_train_batch_start``, ``on_fit_end``, ... — runs them in that order whatever the order of
    ``Trainer(callbacks=[...])`` or ``+compress=[...]``. The list is rebound, not mutated: a hook loop
    in progress (Lightning iterates ``trainer.callbacks``) finishes over the old list.
    """
    current = list(trainer.callbacks)
    ordered = iter(compression_callbacks(current))
    trainer.callbacks = [next(ordered) if isinstance(c, CompressionCallback) else c for c in current]


def destroy_gloo_group_at_exit() -> None:
    """Destroy a live gloo process group when the interpreter exits.

    Lightning registers this clean-up for NCCL only; a gloo group (DDP on CPU, where the compression
    callbacks all-reduce masks and calibration statistics) still alive at exit can abort the rank with
    "terminate called without an active exception" (SIGABRT) after training has finished. Idempotent.
    """
    global _GLOO_CLEANUP_REGISTERED
    if _GLOO_CLEANUP_REGISTERED or not torch.distributed.is_available():
        return
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        atexit.register(_destroy_process_group)
        _GLOO_CLEANUP_REGISTERED = True


_GLOO_CLEANUP_REGISTERED = False


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_combination(callbacks: Sequence[CompressionCallback], model: nn.Module) -> None:
    """Let every compression callback reject the others (see :meth:`CompressionCallback.check_with`).
    The same technique twice (equal ``state_key``) never gets here: Lightning rejects it in ``Trainer()``."""
    for callback in callbacks:
        callback.check_with([c for c in callbacks if c is not callback], model)


def target_model(pl_module: nn.Module) -> nn.Module:
    """The network a callback compresses: ``pl_module.model`` when present, else the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` inside ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def all_reduce_(tensor: torch.Tensor, trainer: Trainer | None, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across DDP ranks (no-op in a single process)."""
    if trainer is None or trainer.world_size == 1:
        return tensor
    reduced = trainer.strategy.reduce(tensor, reduce_op=op)
    tensor.copy_(reduced)
    return tensor


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def calibration_source(loader: Any) -> Iterable:
    """A fresh, single-process view of ``loader`` for calibration passes: the live training iterator
    is left untouched (same sampler, no worker processes)."""
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        return DataLoader(
            loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn, num_workers=0
        )
    return loader


def first_loader(loaders: Any) -> Any:
    """The first DataLoader of what Lightning holds (a loader, a list or a dict of loaders), or None."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence):
        return loaders[0] if loaders else None
    return loaders
