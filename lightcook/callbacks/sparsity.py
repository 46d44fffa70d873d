"""N:M (2:4) and unstructured weight sparsity, enforced through training: :class:`SparsityCallback`.

Every targeted Linear gets a ``weight_mask`` bool buffer (in the model's state dict, so a resumed run
continues with the same masks). Masks are (re)computed at the start of a training batch when the
schedule says so, from magnitude or Wanda scores; after every optimizer step the masked weights are
zeroed again. With SR-STE the dense weights keep learning and the forward pass sees ``w * mask``
through a parametrization, folded into the weight when fitting ends. N:M groups run along the input
dimension: dim 1 of ``nn.Linear.weight`` ``(out, in)``, dim 0 of GPT-2's ``Conv1D.weight`` ``(in, out)``.

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
import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize
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
from lightcook.ops.sparsity import (
    MAX_TRANSPOSABLE_M,
    InputNormAccumulator,
    global_unstructured_masks,
    nm_mask,
    nm_mask_transposable,
    ramp_mask,
    sr_ste,
    unstructured_mask,
    wanda_scores,
)

MASK = "weight_mask"
MODES = ("nm", "unstructured")
PATTERNS = ("1d", "2d")
SCOPES = ("layer", "global")
CRITERIA = ("magnitude", "wanda")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_EXPORT_M = 16  # packed position codes hold at most 4 bits


# --------------------------------------------------------------------------- weight layout helpers


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's GPT-2 ``Conv1D`` (also when parametrized), whose weight is ``(in, out)``."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def dense_weight(module: nn.Module) -> Tensor:
    """The trainable weight as stored (the unmasked original when SR-STE parametrizes it)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def as_out_in(tensor: Tensor, module: nn.Module) -> Tensor:
    """View a weight-shaped tensor as ``(out, in)`` (transposes ``Conv1D`` layouts)."""
    return tensor.T if is_conv1d(module) else tensor


class _SRSTEMask(nn.Module):
    """Parametrization ``weight -> sr_ste(weight, owner.weight_mask, decay)``.

    The owner is kept outside the module registry (no recursion in ``modules()``/``state_dict``)
    and the mask is looked up on every call, so ``.to(device)`` and checkpoint loads stay in sync.
    """

    def __init__(self, owner: nn.Module, decay: float) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        self.decay = decay

    @override
    def forward(self, weight: Tensor) -> Tensor:
        return sr_ste(weight, getattr(self._owner, MASK), self.decay)


# --------------------------------------------------------------------------- the callback


class SparsityCallback(CompressionCallback):
    """Prune targeted Linear weights to N:M (or an unstructured fraction) and keep them pruned.

    Masks are computed from ``start_step`` on (the step count is ``trainer.global_step`` at the
    start of a batch). With ``end_step`` the pruned share of every layer ramps linearly from 0 at
    ``start_step`` to the full N:M pattern at ``end_step``, updated every ``ramp_every`` steps;
    without it the full pattern is applied at once. ``recompute_every`` re-scores the masks
    periodically afterwards (useful with SR-STE, where pruned weights keep learning). After every
    optimizer step (all optimizers, gradient accumulation, manual optimization, AMP) masked weights
    are exactly zero; with SR-STE the effective weight ``module.weight`` is.

    Args:
        mode: ``"nm"`` (``n`` kept of every ``m`` inputs) or ``"unstructured"`` (drop ``sparsity``).
        n: kept weights per group (mode ``nm``).
        m: group size along the input dimension (mode ``nm``).
        pattern: ``"1d"`` (groups along inputs) or ``"2d"`` (transposable: every ``m x m`` block is
            N:M along rows and columns, so the backward pass can be sparse too; ``m <= 4``).
        sparsity: fraction of weights to drop (mode ``unstructured`` only; default 0.5).
        scope: ``"layer"`` (each layer loses ``sparsity``) or ``"global"`` (one threshold over all
            targeted layers); mode ``unstructured`` only.
        criterion: ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W| * ||X||``, input norms gathered
            with forward hooks over ``calibration_batches`` training batches, summed over ranks).
        calibration_batches: batches per Wanda calibration (one calibration per mask update).
        start_step: optimizer step at which the first mask is computed.
        end_step: end of the gradual ramp (``None``: one-shot at ``start_step``).
        ramp_every: steps between mask updates during the ramp.
        recompute_every: after the ramp, recompute masks every this many steps (0: never).
        sr_ste_decay: SR-STE decay of pruned weights (``None``: hard masking, weights zeroed).
        export_dir: folder for the packed export at fit end, relative to ``trainer.default_root_dir``
            (``None``: no export; mode ``nm`` only; written by rank 0 once the ramp is complete).
        export_dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``None`` (keep the model's).
        targets, exclude, name: see :class:`~lightcook.callbacks.base.CompressionCallback`;
            ``name`` also sets the config key used in errors (``compress.<name>``).

    Raises:
        ValueError: in ``__init__``, an argument outside its allowed values (the message names
            ``compress.<name>.<arg>`` and lists them); in ``setup``, a target pattern matching no
            Linear, a targeted layer whose input (2-D pattern: also output) features are not
            divisible by ``m``, or a layer another SparsityCallback already prunes.
        RuntimeError: criterion ``wanda`` with no training batches to calibrate on.

    Example:
        >>> cb = SparsityCallback(n=2, m=4, criterion="wanda", start_step=10, end_step=50)
        >>> cb.config_key, cb.state["masks_computed"]
        ('compress.prune', False)
    """

    order = 30  # canonical order: after MoE splits (10) and gates (20), before fake-quant wraps (40)

    def __init__(
        self,
        mode: str = "nm",
        n: int = 2,
        m: int = 4,
        pattern: str = "1d",
        sparsity: float | None = None,
        scope: str = "layer",
        criterion: str = "magnitude",
        calibration_batches: int = 8,
        start_step: int = 0,
        end_step: int | None = None,
        ramp_every: int = 1,
        recompute_every: int = 0,
        sr_ste_decay: float | None = None,
        export_dir: str | None = None,
        export_dtype: str | None = None,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, name=name)
        self.config_key = f"compress.{name or 'prune'}"
        self.mode, self.n, self.m, self.pattern = mode, n, m, pattern
        self.sparsity = 0.5 if sparsity is None and mode == "unstructured" else sparsity
        self.scope, self.criterion, self.calibration_batches = scope, criterion, calibration_batches
        self.start_step, self.end_step, self.ramp_every = start_step, end_step, ramp_every
        self.recompute_every, self.sr_ste_decay = recompute_every, sr_ste_decay
        self.export_dir, self.export_dtype = export_dir, export_dtype
        self._check_choices()
        self._check_pattern_args(sparsity)
        self._check_schedule_args()
        self._check_export_args()
        self.schedule = StepSchedule(start_step, end_step)
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

    # ------------------------------------------------------------------ argument checks

    def _fail(self, arg: str, message: str) -> ValueError:
        return ValueError(f"{self.config_key}.{arg}: {message}")

    def _check_choices(self) -> None:
        for arg, allowed in (
            ("mode", MODES),
            ("pattern", PATTERNS),
            ("scope", SCOPES),
            ("criterion", CRITERIA),
        ):
            if getattr(self, arg) not in allowed:
                raise self._fail(arg, f"got {getattr(self, arg)!r}, allowed: {', '.join(allowed)}")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise self._fail(
                "calibration_batches", f"must be an integer >= 1, got {self.calibration_batches!r}"
            )

    def _check_pattern_args(self, sparsity: float | None) -> None:
        if self.mode == "unstructured":
            if not 0.0 <= self.sparsity < 1.0:
                raise self._fail("sparsity", f"must lie in [0, 1), got {self.sparsity}")
            if self.pattern != "1d":
                raise self._fail("pattern", "'2d' (transposable N:M) needs mode='nm'; allowed here: 1d")
            return
        if sparsity is not None:
            raise self._fail(
                "sparsity", f"applies to mode='unstructured' only; N:M drops 1 - n/m (got {sparsity})"
            )
        if self.scope != "layer":
            raise self._fail(
                "scope", "N:M groups are local; 'global' needs mode='unstructured'; allowed: layer"
            )
        if not (isinstance(self.n, int) and isinstance(self.m, int) and self.m >= 2 and 1 <= self.n < self.m):
            raise self._fail("n", f"N:M needs integers 1 <= n < m, got n={self.n}, m={self.m}")
        if self.pattern == "2d" and self.m > MAX_TRANSPOSABLE_M:
            raise self._fail("m", f"pattern '2d' supports m <= {MAX_TRANSPOSABLE_M}, got m={self.m}")

    def _check_schedule_args(self) -> None:
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise self._fail("start_step", f"must be an integer >= 0, got {self.start_step!r}")
        if self.end_step is not None and (
            not isinstance(self.end_step, int) or self.end_step < self.start_step
        ):
            raise self._fail(
                "end_step",
                f"must be null or an integer >= start_step ({self.start_step}), got {self.end_step!r}",
            )
        if not isinstance(self.ramp_every, int) or self.ramp_every < 1:
            raise self._fail("ramp_every", f"must be an integer >= 1, got {self.ramp_every!r}")
        if not isinstance(self.recompute_every, int) or self.recompute_every < 0:
            raise self._fail(
                "recompute_every", f"must be an integer >= 0 (0: never), got {self.recompute_every!r}"
            )
        if self.sr_ste_decay is not None and not self.sr_ste_decay >= 0:
            raise self._fail("sr_ste_decay", f"must be null (off) or >= 0, got {self.sr_ste_decay}")

    def _check_export_args(self) -> None:
        if self.export_dtype is not None and self.export_dtype not in EXPORT_DTYPES:
            raise self._fail(
                "export_dtype", f"got {self.export_dtype!r}, allowed: null, {', '.join(EXPORT_DTYPES)}"
            )
        if self.export_dir is None:
            return
        if self.mode != "nm":
            raise self._fail(
                "export_dir", "the packed export stores N:M layers; set it to null for mode='unstructured'"
            )
        if self.m > _MAX_EXPORT_M:
            raise self._fail(
                "export_dir", f"packed export supports m <= {_MAX_EXPORT_M}, got m={self.m}; set it to null"
            )

    # ------------------------------------------------------------------ structure

    @override
    def prepare_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        selected = self.select(pl_module)
        self._names, self._root = list(selected), target_model(pl_module)
        for name, module in selected.items():
            self._check_shape(name, module)
            self._claim(name, module)
            if MASK not in module._buffers:
                module.register_buffer(MASK, torch.ones_like(dense_weight(module), dtype=torch.bool))
        self._attach_sr_ste()

    @override
    def export_options(self) -> dict[str, Any]:
        return {"nm": (self.n, self.m)} if self.mode == "nm" else {}

    @override
    def check_with(self, others: Sequence[CompressionCallback], model: nn.Module) -> None:
        from lightcook.callbacks.moefication import MoEficationCallback
        from lightcook.callbacks.quantization import QuantizationCallback
        from lightcook.callbacks.structured_pruning import StructuredPruningCallback

        for other in others:
            if isinstance(other, QuantizationCallback) and self.sr_ste_decay is not None:
                raise self.conflict(
                    other,
                    "SR-STE (sr_ste_decay) parametrizes the Linear weight, and fake-quant replaces the Linear, "
                    "so SR-STE would silently do nothing; use hard masks (sr_ste_decay: null) with quantization",
                )
            if self.mode != "nm":
                continue
            if isinstance(other, MoEficationCallback) and self.start_step < other.split_step:
                raise self.conflict(
                    other,
                    f"N:M masks from step {self.start_step} would be scrambled by the expert split at step "
                    f"{other.split_step} (it permutes the down projection's input columns); set "
                    f"{self.config_key}.start_step >= {other.config_key}.split_step",
                )
            if isinstance(other, StructuredPruningCallback):
                self._check_slicing_keeps_groups(other, model)

    def _check_slicing_keeps_groups(self, structured: CompressionCallback, model: nn.Module) -> None:
        """Slicing must remove whole groups of ``m`` input columns, or the export loses the N:M pattern."""
        if "neurons" in structured.units:
            raise self.conflict(
                structured,
                "slicing single FFN neurons removes single input columns of the down projection and breaks "
                f"its {self.n}:{self.m} groups; drop 'neurons' from {structured.config_key}.units "
                "(heads and whole blocks are fine) or use mode: unstructured",
            )
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None
        )
        if "heads" in structured.units and head_dim and head_dim % self.m:
            raise self.conflict(
                structured,
                f"the head width {head_dim} is not a multiple of m={self.m}, so removing a head breaks the "
                f"output projection's {self.n}:{self.m} groups; drop 'heads' from {structured.config_key}.units",
            )

    def _check_shape(self, name: str, module: nn.Module) -> None:
        if self.mode != "nm":
            return
        out_f, in_f = as_out_in(dense_weight(module), module).shape
        hint = f"exclude it with {self.config_key}.exclude or choose another m"
        if in_f % self.m:
            raise self._fail("m", f"{name} has {in_f} input features, not divisible by m={self.m}; {hint}")
        if self.pattern == "2d" and out_f % self.m:
            raise self._fail(
                "m", f"{name} has {out_f} output features, not divisible by m={self.m} (pattern 2d); {hint}"
            )

    def _claim(self, name: str, module: nn.Module) -> None:
        """One sparsity callback per layer: a second one would share (and fight over) its mask."""
        owner = module.__dict__.get("_lightcook_sparsity_owner", self.config_key)
        if owner != self.config_key:
            raise ValueError(
                f"{self.config_key}.targets: {name} is already pruned by {owner}; give the two "
                f"callbacks disjoint targets ({self.config_key}.exclude) or select only one"
            )
        module._lightcook_sparsity_owner = self.config_key

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._attach_sr_ste()  # again, for a second fit after the first one folded it

    def _attach_sr_ste(self) -> None:
        """With SR-STE, parametrize every targeted weight so ``module.weight`` is ``w * mask``."""
        if self.sr_ste_decay is None:
            return
        for module in self.layers.values():
            if not parametrize.is_parametrized(module, "weight"):
                parametrize.register_parametrization(module, "weight", _SRSTEMask(module, self.sr_ste_decay))

    def _fold_sr_ste(self) -> None:
        """Replace every SR-STE parametrization by its value ``w * mask`` (same Parameter object)."""
        for module in self.layers.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    # ------------------------------------------------------------------ schedule

    def _due(self, step: int) -> tuple[str, float] | None:
        """The update due at ``step``: ``(key, ramp fraction)``; ``None`` before ``start_step``.

        Keys name step ranges, so a step count that jumps (several optimizers) still hits them.
        """
        if step < self.start_step:
            return None
        final_from = self.start_step if self.end_step is None else self.end_step
        if step < final_from:
            bucket = (step - self.start_step) // self.ramp_every
            return f"ramp:{bucket}", self.schedule.progress(self.start_step + bucket * self.ramp_every)
        bucket = (step - final_from) // self.recompute_every if self.recompute_every else 0
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
            RuntimeError: criterion ``wanda`` and no calibration batch.
        """
        norms = self._input_sq_norms(pl_module, trainer, batches) if self.criterion == "wanda" else {}
        scores = {name: self._score(mod, norms.get(name)) for name, mod in self.layers.items()}  # (out, in)
        final = self._final_masks(scores)
        for name, module in self.layers.items():
            mask = final[name] if fraction >= 1.0 else ramp_mask(scores[name], final[name], fraction)
            as_out_in(getattr(module, MASK), module).copy_(mask)
        self.apply_masks()

    def _score(self, module: nn.Module, sq_norm: Tensor | None) -> Tensor:
        weight = as_out_in(dense_weight(module).detach(), module)  # (out, in)
        return weight.abs().float() if sq_norm is None else wanda_scores(weight, sq_norm)

    def _final_masks(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.mode == "unstructured":
            if self.scope == "global":
                return global_unstructured_masks(scores, self.sparsity)
            return {name: unstructured_mask(s, self.sparsity) for name, s in scores.items()}
        select = nm_mask_transposable if self.pattern == "2d" else nm_mask
        return {name: select(s, self.n, self.m) for name, s in scores.items()}

    def apply_masks(self) -> None:
        """Zero every masked weight in place (no-op with SR-STE: the forward pass masks instead)."""
        if self.sr_ste_decay is not None:
            return
        with torch.no_grad():
            for module in self.layers.values():
                # w * mask: exact zeros for finite weights, ~6x faster on CPU than ops' apply_mask_
                # (masked_fill_ with ~mask), which matters as this runs after every optimizer step
                module.weight.mul_(getattr(module, MASK))

    def sparsity_now(self) -> float:
        """Fraction of targeted weights currently masked out."""
        masks = [getattr(module, MASK) for module in self.layers.values()]
        return 1.0 - sum(int(mk.sum()) for mk in masks) / max(1, sum(mk.numel() for mk in masks))

    @override
    def after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.state["masks_computed"]:
            self.apply_masks()

    # ------------------------------------------------------------------ Wanda calibration

    def _input_sq_norms(
        self, pl_module: LightningModule, trainer: Trainer | None, batches: Iterable | None
    ) -> dict[str, Tensor]:
        """Per-layer ``sum ||x_j||^2`` over the calibration batches, summed over ranks."""
        accs = {
            name: InputNormAccumulator(as_out_in(dense_weight(mod), mod).shape[1], dense_weight(mod).device)
            for name, mod in self.layers.items()
        }
        handles = [
            mod.register_forward_pre_hook(lambda _m, args, acc=accs[name]: acc.add(args[0]))
            for name, mod in self.layers.items()
        ]
        try:
            self._calibrate(pl_module, trainer, batches)
        finally:
            for handle in handles:
                handle.remove()
        for acc in accs.values():
            all_reduce_(acc.sum_sq, trainer)
        return {name: acc.sq_norm for name, acc in accs.items()}

    def _calibrate(
        self, pl_module: LightningModule, trainer: Trainer | None, batches: Iterable | None
    ) -> None:
        """Forward ``calibration_batches`` batches in eval mode, without touching the global RNG."""
        source = self._training_batches(trainer) if batches is None else batches
        context = trainer.precision_plugin.forward_context() if trainer else contextlib.nullcontext()
        seen = 0
        with torch.random.fork_rng(devices=[]), eval_mode(pl_module), context:
            torch.manual_seed(trainer.global_step if trainer else 0)  # same batches after a resume
            for batch in itertools.islice(source, self.calibration_batches):
                batch = (
                    trainer.strategy.batch_to_device(batch)
                    if trainer
                    else move_data_to_device(batch, pl_module.device)
                )
                pl_module(**batch) if isinstance(batch, Mapping) else pl_module(batch)
                seen += 1
        if not seen:
            raise RuntimeError(
                f"{self.config_key}.criterion='wanda': no calibration batch (empty dataloader)"
            )

    def _training_batches(self, trainer: Trainer | None) -> Iterable:
        loader = first_loader(trainer.train_dataloader) if trainer is not None else None
        if loader is None:
            raise RuntimeError(
                f"{self.config_key}.criterion='wanda' needs training batches to calibrate on; none "
                "available (outside Trainer.fit pass compute_masks(batches=...))"
            )
        return calibration_source(loader)

    # ------------------------------------------------------------------ fit end: fold, export

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fold_sr_ste()
        if self.export_dir is None or not trainer.is_global_zero:
            return
        if not self.complete:
            rank_zero_warn(
                f"{self.config_key}: the N:M ramp is not complete at step {trainer.global_step} "
                f"(end_step={self.end_step}); no export written"
            )
            return
        self.exports["sparse"] = str(self.export(trainer, pl_module))

    def export(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Write the packed N:M export to ``export_dir`` (relative to ``trainer.default_root_dir``)."""
        from lightcook.export.sparse import export_sparse

        path = Path(self.export_dir)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        dtype = EXPORT_DTYPES.get(self.export_dtype) if self.export_dtype else None
        return export_sparse(target_model(pl_module), path, self.n, self.m, dtype=dtype)
