"""Shared fixtures of the structured-pruning and MoEfication tests: tiny Hugging Face configs of each
registered layout, a non-HF network with a custom layout, and a user LightningModule that keeps its
network as ``self.backbone`` (not ``.model``). Import from here, not from another test module."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch
from torch import nn

from tests.helpers import TINY, VOCAB  # noqa: F401  (the layouts' tiny configs)


def tiny_model(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """A random tiny Hugging Face model (eval mode) of ``kind`` in llama / gpt2 / t5."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = dict(TINY[kind], **overrides)
    model_type = config.pop("model_type")
    auto = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    torch.manual_seed(seed)
    return auto.from_config(AutoConfig.for_model(model_type, **config)).eval()


def model_inputs(kind: str, seed: int = 0, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """Random token inputs for ``kind`` (T5 gets decoder inputs too)."""
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        inputs["decoder_input_ids"] = ids.flip(1)
    return inputs


def distinct_params(module: nn.Module) -> int:
    """Parameters of ``module``, tied ones counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


class _Block(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.ff = nn.Module()
        self.ff.up, self.ff.down, self.ff.act = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.GELU()


class Mystery(nn.Module):
    """Not a Hugging Face model: blocks of LayerNorm + MLP only."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])


#: The layout of :class:`Mystery` for ``architecture=`` (no attention, one ungated FFN per block).
MYSTERY_LAYOUT = {
    "layers": "blocks",
    "attention": None,
    "ffn": {"path": "ff", "norm": "ln", "inputs": ["up"], "output": "down", "activation": "act"},
}


class MysteryLM(nn.Module):
    """A non-Hugging-Face LM with the HF call convention (LayerNorm + MLP blocks only)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.body = Mystery()
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)  # (B, T, 16)
        for block in self.body.blocks:
            h = h + block.ff.down(block.ff.act(block.ff.up(block.ln(h))))
        logits = self.head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(logits=logits, loss=loss)


#: :data:`MYSTERY_LAYOUT` for a :class:`MysteryLM` (its blocks sit under ``body``).
MYSTERY_IN_MODULE = {**MYSTERY_LAYOUT, "layers": "body.blocks"}


class BackboneModule(L.LightningModule):
    """A user's own LightningModule: the HF model is ``self.backbone`` (no ``.model``, no
    ``compute_loss``); ``training_step`` returns the network's ``.loss`` and logs ``train/own``."""

    def __init__(self, kind: str = "llama", seed: int = 0, manual: bool = False) -> None:
        super().__init__()
        self.backbone = tiny_model(kind, seed=seed).train()
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        loss = self.backbone(**batch).loss
        self.log("train/own", loss.detach())
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)
