"""Quantization-aware training ending in a real int8 (or packed int4 / int2) model: :class:`QuantizationCallback`.

In ``setup`` every targeted Linear (default: all Linear layers of the transformer blocks) becomes a
:class:`~lightcook.ops.quant.QuantLinear` that keeps the same ``weight`` / ``bias`` Parameters and
fake-quantizes weight and input with straight-through gradients; learned scales (PACT, LSQ, dynamic
scaling) are Parameters registered before the optimizer exists. Token embeddings, attention score /
softmax matmuls and the LM head stay in floating point unless targeted. GPT-2 ``Conv1D`` layers are
first turned into the equivalent ``nn.Linear`` (transposed weight). Static activation scales are
calibrated once, before their first use, and live in the model's state dict with the weights. When
fitting ends the model can be exported with :func:`~lightcook.export.quantized.export_quantized`.

Example:
    >>> import tempfile, torch, lightning as L
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> ids = torch.randint(0, 64, (4, 8))
    >>> data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    >>> cb = QuantizationCallback(bits=4, method="lsq", activations="static", calibration_batches=1)
    >>> trainer = L.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> cb.state["calibrated"], sorted(cb.exports)
    (True, ['quantized'])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightcook.callbacks.base import (
    BLOCK_LINEARS,
    CompressionCallback,
    all_reduce_,
    eval_mode,
    first_loader,
    linear_like,
    replace_module,
    target_model,
)
from lightcook.export.quantized import export_quantized
from lightcook.ops.quant import ACT_MODES, WEIGHT_QUANTIZERS, ActivationQuantizer, QuantLinear, QuantSpec

BITS = (2, 4, 8)
GRANULARITIES = ("tensor", "channel", "group")
METHODS = tuple(WEIGHT_QUANTIZERS)  # absmax, pact, lsq, dynamic


# --------------------------------------------------------------------------- helpers


def _is_conv1d(module: nn.Module) -> bool:
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def _linear_or_embedding(module: nn.Module) -> bool:
    return linear_like(module) or isinstance(module, nn.Embedding)


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` equal to a GPT-2 ``Conv1D`` (weight ``(in, out)`` transposed, same bias Parameter)."""
    in_f, out_f = conv.weight.shape
    linear = nn.Linear(in_f, out_f, bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype)
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), conv.weight.requires_grad)
    linear.bias = conv.bias
    return linear.train(conv.training)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rank_batches(loader: Iterable, rank: int, world: int) -> Iterator[Any]:
    """Batches ``rank, rank + world, ...`` of ``loader`` in dataset order (map-style datasets are
    read sequentially: no shuffling RNG is consumed and the live training iterator is untouched)."""
    if (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size is not None
    ):
        loader = DataLoader(
            loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn
        )
    for i, batch in enumerate(loader):
        if i % world == rank:
            yield batch


# --------------------------------------------------------------------------- the callback


class QuantizationCallback(CompressionCallback):
    """Quantization-aware training of the targeted Linear layers, exported as real integer weights.

    Weights are fake-quantized to ``bits`` with one scale per tensor, per output channel or per
    group of ``group_size`` inputs; the scale comes from the current weights (``absmax``) or is
    learned (``pact``: clipping bound, ``lsq``: step size, ``dynamic``: module-wise dynamic scaling
    of Tao et al., ACL 2022). Inputs are fake-quantized to ``act_bits`` per token (``dynamic``), per
    tensor with a calibrated scale (``static``), or not at all (``none``: weight-only). Gradients
    use the straight-through estimator. With gradients off, W8A8 layers already run the integer
    kernel of the exported model.

    Static scales are calibrated once, at the first of ``on_validation_start`` / ``on_train_start``
    / ``on_test_start`` / ``on_predict_start``, on ``calibration_batches`` batches of the training
    data when available (else of the running loop's data), in eval mode without gradients; the
    maxima are reduced across DDP ranks. They are buffers of the model, so a resumed run restores
    them and does not calibrate again (``state["calibrated"]``).

    Args:
        bits: weight bits, 8, 4 or 2.
        granularity: ``"tensor"``, ``"channel"`` (one scale per output row) or ``"group"``.
        group_size: inputs per scale with ``granularity="group"``; must divide every targeted
            layer's input features.
        symmetric: signed codes with zero point 0 (default), else unsigned codes and a zero point.
        method: ``"absmax"``, ``"pact"``, ``"lsq"`` or ``"dynamic"`` (symmetric only).
        activations: ``"dynamic"`` (per token), ``"static"`` (calibrated) or ``"none"``.
        act_bits: activation bits, 8, 4 or 2.
        calibration_batches: batches for static calibration.
        export_dir: export folder relative to ``trainer.default_root_dir`` (``None``: no export).
        export_at_fit_end: export when fitting ends (rank 0); the path goes to
            ``self.exports["quantized"]`` (``self.exports[name]`` for a named instance).
        targets, exclude: module patterns (see :class:`~lightcook.callbacks.base.CompressionCallback`).
            The LM head can be targeted explicitly (``targets: [..., lm_head]``).
        name: distinguishes two instances; errors then say ``compress.<name>.<arg>``.

    Raises:
        ValueError: in ``__init__``, an argument outside its allowed values (the message names
            ``compress.quant.<arg>`` and lists them); in ``setup``, a target pattern matching no
            Linear, a targeted embedding, a group size not dividing a layer's input features, a
            layer already quantized with other settings, or a GPT-2 ``Conv1D`` carrying another
            callback's buffers (N:M masks).
        RuntimeError: static activations with no batch to calibrate on.

    Example:
        >>> cb = QuantizationCallback(bits=4, granularity="group", group_size=32, method="pact")
        >>> cb.config_key, cb.spec.qmax, cb.state["calibrated"]
        ('compress.quant', 7, False)
    """

    order = 40  # canonical order: after MoE splits (10), gates (20) and masks (30); before distillation (50)

    def __init__(
        self,
        bits: int = 8,
        granularity: str = "channel",
        group_size: int = 128,
        symmetric: bool = True,
        method: str = "absmax",
        activations: str = "dynamic",
        act_bits: int = 8,
        calibration_batches: int = 8,
        export_dir: str | None = "quantized",
        export_at_fit_end: bool = True,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, name=name)
        self.config_key = f"compress.{name or 'quant'}"
        self.bits, self.granularity, self.group_size = bits, granularity, group_size
        self.symmetric = symmetric
        self.method, self.activations, self.act_bits = method, activations, act_bits
        self.calibration_batches = calibration_batches
        self.export_dir, self.export_at_fit_end = export_dir, export_at_fit_end
        self._check_choices()
        self._check_numbers()
        self._check_export_args()
        self.spec = QuantSpec(bits, granularity, group_size, symmetric)
        self.state = {
            "calibrated": False,  # static activation scales measured (they live in the model)
            "calibration_batches": 0,  # batches seen by the calibration (max over ranks)
            "calibrated_at_step": None,  # trainer.global_step when calibrating
        }
        self._layers: dict[str, QuantLinear] = {}

    # ------------------------------------------------------------------ argument checks

    def _fail(self, arg: str, message: str) -> ValueError:
        return ValueError(f"{self.config_key}.{arg}: {message}")

    def _check_choices(self) -> None:
        for arg, allowed in (
            ("bits", BITS),
            ("granularity", GRANULARITIES),
            ("method", METHODS),
            ("activations", ACT_MODES),
            ("act_bits", BITS),
        ):
            value = getattr(self, arg)
            if isinstance(value, bool) or value not in allowed:
                raise self._fail(arg, f"got {value!r}, allowed: {', '.join(map(str, allowed))}")
        if not isinstance(self.symmetric, bool):
            raise self._fail("symmetric", f"got {self.symmetric!r}, allowed: true, false")
        if self.method == "dynamic" and not self.symmetric:
            raise self._fail("symmetric", "method 'dynamic' (dynamic scaling) supports symmetric=true only")

    def _check_numbers(self) -> None:
        if not _is_int(self.group_size) or self.group_size < 1:
            raise self._fail("group_size", f"must be an integer >= 1, got {self.group_size!r}")
        if not _is_int(self.calibration_batches) or self.calibration_batches < 1:
            raise self._fail(
                "calibration_batches", f"must be an integer >= 1, got {self.calibration_batches!r}"
            )

    def _check_export_args(self) -> None:
        if self.export_dir is not None and (not isinstance(self.export_dir, str) or not self.export_dir):
            raise self._fail("export_dir", f"must be null or a folder name, got {self.export_dir!r}")
        if not isinstance(self.export_at_fit_end, bool):
            raise self._fail("export_at_fit_end", f"got {self.export_at_fit_end!r}, allowed: true, false")

    # ------------------------------------------------------------------ structure

    @override
    def check_with(self, others: Sequence[CompressionCallback], model: nn.Module) -> None:
        from lightcook.callbacks.structured_pruning import StructuredPruningCallback

        for other in others:
            if isinstance(other, StructuredPruningCallback) and (
                self.method != "absmax" or self.granularity == "group"
            ):
                raise self.conflict(
                    other,
                    f"slicing cuts weight rows/columns, but method={self.method!r} / granularity="
                    f"{self.granularity!r} keeps learned or group-wise scales that would no longer fit; "
                    "use method: absmax with granularity: channel or tensor",
                )

    @property
    def quantized_modules(self) -> dict[str, QuantLinear]:
        """The :class:`QuantLinear` layers this callback installed, by name (after ``setup``)."""
        return dict(self._layers)

    @override
    def prepare_model(self, trainer: Trainer | None, pl_module: LightningModule) -> None:
        """Swap every targeted Linear for a :class:`QuantLinear` (validated first, then swapped)."""
        root = target_model(pl_module)
        selected = self._select_targets(pl_module)
        for name, module in selected.items():
            self._check_module(name, module)
        self._layers = {name: self._quantize(root, name, module) for name, module in selected.items()}

    def _select_targets(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        explicit = self.targets != list(BLOCK_LINEARS)
        selected = self.select(pl_module, _linear_or_embedding if explicit else linear_like)
        for name, module in selected.items():
            if isinstance(module, nn.Embedding):
                raise self._fail(
                    "targets",
                    f"{name} is an embedding ({type(module).__name__}); token embeddings stay in "
                    f"floating point and only Linear layers can be quantized; narrow the pattern or add "
                    f"{name!r} to {self.config_key}.exclude",
                )
        return selected

    def _check_module(self, name: str, module: nn.Module) -> None:
        if isinstance(module, QuantLinear):
            act = module.input_quantizer
            have = (module.weight_quantizer.spec, module.method, act.mode, act.bits)
            if have != (self.spec, self.method, self.activations, self.act_bits):
                raise self._fail(
                    "targets",
                    f"{name} is already quantized with other settings (two quantization callbacks?)",
                )
            return
        if _is_conv1d(module) and module._buffers:
            raise self._fail(
                "targets",
                f"{name} is a GPT-2 Conv1D carrying {sorted(module._buffers)} from another compression "
                f"callback (e.g. compress.prune); quantization turns it into a new nn.Linear, which would "
                f"leave them behind; do not combine both on Conv1D models, or exclude {name!r}",
            )
        in_f = module.weight.shape[0] if _is_conv1d(module) else module.weight.shape[1]
        if self.granularity == "group" and in_f % self.group_size:
            raise self._fail(
                "group_size",
                f"{name} has {in_f} input features, not divisible by group_size={self.group_size}; "
                f"choose a divisor, another granularity, or add {name!r} to {self.config_key}.exclude",
            )

    def _quantize(self, root: nn.Module, name: str, module: nn.Module) -> QuantLinear:
        if isinstance(module, QuantLinear):
            return module  # the same model set up again (e.g. a second Trainer)
        linear = conv1d_to_linear(module) if _is_conv1d(module) else module
        q = QuantLinear.from_linear(linear, self.spec, self.method, self.activations, self.act_bits)
        if linear is module:  # buffers other callbacks attached (N:M masks) stay with the layer, same tensors
            for key, buf in module._buffers.items():
                if key not in q._buffers and buf is not None:
                    q.register_buffer(key, buf, persistent=key not in module._non_persistent_buffers_set)
        for param in q.weight_quantizer.parameters():
            param._no_weight_decay = True
        replace_module(root, name, q)
        return q

    # ------------------------------------------------------------------ static calibration

    def _static_quantizers(self) -> list[ActivationQuantizer]:
        return [q.input_quantizer for q in self._layers.values() if q.input_quantizer.mode == "static"]

    def _maybe_calibrate(self, trainer: Trainer, pl_module: LightningModule, current: Any) -> None:
        if self.state["calibrated"] or not self._static_quantizers():
            return
        self.calibrate(trainer, pl_module, self._calibration_loader(trainer, current))

    def _calibration_loader(self, trainer: Trainer, current: Any) -> Any:
        """The training data when known (fit loop, or the datamodule), else the running loop's data."""
        if trainer.state.fn == TrainerFn.FITTING and trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # the sanity check runs before the fit loop loads its data
        loader = first_loader(trainer.train_dataloader)
        datamodule = trainer.datamodule
        if loader is None and datamodule is not None and is_overridden("train_dataloader", datamodule):
            loader = first_loader(datamodule.train_dataloader())
        return loader if loader is not None else first_loader(current)

    @torch.no_grad()
    def calibrate(self, trainer: Trainer | None, pl_module: LightningModule, loader: Iterable | None) -> int:
        """Measure the static activation ranges (``amax``) on ``calibration_batches`` batches.

        Args:
            trainer: moves batches to the device and reduces ranges across ranks (``None``: one process).
            pl_module: the module; called as ``pl_module(**batch)`` for dict batches, else ``pl_module(batch)``.
            loader: batches to calibrate on; rank ``r`` of ``w`` uses batches ``r, r + w, ...``.

        Returns:
            Number of batches seen (max over ranks).

        Raises:
            RuntimeError: no batch at all.
        """
        quantizers = self._static_quantizers()
        for aq in quantizers:
            aq.amax.zero_()
            aq.calibrating = True
        try:
            with eval_mode(pl_module):
                seen = self._run_calibration(trainer, pl_module, loader)
        finally:
            for aq in quantizers:
                aq.calibrating = False
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        ranges = [aq.amax.float().reshape(1) for aq in quantizers]
        reduced = all_reduce_(
            torch.cat([*ranges, torch.tensor([float(seen)], device=device)]), trainer, "max"
        )
        for aq, amax in zip(quantizers, reduced):
            aq.amax.copy_(amax)
        if int(reduced[-1]) == 0:
            raise RuntimeError(
                f"{self.config_key}.activations='static': no batch to calibrate on (empty dataloader)"
            )
        step = trainer.global_step if trainer is not None else None
        self.state.update(calibrated=True, calibration_batches=int(reduced[-1]), calibrated_at_step=step)
        return int(reduced[-1])

    def _run_calibration(self, trainer: Trainer | None, pl_module: LightningModule, loader: Any) -> int:
        seen = 0
        if loader is None:
            return seen
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        for batch in _rank_batches(loader, rank, world):
            if seen >= self.calibration_batches:
                break
            batch = trainer.strategy.batch_to_device(batch) if trainer is not None else batch
            pl_module(**batch) if isinstance(batch, Mapping) else pl_module(batch)
            seen += 1
        return seen

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_calibrate(trainer, pl_module, trainer.train_dataloader)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_calibrate(trainer, pl_module, trainer.val_dataloaders)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_calibrate(trainer, pl_module, trainer.test_dataloaders)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_calibrate(trainer, pl_module, trainer.predict_dataloaders)

    # ------------------------------------------------------------------ export

    def export(self, pl_module: LightningModule | nn.Module, path: str | Path) -> Path:
        """Export the quantized network of ``pl_module`` to ``path`` (see :func:`export_quantized`)."""
        return export_quantized(target_model(pl_module), path)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.export_at_fit_end or self.export_dir is None:
            return
        path = Path(trainer.default_root_dir) / self.export_dir
        if trainer.is_global_zero:
            self.export(pl_module, path)
        trainer.strategy.barrier("quantization-export")
        self.exports[self.name or "quantized"] = str(path)
