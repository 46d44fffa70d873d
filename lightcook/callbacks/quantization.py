"""Quantization-aware training ending in a real int8 (or packed int4 / int2) model: :class:`QuantizationCallback`.

In ``setup`` every targeted Linear (default: all Linear layers of the transformer blocks) becomes a
:class:`~lightcook.ops.quant.QuantLinear` (:func:`lightcook.ops.quant.prepare_`) that keeps the same
``weight`` / ``bias`` Parameters and fake-quantizes weight and input with straight-through
gradients; learned scales (PACT, LSQ, dynamic scaling) are Parameters registered before the
optimizer exists. Token embeddings, attention score / softmax matmuls and the LM head stay in
floating point unless targeted. GPT-2 ``Conv1D`` layers are first turned into the equivalent
``nn.Linear``. Static activation scales are calibrated once, before their first use, and live in the
model's state dict with the weights. With ``init="gptq"`` the weights start from one-shot GPTQ
(:func:`lightcook.ops.gptq.gptq_layer_`) on one sequential calibration pass, once, before the first
training step. The one export step at fit end (the report callback) writes the
integer weights; :func:`lightcook.ops.quant.convert_` folds them in memory.

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
    >>> cb.state["calibrated"], len(cb.quantized_modules)
    (True, 7)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightcook.callbacks.base import (
    BLOCK_LINEARS,
    CompressionCallback,
    all_reduce_,
    calibration_batches,
    calibration_source,
    first_loader,
    sequential_calibration,
    training_loader,
)
from lightcook.ops.calibrate import block_layers
from lightcook.ops.gptq import gptq_layer_
from lightcook.ops.names import linear_like
from lightcook.ops.quant import (
    QuantConfig,
    QuantLinear,
    QuantSpec,
    calibrate_,
    conv1d_to_linear,
    float_copy,
    prepare_,
    static_quantizers,
)

__all__ = ["QuantizationCallback", "conv1d_to_linear"]


def _linear_or_embedding(module: nn.Module) -> bool:
    return linear_like(module) or isinstance(module, nn.Embedding)


class QuantizationCallback(CompressionCallback):
    """Quantization-aware training of the targeted Linear layers, exported as real integer weights.

    Weights are fake-quantized to ``bits`` with one scale per tensor, per output channel or per
    group of ``group_size`` inputs; the scale comes from the current weights (``absmax``) or is
    learned (``pact``: clipping bound, ``lsq``: step size, ``dynamic``: module-wise dynamic scaling
    of Tao et al., ACL 2022). Inputs are fake-quantized to ``act_bits`` per token (``dynamic``), per
    tensor with a calibrated scale (``static``), or not at all (``none``: weight-only). Gradients
    use the straight-through estimator. With gradients off, W8A8 layers already run the integer
    kernel of the exported model. Adds no loss term, so manual optimization works too.

    Static scales are calibrated once, at the first of ``on_validation_start`` / ``on_train_start``
    / ``on_test_start`` / ``on_predict_start``, on the first ``calibration_batches`` batches of the
    training data in dataset order when there is training data (else of the running loop's data),
    in eval mode without gradients; the maxima are reduced across DDP ranks. They are buffers of the
    model, so a resumed run restores them and does not calibrate again (``state["calibrated"]``).

    With ``init="gptq"`` the weights start from GPTQ: once, when the first training batch starts
    (after the canonical-order callbacks before this one, so a SparseGPT one-shot at step 0 prunes
    first and GPTQ then quantizes the pruned weights, keeping them at zero), one sequential
    block-by-block pass (:func:`lightcook.ops.calibrate.sequential_pass`) over ``calibration_batches``
    training batches per rank: each targeted layer inside the repeated blocks is quantized in place
    from its input Hessian, summed over DDP ranks (every rank gets the same weights), with
    :func:`lightcook.ops.gptq.gptq_layer_`, which also starts the learned scales (PACT, LSQ, dynamic)
    on the GPTQ grid; damping ``percdamp`` is applied once, by GPTQ. Targeted layers outside the
    blocks (an explicitly targeted ``lm_head``) keep round-to-nearest. Static activation scales are
    calibrated again afterwards, on the GPTQ weights. The weights and scales ride in the state dict
    and ``state["gptq_done"]`` in the checkpoint, so a resumed run does not run GPTQ again.
    :meth:`gptq` runs the same one-shot outside ``fit`` (after ``setup`` / ``prepare_once``).

    Args:
        config: a :class:`~lightcook.ops.quant.QuantConfig`; or give its fields as keyword
            ``options`` instead (not both): ``bits`` (8 | 4 | 2), ``granularity`` (tensor | channel
            | group), ``group_size``, ``symmetric``, ``method`` (absmax | pact | lsq | dynamic),
            ``activations`` (dynamic | static | none), ``act_bits``, ``calibration_batches``
            (static calibration and GPTQ), ``init`` (none | gptq), ``blocksize``, ``percdamp``,
            ``desc_act`` (GPTQ) — each documented on the config.
        targets, exclude, name, network: see :class:`~lightcook.callbacks.base.CompressionCallback`.
            The LM head can be targeted explicitly (``targets: [..., lm_head]``).

    Raises:
        ValueError: in ``__init__``, an option outside its allowed values or unknown (the message
            names ``compress.quant.<field>`` once), or both ``config`` and options; in ``setup``, a
            target pattern matching no Linear, a targeted embedding, a group size not dividing a
            layer's input features, a layer already quantized with other settings, a GPT-2
            ``Conv1D`` carrying another technique's buffers (N:M masks), or a resumed checkpoint
            trained with other ``bits`` / ``method`` / ... (the config's ``SHAPE_FIELDS``).
        NotImplementedError: in ``setup``, ``init="gptq"`` on an encoder-decoder (T5).
        RuntimeError: static activations or ``init="gptq"`` with no batch to calibrate on.

    Example:
        >>> cb = QuantizationCallback(bits=4, granularity="group", group_size=32, method="pact")
        >>> cb.config_key, cb.spec.qmax, cb.state["calibrated"]
        ('compress.quant', 7, False)
        >>> QuantizationCallback(bits=5)
        Traceback (most recent call last):
        ...
        ValueError: compress.quant.bits: got 5; allowed: 2, 3, 4, 8
    """

    technique = "quant"
    order = 40  # canonical order: after MoE splits (10), gates (20) and masks (30); before distillation (50)
    config_class = QuantConfig

    def __init__(
        self,
        config: QuantConfig | None = None,
        *,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
        network: str | Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, name=name, network=network)
        self.config: QuantConfig = self.configure(config, options)
        self.state = {
            "calibrated": False,  # static activation scales measured (they live in the model)
            "calibration_batches": 0,  # batches seen by the calibration (max over ranks)
            "calibrated_at_step": None,  # trainer.global_step when calibrating
            "gptq_done": False,  # init="gptq": the one-shot GPTQ ran (its weights live in the model)
        }
        self._layers: dict[str, QuantLinear] = {}

    @property
    def spec(self) -> QuantSpec:
        """The weight :class:`~lightcook.ops.quant.QuantSpec`."""
        return self.config.spec

    @property
    def quantized_modules(self) -> dict[str, QuantLinear]:
        """The :class:`QuantLinear` layers this callback installed, by name (after ``setup``)."""
        return dict(self._layers)

    # ------------------------------------------------------------------ structure

    @override
    def prepare_model(self, trainer: Trainer | None, pl_module: LightningModule) -> None:
        """Swap every targeted Linear for a :class:`QuantLinear` (all validated first, then swapped)."""
        explicit = self.targets != list(BLOCK_LINEARS)
        selected = self.select(pl_module, _linear_or_embedding if explicit else linear_like)
        self._layers = self.named(prepare_, self.network(pl_module), self.config, selected)
        if self.config.init == "gptq":
            self._check_sequential(pl_module)

    def _check_sequential(self, pl_module: LightningModule) -> None:
        """GPTQ calibrates block by block: the network needs one known decoder stack."""
        try:
            block_layers(self.network(pl_module), self._layers)
        except NotImplementedError as err:
            raise NotImplementedError(f"{self.config_key}.init='gptq': {err}") from None
        except ValueError as err:
            raise ValueError(f"{self.config_key}.init='gptq': {err} [{self.where(pl_module)}]") from None

    @override
    def summary(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "layers": len(self._layers), "calibrated": self.state["calibrated"]}

    # ------------------------------------------------------------------ static calibration

    def _maybe_calibrate(self, trainer: Trainer, pl_module: LightningModule, current: Any) -> None:
        if self.state["calibrated"] or not static_quantizers(self.network(pl_module)):
            return
        self.calibrate(trainer, pl_module, self._calibration_batches(trainer, current))

    def _calibration_batches(self, trainer: Trainer, current: Any) -> Iterable[Any]:
        """The first training batches in dataset order, rank ``r`` of ``w`` taking batches ``r, r + w,
        ...`` (the fit loop's data, or the datamodule's outside ``fit``); else the running loop's data."""
        if trainer.state.fn == TrainerFn.FITTING and trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # the sanity check runs before the fit loop loads its data
        count = self.config.calibration_batches
        loader = training_loader(trainer)
        if loader is not None:
            return calibration_batches(
                trainer, count, self.config_key, ordered=True, per_rank=True, loader=loader
            )
        loader = first_loader(current)
        source = calibration_source(loader) if loader is not None else ()
        return (trainer.strategy.batch_to_device(b) for b in itertools.islice(source, count))

    @torch.no_grad()
    def calibrate(self, trainer: Trainer | None, pl_module: LightningModule, batches: Iterable[Any]) -> int:
        """Measure the static activation ranges (``amax``) on ``batches`` (on the device already).

        Args:
            trainer: gives the precision context and reduces the ranges across ranks (``None``: one
                process).
            pl_module: the module holding the network.
            batches: the calibration batches.

        Returns:
            Number of batches seen (max over ranks).

        Raises:
            RuntimeError: no batch at all (``compress.quant.activations='static': no batch ...``).
        """
        network = self.network(pl_module)
        context = trainer.precision_plugin.forward_context() if trainer else contextlib.nullcontext()
        with context:
            seen = self.named(calibrate_, network, batches)
        quantizers = static_quantizers(network)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        ranges = [aq.amax.float().reshape(1) for aq in quantizers]
        reduced = all_reduce_(
            torch.cat([*ranges, torch.tensor([float(seen)], device=device)]), trainer, "max"
        )
        for aq, amax in zip(quantizers, reduced):
            aq.amax.copy_(amax)
        step = trainer.global_step if trainer is not None else None
        self.state.update(calibrated=True, calibration_batches=int(reduced[-1]), calibrated_at_step=step)
        return int(reduced[-1])

    # ------------------------------------------------------------------ GPTQ

    @torch.no_grad()
    def gptq(
        self, pl_module: LightningModule, trainer: Trainer | None = None, batches: Iterable[Any] | None = None
    ) -> list[str]:
        """One-shot GPTQ of the targeted layers inside the blocks, in place (see the class docstring).

        Args:
            pl_module: the module holding the network (after ``setup`` / ``prepare_once``).
            trainer: gives the training batches, the device, the precision context and the ranks;
                ``None``: one process, ``batches`` required.
            batches: calibration batches to use instead of the trainer's (the first
                ``calibration_batches`` of them, moved to the network's device).

        Returns:
            The names of the layers quantized with GPTQ, in order.

        Raises:
            RuntimeError: no calibration batch (names ``compress.quant.init='gptq'``).
            ValueError: a Hessian GPTQ cannot invert (names ``compress.quant.percdamp``).

        Example:
            >>> from lightcook.modules import CausalLMModule
            >>> module = CausalLMModule(config={"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
            ...     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            ...     "num_key_value_heads": 2}, tokenizer=None)
            >>> cb = QuantizationCallback(bits=4, init="gptq", activations="none", calibration_batches=2)
            >>> cb.prepare_once(None, module)  # the QuantLinear swaps of setup
            >>> len(cb.gptq(module, batches=[torch.randint(0, 64, (2, 8)) for _ in range(2)]))
            7
            >>> q = cb.quantized_modules["model.layers.0.mlp.up_proj"]
            >>> bool(torch.equal(q.weight_quantizer(q.weight), q.weight)), cb.state["gptq_done"]
            (True, True)
        """
        network, cfg = self.network(pl_module), self.config
        owner = f"{self.config_key}.init='gptq'"
        options = {"blocksize": cfg.blocksize, "percdamp": cfg.percdamp, "desc_act": cfg.desc_act}

        def visit(_name: str, module: nn.Module, hessian: torch.Tensor) -> None:
            self.named(gptq_layer_, module, hessian, **options)

        names = [name for name, layer in self._layers.items() if isinstance(layer, QuantLinear)]
        source = self._gptq_batches(network, trainer, batches, owner)
        # percdamp=0: the pass only gives dead inputs a unit diagonal; gptq_ dampens, exactly once
        visited = sequential_calibration(
            trainer,
            network,
            source,
            names,
            visit,
            owner=owner,
            percdamp=0.0,
            true_sequential=cfg.true_sequential,
            dense_targets=cfg.dense_targets,
            dense_damp=cfg.percdamp,
            reference=float_copy,  # the dense targets are the float model's, not the fake-quant one's
        )
        self.state.update(gptq_done=True)
        return visited

    def _gptq_batches(
        self, network: nn.Module, trainer: Trainer | None, batches: Iterable[Any] | None, owner: str
    ) -> Iterable[Any]:
        count = self.config.calibration_batches
        if batches is None:
            step = trainer.global_step if trainer is not None else 0
            return calibration_batches(trainer, count, owner, seed=step, per_rank=True)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        return (move_data_to_device(b, device) for b in itertools.islice(batches, count))

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.config.init != "gptq" or self.state["gptq_done"]:
            return
        self.gptq(pl_module, trainer)
        if static_quantizers(self.network(pl_module)):  # the ranges changed with the weights
            self.calibrate(trainer, pl_module, self._calibration_batches(trainer, trainer.train_dataloader))

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
