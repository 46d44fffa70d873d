"""Slurm, spawned ranks and the launch environment: the checks and processes around one training job.

- :func:`check_launch` compares ``trainer.num_nodes`` / ``trainer.devices`` with the Slurm allocation
  (and other launch mistakes) and raises ``ValueError`` naming the key before anything is built.
- :func:`spawn_ranks` runs the whole job (validate → fit → validate → summary) in one spawned process
  per device: ``trainer.strategy=ddp_spawn``, and ``ddp`` inside a Hydra multirun (where Lightning's
  script re-launch would replay the whole sweep in every child).
- :class:`SlurmRequeue` turns ``SIGUSR1`` (``#SBATCH --signal=USR1@120``) into checkpoint → stop →
  ``scontrol requeue`` at the next optimizer-step boundary, agreed by all ranks. Lightning's own
  auto-requeue saves from inside the signal handler, wherever the main thread happens to be (halfway
  through an optimizer step, or between two ranks' collectives).
- :func:`environment_plugins` gives the Trainer Lightning's SLURM environment without that requeue.

Nothing here imports the rest of :mod:`lightcook.app`: :func:`spawn_ranks` is handed the function
each rank runs (:func:`lightcook.app.train.train`).

Example:
    >>> from omegaconf import OmegaConf
    >>> check_launch(OmegaConf.create({"strategy": "ddp", "devices": 2, "num_nodes": 1}), env={})
    >>> env = {"SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "x"}
    >>> check_launch(OmegaConf.create({"strategy": "ddp", "devices": 2, "num_nodes": 2}), env=env)
    Traceback (most recent call last):
    ...
    ValueError: trainer.num_nodes=2 but the Slurm allocation has 1 node(s) (SLURM_NNODES=1): set trainer.num_nodes=1, or submit with sbatch --nodes=2
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

SPAWNED = "ddp_spawn"

# --------------------------------------------------------------------------- launch checks


def slurm_launched(env: Mapping[str, str] | None = None) -> bool:
    """True when this process is a Slurm task that Lightning's ``SLURMEnvironment`` will use
    (``SLURM_NTASKS`` set and the job is not an interactive ``bash``/``interactive`` shell)."""
    env = os.environ if env is None else env
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else None


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """``--ntasks-per-node``, else the first count of ``SLURM_TASKS_PER_NODE`` (``2(x3)`` → 2)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    match = re.match(r"(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
    return int(match.group(1)) if match else None


def check_launch(trainer_cfg: DictConfig, env: Mapping[str, str] | None = None) -> None:
    """Fail fast, naming the ``trainer.*`` key, when the processes cannot match the configuration.

    Raises:
        ValueError: under Slurm, ``trainer.num_nodes`` differs from ``SLURM_NNODES``, or
            ``trainer.devices`` differs from the tasks per node, or ``trainer.strategy=ddp_spawn``
            (Slurm starts the ranks); anywhere, ``ddp_spawn`` with ``trainer.num_nodes > 1``.
    """
    env = os.environ if env is None else env
    strategy, nodes = trainer_cfg.get("strategy"), _int_or_none(trainer_cfg.get("num_nodes", 1)) or 1
    if strategy == SPAWNED and nodes > 1:
        raise ValueError(
            f"trainer.num_nodes={nodes} with trainer.strategy=ddp_spawn: spawning starts processes on "
            "this machine only; use srun (experiments/slurm/compress.sbatch) for several nodes"
        )
    if slurm_launched(env):
        _check_slurm_allocation(trainer_cfg, env, strategy, nodes)


def _check_slurm_allocation(
    trainer_cfg: DictConfig, env: Mapping[str, str], strategy: Any, nodes: int
) -> None:
    if strategy == SPAWNED:
        raise ValueError(
            "trainer.strategy=ddp_spawn under srun: Slurm already started one task per device; use "
            "trainer=ddp (or strategy ddp) with --ntasks-per-node equal to trainer.devices"
        )
    slurm_nodes = int(env.get("SLURM_NNODES", "1"))
    if nodes != slurm_nodes:
        raise ValueError(
            f"trainer.num_nodes={nodes} but the Slurm allocation has {slurm_nodes} node(s) "
            f"(SLURM_NNODES={slurm_nodes}): set trainer.num_nodes={slurm_nodes}, or submit with "
            f"sbatch --nodes={nodes}"
        )
    devices, per_node = _int_or_none(trainer_cfg.get("devices", 1)), _tasks_per_node(env)
    if devices is not None and per_node is not None and devices != per_node:
        raise ValueError(
            f"trainer.devices={devices} but Slurm started {per_node} task(s) per node "
            f"(SLURM_NTASKS={env['SLURM_NTASKS']}): launch one task per device "
            f"(sbatch --ntasks-per-node={devices}) or set trainer.devices={per_node}"
        )


# --------------------------------------------------------------------------- spawned ranks


def needs_spawn(trainer_cfg: DictConfig, multirun: bool, env: Mapping[str, str] | None = None) -> bool:
    """Whether :func:`train` must start the ranks itself: ``strategy=ddp_spawn``, or ``strategy=ddp``
    with several devices inside a Hydra multirun, unless something else (srun, torchrun, Lightning's
    re-launch) already created this process as one rank."""
    env = os.environ if env is None else env
    external = "LOCAL_RANK" in env or slurm_launched(env)
    devices = _int_or_none(trainer_cfg.get("devices", 1)) or 1
    strategy = trainer_cfg.get("strategy")
    return not external and (strategy == SPAWNED or (strategy == "ddp" and multirun and devices > 1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(cfg: DictConfig, run_dir: Path, target: Callable[[DictConfig], Any]) -> dict[str, Any]:
    """Run ``target(cfg)`` in ``trainer.devices`` spawned processes (gloo/NCCL over loopback) as DDP
    ranks of one job in ``run_dir``; return rank 0's summary (``run_dir/summary.json``).

    Every rank builds its own module, data and callbacks, so compression callbacks restructure the model
    in each process exactly as under srun; unlike Lightning's ``ddp_spawn`` nothing is pickled back.

    Args:
        cfg: the job's configuration (resolved into primitives for the children).
        run_dir: the run directory every rank writes into.
        target: a module-level function (picklable by name), :func:`lightcook.app.train.train`.

    Raises:
        ValueError: ``trainer.devices`` is not an integer.
    """
    import torch.multiprocessing as mp

    devices = _int_or_none(cfg.trainer.get("devices"))
    if devices is None:
        raise ValueError(f"trainer.devices={cfg.trainer.get('devices')!r}: spawning needs an integer")
    container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))  # cfg is a DictConfig
    container["trainer"]["strategy"] = "ddp"
    container["paths"]["run_dir"] = str(run_dir)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NODE_RANK": "0"}
    env["WORLD_SIZE"] = str(devices)
    mp.start_processes(_spawned_rank, args=(target, container, env), nprocs=devices, start_method="spawn")
    return json.loads((run_dir / "summary.json").read_text())


def _spawned_rank(
    local_rank: int, target: Callable[[DictConfig], Any], container: dict[str, Any], env: dict[str, str]
) -> None:
    os.environ.update(env, LOCAL_RANK=str(local_rank), RANK=str(local_rank))
    import torch.distributed as dist

    try:
        target(DictConfig(container))
    finally:
        # Shut gloo down before the interpreter exits: a process group left alive can abort the
        # process at exit ("terminate called without an active exception", SIGABRT).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- Slurm requeue


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID`` (``None`` outside Slurm)."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env.get("SLURM_JOB_ID")


def slurm_restarts(env: Mapping[str, str] | None = None) -> int | None:
    """How often Slurm requeued this job (``SLURM_RESTART_COUNT``), ``None`` outside Slurm.

    Example:
        >>> slurm_restarts(env={}), slurm_restarts(env={"SLURM_NTASKS": "1", "SLURM_RESTART_COUNT": "2"})
        (None, 2)
    """
    env = os.environ if env is None else env
    if not slurm_launched(env):
        return None
    return int(env.get("SLURM_RESTART_COUNT", "0"))


def environment_plugins(env: Mapping[str, str] | None = None) -> list[Any]:
    """Trainer plugins for the launch environment: under srun, Lightning's SLURM environment minus its
    own requeue handler (it checkpoints from inside the signal handler, mid-step; :class:`SlurmRequeue`
    does it at a step boundary instead); elsewhere none.

    Example:
        >>> environment_plugins(env={})
        []
    """
    if not slurm_launched(env):
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


class SlurmRequeue(Callback):
    """On ``signum`` (default ``SIGUSR1``): checkpoint at the next optimizer-step boundary, stop, and
    (after fit returns) requeue the Slurm job, which restarts with the same job id, hence the same run
    directory, and resumes from ``checkpoint`` (``ckpt_path: auto``).

    The handler only notes the signal. After every optimizer step the ranks agree (one all-reduce of a
    flag) on whether any of them was signalled, then all save together, so masks, quantizer state and
    optimizer state in the checkpoint belong to one finished step. Append it after the compression
    callbacks so their ``on_train_batch_end`` work (e.g. re-applying masks) is in the checkpoint.

    Args:
        checkpoint: where to save (``<run_dir>/checkpoints/last.ckpt``: what ``ckpt_path: auto`` resumes).
        signum: the signal Slurm sends before the time limit (``#SBATCH --signal=USR1@120``) or that
            ``scancel --signal=USR1`` sends.

    Example:
        >>> requeue = SlurmRequeue("/tmp/run/checkpoints/last.ckpt")
        >>> with requeue.listening():
        ...     pass  # validate and fit here; SIGUSR1 is noted instead of killing the process
        >>> requeue.requeued
        False
    """

    def __init__(self, checkpoint: str | os.PathLike, signum: int = signal.SIGUSR1) -> None:
        self.checkpoint = str(checkpoint)
        self.signum = signum
        self.signalled = False
        self.requeued = False
        self.step: int | None = None  # the step checkpointed for the requeue
        self._last_step = -1

    @contextmanager
    def listening(self) -> Iterator[None]:
        """Note ``signum`` while the block runs (main thread only), then restore the old handler."""
        previous = signal.signal(self.signum, self._note)
        try:
            yield
        finally:
            signal.signal(self.signum, previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.signalled = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:  # inside gradient accumulation: no finished step
            return
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # the last step: let the job finish instead
        trainer.save_checkpoint(self.checkpoint)
        self.requeued = trainer.should_stop = True
        self.step = trainer.global_step

    def requeue_job(self, trainer: Trainer) -> None:
        """Rank 0: ``scontrol requeue <job>`` (call after fit returned).

        Raises:
            RuntimeError: ``scontrol`` failed (e.g. the job was submitted with ``--no-requeue``).
        """
        job = slurm_job_id()
        if not trainer.is_global_zero or job is None:
            return
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"scontrol requeue {job} failed ({done.stderr.strip()}); the checkpoint is "
                f"{self.checkpoint}: resubmit with ckpt_path={self.checkpoint}"
            )
        print(
            f"[lightcook] signalled: checkpoint at step {self.step} -> {self.checkpoint}; requeued job {job}",
            flush=True,
        )
