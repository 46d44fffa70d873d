"""Scaling out on one machine: 2-process DDP (gloo) equal to one process for the same global batch,
mid-epoch resume equal to the straight run, Hydra multirun over compression combinations (with DDP),
W&B sweep YAML → agent command lines → offline W&B runs, and bad input that fails before training.

The real-Slurm tests (sbatch, preemption, requeue) are in tests/slurm (``make test-slurm``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from safetensors.torch import load_file

from lightcook.app import build_module, compose_config, train
from lightcook.sweeps import command_lines, load_sweep
from tests.conftest import REPO

SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
#: 4 optimizer steps of the tiny Llama, no validation: weights are the only outcome (add a trainer).
TINY = [
    "model=tiny_llama",
    "callbacks=none",
    "data.block_size=32",
    "trainer.max_steps=4",
    "trainer.limit_val_batches=0",
    "validate_before=false",
]


def run_cli(
    args: list[str], tmp: Path, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(REPO),
        "LIGHTCOOK_OUTPUT_DIR": str(tmp / "out"),
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the agent's `python` is this venv's
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


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


class CrashAt(Callback):
    """Raise at the start of optimizer step ``step`` (after the checkpoint of the step before)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def test_crash_mid_epoch_and_resume_equals_the_straight_run(compose, tmp_path):
    steps = ["model=tiny_llama", "trainer=fast", "data.block_size=32", "trainer.max_steps=6"]
    steps += ["trainer.limit_val_batches=0", "callbacks.model_checkpoint.every_n_train_steps=1"]
    straight = train(compose(*steps, f"paths.run_dir={tmp_path / 'straight'}"))
    run_dir = f"paths.run_dir={tmp_path / 'resumed'}"
    crash = ["+callbacks.crash._target_=tests.test_scale.CrashAt", "+callbacks.crash.step=3"]
    with pytest.raises(RuntimeError, match="crash at step 3"):
        train(compose(*steps, run_dir, *crash))
    resumed = train(compose(*steps, run_dir))  # ckpt_path: auto -> last.ckpt of step 3, mid-epoch
    assert resumed["resumed_from"] and resumed["train_steps"] == 6
    assert max_diff(weights(resumed["run_dir"]), weights(straight["run_dir"])) < 1e-6


# --------------------------------------------------------------------------- Hydra multirun


def test_multirun_over_compression_combinations_with_ddp(tmp_path):
    combos = "+compress=[prune],[quant]"
    run_cli([sys.executable, "run.py", "-m", *TINY, "trainer=ddp", "data.batch_size=2", combos], tmp_path)
    out = tmp_path / "out"
    assert not (out / "runs").exists()  # no rank re-ran the sweep as a single run
    (sweep,) = (out / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]  # one directory per job, none per rank
    summaries = [json.loads((p / "summary.json").read_text()) for p in jobs]
    assert [s["compress"] for s in summaries] == [["prune"], ["quant"]]
    assert all(s["world_size"] == 2 and s["train_steps"] == 4 for s in summaries)
    assert set(summaries[0]["exports"]) == {"sparse", "compressed"} and "quantized" in summaries[1]["exports"]


# --------------------------------------------------------------------------- sweeps and W&B


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_gives_checked_agent_commands(path):
    sweep = load_sweep(path)
    lines = command_lines(sweep, source=str(path))  # composes every combination with Hydra
    assert lines and all(line[:3] == ["/usr/bin/env", "python", "run.py"] for line in lines)
    assert all(not a.startswith("--") for line in lines for a in line)  # Hydra overrides, not flags
    assert len({tuple(line) for line in lines}) == len(lines)


def _wandb_records(path: Path) -> list:
    """Records of an offline ``run-*.wandb`` file (LevelDB log format: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pos, chunk = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _offline_run(run_dir: Path) -> dict[str, object]:
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    kinds: dict[str, list] = {}
    for record in _wandb_records(log):
        kinds.setdefault(record.WhichOneof("record_type"), []).append(record)
    config = {_key(u): json.loads(u.value_json) for r in kinds["config"] for u in r.config.update}
    summary = {_key(u): json.loads(u.value_json) for r in kinds["summary"] for u in r.summary.update}
    history = {_key(i) for r in kinds["history"] for i in r.history.item}
    files = {f.path for r in kinds.get("files", []) for f in r.files.files}
    return {"config": config, "summary": summary, "history": history, "files": files, "exit": kinds["exit"]}


def test_sweep_commands_run_as_offline_wandb_runs(tmp_path):
    lines = command_lines(load_sweep(REPO / "experiments" / "sweeps" / "smoke.yaml"))
    for line in lines:
        run_cli(line, tmp_path)
    runs = sorted((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == len(lines) == 2
    seen = []
    for run in runs:
        wandb_run = _offline_run(run)
        assert wandb_run["exit"][0].exit.exit_code == 0
        assert wandb_run["config"]["model"]["lr"] == 2.0e-3  # the swept value reached the run's config
        seen.append(sorted(wandb_run["config"].get("compress") or {}))
        assert {"train/loss", "val/ppl"} <= wandb_run["history"]
        summary = json.loads((run / "summary.json").read_text())
        assert wandb_run["summary"]["summary/val_ppl_after"] == pytest.approx(summary["val_ppl_after"])
        assert wandb_run["summary"]["summary/train_tokens_per_second"] > 0
        assert "summary.json" in wandb_run["files"]
    assert sorted(seen) == [["none"], ["prune"]]


def test_submitit_launcher_config_composes_and_instantiates():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'lightcook[slurm]'")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lightcook.app import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm", "trainer=ddp"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == 2 and launcher["nodes"] == 1 and launcher["signal_delay_s"] == 120
    assert type(instantiate(cfg.hydra.launcher)).__name__ == "SlurmLauncher"


# --------------------------------------------------------------------------- bad input


def _sweep_file(tmp_path: Path, parameters: dict, args: str = "${args_no_hyphens}") -> Path:
    import yaml

    sweep = {"program": "run.py", "method": "grid", "parameters": parameters}
    sweep["command"] = ["${env}", "${interpreter}", "${program}", "model=tiny_llama", args]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"model.lrr": {"values": [0.1]}}, r"sweep parameter 'model.lrr' is not a config key"),
        (
            {"+compress": {"values": ["[prune]", "[none]"]}, "compress.prune.n": {"value": 1}},
            r"sweep parameter 'compress.prune.n' is not a config key .* combination \+compress=\[none\]",
        ),
        (
            {"+compress": {"values": ["[prnue]"]}},
            r"in the combination \+compress=\[prnue\]: compress: unknown technique\(s\) \['prnue'\]",
        ),
        ({"compress.prune.end_step": {"values": [None]}}, r"'compress.prune.end_step'.*string 'null'"),
        ({"model.lr": {"min": 0.1, "max": 0.2}}, r"'model.lr' needs 'value' or 'values'"),
    ],
)
def test_bad_sweep_fails_before_any_run_naming_the_parameter(tmp_path, parameters, match):
    path = _sweep_file(tmp_path, parameters)
    with pytest.raises(ValueError, match=match):
        command_lines(load_sweep(path), source=str(path))


def test_sweep_without_args_no_hyphens_is_refused(tmp_path):
    path = _sweep_file(tmp_path, {"model.lr": {"values": [0.1]}}, args="${args}")
    with pytest.raises(ValueError, match=r"must pass the parameters as \$\{args_no_hyphens\}"):
        load_sweep(path)


def test_bad_sweep_cli_runs_nothing(tmp_path):
    path = _sweep_file(tmp_path, {"model.lr": {"values": [0.1]}, "trainer.max_stepz": {"value": 1}})
    done = run_cli([sys.executable, "-m", "lightcook.sweeps", str(path), "--run"], tmp_path, check=False)
    assert done.returncode != 0 and "sweep parameter 'trainer.max_stepz'" in done.stderr
    assert not (tmp_path / "out").exists()


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
