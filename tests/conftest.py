"""Shared fixtures and helpers: tiny models, random token data, CPU trainers, composed configs with
outputs under tmp_path, CUDA skipping."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import (  # noqa: F401  (transition: import from tests.helpers)
    REPO,
    TINY_LLAMA,
    CrashAt,
    keys_differing_across_ranks,
    make_trainer,
    random_batch,
    token_loader,
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def compose(tmp_path):
    """Compose conf/config.yaml with overrides; runs go under tmp_path."""
    from lightcook.app import compose_config

    def _compose(*overrides: str):
        return compose_config([*overrides, f"paths.output_dir={tmp_path / 'outputs'}"])

    return _compose
