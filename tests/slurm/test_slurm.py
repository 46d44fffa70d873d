"""lightcook on a real Slurm cluster: a 2-rank DDP job through experiments/slurm/compress.sbatch, a job
preempted with SIGUSR1 that requeues itself and ends equal to the straight run, and a bad allocation.

The cluster (``slurm`` fixture) is started by tests/slurm/conftest.py: ``make slurm-install`` first.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.slurm

SBATCH = REPO / "experiments" / "slurm" / "compress.sbatch"
STEPS = 40
#: A 2-rank job of many tiny steps: a checkpoint every 5 steps, 2:4 masks ramped in over steps 0-20
#: (so the preemption lands while the compression state is still changing).
JOB = [
    "model=tiny_llama",
    "trainer=fast",
    "report=fast",
    "trainer.strategy=ddp",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=20",
    "data.block_size=32",
    "data.batch_size=2",
    "callbacks.model_checkpoint.every_n_train_steps=5",
    "~callbacks.progress_bar",
    "+compress=[prune]",
    "compress.prune.end_step=20",
]


def submit(slurm, tmp: Path, *overrides: str, tasks: int = 2) -> str:
    """sbatch compress.sbatch with ``tasks`` tasks on the node; runs land in ``tmp/out/runs``."""
    env = {"LIGHTCOOK_OUTPUT_DIR": str(tmp / "out"), "PYTHON": sys.executable, "LIGHTCOOK_HOME": str(REPO)}
    env |= {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [f"--ntasks-per-node={tasks}", f"--output={tmp}/slurm-%j.out", str(SBATCH), *overrides]
    return slurm.sbatch(args, env=env, cwd=str(REPO))


def log(tmp: Path, job: str) -> str:
    path = tmp / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def finished(slurm, tmp: Path, job: str, state: str = "COMPLETED") -> dict[str, str]:
    info = slurm.wait(job, timeout=600)
    assert info["JobState"] == state, (
        f"job {job}: {info['JobState']} {info.get('Reason')} Restarts={info.get('Restarts')}\n"
        f"{log(tmp, job)[-4000:]}\n{slurm.logs()}"
    )
    return info


@pytest.fixture(scope="module")
def straight(slurm, tmp_path_factory):
    """The uninterrupted 2-rank job: (run directory, job id, log)."""
    tmp = tmp_path_factory.mktemp("straight")
    job = submit(slurm, tmp, *JOB)
    finished(slurm, tmp, job)
    return tmp / "out" / "runs" / f"slurm-{job}", job, log(tmp, job)


def test_two_rank_ddp_job_writes_one_run_directory(straight):
    run, job, text = straight
    assert [p.name for p in run.parent.iterdir()] == [f"slurm-{job}"], "ranks made their own run directories"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == STEPS
    assert summary["slurm_restarts"] == 0 and summary["resumed_from"] is None
    assert list(summary["compress"]) == ["prune"] and summary["train_tokens_per_second"] > 0
    assert "compressed" in summary["exports"], summary["exports"]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    weight = state["model.model.layers.0.mlp.up_proj.weight"]
    assert (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1).max() <= 2  # 2:4 after the ramp
    assert text.count("[lightcook] llama:") == 1  # only rank 0 prints (and writes) the summary


def _signal_when_checkpointed(slurm, run: Path, job: str, timeout: float = 300) -> None:
    """Send SIGUSR1 to the job's ranks once its first checkpoint (step 5) exists: mid-run."""
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), (
            "the job ended before its first checkpoint"
        )
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job)


def test_preempted_job_requeues_resumes_and_matches_the_straight_run(slurm, straight, tmp_path):
    job = submit(slurm, tmp_path, *JOB)
    run = tmp_path / "out" / "runs" / f"slurm-{job}"
    _signal_when_checkpointed(slurm, run, job)
    info = finished(slurm, tmp_path, job)
    text = log(tmp_path, job)
    assert info["Restarts"] == "1", text[-4000:]
    stopped = int(re.search(r"\[lightcook\] signalled: checkpoint at step (\d+)", text).group(1))
    assert 5 <= stopped < STEPS, stopped
    assert [p.name for p in run.parent.iterdir()] == [f"slurm-{job}"]  # the requeued job reused its directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert summary["slurm_restarts"] == 1 and summary["train_steps"] == STEPS

    straight_run = straight[0]
    mine = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ref = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert mine["global_step"] == ref["global_step"] == STEPS
    _assert_same(mine["state_dict"], ref["state_dict"], "parameters and compression buffers")
    _assert_same(mine["optimizer_states"][0]["state"], ref["optimizer_states"][0]["state"], "optimizer state")


def _assert_same(mine, ref, what: str) -> None:
    flat_mine, flat_ref = _flatten(mine), _flatten(ref)
    assert flat_mine.keys() == flat_ref.keys(), what
    worst = max((flat_mine[k].double() - flat_ref[k].double()).abs().max().item() for k in flat_ref)
    assert worst <= 1e-6, f"{what}: resumed run differs from the straight run by {worst:.3g}"


def _flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    return {k: v for key, sub in items for k, v in _flatten(sub, f"{prefix}/{key}").items()}


def test_num_nodes_that_disagree_with_the_allocation_stop_the_job_before_training(slurm, tmp_path):
    job = submit(
        slurm, tmp_path, "model=tiny_llama", "trainer=fast", "callbacks=none", "trainer.num_nodes=2", tasks=1
    )
    finished(slurm, tmp_path, job, state="FAILED")
    text = log(tmp_path, job)
    assert "trainer.num_nodes=2 but the Slurm allocation has 1 node(s) (SLURM_NNODES=1)" in text, text[-3000:]
    run = tmp_path / "out" / "runs" / f"slurm-{job}"
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_hydra_multirun_through_the_submitit_launcher(slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'lightcook[slurm]'")
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    args += [
        "model=tiny_llama",
        "trainer=fast",
        "callbacks=none",
        "data.block_size=32",
        "trainer.max_steps=2",
    ]
    env = {"LIGHTCOOK_OUTPUT_DIR": str(tmp_path / "out"), "WANDB_MODE": "offline"}
    env["PATH"] = f"{Path(sys.executable).parent}:{slurm.env['PATH']}"
    done = slurm.run(sys.executable, "run.py", *args, "+compress=[prune],[quant]", env=env, cwd=str(REPO))
    (sweep,) = (tmp_path / "out" / "multiruns").iterdir()  # every job in the launcher's sweep directory
    assert (sweep / ".submitit").is_dir(), done.stdout[-3000:]
    summaries = [json.loads((sweep / job / "summary.json").read_text()) for job in ("0", "1")]
    assert [list(s["compress"]) for s in summaries] == [["prune"], ["quant"]]
    assert all(s["slurm_restarts"] == 0 and s["train_steps"] == 2 for s in summaries)
