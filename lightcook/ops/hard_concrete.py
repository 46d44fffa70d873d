"""Hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
Regularization") and a model-wide gate set that applies them inside the forward pass. Pure torch.

A gate ``z ∈ [0, 1]`` per unit is a stretched, clamped binary-concrete sample:
``s = sigmoid((log u − log(1−u) + log_alpha) / β)``, ``z = clamp(s·(ζ−γ) + γ, 0, 1)`` with
``u ~ U(0, 1)``. ``P(z ≠ 0) = sigmoid(log_alpha − β·log(−γ/ζ))`` is differentiable in ``log_alpha``,
so the expected L0 norm (and the expected parameter count) can be constrained during training.

Deterministic gates (eval, and after binarisation) follow CoFi (Xia et al. 2022): per unit kind the
number of kept units is ``round(Σ P(z ≠ 0))`` and the units with the largest ``log_alpha`` are kept
(:meth:`GateSet.deterministic` refines this so units of removed blocks do not count as kept), and so
is every unit whose Louizos estimate is exactly 1 (so a freshly gated model equals the dense one);
a kept unit's value is Louizos' test-time estimate ``clamp(sigmoid(log_alpha)·(ζ−γ)+γ, 0, 1)``,
floored by ``sigmoid(log_alpha)`` so it is never 0 (1 for ``log_alpha ≥ log((1−γ)/(ζ−1))``).

:class:`GateSet` holds one flat gate vector per unit kind (``heads``, ``neurons``,
``attention_layers``, ``ffn_layers``) for the blocks of :mod:`lightcook.ops.architectures`, as a
submodule of the model (so ``log_alpha`` is in its state dict) and applies them with hooks:
a forward pre-hook on each block's output projection multiplies the unit channels (head outputs
before ``o_proj``, intermediate activations before ``down_proj``) and a forward hook multiplies the
projection's output (the block's residual contribution, bias included) by the block gate. Nothing
is detached in training: the task loss reaches ``log_alpha``.

Example:
    >>> import torch
    >>> gate = HardConcreteGate(4, droprate_init=0.5)
    >>> z = gate.sample(torch.full((4,), 0.5))   # u = 0.5: the median sample
    >>> z.shape, bool(((z >= 0) & (z <= 1)).all())
    (torch.Size([4]), True)
    >>> gate.prob_nonzero().requires_grad
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.ops.architectures import (
    BLOCK_GATE,
    BLOCK_UNIT,
    UNIT_KINDS,
    Architecture,
    Block,
    check_architecture_arg,
    find_blocks,
    layer_parameter_count,
    linear_dims,
)
from lightcook.ops.config import TechniqueConfig, check_choice, check_int, check_number
from lightcook.ops.names import GATES

BLOCK_KINDS = tuple(BLOCK_GATE.values())  # ("attention_layers", "ffn_layers")

BETA = 2.0 / 3.0
LIMIT_L = -0.1  # γ: stretch below 0 so that z = 0 has positive probability
LIMIT_R = 1.1  # ζ: stretch above 1 so that z = 1 has positive probability
CLOSED_LOGIT = -30.0  # a gate closed by a one-shot prune: P(z≠0) ≈ 5e-13, its gradient vanishes
OPEN_MARGIN = 6.0  # a gate kept by a one-shot prune: log_alpha >= certain_on() + this, P(z≠0) > 0.9999
_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """A vector of ``n`` hard-concrete gates with learnable ``log_alpha`` (no weight decay).

    Args:
        n: number of gates.
        droprate_init: initial ``P(z = 0)``-like drop rate: ``log_alpha = log((1−d)/d)``.
        beta: temperature β of the concrete distribution.
        limit_l, limit_r: stretch interval (γ, ζ), ``γ < 0 < 1 < ζ``.

    Raises:
        ValueError: ``n < 1``, ``droprate_init`` outside (0, 1), ``beta <= 0`` or limits not
            ``γ < 0 < 1 < ζ``.
    """

    log_alpha: nn.Parameter

    def __init__(
        self,
        n: int,
        droprate_init: float = 0.01,
        beta: float = BETA,
        limit_l: float = LIMIT_L,
        limit_r: float = LIMIT_R,
    ) -> None:
        super().__init__()
        check_gate_args(droprate_init, beta, limit_l, limit_r)
        if n < 1:
            raise ValueError(f"a gate vector needs n >= 1 gates, got {n}")
        self.beta, self.limit_l, self.limit_r = beta, limit_l, limit_r
        init = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.full((n,), init))
        self.log_alpha._no_weight_decay = True  # type: ignore[attr-defined]  # read by the modules' configure_optimizers

    def prob_nonzero(self) -> Tensor:
        """``P(z ≠ 0)`` per gate, differentiable in ``log_alpha``; shape ``(n,)``."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.limit_l / self.limit_r))

    def sample(self, u: Tensor) -> Tensor:
        """Gates from uniform noise ``u`` of shape ``(n,)`` (reparameterised: gradients reach ``log_alpha``)."""
        u = u.clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def test_value(self) -> Tensor:
        """Louizos' test-time estimate, floored by ``sigmoid(log_alpha)`` (never 0); shape ``(n,)``."""
        s = torch.sigmoid(self.log_alpha)
        return torch.maximum((s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0), s)

    @torch.no_grad()
    def deterministic(self, keep: int | None = None, eligible: Tensor | None = None) -> Tensor:
        """Deterministic gates: the ``keep`` (default ``round(Σ P(z≠0))``) largest ``log_alpha`` among
        the ``eligible`` gates, plus every eligible gate whose test-time value is exactly 1, keep
        :meth:`test_value`; the rest are 0 (ties broken by index); shape ``(n,)``, detached."""
        if keep is None:
            keep = int(torch.round(self.prob_nonzero().sum()).item())
        ranking = self.log_alpha if eligible is None else self.log_alpha.masked_fill(~eligible, -torch.inf)
        order = torch.sort(ranking, descending=True, stable=True).indices
        if eligible is not None:
            keep = min(keep, int(eligible.sum()))
        mask = torch.zeros_like(self.log_alpha, dtype=torch.bool)
        mask[order[:keep]] = True
        certain = self.log_alpha >= self.certain_on()  # Louizos' estimate is exactly 1: always kept
        mask |= certain if eligible is None else certain & eligible
        return torch.where(mask, self.test_value(), torch.zeros_like(self.log_alpha))

    def certain_on(self) -> float:
        """``log_alpha`` above which Louizos' test-time estimate is exactly 1: ``log((1−γ)/(ζ−1))``."""
        return math.log((1 - self.limit_l) / (self.limit_r - 1))


def check_gate_args(droprate_init: float, beta: float, limit_l: float, limit_r: float, key: str = "") -> None:
    """Validate hard-concrete hyperparameters; errors read ``<key>.<field>: ...`` (``<field>: ...``
    without ``key``).

    Raises:
        ValueError: ``droprate_init`` outside (0, 1), ``beta <= 0``, or not ``limit_l < 0 < 1 < limit_r``.

    Example:
        >>> check_gate_args(0.5, 0.0, -0.1, 1.1)
        Traceback (most recent call last):
        ...
        ValueError: beta: must be > 0, got 0.0
    """
    prefix = f"{key}." if key else ""
    if not 0 < droprate_init < 1:
        raise ValueError(f"{prefix}droprate_init: must lie in (0, 1), got {droprate_init}")
    if not beta > 0:
        raise ValueError(f"{prefix}beta: must be > 0, got {beta}")
    if not (limit_l < 0 and limit_r > 1):
        raise ValueError(
            f"{prefix}limit_l: limit_l/limit_r must satisfy limit_l < 0 < 1 < limit_r, got ({limit_l}, {limit_r})"
        )


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


def reverse_grad(x: Tensor) -> Tensor:
    """Identity forward, negated gradient backward: a minimising optimizer then *ascends* on ``x``.

    Example:
        >>> lam = torch.zeros((), requires_grad=True)
        >>> (reverse_grad(lam) * 3.0).backward()
        >>> float(lam.grad)
        -3.0
    """
    return _ReverseGrad.apply(x)


class AdamMoments(nn.Module):
    """Adam moments of one parameter kept as buffers, so they travel in the model's state dict.

    Used to step the gates with their own learning rate without touching the module's optimizer
    (whose LR scheduler pairs each param group with a schedule).

    Example:
        >>> p = nn.Parameter(torch.zeros(3)); p.grad = torch.ones(3)
        >>> AdamMoments(p.shape).step_(p, lr=0.1)
        >>> [round(v, 4) for v in p.detach().tolist()]
        [-0.1, -0.1, -0.1]
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor

    def __init__(self, shape: torch.Size | tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("exp_avg", torch.zeros(shape))
        self.register_buffer("exp_avg_sq", torch.zeros(shape))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def step_(
        self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        """One Adam update of ``param`` from ``param.grad`` (no-op without a gradient)."""
        if param.grad is None:
            return
        grad = param.grad.to(self.exp_avg.dtype)
        self.steps += 1
        t = float(self.steps)
        self.exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        self.exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        denom = (self.exp_avg_sq / (1 - betas[1] ** t)).sqrt_().add_(eps)
        param.sub_((lr / (1 - betas[0] ** t)) * self.exp_avg / denom)

    @torch.no_grad()
    def reset_(self) -> None:
        """Forget the moments: the next step starts like the first one."""
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.steps.zero_()


# --------------------------------------------------------------------------- model-wide gates


@dataclass(frozen=True)
class GatedBlock:
    """Static facts about one gated block (rebuilt identically from the model; not in any state dict).

    Attributes:
        name: the block's module name; ``kind``: ``attention`` / ``ffn``; ``output``: its output projection.
        units, unit_width: units and output-projection input channels per unit.
        unit_params: parameters one unit owns (its channels in every projection).
        const_params: parameters that go only with the whole block (pre-norm, output bias).
        unit_offset: where the block's units start in the unit-kind gate vector (``None``: not gated).
        block_index: its index in the block-kind gate vector (``None``: not gated).
    """

    name: str
    kind: str
    output: str
    units: int
    unit_width: int
    unit_params: int
    const_params: int
    unit_offset: int | None
    block_index: int | None


def block_counts(block: Block) -> tuple[int, int]:
    """``(parameters per unit, parameters that go only with the whole block)`` of ``block``."""
    per_unit = 0
    for cut in block.cuts:
        n_in, n_out, bias = linear_dims(block.model.get_submodule(cut.module))
        k = cut.channels.shape[1]
        per_unit += k * (n_in + int(bias)) if cut.side == "out" else k * n_out
    fixed = sum(p.numel() for p in block.fixed_parameters())
    total = sum(p.numel() for p in block.parameters()) - fixed
    return per_unit, total - block.units * per_unit


class GateSet(nn.Module):
    """All hard-concrete gates of one model, applied inside its forward pass.

    Build with :func:`attach_gates`. State: one :class:`HardConcreteGate` per enabled unit kind, the
    Lagrange multipliers ``lambda_1``/``lambda_2`` (used by the pruning callback), a ``draws`` counter
    (the noise of training forward ``i`` is seeded by ``(seed, i, rank)``, so a resumed run samples
    exactly what an uninterrupted one would) and a ``frozen`` flag (deterministic gates in training too).

    Args:
        blocks: metadata of every gated block.
        sizes: gates per enabled unit kind.
        layer_params: parameters inside the model's layers (gated blocks + anything else there).
        seed: base seed of the gate noise.
        droprate_init, beta, limit_l, limit_r: see :class:`HardConcreteGate`.
    """

    draws: Tensor
    frozen: Tensor
    architecture: Architecture  # set by prepare_

    def __init__(
        self,
        blocks: list[GatedBlock],
        sizes: dict[str, int],
        layer_params: int,
        seed: int = 0,
        droprate_init: float = 0.01,
        beta: float = BETA,
        limit_l: float = LIMIT_L,
        limit_r: float = LIMIT_R,
    ) -> None:
        super().__init__()
        self.blocks = list(blocks)
        self.gates = nn.ModuleDict(
            {kind: HardConcreteGate(n, droprate_init, beta, limit_l, limit_r) for kind, n in sizes.items()}
        )
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self.moments = nn.ModuleDict({kind: AdamMoments((n,)) for kind, n in sizes.items()})
        self.moments["lambda_1"] = AdamMoments(())
        self.moments["lambda_2"] = AdamMoments(())
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.seed, self.rank = seed, 0
        gated = sum(b.units * b.unit_params + b.const_params for b in self.blocks)
        self.other_params = layer_params - gated  # never pruned (e.g. T5's relative position bias)
        self.layer_params = layer_params
        self._values: dict[str, Tensor] = {}
        self._probe: dict[str, Tensor] | None = None
        self._handles: list = []
        self._hooked: dict[str, nn.Module] = {}

    def _gate_map(self) -> Mapping[str, HardConcreteGate]:
        """``self.gates`` typed as the gates it holds (a view for the type checker, no copy)."""
        return cast("Mapping[str, HardConcreteGate]", self.gates)

    def _moment_map(self) -> Mapping[str, AdamMoments]:
        """``self.moments`` typed as the moments it holds (no copy)."""
        return cast("Mapping[str, AdamMoments]", self.moments)

    # ---------------------------------------------------------------- gate values

    def refresh(self) -> None:
        """Draw this forward's gates (training, not frozen) or take the deterministic ones."""
        if self._probe is not None:
            self._values = self._probe
        elif self.training and not bool(self.frozen):
            self._values = self._sample()
        else:
            self._values = self.deterministic()

    def _sample(self) -> dict[str, Tensor]:
        values = {}
        for i, (kind, gate) in enumerate(self._gate_map().items()):
            device = gate.log_alpha.device
            generator = torch.Generator(device=device)
            generator.manual_seed(((self.seed * 1_000_003 + int(self.draws)) * 64 + i) * 4099 + self.rank)
            u = torch.rand(gate.log_alpha.shape, generator=generator, device=device)
            values[kind] = gate.sample(u)
        self.draws += 1
        return values

    @torch.no_grad()
    def deterministic(self) -> dict[str, Tensor]:
        """Deterministic gate values per kind (see :meth:`HardConcreteGate.deterministic`).

        Block gates first (``round(Σ P)`` blocks per kind); then per unit kind the expected number
        of *effective* units ``round(Σ_i P_i · P_block(i))`` is kept, chosen among the units of
        blocks that stay, so the sliced size tracks the expected size.
        """
        values = {
            kind: gate.deterministic() for kind, gate in self._gate_map().items() if kind in BLOCK_KINDS
        }
        probs = {kind: gate.prob_nonzero() for kind, gate in self._gate_map().items()}
        for kind, gate in self._gate_map().items():
            if kind in BLOCK_KINDS:
                continue
            weight, eligible = self._unit_weights(kind, probs, values)
            keep = int(torch.round((probs[kind] * weight).sum()).item())
            values[kind] = gate.deterministic(keep, eligible)
        return values

    def _unit_weights(
        self, kind: str, probs: dict[str, Tensor], values: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Per unit of ``kind``: its block's ``P(z≠0)`` and whether the block stays."""
        weight = torch.ones_like(probs[kind])
        eligible = torch.ones_like(probs[kind], dtype=torch.bool)
        for block in self.blocks:
            block_kind = BLOCK_GATE[block.kind]
            if BLOCK_UNIT[block.kind] != kind or block.unit_offset is None or block.block_index is None:
                continue
            span = slice(block.unit_offset, block.unit_offset + block.units)
            weight[span] = probs[block_kind][block.block_index]
            eligible[span] = bool(values[block_kind][block.block_index] > 0)
        return weight, eligible

    def probabilities(self) -> dict[str, Tensor]:
        """``P(z ≠ 0)`` per kind, differentiable."""
        return {kind: gate.prob_nonzero() for kind, gate in self._gate_map().items()}

    def block_factors(
        self, block: GatedBlock, values: dict[str, Tensor]
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(unit gates (units,), block multiplier ())`` of ``block`` from per-kind ``values``.

        The block multiplier is the block gate times 1[any unit open], so a block whose units are
        all closed contributes nothing at all (not even its output bias), like its sliced form.
        """
        units = None
        if block.unit_offset is not None:
            units = values[BLOCK_UNIT[block.kind]][block.unit_offset : block.unit_offset + block.units]
        scale = None
        if block.block_index is not None:
            scale = values[BLOCK_GATE[block.kind]][block.block_index]
        if units is not None:
            any_open = (units.detach() > 0).any().to(units.dtype)
            scale = any_open if scale is None else scale * any_open
        return units, scale

    def current(self) -> dict[str, Tensor]:
        """The gate values of the running forward pass (drawn on first use if none yet)."""
        if not self._values:
            self.refresh()
        return self._values

    @contextlib.contextmanager
    def probe(self) -> Iterator[dict[str, Tensor]]:
        """Inside the block every gate is 1 (the dense model) and a leaf tensor that requires grad:
        ``torch.autograd.grad(loss, list(values.values()))`` gives ``∂loss/∂z`` per unit at z = 1."""
        device = self._device()
        self._probe = {
            kind: torch.ones(gate.log_alpha.shape, device=device, requires_grad=True)
            for kind, gate in self._gate_map().items()
        }
        try:
            yield self._probe
        finally:
            self._probe, self._values = None, {}

    @torch.no_grad()
    def rank_init_(self, scores: dict[str, Tensor], spread: float) -> None:
        """Order each kind's ``log_alpha`` by ``scores`` (larger = more important): the least important
        unit keeps its current value, the most important gets ``+ spread``, evenly by rank in between
        (ties by index). Under the size penalty every gate moves at about the same Adam rate, so the
        least important units close first unless the task loss holds them open.

        Raises:
            ValueError: a kind that is not gated, or scores of the wrong shape.
        """
        for kind, score in scores.items():
            if kind not in self.gates:
                raise ValueError(f"no {kind!r} gates here; gated kinds: {list(self.gates)}")
            log_alpha = self._gate_map()[kind].log_alpha
            if score.shape != log_alpha.shape:
                raise ValueError(f"{kind}: {tuple(score.shape)} scores for {tuple(log_alpha.shape)} gates")
            n = log_alpha.numel()
            ranks = torch.empty(n, device=log_alpha.device)
            ranks[torch.sort(score.to(log_alpha.device), stable=True).indices] = torch.arange(
                n, dtype=ranks.dtype, device=ranks.device
            )
            log_alpha.add_(spread * ranks / max(1, n - 1))

    @torch.no_grad()
    def fix_units_(self, removed: Mapping[str, Tensor], margin: float = OPEN_MARGIN) -> None:
        """Close the ``removed`` units for good and open every other gate with certainty: per unit kind,
        ``log_alpha`` of a removed unit becomes :data:`CLOSED_LOGIT` (``P(z≠0)`` ≈ 0, deterministic
        gate 0, no gradient to reopen it) and every other gate of every kind, block gates included,
        at least ``certain_on() + margin`` (deterministic value exactly 1, ``P(z≠0)`` ≈ 1), so the
        expected and the deterministic size agree. Clears the gates' Adam moments.

        Raises:
            ValueError: a kind that is not gated, or a mask of the wrong shape.
        """
        for kind, mask in removed.items():
            if kind not in self.gates:
                raise ValueError(f"no {kind!r} gates here; gated kinds: {list(self.gates)}")
            if mask.shape != self._gate_map()[kind].log_alpha.shape:
                raise ValueError(
                    f"{kind}: a mask of shape {tuple(mask.shape)} for {self._gate_map()[kind].log_alpha.numel()} gates"
                )
        for kind, gate in self._gate_map().items():
            gate.log_alpha.clamp_(min=gate.certain_on() + margin)
            if kind in removed:
                gate.log_alpha.masked_fill_(removed[kind].to(gate.log_alpha.device), CLOSED_LOGIT)
            self._moment_map()[kind].reset_()
        self._values = {}

    def gate_parameters(self) -> list[nn.Parameter]:
        """The ``log_alpha`` of every kind."""
        return [gate.log_alpha for gate in self._gate_map().values()]

    def lambda_parameters(self) -> list[nn.Parameter]:
        """The Lagrange multipliers ``lambda_1``, ``lambda_2``."""
        return [self.lambda_1, self.lambda_2]

    @torch.no_grad()
    def step_(self, gate_lr: float, lambda_lr: float) -> None:
        """Adam step of the gates and multipliers from their gradients, then clear the gradients."""
        for kind, gate in self._gate_map().items():
            self._moment_map()[kind].step_(gate.log_alpha, gate_lr)
        self._moment_map()["lambda_1"].step_(self.lambda_1, lambda_lr)
        self._moment_map()["lambda_2"].step_(self.lambda_2, lambda_lr)
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restart_lambda_1_(self) -> None:
        """A dual restart: ``lambda_1`` to 0 with its Adam moments forgotten, and the gate logits'
        momentum (first moment) dropped, so it cannot carry them on past the target; their second
        moment stays, so the next gate steps are small rather than a full ``lr`` each."""
        self.lambda_1.zero_()
        self._moment_map()["lambda_1"].reset_()
        for kind in self.gates:
            self._moment_map()[kind].exp_avg.zero_()

    # ---------------------------------------------------------------- sizes

    def expected_size(self, probs: dict[str, Tensor] | None = None) -> Tensor:
        """Expected parameter count of the model's layers (float64 scalar).

        ``E = other + Σ_blocks p_block · ((1 − Π_i(1 − p_i)) · const + unit_params · Σ_i p_i)`` with
        ``p`` = ``probs`` (default ``P(z ≠ 0)``). For 0/1 ``probs`` it is exactly the parameter count of
        the sliced model's layers.
        """
        probs = self.probabilities() if probs is None else probs
        total = torch.zeros((), dtype=torch.float64, device=self._device())
        for block in self.blocks:
            units, scale = self._block_probs(block, probs)
            any_open: Tensor | float
            open_units: Tensor | float
            if units is None:
                any_open, open_units = 1.0, float(block.units)
            else:
                any_open = 1 - torch.exp(torch.log1p(-units.clamp(max=1.0 - 1e-12)).sum())
                any_open = torch.where((units >= 1).any(), torch.ones_like(any_open), any_open)
                open_units = units.sum()
            total = total + scale * (any_open * block.const_params + block.unit_params * open_units)
        return total + self.other_params

    def _block_probs(
        self, block: GatedBlock, probs: dict[str, Tensor]
    ) -> tuple[Tensor | None, Tensor | float]:
        units = None
        if block.unit_offset is not None:
            units = probs[BLOCK_UNIT[block.kind]][
                block.unit_offset : block.unit_offset + block.units
            ].double()
        scale: Tensor | float = 1.0
        if block.block_index is not None:
            scale = probs[BLOCK_GATE[block.kind]][block.block_index].double()
        return units, scale

    def deterministic_size(self) -> int:
        """Parameter count of the layers after slicing with the deterministic gates."""
        masks = {kind: (value > 0).double() for kind, value in self.deterministic().items()}
        return round(float(self.expected_size(masks)))

    def _device(self) -> torch.device:
        return self.lambda_1.device

    # ---------------------------------------------------------------- hooks

    def _unit_hook(self, block: GatedBlock) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            units, _ = self.block_factors(block, self.current())
            if units is None:
                return None
            x = args[0]  # (..., units * unit_width)
            return (x * units.repeat_interleave(block.unit_width).to(x.dtype), *args[1:])

        return hook

    def _block_hook(self, block: GatedBlock) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
            _, scale = self.block_factors(block, self.current())
            return None if scale is None else output * scale.to(output.dtype)

        return hook

    def install_hooks(self, model: nn.Module) -> None:
        """Hook the gates into ``model``: a pre-hook on the model draws this forward's gates, hooks on
        each block's output projection apply them. Idempotent; call again after a projection was
        replaced (e.g. by a fake-quant wrapper) to hook the new module.

        Raises:
            ValueError: a gated output projection no longer exists (names it).
        """
        self.remove_hooks()
        self._handles.append(model.register_forward_pre_hook(lambda *_: self.refresh()))
        for block in self.blocks:
            try:
                output = model.get_submodule(block.output)
            except AttributeError as err:
                self.remove_hooks()
                raise ValueError(f"gated projection {block.output!r} no longer exists in the model") from err
            self._hooked[block.output] = output
            self._handles.append(output.register_forward_pre_hook(self._unit_hook(block)))
            self._handles.append(output.register_forward_hook(self._block_hook(block)))

    def unhooked_outputs(self, model: nn.Module) -> list[str]:
        """Output projections that were replaced after the hooks went in (their gates no longer apply)."""
        return [name for name, module in self._hooked.items() if model.get_submodule(name) is not module]

    def remove_hooks(self) -> None:
        """Remove every hook this gate set registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._values = {}  # the last forward's gates (non-leaf tensors: they would block deepcopy)


def attach_gates(
    model: nn.Module,
    blocks: list[Block],
    units: list[str] | tuple[str, ...],
    layer_params: int,
    attribute: str = "lightcook_gates",
    **gate_args: Any,
) -> GateSet:
    """Create a :class:`GateSet` for ``blocks``, register it as ``model.<attribute>`` and hook it in.

    Args:
        model: the network (its state dict then holds ``<attribute>.gates.<kind>.log_alpha``).
        blocks: from :func:`lightcook.ops.architectures.resolve_blocks`.
        units: enabled unit kinds among ``heads``, ``neurons``, ``attention_layers``, ``ffn_layers``.
        layer_params: parameters inside the layers (:func:`~lightcook.ops.architectures.layer_parameter_count`).
        attribute: submodule name of the gate set.
        gate_args: ``seed``, ``droprate_init``, ``beta``, ``limit_l``, ``limit_r`` for :class:`GateSet`.

    Raises:
        ValueError: ``model`` already has a gate set under ``attribute``, or no block carries an
            enabled unit kind.
    """
    if hasattr(model, attribute):
        raise ValueError(f"the model already has gates at {attribute!r} (structured pruning applied twice?)")
    gated, sizes = _gated_blocks(blocks, set(units))
    if not sizes:
        raise ValueError(f"no block of the model carries any of the unit kinds {list(units)}")
    gate_set = GateSet(gated, sizes, layer_params, **gate_args).train(model.training)
    model.add_module(attribute, gate_set)
    gate_set.install_hooks(model)
    return gate_set


def detach_gates(model: nn.Module, attribute: str = "lightcook_gates") -> GateSet | None:
    """Remove the gate set's hooks and the submodule; return it (``None`` when there was none)."""
    gate_set = getattr(model, attribute, None)
    if gate_set is None:
        return None
    gate_set.remove_hooks()
    delattr(model, attribute)
    return gate_set


def _gated_blocks(blocks: list[Block], enabled: set[str]) -> tuple[list[GatedBlock], dict[str, int]]:
    sizes: dict[str, int] = {}
    gated = []
    for block in blocks:
        unit_kind, block_kind = BLOCK_UNIT[block.kind], BLOCK_GATE[block.kind]
        unit_offset = block_index = None
        if unit_kind in enabled:
            unit_offset = sizes.get(unit_kind, 0)
            sizes[unit_kind] = unit_offset + block.units
        if block_kind in enabled:
            block_index = sizes.get(block_kind, 0)
            sizes[block_kind] = block_index + 1
        per_unit, const = block_counts(block)
        gated.append(
            GatedBlock(
                block.name,
                block.kind,
                block.output,
                block.units,
                block.unit_width,
                per_unit,
                const,
                unit_offset,
                block_index,
            )
        )
    return gated, sizes


# --------------------------------------------------------------------------- configuration and transforms

#: What structured pruning may remove by default: heads, FFN neurons and whole attention/FFN blocks.
DEFAULT_UNITS = ("heads", "neurons", "attention_layers", "ffn_layers")
#: Gate initialisations: every gate alike, ordered by first-order importance on calibration batches,
#: or a one-shot structured OBS prune to the target (removed units closed, kept projections refit).
INITS = ("uniform", "taylor", "obs")
#: How ``init="obs"`` spreads the removals: cheapest per parameter over all layers, or the same
#: fraction of every layer.
ALLOCATIONS = ("global", "uniform")


@dataclass(frozen=True)
class StructuredConfig(TechniqueConfig):
    """Structured pruning with hard-concrete gates and a Lagrangian size constraint (CoFi-style).

    Sparsity counts the parameters inside the transformer layers (everything but embeddings, LM
    head and final norms): ``1 − size / dense size``. Each field: default, meaning, allowed values.

    Raises:
        ValueError: a field outside its allowed values, ``<field>: ... allowed/got ...`` (the callback
            prefixes ``compress.structured.``).

    Example:
        >>> StructuredConfig(target_sparsity=0.3, units=["neurons"]).units
        ('neurons',)
        >>> StructuredConfig(units=["hidden"])
        Traceback (most recent call last):
        ...
        ValueError: units: 'hidden' (hidden-dimension pruning) is not implemented; allowed: attention_layers, ffn_layers, heads, neurons
    """

    SHAPE_FIELDS = ("units", "architecture")

    #: 0.5 — fraction of the layer parameters to remove, strictly between 0 and 1.
    target_sparsity: float = 0.5
    #: all four — what may be pruned, any of ``heads`` (a KV head with its query heads), ``neurons``
    #: (FFN intermediate neurons: gate/up rows and down columns together), ``attention_layers`` and
    #: ``ffn_layers`` (a whole attention / FFN block of a layer). Hidden-dimension pruning: not implemented.
    units: tuple[str, ...] = DEFAULT_UNITS
    #: 0 — optimizer step where the target starts rising from 0 (integer >= 0).
    start_step: int = 0
    #: 100 — optimizer step where the target reaches ``target_sparsity`` (integer >= ``start_step``).
    end_step: int = 100
    #: 0.5 — Adam learning rate of the gate logits, stepped by the callback (> 0); ``None``: the gates
    #: stay with the module's optimizer, learning rate and schedule.
    gate_lr: float | None = 0.5
    #: 50.0 — Adam learning rate of the multipliers (> 0; ``None``: ``gate_lr``). Large: a single gate's
    #: share of the expected size is tiny (SmolLM2: ~1.7e-7 per neuron), so the multipliers must grow to
    #: ~10³ before the constraint outweighs the task loss (docs/benchmarks.md).
    lambda_lr: float | None = 50.0
    #: 0.05 — initial drop rate of every gate, in (0, 1): ``log_alpha = log((1−d)/d)``.
    droprate_init: float = 0.05
    #: ``"taylor"`` — gate initialisation: ``taylor`` (ordered by ``|Σ ∂loss/∂z|`` on calibration
    #: batches at the start of training), ``uniform`` (every gate at ``droprate_init``) or ``obs``
    #: (at the start of training, a one-shot structured OBS prune to ``target_sparsity``: the units
    #: with the least reconstruction error of their output projection close, that projection's kept
    #: columns are refit by least squares; heads and/or neurons must be among ``units``).
    init: str = "taylor"
    #: 8 — training batches scored by ``init="taylor"`` / calibrated on by ``init="obs"`` (integer >= 1).
    calibration_batches: int = 8
    #: 0.01 — ``init="obs"``: damping of the input Hessians, a fraction of the mean diagonal (>= 0).
    percdamp: float = 0.01
    #: ``"uniform"`` — ``init="obs"``: ``uniform`` removes ``target_sparsity`` of each layer's parameters;
    #: ``global`` ranks every removal of every layer by its OBS error per parameter (ZipLM). On
    #: SmolLM2-135M at 25% one-shot: uniform 1.39x dense, global 6.45x (docs/benchmarks.md).
    allocation: str = "uniform"
    #: 4.0 — ``init="taylor"``: logit added to the most important unit of each kind (> 0).
    init_spread: float = 4.0
    #: 2/3 — hard-concrete temperature β (> 0).
    beta: float = BETA
    #: -0.1 — stretch interval lower end γ (< 0).
    limit_l: float = LIMIT_L
    #: 1.1 — stretch interval upper end ζ (> 1).
    limit_r: float = LIMIT_R
    #: True — reset ``λ1`` (with its Adam moments) and the gates' momentum whenever ``λ1`` pushes away
    #: from the target (only when the callback steps the multipliers, ``gate_lr`` set).
    dual_restart: bool = True
    #: 0.01 — the target counts as met when the expected and the deterministic sparsity both lie within
    #: this of ``target_sparsity``; in [0, 1).
    tolerance: float = 0.01
    #: True — once the target is met after ``end_step``, fix the gates and keep training the weights.
    freeze_on_target: bool = True
    #: None — the layout: ``None`` (by ``config.model_type``), a registered name (``llama``, ``gpt2``,
    #: ``t5``, ...) or a mapping for :func:`~lightcook.ops.architectures.architecture_from_dict`.
    architecture: str | Mapping[str, Any] | None = None
    #: 0 — base seed of the gate noise (training forward ``i`` draws from ``(seed, i, rank)``); >= 0.
    seed: int = 0

    def __post_init__(self) -> None:
        target = self.target_sparsity
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1:
            raise ValueError(
                f"target_sparsity: must lie strictly between 0 and 1 (fraction removed), got {target!r}"
            )
        object.__setattr__(self, "units", _check_units(self.units))
        check_int("start_step", self.start_step, 0)
        check_int("end_step", self.end_step)
        if self.end_step < self.start_step:
            raise ValueError(f"end_step: must be >= start_step ({self.start_step}), got {self.end_step}")
        for field in ("gate_lr", "lambda_lr"):
            value = getattr(self, field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise ValueError(f"{field}: must be > 0, or null, got {value!r}")
        check_gate_args(self.droprate_init, self.beta, self.limit_l, self.limit_r)
        check_choice("init", self.init, INITS)
        if self.init == "obs":
            self._check_obs()
        check_int("calibration_batches", self.calibration_batches, 1)
        check_number("percdamp", self.percdamp, 0)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_number("init_spread", self.init_spread, 0, open_low=True)
        for field in ("dual_restart", "freeze_on_target"):
            check_choice(field, getattr(self, field), (True, False))
        if (
            isinstance(self.tolerance, bool)
            or not isinstance(self.tolerance, int | float)
            or not 0 <= self.tolerance < 1
        ):
            raise ValueError(f"tolerance: must lie in [0, 1), got {self.tolerance!r}")
        check_architecture_arg(self.architecture, "architecture")
        check_int("seed", self.seed, 0)

    def _check_obs(self) -> None:
        count = self.calibration_batches
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(
                f"calibration_batches: init='obs' needs >= 1 training batch to calibrate on, got {count!r}"
            )
        if not set(self.units) & {"heads", "neurons"}:
            raise ValueError(
                f"units: init='obs' removes heads and neurons; add at least one of them, got {list(self.units)}"
            )

    @property
    def multiplier_lr(self) -> float | None:
        """The learning rate of the multipliers: ``lambda_lr``, else ``gate_lr``."""
        return self.lambda_lr if self.lambda_lr is not None else self.gate_lr

    def target_at(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps: 0 before ``start_step``, rising linearly
        to ``target_sparsity`` at ``end_step``.

        Example:
            >>> StructuredConfig(target_sparsity=0.6, start_step=10, end_step=20).target_at(15)
            0.3
        """
        if step < self.start_step:
            return 0.0
        if self.end_step == self.start_step:
            return self.target_sparsity
        progress = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return self.target_sparsity * progress


def _check_units(units: Any) -> tuple[str, ...]:
    units = [units] if isinstance(units, str) else list(units)
    allowed = ", ".join(sorted(UNIT_KINDS))
    if not units:
        raise ValueError(f"units: choose at least one; allowed: {allowed}")
    for unit in units:
        if unit == "hidden":
            raise ValueError(
                f"units: 'hidden' (hidden-dimension pruning) is not implemented; allowed: {allowed}"
            )
        if unit not in UNIT_KINDS:
            raise ValueError(f"units: unknown unit {unit!r}; allowed: {allowed}")
    return tuple(dict.fromkeys(units))


def prepare_(network: nn.Module, config: StructuredConfig, *, where: str = "") -> GateSet:
    """Gate ``network`` in place for structured pruning: one hard-concrete gate per unit and per block
    of ``config.units``, attached as ``network.lightcook_gates`` (:data:`~lightcook.ops.names.GATES`)
    and applied by hooks in the forward pass. The gated network equals the dense one in eval mode
    until the gates close; :func:`~lightcook.ops.slicing.slice_model` folds them away for inference.

    Args:
        network: a Hugging Face model (or one following a layout of :mod:`lightcook.ops.architectures`).
        config: the settings (units, layout, gate hyperparameters, seed).
        where: context appended to layout errors (where the network was found, how to point elsewhere).

    Returns:
        The :class:`GateSet` (its ``architecture`` attribute is the layout used).

    Raises:
        ValueError: unknown layout, a unit kind the layout lacks, or gates already attached
            (messages start with the field: ``architecture: ...``, ``units: ...``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> gates = prepare_(net, StructuredConfig(units=["heads", "neurons"]))
        >>> {k: tuple(g.log_alpha.shape) for k, g in net.lightcook_gates.gates.items()}
        {'heads': (4,), 'neurons': (128,)}
        >>> round(deterministic_sparsity(gates), 3), gates.architecture.name
        (0.0, 'llama')
    """
    arch, blocks = find_blocks(network, config.architecture, where=where)
    missing = [u for u in config.units if u not in arch.units]
    if missing:
        raise ValueError(
            f"units: {missing} not available for architecture {arch.name!r}; allowed here: {list(arch.units)}"
        )
    gates = attach_gates(
        network,
        blocks,
        config.units,
        layer_parameter_count(network, arch),
        GATES,
        seed=config.seed,
        droprate_init=config.droprate_init,
        beta=config.beta,
        limit_l=config.limit_l,
        limit_r=config.limit_r,
    )
    gates.architecture = arch
    return gates


def expected_sparsity(gates: GateSet) -> Tensor:
    """``1 − E[size] / dense size`` under ``P(z ≠ 0)``; differentiable in the gate logits (float64)."""
    return 1.0 - gates.expected_size() / gates.layer_params


def deterministic_sparsity(gates: GateSet) -> float:
    """Sparsity of the layers after slicing with the deterministic gates."""
    return 1.0 - gates.deterministic_size() / gates.layer_params


def lagrangian(gates: GateSet, target: float) -> tuple[Tensor, Tensor]:
    """The size penalty ``λ1·(ŝ − t) + λ2·(ŝ − t)²`` (float32 scalar) and ``ŝ``, the expected sparsity.

    The multipliers enter through :func:`reverse_grad`, so one minimising step descends on the gates
    and ascends on ``λ1``/``λ2``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        >>> gates = prepare_(net, StructuredConfig(units=["neurons"]))
        >>> penalty, expected = lagrangian(gates, 0.3)
        >>> float(penalty.detach()), bool(expected < 0.3)  # the multipliers start at 0
        (0.0, True)
    """
    expected = expected_sparsity(gates).float()
    gap = expected - target
    penalty = reverse_grad(gates.lambda_1) * gap + reverse_grad(gates.lambda_2) * gap**2
    return penalty, expected


def gate_gradients(
    gates: GateSet, loss_of: Callable[[Any], Tensor], batches: Iterable[Any]
) -> dict[str, Tensor]:
    """``Σ_batches ∂loss/∂z`` per gate kind at ``z = 1`` (the dense model), float64; the weights get no
    gradient. ``|·|`` of it (summed over ranks first) is the first-order importance that
    :meth:`GateSet.rank_init_` orders the gates by.

    Args:
        gates: the gate set of the network ``loss_of`` runs.
        loss_of: the task loss of one batch.
        batches: the calibration batches.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        >>> gates = prepare_(net, StructuredConfig(units=["neurons"]))
        >>> ids = torch.randint(0, 64, (2, 8))
        >>> grads = gate_gradients(gates, lambda b: net(input_ids=b, labels=b).loss, [ids])
        >>> grads["neurons"].shape, grads["neurons"].dtype
        (torch.Size([64]), torch.float64)
    """
    totals = {
        kind: torch.zeros_like(g.log_alpha, dtype=torch.float64) for kind, g in gates._gate_map().items()
    }
    with gates.probe() as values:
        kinds = list(values)
        for batch in batches:
            grads = torch.autograd.grad(loss_of(batch), [values[k] for k in kinds], allow_unused=True)
            for kind, grad in zip(kinds, grads):
                if grad is not None:
                    totals[kind] += grad.double()
    return totals
