"""Shared fixtures: tiny models, composed configs with outputs under tmp_path, CUDA skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}


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


def random_batch(
    vocab: int = 256, batch: int = 2, length: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A causal-LM batch of random tokens (no padding)."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
