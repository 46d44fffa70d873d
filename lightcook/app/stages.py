"""Recipe stages that run before the compression run: ``compress.kd.teacher=finetune``.

Distilling from the un-fine-tuned start model hurts on a new domain (docs/benchmarks.md). With
``compress.kd.teacher=finetune`` and ``compress.kd.teacher_steps=N`` the app first fine-tunes the
dense model for ``N`` steps on the same data — a plain run of its own in ``<run_dir>/teacher``
(checkpointed, resumed by ``ckpt_path=auto`` like any run, and not refitted once its
``summary.json`` says it finished) — and then runs the compression job with that folder's
``model/`` as the teacher. ``compress.kd.start_from_teacher=true`` also starts the student from
it (fine-tune, then compress and recover with KD: the staged recipes in ``conf/experiment/``).

What ran is recorded under ``cfg.stages.teacher`` (in ``config.yaml``) and in ``summary.json``
(``teacher_stage``).

Example:
    >>> from lightcook.app.config import compose_config
    >>> cfg = compose_config(["model=tiny_llama", "+compress=[kd]", "compress.kd.teacher=finetune"])
    >>> run_teacher_stage(cfg, Path("unused"), train=print)
    Traceback (most recent call last):
    ...
    ValueError: compress.kd.teacher_steps: teacher=finetune needs teacher_steps >= 1 (the dense fine-tuning steps before compressing), got 0
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from lightcook.app.launch import named_callbacks
from lightcook.ops.distill import FINETUNE

__all__ = ["run_teacher_stage", "teacher_stage_nodes"]

#: Keys of a distillation node that belong to the stage (reset once the stage has run).
STAGE_KEYS = {"teacher_steps": 0, "start_from_teacher": False}


def teacher_stage_nodes(cfg: DictConfig) -> dict[str, int]:
    """The compress nodes whose ``teacher`` is ``finetune``: ``{key: teacher_steps}``.

    Raises:
        ValueError: two such nodes (one teacher stage per run).
    """
    found = {
        str(key): int(node.get("teacher_steps") or 0)
        for key, node in (cfg.get("compress") or {}).items()
        if isinstance(node, DictConfig) and node.get("teacher") == FINETUNE
    }
    if len(found) > 1:
        raise ValueError(f"compress: one teacher={FINETUNE} stage per run, got it in {sorted(found)}")
    return found


def _finished(stage_dir: Path, steps: int) -> bool:
    summary = stage_dir / "summary.json"
    if not summary.is_file() or not (stage_dir / "model" / "config.json").is_file():
        return False
    return json.loads(summary.read_text()).get("train_steps") == steps


def run_teacher_stage(
    cfg: DictConfig,
    run_dir: Path,
    train: Callable[[DictConfig], dict[str, Any]],
    check: Callable[[DictConfig], Any] = named_callbacks,
) -> tuple[DictConfig, dict[str, Any] | None]:
    """Fine-tune the teacher when ``cfg`` asks for it: ``(the compression job's config, None)``, or
    ``(cfg, the stage's summary)`` when Slurm requeued the job during the stage (it resumes there).

    The config is ``cfg`` unchanged when no node says ``teacher=finetune``; else a copy whose node's
    teacher is ``<run_dir>/teacher/model`` (the student's start too, with ``start_from_teacher``),
    without the stage keys, and with ``stages.teacher`` recording what ran.

    Args:
        cfg: the composed configuration of the whole job.
        run_dir: the job's run directory (the stage runs in ``run_dir / "teacher"``).
        train: the app's ``train`` (runs the stage as a dense job of its own).
        check: called on the job's config before the stage trains (the app builds its callbacks:
            ``teacher_steps`` and every other compression key are checked before any training).

    Raises:
        ValueError: what ``check`` raises (``compress.kd.teacher_steps`` below 1 with
            ``teacher=finetune``, ...), or two ``teacher=finetune`` nodes.
    """
    nodes = teacher_stage_nodes(cfg)
    if not nodes:
        return cfg, None
    check(cfg)
    ((key, steps),) = nodes.items()
    start_from_teacher = bool(cfg.compress[key].get("start_from_teacher"))
    stage_dir = run_dir / "teacher"
    teacher = str(stage_dir / "model")
    out = cfg.copy()
    with open_dict(out):
        out.compress[key].update(STAGE_KEYS, teacher=teacher)
        if start_from_teacher:
            out.model.name_or_path = teacher
            out.model.tokenizer = cfg.model.get("tokenizer") or cfg.model.name_or_path
            out.model.config = None  # a random model's config dict: the weights now come from the folder
    reused = _finished(stage_dir, steps)
    if not reused:
        stage = cfg.copy()
        with open_dict(stage):
            stage.compress = None
            stage.stages = None
            stage.trainer.max_steps = steps
            stage.paths.run_dir = str(stage_dir)
            stage.ckpt_path = "auto"
            stage.validate_before = False
            stage.save_model = True
        done = train(stage)
        if done.get("requeued"):
            return cfg, done
    summary = json.loads((stage_dir / "summary.json").read_text())
    with open_dict(out):
        out.stages = out.get("stages") or {}
        out.stages.teacher = {
            "node": f"compress.{key}",
            "run_dir": str(stage_dir),
            "model": teacher,
            "steps": steps,
            "val_ppl": summary.get("val_ppl_after"),
            "start_from_teacher": start_from_teacher,
            "reused": reused,
        }
    return out, None
