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
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightcook.ops.calibrate import Visit, sequential_pass
from lightcook.ops.config import TechniqueConfig
from lightcook.ops.names import linear_like

#: Default targets: every Linear inside a repeated block (``layers.3.mlp.up_proj``, ``block.0...``).
#: Token embeddings and the LM head sit outside the block list and are left alone.
BLOCK_LINEARS = ("re:(.*\\.)?\\d+\\..*",)
#: MoE routers (``layers.3.mlp.router.fc1``): not part of the default targets of other techniques.
ROUTERS = ("re:.*\\.router\\..*",)


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
    """Base of the technique callbacks: config + schedule + Lightning hooks.

    Args:
        targets: module-name patterns to compress (glob, or ``re:`` + regex). Default: every
            Linear inside the transformer blocks.
        exclude: patterns removed from the selection.
        name: distinguishes two instances of one callback class (checkpoint ``state_key``).
        network: where the network to compress lives in the LightningModule: a dotted attribute path
            (``"student"``, ``"backbone.lm"``) or a callable ``pl_module -> nn.Module``. Default
            (``None``): ``pl_module.model``, else the single Hugging Face ``PreTrainedModel`` inside
            the module, else the module itself (see :func:`find_network`).

    A subclass sets :attr:`technique`, :attr:`order`, builds its frozen config with
    :meth:`build_config` (the one place the ``compress.<key>.`` prefix is added) and implements
    :meth:`prepare_model`; extra losses come from :meth:`loss_terms`, which one wrapper around the
    module's ``training_step`` adds to the loss the module computes (:func:`install_loss_hook`).
    ``self.state`` holds only primitives; the config's ``SHAPE_FIELDS`` are stored in every
    checkpoint and a resumed run with other values fails before any weight is loaded.
    """

    #: The technique's short name (``quant``, ``prune``, ``structured``, ``kd``, ``moe``): the key of the
    #: conflict table and of the export codecs.
    technique: str = "compress"
    #: Prefix for error messages and logged names (``compress.<name>``), set per instance.
    config_key: str = "compress"
    #: Position in the canonical order in which structural changes are applied, whatever the order of
    #: ``Trainer(callbacks=[...])`` or of ``+compress=[...]``: MoEfication split (10) → structured-pruning
    #: gates (20) → N:M / unstructured masks (30) → fake-quant wrap (40) → distillation wrap (50).
    order: int = 100
    #: The technique's frozen configuration (a :class:`~lightcook.ops.config.TechniqueConfig`), if any.
    config: Any = None

    def __init__(
        self,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
        network: str | Callable[[nn.Module], nn.Module] | None = None,
    ):
        super().__init__()
        self.targets = list(
            BLOCK_LINEARS if targets is None else ([targets] if isinstance(targets, str) else targets)
        )
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.name = name
        self.config_key = f"compress.{name or self.technique}"
        if network is not None and not (isinstance(network, str) or callable(network)):
            raise ValueError(
                f"{self.config_key}.network: must be an attribute path or a callable, got {network!r}"
            )
        self.network_spec = network
        self.state: dict[str, Any] = {}
        self._prepared_model: int | None = None
        self._network: tuple[int, nn.Module] | None = None  # (id of the pl_module, its network)
        self._hook_handles: list[Any] = []

    #: The technique's config class (a :class:`~lightcook.ops.config.TechniqueConfig` subclass).
    config_class: type[TechniqueConfig] | None = None

    def configure(self, config: Any, options: Mapping[str, Any]) -> Any:
        """The config from ``config=`` (a :attr:`config_class` instance) or from keyword ``options``
        (its fields, as YAML gives them), never both; errors prefixed ``compress.<key>.``."""
        cls = self.config_class
        assert cls is not None, f"{type(self).__name__} sets no config_class"
        if config is None:
            return self.build_config(cls, **options)
        if not isinstance(config, cls):
            raise TypeError(
                f"{self.config_key}.config: must be a {cls.__name__}, got {type(config).__name__}; "
                "or give its fields as keyword options"
            )
        if options:
            raise self.fail(sorted(options)[0], "given both in config= and as an option; pass one of them")
        return config

    def named(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``call(...)`` with an ops error (``<field>: ...``) prefixed once by ``compress.<key>.``."""
        try:
            return call(*args, **kwargs)
        except (ValueError, RuntimeError) as err:
            if str(err).startswith(self.config_key):
                raise
            raise type(err)(f"{self.config_key}.{err}") from None

    def build_config(self, cls: type[_Config], **kwargs: Any) -> _Config:
        """``cls(**kwargs)``, errors prefixed ``compress.<key>.`` (the one place the prefix is added)."""
        return cls.build(f"{self.config_key}.", **kwargs)

    def fail(self, field: str, message: str) -> ValueError:
        """A ValueError for one of this callback's settings: ``compress.<key>.<field>: <message>``."""
        return ValueError(f"{self.config_key}.{field}: {message}")

    @property
    @override
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]" if self.name else type(self).__qualname__

    # ------------------------------------------------------------------ the network and its layers

    def network(self, pl_module: nn.Module) -> nn.Module:
        """The network this callback compresses inside ``pl_module`` (see :func:`find_network`),
        looked up once per module (hooks in the training step ask for it every step)."""
        if self._network is None or self._network[0] != id(pl_module):
            self._network = (id(pl_module), find_network(pl_module, self.network_spec, self.config_key))
        return self._network[1]

    def where(self, pl_module: nn.Module) -> str:
        """Where the network was looked for, for error messages (``CausalLMModule.model (LlamaForCausalLM)``)."""
        return describe_network(pl_module, self.network(pl_module), self.config_key)

    def select(
        self, pl_module: nn.Module, predicate: Callable[[nn.Module], bool] = linear_like
    ) -> dict[str, nn.Module]:
        """Targeted modules of :meth:`network`. The default targets leave out MoE routers (added by
        MoEfication, which prepares first)."""
        exclude = [*self.exclude, *(ROUTERS if self.targets == list(BLOCK_LINEARS) else ())]
        network = self.network(pl_module)
        try:
            return select_modules(network, self.targets, exclude, self.config_key, predicate)
        except ValueError as err:
            raise ValueError(f"{err} [{self.where(pl_module)}]") from None

    # ------------------------------------------------------------------ what a technique implements

    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make the structural change. Called once per model, in ``setup``, deterministically."""

    def loss_terms(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, outputs: Any
    ) -> dict[str, Tensor]:
        """Extra loss terms, already weighted, added to the module's own loss at every training step.

        ``outputs`` is what the network returned inside the module's ``training_step`` (captured by a
        forward hook), or ``None`` if it was not called. Each term is logged as
        ``compress/<name>/<term>``. The default adds nothing.
        """
        return {}

    def task_scale(self) -> float:
        """Factor on the module's own loss (1.0; distillation can weigh the task loss down)."""
        return 1.0

    def network_kwargs(self) -> dict[str, Any]:
        """Keyword arguments to add to the network's forward call inside ``training_step``
        (e.g. ``output_attentions=True`` for attention distillation)."""
        return {}

    def step_context(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any
    ) -> contextlib.AbstractContextManager:
        """A context entered around the module's ``training_step`` (e.g. feature capture hooks)."""
        return contextlib.nullcontext()

    @property
    def adds_loss(self) -> bool:
        """Whether this technique changes the training loss (then it needs automatic optimization)."""
        own = type(self)
        return any(
            getattr(own, n) is not getattr(CompressionCallback, n) for n in ("loss_terms", "task_scale")
        )

    def summary(self) -> dict[str, Any]:
        """Primitives describing the outcome (the app writes them to ``summary.json``)."""
        return {}

    def check_with(self, others: Sequence[CompressionCallback], model: nn.Module) -> None:
        """Extra combination checks the :data:`CONFLICTS` table cannot express (default: none)."""

    def conflict(self, other: CompressionCallback, why: str) -> ValueError:
        """The error for a combination that cannot work: names both callbacks' config keys."""
        return ValueError(f"{self.config_key} cannot be combined with {other.config_key}: {why}")

    def export_options(self) -> dict[str, Any]:
        """Keyword arguments this technique adds to the combined export (e.g. ``nm=(2, 4)``)."""
        return {}

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The first compression callback to reach setup puts them all in canonical order for every
        # later hook, checks the combination, prepares all of them in that order, and installs the
        # resume guard and the loss wrapper once.
        sort_callbacks(trainer)
        destroy_gloo_group_at_exit()
        callbacks = compression_callbacks(trainer.callbacks)  # type: ignore[attr-defined]
        if not callbacks:
            return
        if callbacks[0]._prepared_model != id(pl_module):
            check_combination(callbacks, self.network(pl_module))
            check_optimization(callbacks, pl_module)
            for callback in callbacks:
                callback.prepare_once(trainer, pl_module)
        # teardown removed the instance hooks of an earlier fit of this module: install them again
        install_resume_guard(trainer, pl_module, callbacks)
        if stage == "fit":
            install_loss_hook(trainer, pl_module, callbacks)

    def prepare_once(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run :meth:`prepare_model` unless it already ran for this LightningModule."""
        if self._prepared_model != id(pl_module):
            self.prepare_model(trainer, pl_module)
            self._prepared_model = id(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        check_primitive(self.state, f"{self.state_key}.state_dict()")
        shape = self.config.shape() if self.config is not None else {}
        return {**self.state, SHAPE_KEY: shape} if shape else dict(self.state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.update({k: v for k, v in state_dict.items() if k != SHAPE_KEY})

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
        remove_instance_hooks(pl_module)

    def remove_hooks(self) -> None:
        """Remove the optimizer step hooks this callback registered."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


_Config = TypeVar("_Config", bound=TechniqueConfig)
_T = TypeVar("_T")
#: Where a callback's ``SHAPE_FIELDS`` ride in its checkpoint state.
SHAPE_KEY = "_config"


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
    current = list(trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning, not declared
    ordered = iter(compression_callbacks(current))
    trainer.callbacks = [next(ordered) if isinstance(c, CompressionCallback) else c for c in current]  # type: ignore[attr-defined]


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


@dataclass(frozen=True)
class Conflict:
    """A combination of two techniques that cannot work: when ``applies(first, second, network)``
    holds for callbacks of techniques ``first`` and ``second``, setup fails with ``why`` (a format
    string over ``first``, ``second`` — the callbacks — and ``head_dim``, the network's head width)."""

    first: str
    second: str
    applies: Callable[[Any, Any, nn.Module], bool]
    why: str


def _head_dim(network: nn.Module) -> int | None:
    config = getattr(network, "config", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    return getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)


def _cfg(callback: Any) -> Any:
    return callback.config if getattr(callback, "config", None) is not None else callback


#: Every combination that cannot work, over the techniques' config fields (one table; callbacks do not
#: import each other). Checked in ``setup`` before any model change, in canonical order.
CONFLICTS: tuple[Conflict, ...] = (
    Conflict(
        "moe",
        "structured",
        lambda moe, st, net: "neurons" in _cfg(st).units,
        "pruning single FFN neurons would leave experts of unequal size; drop 'neurons' from "
        "{second.config_key}.units (heads and whole attention/FFN blocks combine with experts)",
    ),
    Conflict(
        "prune",
        "moe",
        lambda p, moe, net: _cfg(p).mode == "nm" and _cfg(p).start_step < _cfg(moe).split_step,
        "N:M masks from step {first.config.start_step} would be scrambled by the expert split at step "
        "{second.config.split_step} (it permutes the down projection's input columns); set "
        "{first.config_key}.start_step >= {second.config_key}.split_step",
    ),
    Conflict(
        "prune",
        "structured",
        lambda p, st, net: _cfg(p).mode == "nm" and "neurons" in _cfg(st).units,
        "slicing single FFN neurons removes single input columns of the down projection and breaks "
        "its {first.config.n}:{first.config.m} groups; drop 'neurons' from {second.config_key}.units "
        "(heads and whole blocks are fine) or use mode: unstructured",
    ),
    Conflict(
        "prune",
        "structured",
        lambda p, st, net: (
            _cfg(p).mode == "nm"
            and "heads" in _cfg(st).units
            and bool(_head_dim(net))
            and _head_dim(net) % _cfg(p).m != 0
        ),
        "the head width {head_dim} is not a multiple of m={first.config.m}, so removing a head breaks the "
        "output projection's {first.config.n}:{first.config.m} groups; drop 'heads' from {second.config_key}.units",
    ),
    Conflict(
        "prune",
        "quant",
        lambda p, q, net: _cfg(p).sr_ste_decay is not None,
        "SR-STE ({first.config_key}.sr_ste_decay) parametrizes the Linear weight, and fake-quant replaces "
        "the Linear, so SR-STE would silently do nothing; use hard masks (sr_ste_decay: null) with quantization",
    ),
    Conflict(
        "quant",
        "structured",
        lambda q, st, net: _cfg(q).method != "absmax" or _cfg(q).granularity == "group",
        "slicing cuts weight rows/columns, but method={first.config.method!r} / granularity="
        "{first.config.granularity!r} keeps learned or group-wise scales that would no longer fit; "
        "use method: absmax with granularity: channel or tensor",
    ),
)


def check_combination(callbacks: Sequence[CompressionCallback], network: nn.Module) -> None:
    """Raise ValueError, naming both callbacks, for the first :data:`CONFLICTS` entry that applies,
    then let each callback add checks of its own (:meth:`CompressionCallback.check_with`). The same
    technique twice (equal ``state_key``) never gets here: Lightning rejects it in ``Trainer()``."""
    for rule in CONFLICTS:
        for first in (c for c in callbacks if c.technique == rule.first):
            for second in (c for c in callbacks if c.technique == rule.second):
                if rule.applies(first, second, network):
                    why = rule.why.format(first=_Fmt(first), second=_Fmt(second), head_dim=_head_dim(network))
                    raise first.conflict(second, why)
    for callback in callbacks:
        callback.check_with([c for c in callbacks if c is not callback], network)


class _Fmt:
    """Format-string view of a callback: ``{x.config.field}`` works before and after configs exist."""

    def __init__(self, callback: Any):
        self.config_key, self.config = callback.config_key, _cfg(callback)


def check_optimization(callbacks: Sequence[CompressionCallback], pl_module: LightningModule) -> None:
    """Techniques that add loss terms need automatic optimization: with ``automatic_optimization =
    False`` the loss ``training_step`` returns is not what is backpropagated, so the terms would be
    silently dropped. Raises TypeError naming the callbacks."""
    adding = [c.config_key for c in callbacks if c.adds_loss]
    if adding and not pl_module.automatic_optimization:
        raise TypeError(
            f"{', '.join(adding)}: add loss terms to the loss training_step returns, but "
            f"{type(pl_module).__name__} uses manual optimization (automatic_optimization=False), which "
            "backpropagates its own loss; use automatic optimization, or add "
            "callback.loss_terms(trainer, module, batch, outputs) to your loss yourself"
        )


# --------------------------------------------------------------------------- the network


def find_network(
    pl_module: nn.Module,
    network: str | Callable[[nn.Module], nn.Module] | None = None,
    owner: str = "compress",
) -> nn.Module:
    """The network a callback compresses inside ``pl_module``.

    ``network`` (a callback's ``network=`` argument): a dotted attribute path or a callable. Without
    it: ``pl_module.model`` when that is a module; else, for a LightningModule, its single Hugging
    Face ``PreTrainedModel`` (outermost); else ``pl_module`` itself (a plain or HF network given
    directly, as in :func:`lightcook.ops` transforms).

    Raises:
        ValueError: the path names no module, the callable returns no module, or the module holds
            several pretrained models (the message lists them and says to pass ``network=``).

    Example:
        >>> import torch
        >>> class Wrapper(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.student = torch.nn.Linear(2, 2)
        >>> find_network(Wrapper(), "student")
        Linear(in_features=2, out_features=2, bias=True)
    """
    if callable(network) and not isinstance(network, str):
        found = network(pl_module)
        if not isinstance(found, nn.Module):
            raise ValueError(
                f"{owner}.network: the callable returned {type(found).__name__}, not an nn.Module"
            )
        return found
    if isinstance(network, str):
        try:
            return pl_module.get_submodule(network) if network else pl_module
        except AttributeError:
            children = ", ".join(n for n, _ in pl_module.named_children()) or "none"
            raise ValueError(
                f"{owner}.network: {type(pl_module).__name__} has no submodule {network!r} "
                f"(its children: {children})"
            ) from None
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and isinstance(pl_module, LightningModule):
        return model
    if not isinstance(pl_module, LightningModule):
        return pl_module
    pretrained = _outermost_pretrained(pl_module)
    if len(pretrained) > 1:
        raise ValueError(
            f"{owner}.network: {type(pl_module).__name__} holds several pretrained models "
            f"({', '.join(pretrained)}) and no .model; say which one with network='<attribute>'"
        )
    return pl_module.get_submodule(pretrained[0]) if pretrained else pl_module


def _outermost_pretrained(root: nn.Module) -> list[str]:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    found: list[str] = []
    for name, module in root.named_modules():
        if name and isinstance(module, PreTrainedModel) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def describe_network(pl_module: nn.Module, network: nn.Module, owner: str = "compress") -> str:
    """``looked in CausalLMModule.model (LlamaForCausalLM); set <owner>.network to point elsewhere``."""
    path = next((n for n, m in pl_module.named_modules() if m is network), None)
    where = type(pl_module).__name__ + (f".{path}" if path else "")
    return f"looked in {where} ({type(network).__name__}); set {owner}.network to point elsewhere"


# --------------------------------------------------------------------------- instance hooks on the module

#: Attribute on a LightningModule's instance hooks installed by the compression callbacks.
_OWNER = "_lightcook_hook"


def _install(
    pl_module: nn.Module, hook_name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    """Shadow ``pl_module.<hook_name>`` with an instance attribute built from the current one."""
    current = pl_module.__dict__.get(hook_name)
    if getattr(current, _OWNER, False):
        return
    wrapper = make(getattr(pl_module, hook_name))
    setattr(wrapper, _OWNER, (hook_name, current))
    setattr(pl_module, hook_name, wrapper)


def remove_instance_hooks(pl_module: nn.Module) -> None:
    """Undo :func:`install_loss_hook` / :func:`install_resume_guard`: the module's own methods show again."""
    for hook_name in ("training_step", "on_load_checkpoint"):
        installed = pl_module.__dict__.get(hook_name)
        owner = getattr(installed, _OWNER, None)
        if not owner:
            continue
        saved = owner[1]
        if saved is None:
            delattr(pl_module, hook_name)
        else:
            setattr(pl_module, hook_name, saved)


def install_resume_guard(
    trainer: Trainer, pl_module: LightningModule, callbacks: Sequence[CompressionCallback]
) -> None:
    """Before Lightning loads a checkpoint's weights (``on_load_checkpoint`` of the module runs first),
    compare each callback's ``SHAPE_FIELDS`` with the values stored in the checkpoint.

    Raises (from the load): ValueError naming the key, the checkpoint's value and this run's.
    """

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
            stored = checkpoint.get("callbacks", {})
            for callback in callbacks:
                check_resumed_shape(callback, stored.get(callback.state_key), trainer.ckpt_path)
            return inner(checkpoint)

        return on_load_checkpoint

    _install(pl_module, "on_load_checkpoint", make)


def check_resumed_shape(callback: CompressionCallback, stored: Mapping[str, Any] | None, path: Any) -> None:
    """Raise ValueError if a checkpoint's callback state was made with other ``SHAPE_FIELDS`` values.

    Example:
        >>> class Demo(CompressionCallback):
        ...     technique = "demo"
        >>> demo = Demo()
        >>> demo.config = type("C", (), {"shape": lambda self: {"n": 2}})()
        >>> check_resumed_shape(demo, {"_config": {"n": 1}}, "last.ckpt")
        Traceback (most recent call last):
        ...
        ValueError: compress.demo.n: the checkpoint last.ckpt was trained with 1, this run has 2; resume with the same setting, or start a new run without ckpt_path
    """
    if callback.config is None or not isinstance(stored, Mapping) or SHAPE_KEY not in stored:
        return
    current, saved = callback.config.shape(), stored[SHAPE_KEY]
    for key in current:
        if key in saved and saved[key] != current[key]:
            raise ValueError(
                f"{callback.config_key}.{key}: the checkpoint {path} was trained with {saved[key]!r}, this "
                f"run has {current[key]!r}; resume with the same setting, or start a new run without ckpt_path"
            )


# --------------------------------------------------------------------------- the loss wrapper


class _Captured:
    """What the network returned during one training step (the last call)."""

    output: Any = None


@contextlib.contextmanager
def capture_network_output(network: nn.Module, extra_kwargs: Mapping[str, Any]) -> Iterator[_Captured]:
    """Record the network's output during the block; add ``extra_kwargs`` to its forward calls."""
    captured = _Captured()

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, **extra_kwargs}

    def post(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.output = output

    handles = [network.register_forward_hook(post)]
    if extra_kwargs:
        handles.append(network.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    return None


def install_loss_hook(
    trainer: Trainer, pl_module: LightningModule, callbacks: Sequence[CompressionCallback]
) -> None:
    """Wrap the module's own ``training_step`` once: run it (its logging and own loss terms intact),
    capture the network's output with a forward hook, then return ``loss * Π task_scale + Σ
    loss_terms``. Each term is logged as ``compress/<name>/<term>`` and the returned total as
    ``compress/loss`` (the module's own ``train/loss`` stays what the module logged). Removed in
    ``teardown``.

    The module's loss is whatever its ``training_step`` returns (a tensor or a dict with ``"loss"``).
    A step without a loss (``None``: no labels, or skipped) is left alone, unless a callback weighs
    the task loss by 0 (distillation only): then the terms alone are the loss.
    """
    active = [c for c in callbacks if c.adds_loss or c.network_kwargs()]
    if not active:
        return

    networks = {id(c.network(pl_module)): c.config_key for c in active}
    if len(networks) > 1:
        raise ValueError(
            f"{', '.join(networks.values())}: add loss terms over different networks (network=...); "
            "they must compress the same one"
        )

    network = active[0].network(pl_module)
    extra = {k: v for c in active for k, v in c.network_kwargs().items()}
    scale = math.prod(c.task_scale() for c in active)

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            with contextlib.ExitStack() as stack:
                for callback in active:
                    stack.enter_context(callback.step_context(trainer, pl_module, batch))
                captured = stack.enter_context(capture_network_output(network, extra))
                output = inner(batch, *args, **kwargs)
            loss = _loss_of(output)
            if loss is None and scale != 0.0:
                return output
            total = loss * scale if loss is not None and scale != 1.0 else loss
            size = batch_size_of(batch)
            for callback in active:
                for term, value in callback.loss_terms(trainer, pl_module, batch, captured.output).items():
                    total = value if total is None else total + value
                    key = f"{callback.config_key.replace('.', '/')}/{term}"
                    pl_module.log(key, value.detach(), on_step=True, on_epoch=False, batch_size=size)
            if total is None:
                return output
            pl_module.log("compress/loss", total.detach(), on_step=True, on_epoch=False, batch_size=size)
            return total if output is None or isinstance(output, Tensor) else {**output, "loss": total}

        return training_step

    _install(pl_module, "training_step", make)


def batch_size_of(batch: Any) -> int | None:
    """Rows of a dict batch (its first tensor's first dim), for ``self.log(batch_size=...)``."""
    if isinstance(batch, Mapping):
        first = next((v for v in batch.values() if isinstance(v, Tensor) and v.dim()), None)
        return int(first.shape[0]) if first is not None else None
    return None


# --------------------------------------------------------------------------- calibration


def training_loader(trainer: Trainer) -> Any:
    """The training DataLoader: the fit loop's, else (outside ``fit``) the datamodule's, else None."""
    loader = first_loader(trainer.train_dataloader)
    datamodule = getattr(trainer, "datamodule", None)
    if loader is None and datamodule is not None and is_overridden("train_dataloader", datamodule):
        loader = first_loader(datamodule.train_dataloader())
    return loader


def calibration_batches(
    trainer: Trainer | None,
    count: int,
    owner: str,
    *,
    seed: int = 0,
    ordered: bool = False,
    per_rank: bool = False,
    loader: Any = None,
) -> Iterator[Any]:
    """Up to ``count`` training batches for a calibration pass, on the training device.

    The live training iterator is untouched (a fresh single-process view of the loader) and the
    global RNG too (``fork_rng``; the sampler is seeded with ``seed``, so a rerun or a resumed run
    sees the same batches). ``ordered``: map-style datasets in dataset order, no shuffling.
    ``per_rank``: under DDP rank ``r`` of ``w`` takes batches ``r, r + w, ...`` (each rank its own;
    reduce the statistics afterwards), else every rank sees the same batches. ``loader``: the
    loader to read (default: :func:`training_loader`).

    Raises:
        RuntimeError: no trainer or no training dataloader, or it yields no batch (names ``owner``).
    """
    if loader is None and trainer is not None:
        loader = training_loader(trainer)
    if trainer is None or loader is None:
        raise RuntimeError(f"{owner}: needs training batches for calibration; the trainer has none")
    source = _in_dataset_order(loader) if ordered else calibration_source(loader)
    rank, world = (trainer.global_rank, trainer.world_size) if per_rank else (0, 1)
    seen = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in itertools.islice(source, rank, count * world, world):
            seen += 1
            yield trainer.strategy.batch_to_device(batch)
    if not seen:
        raise RuntimeError(f"{owner}: the training dataloader yielded no batch for calibration")


def sequential_calibration(
    trainer: Trainer | None,
    network: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[str],
    visit: Visit,
    *,
    owner: str,
    percdamp: float,
    **options: Any,
) -> list[str]:
    """Run :func:`~lightcook.ops.calibrate.sequential_pass` the way a callback's one-shot needs it.

    ``network`` in eval mode under the trainer's precision context, the Hessian statistics summed
    over DDP ranks (so every rank compresses identically), a progress line on rank 0 when the
    trainer shows a progress bar; a calibration error is prefixed with ``owner``.

    Args:
        trainer: gives the precision context and the ranks (``None``: one process, no autocast).
        network: the decoder-only model holding ``layers``.
        batches: calibration batches on the network's device.
        layers: qualified names of the Linear layers to visit.
        visit: ``visit(name, module, H)`` (H dampened by ``percdamp``).
        owner: the config key to name in errors, e.g. ``compress.quant.init='gptq'``.
        percdamp: damping of the pass (:func:`~lightcook.ops.calibrate.dampen_`).
        **options: ``true_sequential``, ``dense_targets``, ``dense_damp``, ``reference`` of the pass.

    Returns:
        The names visited, in order.

    Raises:
        RuntimeError: no calibration batch (the message starts with ``owner``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        >>> sequential_calibration(None, net, [torch.randint(0, 64, (2, 8))],
        ...     ["model.layers.0.mlp.up_proj"], lambda *_: None, owner="compress.x", percdamp=0.01)
        ['model.layers.0.mlp.up_proj']
        >>> sequential_calibration(None, net, [], ["model.layers.0.mlp.up_proj"], lambda *_: None,
        ...     owner="compress.x", percdamp=0.01)
        Traceback (most recent call last):
        ...
        RuntimeError: compress.x: sequential calibration: no calibration batch reached the first block
    """
    context = trainer.precision_plugin.forward_context() if trainer else contextlib.nullcontext()
    progress = trainer is not None and trainer.is_global_zero and trainer.progress_bar_callback is not None
    reduce = (lambda t: all_reduce_(t, trainer)) if trainer is not None else None
    with eval_mode(network), context:
        try:
            return sequential_pass(
                network,
                batches,
                layers,
                visit,
                percdamp=percdamp,
                reduce=reduce,
                progress=progress,
                **options,
            )
        except RuntimeError as err:
            if str(err).startswith(owner):
                raise
            raise RuntimeError(f"{owner}: {err}") from None


def _in_dataset_order(loader: Any) -> Iterable:
    if (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size
    ):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn
        )
    return calibration_source(loader)


def calibration_loss(pl_module: nn.Module, network: nn.Module, batch: Any, owner: str) -> Tensor:
    """The task loss of one calibration batch: ``pl_module.compute_loss(batch)`` when the module has it,
    else the network's own loss (a Hugging Face model given ``labels``).

    Raises:
        TypeError: neither is available (names ``owner`` and what to add).
    """
    compute = getattr(pl_module, "compute_loss", None)
    if callable(compute):
        result = compute(batch)
        return result[0] if isinstance(result, tuple) else result
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        inputs.setdefault("labels", inputs.get("input_ids"))
        loss = getattr(network(**inputs), "loss", None)
        if isinstance(loss, Tensor):
            return loss
    raise TypeError(
        f"{owner}: needs a task loss on calibration batches: give {type(pl_module).__name__} a "
        "compute_loss(batch) -> loss or (loss, outputs), or use a network that returns .loss from labels"
    )


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
