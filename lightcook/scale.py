"""Scaling out: launch checks, spawned DDP ranks, Slurm requeue at a step boundary, a resumable
training order, and an honest throughput timer. :func:`lightcook.app.train` wires these in.

- :func:`check_launch` compares ``trainer.num_nodes`` / ``trainer.devices`` with the Slurm allocation
  (and other launch mistakes) and raises ``ValueError`` naming the key before anything is built.
- :func:`spawn_ranks` runs the whole job (validate → fit → validate → summary) in one spawned process
  per device: ``trainer.strategy=ddp_spawn``, and ``ddp`` inside a Hydra multirun (where Lightning's
  script re-launch would replay the whole sweep in every child).
- :class:`SlurmRequeue` turns ``SIGUSR1`` (``#SBATCH --signal=USR1@120``) into checkpoint → stop →
  ``scontrol requeue`` at the next optimizer-step boundary, agreed by all ranks. Lightning's own
  auto-requeue saves from inside the signal handler, wherever the main thread happens to be (halfway
  through an optimizer step, or between two ranks' collectives).
- :class:`ResumableSampler` makes the training order a function of ``(seed, epoch)`` only: the same
  global batches for 1 process × batch 2b and 2 processes × batch b, and a requeued job continues
  mid-epoch at the batch where it stopped (Lightning restarts a plain DataLoader's epoch from the start).
- :class:`StepTimer` measures time inside training steps and the tokens they processed.

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

import functools
import json
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
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


def spawn_ranks(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``train(cfg)`` in ``trainer.devices`` spawned processes (gloo/NCCL over loopback) as DDP
    ranks of one job in ``run_dir``; return rank 0's summary.

    Every rank builds its own module, data and callbacks, so compression callbacks restructure the model
    in each process exactly as under srun; unlike Lightning's ``ddp_spawn`` nothing is pickled back.

    Raises:
        ValueError: ``trainer.devices`` is not an integer.
    """
    import torch.multiprocessing as mp

    devices = _int_or_none(cfg.trainer.get("devices"))
    if devices is None:
        raise ValueError(f"trainer.devices={cfg.trainer.get('devices')!r}: spawning needs an integer")
    container = OmegaConf.to_container(cfg, resolve=True)
    container["trainer"]["strategy"] = "ddp"
    container["paths"]["run_dir"] = str(run_dir)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NODE_RANK": "0"}
    env["WORLD_SIZE"] = str(devices)
    mp.start_processes(_spawned_rank, args=(container, env), nprocs=devices, start_method="spawn")
    return json.loads((run_dir / "summary.json").read_text())


def _spawned_rank(local_rank: int, container: dict[str, Any], env: dict[str, str]) -> None:
    os.environ.update(env, LOCAL_RANK=str(local_rank), RANK=str(local_rank))
    import torch.distributed as dist

    from lightcook.app import train

    try:
        train(DictConfig(container))
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


# --------------------------------------------------------------------------- resumable training order


class ResumableSampler(DistributedSampler):
    """One permutation of the dataset per epoch, drawn from ``seed + epoch``; rank ``r`` of ``n`` takes
    every ``n``-th index from ``r`` (:class:`DistributedSampler` semantics, ``drop_last=True``).

    At each ``iter()`` the sampler asks ``position()`` for ``(epoch, batches already trained in that
    epoch)`` and skips those, so a run restored from a mid-epoch checkpoint continues with the batch it
    would have trained next. Being a ``DistributedSampler``, Lightning leaves it in place under DDP.

    Args:
        dataset: the training dataset.
        num_replicas, rank: the world size and this process's global rank.
        shuffle: permute (``True``) or keep the dataset order.
        seed: the permutation seed (the run's ``seed``).
        batch_size: rows per batch on this rank (to turn batches into samples to skip).
        position: callable returning ``(epoch, batches_done)``; ``None`` means ``(self.epoch, 0)``.

    Example:
        >>> data = list(range(8))
        >>> one = list(ResumableSampler(data, 1, 0, shuffle=True, seed=0, batch_size=4))
        >>> two = [list(ResumableSampler(data, 2, r, shuffle=True, seed=0, batch_size=2)) for r in (0, 1)]
        >>> sorted(one[:4]) == sorted(two[0][:2] + two[1][:2])  # the same first global batch
        True
        >>> list(ResumableSampler(data, 1, 0, True, 0, 4, position=lambda: (0, 1))) == one[4:]
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        batch_size: int,
        position: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.position = position

    @override
    def __iter__(self) -> Iterator[int]:
        epoch, done = self.position() if self.position is not None else (self.epoch, 0)
        self.set_epoch(epoch)
        indices = list(super().__iter__())
        return iter(indices[done * self.batch_size :])


def loop_position(trainer: Trainer) -> tuple[int, int]:
    """``(epoch, batches processed in it)`` from Lightning's fit-loop progress (restored on resume)."""
    loop = trainer.fit_loop
    return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed


def resumable_loader(loader: Any, trainer: Trainer, seed: int) -> Any:
    """``loader`` rebuilt around a :class:`ResumableSampler`; other loaders are returned unchanged
    (custom samplers, batch samplers, iterable datasets)."""
    plain = type(loader) is DataLoader and isinstance(loader.sampler, RandomSampler | SequentialSampler)
    if not plain or loader.batch_size is None:
        return loader
    # Lightning warns that a mid-epoch resume restarts the epoch of a plain DataLoader; this one does not.
    warnings.filterwarnings(
        "ignore", message=".*ended before the epoch ended and your dataloader is not resumable"
    )
    sampler = ResumableSampler(
        loader.dataset,
        num_replicas=trainer.world_size,
        rank=trainer.global_rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        batch_size=loader.batch_size,
        position=functools.partial(loop_position, trainer),
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
        worker_init_fn=loader.worker_init_fn,
        timeout=loader.timeout,
    )


def use_resumable_order(datamodule: Any, trainer: Trainer, seed: int) -> None:
    """Make ``datamodule.train_dataloader()`` return :func:`resumable_loader` of its loader."""
    original = datamodule.train_dataloader

    @functools.wraps(original)
    def train_dataloader() -> Any:
        return resumable_loader(original(), trainer, seed)

    datamodule.train_dataloader = train_dataloader


# --------------------------------------------------------------------------- throughput


def batch_tokens(batch: Any) -> int:
    """Non-padding input tokens of a batch (``attention_mask`` sum, else ``input_ids`` size)."""
    if isinstance(batch, Mapping):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


class StepTimer(Callback):
    """Wall time inside training steps and the tokens they saw: from this callback's
    ``on_train_batch_start`` to its ``on_train_batch_end`` (forward, backward, optimizer step, and the
    ``on_train_batch_end`` work of callbacks listed before it, such as re-applying masks).

    Data loading, validation and checkpoint writing (checkpoint callbacks run last) are outside the
    window; on CUDA the device is synchronised at both ends so queued kernels are counted.

    Example:
        >>> timer = StepTimer()
        >>> timer.seconds, timer.tokens
        (0.0, 0)
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0
        self._started: float | None = None

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._started = self._now(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._started is not None:
            self.seconds += self._now(pl_module) - self._started
            self.tokens += batch_tokens(batch)
            self._started = None

    def tokens_per_second(self, trainer: Trainer) -> float | None:
        """All ranks' tokens over the mean per-rank step time (a collective: call on every rank)."""
        device = trainer.strategy.root_device
        totals = torch.tensor([float(self.tokens), self.seconds], dtype=torch.float64, device=device)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        tokens, seconds = float(totals[0]), float(totals[1]) / trainer.world_size
        return round(tokens / seconds, 1) if seconds > 0 and tokens > 0 else None
