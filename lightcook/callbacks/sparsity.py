"""N:M (2:4) and unstructured weight sparsity, enforced through training: :class:`SparsityCallback`.

Every targeted Linear gets a ``weight_mask`` bool buffer (:func:`lightcook.ops.sparsity.prepare_`; in
the model's state dict, so a resumed run continues with the same masks). Masks are (re)computed at
the start of a training batch when the schedule says so, from magnitude or Wanda scores; after every
optimizer step the masked weights are zeroed again. With SR-STE the dense weights keep learning and
the forward pass sees ``w * mask`` through a parametrization, folded into the weight when fitting
ends (:func:`lightcook.ops.sparsity.convert_`). N:M groups run along the input dimension: dim 1 of
``nn.Linear.weight`` ``(out, in)``, dim 0 of GPT-2's ``Conv1D.weight`` ``(in, out)``.

With ``criterion="sparsegpt"`` the masks are computed once, at ``start_step``, by one sequential
calibration pass (:func:`lightcook.ops.calibrate.sequential_pass`) over ``calibration_batches``
training batches: block by block, each targeted Linear's input Hessian (summed over DDP ranks) picks
its mask and updates the weights it keeps (:func:`lightcook.ops.sparsegpt.sparsegpt_`), and the next
block is calibrated on the outputs of the pruned ones. The masked training then starts from those
weights. SparseGPT refuses a ramp and periodic recomputation (it would re-prune and re-update
weights training has moved); the masks and the updated weights ride in the state dict, so a resumed
run does not calibrate again.

Example:
    >>> import tempfile, torch, lightning as L
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> ids = torch.randint(0, 64, (4, 8))
    >>> data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    >>> trainer = L.Trainer(max_steps=2, callbacks=[SparsityCallback(n=2, m=4)], logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> q = module.model.model.layers[0].self_attn.q_proj
    >>> bool((q.weight.reshape(32, 8, 4) != 0).sum(-1).le(2).all())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import (
    CompressionCallback,
    StepSchedule,
    all_reduce_,
    calibration_batches,
    eval_mode,
    sequential_calibration,
)
from lightcook.ops.calibrate import block_layers
from lightcook.ops.names import MASK, is_conv1d
from lightcook.ops.sparsegpt import sparsegpt_
from lightcook.ops.sparsity import (
    NMConfig,
    apply_masks_,
    as_out_in,
    attach_sr_ste_,
    compute_masks_,
    convert_,
    dense_weight,
    prepare_,
    record_input_norms,
    sparsity_of,
)

__all__ = ["MASK", "SparsityCallback", "as_out_in", "dense_weight", "is_conv1d"]


class SparsityCallback(CompressionCallback):
    """Prune targeted Linear weights to N:M (or an unstructured fraction) and keep them pruned.

    Masks are computed from ``start_step`` on (the step count is ``trainer.global_step`` at the
    start of a batch). With ``end_step`` the pruned share of every layer ramps linearly from 0 at
    ``start_step`` to the full N:M pattern at ``end_step``, updated every ``ramp_every`` steps;
    without it the full pattern is applied at once. ``recompute_every`` re-scores the masks
    periodically afterwards (useful with SR-STE, where pruned weights keep learning). After every
    optimizer step (all optimizers, gradient accumulation, manual optimization, AMP) masked weights
    are exactly zero; with SR-STE the effective weight ``module.weight`` is. Adds no loss term.

    Args:
        config: a :class:`~lightcook.ops.sparsity.NMConfig`; or give its fields as keyword
            ``options`` instead (not both): ``mode`` (nm | unstructured), ``n``, ``m``, ``pattern``
            (1d | 2d), ``sparsity``, ``scope`` (layer | global), ``criterion`` (magnitude | wanda |
            sparsegpt), ``calibration_batches``, ``blocksize``, ``percdamp`` (SparseGPT),
            ``start_step``, ``end_step``, ``ramp_every``, ``recompute_every``, ``sr_ste_decay`` —
            each documented on the config.
        targets, exclude, name, network: see :class:`~lightcook.callbacks.base.CompressionCallback`;
            ``name`` also sets the config key used in errors (``compress.<name>``; the
            ``unstructured`` preset uses ``name: unstructured``).

    Raises:
        ValueError: in ``__init__``, an option outside its allowed values or unknown (the message
            names ``compress.<name>.<field>`` once), or both ``config`` and options; in ``setup``, a
            target pattern matching no Linear, a targeted layer whose input (2-D pattern: also
            output) features are not divisible by ``m``, a layer another SparsityCallback already
            prunes, or a resumed checkpoint trained with other ``n`` / ``m`` / ... (the config's
            ``SHAPE_FIELDS``); criterion ``sparsegpt`` with a target outside the repeated blocks.
        NotImplementedError: in ``setup``, criterion ``sparsegpt`` on an encoder-decoder (T5).
        RuntimeError: criterion ``wanda`` / ``sparsegpt`` with no training batches to calibrate on.

    Example:
        >>> cb = SparsityCallback(n=2, m=4, criterion="wanda", start_step=10, end_step=50)
        >>> cb.config_key, cb.config.n, cb.state["masks_computed"]
        ('compress.prune', 2, False)
        >>> SparsityCallback(n=4, m=4)
        Traceback (most recent call last):
        ...
        ValueError: compress.prune.n: N:M needs integers 1 <= n < m, got n=4, m=4
    """

    technique = "prune"
    order = 30  # canonical order: after MoE splits (10) and gates (20), before fake-quant wraps (40)
    config_class = NMConfig

    def __init__(
        self,
        config: NMConfig | None = None,
        *,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
        network: str | Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, name=name, network=network)
        self.config: NMConfig = self.configure(config, options)
        self.schedule = StepSchedule(self.config.start_step, self.config.end_step)
        self.state = {
            "masks_computed": False,  # a mask has been computed (weights are being masked)
            "update": None,  # key of the last schedule update ("ramp:<k>" or "final:<k>")
            "fraction": 0.0,  # ramp progress of the current masks (1.0: full pattern)
            "last_update_step": -1,  # trainer.global_step of the last update
            "sparsity": 0.0,  # fraction of targeted weights masked out
        }
        self._names: list[str] = []
        self._root: nn.Module | None = None

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The targeted layers by name, looked up in the model each time: a later callback (fake-quant,
        canonical order 40) replaces the module objects, so references taken in ``setup`` would go
        stale (Wanda's input hooks would then never fire)."""
        if self._root is None:
            return {}
        return {name: self._root.get_submodule(name) for name in self._names}

    # ------------------------------------------------------------------ structure

    @override
    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        selected = self.select(pl_module)
        for name, module in selected.items():
            self._claim(name, module)
        self._root = self.network(pl_module)
        self.named(prepare_, self._root, self.config, selected)
        self._names = list(selected)
        if self.config.criterion == "sparsegpt":
            self._check_sequential(pl_module)

    def _check_sequential(self, pl_module: LightningModule) -> None:
        """SparseGPT calibrates block by block: every target must sit inside a repeated block."""
        assert self._root is not None
        try:
            inside = {n for names in block_layers(self._root, self._names).values() for n in names}
        except NotImplementedError as err:
            raise NotImplementedError(f"{self.config_key}.criterion='sparsegpt': {err}") from None
        except ValueError as err:
            raise ValueError(
                f"{self.config_key}.criterion='sparsegpt': {err} [{self.where(pl_module)}]"
            ) from None
        outside = [name for name in self._names if name not in inside]
        if outside:
            raise self.fail(
                "targets",
                f"{outside[0]} lies outside the repeated blocks, which criterion 'sparsegpt' calibrates one "
                f"by one; exclude it ({self.config_key}.exclude) or use another criterion",
            )

    @override
    def export_options(self) -> dict[str, Any]:
        return {"nm": (self.config.n, self.config.m)} if self.config.mode == "nm" else {}

    @override
    def summary(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "layers": len(self._names),
            "reached_sparsity": self.state["sparsity"],
            "complete": self.complete,
        }

    def _claim(self, name: str, module: nn.Module) -> None:
        """One sparsity callback per layer: a second one would share (and fight over) its mask."""
        owner = module.__dict__.get("_lightcook_sparsity_owner", self.config_key)
        if owner != self.config_key:
            raise ValueError(
                f"{self.config_key}.targets: {name} is already pruned by {owner}; give the two "
                f"callbacks disjoint targets ({self.config_key}.exclude) or select only one"
            )
        module._lightcook_sparsity_owner = self.config_key  # type: ignore[assignment]  # torch types only Tensor/Module

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            attach_sr_ste_(self.layers, self.config)  # again, for a second fit after the first one folded it

    # ------------------------------------------------------------------ schedule

    def _due(self, step: int) -> tuple[str, float] | None:
        """The update due at ``step``: ``(key, ramp fraction)``; ``None`` before ``start_step``.

        Keys name step ranges, so a step count that jumps (several optimizers) still hits them.
        """
        cfg = self.config
        if step < cfg.start_step:
            return None
        final_from = cfg.start_step if cfg.end_step is None else cfg.end_step
        if step < final_from:
            bucket = (step - cfg.start_step) // cfg.ramp_every
            return f"ramp:{bucket}", self.schedule.progress(cfg.start_step + bucket * cfg.ramp_every)
        bucket = (step - final_from) // cfg.recompute_every if cfg.recompute_every else 0
        return f"final:{bucket}", 1.0

    @property
    def complete(self) -> bool:
        """Whether the full pattern is in place (the ramp has finished)."""
        return bool(self.state["masks_computed"]) and self.state["fraction"] >= 1.0

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        due = self._due(trainer.global_step)
        if due is None or due[0] == self.state["update"]:
            return
        self._update(trainer, pl_module, *due)
        pl_module.log(f"{self.config_key.replace('.', '/')}/sparsity", self.state["sparsity"], batch_size=1)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        due = self._due(trainer.global_step)
        if due is not None and due[1] >= 1.0 and not self.complete:
            self._update(trainer, pl_module, *due)  # the run stopped exactly where the full pattern begins

    def _update(self, trainer: Trainer, pl_module: LightningModule, key: str, fraction: float) -> None:
        self.compute_masks(pl_module, fraction, trainer)
        self.state.update(
            masks_computed=True,
            update=key,
            fraction=fraction,
            last_update_step=trainer.global_step,
            sparsity=self.sparsity_now(),
        )

    # ------------------------------------------------------------------ masks

    @torch.no_grad()
    def compute_masks(
        self,
        pl_module: LightningModule,
        fraction: float = 1.0,
        trainer: Trainer | None = None,
        batches: Iterable | None = None,
    ) -> None:
        """Score the targeted weights, write the masks into ``weight_mask`` and apply them.

        Called by the schedule during ``fit``; also usable for one-shot pruning after ``setup``.

        Args:
            pl_module: the module being trained.
            fraction: ramp progress; 1 is the full pattern.
            trainer: gives Wanda's calibration batches (its training dataloader), the device
                transfer, the precision context and the ranks to reduce over.
            batches: Wanda calibration batches to use instead of the trainer's.

        Raises:
            RuntimeError: criterion ``wanda`` / ``sparsegpt`` and no calibration batch.
            ValueError: criterion ``sparsegpt`` and ``fraction < 1`` (it prunes at the full pattern only).
        """
        if self.config.criterion == "sparsegpt":
            if fraction < 1.0:
                raise self.fail(
                    "criterion", f"'sparsegpt' prunes at the full pattern only, got fraction {fraction}"
                )
            self._sparsegpt(pl_module, trainer, batches)
            return
        wanda = self.config.criterion == "wanda"
        norms = self._input_sq_norms(pl_module, trainer, batches) if wanda else None
        compute_masks_(self.layers, self.config, fraction, norms)

    def apply_masks(self) -> None:
        """Zero every masked weight in place (no-op with SR-STE: the forward pass masks instead)."""
        apply_masks_(self.layers)

    def sparsity_now(self) -> float:
        """Fraction of targeted weights currently masked out."""
        return sparsity_of(self.layers)

    @override
    def after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.state["masks_computed"]:
            self.apply_masks()

    # ------------------------------------------------------------------ Wanda calibration

    def _input_sq_norms(
        self, pl_module: LightningModule, trainer: Trainer | None, batches: Iterable | None
    ) -> dict[str, Tensor]:
        """Per-layer ``sum ||x_j||^2`` over the calibration batches, summed over ranks."""
        with record_input_norms(self.layers) as accs:
            self._calibrate(pl_module, trainer, batches)
        for acc in accs.values():
            all_reduce_(acc.sum_sq, trainer)
        return {name: acc.sq_norm for name, acc in accs.items()}

    def _source(self, network: nn.Module, trainer: Trainer | None, batches: Iterable | None) -> Iterable:
        """``calibration_batches`` batches on the network's device: ``batches`` when given, else the
        trainer's (the global RNG untouched; seeded with the step, so a resumed run sees the same ones)."""
        count = self.config.calibration_batches
        if batches is None:
            step = trainer.global_step if trainer is not None else 0
            owner = f"{self.config_key}.criterion={self.config.criterion!r}"
            return calibration_batches(trainer, count, owner, seed=step)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        return (move_data_to_device(b, device) for _, b in zip(range(count), batches))

    def _calibrate(
        self, pl_module: LightningModule, trainer: Trainer | None, batches: Iterable | None
    ) -> None:
        """Forward the calibration batches through the network in eval mode."""
        network = self.network(pl_module)
        source = self._source(network, trainer, batches)
        context = trainer.precision_plugin.forward_context() if trainer else contextlib.nullcontext()
        seen = 0
        with eval_mode(network), context:
            for batch in source:
                network(**batch) if isinstance(batch, Mapping) else network(batch)
                seen += 1
        if not seen:
            raise RuntimeError(
                f"{self.config_key}.criterion='wanda': no calibration batch (empty dataloader)"
            )

    # ------------------------------------------------------------------ SparseGPT

    def _sparsegpt(
        self, pl_module: LightningModule, trainer: Trainer | None, batches: Iterable | None
    ) -> None:
        """One sequential pass: per block, each layer's Hessian (summed over ranks, so every rank
        computes the same masks and weights) prunes it with SparseGPT; weights updated in place."""
        network, cfg = self.network(pl_module), self.config
        pattern: dict[str, Any] = {"n": cfg.n, "m": cfg.m} if cfg.mode == "nm" else {"sparsity": cfg.sparsity}

        def visit(name: str, module: nn.Module, hessian: Tensor) -> None:
            weight = as_out_in(dense_weight(module).detach(), module)  # (out, in) view of the stored weight
            keep = self.named(sparsegpt_, weight, hessian, blocksize=cfg.blocksize, **pattern)
            as_out_in(getattr(module, MASK), module).copy_(keep)

        owner = f"{self.config_key}.criterion='sparsegpt'"
        source = self._source(network, trainer, batches)
        sequential_calibration(
            trainer,
            network,
            source,
            self._names,
            visit,
            owner=owner,
            percdamp=cfg.percdamp,
            true_sequential=cfg.true_sequential,
            dense_targets=cfg.dense_targets,
            dense_damp=cfg.percdamp,
        )
        apply_masks_(self.layers)

    # ------------------------------------------------------------------ fit end

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        convert_(self.network(pl_module))  # fold SR-STE: the weights are w * mask from here on
        if self._names and not self.complete:
            rank_zero_warn(
                f"{self.config_key}: the full sparsity pattern was not reached by step {trainer.global_step} "
                f"(start_step={self.config.start_step}, end_step={self.config.end_step}): the masks drop "
                f"{self.state['sparsity']:.1%} of the targeted weights"
            )
