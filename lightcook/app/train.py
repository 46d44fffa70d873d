"""``train(cfg)``: one job of the Hydra app — validate, fit, validate — and its ``summary.json``.

``run.py`` is a thin ``@hydra.main`` wrapper; tests call :func:`train` with configs made by
:func:`lightcook.app.config.compose_config`. Every node under ``cfg.compress`` with a ``_target_``
becomes a callback; those with a ``summary()`` method report into ``summary.json["compress"]``.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from lightcook.app.cards import run_command, write_run_cards
from lightcook.app.config import new_run_id
from lightcook.app.launch import (
    build_datamodule,
    build_loggers,
    build_module,
    build_trainer,
    named_callbacks,
)
from lightcook.app.order import use_resumable_order
from lightcook.app.slurm import (
    SlurmRequeue,
    check_launch,
    needs_spawn,
    slurm_launched,
    slurm_restarts,
    spawn_ranks,
)
from lightcook.app.stages import run_teacher_stage
from lightcook.app.timing import StepTimer
from lightcook.callbacks.base import compression_callbacks
from lightcook.callbacks.report import merged_export_options
from lightcook.export import estimate_bytes
from lightcook.export.compressed_tensors import SUPPORTED as COMPRESSED_TENSORS_HOLDS
from lightcook.export.compressed_tensors import save_compressed_tensors
from lightcook.export.convert import convert_to_compressed_tensors
from lightcook.io import atomic_dir, model_bytes, read_checkpoint, write_json_atomic, write_text_atomic


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job: validate, fit, validate; write config, checkpoints, metrics and ``summary.json``.

    With ``trainer.strategy=ddp_spawn`` (or ``ddp`` inside a Hydra multirun) the whole job runs in one
    spawned process per device. Under srun, SIGUSR1 makes the ranks checkpoint at the next step and
    requeue the Slurm job; the call then returns ``{"requeued": True, ...}`` without a summary.

    Args:
        cfg: the composed configuration (``conf/config.yaml``).

    Returns:
        The summary dict (also written to ``<run_dir>/summary.json`` by rank 0).

    Raises:
        ValueError: ``trainer.num_nodes`` / ``trainer.devices`` / ``trainer.strategy`` cannot match the
            processes (the Slurm allocation, spawning), or ``ckpt_path`` is not a readable checkpoint —
            before anything is built; bad model/data keys.
        FileNotFoundError: ``ckpt_path`` names a file that does not exist.

    Example:
        >>> from lightcook.app.config import compose_config
        >>> cfg = compose_config(["model=tiny_llama", "ckpt_path=/no/such.ckpt"])
        >>> train(cfg)
        Traceback (most recent call last):
        ...
        FileNotFoundError: ckpt_path='/no/such.ckpt': no such file
    """
    started = time.time()
    check_launch(cfg.trainer)
    run_dir = _run_dir(cfg)
    cfg, requeued = run_teacher_stage(cfg, run_dir, train)
    if requeued is not None:
        return requeued
    resume = _resume_path(cfg, run_dir)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).expanduser().resolve())
    if needs_spawn(cfg.trainer, _multirun()):
        return spawn_ranks(cfg, run_dir, train)
    seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    callbacks = named_callbacks(cfg)
    timer = StepTimer()
    requeue = SlurmRequeue(run_dir / "checkpoints" / "last.ckpt") if slurm_launched() else None
    loggers = build_loggers(cfg)
    extra = [timer, *([requeue] if requeue else [])]
    trainer = build_trainer(cfg, run_dir, [*callbacks.values(), *extra], loggers)
    use_resumable_order(datamodule, trainer, cfg.seed)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for logger in loggers:
        logger.log_hyperparams(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)))

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
    summary["compress"] = compress_summaries(cfg, callbacks)
    if (cfg.get("stages") or {}).get("teacher"):
        summary["teacher_stage"] = OmegaConf.to_container(cfg.stages.teacher)
    summary["train_tokens_per_second"] = timer.tokens_per_second(trainer)
    summary["train_step_seconds"] = round(timer.seconds, 2)
    if trainer.is_global_zero:
        summary["exports"] = {
            k: v for cb in callbacks.values() for k, v in getattr(cb, "exports", {}).items()
        }
        changed = exported_techniques(module, list(callbacks.values()))
        summary["loadable_model"] = summary["exports"].get("compressed") if changed else None
        refused: str | None = None
        if cfg.save_model and changed and set(changed) <= COMPRESSED_TENSORS_HOLDS:
            refused = _save_compressed_tensors(module, list(callbacks.values()), run_dir / "model")
            written = refused is None
        elif cfg.save_model and "structured" in changed and summary["loadable_model"]:
            refused = _convert_sliced(summary["loadable_model"], run_dir / "model")
            written = refused is None
        else:
            written = False
        if written:
            summary["bytes_on_disk"] = model_bytes(run_dir / "model")
            summary["loadable_model"] = str(run_dir / "model")
            summary["model_format"] = "compressed-tensors"
        if cfg.save_model and changed and summary.get("model_format") is None:
            summary["model_not_saved"] = (
                f"<run_dir>/model not written: the export stores {', '.join(changed)}, which "
                + (refused or "neither a save_pretrained nor a compressed-tensors folder can hold")
                + " (it would reload as a different network); the trained model is the compressed export "
                "(lightcook.export.load_compressed)"
                + ("" if summary["loadable_model"] else "; report=none, so no export was written")
            )
        elif cfg.save_model and not changed:
            summary["bytes_on_disk"] = save_model(module, run_dir / "model")
            summary["loadable_model"] = str(run_dir / "model")
            summary["model_format"] = "transformers"
        tokenizer = getattr(datamodule, "tokenizer", None)
        if (
            summary.get("model_format") and tokenizer is not None
        ):  # vLLM / from_pretrained users need it there
            tokenizer.save_pretrained(str(run_dir / "model"))
        summary["model_cards"] = [str(p) for p in write_run_cards(summary, run_command())]
        summary["wall_seconds"] = round(time.time() - started, 2)
        write_json_atomic(run_dir / "summary.json", summary)
        _report_to_wandb(loggers, summary, run_dir)
        _print_summary(summary)
    return summary


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


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume, checked to be readable before anything is built.

    ``auto``: ``<run_dir>/checkpoints/last.ckpt`` when it exists; ``null``: none; else the path given.
    """
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return None
        path = last
    else:
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such file")
    try:
        read_checkpoint(path)
    except ValueError as err:
        raise ValueError(f"ckpt_path: {err}") from err
    return str(path)


def _metric(trainer: Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _validate(trainer: Trainer, module: Any, datamodule: Any) -> dict[str, float | None]:
    if not trainer.limit_val_batches:
        return {"val_ppl": None, "val_loss": None}
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {"val_ppl": _metric(trainer, "val/ppl"), "val_loss": _metric(trainer, "val/loss")}


def exported_techniques(module: Any, callbacks: list[Callback]) -> list[str]:
    """The techniques the one compressed export of ``module.model`` stores (its manifest's
    ``techniques``, computed without writing): quantized codes, N:M, MoE or structured slicing, which
    change what the network is. ``[]`` for a dense run, distillation or unstructured masks (their
    ``save_pretrained`` folder is the trained network).

    Example:
        >>> holder = torch.nn.Module()
        >>> holder.model = torch.nn.Linear(4, 2)
        >>> exported_techniques(holder, [])
        []
    """
    compressors = compression_callbacks(callbacks)
    if not compressors:
        return []
    options = merged_export_options(compressors)
    keys = {k: options[k] for k in ("nm", "architecture") if k in options}
    return list(estimate_bytes(module.model, **keys)["techniques"])  # as the report's export


def _save_compressed_tensors(module: Any, callbacks: list[Callback], target: Path) -> str | None:
    """Write ``module.model`` as a compressed-tensors folder; the reason when it cannot be written."""
    nm = merged_export_options(compression_callbacks(callbacks)).get("nm")
    try:
        save_compressed_tensors(module.model, target, nm=nm)
    except ValueError as err:  # e.g. a quantized GPT-2 Conv1D
        return f"a compressed-tensors folder cannot hold ({err})"
    return None


def _convert_sliced(export: str, target: Path) -> str | None:
    """Write a structured run's lightcook export as a compressed-tensors folder (uneven layers
    zero-padded to a stock config); the reason when it cannot be written."""
    try:
        convert_to_compressed_tensors(export, target)
    except ValueError as err:  # e.g. a sliced MoE whose attention widths differ
        return f"a compressed-tensors folder cannot hold ({err})"
    return None


def save_model(module: Any, target: Path) -> int:
    """Save the trained network (HF ``save_pretrained`` when possible) atomically; return its bytes.

    Args:
        module: a LightningModule whose network is ``module.model``.
        target: the folder to write (replaced atomically).

    Example:
        >>> import tempfile, torch
        >>> holder = torch.nn.Module()
        >>> holder.model = torch.nn.Linear(4, 2)
        >>> save_model(holder, Path(tempfile.mkdtemp()) / "model") > 4 * 2 * 4
        True
    """
    with atomic_dir(target) as tmp:
        if hasattr(module.model, "save_pretrained"):
            module.model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_model as save_safetensors

            save_safetensors(module.model, str(tmp / "model.safetensors"))
    return model_bytes(target)


def compress_summaries(cfg: DictConfig, callbacks: Mapping[str, Callback]) -> dict[str, Any]:
    """``summary.json["compress"]``: one entry per ``cfg.compress`` key (``{}`` for a technique with
    nothing to say), holding ``callback.summary()`` — a dict of primitives such as reached vs wanted
    sparsity — and the same for any other callback with a ``summary()`` method, under its config key.

    Args:
        cfg: the configuration (its ``compress`` keys are always listed).
        callbacks: the run's callbacks by config key (:func:`lightcook.app.launch.named_callbacks`).

    Example:
        >>> class Pruned(Callback):
        ...     def summary(self):
        ...         return {"sparsity": 0.5, "target_sparsity": 0.5}
        >>> cfg = DictConfig({"compress": {"none": {}, "structured": {}}})
        >>> compress_summaries(cfg, {"structured": Pruned(), "progress_bar": Callback()})
        {'none': {}, 'structured': {'sparsity': 0.5, 'target_sparsity': 0.5}}
    """
    entries: dict[str, Any] = {str(key): {} for key in cfg.get("compress") or {}}
    for key, callback in callbacks.items():
        summary = getattr(callback, "summary", None)
        if not callable(summary):
            continue
        value = summary()
        if not isinstance(value, Mapping):
            warnings.warn(
                f"{key}: {type(callback).__name__}.summary() returned a {type(value).__name__}, "
                "not a dict; left out of summary.json",
                stacklevel=2,
            )
            continue
        entries[key] = dict(value)
    return dict(sorted(entries.items()))


def _report_to_wandb(loggers: list[Logger], summary: dict[str, Any], run_dir: Path) -> None:
    """W&B runs get the scalar summary (``summary/<key>``), ``summary.json`` as a run file (the
    resolved config is already the run's config; a saved ``config.yaml`` would clash with W&B's own),
    and for a compression run the report: its table (``report/exports``), its plots
    (``report/<plot>``) and every export folder as one ``model`` artifact (``policy="immutable"``:
    files are referenced from the run directory, not copied)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.summary.update({f"summary/{k}": v for k, v in summary.items() if _scalar(v)})
            run.save(str(run_dir / "summary.json"), base_path=str(run_dir), policy="now")
            report_file = run_dir / "report.json"
            if report_file.is_file():
                _log_report(run, json.loads(report_file.read_text()), summary)


def _log_report(run: Any, report: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
    import wandb

    columns, rows = export_rows(report)
    logged: dict[str, Any] = {"report/exports": wandb.Table(columns=list[Any](columns), data=rows)}
    for plot in report.get("plots") or []:  # file names in the run directory
        path = Path(summary["run_dir"]) / plot
        if path.is_file():
            logged[f"report/{path.stem}"] = wandb.Image(str(path))
    run.log(logged)
    exports = {k: Path(v) for k, v in (summary.get("exports") or {}).items() if Path(v).is_dir()}
    if summary.get("model_format") and (Path(summary["run_dir"]) / "model").is_dir():
        exports["model"] = Path(summary["run_dir"]) / "model"
    if not exports:
        return
    metadata = {"techniques": report.get("techniques"), "compress": report.get("compress")}
    metadata.update({row[0]: dict(zip(columns[1:], row[1:])) for row in rows})
    artifact = wandb.Artifact(f"compressed-{run.id}", type="model", metadata=metadata)
    for name, folder in exports.items():
        artifact.add_dir(str(folder), name=name, policy="immutable")
    run.log_artifact(artifact, aliases=["latest"])


def export_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The report's exports as a table: one row per folder (the lightcook export and each of
    ``report.formats``) with its held-out ppl, MB and size ratio to the dense fp32 model.

    Example:
        >>> report = {"ppl": {"export": 54.6, "live": 54.5}, "bytes": {"measured": 2_000_000, "dense_fp32": 8_000_000},
        ...           "formats": {"gguf": {"ppl": 54.7, "bytes": 1_000_000, "error": None}}}
        >>> export_rows(report)[1]
        [['lightcook', 54.6, 2.0, 4.0], ['gguf', 54.7, 1.0, 8.0]]
    """
    columns = ["format", "held-out ppl", "MB", "x smaller than dense fp32"]
    dense = (report.get("bytes") or {}).get("dense_fp32")

    def row(name: str, ppl: float | None, size: int | None) -> list[Any]:
        ratio = round(dense / size, 2) if dense and size else None
        return [name, ppl, None if size is None else round(size / 1e6, 2), ratio]

    rows = [
        row("lightcook", (report.get("ppl") or {}).get("export"), (report.get("bytes") or {}).get("measured"))
    ]
    for fmt, entry in (report.get("formats") or {}).items():
        if not entry.get("error"):
            rows.append(row(fmt, entry.get("ppl"), entry.get("bytes")))
    return columns, rows


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
        "slurm_restarts": slurm_restarts(),
        "compress": {},
        "run_dir": cfg.paths.run_dir,
        "torch_threads": torch.get_num_threads(),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    before, after = summary["val_ppl_before"], summary["val_ppl_after"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    print(
        f"[lightcook] {summary['model']}: val ppl {fmt(before)} -> {fmt(after)} after "
        f"{summary['train_steps']} steps ({summary['fit_seconds']} s); summary: {summary['run_dir']}/summary.json"
    )
    report = Path(summary["run_dir"]) / "report.json"
    if report.is_file():
        print(compressed_table(summary, json.loads(report.read_text())))


def compressed_table(summary: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """The lines a compression run prints at the end: the export's ppl, bytes and speed next to the
    dense model's (from ``summary.json`` and the report's ``report.json``), and where things are.

    Example:
        >>> report = {"techniques": ["quantized"], "ppl": {"val": 30.0, "export": 31.0},
        ...           "bytes": {"measured": 40, "dense_fp32": 100}, "speed": {"measured": False}}
        >>> print(compressed_table({"val_ppl_before": 50.0, "run_dir": "r", "loadable_model": "r/c"}, report))
        [lightcook] export (quantized)           dense      compressed
          held-out ppl                          50.00 (start)  31.00 (export; live 30.00)
          bytes (weights + tensors on disk)     0.0 MB     0.0 MB (0.40x)
          speed                                 not measured
          the trained model: r/c (lightcook.export.load_compressed); report: r/report.md
    """
    ppl, size, speed = report.get("ppl", {}), report.get("bytes", {}), report.get("speed", {})
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    mb = lambda v: "n/a" if v is None else f"{v / 1e6:.1f} MB"  # noqa: E731
    measured, dense = size.get("measured"), size.get("dense_fp32")
    ratio = f" ({measured / dense:.2f}x)" if measured and dense else ""
    techniques = ", ".join(report.get("techniques", [])) or "none"
    lines = [
        f"[lightcook] export ({techniques})".ljust(40) + " dense      compressed",
        "  held-out ppl".ljust(40)
        + f"{fmt(summary.get('val_ppl_before'))} (start)  {fmt(ppl.get('export'))} (export; live {fmt(ppl.get('val'))})",
        "  bytes (weights + tensors on disk)".ljust(40) + f"{mb(dense)}     {mb(measured)}{ratio}",
    ]
    if speed.get("measured"):
        decode = speed.get("decode", {})
        rate = decode.get("tokens_per_second", {})
        lines.append(
            "  speed vs dense bf16 (same process)".ljust(40)
            + f"prefill {speed['batch']}x{speed['tokens']}: {fmt(speed.get('speedup_vs_bf16'))}x"
            + (
                f", decode batch 1: {fmt(decode.get('speedup_vs_bf16'))}x "
                f"({fmt(rate.get('compressed'))} vs {fmt(rate.get('dense_bf16'))} tok/s)"
                if decode.get("measured")
                else ""
            )
        )
    else:
        lines.append("  speed".ljust(40) + "not measured")
    where = summary.get("loadable_model")
    how = (
        ("compressed-tensors, " if summary.get("model_format") == "compressed-tensors" else "")
        + "transformers from_pretrained"
        if where and Path(where).name == "model"
        else "lightcook.export.load_compressed"
    )
    lines.append(f"  the trained model: {where} ({how}); report: {summary['run_dir']}/report.md")
    return "\n".join(lines)
