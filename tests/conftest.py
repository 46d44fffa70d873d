"""Shared fixtures: composed configs with outputs under tmp_path, CUDA skipping, quiet W&B. Helpers
(tiny configs, loaders, trainers) live in tests/helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
