"""The Hydra application: ``train(cfg)`` builds module, data, callbacks, loggers and trainer, runs
validate → fit → validate, and writes ``summary.json`` into the run directory.

``run.py`` is a thin ``@hydra.main`` wrapper; tests call :func:`train` with configs made by Hydra's
compose API. Every node under ``cfg.compress`` with a ``_target_`` becomes a callback.

Example:
    >>> from lightcook.app import compose_config
    >>> cfg = compose_config(["model=tiny_llama", "trainer=fast"])
    >>> cfg.model._target_
    'lightcook.modules.CausalLMModule'
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from typing_extensions import override

from lightcook.io import atomic_path, bytes_on_disk, write_json_atomic, write_text_atomic
from lightcook.scale import (
    SlurmRequeue,
    StepTimer,
    check_launch,
    needs_spawn,
    slurm_launched,
    spawn_ranks,
    use_resumable_order,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def new_run_id() -> str:
    """A run directory name that cannot collide: the Slurm job id when present (so a requeued job
    finds its own checkpoint), else time + pid + random suffix."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    )
    job = job or os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}-{secrets.token_hex(2)}"


_PROCESS_RUN_ID: list[str] = []


def _process_run_id() -> str:
    if not _PROCESS_RUN_ID:
        _PROCESS_RUN_ID.append(new_run_id())
    return _PROCESS_RUN_ID[0]


def _sweep_id() -> str:
    """One id per sweep, shared with the jobs a launcher (submitit) submits: they inherit it through
    ``LIGHTCOOK_SWEEP_ID``, so every job of a sweep lands under the same ``multiruns/<id>``."""
    if "LIGHTCOOK_SWEEP_ID" not in os.environ:
        os.environ["LIGHTCOOK_SWEEP_ID"] = _process_run_id()
    return os.environ["LIGHTCOOK_SWEEP_ID"]


def register_resolvers() -> None:
    """``${lightcook_run_id:}`` (one id per process), ``${lightcook_sweep_id:}`` (one per sweep, also in
    the jobs it submits) and ``${abspath:p}`` for the Hydra configs."""
    if not OmegaConf.has_resolver("lightcook_run_id"):
        OmegaConf.register_new_resolver("lightcook_run_id", _process_run_id)
    if not OmegaConf.has_resolver("lightcook_sweep_id"):
        OmegaConf.register_new_resolver("lightcook_sweep_id", _sweep_id)
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()))


register_resolvers()


def compress_names() -> list[str]:
    """The techniques ``+compress=[...]`` accepts: the files of ``conf/compress/``."""
    return sorted(p.stem for p in (CONFIG_DIR / "compress").glob("*.yaml"))


def check_compress_overrides(overrides: list[str]) -> None:
    """Reject a bad ``compress`` selection before Hydra composes (which would drop a duplicate
    silently and run an empty list as plain fine-tuning).

    Raises:
        ValueError: ``compress`` given as an empty list, naming a technique twice, or naming an unknown one
            (the message lists the available names).

    Example:
        >>> check_compress_overrides(["+compress=[quant,prune]", "model=tiny_llama"])
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    available = compress_names()
    for parsed in OverridesParser.create().parse_overrides(
        [o for o in overrides if o.lstrip("+~").startswith("compress=")]
    ):
        if parsed.is_delete():
            continue
        value = parsed.value()
        for choice in value.list if isinstance(value, ChoiceSweep) else [value]:
            names = [choice] if isinstance(choice, str) else list(choice)
            if not names:
                raise ValueError(
                    f"compress: the list is empty; name at least one of {available} "
                    "(or leave +compress out; [none] is the uncompressed baseline of a sweep)"
                )
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"compress: {repeated} given twice in {names}; each technique once")
            unknown = [n for n in names if n not in available]
            if unknown:
                raise ValueError(f"compress: unknown technique(s) {unknown}; available: {available}")
            if "none" in names and len(names) > 1:
                raise ValueError(f"compress: 'none' (the uncompressed baseline) stands alone, got {names}")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with command-line style overrides, without running Hydra's app."""
    from hydra import compose, initialize_config_dir

    check_compress_overrides(overrides or [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, then renamed: never half-written."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if cfg.paths.get("run_dir"):
        return Path(cfg.paths.run_dir).expanduser().resolve()
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    return (Path(cfg.paths.output_dir).expanduser() / "runs" / new_run_id()).resolve()


def instantiate_nodes(nodes: DictConfig | None, where: str, **kwargs: Any) -> list[Any]:
    """Instantiate every child of ``nodes`` that has a ``_target_``; errors name ``where.<key>``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    objects = []
    for key, node in (nodes or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            objects.append(instantiate(node, _convert_="all", **kwargs))
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, ValueError | TypeError):
                raise type(cause)(f"{where}.{key}: {cause}") from cause
            raise
    return objects


def build_module(cfg: DictConfig) -> Any:
    """The LightningModule from ``cfg.model`` (ValueErrors re-raised with the key named)."""
    (module,) = instantiate_nodes(DictConfig({"model": cfg.model}), "cfg")
    return module


def build_datamodule(cfg: DictConfig, module: Any) -> Any:
    """The DataModule from ``cfg.data``, with the model's tokenizer unless ``data.tokenizer`` is set.

    Raises:
        ValueError: no tokenizer known, or ``data.block_size`` beyond the model's context.
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


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Callbacks from ``cfg.callbacks``, every compression node under ``cfg.compress``, and — when
    there is at least one — the compression report (``cfg.report``; ``report=none`` turns it off)."""
    callbacks = instantiate_nodes(cfg.get("callbacks"), "callbacks")
    compress = instantiate_nodes(cfg.get("compress"), "compress")
    report = cfg.get("report")
    if compress and report is not None:
        if len(compress) > 1 and report.get("export_dir"):
            # Combined, each technique's own export would hold a partial model; the report's one
            # export (report.export_dir) holds them all.
            for callback in compress:
                if getattr(callback, "export_dir", None) is not None:
                    callback.export_dir = None
        compress += instantiate_nodes(DictConfig({"report": report}), "cfg")
    return callbacks + compress


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return cfg.ckpt_path


def _metric(trainer: Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _validate(trainer: Trainer, module: Any, datamodule: Any) -> dict[str, float | None]:
    if not trainer.limit_val_batches:
        return {"val_ppl": None, "val_loss": None}
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {"val_ppl": _metric(trainer, "val/ppl"), "val_loss": _metric(trainer, "val/loss")}


def save_model(module: Any, target: Path) -> int:
    """Save the trained network (HF ``save_pretrained`` when possible) atomically; return its bytes."""
    from lightcook.io import atomic_dir

    with atomic_dir(target) as tmp:
        if hasattr(module.model, "save_pretrained"):
            module.model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_model as save_safetensors

            save_safetensors(module.model, str(tmp / "model.safetensors"))
    return bytes_on_disk(target)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job: validate, fit, validate; write config, checkpoints, metrics and ``summary.json``.

    With ``trainer.strategy=ddp_spawn`` (or ``ddp`` inside a Hydra multirun) the whole job runs in one
    spawned process per device. Under srun, SIGUSR1 makes the ranks checkpoint at the next step and
    requeue the Slurm job; the call then returns ``{"requeued": True, ...}`` without a summary.

    Returns the summary dict (also written to ``<run_dir>/summary.json`` by rank 0).

    Raises:
        ValueError: ``trainer.num_nodes`` / ``trainer.devices`` / ``trainer.strategy`` cannot match the
            processes (the Slurm allocation, spawning) — before anything is built; bad model/data keys.
    """
    started = time.time()
    check_launch(cfg.trainer)
    run_dir = _run_dir(cfg)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).expanduser().resolve())
    if needs_spawn(cfg.trainer, _multirun()):
        return spawn_ranks(cfg, run_dir)
    seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    callbacks = build_callbacks(cfg)
    timer = StepTimer()
    requeue = SlurmRequeue(run_dir / "checkpoints" / "last.ckpt") if slurm_launched() else None
    loggers: list[Logger] = instantiate_nodes(cfg.get("logger"), "logger")
    trainer = _build_trainer(cfg, run_dir, [*callbacks, timer, *([requeue] if requeue else [])], loggers)
    use_resumable_order(datamodule, trainer, cfg.seed)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    resume = _resume_path(cfg, run_dir)
    with requeue.listening() if requeue else contextlib.nullcontext():
        before = _validate(trainer, module, datamodule) if cfg.validate_before and not resume else {}
        fit_started = time.time()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        fit_seconds = time.time() - fit_started
    if requeue and requeue.requeued:
        requeue.requeue_job(trainer)
        return {"requeued": True, "run_dir": str(run_dir), "train_steps": trainer.global_step}
    after = _validate(trainer, module, datamodule)

    summary = _summary(cfg, trainer, module, datamodule, before, after, resume, fit_seconds)
    summary["train_tokens_per_second"] = timer.tokens_per_second(trainer)
    summary["train_step_seconds"] = round(timer.seconds, 2)
    if trainer.is_global_zero:
        if cfg.save_model:
            summary["bytes_on_disk"] = save_model(module, run_dir / "model")
        summary["exports"] = {k: v for cb in callbacks for k, v in getattr(cb, "exports", {}).items()}
        summary["wall_seconds"] = round(time.time() - started, 2)
        write_json_atomic(run_dir / "summary.json", summary)
        _report_to_wandb(loggers, summary, run_dir)
        _print_summary(summary)
    return summary


def _build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[Callback], loggers: list[Logger]
) -> Trainer:
    """The Trainer from ``cfg.trainer`` with atomic checkpoint writes; under srun with Lightning's SLURM
    environment minus its own requeue handler (it checkpoints from inside the signal handler,
    mid-step; :class:`~lightcook.scale.SlurmRequeue` does it at a step boundary instead)."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    if slurm_launched():
        from lightning.fabric.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    (trainer,) = instantiate_nodes(
        DictConfig({"trainer": cfg.trainer}),
        "cfg",
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=plugins,
    )
    return trainer


def _report_to_wandb(loggers: list[Logger], summary: dict[str, Any], run_dir: Path) -> None:
    """W&B runs get the scalar summary (``summary/<key>``) and ``summary.json`` as a run file (the
    resolved config is already the run's config; a saved ``config.yaml`` would clash with W&B's own)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({f"summary/{k}": v for k, v in summary.items() if _scalar(v)})
            logger.experiment.save(str(run_dir / "summary.json"), base_path=str(run_dir), policy="now")


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | str | bool) or value is None


def _summary(cfg, trainer, module, datamodule, before, after, resume, fit_seconds) -> dict[str, Any]:
    params = {id(p): p for p in module.model.parameters()}.values()
    batch = getattr(datamodule, "batch_size", None)
    block = getattr(datamodule, "block_size", None)
    tokens = None
    if batch and block:
        tokens = trainer.global_step * batch * block * trainer.accumulate_grad_batches * trainer.world_size
    return {
        "model": getattr(module, "model_name", type(module.model).__name__),
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "bytes_on_disk": None,
        "val_ppl_before": before.get("val_ppl"),
        "val_loss_before": before.get("val_loss"),
        "val_ppl_after": after.get("val_ppl"),
        "val_loss_after": after.get("val_loss"),
        "train_steps": trainer.global_step,
        "train_tokens": tokens,
        "fit_seconds": round(fit_seconds, 2),
        "wall_seconds": None,
        "world_size": trainer.world_size,
        "resumed_from": resume,
        "slurm_restarts": _slurm_restarts(),
        "compress": sorted((cfg.get("compress") or {}).keys()),
        "run_dir": cfg.paths.run_dir,
        "torch_threads": torch.get_num_threads(),
    }


def _slurm_restarts() -> int | None:
    """How often Slurm requeued this job (``SLURM_RESTART_COUNT``), ``None`` outside Slurm."""
    if not slurm_launched():
        return None
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def _print_summary(summary: dict[str, Any]) -> None:
    before, after = summary["val_ppl_before"], summary["val_ppl_after"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    print(
        f"[lightcook] {summary['model']}: val ppl {fmt(before)} -> {fmt(after)} after "
        f"{summary['train_steps']} steps ({summary['fit_seconds']} s); summary: {summary['run_dir']}/summary.json"
    )
