"""Learn which attention heads, FFN neurons and whole attention/FFN blocks to drop, then export a
physically smaller model: :class:`StructuredPruningCallback`.

Method (L0 regularisation with hard-concrete gates, Louizos et al. 2018, with CoFi's Lagrangian,
Xia et al. 2022):

* ``setup`` (before checkpoint weights are restored and before the optimizer exists) attaches a
  :class:`~lightcook.ops.hard_concrete.GateSet` to ``pl_module.model`` as ``model.lightcook_gates``:
  one hard-concrete gate per unit (attention unit = a key/value head with all its query heads;
  FFN unit = one intermediate neuron) and per block, applied inside the forward pass by hooks on
  each block's output projection. The gate logits, the multipliers, the gates' Adam moments and the
  noise counter are parameters/buffers of the model: they ride in its state dict and a resumed run
  continues exactly.
* ``init="taylor"``: at the start of training (not on resume) the gates of each kind are ordered by
  first-order importance ``|Σ ∂loss/∂z|`` at ``z = 1`` over ``calibration_batches`` training batches
  (summed over ranks): the least important unit keeps the ``droprate_init`` logit, the most
  important gets ``init_spread`` more, evenly by rank. Every gate starts open (the model is still the
  dense one); the size penalty then closes the least important units first unless the task loss
  holds them. Short runs, whose gate gradients are mostly noise, keep a meaningful ranking.
* The loss: a callback cannot replace it, so at ``on_fit_start`` (after every callback's ``setup``)
  this callback wraps whatever ``training_step`` is installed at that moment — the module's own, or
  another callback's wrapper such as distillation's — and adds
  ``λ1·(ŝ − t) + λ2·(ŝ − t)²`` to the loss it returns, where ``ŝ`` is the expected sparsity of the
  layer parameters under the gates and ``t`` the target, warmed up linearly from 0 to
  ``target_sparsity`` over ``[start_step, end_step)``. The wrapper is removed at ``on_train_end``
  (or ``teardown`` after a crash). Wrapping last keeps the composition independent of the order of
  ``+compress=[...]``.
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
  searching until it comes back), the gates are frozen (deterministic in training too, ``compress/phase`` = 1) and the model keeps
  training with its structure fixed; the penalty is no longer added.
* ``on_train_end`` (rank 0): the deterministic gates are folded into the weights of a copy of the
  model, which is sliced and saved to ``<default_root_dir>/<export_dir>``
  (see :mod:`lightcook.ops.slicing`; reload with :func:`lightcook.ops.slicing.load_sliced`).
  The live model keeps its gates, so validation after fitting measures exactly the sliced model.

Logged each step: ``compress/expected_sparsity``, ``compress/target_sparsity``,
``compress/sparsity`` (deterministic gates), ``compress/lagrangian``, ``compress/lambda_1``,
``compress/lambda_2``, ``compress/phase``.

Example:
    >>> import tempfile, torch, lightning as L
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> ids = torch.randint(0, 64, (4, 8))
    >>> data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    >>> cb = StructuredPruningCallback(target_sparsity=0.3, end_step=2)
    >>> trainer = L.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> "model.lightcook_gates.gates.neurons.log_alpha" in module.state_dict()
    True
    >>> from lightcook.ops.slicing import load_sliced
    >>> type(load_sliced(cb.exports["structured"])).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import (
    CompressionCallback,
    StepSchedule,
    all_reduce_,
    calibration_source,
    eval_mode,
    first_loader,
    target_model,
)
from lightcook.ops.architectures import (
    UNIT_KINDS,
    Architecture,
    check_architecture_arg,
    get_architecture,
    layer_parameter_count,
    resolve_blocks,
)
from lightcook.ops.hard_concrete import (
    BETA,
    LIMIT_L,
    LIMIT_R,
    GateSet,
    attach_gates,
    check_gate_args,
    reverse_grad,
)
from lightcook.ops.slicing import gate_summary, plan_from_gates, save_sliced, slice_model

GATES_ATTRIBUTE = "lightcook_gates"
DEFAULT_UNITS = ("heads", "neurons", "attention_layers", "ffn_layers")
SEARCH, FIXED = "search", "fixed"
INITS = ("uniform", "taylor")  # gate initialisation: all alike, or ordered by first-order importance


class StructuredPruningCallback(CompressionCallback):
    """Structured pruning with hard-concrete gates and a Lagrangian size constraint (CoFi-style).

    Sparsity counts the parameters inside the transformer layers (everything but embeddings, LM
    head and final norms): ``1 − size / dense size``.

    Args:
        target_sparsity: fraction of the layer parameters to remove, in (0, 1).
        units: what may be pruned, any of ``heads`` (a KV head with its query heads), ``neurons``
            (FFN intermediate neurons: gate/up rows and down columns together), ``attention_layers``
            and ``ffn_layers`` (a whole attention / FFN block of a layer). Hidden-dimension pruning
            is not implemented.
        start_step: optimizer step where the target starts rising from 0.
        end_step: optimizer step where the target reaches ``target_sparsity``.
        gate_lr: Adam learning rate of the gate logits (stepped by this callback; ``None``: leave
            the gates to the module's optimizer, learning rate and schedule).
        lambda_lr: Adam learning rate of the multipliers (``None``: ``gate_lr``). Large by default:
            a single gate's share of the expected size is tiny (SmolLM2: ~1.7e-7 per neuron), so the
            multipliers must grow to ~10³ before the constraint outweighs the task loss; with 1.0 a
            30-step SmolLM2 run did not reach its target (docs/benchmarks.md).
        droprate_init: initial drop rate of every gate (``log_alpha = log((1−d)/d)``).
        init: ``"taylor"`` (gates ordered by first-order importance on calibration batches at the
            start of training; see above) or ``"uniform"`` (every gate at ``droprate_init``; needs
            no ``compute_loss``). SmolLM2, 120 steps to 50%, one run each (docs/benchmarks.md):
            before dual restarts, taylor 118.85 held-out ppl against 380.66 for uniform (which
            overshot to 0.83 and never came back within tolerance); with them, 121.63 against 114.83.
        calibration_batches: training batches for ``init="taylor"``.
        init_spread: ``init="taylor"``: logit added to the most important unit of each kind (> 0).
        beta, limit_l, limit_r: hard-concrete temperature and stretch interval (γ, ζ).
        dual_restart: reset ``λ1`` (with its Adam moments) and the gates' momentum whenever ``λ1``
            pushes away from the target (see above); only when this callback steps the multipliers (``gate_lr`` set).
        tolerance: the target counts as met when the expected and the deterministic sparsity both
            lie within ``tolerance`` of ``target_sparsity``.
        freeze_on_target: once the target is met after ``end_step``, fix the gates (deterministic)
            and keep training the weights; ``False``: keep learning the gates until the end.
        export_dir: folder under the trainer's ``default_root_dir`` for the sliced model
            (``None``: no export).
        architecture: ``None`` (look up ``config.model_type``), a registered layout name
            (``llama``, ``gpt2``, ``t5``, ...) or a dict for
            :func:`~lightcook.ops.architectures.architecture_from_dict`.
        seed: base seed of the gate noise (noise of training forward ``i`` depends on ``(seed, i, rank)``).
        name: distinguishes two instances (checkpoint ``state_key``; config key ``compress.<name>``).

    Raises:
        ValueError: in ``__init__``, ``target_sparsity`` outside (0, 1), an unknown or empty
            ``units`` entry, ``end_step < start_step`` or a negative step, a non-positive learning
            rate, gate hyperparameters out of range, ``tolerance`` outside [0, 1), an empty
            ``export_dir`` or an unknown ``architecture`` name or malformed mapping (messages name
            ``compress.structured.<arg>``); in ``setup``, a model whose layout is unknown and no
            ``architecture`` given, or a unit kind the architecture does not have.
        TypeError: in ``setup``, a LightningModule with manual optimization.

    Example:
        >>> cb = StructuredPruningCallback(target_sparsity=0.5, units=["neurons", "ffn_layers"])
        >>> cb.config_key, cb.units
        ('compress.structured', ['neurons', 'ffn_layers'])
    """

    order = 20  # canonical order: after MoE splits (10), before N:M masks (30) and fake-quant wraps (40)

    def __init__(
        self,
        target_sparsity: float = 0.5,
        units: Sequence[str] = DEFAULT_UNITS,
        start_step: int = 0,
        end_step: int = 100,
        gate_lr: float | None = 0.5,
        lambda_lr: float | None = 50.0,
        droprate_init: float = 0.05,
        init: str = "taylor",
        calibration_batches: int = 8,
        init_spread: float = 4.0,
        beta: float = BETA,
        limit_l: float = LIMIT_L,
        limit_r: float = LIMIT_R,
        dual_restart: bool = True,
        tolerance: float = 0.01,
        freeze_on_target: bool = True,
        export_dir: str | None = "sliced",
        architecture: str | Mapping[str, Any] | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.config_key = f"compress.{name or 'structured'}"
        self.target_sparsity = self._check_target(target_sparsity)
        self.units = self._check_units(units)
        self.schedule = self._check_schedule(start_step, end_step)
        self.gate_lr = self._check_lr("gate_lr", gate_lr)
        self.lambda_lr = self._check_lr("lambda_lr", lambda_lr) or self.gate_lr
        check_gate_args(droprate_init, beta, limit_l, limit_r, key=self.config_key)
        self.gate_args = {
            "droprate_init": droprate_init,
            "beta": beta,
            "limit_l": limit_l,
            "limit_r": limit_r,
        }
        if init not in INITS:
            raise self._fail("init", f"must be one of {list(INITS)}, got {init!r}")
        if (
            not isinstance(calibration_batches, int)
            or isinstance(calibration_batches, bool)
            or calibration_batches < 1
        ):
            raise self._fail("calibration_batches", f"must be an integer >= 1, got {calibration_batches!r}")
        if not isinstance(init_spread, int | float) or not init_spread > 0:
            raise self._fail("init_spread", f"must be > 0, got {init_spread!r}")
        self.init, self.calibration_batches, self.init_spread = init, calibration_batches, float(init_spread)
        if not 0 <= tolerance < 1:
            raise self._fail("tolerance", f"must lie in [0, 1), got {tolerance}")
        if export_dir is not None and not str(export_dir).strip():
            raise self._fail("export_dir", "must be a folder name, or null for no export")
        self.tolerance, self.freeze_on_target = tolerance, freeze_on_target
        self.dual_restart = bool(dual_restart)
        self.export_dir, self.seed = export_dir, seed
        self.architecture_spec = architecture  # as given (recorded in the export)
        self.architecture = check_architecture_arg(architecture, f"{self.config_key}.architecture")
        self.state = {
            "steps": 0,
            "phase": SEARCH,
            "frozen_at": None,
            "initialized": init == "uniform",
            "dual_restarts": 0,
        }
        self.summary: dict[str, Any] = {}
        self._gates: GateSet | None = None
        self._arch: Architecture | None = None
        self._saved_step: Any = None

    # ------------------------------------------------------------------ argument checks

    def _fail(self, arg: str, message: str) -> ValueError:
        return ValueError(f"{self.config_key}.{arg}: {message}")

    def _check_target(self, target: float) -> float:
        if not isinstance(target, int | float) or not 0 < target < 1:
            raise self._fail(
                "target_sparsity", f"must lie strictly between 0 and 1 (fraction removed), got {target!r}"
            )
        return float(target)

    def _check_units(self, units: Sequence[str]) -> list[str]:
        units = [units] if isinstance(units, str) else list(units)
        allowed = sorted(UNIT_KINDS)
        if not units:
            raise self._fail("units", f"choose at least one of {allowed}")
        for unit in units:
            if unit == "hidden":
                raise self._fail(
                    "units", f"'hidden' (hidden-dimension pruning) is not implemented; allowed: {allowed}"
                )
            if unit not in UNIT_KINDS:
                raise self._fail("units", f"unknown unit {unit!r}; allowed: {allowed}")
        return list(dict.fromkeys(units))

    def _check_schedule(self, start_step: int, end_step: int) -> StepSchedule:
        try:
            return StepSchedule(int(start_step), int(end_step))
        except ValueError as err:
            arg = "start_step" if "start_step must" in str(err) else "end_step"
            raise self._fail(arg, str(err)) from err

    def _check_lr(self, arg: str, lr: float | None) -> float | None:
        if lr is not None and not lr > 0:
            raise self._fail(arg, f"must be > 0, or null, got {lr!r}")
        return lr

    # ------------------------------------------------------------------ setup: gates

    @property
    def gates(self) -> GateSet | None:
        """The gate set attached to the model (after ``setup``)."""
        return self._gates

    @override
    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise TypeError(
                f"{self.config_key}: manual optimization is not supported (the size penalty is added to the "
                "loss that training_step returns)"
            )
        if self.init == "taylor" and not callable(getattr(pl_module, "compute_loss", None)):
            raise TypeError(
                f"{self.config_key}.init='taylor': {type(pl_module).__name__} has no "
                "compute_loss(batch) -> (loss, outputs) to score the gates with"
            )
        model = target_model(pl_module)
        arch = get_architecture(model, self.architecture, key=f"{self.config_key}.architecture")
        missing = [u for u in self.units if u not in arch.units]
        if missing:
            raise self._fail(
                "units",
                f"{missing} not available for architecture {arch.name!r}; allowed here: {list(arch.units)}",
            )
        blocks = resolve_blocks(model, arch)
        self._gates = attach_gates(
            model,
            blocks,
            self.units,
            layer_parameter_count(model, arch),
            GATES_ATTRIBUTE,
            seed=self.seed,
            **self.gate_args,
        )
        self._arch = arch

    @override
    def export_options(self) -> dict[str, Any]:
        spec = self.architecture_spec
        return {"architecture": spec} if isinstance(spec, str | Mapping) else {}

    # ------------------------------------------------------------------ fit: optimizer, wrapper

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._ensure_hooks(pl_module)
        gates = self._gates
        gates.rank = trainer.global_rank
        if self.gate_lr is not None:
            self._take_gates_from_optimizers(trainer)
        self._wrap(pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.state["initialized"]:
            return
        if trainer.global_step == 0:  # a resumed run has its gates from the checkpoint
            self._gates.rank_init_(self.taylor_scores(trainer, pl_module), self.init_spread)
        self.state["initialized"] = True

    def taylor_scores(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """``|Σ ∂loss/∂z|`` per gate at ``z = 1`` over ``calibration_batches`` training batches
        (eval mode, summed over ranks, global RNG untouched); the weights get no gradient."""
        loader = first_loader(trainer.train_dataloader)
        if loader is None:
            raise RuntimeError(
                f"{self.config_key}.init='taylor' needs training batches; the trainer has none"
            )
        totals = {
            kind: torch.zeros_like(g.log_alpha, dtype=torch.float64) for kind, g in self._gates.gates.items()
        }
        seen = 0
        with (
            torch.random.fork_rng(devices=[]),
            eval_mode(pl_module),
            trainer.precision_plugin.forward_context(),
            self._gates.probe() as values,
        ):
            torch.manual_seed(0)  # the sampler's shuffle: the same batches on a rerun
            kinds = list(values)
            for batch in itertools.islice(calibration_source(loader), self.calibration_batches):
                loss, _ = pl_module.compute_loss(trainer.strategy.batch_to_device(batch))
                grads = torch.autograd.grad(loss, [values[k] for k in kinds], allow_unused=True)
                for kind, grad in zip(kinds, grads):
                    if grad is not None:
                        totals[kind] += grad.double()
                seen += 1
        if not seen:
            raise RuntimeError(f"{self.config_key}.init='taylor': the training dataloader is empty")
        return {kind: all_reduce_(total, trainer).abs() for kind, total in totals.items()}

    def _ensure_hooks(self, pl_module: LightningModule) -> None:
        """Re-hook the gates when a later callback replaced a gated projection (e.g. a fake-quant
        wrapper at canonical order 40): the gates must act on the module that actually runs."""
        if self._gates is None:
            return
        model = target_model(pl_module)
        if self._gates.unhooked_outputs(model):
            self._gates.install_hooks(model)

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
        ids = {id(p) for p in self._gates.gate_parameters() + self._gates.lambda_parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]

    def _wrap(self, pl_module: LightningModule) -> None:
        current = pl_module.__dict__.get("training_step")
        if getattr(current, "_structured_owner", None) is self:
            return
        inner = pl_module.training_step  # the module's method, or another callback's wrapper

        def training_step(batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
            return self._with_penalty(pl_module, inner(batch, batch_idx, *args, **kwargs), batch)

        training_step._structured_owner = self  # type: ignore[attr-defined]
        self._saved_step = current
        pl_module.training_step = training_step

    def _unwrap(self, pl_module: LightningModule) -> None:
        if getattr(pl_module.__dict__.get("training_step"), "_structured_owner", None) is not self:
            return
        if self._saved_step is None:
            del pl_module.training_step
        else:
            pl_module.training_step = self._saved_step
        self._saved_step = None

    # ------------------------------------------------------------------ the penalty

    def target_at(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps (linear warm-up from 0)."""
        return self.target_sparsity * self.schedule.progress(step)

    def expected_sparsity(self) -> Tensor:
        """``1 − E[size] / dense size`` under ``P(z ≠ 0)``; differentiable in the gate logits."""
        return 1.0 - self._gates.expected_size() / self._gates.layer_params

    def deterministic_sparsity(self) -> float:
        """Sparsity of the layers after slicing with the deterministic gates."""
        return 1.0 - self._gates.deterministic_size() / self._gates.layer_params

    def _with_penalty(self, pl_module: LightningModule, output: Any, batch: Any) -> Any:
        loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor):  # the step skipped this batch
            return output
        size = _batch_size(batch)
        frozen = self.state["phase"] == FIXED
        penalty = loss.new_zeros(()) if frozen else self._lagrangian(pl_module, size)
        self._log(pl_module, size, penalty)
        loss = loss + penalty
        return {**output, "loss": loss} if isinstance(output, Mapping) else loss

    def _lagrangian(self, pl_module: LightningModule, size: int | None) -> Tensor:
        gates = self._gates
        expected = self.expected_sparsity().float()
        target = self.target_at(self.state["steps"])
        gap = expected - target
        penalty = reverse_grad(gates.lambda_1) * gap + reverse_grad(gates.lambda_2) * gap**2
        pl_module.log("compress/expected_sparsity", expected.detach(), prog_bar=True, batch_size=size)
        pl_module.log("compress/target_sparsity", target, batch_size=size)
        return penalty

    def _log(self, pl_module: LightningModule, size: int | None, penalty: Tensor) -> None:
        gates = self._gates
        pl_module.log("compress/sparsity", self.deterministic_sparsity(), batch_size=size)
        pl_module.log("compress/lagrangian", penalty.detach(), batch_size=size)
        pl_module.log("compress/lambda_1", gates.lambda_1.detach(), batch_size=size)
        pl_module.log("compress/lambda_2", gates.lambda_2.detach(), batch_size=size)
        pl_module.log("compress/phase", float(self.state["phase"] == FIXED), batch_size=size)

    # ------------------------------------------------------------------ after each optimizer step

    @override
    def after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stepping = self.gate_lr is not None and self.state["phase"] == SEARCH
        if stepping:
            self._gates.step_(self.gate_lr, self.lambda_lr)
        self.state["steps"] += 1
        if stepping and self.dual_restart:
            self._restart_if_pushing_away()
        if self.state["phase"] == SEARCH and self.freeze_on_target and self.target_met():
            self.freeze()

    def _restart_if_pushing_away(self) -> None:
        with torch.no_grad():
            gap = float(self.expected_sparsity()) - self.target_at(self.state["steps"])
        if float(self._gates.lambda_1.detach()) * gap < 0:
            self._gates.restart_lambda_1_()
            self.state["dual_restarts"] += 1

    def target_met(self) -> bool:
        """Whether the schedule has ended and both the expected sparsity (the Lagrangian has
        converged) and the deterministic gates' sparsity lie within ``tolerance`` of the target."""
        if self.state["steps"] < (self.schedule.end_step or 0):
            return False
        with torch.no_grad():
            expected = float(self.expected_sparsity())
        return self._on_target(expected) and self._on_target(self.deterministic_sparsity())

    def _on_target(self, sparsity: float) -> bool:
        return abs(sparsity - self.target_sparsity) <= self.tolerance + 1e-12

    def freeze(self) -> None:
        """Fix the gates at their deterministic values for the rest of training."""
        self._gates.frozen.fill_(True)
        self._gates.zero_grad(set_to_none=True)
        self.state["phase"] = FIXED
        self.state["frozen_at"] = self.state["steps"]

    @override
    def on_before_zero_grad(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.gate_lr is not None and self._gates is not None:
            self._gates.zero_grad(set_to_none=True)  # they are not in the module's optimizer

    # ------------------------------------------------------------------ end: export

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap(pl_module)
        self.summary = self._summary()
        if self.export_dir and trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.export_dir
            self.export(pl_module, path)
            self.exports["structured"] = str(path)

    def _summary(self) -> dict[str, Any]:
        info = gate_summary(self._gates)
        info.update(
            target_sparsity=self.target_sparsity,
            sparsity=round(self.deterministic_sparsity(), 6),
            target_met=self._on_target(self.deterministic_sparsity()),
            frozen_at_step=self.state["frozen_at"],
            steps=self.state["steps"],
        )
        return info

    def export(self, pl_module: LightningModule, path: str | Path) -> nn.Module:
        """Slice a copy of the gated model (deterministic gates folded in) and save it to ``path``.

        Returns the sliced copy; the live model keeps its gates.
        """
        model = target_model(pl_module)
        plan = plan_from_gates(self._gates)
        self._gates.remove_hooks()  # hooks must not be deep-copied (their closures point here)
        try:
            sliced = copy.deepcopy(model)
        finally:
            self._gates.install_hooks(model)
        sliced = slice_model(sliced, plan, self._arch)
        record = self.architecture_spec if isinstance(self.architecture_spec, str | Mapping) else self._arch
        save_sliced(sliced, path, record, extra={"pruning": self.summary or self._summary()})
        return sliced

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._unwrap(pl_module)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return int(batch["input_ids"].shape[0])
    return None


__all__ = ["StructuredPruningCallback"]
