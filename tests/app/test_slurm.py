"""lightcook.app.slurm on one machine: 2-process DDP (gloo, spawned or re-launched) equal to one process
for the same global batch, Hydra multirun over compression combinations with DDP, the submitit launcher
config, and launches that cannot match the processes failing before anything is built.

The real-Slurm tests (sbatch, preemption, requeue) are in tests/slurm (``make test-slurm``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lightning.pytorch import seed_everything
from omegaconf import OmegaConf

from lightcook.app import build_module, compose_config, train
from lightcook.app.slurm import environment_plugins, needs_spawn, slurm_restarts, spawn_ranks
from tests.helpers.app import TINY, max_diff, run_cli, weights

# --------------------------------------------------------------------------- DDP equivalence


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 4: (summary, final weights, initial weights)."""
    out = tmp_path_factory.mktemp("single")
    cfg = compose_config([*TINY, "trainer=fast", "data.batch_size=4", f"paths.output_dir={out}"])
    summary = train(cfg)
    seed_everything(cfg.seed, verbose=False)  # train() seeds, then builds: the same initial weights
    initial = {k: v.detach().clone() for k, v in build_module(cfg).model.state_dict().items()}
    return summary, weights(summary["run_dir"]), initial


def _ddp_spawn(tmp: Path) -> dict:
    return train(compose_config([*TINY, "data.batch_size=2", "trainer=ddp_spawn", f"paths.output_dir={tmp}"]))


def _ddp_relaunch(tmp: Path) -> dict:
    run_cli([sys.executable, "run.py", *TINY, "data.batch_size=2", "trainer=ddp"], tmp)
    (run,) = (tmp / "out" / "runs").iterdir()  # the re-launched rank did not make a directory of its own
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("launch", [_ddp_spawn, _ddp_relaunch], ids=["ddp_spawn", "ddp"])
def test_two_processes_equal_one_process_for_the_same_global_batch(single, launch, tmp_path):
    reference, final, initial = single
    summary = launch(tmp_path)
    assert summary["world_size"] == 2 and summary["train_steps"] == 4
    assert summary["train_tokens"] == reference["train_tokens"]  # 2 ranks x 2 rows = 1 process x 4 rows
    assert summary["train_tokens_per_second"] > 0
    assert max_diff(final, {k: v for k, v in initial.items() if k in final}) > 1e-3  # training moved them
    assert max_diff(weights(summary["run_dir"]), final) < 1e-5


# --------------------------------------------------------------------------- Hydra multirun


def test_multirun_over_compression_combinations_with_ddp(tmp_path):
    combos = "+compress=[prune],[quant]"
    run_cli(
        [sys.executable, "run.py", "-m", *TINY, "trainer=ddp", "report=fast", "data.batch_size=2", combos],
        tmp_path,
    )
    out = tmp_path / "out"
    assert not (out / "runs").exists()  # no rank re-ran the sweep as a single run
    (sweep,) = (out / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]  # one directory per job, none per rank
    summaries = [json.loads((p / "summary.json").read_text()) for p in jobs]
    assert [list(s["compress"]) for s in summaries] == [["prune"], ["quant"]]
    assert all(s["world_size"] == 2 and s["train_steps"] == 4 for s in summaries)
    assert all("compressed" in s["exports"] for s in summaries)  # the one export at fit end


def test_submitit_launcher_config_composes_and_instantiates():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'lightcook[slurm]'")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightcook.app import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm", "trainer=ddp"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == 2 and launcher["nodes"] == 1 and launcher["signal_delay_s"] == 120
    assert type(instantiate(cfg.hydra.launcher)).__name__ == "SlurmLauncher"


SRUN_1x1 = {"SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "lc"}


@pytest.mark.parametrize(
    ("env", "overrides", "match"),
    [
        (SRUN_1x1, ["trainer=fast", "trainer.num_nodes=2"], r"trainer.num_nodes=2 but the Slurm allocation"),
        (SRUN_1x1, ["trainer=ddp"], r"trainer.devices=2 but Slurm started 1 task\(s\) per node"),
        (SRUN_1x1, ["trainer=ddp_spawn"], r"trainer.strategy=ddp_spawn under srun"),
        (
            {},
            ["trainer=ddp_spawn", "trainer.num_nodes=2"],
            r"trainer.num_nodes=2 with trainer.strategy=ddp_spawn",
        ),
    ],
)
def test_launch_that_cannot_match_the_processes_fails_before_building(
    monkeypatch, compose, env, overrides, match
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose("model=tiny_llama", *overrides)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()  # nothing built, nothing written


SRUN = {**SRUN_1x1, "SLURM_RESTART_COUNT": "3"}


@pytest.mark.parametrize(
    ("trainer", "multirun", "env", "spawn"),
    [
        ({"strategy": "ddp_spawn", "devices": 2}, False, {}, True),
        ({"strategy": "ddp", "devices": 2}, True, {}, True),  # Lightning's re-launch would replay the sweep
        ({"strategy": "ddp", "devices": 2}, False, {}, False),  # Lightning re-launches the script
        ({"strategy": "ddp", "devices": 1}, True, {}, False),
        ({"strategy": "ddp_spawn", "devices": 2}, False, {"LOCAL_RANK": "0"}, False),  # already a rank
        ({"strategy": "ddp", "devices": 2}, True, SRUN_1x1, False),  # srun started the ranks
    ],
)
def test_needs_spawn_only_when_nothing_else_starts_the_ranks(trainer, multirun, env, spawn):
    assert needs_spawn(OmegaConf.create(trainer), multirun, env=env) is spawn


def test_slurm_environment_only_under_srun():
    assert environment_plugins(env={}) == [] and slurm_restarts(env={}) is None
    (plugin,) = environment_plugins(env=SRUN)
    assert type(plugin).__name__ == "SLURMEnvironment" and not plugin.auto_requeue
    assert slurm_restarts(env=SRUN) == 3


def test_spawn_refuses_devices_that_are_not_a_count(tmp_path):
    cfg = compose_config(["trainer=ddp_spawn", "trainer.devices=auto"])
    with pytest.raises(ValueError, match=r"trainer.devices='auto': spawning needs an integer"):
        spawn_ranks(cfg, tmp_path, train)
