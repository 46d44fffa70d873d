"""GPTQ: one-shot weight quantization of a Linear layer from its calibration Hessian, in pure torch.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, arXiv 2210.17323) quantizes a weight ``W`` (out, in) one input column at a
time and, after each column, moves the columns not yet quantized so that the layer's output on the
calibration inputs ``X`` changes as little as possible (the Optimal Brain Surgeon update under
``H = 2 XᵀX``). It works with the upper Cholesky factor ``U`` of ``H⁻¹`` (after dampening ``H``), in
column blocks whose updates to later blocks are applied lazily, once per block.

The grid is the one of :mod:`lightcook.ops.quant`: the scale and zero point of a group are what
:class:`~lightcook.ops.quant.AbsMaxQuantizer` computes from the group's weights, and after
:func:`gptq_` the absmax quantizer recomputes exactly the returned scale and zero point from the
updated weight, on which fake quantization is then the identity — so QAT starts from the GPTQ
result and the export writes the GPTQ codes. Two details make that exact rather than close:

- the element that sets a group's range (its absmax, or its min and max when asymmetric) is given
  the extreme code even if earlier updates moved it inward, so the group's range survives the sweep
  (``pin_range``; needed only by absmax, which recomputes its scale from the weights at every step);
- scales keep ``mantissa - bits`` significant bits (rounded down: a relative change below ``2**-15``
  in float32), so every ``(code - zero_point) * scale`` and the range recomputed from it are exact in
  floating point; rounding down keeps the range-setting elements at the end codes by themselves.

Act-order (``desc_act``) sweeps the columns in decreasing ``diag(H)`` but the groups stay the groups
of consecutive *original* columns, each with its own scale: the export needs no group index and
stores the weight in its own column order. With ``static_groups`` the group scales are computed from
the weights before the sweep; otherwise (GPTQ's default) when the sweep first reaches a column of
the group, from the group's weights as updated so far (see :func:`gptq_` for the default).

Dead input columns (``diag(H) == 0``: the input never carried signal) are rounded to nearest and
kept, not zeroed: nothing is known about them, so the dense weight is the best guess for inputs the
calibration did not see; their Hessian rows are zero, so they take no part in the updates.

The Hessian comes from the calibration pass (``lightcook.ops.calibrate``); this module only consumes it.

Example:
    >>> _ = torch.manual_seed(0)
    >>> x, w = torch.randn(256, 16), torch.randn(8, 16)
    >>> spec = QuantSpec(bits=4, granularity="group", group_size=8)
    >>> q = w.clone()
    >>> res = gptq_(q, 2 * x.T @ x, spec)
    >>> res.scale.shape, res.perm is None
    (torch.Size([8, 2, 1]), True)
    >>> bool(torch.equal(AbsMaxQuantizer(spec, q)(q), q))  # on the grid of the returned scales
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from lightcook.ops.config import check_choice, check_int, check_number
from lightcook.ops.names import MASK
from lightcook.ops.quant import (
    AbsMaxQuantizer,
    DynamicScalingQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    QuantLinear,
    QuantSpec,
    WeightQuantizer,
    fake_quant,
    group_view,
    scale_shape,
)

__all__ = ["GPTQResult", "gptq_", "gptq_layer_"]


@dataclass(frozen=True)
class GPTQResult:
    """What :func:`gptq_` chose besides the weights.

    Attributes:
        scale: float scales shaped :func:`~lightcook.ops.quant.scale_shape` (original column groups).
        zero_point: integer-valued float zero points, same shape (zeros when symmetric).
        perm: the order in which the input columns were quantized (act-order), or None (natural order).
    """

    scale: Tensor
    zero_point: Tensor
    perm: Tensor | None


# --------------------------------------------------------------------------- the grid of every group


def _exact_scale(scale: Tensor, bits: int) -> Tensor:
    """``scale`` rounded down to ``mantissa - bits`` significant bits: ``k * scale`` is then exact for
    ``|k| < 2**bits``, and the group's extremes still reach the end codes (the step is not larger)."""
    mantissa, exponent = torch.frexp(scale)
    significant = 1 - round(math.log2(torch.finfo(scale.dtype).eps))  # 24 for float32, 53 for float64
    keep = 2.0 ** (significant - bits)
    return torch.ldexp(torch.floor(mantissa * keep) / keep, exponent)


def _extremes(values: Tensor, symmetric: bool) -> Tensor:
    """int8 like ``values`` (rows, k): +1 where the code must be qmax, -1 where qmin, per row."""
    force = torch.zeros_like(values, dtype=torch.int8)
    if symmetric:
        idx = values.abs().argmax(1, keepdim=True)
        return force.scatter_add_(1, idx, torch.sign(values.gather(1, idx)).to(torch.int8))
    hi, lo = values.argmax(1, keepdim=True), values.argmin(1, keepdim=True)
    force.scatter_add_(1, hi, (values.gather(1, hi) > 0).to(torch.int8))
    return force.scatter_add_(1, lo, -(values.gather(1, lo) < 0).to(torch.int8))


class _Grid:
    """Scale, zero point and forced extreme codes of every group of original columns.

    ``keep`` (original column order) marks the weights that survive pruning: the others count as
    zero for the group's range and are quantized to zero.
    """

    def __init__(self, spec: QuantSpec, weight: Tensor, pin_range: bool, keep: Tensor | None = None) -> None:
        out_f, in_f = weight.shape
        self.spec, self.tensor, self.pin_range, self.keep = (
            spec,
            spec.granularity == "tensor",
            pin_range,
            keep,
        )
        self.width = spec.group_size if spec.granularity == "group" else in_f
        rows, groups = (1 if self.tensor else out_f), in_f // self.width
        self.scale = weight.new_ones(rows, groups)
        self.zero = weight.new_zeros(rows, groups)
        self.force = torch.zeros(out_f, in_f, dtype=torch.int8, device=weight.device)
        self.ready = [False] * groups
        self.row_spec = QuantSpec(spec.bits, "tensor" if self.tensor else "channel", 1, spec.symmetric)

    def columns(self, group: int) -> slice:
        return slice(group * self.width, (group + 1) * self.width)

    def fill(self, group: int, values: Tensor) -> None:
        """Set the group's grid from its current weights ``values`` (out, width)."""
        if self.keep is not None:
            values = values * self.keep[:, self.columns(group)]
        spec, flat = self.spec, values.reshape(1, -1) if self.tensor else values
        scale, _ = AbsMaxQuantizer(self.row_spec, values).scale_and_zero_point(values)  # (rows, 1)
        scale = _exact_scale(scale, spec.bits)
        self.scale[:, group] = scale.reshape(-1)
        if not spec.symmetric:  # the zero point of the shortened scale, as the quantizer derives it
            lower = flat.amin(1, keepdim=True).clamp(max=0)
            self.zero[:, group] = (
                (spec.qmin - torch.round(lower / scale)).clamp(spec.qmin, spec.qmax).reshape(-1)
            )
        if self.pin_range:
            self.force[:, self.columns(group)] = _extremes(flat, spec.symmetric).reshape(values.shape)
        self.ready[group] = True

    def quantize(self, w: Tensor, column: int) -> Tensor:
        """Quantized-dequantized original column ``column`` (out,), its range-setting elements pinned."""
        group = column // self.width
        scale, zero = self.scale[:, group], self.zero[:, group]
        spec, force = self.spec, self.force[:, column]
        q = fake_quant(w, scale, zero, spec.qmin, spec.qmax)
        q = torch.where(force > 0, (spec.qmax - zero) * scale, q)
        q = torch.where(force < 0, (spec.qmin - zero) * scale, q)
        return q if self.keep is None else q * self.keep[:, column]

    def result(self, weight_shape: torch.Size) -> tuple[Tensor, Tensor]:
        shape = scale_shape(weight_shape, self.spec)
        return self.scale.reshape(shape).clone(), self.zero.reshape(shape).clone()


# --------------------------------------------------------------------------- the Hessian


def _inverse_cholesky(H: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹``, dead columns given a unit diagonal first.

    Raises:
        ValueError: the dampened ``H`` is not positive definite (names ``percdamp``).
    """
    H = H.clone()
    diag = H.diagonal()
    dead = diag == 0
    live_mean = diag[~dead].mean() if bool((~dead).any()) else diag.new_ones(())
    diag[dead] = 1.0
    diag.add_(percdamp * live_mean)
    lower, info = torch.linalg.cholesky_ex(H)
    if not int(info):
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if not int(info):
            return upper
    raise ValueError(
        f"percdamp: H is not positive definite after dampening with percdamp={percdamp} "
        f"(too few calibration tokens, or a non-Hessian H); raise percdamp"
    )


# --------------------------------------------------------------------------- the sweep


def _sweep_(W: Tensor, U: Tensor, grid: _Grid, order: Tensor, blocksize: int, stop: int) -> None:
    """Quantize positions ``[0, stop)`` of the column-permuted ``W`` in place, with lazy block updates.

    ``order[p]`` is the original column at position ``p``. A pruned weight is "quantized" to zero at
    its turn and its error compensated like any other (as SparseGPT does; earlier columns' updates
    may move it before that). Positions from ``stop`` on are only updated (tests stop early).
    """
    for i1 in range(0, stop, blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, E = W[:, i1:i2].clone(), W.new_zeros(W.shape[0], i2 - i1)
        for i in range(min(i2, stop) - i1):
            j, column = i1 + i, int(order[i1 + i])
            if not grid.ready[column // grid.width]:
                _fill_group(W, U, grid, order, E[:, :i], i1, column // grid.width)
            w = W1[:, i]
            q = grid.quantize(w, column)
            e = (w - q) / U[j, j]
            W1[:, i:] -= e[:, None] * U[j, j:i2][None, :]
            W1[:, i], E[:, i] = q, e
        W[:, i1:i2] = W1
        W[:, i2:] -= E @ U[i1:i2, i2:]


def _fill_group(W: Tensor, U: Tensor, grid: _Grid, order: Tensor, E: Tensor, i1: int, group: int) -> None:
    """Grid of ``group`` from its weights as updated so far (all its columns are still ahead).

    ``W`` holds every column of the running block as it was at the block start; the block's
    updates so far are ``E @ U[i1:i1+k]``, applied here to the group's positions only.
    """
    positions = torch.argsort(order)[grid.columns(group)]
    current = W[:, positions] - E @ U[i1 : i1 + E.shape[1], positions]
    grid.fill(group, current)


# --------------------------------------------------------------------------- the entry points


def _check_inputs(weight: Tensor, H: Tensor, spec: QuantSpec, blocksize: int, percdamp: float) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight: need a 2-D float (out, in) tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    in_f = weight.shape[1]
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"H: need shape ({in_f}, {in_f}) for in_features={in_f}, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H: has inf or nan entries (overflow while accumulating? use float32)")
    if spec.granularity == "group" and in_f % spec.group_size:
        raise ValueError(f"group_size: {spec.group_size} does not divide in_features={in_f}")
    check_int("blocksize", blocksize, 1)
    check_number("percdamp", percdamp, 0.0)


@torch.no_grad()
def gptq_(
    weight: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    desc_act: bool = False,
    static_groups: bool | None = None,
    pin_range: bool = True,
    mask: Tensor | None = None,
) -> GPTQResult:
    """Quantize ``weight`` (out, in) in place onto the grid of ``spec`` with GPTQ.

    Args:
        weight: the Linear weight, overwritten by its quantized-dequantized GPTQ values (the math
            runs in float32, float64 for float64 weights; half weights are rounded back to their dtype).
        H: the layer's Hessian ``2·XᵀX`` (in, in) over the calibration inputs, not yet dampened.
        spec: bits (8, 4, 2), granularity (tensor, channel, group of ``group_size``), symmetric.
        blocksize: columns per block of lazy updates.
        percdamp: ``percdamp · mean(diag H)`` (over live columns) is added to the diagonal.
        desc_act: act-order: quantize the columns in decreasing ``diag(H)`` (groups stay original).
        static_groups: compute the group scales from the weights before the sweep (True) or when the
            sweep first reaches each group (False, GPTQ's original). Default (None): static with
            ``desc_act`` — a group's columns are then scattered over the sweep, and its first column
            reached would fix a range that later updates of the others move away from — else dynamic.
        pin_range: give each group's range-setting element its extreme code (see the module
            docstring), so that :class:`~lightcook.ops.quant.AbsMaxQuantizer` recomputes exactly the
            returned scale and zero point from the result. It costs a little accuracy; quantizers that
            store their scale (PACT, LSQ, dynamic) do not need it (:func:`gptq_layer_` turns it off).
        mask: optional boolean (out, in) sparsity mask: pruned weights end at zero, the error of zeroing
            them compensated by the later columns like a quantization error.

    Returns:
        The :class:`GPTQResult` (scales of the original column groups, and the sweep order).

    Raises:
        ValueError: a 2-D shape mismatch of ``weight`` / ``H`` / ``mask``, a non-finite ``H``,
            ``group_size`` not dividing the input features, a bad ``blocksize`` / ``percdamp`` /
            ``desc_act`` / ``static_groups``, or an ``H`` that stays indefinite after dampening.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, w = torch.randn(64, 8), torch.randn(4, 8)
        >>> q = w.clone()
        >>> res = gptq_(q, 2 * x.T @ x, QuantSpec(bits=2), desc_act=True)
        >>> sorted(res.perm.tolist()) == list(range(8)), int((q / res.scale).round().abs().max())
        (True, 1)
    """
    _check_inputs(weight, H, spec, blocksize, percdamp)
    check_choice("desc_act", desc_act, (True, False))
    check_choice("static_groups", static_groups, (None, True, False))
    check_choice("pin_range", pin_range, (True, False))
    if mask is not None and tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask: shape {tuple(mask.shape)} differs from the weight's {tuple(weight.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    keep = None if mask is None else mask.to(device=W.device, dtype=dtype)
    if keep is not None:
        W.mul_(keep)
    H = H.to(device=W.device, dtype=dtype)
    grid = _Grid(spec, W, pin_range, keep)
    result = _run(W, H, grid, blocksize, percdamp, desc_act, static_groups)
    weight.copy_(W)
    return result


def _run(
    W: Tensor,
    H: Tensor,
    grid: _Grid,
    blocksize: int,
    percdamp: float,
    desc_act: bool,
    static_groups: bool | None,
    stop: int | None = None,
) -> GPTQResult:
    """The sweep of :func:`gptq_` on the float copy ``W`` (changed in place, original column order)."""
    if desc_act if static_groups is None else static_groups:
        for group in range(len(grid.ready)):
            grid.fill(group, W[:, grid.columns(group)])
    in_f = W.shape[1]
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if desc_act else None
    order = torch.arange(in_f, device=W.device) if perm is None else perm
    U = _inverse_cholesky(H[order][:, order], percdamp)
    Wp = W[:, order]
    _sweep_(Wp, U, grid, order, blocksize, in_f if stop is None else stop)
    W[:, order] = Wp
    return GPTQResult(*grid.result(W.shape), perm)


# --------------------------------------------------------------------------- a QuantLinear


@torch.no_grad()
def gptq_layer_(module: QuantLinear, H: Tensor, **options: Any) -> GPTQResult:
    """Run :func:`gptq_` on a :class:`~lightcook.ops.quant.QuantLinear` and start its quantizer there.

    The weight Parameter is updated in place (its N:M / unstructured mask buffer, if any, is kept).
    Then the weight quantizer starts on the GPTQ grid, so that ``module.weight_quantizer(weight)``
    returns the GPTQ weights unchanged:

    - ``absmax``: nothing to store; it recomputes the returned scale and zero point from the weights.
    - ``pact``: clip ``alpha = qmax · scale`` (asymmetric: ``lower`` / ``upper`` at the grid's ends).
    - ``lsq``: ``step = scale`` (asymmetric: also ``zero_point``).
    - ``dynamic``: ``gamma`` such that ``gamma · mean|W| = qmax · scale`` per group — exactly where a
      float ``gamma`` makes the product exact, else within one ulp of the weights (the product of
      two floats cannot hit every float).

    Args:
        module: the layer (``method`` absmax, pact, lsq or dynamic).
        H: its Hessian ``2·XᵀX`` (in, in).
        **options: ``blocksize``, ``percdamp``, ``desc_act``, ``static_groups`` of :func:`gptq_`.

    Returns:
        The :class:`GPTQResult`.

    Raises:
        ValueError: as :func:`gptq_`.
        TypeError: ``module`` is not a QuantLinear, or its weight quantizer is of an unknown kind.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = QuantLinear.from_linear(torch.nn.Linear(8, 4), QuantSpec(bits=4), method="lsq")
        >>> x = torch.randn(64, 8)
        >>> res = gptq_layer_(layer, 2 * x.T @ x)
        >>> bool(torch.equal(layer.weight_quantizer.step, res.scale))
        True
        >>> bool(torch.equal(layer.weight_quantizer(layer.weight), layer.weight))
        True
    """
    if not isinstance(module, QuantLinear):
        raise TypeError(f"gptq_layer_ needs a QuantLinear, got {type(module).__name__}")
    quantizer = module.weight_quantizer
    init = _INITS.get(type(quantizer))
    if init is None:
        raise TypeError(f"gptq_layer_: no GPTQ start for {type(quantizer).__name__}; known: {_known()}")
    mask = getattr(module, MASK, None)
    pin = isinstance(quantizer, AbsMaxQuantizer)  # the one method that recomputes its scale from the weights
    result = gptq_(module.weight, H, quantizer.spec, pin_range=pin, mask=mask, **options)
    init(quantizer, result, module.weight)
    return result


def _set(quantizer: WeightQuantizer, name: str, value: Tensor) -> None:
    """Copy ``value`` into the learned tensor ``name`` of ``quantizer`` (a Parameter shaped like it)."""
    cast(Tensor, getattr(quantizer, name)).copy_(value)


def _init_absmax(quantizer: WeightQuantizer, result: GPTQResult, weight: Tensor) -> None:
    """Nothing to store: absmax derives the GPTQ scale from the weights themselves."""


def _init_pact(quantizer: WeightQuantizer, result: GPTQResult, weight: Tensor) -> None:
    spec, scale, zero = quantizer.spec, result.scale, result.zero_point
    if spec.symmetric:
        _set(quantizer, "alpha", scale * spec.qmax)
    else:
        _set(quantizer, "lower", (spec.qmin - zero) * scale)
        _set(quantizer, "upper", (spec.qmax - zero) * scale)


def _init_lsq(quantizer: WeightQuantizer, result: GPTQResult, weight: Tensor) -> None:
    _set(quantizer, "step", result.scale)
    if not quantizer.spec.symmetric:
        _set(quantizer, "zero_point", result.zero_point)


def _init_dynamic(quantizer: WeightQuantizer, result: GPTQResult, weight: Tensor) -> None:
    spec = quantizer.spec
    wv = group_view(weight.detach().to(result.scale.dtype), spec)
    dims = (0, 1) if spec.granularity == "tensor" else (-1,)
    mean_abs = wv.abs().mean(dims, keepdim=True)
    _set(quantizer, "gamma", _factor(result.scale * spec.qmax, mean_abs))


def _factor(target: Tensor, base: Tensor) -> Tensor:
    """``f`` with ``f * base == target`` in floating point where one of the three nearest ``f`` does."""
    safe = torch.where(base > 0, base, torch.ones_like(base))
    f = target / safe
    for candidate in (torch.nextafter(f, f + math.inf), torch.nextafter(f, f - math.inf)):
        f = torch.where((f * safe != target) & (candidate * safe == target), candidate, f)
    return torch.where(base > 0, f, torch.ones_like(f))


_INITS = {
    AbsMaxQuantizer: _init_absmax,
    PACTQuantizer: _init_pact,
    LSQQuantizer: _init_lsq,
    DynamicScalingQuantizer: _init_dynamic,
}


def _known() -> str:
    return ", ".join(cls.__name__ for cls in _INITS)
