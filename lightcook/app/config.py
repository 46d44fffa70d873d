"""The Hydra configuration: where ``conf/`` is, the run-id resolvers, the ``+compress`` check, and
composition without running Hydra's app.

Example:
    >>> cfg = compose_config(["model=tiny_llama", "trainer=fast"])
    >>> cfg.model._target_
    'lightcook.modules.CausalLMModule'
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from lightcook.app.slurm import slurm_job_id

#: ``conf/`` of the repository (Hydra's config folder; not part of a wheel).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def new_run_id() -> str:
    """A run directory name that cannot collide: the Slurm job id when present (so a requeued job
    finds its own checkpoint), else time + pid + random suffix.

    Example:
        >>> new_run_id() != new_run_id() or new_run_id().startswith("slurm-")
        True
    """
    job = slurm_job_id()
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
    the jobs it submits) and ``${abspath:p}`` for the Hydra configs (idempotent).

    Example:
        >>> register_resolvers()
        >>> OmegaConf.create({"p": "${abspath:/tmp/../tmp}"}).p
        '/tmp'
    """
    if not OmegaConf.has_resolver("lightcook_run_id"):
        OmegaConf.register_new_resolver("lightcook_run_id", _process_run_id)
    if not OmegaConf.has_resolver("lightcook_sweep_id"):
        OmegaConf.register_new_resolver("lightcook_sweep_id", _sweep_id)
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()))


register_resolvers()


def compress_names() -> list[str]:
    """The techniques ``+compress=[...]`` accepts: the files of ``conf/compress/``.

    Example:
        >>> {"prune", "quant", "none"} <= set(compress_names())
        True
    """
    return sorted(p.stem for p in (CONFIG_DIR / "compress").glob("*.yaml"))


def check_compress_overrides(overrides: list[str]) -> None:
    """Reject a bad ``compress`` selection before Hydra composes (which would drop a duplicate
    silently and run an empty list as plain fine-tuning).

    Args:
        overrides: command-line style Hydra overrides; only those of ``compress`` are looked at.

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
            _check_selection(
                [choice] if isinstance(choice, str) else list(cast("list[str]", choice)), available
            )


def _check_selection(names: list[str], available: list[str]) -> None:
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
    """Compose ``conf/config.yaml`` with command-line style overrides, without running Hydra's app.

    Args:
        overrides: Hydra overrides, e.g. ``["model=tiny_llama", "+compress=[prune]"]``.

    Raises:
        ValueError: a bad ``compress`` selection (:func:`check_compress_overrides`).

    Example:
        >>> sorted(compose_config(["+compress=[quant,prune]"]).compress)
        ['prune', 'quant']
    """
    from hydra import compose, initialize_config_dir

    check_compress_overrides(overrides or [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])
