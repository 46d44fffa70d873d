"""Helpers shared by the app tests: running the CLI in a subprocess, reading a run's weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import REPO

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
    """Run ``args`` from the repository with outputs under ``tmp/out`` (W&B offline, this venv's python)."""
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
    """The saved network of a run (``<run_dir>/model/model.safetensors``)."""
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
