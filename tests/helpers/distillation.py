"""Distillation test material: tiny teacher/student configs, padded causal and seq2seq loaders, a
step recorder, and user LightningModules of the kind a new user writes (no ``compute_loss``, the
network stored anywhere, an extra loss term of their own)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn

from lightcook.modules import CausalLMModule
from tests.helpers import TINY_LLAMA

# A wider, deeper teacher with the same vocabulary: projections and the uniform layer map are exercised.
WIDE_LLAMA = {**TINY_LLAMA, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 4}
TINY_T5 = {
    "model_type": "t5",
    "vocab_size": 256,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "dropout_rate": 0.0,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
#: Weight of the user's own extra term in :class:`ExtraLossModule`.
EXTRA_WEIGHT = 0.1


def causal_loader(rows: int = 6, length: int = 16, pad_first: int = 4, seed: int = 0):
    """Random token rows; the first row ends in ``pad_first`` padding positions."""
    ids = torch.randint(2, 256, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, length - pad_first :] = 0
    items = [{"input_ids": i, "attention_mask": m, "labels": i.clone()} for i, m in zip(ids, mask)]
    return torch.utils.data.DataLoader(items, batch_size=2)


def seq2seq_loader(rows: int = 4, seed: int = 0):
    """Random encoder inputs (first row padded) and decoder labels (first row ends in -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels = (
        torch.randint(2, 256, (rows, 12), generator=gen),
        torch.randint(2, 256, (rows, 6), generator=gen),
    )
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    labels[0, 4:] = -100
    items = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]
    return torch.utils.data.DataLoader(items, batch_size=2)


def student(**kwargs) -> CausalLMModule:
    """The tiny Llama student, seeded."""
    torch.manual_seed(0)
    return CausalLMModule(config=TINY_LLAMA, lr=1e-2, min_lr_ratio=1.0, **kwargs)


def tiny_llama() -> nn.Module:
    """A bare tiny Hugging Face Llama (seeded), for modules of one's own."""
    torch.manual_seed(0)
    return CausalLMModule(config=TINY_LLAMA).model


class StepOutputs(Callback):
    """Records what each training step returned and logged."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def extra_term(logits: torch.Tensor) -> torch.Tensor:
    """The user's own extra loss term."""
    return EXTRA_WEIGHT * logits.float().pow(2).mean()


class ExtraLossModule(L.LightningModule):
    """A user's module: the network in ``self.<attr>``, no ``compute_loss``, its own training_step
    adding an extra term (logged as ``train/extra``) and counting its calls."""

    def __init__(self, attr: str = "backbone", second: str | None = None) -> None:
        super().__init__()
        self.attr, self.calls = attr, 0
        setattr(self, attr, tiny_llama())
        if second:  # another pretrained model beside it: the network is then ambiguous
            setattr(self, second, tiny_llama())

    def training_step(self, batch, batch_idx):
        self.calls += 1
        out = getattr(self, self.attr)(**batch)
        extra = extra_term(out.logits)
        self.log("train/extra", extra)
        return out.loss + extra

    def configure_optimizers(self):
        return torch.optim.SGD(getattr(self, self.attr).parameters(), lr=0.1)


class ManualModule(ExtraLossModule):
    """The same with manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.backbone(**batch).loss
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss
