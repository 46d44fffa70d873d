"""From configuration to objects: the module, the data, the callbacks, the loggers and the Trainer.

Every node with a ``_target_`` is instantiated with ``_convert_="all"`` (plain containers, so
checkpoints load with ``weights_only=True``); a ``ValueError``/``TypeError`` raised by a target is
re-raised with the config key in front.

Example:
    >>> from lightcook.app.config import compose_config
    >>> cfg = compose_config(["model=tiny_llama", "+compress=[prune]"])
    >>> sorted(named_callbacks(cfg))
    ['lr_monitor', 'model_checkpoint', 'progress_bar', 'prune', 'report']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict
from typing_extensions import override

from lightcook.app.slurm import environment_plugins
from lightcook.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, then renamed: never half-written."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def instantiate_named(nodes: DictConfig | None, where: str, **kwargs: Any) -> dict[str, Any]:
    """Instantiate every child of ``nodes`` that has a ``_target_``, keyed by its config key.

    Args:
        nodes: a config node whose children may have a ``_target_`` (others are skipped).
        where: the node's key, put in front of errors (``compress`` → ``compress.prune: ...``).
        **kwargs: passed to every target.

    Raises:
        ValueError, TypeError: a target refused its arguments; the message starts with ``where.<key>``.

    Example:
        >>> nodes = DictConfig({"a": {"_target_": "collections.Counter", "x": 1}, "b": 2})
        >>> instantiate_named(nodes, "demo")
        {'a': Counter({'x': 1})}
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    objects = {}
    for key, node in (nodes or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            objects[str(key)] = instantiate(node, _convert_="all", **kwargs)
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, ValueError | TypeError):
                prefix = f"{where}.{key!s}"
                message = str(cause) if str(cause).startswith(f"{prefix}.") else f"{prefix}: {cause}"
                raise type(cause)(message) from cause
            raise
    return objects


def instantiate_nodes(nodes: DictConfig | None, where: str, **kwargs: Any) -> list[Any]:
    """:func:`instantiate_named` without the keys.

    Example:
        >>> instantiate_nodes(DictConfig({"a": {"_target_": "builtins.dict"}}), "demo")
        [{}]
    """
    return list(instantiate_named(nodes, where, **kwargs).values())


def build_module(cfg: DictConfig) -> Any:
    """The LightningModule from ``cfg.model`` (ValueErrors re-raised with the key named).

    Example:
        >>> from lightcook.app.config import compose_config
        >>> type(build_module(compose_config(["model=tiny_llama"]))).__name__
        'CausalLMModule'
    """
    (module,) = instantiate_nodes(DictConfig({"model": cfg.model}), "cfg")
    return module


def build_datamodule(cfg: DictConfig, module: Any) -> Any:
    """The DataModule from ``cfg.data``, with the model's tokenizer unless ``data.tokenizer`` is set.

    Args:
        cfg: the whole configuration.
        module: the LightningModule (its ``tokenizer_name`` and ``max_context()`` are used).

    Raises:
        ValueError: no tokenizer known, or ``data.block_size`` beyond the model's context.

    Example:
        >>> from lightcook.app.config import compose_config
        >>> cfg = compose_config(["model=tiny_llama"])
        >>> type(build_datamodule(cfg, build_module(cfg))).__name__
        'TextDataModule'
    """
    tokenizer = cfg.data.get("tokenizer") or getattr(module, "tokenizer_name", None)
    if not tokenizer:
        raise ValueError("data.tokenizer: the model has no tokenizer (random config); set data.tokenizer")
    block = cfg.data.get("block_size")
    context = module.max_context() if hasattr(module, "max_context") else None
    if block and context and block > context:
        raise ValueError(f"data.block_size={block} exceeds the model's context of {context} tokens")
    data_cfg = OmegaConf.masked_copy(cfg, ["data"])
    with open_dict(data_cfg):
        data_cfg.data.tokenizer = tokenizer
    (datamodule,) = instantiate_nodes(data_cfg, "cfg")
    return datamodule


def named_callbacks(cfg: DictConfig) -> dict[str, Callback]:
    """Callbacks from ``cfg.callbacks``, every compression node under ``cfg.compress``, and — when
    there is at least one — the compression report (``cfg.report``; ``report=none`` turns it off),
    keyed by their config key (a ``callbacks`` key that a ``compress`` key shadows gets its group in
    front: ``callbacks.<key>``).
    """
    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks")
    compress = instantiate_named(cfg.get("compress"), "compress")
    report = cfg.get("report")
    if compress and report is not None:  # the report writes the one export of every technique
        compress |= instantiate_named(DictConfig({"report": report}), "cfg")
    named = {(f"callbacks.{k}" if k in compress else k): cb for k, cb in callbacks.items()}
    return named | compress


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The callbacks of :func:`named_callbacks`, in order (user callbacks, compression, report).

    Example:
        >>> from lightcook.app.config import compose_config
        >>> [type(cb).__name__ for cb in build_callbacks(compose_config(["callbacks=none"]))]
        []
    """
    return list(named_callbacks(cfg).values())


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers of ``cfg.logger`` (``csv``, ``wandb`` = csv + W&B).

    Example:
        >>> from lightcook.app.config import compose_config
        >>> cfg = compose_config(["paths.run_dir=/tmp/lightcook-doctest"])
        >>> [type(logger).__name__ for logger in build_loggers(cfg)]
        ['ResumableCSVLogger']
    """
    return instantiate_nodes(cfg.get("logger"), "logger")


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[Callback], loggers: list[Logger]
) -> Trainer:
    """The Trainer from ``cfg.trainer`` writing into ``run_dir``, with atomic checkpoint writes and the
    launch environment's plugins (:func:`lightcook.app.slurm.environment_plugins`).

    Raises:
        ValueError, TypeError: a ``trainer.*`` argument the Trainer refuses (named).
    """
    plugins: list[Any] = [AtomicCheckpointIO(), *environment_plugins()]
    (trainer,) = instantiate_nodes(
        DictConfig({"trainer": cfg.trainer}),
        "cfg",
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=plugins,
    )
    return trainer
