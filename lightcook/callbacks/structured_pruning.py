"""Learn which attention heads, FFN neurons and whole attention/FFN blocks to drop:
:class:`StructuredPruningCallback` (the settings: :class:`~lightcook.ops.hard_concrete.StructuredConfig`).

Method (L0 regularisation with hard-concrete gates, Louizos et al. 2018, with CoFi's Lagrangian,
Xia et al. 2022):

* ``setup`` (before checkpoint weights are restored and before the optimizer exists) gates the
  network with :func:`~lightcook.ops.hard_concrete.prepare_`: a
  :class:`~lightcook.ops.hard_concrete.GateSet` as ``network.lightcook_gates``, one hard-concrete
  gate per unit (attention unit = a key/value head with all its query heads; FFN unit = one
  intermediate neuron) and per block, applied inside the forward pass by hooks on each block's output
  projection. The gate logits, the multipliers, the gates' Adam moments and the noise counter are
  parameters/buffers of the model: they ride in its state dict and a resumed run continues exactly.
  ``units`` and ``architecture`` are stored in the checkpoint: a resumed run with other values fails
  before any weight is loaded.
* ``init="taylor"``: at the start of training (not on resume) the gates of each kind are ordered by
  first-order importance ``|Σ ∂loss/∂z|`` at ``z = 1`` over ``calibration_batches`` training batches
  (summed over ranks; the loss is the module's ``compute_loss(batch)`` when it has one, else the
  network's own ``.loss``): the least important unit keeps the ``droprate_init`` logit, the most
  important gets ``init_spread`` more, evenly by rank. Every gate starts open (the model is still the
  dense one); the size penalty then closes the least important units first unless the task loss
  holds them. Short runs, whose gate gradients are mostly noise, keep a meaningful ranking.
* ``init="obs"``: at the start of training (not on resume) a one-shot structured prune with
  reconstruction (the ZipLM / SlimGPT family, :mod:`lightcook.ops.structured_obs`). Two sequential
  block-by-block calibration passes over ``calibration_batches`` training batches
  (:func:`~lightcook.callbacks.base.sequential_calibration`, Hessians dampened by ``percdamp`` and
  summed over ranks) see the input Hessian ``H`` of each gated block's output projection
  (``o_proj``: one column group per key/value head with its query heads; ``down_proj``: one column
  per neuron). The first pass records, per projection, the greedy OBS error of removing its units
  one after another; ``allocation`` turns those curves into how many units each block loses so
  that ``target_sparsity`` of the layer parameters goes (``global``: the cheapest removals per
  parameter over the whole model; ``uniform``: the same fraction of every layer). The second pass,
  on the outputs of the blocks already pruned, removes that many units per projection greedily and
  refits the projection's kept columns by least squares (``ΔW = −W[:, R] (H⁻¹[R, R])⁻¹ H⁻¹[R, :]``).
  The removed units' gates close for good, every other gate opens with certainty
  (:meth:`~lightcook.ops.hard_concrete.GateSet.fix_units_`); gate logits and refit weights ride in
  the state dict. With ``end_step=0`` the target is met at once and the gates are frozen before
  the first step: a one-shot structured prune whose sliced export is the product
  (:meth:`~StructuredPruningCallback.obs_init` runs it outside ``fit`` too).
* The loss: :meth:`~StructuredPruningCallback.loss_terms` adds the Lagrangian
  ``λ1·(ŝ − t) + λ2·(ŝ − t)²`` (logged ``compress/structured/lagrangian``) to the loss the module's
  own ``training_step`` returns, where ``ŝ`` is the expected sparsity of the layer parameters under
  the gates and ``t`` the target, warmed up linearly from 0 to ``target_sparsity`` over
  ``[start_step, end_step)``. Manual optimization is refused in ``setup`` (the base callback says why).
* The multipliers are maximised (gradient ascent) through a gradient-reversal function, so one
  minimising update serves gates and multipliers alike. The gates and multipliers are *not* stepped
  by the module's optimizer (whose LR schedule is tuned for weights): the callback removes them from
  its param groups and steps them with Adam at ``gate_lr`` / ``lambda_lr`` after every real optimizer
  step (their Adam moments are buffers of the model). With ``gate_lr=None`` they stay with the
  module's optimizer instead.
* Dual restart (``dual_restart``, after Gallego-Posada et al. 2022): ``λ1`` integrates the gap, so
  while the gates lag behind the rising target it grows large, and when they catch up it keeps
  pushing past the target for as many steps as it took to grow (SmolLM2, 40 steps to 50%: 0.91
  reached and held; 120 steps: up to 0.79 with Taylor init, 0.83 with uniform init; with the
  restart no run went above 0.51, docs/benchmarks.md). Whenever ``λ1`` pushes away from the
  target (``λ1·(ŝ − t) < 0``) it is set to 0 with its Adam moments, and the gates' Adam momentum
  is dropped (their second moment stays, so they do not jump a full ``gate_lr``); the quadratic
  term ``λ2`` then pulls ``ŝ`` back and ``λ1`` grows again from 0 in the right direction.
* Once the schedule has ended and both the expected sparsity and the deterministic gates' sparsity
  lie within ``tolerance`` of the target (above or below: a Lagrangian that overshoots keeps
  searching until it comes back), the gates are frozen (deterministic in training too,
  ``compress/phase`` = 1) and the model keeps training with its structure fixed; the penalty is 0.
* ``on_train_end``: a run whose deterministic sparsity is not within ``tolerance`` of the target
  warns with the reached and the wanted sparsity; :meth:`~StructuredPruningCallback.summary` records
  both (the app writes it to ``summary.json``). The live network keeps its gates, so validation after
  fitting measures exactly the sliced model; the one export step at fit end
  (:func:`lightcook.export.save_compressed`) slices it.

Logged each step: ``compress/expected_sparsity``, ``compress/target_sparsity``,
``compress/sparsity`` (deterministic gates), ``compress/structured/lagrangian``, ``compress/lambda_1``,
``compress/lambda_2``, ``compress/phase``.

Example:
    >>> import tempfile, torch, lightning as L
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> ids = torch.randint(0, 64, (4, 8))
    >>> data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    >>> cb = StructuredPruningCallback(target_sparsity=0.3, end_step=2, tolerance=0.9)
    >>> trainer = L.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> "model.lightcook_gates.gates.neurons.log_alpha" in module.state_dict()
    True
    >>> sorted(cb.summary())[:4]
    ['dual_restarts', 'expected_sparsity', 'frozen_at', 'kept_units']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import (
    CompressionCallback,
    all_reduce_,
    batch_size_of,
    calibration_batches,
    calibration_loss,
    eval_mode,
    sequential_calibration,
)
from lightcook.ops.architectures import BLOCK_UNIT, Architecture, resolve_blocks
from lightcook.ops.hard_concrete import (
    GatedBlock,
    GateSet,
    StructuredConfig,
    deterministic_sparsity,
    expected_sparsity,
    gate_gradients,
    lagrangian,
    prepare_,
)
from lightcook.ops.slicing import gate_summary
from lightcook.ops.sparsity import as_out_in, dense_weight
from lightcook.ops.structured_obs import allocate, greedy_obs_, greedy_step

SEARCH, FIXED = "search", "fixed"


def _unit_columns(block: GatedBlock) -> Tensor:
    """``(units, unit_width)`` input columns of each unit in the block's output projection (the
    channels the gate hook scales: unit ``u`` owns ``[u·width, (u+1)·width)``)."""
    return torch.arange(block.units * block.unit_width).reshape(block.units, block.unit_width)


class StructuredPruningCallback(CompressionCallback):
    """Structured pruning with hard-concrete gates and a Lagrangian size constraint (CoFi-style).

    Args:
        config: a :class:`~lightcook.ops.hard_concrete.StructuredConfig`; or give its fields as
            keyword ``options`` instead (not both): ``target_sparsity``, ``units``, ``start_step``,
            ``end_step``, ``gate_lr``, ``lambda_lr``, ``droprate_init``, ``init``,
            ``calibration_batches``, ``percdamp``, ``allocation``, ``init_spread``, ``beta``,
            ``limit_l``, ``limit_r``,
            ``dual_restart``, ``tolerance``, ``freeze_on_target``, ``architecture``, ``seed`` (each
            documented on the config, with its default and allowed values).
        targets, exclude: unused by this technique (it gates whole units found by the layout).
        name: distinguishes two instances (checkpoint ``state_key``; config key ``compress.<name>``).
        network: where the network lives in the LightningModule (see
            :class:`~lightcook.callbacks.base.CompressionCallback`).

    Raises:
        ValueError: in ``__init__``, a setting outside its allowed values, or ``config`` and options
            both given (messages name ``compress.structured.<field>``); in ``setup``, a network whose
            layout is unknown and no ``architecture`` given, or a unit kind the architecture does not
            have (the messages say where the network was looked for and mention ``network``).
        TypeError: in ``setup``, a LightningModule with manual optimization.
        RuntimeError: at the start of training, ``init="taylor"`` / ``"obs"`` and no training batch
            to calibrate on (names ``compress.structured.init=...``).

    Example:
        >>> cb = StructuredPruningCallback(target_sparsity=0.5, units=["neurons", "ffn_layers"])
        >>> cb.config_key, cb.config.units
        ('compress.structured', ('neurons', 'ffn_layers'))
        >>> StructuredPruningCallback(tolerance=1.0)
        Traceback (most recent call last):
        ...
        ValueError: compress.structured.tolerance: must lie in [0, 1), got 1.0
    """

    technique = "structured"
    order = 20  # canonical order: after MoE splits (10), before N:M masks (30) and fake-quant wraps (40)
    config_class = StructuredConfig

    def __init__(
        self,
        config: StructuredConfig | None = None,
        *,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
        network: str | Callable[[nn.Module], nn.Module] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, name=name, network=network)
        self.config: StructuredConfig = self.configure(config, options)
        self.state = {
            "steps": 0,
            "phase": SEARCH,
            "frozen_at": None,
            "initialized": self.config.init == "uniform",
            "dual_restarts": 0,
        }
        self._gates: GateSet | None = None

    @property
    def gates(self) -> GateSet | None:
        """The gate set attached to the network (after ``setup``)."""
        return self._gates

    @property
    def _live(self) -> GateSet:
        if self._gates is None:
            raise RuntimeError(
                f"{self.config_key}: the network has no gates yet (they are attached in setup)"
            )
        return self._gates

    @property
    def architecture(self) -> Architecture | None:
        """The layout the gates were built from (after ``setup``)."""
        return getattr(self._gates, "architecture", None)

    @override
    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        network = self.network(pl_module)
        self._gates = self.named(prepare_, network, self.config, where=self.where(pl_module))

    @override
    def export_options(self) -> dict[str, Any]:
        spec = self.config.architecture
        return {"architecture": spec} if isinstance(spec, str | Mapping) else {}

    # ------------------------------------------------------------------ fit: optimizer, Taylor init

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._ensure_hooks(pl_module)
        self._live.rank = trainer.global_rank
        if self.config.gate_lr is not None:
            self._take_gates_from_optimizers(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.state["initialized"]:
            return
        if trainer.global_step == 0:  # a resumed run has its gates (and weights) from the checkpoint
            if self.config.init == "obs":
                self.obs_init(pl_module, trainer)
            else:
                self._live.rank_init_(self.taylor_scores(trainer, pl_module), self.config.init_spread)
        self.state["initialized"] = True

    def taylor_scores(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """``|Σ ∂loss/∂z|`` per gate at ``z = 1`` over ``calibration_batches`` training batches
        (eval mode, summed over ranks, global RNG untouched); the weights get no gradient.

        Raises:
            RuntimeError: no training batch.
            TypeError: no task loss (no ``compute_loss`` and a network that returns no ``.loss``).
        """
        owner = f"{self.config_key}.init='taylor'"
        network = self.network(pl_module)
        batches = calibration_batches(trainer, self.config.calibration_batches, owner)
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            sums = gate_gradients(
                self._live, lambda batch: calibration_loss(pl_module, network, batch, owner), batches
            )
        return {kind: all_reduce_(total, trainer).abs() for kind, total in sums.items()}

    @torch.no_grad()
    def obs_init(
        self, pl_module: LightningModule, trainer: Trainer | None = None, batches: Iterable[Any] | None = None
    ) -> dict[str, int]:
        """The one-shot structured OBS prune of ``init="obs"`` (see the module docstring): two sequential
        calibration passes, the removed units' gates closed, the kept columns of each output projection
        refit. Freezes the gates when the target is then met and ``end_step`` is 0 (with
        ``freeze_on_target``). Called by ``fit`` at step 0; usable after ``setup`` (or
        :meth:`prepare_once`) for a one-shot prune outside ``fit``.

        Args:
            pl_module: the module holding the gated network.
            trainer: gives the calibration batches (its training dataloader), the precision context
                and the ranks to reduce over; ``None``: one process, ``batches`` required.
            batches: calibration batches to use instead of the trainer's (the first
                ``calibration_batches`` of them, moved to the network's device).

        Returns:
            Units removed per output projection.

        Raises:
            RuntimeError: no calibration batch (names ``compress.structured.init='obs'``).
        """
        owner = f"{self.config_key}.init='obs'"
        network, gates, config = self.network(pl_module), self._live, self.config
        blocks = {b.output: b for b in gates.blocks if b.unit_offset is not None}
        source = list(self._calibration_source(network, trainer, batches, owner))
        curves: dict[str, Tensor] = {}

        def curve(name: str, module: nn.Module, hessian: Tensor) -> None:
            block = blocks[name]
            work = as_out_in(dense_weight(module).detach(), module).float().clone()  # (out, in)
            _, curves[name] = greedy_obs_(
                work, hessian, _unit_columns(block), block.units, greedy_step(block.units), torch.float32
            )

        names = list(blocks)
        sequential_calibration(trainer, network, source, names, curve, owner=owner, percdamp=config.percdamp)
        counts = dict(zip(names, self._allocate(network, [blocks[n] for n in names], curves), strict=True))
        removed = {
            kind: torch.zeros_like(cast(Tensor, g.log_alpha), dtype=torch.bool)
            for kind, g in gates.gates.items()
        }

        def prune(name: str, module: nn.Module, hessian: Tensor) -> None:
            block = blocks[name]
            weight = as_out_in(dense_weight(module).detach(), module)  # (out, in) view of the stored weight
            work = weight.float().clone()
            order, _ = greedy_obs_(
                work, hessian, _unit_columns(block), counts[name], greedy_step(block.units), torch.float32
            )
            weight.copy_(work)
            offset = cast(int, block.unit_offset)
            removed[BLOCK_UNIT[block.kind]][offset + order.to(removed[BLOCK_UNIT[block.kind]].device)] = True

        sequential_calibration(trainer, network, source, names, prune, owner=owner, percdamp=config.percdamp)
        gates.fix_units_(removed)
        if self.state["phase"] == SEARCH and config.freeze_on_target and self.target_met():
            self.freeze()
        return counts

    def _calibration_source(
        self, network: nn.Module, trainer: Trainer | None, batches: Iterable[Any] | None, owner: str
    ) -> Iterable[Any]:
        count = self.config.calibration_batches
        if batches is None:
            return calibration_batches(trainer, count, owner)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        return (move_data_to_device(b, device) for _, b in zip(range(count), batches))

    def _allocate(
        self, network: nn.Module, blocks: list[GatedBlock], curves: Mapping[str, Tensor]
    ) -> list[int]:
        """Units each block loses (``allocation``) so that ``target_sparsity`` of the layer parameters go."""
        gates, config = self._live, self.config
        layers = None
        if config.allocation == "uniform":
            layer_of = {b.name: b.layer_path for b in resolve_blocks(network, gates.architecture)}
            paths = list(dict.fromkeys(layer_of[b.name] for b in blocks))
            layers = [paths.index(layer_of[b.name]) for b in blocks]
        return allocate(
            [curves[b.output] for b in blocks],
            [b.unit_params for b in blocks],
            [b.const_params for b in blocks],
            config.target_sparsity,
            gates.layer_params,
            layers,
        )

    def _ensure_hooks(self, pl_module: LightningModule) -> None:
        """Re-hook the gates when a later callback replaced a gated projection (e.g. a fake-quant
        wrapper at canonical order 40): the gates must act on the module that actually runs."""
        if self._gates is None:
            return
        network = self.network(pl_module)
        if self._gates.unhooked_outputs(network):
            self._gates.install_hooks(network)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_hooks(pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_hooks(pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_hooks(pl_module)

    def _take_gates_from_optimizers(self, trainer: Trainer) -> None:
        ids = {id(p) for p in self._live.gate_parameters() + self._live.lambda_parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]

    # ------------------------------------------------------------------ the penalty

    def target_at(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps (linear warm-up from 0)."""
        return self.config.target_at(step)

    def expected_sparsity(self) -> Tensor:
        """``1 − E[size] / dense size`` under ``P(z ≠ 0)``; differentiable in the gate logits."""
        return expected_sparsity(self._live)

    def deterministic_sparsity(self) -> float:
        """Sparsity of the layers after slicing with the deterministic gates."""
        return deterministic_sparsity(self._live)

    @override
    def loss_terms(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, outputs: Any
    ) -> dict[str, Tensor]:
        """``{"lagrangian": λ1·(ŝ − t) + λ2·(ŝ − t)²}`` while searching (0 once the gates are frozen)."""
        gates, size = self._live, batch_size_of(batch)
        if self.state["phase"] == FIXED:
            penalty = gates.lambda_1.new_zeros(())
        else:
            target = self.target_at(self.state["steps"])
            penalty, expected = lagrangian(gates, target)
            pl_module.log("compress/expected_sparsity", expected.detach(), prog_bar=True, batch_size=size)
            pl_module.log("compress/target_sparsity", target, batch_size=size)
        pl_module.log("compress/sparsity", self.deterministic_sparsity(), batch_size=size)
        pl_module.log("compress/lambda_1", gates.lambda_1.detach(), batch_size=size)
        pl_module.log("compress/lambda_2", gates.lambda_2.detach(), batch_size=size)
        pl_module.log("compress/phase", float(self.state["phase"] == FIXED), batch_size=size)
        return {"lagrangian": penalty}

    # ------------------------------------------------------------------ after each optimizer step

    @override
    def after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        config = self.config
        stepping = config.gate_lr is not None and self.state["phase"] == SEARCH
        if config.gate_lr is not None and stepping:
            self._live.step_(config.gate_lr, config.multiplier_lr or config.gate_lr)
        self.state["steps"] += 1
        if stepping and config.dual_restart:
            self._restart_if_pushing_away()
        if self.state["phase"] == SEARCH and config.freeze_on_target and self.target_met():
            self.freeze()

    def _restart_if_pushing_away(self) -> None:
        with torch.no_grad():
            gap = float(self.expected_sparsity()) - self.target_at(self.state["steps"])
        if float(self._live.lambda_1.detach()) * gap < 0:
            self._live.restart_lambda_1_()
            self.state["dual_restarts"] += 1

    def target_met(self) -> bool:
        """Whether the schedule has ended and both the expected sparsity (the Lagrangian has
        converged) and the deterministic gates' sparsity lie within ``tolerance`` of the target."""
        if self.state["steps"] < self.config.end_step:
            return False
        with torch.no_grad():
            expected = float(self.expected_sparsity())
        return self._on_target(expected) and self._on_target(self.deterministic_sparsity())

    def _on_target(self, sparsity: float) -> bool:
        return abs(sparsity - self.config.target_sparsity) <= self.config.tolerance + 1e-12

    def freeze(self) -> None:
        """Fix the gates at their deterministic values for the rest of training."""
        self._live.get_buffer("frozen").fill_(True)
        self._live.zero_grad(set_to_none=True)
        self.state["phase"] = FIXED
        self.state["frozen_at"] = self.state["steps"]

    @override
    def on_before_zero_grad(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.config.gate_lr is not None and self._gates is not None:
            self._live.zero_grad(set_to_none=True)  # they are not in the module's optimizer

    # ------------------------------------------------------------------ end: outcome

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        outcome = self.summary()
        if self._gates is not None and not outcome["target_met"]:
            rank_zero_warn(
                f"{self.config_key}: training ended at {outcome['reached_sparsity']:.4f} sparsity (deterministic "
                f"gates, after {self.state['steps']} steps), not within tolerance={self.config.tolerance} of "
                f"target_sparsity={self.config.target_sparsity}; train for longer than end_step="
                f"{self.config.end_step} steps, or raise lambda_lr"
            )

    @override
    def summary(self) -> dict[str, Any]:
        """The outcome: ``target_sparsity``, ``reached_sparsity`` (deterministic gates, what slicing
        keeps), ``expected_sparsity``, ``target_met``, ``frozen_at`` (step or ``None``), ``steps``,
        ``dual_restarts`` and the gate counts of :func:`~lightcook.ops.slicing.gate_summary`."""
        info: dict[str, Any] = {"target_sparsity": self.config.target_sparsity}
        if self._gates is None:
            return {**info, "reached_sparsity": None, "target_met": False, "frozen_at": None}
        reached = self.deterministic_sparsity()
        with torch.no_grad():
            expected = float(self.expected_sparsity())
        return {
            **gate_summary(self._gates),
            **info,
            "reached_sparsity": round(reached, 6),
            "expected_sparsity": round(expected, 6),
            "target_met": self._on_target(reached),
            "frozen_at": self.state["frozen_at"],
            "steps": self.state["steps"],
            "dual_restarts": self.state["dual_restarts"],
        }


__all__ = ["StructuredPruningCallback"]
