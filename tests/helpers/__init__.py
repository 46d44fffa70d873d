"""Helpers shared by the test modules: tiny model configs, random token data, quiet CPU trainers,
a crash injector, a cross-rank comparison. Import them from here (``from tests.helpers import ...``),
never from ``tests.conftest`` or another test module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[2]

#: Tiny configs of every registered layout (Llama, GPT-2, T5), 2 layers, width 32.
VOCAB = 256
TINY = {
    "llama": {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": VOCAB,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "t5": {
        "model_type": "t5",
        "vocab_size": VOCAB,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    },
}


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


def random_batch(
    vocab: int = 256, batch: int = 2, length: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A causal-LM batch of random tokens (no padding)."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def token_loader(
    batches: int = 4, batch_size: int = 2, seq: int = 16, seed: int = 0, vocab: int = 256
) -> DataLoader:
    """``batches`` batches of random causal-LM rows (no padding, labels = inputs), in a fixed order."""
    ids = random_batch(vocab, batches * batch_size, seq, seed)["input_ids"]
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


def make_trainer(root: Path, callbacks: list, max_steps: int = 3, **kwargs) -> L.Trainer:
    """A quiet one-device CPU Trainer: no logger, checkpoints, progress bar, summary or validation;
    ``kwargs`` override any of these settings."""
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return L.Trainer(default_root_dir=root, callbacks=callbacks, **{**settings, **kwargs})


class CrashAt(Callback):
    """Raises ``RuntimeError("simulated crash")`` when a training batch starts at global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def keys_differing_across_ranks(trainer: L.Trainer, state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` (flat float64 tensors, same keys and sizes on every rank) whose values
    are not identical on all ranks, from one all_reduce max and one min (call it on every rank)."""
    flat = torch.cat(list(state.values()))
    hi = trainer.strategy.reduce(flat.clone(), reduce_op="max")
    lo = trainer.strategy.reduce(flat.clone(), reduce_op="min")
    differ, offset = [], 0
    for key, value in state.items():
        end = offset + value.numel()
        if not torch.equal(hi[offset:end], lo[offset:end]):
            differ.append(key)
        offset = end
    return differ


class CountPasses:
    """Wraps the real sequential calibration pass the callbacks call (``callbacks.base.sequential_pass``)
    and counts the calls: a resumed run must not calibrate again."""

    def __init__(self, monkeypatch) -> None:
        import lightcook.callbacks.base as base

        self.calls = 0
        real = base.sequential_pass

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(base, "sequential_pass", counted)
