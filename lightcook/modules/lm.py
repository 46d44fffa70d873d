"""Generic LightningModules over any Hugging Face (or HF-convention) language model.

``CausalLMModule`` wraps decoder-only models (Llama, GPT-2, ...), ``Seq2SeqLMModule`` encoder-decoders
(T5, BART). The wrapped network is ``module.model``; compression callbacks act on it.

Example:
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> module.num_parameters() > 0
    True
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.text import Perplexity
from typing_extensions import override

from lightcook.modules.hub import resolve_model_path

IGNORE_INDEX = -100


class LMModule(LightningModule):
    """Shared training/validation logic; subclasses choose the Auto class and how logits align.

    Args:
        name_or_path: built-in name (``smollm2-135m-instruct``), local HF folder, or hub name.
        config: a dict of HF config fields (with ``model_type``) for a randomly initialised model;
            used instead of ``name_or_path``.
        model: any ``nn.Module`` with the HF call convention (``model(input_ids=..., attention_mask=...,
            labels=...)`` returning an object with ``.logits`` and ``.loss``); overrides both above.
        tokenizer: tokenizer name or path; defaults to ``name_or_path``. ``None`` with ``config`` means
            the data module brings its own.
        lr, weight_decay, betas: AdamW settings; decay applies to weight matrices only.
        warmup_steps: linear warmup steps; then cosine decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: final learning rate as a fraction of ``lr``.

    Raises:
        ValueError: none or several of ``name_or_path``/``config``/``model`` given, unknown name or
            path, a config without ``model_type``.
    """

    auto_class_name: str = "AutoModelForCausalLM"

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        model: nn.Module | None = None,
        tokenizer: str | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        sources = [s for s in (name_or_path, config, model) if s is not None]
        if len(sources) != 1:
            raise ValueError(
                "model: give exactly one of model.name_or_path, model.config or a model object "
                f"(got name_or_path={name_or_path!r}, config={'set' if config else None}, "
                f"model={'set' if model is not None else None})"
            )
        self.model = model if model is not None else self._build_model(name_or_path, config)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        self.model_name = name_or_path or (config or {}).get("model_type") or type(model).__name__
        self.tokenizer_name = tokenizer or name_or_path
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def _build_model(self, name_or_path: str | None, config: dict[str, Any] | None) -> nn.Module:
        import transformers

        auto = getattr(transformers, self.auto_class_name)
        if config is not None:
            config = dict(config)
            if "model_type" not in config:
                raise ValueError("model.config: needs a 'model_type' key (e.g. llama, gpt2, t5)")
            model_type = config.pop("model_type")
            return auto.from_config(transformers.AutoConfig.for_model(model_type, **config))
        path = resolve_model_path(cast(str, name_or_path))  # __init__ checked: one source given
        try:
            return auto.from_pretrained(path, dtype=torch.float32)
        except OSError as err:
            raise ValueError(
                f"model.name_or_path={name_or_path!r}: not a built-in model, a local folder, "
                f"or a reachable hub model ({err.__class__.__name__}: {str(err).splitlines()[0]})"
            ) from err

    def num_parameters(self) -> int:
        """Number of distinct parameters of the wrapped model (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def max_context(self) -> int | None:
        """Longest sequence the model accepts, or ``None`` when positions are relative (T5)."""
        config = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None

    @override
    def forward(self, **batch: Tensor) -> Any:
        return self.model(**batch)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """Task loss and model outputs for one batch (the training and validation steps use it).

        Compression callbacks do not need it: their loss terms are added to whatever
        ``training_step`` returns, with the network's outputs captured by a forward hook.
        """
        outputs = self.model(**self.mask_padding(batch))
        return outputs.loss, outputs

    def mask_padding(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Set labels to -100 wherever ``attention_mask`` marks padding (causal models only)."""
        return batch

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """The task loss, logged as ``train/loss``; ``None`` for a batch without labels (nothing to
        learn from it alone; with ``compress.kd.task_scale=0`` distillation supplies the loss)."""
        loss, _ = self.compute_loss(batch)
        if loss is None:
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, outputs = self.compute_loss(batch)
        labels = self.mask_padding(batch)["labels"]
        logits, labels = self.aligned_logits_and_labels(outputs.logits, labels)
        self.val_ppl(logits.float(), labels)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=size)
        self.log("val/ppl", self.val_ppl, prog_bar=True, batch_size=size)

    def aligned_logits_and_labels(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, T, V) and labels (B, T) such that logits[:, t] predicts labels[:, t]."""
        return logits, labels

    @override
    def configure_optimizers(self) -> Any:
        hp = cast(AttributeDict, self.hparams)  # save_hyperparameters() stores an AttributeDict
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.parameters():
            if param.requires_grad:
                (
                    decay if param.ndim >= 2 and not getattr(param, "_no_weight_decay", False) else no_decay
                ).append(param)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(LMModule):
    """Decoder-only language model (``AutoModelForCausalLM``); see :class:`LMModule` for arguments."""

    auto_class_name = "AutoModelForCausalLM"

    @override
    def aligned_logits_and_labels(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return logits[:, :-1], labels[:, 1:]  # position t predicts token t+1

    @override
    def mask_padding(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "labels" not in batch or "attention_mask" not in batch:
            return batch
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return {**batch, "labels": labels}


class Seq2SeqLMModule(LMModule):
    """Encoder-decoder model (``AutoModelForSeq2SeqLM``); batches carry ``labels`` for the decoder."""

    auto_class_name = "AutoModelForSeq2SeqLM"
