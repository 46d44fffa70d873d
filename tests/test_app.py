"""The Hydra app end to end: composition of every config option, tiny runs, resume, multirun, W&B, DDP."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightcook.app import CONFIG_DIR, train
from tests.conftest import REPO

GROUPS = ["model", "data", "trainer", "callbacks", "logger", "paths"]
TINY = {
    "tiny_llama": "data=shakespeare",
    "tiny_gpt2": "data=shakespeare",
    "tiny_t5": "data=shakespeare_seq2seq",
}


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))],
)
def test_every_config_option_composes(compose, group, option):
    extra = ["data.paths=[/tmp]"] if (group, option) == ("data", "text") else []
    cfg = compose(f"{group}={option}", *extra)
    node = cfg[group]
    OmegaConf.to_container(node, resolve=True)  # every interpolation resolves
    if "_target_" in node:
        assert node._target_.split(".")[0] in {"lightcook", "lightning"}


def test_no_compress_by_default_and_plus_compress_is_the_way_in(compose):
    assert "compress" not in compose()
    assert (CONFIG_DIR / "compress").is_dir()


@pytest.mark.parametrize("model", sorted(TINY))
def test_train_tiny_model_end_to_end(compose, model):
    summary = train(compose(f"model={model}", TINY[model], "trainer=fast"))
    run = Path(summary["run_dir"])
    assert summary["train_steps"] == 4 and summary["parameters"] > 0
    assert summary["val_ppl_after"] < summary["val_ppl_before"]  # a random model learns something in 4 steps
    assert summary["bytes_on_disk"] > summary["parameters"] * 4 * 0.9
    for path in (
        "config.yaml",
        "summary.json",
        "checkpoints/last.ckpt",
        "csv/metrics.csv",
        "model/config.json",
    ):
        assert (run / path).is_file(), path
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["model"] == OmegaConf.load(CONFIG_DIR / "model" / f"{model}.yaml").config.model_type
    for key in (
        "parameters",
        "bytes_on_disk",
        "val_ppl_before",
        "val_ppl_after",
        "train_steps",
        "wall_seconds",
    ):
        assert on_disk[key] is not None, key
    # checkpoints load without unpickling arbitrary objects
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_saved_model_reloads_with_identical_logits(compose):
    from transformers import AutoModelForCausalLM

    from lightcook.app import build_module

    cfg = compose("model=tiny_llama", "trainer=fast", "trainer.max_steps=1")
    summary = train(cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(Path(summary["run_dir"]) / "model").eval()
    module = build_module(cfg)
    state = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    module.load_state_dict(state)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model.eval()(ids).logits)


def test_resume_continues_from_last_checkpoint(compose, tmp_path):
    run_dir = tmp_path / "run"
    first = train(compose("model=tiny_llama", "trainer=fast", f"paths.run_dir={run_dir}"))
    assert first["resumed_from"] is None
    second = train(
        compose("model=tiny_llama", "trainer=fast", "trainer.max_steps=6", f"paths.run_dir={run_dir}")
    )
    assert second["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert second["train_steps"] == 6
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    logged = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert logged[:4] == [0, 1, 2, 3] and len(logged) == 6  # rows from before the resume are kept


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.name_or_path=/no/such/model"], r"model.name_or_path='/no/such/model'"),
        (
            ["model=tiny_llama", "data=text", "data.paths=[/no/such/dir]"],
            r"data.paths: '/no/such/dir' does not exist",
        ),
        (["model=tiny_llama", "data=text", "data.paths=[EMPTY]"], r"data.paths: no non-empty text"),
        (
            ["model=tiny_llama", "data.block_size=1024"],
            r"data.block_size=1024 exceeds the model's context of 512",
        ),
    ],
)
def test_bad_input_names_the_key(compose, tmp_path, overrides, match):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    with pytest.raises(ValueError, match=match):
        train(compose(*overrides, "trainer=fast"))


def _run_cli(args, tmp_path, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"paths.output_dir={tmp_path / 'out'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_cli_multirun(tmp_path):
    _run_cli(["-m", "model=tiny_llama", "trainer=fast", "trainer.max_steps=1,2", "callbacks=none"], tmp_path)
    summaries = sorted((tmp_path / "out" / "multiruns").glob("*/*/summary.json"))
    assert [json.loads(p.read_text())["train_steps"] for p in summaries] == [1, 2]


def test_cli_wandb_offline_writes_run_files(tmp_path):
    _run_cli(["model=tiny_llama", "trainer=fast", "logger=wandb", "callbacks=none"], tmp_path)
    (run,) = (tmp_path / "out" / "runs").iterdir()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert (run / "csv" / "metrics.csv").is_file()


def test_cli_ddp_two_cpu_processes_one_run_dir(tmp_path):
    _run_cli(["model=tiny_llama", "trainer=ddp", "trainer.max_steps=2", "callbacks=none"], tmp_path)
    (run,) = (tmp_path / "out" / "runs").iterdir()  # the re-launched rank did not make its own directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 2
