"""Helpers of the quantization and sparsity tests: tiny model configs, user LightningModules that keep
their network somewhere other than ``.model`` (and one with manual optimization), an export round
trip through the one compressed format, and a probe that records whether training started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lightcook.export import load_compressed, save_compressed
from lightcook.modules import CausalLMModule
from tests.helpers import TINY, VOCAB  # noqa: F401  (the layouts' tiny configs)

LLAMA_TARGETS = 2 * 7  # q, k, v, o, gate, up, down per layer


def tiny_module(kind: str = "llama", seed: int = 0, **config: Any) -> CausalLMModule:
    """A CausalLMModule over a tiny random model (``config`` overrides the tiny config)."""
    torch.manual_seed(seed)
    return CausalLMModule(config={**TINY[kind], **config}, tokenizer=None, lr=1e-2)


def tiny_hf(seed: int = 0, **config: Any) -> nn.Module:
    """A tiny random Hugging Face Llama."""
    torch.manual_seed(seed)
    cfg = {**TINY["llama"], **config}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))


class BackboneModule(L.LightningModule):
    """A user's own module: the HF model lives in ``self.backbone`` (no ``.model``), the loss is
    computed in ``training_step``; ``second=True`` adds another HF model (``self.reference``);
    ``manual=True`` uses manual optimization (one ``optimizer.step()`` per batch)."""

    def __init__(self, second: bool = False, manual: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.backbone = tiny_hf(seed)
        if second:
            self.reference = tiny_hf(seed + 1)
        self.automatic_optimization = not manual
        self.steps_seen = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.backbone(**batch).loss
        self.steps_seen += 1
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.backbone.parameters(), lr=1e-2)


class TrainingStarted(Callback):
    """Counts training batches that started (0 when setup or checkpoint loading failed)."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


def export_and_load(network: nn.Module, path: Path, **options: Any) -> nn.Module:
    """Write ``network`` with the one compressed export and load it back (eval mode) on the reference
    modules in the stored dtype: exactly what the network computes."""
    return load_compressed(save_compressed(network, path, **options), backend="reference")
