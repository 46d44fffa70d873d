"""Quantization math for Linear layers, in pure torch.

Weights are ``nn.Linear`` weights of shape ``(out, in)``; activations are ``(..., in)``.
Integer codes ``q`` and real values ``w`` are related by ``w ~= (q - zero_point) * scale``.

Contents:
    spec and fake quantization: :class:`QuantSpec`, :func:`fake_quant`, :func:`group_view`,
        :func:`scale_shape`.
    weight quantizers (QAT): :class:`WeightQuantizer`, :class:`AbsMaxQuantizer`,
        :class:`PACTQuantizer`, :class:`LSQQuantizer`, :class:`DynamicScalingQuantizer`,
        :data:`WEIGHT_QUANTIZERS`, :func:`make_weight_quantizer`.
    activations: :func:`quantize_per_token`, :func:`fake_quant_per_token`,
        :class:`ActivationQuantizer`.
    layers: :class:`QuantLinear` (training), :class:`Int8Linear` (real int8 inference),
        :class:`DequantLinear` (packed low-bit / group-wise / asymmetric storage).
    configuration and transforms: :class:`QuantConfig`, :func:`prepare_` (Linear -> QuantLinear),
        :func:`calibrate_` (static activation ranges), :func:`convert_` (QuantLinear -> Int8Linear /
        DequantLinear for inference), :func:`conv1d_to_linear`.
    integer kernels: :func:`int8_matmul`, :func:`int8_linear`.
    packing: :func:`pack_int4`, :func:`unpack_int4`, :func:`pack_int2`, :func:`unpack_int2`,
        :func:`pack_codes`, :func:`unpack_codes`.

Rounding is round-half-to-even (``torch.round``) and ``x / scale`` is computed as
``x * (1 / scale)``, both exactly as ``torch.fake_quantize_per_*_affine`` do.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcook.ops.config import TechniqueConfig, check_choice, check_int, check_number
from lightcook.ops.names import is_conv1d, linear_like, linear_names

__all__ = [
    "ACT_MODES",
    "WEIGHT_QUANTIZERS",
    "AbsMaxQuantizer",
    "ActivationQuantizer",
    "DequantLinear",
    "DynamicScalingQuantizer",
    "Int8Linear",
    "LSQQuantizer",
    "PACTQuantizer",
    "QuantConfig",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantizer",
    "calibrate_",
    "conv1d_to_linear",
    "convert_",
    "effective_weight",
    "fake_quant",
    "fake_quant_input",
    "fake_quant_per_token",
    "float_copy",
    "group_view",
    "input_quantization",
    "int8_linear",
    "int8_matmul",
    "make_weight_quantizer",
    "pack_codes",
    "pack_int2",
    "pack_int4",
    "prepare_",
    "quantize_per_token",
    "scale_shape",
    "unpack_codes",
    "unpack_int2",
    "unpack_int4",
]

_BITS = (8, 4, 3, 2)
_GRANULARITIES = ("tensor", "channel", "group")
ACT_MODES = ("dynamic", "static", "none")
"""Activation quantization modes of :class:`ActivationQuantizer`."""


# --------------------------------------------------------------------------- spec


def _check_bits(bits: int, name: str = "bits") -> None:
    if bits not in _BITS:
        raise ValueError(f"{name} must be one of {list(_BITS)}, got {bits!r}")


def _sym_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized.

    Args:
        bits: 8, 4 or 2.
        granularity: one scale per "tensor", per output "channel" (row), or per "group"
            of ``group_size`` consecutive input features within a row.
        group_size: elements per group (only used with ``granularity="group"``).
        symmetric: narrow signed range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0;
            otherwise unsigned ``[0, 2^b - 1]`` with an integer zero point.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="group", group_size=32)
        >>> spec.qmin, spec.qmax
        (-7, 7)
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {list(_GRANULARITIES)}, got {self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -_sym_qmax(self.bits) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return _sym_qmax(self.bits) if self.symmetric else 2**self.bits - 1


# --------------------------------------------------------------------------- granularity


def _check_weight_shape(shape: tuple[int, ...] | torch.Size, spec: QuantSpec) -> None:
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(shape)}")
    if spec.granularity == "group" and shape[1] % spec.group_size:
        raise ValueError(f"group_size={spec.group_size} does not divide in_features={shape[1]}")


def group_view(weight: Tensor, spec: QuantSpec) -> Tensor:
    """View a weight so that its scale (see :func:`scale_shape`) broadcasts against it.

    ``(out, in)`` stays ``(out, in)`` for "tensor" and "channel";
    for "group" it becomes ``(out, in // group_size, group_size)``.
    """
    _check_weight_shape(weight.shape, spec)
    if spec.granularity != "group":
        return weight
    out_f, in_f = weight.shape
    return weight.reshape(out_f, in_f // spec.group_size, spec.group_size)


def scale_shape(weight_shape: tuple[int, ...] | torch.Size, spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the scale: tensor ``(1, 1)``, channel ``(out, 1)``, group ``(out, in // g, 1)``."""
    _check_weight_shape(weight_shape, spec)
    out_f, in_f = weight_shape
    if spec.granularity == "tensor":
        return (1, 1)
    if spec.granularity == "channel":
        return (out_f, 1)
    return (out_f, in_f // spec.group_size, 1)


def _reduce_dims(spec: QuantSpec) -> tuple[int, ...]:
    """Dims of :func:`group_view` reduced to get one value per scale group."""
    return (0, 1) if spec.granularity == "tensor" else (-1,)


# --------------------------------------------------------------------------- core math


def _compute(t: Tensor) -> Tensor:
    """Quantization math runs in float32 (or float64): half types lose too much."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


def _quantize(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Integer-valued float codes ``clamp(round(x / scale) + zp, qmin, qmax)``."""
    return (torch.round(x * torch.reciprocal(scale)) + zero_point).clamp(qmin, qmax)


def _dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | float) -> Tensor:
    return (q - zero_point) * scale


def _range_qparams(lower: Tensor, upper: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point that map ``[lower, upper]`` (``lower <= 0 <= upper``) onto the codes."""
    if spec.symmetric:
        scale = (torch.maximum(upper, -lower) / spec.qmax).clamp_min(_tiny(upper))
        return scale, torch.zeros_like(scale)
    scale = ((upper - lower) / (spec.qmax - spec.qmin)).clamp_min(_tiny(upper))
    zero_point = (spec.qmin - torch.round(lower / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def _round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward (exactly), identity backward."""
    return x + (torch.round(x) - x).detach()


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``factor`` (the LSQ gradient scale)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with the straight-through estimator of ``torch.fake_quantize_*``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        q = torch.round(x * torch.reciprocal(scale)) + zero_point
        ctx.save_for_backward((q >= qmin) & (q <= qmax))  # pass-through mask on the rounded code
        return _dequantize(q.clamp(qmin, qmax), scale, zero_point)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def fake_quant(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``x`` with a straight-through gradient.

    Forward ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``; the gradient w.r.t.
    ``x`` passes where the rounded code lies in ``[qmin, qmax]`` and is zero elsewhere.
    Same semantics (and bits) as ``torch.fake_quantize_per_tensor_affine`` /
    ``per_channel_affine`` with an integer zero point. ``scale`` and ``zero_point``
    broadcast against ``x`` and get no gradient.

    Example:
        >>> fake_quant(torch.tensor([0.26, 9.0]), 0.1, 0, -127, 127)
        tensor([0.3000, 9.0000])
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax)


# --------------------------------------------------------------------------- weight quantizers


class WeightQuantizer(nn.Module):
    """Base class: fake-quantizes a ``(out, in)`` weight during training.

    Subclasses implement ``_qparams`` (scale and zero point of a :func:`group_view`),
    ``_fake_quant`` (differentiable forward on the group view) and optionally ``_clip``.
    Learned values are ``nn.Parameter`` s shaped like :func:`scale_shape`.

    Args:
        spec: the :class:`QuantSpec`.
        weight: the weight to be quantized; only used for shapes and initial values.
    """

    def __init__(self, spec: QuantSpec, weight: Tensor) -> None:
        super().__init__()
        _check_weight_shape(weight.shape, spec)
        self.spec = spec
        self.group_numel = weight.numel() // math.prod(scale_shape(weight.shape, spec))

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantized weight, same shape and dtype as ``weight``."""
        wv = group_view(_compute(weight), self.spec)
        return self._fake_quant(wv).reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def scale_and_zero_point(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` used for ``weight``, both shaped :func:`scale_shape`.

        The zero point is an integer-valued float tensor (zeros when symmetric).
        """
        return self._qparams(group_view(_compute(weight), self.spec))

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Integer codes ``(out, in)``: int8 when symmetric, uint8 otherwise.

        ``(codes - zero_point) * scale`` (on the group view) equals ``forward(weight)`` exactly.
        """
        wv = group_view(_compute(weight), self.spec)
        scale, zero_point = self._qparams(wv)
        q = _quantize(self._clip(wv), scale, zero_point, self.spec.qmin, self.spec.qmax)
        return q.reshape(weight.shape).to(torch.int8 if self.spec.symmetric else torch.uint8)

    def _qparams(self, wv: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _fake_quant(self, wv: Tensor) -> Tensor:
        raise NotImplementedError

    def _clip(self, wv: Tensor) -> Tensor:
        return wv

    def extra_repr(self) -> str:
        return repr(self.spec)


def _group_min_max(wv: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-group ``min(w, 0)`` and ``max(w, 0)``, so that zero is always representable."""
    dims = _reduce_dims(spec)
    return wv.amin(dims, keepdim=True).clamp(max=0), wv.amax(dims, keepdim=True).clamp(min=0)


class AbsMaxQuantizer(WeightQuantizer):
    """Min-max quantizer: the scale is recomputed from the current weight at every call.

    Symmetric: ``scale = absmax / qmax``. Asymmetric: ``[min(w, 0), max(w, 0)]`` is mapped
    onto ``[0, 2^b - 1]``. No parameters; the gradient is the straight-through estimator.

    Example:
        >>> w = torch.randn(4, 8)
        >>> q = AbsMaxQuantizer(QuantSpec(bits=4), w)
        >>> q(w).shape
        torch.Size([4, 8])
    """

    def _qparams(self, wv: Tensor) -> tuple[Tensor, Tensor]:
        return _range_qparams(*_group_min_max(wv.detach(), self.spec), self.spec)

    def _fake_quant(self, wv: Tensor) -> Tensor:
        scale, zero_point = self._qparams(wv)
        return fake_quant(wv, scale, zero_point, self.spec.qmin, self.spec.qmax)


class _PACTFn(torch.autograd.Function):
    """Clip to ``[lower, upper]`` then fake-quantize; PACT gradients (Choi et al., 2018).

    d out / d w = 1 strictly inside the clip range, else 0;
    d out / d upper = 1 where ``w >= upper``; d out / d lower = 1 where ``w <= lower``.
    The dependence of the scale on the bounds is not differentiated (as in the paper).
    """

    @staticmethod
    def forward(ctx, w: Tensor, lower: Tensor, upper: Tensor, spec: QuantSpec) -> Tensor:
        scale, zero_point = _range_qparams(lower, upper, spec)
        below, above = w <= lower, w >= upper
        ctx.save_for_backward(below, above)
        ctx.shapes = (lower.shape, upper.shape)
        q = _quantize(torch.minimum(torch.maximum(w, lower), upper), scale, zero_point, spec.qmin, spec.qmax)
        return _dequantize(q, scale, zero_point)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        below, above = ctx.saved_tensors
        lower_shape, upper_shape = ctx.shapes
        grad_w = grad * ~(below | above)
        return grad_w, (grad * below).sum_to_size(lower_shape), (grad * above).sum_to_size(upper_shape), None


class PACTQuantizer(WeightQuantizer):
    """PACT: learned clipping bound(s), one per scale group (Choi et al., 2018, arXiv 1805.06085).

    Symmetric: parameter ``alpha`` (init absmax), weight clipped to ``[-alpha, alpha]``,
    ``scale = alpha / qmax``. Asymmetric: parameters ``lower`` / ``upper`` (init min / max).
    The gradient of ``alpha`` is the signed sum of upstream gradients over clipped elements
    (``|w| >= alpha``, boundary included so that the absmax element moves ``alpha``);
    in-range elements contribute nothing.

    Example:
        >>> w = torch.randn(4, 8)
        >>> q = PACTQuantizer(QuantSpec(bits=4), w)
        >>> q(w).sum().backward()
        >>> q.alpha.grad.shape
        torch.Size([4, 1])
    """

    def __init__(self, spec: QuantSpec, weight: Tensor) -> None:
        super().__init__(spec, weight)
        lower, upper = _group_min_max(group_view(_compute(weight.detach()), spec), spec)
        if spec.symmetric:
            self.alpha = nn.Parameter(torch.maximum(upper, -lower))
        else:
            self.lower = nn.Parameter(lower)
            self.upper = nn.Parameter(upper)

    def _bounds(self, wv: Tensor) -> tuple[Tensor, Tensor]:
        if self.spec.symmetric:
            alpha = self.alpha.to(wv.dtype).clamp_min(_tiny(wv))
            return -alpha, alpha
        return self.lower.to(wv.dtype), self.upper.to(wv.dtype)

    def _qparams(self, wv: Tensor) -> tuple[Tensor, Tensor]:
        return _range_qparams(*self._bounds(wv), self.spec)

    def _clip(self, wv: Tensor) -> Tensor:
        lower, upper = self._bounds(wv)
        return torch.minimum(torch.maximum(wv, lower), upper)

    def _fake_quant(self, wv: Tensor) -> Tensor:
        return _PACTFn.apply(wv, *self._bounds(wv), self.spec)


class LSQQuantizer(WeightQuantizer):
    """LSQ: learned step size (Esser et al., ICLR 2020, arXiv 1902.08153).

    Parameter ``step`` per scale group, initialised to ``2 * mean|w| / sqrt(qmax)``.
    Forward ``round(clamp(w / step, qmin, qmax)) * step`` with a round-STE, so autograd
    gives the paper's eq. 3: ``-w/s + round(w/s)`` inside the range, ``qmin`` / ``qmax``
    outside; that gradient is scaled by ``g = 1 / sqrt(numel_per_group * qmax)``.
    Asymmetric specs also learn ``zero_point`` (LSQ+ style, rounded with an STE and
    scaled by ``g``), initialised with ``step`` from min / max because the paper's
    initialisation assumes a signed, zero-centred range.

    Example:
        >>> w = torch.randn(4, 8)
        >>> q = LSQQuantizer(QuantSpec(bits=4), w)
        >>> q(w).sum().backward()
        >>> q.step.grad.shape
        torch.Size([4, 1])
    """

    def __init__(self, spec: QuantSpec, weight: Tensor) -> None:
        super().__init__(spec, weight)
        wv = group_view(_compute(weight.detach()), spec)
        if spec.symmetric:
            self.step = nn.Parameter(
                2 * wv.abs().mean(_reduce_dims(spec), keepdim=True) / math.sqrt(spec.qmax)
            )
        else:
            scale, zero_point = _range_qparams(*_group_min_max(wv, spec), spec)
            self.step = nn.Parameter(scale)
            self.zero_point = nn.Parameter(zero_point)
        self.grad_factor = 1.0 / math.sqrt(self.group_numel * spec.qmax)

    def _step_zp(self, wv: Tensor) -> tuple[Tensor, Tensor | None]:
        step = _GradScale.apply(self.step.to(wv.dtype), self.grad_factor).clamp_min(_tiny(wv))
        if self.spec.symmetric:
            return step, None
        zero_point = _GradScale.apply(self.zero_point.to(wv.dtype), self.grad_factor)
        return step, _round_ste(zero_point).clamp(self.spec.qmin, self.spec.qmax)

    def _qparams(self, wv: Tensor) -> tuple[Tensor, Tensor]:
        step, zero_point = self._step_zp(wv)
        return step, torch.zeros_like(step) if zero_point is None else zero_point

    def _fake_quant(self, wv: Tensor) -> Tensor:
        step, zero_point = self._step_zp(wv)
        u = wv * torch.reciprocal(step)
        if zero_point is None:
            return _round_ste(u.clamp(self.spec.qmin, self.spec.qmax)) * step
        # round(clamp(u, qmin - z, qmax - z)) == clamp(round(u) + z, qmin, qmax) - z for integer z
        return _round_ste(torch.clamp(u, self.spec.qmin - zero_point, self.spec.qmax - zero_point)) * step


class _DynamicScalingFn(torch.autograd.Function):
    """Symmetric clip-and-quantize with ``alpha = gamma * mean|w|``; gradients of Tao et al. (2022).

    With ``u = w / alpha`` and ``Q(u) = round(u * qmax) / qmax``:
    d w_q / d gamma = mean|w| * (Q(u) - u) if ``|w| < alpha`` else mean|w| * sign(w);
    d w_q / d w = 1 if ``|w| < alpha`` else 0 (straight-through). ``mean|w|`` is a constant.
    """

    @staticmethod
    def forward(ctx, w: Tensor, gamma: Tensor, mean_abs: Tensor, qmax: int) -> Tensor:
        alpha = (gamma * mean_abs).clamp_min(_tiny(w))
        scale = alpha / qmax
        clipped = w.abs() >= alpha
        q = _quantize(torch.minimum(torch.maximum(w, -alpha), alpha), scale, 0.0, -qmax, qmax)
        ctx.save_for_backward(w, alpha, q, clipped, mean_abs)
        ctx.qmax, ctx.gamma_shape = qmax, gamma.shape
        return q * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        w, alpha, q, clipped, mean_abs = ctx.saved_tensors
        d_alpha = torch.where(clipped, torch.sign(w), q / ctx.qmax - w / alpha)
        grad_gamma = (grad * d_alpha).sum_to_size(ctx.gamma_shape) * mean_abs
        return grad * ~clipped, grad_gamma, None, None


class DynamicScalingQuantizer(WeightQuantizer):
    """Module-wise dynamic scaling of Tao et al., "Compression of Generative Pre-trained
    Language Models via Quantization", ACL 2022 (arXiv 2203.10705).

    The clipping threshold is ``alpha = gamma * mean(|W|)`` (mean over each scale group; the
    paper uses one per module, i.e. ``granularity="tensor"``) with ``gamma`` learned, and
    ``scale = alpha / qmax``. Unlike PACT, ``gamma`` also gets gradient from in-range weights:
    ``mean|W| * (Q(u) - u)`` with ``u = w / alpha``, plus ``mean|W| * sign(w)`` from clipped
    ones. ``mean|W|`` is treated as a constant (no gradient into ``W`` through it). This is
    our reading of the paper's derivation, implemented as a custom autograd Function.

    Initialisation: by default ``gamma = absmax / mean|W|``, so that ``alpha`` equals the
    absmax at the start and the quantizer starts identical to :class:`AbsMaxQuantizer`; when
    compressing an already trained model this avoids a loss jump at step 0 (at 8 bits,
    clipping at ``mean|W|`` would clip about 40% of Gaussian weights). Pass
    ``gamma_init=1.0`` for the paper's initialisation (as we read it). Symmetric only.

    Example:
        >>> w = torch.randn(4, 8)
        >>> q = DynamicScalingQuantizer(QuantSpec(bits=4, granularity="tensor"), w)
        >>> q(w).sum().backward()
        >>> q.gamma.grad.shape
        torch.Size([1, 1])
    """

    def __init__(self, spec: QuantSpec, weight: Tensor, gamma_init: str | float = "absmax") -> None:
        if not spec.symmetric:
            raise ValueError("DynamicScalingQuantizer supports symmetric=True only")
        super().__init__(spec, weight)
        wv = group_view(_compute(weight.detach()), spec)
        mean_abs = self._mean_abs(wv).clamp_min(_tiny(wv))
        if gamma_init == "absmax":
            gamma = wv.abs().amax(_reduce_dims(spec), keepdim=True) / mean_abs
        elif isinstance(gamma_init, (int, float)) and not isinstance(gamma_init, bool):
            gamma = torch.full_like(mean_abs, float(gamma_init))
        else:
            raise ValueError(f"gamma_init must be 'absmax' or a number, got {gamma_init!r}")
        self.gamma = nn.Parameter(gamma)

    def _mean_abs(self, wv: Tensor) -> Tensor:
        return wv.detach().abs().mean(_reduce_dims(self.spec), keepdim=True)

    def _alpha(self, wv: Tensor) -> Tensor:
        return (self.gamma.to(wv.dtype) * self._mean_abs(wv)).clamp_min(_tiny(wv))

    def _qparams(self, wv: Tensor) -> tuple[Tensor, Tensor]:
        scale = self._alpha(wv) / self.spec.qmax
        return scale, torch.zeros_like(scale)

    def _clip(self, wv: Tensor) -> Tensor:
        alpha = self._alpha(wv)
        return torch.minimum(torch.maximum(wv, -alpha), alpha)

    def _fake_quant(self, wv: Tensor) -> Tensor:
        return _DynamicScalingFn.apply(wv, self.gamma.to(wv.dtype), self._mean_abs(wv), self.spec.qmax)


WEIGHT_QUANTIZERS: dict[str, type[WeightQuantizer]] = {
    "absmax": AbsMaxQuantizer,
    "pact": PACTQuantizer,
    "lsq": LSQQuantizer,
    "dynamic": DynamicScalingQuantizer,
}
"""Weight quantizer classes by method name."""


def make_weight_quantizer(method: str, spec: QuantSpec, weight: Tensor) -> WeightQuantizer:
    """Build the weight quantizer registered under ``method`` in :data:`WEIGHT_QUANTIZERS`."""
    if method not in WEIGHT_QUANTIZERS:
        raise ValueError(
            f"unknown weight quantization method {method!r}; allowed: {sorted(WEIGHT_QUANTIZERS)}"
        )
    return WEIGHT_QUANTIZERS[method](spec, weight)


# --------------------------------------------------------------------------- activations


def _per_token_scale(x: Tensor, qmax: int) -> Tensor:
    """``absmax / qmax`` over the last dim: (..., K) -> (..., 1)."""
    return (x.detach().abs().amax(-1, keepdim=True) / qmax).clamp_min(_tiny(x))


def quantize_per_token(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic per-token quantization over the last dim.

    Returns ``(codes, scale)``: codes int8 shaped like ``x`` in ``[-qmax, qmax]`` and scale
    float32 (float64 for float64 input) shaped ``(..., 1)``; ``x ~= codes * scale``.
    """
    _check_bits(bits)
    xc, qmax = _compute(x.detach()), _sym_qmax(bits)
    scale = _per_token_scale(xc, qmax)
    return _quantize(xc, scale, 0.0, -qmax, qmax).to(torch.int8), scale


def fake_quant_per_token(x: Tensor, bits: int = 8) -> Tensor:
    """Per-token symmetric fake quantization of ``x`` (..., K) with a straight-through gradient."""
    _check_bits(bits)
    xc, qmax = _compute(x), _sym_qmax(bits)
    return fake_quant(xc, _per_token_scale(xc, qmax), 0.0, -qmax, qmax).to(x.dtype)


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a Linear input: "dynamic" per token, "static" per tensor, or "none".

    Static mode keeps a scalar buffer ``amax``; while ``calibrating`` is True, forward
    records the running max of ``|x|`` (:meth:`observe`) and returns ``x`` unchanged.
    Afterwards ``scale = amax / qmax``. ``amax`` starts at 0: calibrate before use.

    Example:
        >>> aq = ActivationQuantizer("static", bits=8)
        >>> aq.calibrating = True
        >>> _ = aq(torch.tensor([[0.5, -2.0]]))
        >>> aq.calibrating = False
        >>> aq.amax
        tensor(2.)
    """

    amax: Tensor  # scalar running max|x| in static mode (None, and never read, otherwise)

    def __init__(self, mode: str = "dynamic", bits: int = 8) -> None:
        super().__init__()
        if mode not in ACT_MODES:
            raise ValueError(f"activation mode must be one of {list(ACT_MODES)}, got {mode!r}")
        _check_bits(bits, "activation bits")
        self.mode, self.bits, self.calibrating = mode, bits, False
        self.register_buffer("amax", torch.zeros(()) if mode == "static" else None)

    @property
    def qmax(self) -> int:
        """Largest code of the symmetric activation range."""
        return _sym_qmax(self.bits)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the running ``amax`` with ``max|x|`` (static mode)."""
        if self.mode != "static":
            raise RuntimeError(f"observe() needs mode='static', this quantizer is {self.mode!r}")
        self.amax.copy_(torch.maximum(self.amax, x.detach().abs().amax().to(self.amax.dtype)))

    def static_scale(self) -> Tensor:
        """Scalar float32 scale ``amax / qmax`` of static mode."""
        return (self.amax.float() / self.qmax).clamp_min(torch.finfo(torch.float32).tiny)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        if self.mode == "dynamic":
            return fake_quant_per_token(x, self.bits)
        if self.calibrating:
            self.observe(x)
            return x
        xc = _compute(x)
        return fake_quant(xc, self.static_scale().to(xc.dtype), 0.0, -self.qmax, self.qmax).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, bits={self.bits}"


# --------------------------------------------------------------------------- int8 matmul


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad2d(t: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad a 2-D tensor at the bottom / right to ``(rows, cols)``."""
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _exact_int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Always-available exact fallback.

    float64 is exact here: each product is at most 2^14 in magnitude, so every partial sum
    is an integer below 2^53 for any K < 2^39.
    """
    return (a.double() @ b.double().t()).to(torch.int32)


def _padded_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm`` under CUDA's constraints: M > 16, K and N multiples of 8."""
    m, k = a.shape
    n = b.shape[0]
    mp, kp, np_ = max(m, 17), _round_up(k, 8), _round_up(n, 8)
    return torch._int_mm(_pad2d(a, mp, kp), _pad2d(b, np_, kp).t())[:m, :n]


def _cpm_int8_matmul(a: Tensor, b: Tensor) -> Tensor | None:
    """cpm_kernels' cuBLASLt int8 GEMM (dims padded to multiples of 4), or None if unusable."""
    try:  # the import itself raises RuntimeError without a CUDA driver
        from cpm_kernels.kernels import gemm_int8
    except (ImportError, RuntimeError, OSError):
        return None
    m, k = a.shape
    n = b.shape[0]
    mp, kp, np_ = _round_up(m, 4), _round_up(k, 4), _round_up(n, 4)
    a_p, b_p = _pad2d(a, mp, kp).contiguous(), _pad2d(b, np_, kp).contiguous()
    out = torch.empty(mp, np_, dtype=torch.int32, device=a.device)  # column-major (np_, mp) for cuBLAS
    try:
        with torch.cuda.device(a.device):
            stream = torch.cuda.current_stream().cuda_stream
            gemm_int8(np_, kp, mp, 1, 1, True, False, b_p.data_ptr(), a_p.data_ptr(), out.data_ptr(), stream)
    except (RuntimeError, AssertionError, OSError):
        return None
    return out[:m, :n]


def _cuda_int8_matmul(a: Tensor, b: Tensor) -> Tensor | None:
    out = _cpm_int8_matmul(a, b)
    if out is not None:
        return out
    try:
        return _padded_int_mm(a, b)
    except RuntimeError:
        return None


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer product ``a @ b.T``: a (M, K) int8, b (N, K) int8 -> (M, N) int32.

    CPU: ``torch._int_mm`` (no shape constraints there). CUDA: cpm_kernels if installed,
    else ``torch._int_mm`` with zero padding to its shape constraints. Anything else, or
    any failure: an exact float64 fallback. int32 overflows only for K above ~133k.

    Example:
        >>> a = torch.tensor([[1, -2]], dtype=torch.int8)
        >>> int8_matmul(a, torch.tensor([[3, 4], [127, 1]], dtype=torch.int8))
        tensor([[ -5, 125]], dtype=torch.int32)
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"int8_matmul needs 2-D int8 operands, got {a.dtype} {tuple(a.shape)}, {b.dtype} {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dims differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (b is (N, K))")
    if 0 in (*a.shape, b.shape[0]):
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    if a.is_cuda:
        out = _cuda_int8_matmul(a, b)
        if out is not None:
            return out
    elif a.device.type == "cpu":
        try:
            return torch._int_mm(a, b.t())
        except RuntimeError:
            pass
    return _exact_int8_matmul(a, b)


def int8_linear(
    x: Tensor,
    weight_codes: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    act_scale: Tensor | None = None,
) -> Tensor:
    """W8A8 linear: quantize ``x`` (..., K) to int8, integer GEMM, rescale, add bias.

    Args:
        x: float input (..., K).
        weight_codes: int8 (N, K).
        weight_scale: (N, 1).
        bias: (N,) or None.
        act_scale: None for dynamic per-token activation scales, else a scalar static scale.

    Returns:
        (..., N) in ``x.dtype``: ``int32 acc * (act_scale * weight_scale.T) + bias``.
    """
    lead, n = x.shape[:-1], weight_codes.shape[0]
    x2 = _compute(x.detach().reshape(-1, x.shape[-1]))  # (M, K)
    if act_scale is None:
        a_codes, a_scale = quantize_per_token(x2)  # (M, K) int8, (M, 1)
    else:
        a_scale = act_scale.to(x2.dtype)  # ()
        a_codes = _quantize(x2, a_scale, 0.0, -127, 127).to(torch.int8)
    acc = int8_matmul(a_codes, weight_codes)  # (M, N) int32
    y = acc.to(a_scale.dtype) * (a_scale * weight_scale.to(a_scale.dtype).t())  # (M, N)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, n)


# --------------------------------------------------------------------------- layers


def _int8_incompatibility(spec: QuantSpec, act: ActivationQuantizer) -> str | None:
    """Why a (weight spec, activation quantizer) pair cannot run on the int8 kernel, or None.

    Symmetric 4- and 2-bit weight codes are int8 values too, so W4A8 and W2A8 per-tensor/channel
    layers run the same kernel as W8A8 (and agree exactly with the exported :class:`Int8Linear`).
    """
    if not spec.symmetric or spec.granularity == "group":
        return f"weights must be symmetric per-tensor or per-channel (8, 4 or 2 bits), got {spec}"
    if act.mode not in ("dynamic", "static") or act.bits != 8:
        return f"activations must be 8-bit 'dynamic' or 'static', got mode={act.mode!r} bits={act.bits}"
    return None


def _int8_weight(quantizer: WeightQuantizer, weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes (out, in) and float32 scale (out, 1) of a symmetric per-tensor/channel quantizer."""
    codes = quantizer.codes(weight)
    scale, _ = quantizer.scale_and_zero_point(weight)
    return codes, scale.float().expand(weight.shape[0], 1).contiguous()


class QuantLinear(nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input, for quantization-aware training.

    ``forward(x) = F.linear(input_quantizer(x), weight_quantizer(weight), bias)``. With
    gradients disabled and an int8-kernel-compatible setup (symmetric per-tensor/channel
    weights of 8, 4 or 2 bits, 8-bit dynamic or static activations, not calibrating) it
    instead runs the integer path of :class:`Int8Linear`, giving bit-identical outputs to it.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> q = QuantLinear.from_linear(lin, QuantSpec(bits=8), method="lsq")
        >>> q.weight is lin.weight, q(torch.randn(2, 8)).shape
        (True, torch.Size([2, 4]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_spec: QuantSpec | None = None,
        method: str = "absmax",
        act_mode: str = "dynamic",
        act_bits: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.method = method
        self._attach_quantizers(weight_spec or QuantSpec(), method, act_mode, act_bits)

    def _attach_quantizers(self, spec: QuantSpec, method: str, act_mode: str, act_bits: int) -> None:
        self.weight_quantizer = make_weight_quantizer(method, spec, self.weight)
        self.input_quantizer = ActivationQuantizer(act_mode, act_bits).to(self.weight.device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_spec: QuantSpec | None = None,
        method: str = "absmax",
        act_mode: str = "dynamic",
        act_bits: int = 8,
    ) -> QuantLinear:
        """Wrap ``linear`` reusing its ``weight`` / ``bias`` Parameter objects (same keys, same optimizer state)."""
        spec = weight_spec or QuantSpec()
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight_spec=spec,
            method=method,
            act_mode=act_mode,
            act_bits=act_bits,
            device="meta",
            dtype=linear.weight.dtype,
        )
        q.weight, q.bias = linear.weight, linear.bias
        q._attach_quantizers(spec, method, act_mode, act_bits)  # from the real weight values
        return q.train(linear.training)

    def int8_path_enabled(self) -> bool:
        """Whether forward runs the exact integer path (gradients off, int8-compatible, not calibrating)."""
        return (
            not torch.is_grad_enabled()
            and not self.input_quantizer.calibrating
            and _int8_incompatibility(self.weight_quantizer.spec, self.input_quantizer) is None
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.int8_path_enabled():
            codes, scale = _int8_weight(self.weight_quantizer, self.weight)
            act = self.input_quantizer
            return int8_linear(
                x, codes, scale, self.bias, act.static_scale() if act.mode == "static" else None
            )
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method!r}"


class Int8Linear(nn.Module):
    """Real W8A8 inference Linear: int8 weight codes, int8 activations, int32 accumulation.

    Buffers: ``weight_codes`` int8 (out, in), ``weight_scale`` float32 (out, 1), optional
    ``bias`` and, in static mode, ``act_scale`` (scalar). Accepts inputs (..., in).

    Example:
        >>> m = Int8Linear.from_float(nn.Linear(8, 4))
        >>> m(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 4])
    """

    weight_codes: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    act_scale: Tensor | None  # static mode only

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act_mode: str = "dynamic",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if act_mode not in ("dynamic", "static"):
            raise ValueError(f"Int8Linear act_mode must be one of ['dynamic', 'static'], got {act_mode!r}")
        self.in_features, self.out_features, self.act_mode = in_features, out_features, act_mode
        self.register_buffer(
            "weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        static = act_mode == "static"
        self.register_buffer(
            "act_scale", torch.ones((), dtype=torch.float32, device=device) if static else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight_codes, self.weight_scale, self.bias, self.act_scale)

    @classmethod
    def from_quant_linear(cls, q: QuantLinear) -> Int8Linear:
        """Freeze an int8-compatible :class:`QuantLinear` (W8A8, W4A8, W2A8) into integer buffers."""
        reason = _int8_incompatibility(q.weight_quantizer.spec, q.input_quantizer)
        if reason is not None:
            raise ValueError(f"cannot convert to Int8Linear: {reason}; use DequantLinear instead")
        act = q.input_quantizer
        m = cls(q.in_features, q.out_features, q.bias is not None, act.mode, q.weight.device, q.weight.dtype)
        with torch.no_grad():
            codes, scale = _int8_weight(q.weight_quantizer, q.weight)
            m.weight_codes.copy_(codes)
            m.weight_scale.copy_(scale)
            if q.bias is not None:
                cast(Tensor, m.bias).copy_(q.bias)
            if act.mode == "static":
                cast(Tensor, m.act_scale).copy_(act.static_scale())
        return m

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        act_mode: str = "dynamic",
        granularity: str = "channel",
        act_amax: float | None = None,
    ) -> Int8Linear:
        """Absmax-quantize a float Linear; static mode needs the calibrated ``act_amax``."""
        if act_mode == "static" and act_amax is None:
            raise ValueError("act_mode='static' needs act_amax (max |input| from calibration)")
        spec = QuantSpec(bits=8, granularity=granularity, symmetric=True)
        q = QuantLinear.from_linear(linear, spec, "absmax", act_mode, 8)
        if act_mode == "static":
            q.input_quantizer.amax.fill_(cast(float, act_amax))
        return cls.from_quant_linear(q)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_mode={self.act_mode!r}"


# --------------------------------------------------------------------------- packing


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _pack(codes: Tensor, bits: int, signed: bool) -> tuple[Tensor, int]:
    lo, hi = _code_range(bits, signed)
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{bits}-bit {'signed' if signed else 'unsigned'} codes must lie in [{lo}, {hi}]")
    n = codes.shape[-1]
    u = (codes.to(torch.int16) & (2**bits - 1)).to(torch.uint8)  # two's complement field
    if 8 % bits:
        return _pack_bitstream(u, bits), n
    per = 8 // bits
    u = F.pad(u, (0, (-n) % per)).reshape(*codes.shape[:-1], -1, per)  # (..., ceil(n / per), per)
    packed = u[..., 0].clone()
    for i in range(1, per):
        packed |= u[..., i] << (i * bits)  # element i of a byte sits in bits [i*bits, (i+1)*bits)
    return packed, n


def _pack_bitstream(u: Tensor, bits: int) -> Tensor:
    """Fields (..., n) of ``bits`` bits each, laid end to end, low bits first: 3-bit codes go 8 to
    3 bytes. Returns uint8 (..., ceil(n * bits / 8))."""
    n = u.shape[-1]
    words = F.pad(u, (0, (-n) % 8)).reshape(*u.shape[:-1], -1, 8).to(torch.int64)  # 8 fields -> bits bytes
    word = words[..., 0].clone()  # (..., ceil(n / 8)) of 8 * bits bits
    for i in range(1, 8):
        word |= words[..., i] << (i * bits)
    out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(bits)], -1).to(torch.uint8)
    return out.reshape(*u.shape[:-1], -1)[..., : -(-n * bits // 8)]


def _unpack_bitstream(packed: Tensor, bits: int, length: int) -> Tensor:
    groups = -(-packed.shape[-1] // bits)
    by = F.pad(packed, (0, groups * bits - packed.shape[-1])).reshape(*packed.shape[:-1], groups, bits)
    word = by[..., 0].to(torch.int64)  # (..., groups)
    for b in range(1, bits):
        word |= by[..., b].to(torch.int64) << (8 * b)
    fields = torch.stack([(word >> (i * bits)) & (2**bits - 1) for i in range(8)], -1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :length].to(torch.uint8)


def _unpack(packed: Tensor, bits: int, length: int, signed: bool) -> Tensor:
    if packed.dtype != torch.uint8 or not 0 <= length <= packed.shape[-1] * 8 // bits:
        raise ValueError(f"need uint8 packed data holding at least length={length} {bits}-bit codes")
    if 8 % bits:
        u = _unpack_bitstream(packed, bits, length)
    else:
        per = 8 // bits
        fields = [(packed >> (i * bits)) & (2**bits - 1) for i in range(per)]
        u = torch.stack(fields, -1).reshape(*packed.shape[:-1], -1)[..., :length]
    if not signed:
        return u
    half = 2 ** (bits - 1)
    return (u.to(torch.int8) ^ half) - half  # sign-extend the field


def pack_int4(codes: Tensor, signed: bool = True) -> tuple[Tensor, int]:
    """Pack 4-bit codes (..., n), in [-8, 7] (or [0, 15] unsigned), two per byte.

    Returns ``(packed uint8 (..., ceil(n / 2)), n)``; element ``2i`` is the low nibble of byte
    ``i``. An odd ``n`` is zero-padded; pass ``n`` back to :func:`unpack_int4`.
    """
    return _pack(codes, 4, signed)


def unpack_int4(packed: Tensor, length: int, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., m) -> codes (..., length), int8 if signed else uint8."""
    return _unpack(packed, 4, length, signed)


def pack_int2(codes: Tensor, signed: bool = True) -> tuple[Tensor, int]:
    """Pack 2-bit codes (..., n), in [-2, 1] (or [0, 3] unsigned), four per byte, low bits first.

    Returns ``(packed uint8 (..., ceil(n / 4)), n)``.
    """
    return _pack(codes, 2, signed)


def unpack_int2(packed: Tensor, length: int, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int2`."""
    return _unpack(packed, 2, length, signed)


def pack_codes(codes: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Codes (..., n) -> uint8 (..., ceil(n * bits / 8)); 8-bit codes are stored byte for byte, 4- and
    2-bit codes two / four per byte, 3-bit codes as one bit stream (8 codes in 3 bytes).

    Example:
        >>> codes = torch.tensor([[-4, 3, 0, 1, -1, 2, -3, -2, 1]])
        >>> packed = pack_codes(codes, 3)
        >>> packed.shape, torch.equal(unpack_codes(packed, 3, 9), codes.to(torch.int8))
        (torch.Size([1, 4]), True)
    """
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.int8).view(torch.uint8) if signed else codes.to(torch.uint8)
    return _pack(codes, bits, signed)[0]


def unpack_codes(packed: Tensor, bits: int, length: int, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 codes if signed else uint8."""
    _check_bits(bits)
    if bits == 8:
        return packed[..., :length].view(torch.int8) if signed else packed[..., :length]
    return _unpack(packed, bits, length, signed)


class DequantLinear(nn.Module):
    """Stores packed integer weights; dequantizes them and runs a float matmul.

    For the cases no integer kernel covers: group-wise, asymmetric, sub-8-bit weights or
    sub-8-bit activations. Buffers: ``weight_packed`` uint8 (out, ceil(in * bits / 8)),
    ``weight_scale`` / ``weight_zero_point`` shaped :func:`scale_shape`, optional ``bias``.
    ``input_quantizer`` fake-quantizes the input exactly as in :class:`QuantLinear`.

    Example:
        >>> q = QuantLinear.from_linear(nn.Linear(64, 4), QuantSpec(bits=4, granularity="group", group_size=32))
        >>> d = DequantLinear.from_quant_linear(q)
        >>> d.weight_packed.shape
        torch.Size([4, 32])
    """

    weight_packed: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        act_mode: str = "none",
        act_bits: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        shape = scale_shape((out_features, in_features), spec)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        packed_cols = -(-in_features * spec.bits // 8)
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, packed_cols, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(shape, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.input_quantizer = ActivationQuantizer(act_mode, act_bits).to(device)

    def weight_codes(self) -> Tensor:
        """Unpacked integer codes (out, in)."""
        return unpack_codes(self.weight_packed, self.spec.bits, self.in_features, self.spec.symmetric)

    def dequantized_weight(self) -> Tensor:
        """``(codes - zero_point) * scale`` as (out, in), in the scale's dtype."""
        q = group_view(self.weight_codes().to(self.weight_scale.dtype), self.spec)
        w = _dequantize(q, self.weight_scale, self.weight_zero_point)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.dequantized_weight().to(x.dtype), self.bias)

    @classmethod
    def from_quant_linear(cls, q: QuantLinear) -> DequantLinear:
        """Freeze any :class:`QuantLinear`; matches its fake-quant (gradient-enabled) forward."""
        spec, act = q.weight_quantizer.spec, q.input_quantizer
        m = cls(
            q.in_features,
            q.out_features,
            spec,
            q.bias is not None,
            act.mode,
            act.bits,
            q.weight.device,
            q.weight.dtype,
        )
        with torch.no_grad():
            scale, zero_point = q.weight_quantizer.scale_and_zero_point(q.weight)
            m.weight_packed.copy_(pack_codes(q.weight_quantizer.codes(q.weight), spec.bits, spec.symmetric))
            m.weight_scale, m.weight_zero_point = scale.clone(), zero_point.clone()
            if q.bias is not None:
                cast(Tensor, m.bias).copy_(q.bias)
            if act.mode == "static":
                m.input_quantizer.amax.copy_(act.amax)
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}"


# --------------------------------------------------------------------------- what a layer computes with


@torch.no_grad()
def effective_weight(module: nn.Module) -> Tensor:
    """The float ``(out, in)`` weight a Linear-like layer really multiplies by.

    :class:`QuantLinear`: the fake-quantized weight; :class:`Int8Linear` / :class:`DequantLinear`:
    the dequantized codes; any other layer: its ``weight`` (GPT-2 ``Conv1D`` transposed). Code that
    reads weights directly (the sparse MoE path) uses this so that quantization is not skipped.

    Example:
        >>> q = QuantLinear.from_linear(nn.Linear(8, 2), QuantSpec(bits=2))
        >>> int(effective_weight(q).unique().numel()) <= 2 * 3
        True
    """
    if isinstance(module, QuantLinear):
        return module.weight_quantizer(module.weight).detach()
    if isinstance(module, Int8Linear):
        return (module.weight_codes.float() * module.weight_scale).to(_float_dtype(module))
    if isinstance(module, DequantLinear):
        return module.dequantized_weight().to(_float_dtype(module))
    weight = cast(Tensor, module.weight).detach()
    return weight.t() if is_conv1d(module) else weight


def _float_dtype(module: nn.Module) -> torch.dtype:
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, Tensor) else torch.float32


def input_quantization(module: nn.Module) -> tuple[str, int, Tensor | None] | None:
    """``(mode, bits, static_scale)`` of the fake quantization a layer applies to its input, or
    ``None`` when its input stays in floating point. ``mode`` is ``"dynamic"`` (per token; scale
    ``None``) or ``"static"`` (one calibrated scale)."""
    if isinstance(module, Int8Linear):
        return (module.act_mode, 8, None if module.act_scale is None else module.act_scale.float())
    act = getattr(module, "input_quantizer", None)
    if not isinstance(act, ActivationQuantizer) or act.mode == "none" or act.calibrating:
        return None
    return (act.mode, act.bits, act.static_scale() if act.mode == "static" else None)


def fake_quant_input(x: Tensor, quantization: tuple[str, int, Tensor | None] | None) -> Tensor:
    """``x`` quantized-dequantized as :func:`input_quantization` describes (per token over the last
    dim, or with the static scale); ``x`` itself for ``None``."""
    if quantization is None:
        return x
    mode, bits, scale = quantization
    if mode == "dynamic":
        return fake_quant_per_token(x, bits)
    qmax = _sym_qmax(bits)
    xc = _compute(x)
    return fake_quant(xc, cast(Tensor, scale).to(xc.dtype), 0.0, -qmax, qmax).to(x.dtype)  # static: a scale


# --------------------------------------------------------------------------- configuration and transforms

#: Allowed weight / activation bit widths, as a user types them.
BITS = (2, 3, 4, 8)
#: Allowed starting points of the weights (:attr:`QuantConfig.init`).
INITS = ("none", "gptq")


@dataclass(frozen=True)
class QuantConfig(TechniqueConfig):
    """Quantization-aware training settings (the ``compress.quant`` keys), validated on creation.

    Example:
        >>> cfg = QuantConfig(bits=4, granularity="group", group_size=32, method="lsq")
        >>> cfg.spec.qmax, cfg.shape()["bits"]
        (7, 4)
        >>> QuantConfig(method="dynamic", symmetric=False)
        Traceback (most recent call last):
        ...
        ValueError: symmetric: method 'dynamic' (dynamic scaling) supports symmetric=true only
    """

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "bits", "granularity", "group_size", "symmetric", "method", "activations", "act_bits", "init"
    )  # fmt: skip

    #: Weight bits: 8 (default), 4 or 2.
    bits: int = 8
    #: One weight scale per ``"tensor"``, per output ``"channel"`` (default) or per ``"group"`` of inputs.
    granularity: str = "channel"
    #: Inputs per scale with ``granularity="group"`` (default 128); must divide every layer's inputs.
    group_size: int = 128
    #: True (default): signed codes, zero point 0; False: unsigned codes and an integer zero point.
    symmetric: bool = True
    #: Weight scale: ``"absmax"`` (default, from the weights), ``"pact"`` (learned clip), ``"lsq"``
    #: (learned step) or ``"dynamic"`` (module-wise dynamic scaling, Tao et al. 2022; symmetric only).
    method: str = "absmax"
    #: Inputs: ``"dynamic"`` (default, per token), ``"static"`` (per tensor, calibrated once) or ``"none"``.
    activations: str = "dynamic"
    #: Activation bits: 8 (default), 4 or 2.
    act_bits: int = 8
    #: Training batches for the static activation calibration (default 8, >= 1).
    calibration_batches: int = 8
    #: Starting point of the weights: ``"none"`` (default, the trained weights as they are) or ``"gptq"``
    #: (one-shot GPTQ on calibration Hessians, :func:`lightcook.ops.gptq.gptq_layer_`, before QAT).
    init: str = "none"
    #: GPTQ: columns per lazy-update block (default 128, >= 1); speed only, the result is the same.
    blocksize: int = 128
    #: GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean (default 0.01, in [0, 1]).
    percdamp: float = 0.01
    #: GPTQ: act-order, columns quantized in decreasing Hessian diagonal (default False); group
    #: scales still belong to the original column groups, so the export is unchanged.
    desc_act: bool = False
    #: GPTQ: visit each block's layers in groups sharing an input, in forward order, each with the
    #: Hessian taken after the groups before it were quantized (default True; ``lightcook.ops.calibrate``).
    true_sequential: bool = True
    #: GPTQ: fit each layer to the *dense* model's outputs from the quantized model's inputs
    #: (default True; the asymmetric calibration of ``lightcook.ops.calibrate``).
    dense_targets: bool = True

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, BITS)
        check_choice("granularity", self.granularity, _GRANULARITIES)
        check_int("group_size", self.group_size, 1)
        check_choice("symmetric", self.symmetric, (True, False))
        check_choice("method", self.method, tuple(WEIGHT_QUANTIZERS))
        check_choice("activations", self.activations, ACT_MODES)
        check_choice("act_bits", self.act_bits, BITS)
        check_int("calibration_batches", self.calibration_batches, 1)
        check_choice("init", self.init, INITS)
        check_int("blocksize", self.blocksize, 1)
        check_number("percdamp", self.percdamp, 0.0, 1.0)
        check_choice("desc_act", self.desc_act, (True, False))
        check_choice("true_sequential", self.true_sequential, (True, False))
        check_choice("dense_targets", self.dense_targets, (True, False))
        if self.dense_targets and not self.true_sequential:
            raise ValueError(
                "dense_targets: needs true_sequential=true (fitted to inputs that later change within "
                "the block, the dense-target weights amplify the change: SmolLM2 2:4 SparseGPT 11.5x "
                "dense vs 1.56x with both)"
            )
        if self.method == "dynamic" and not self.symmetric:
            raise ValueError("symmetric: method 'dynamic' (dynamic scaling) supports symmetric=true only")

    @property
    def spec(self) -> QuantSpec:
        """The weight :class:`QuantSpec` of these settings."""
        return QuantSpec(self.bits, self.granularity, self.group_size, self.symmetric)


def float_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`QuantLinear` in it a plain ``nn.Linear`` (same
    weight values): the float model the fake-quant one stands for.

    Example:
        >>> block = nn.Sequential(QuantLinear.from_linear(nn.Linear(4, 4), QuantSpec(bits=2)))
        >>> twin = float_copy(block)
        >>> type(twin[0]).__name__, torch.equal(twin[0].weight, block[0].weight), twin[0].weight is block[0].weight
        ('Linear', True, False)
    """
    twin = copy.deepcopy(module)
    for name, child in list(twin.named_modules()):
        if isinstance(child, QuantLinear) and name:
            linear = nn.Linear(child.in_features, child.out_features, child.bias is not None, device="meta")
            linear.weight, linear.bias = child.weight, child.bias
            parent, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent), attr, linear)
    return twin


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` equal to a GPT-2 ``Conv1D`` (weight ``(in, out)`` transposed, same bias Parameter).

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> conv = Conv1D(4, 2)  # (nf=out, nx=in)
        >>> x = torch.randn(3, 2)
        >>> torch.allclose(conv1d_to_linear(conv)(x), conv(x))
        True
    """
    weight, bias = cast(nn.Parameter, conv.weight), cast("nn.Parameter | None", conv.bias)
    in_f, out_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad)
    linear.bias = bias  # type: ignore[assignment]  # torch types Linear.bias without its None
    return linear.train(conv.training)


def prepare_(
    network: nn.Module, config: QuantConfig | None = None, names: Iterable[str] | None = None
) -> dict[str, QuantLinear]:
    """Swap the named Linear layers of ``network`` for :class:`QuantLinear` in place (QAT).

    The new layers keep the same ``weight`` / ``bias`` Parameters; buffers already on a layer (N:M
    masks) move to the new one; learned scales are marked ``_no_weight_decay``. GPT-2 ``Conv1D``
    layers first become the equivalent ``nn.Linear``. Every layer is checked before any is swapped.
    A layer that already is a :class:`QuantLinear` with the same settings is kept (idempotent).

    Args:
        network: the model, changed in place.
        config: the settings (default :class:`QuantConfig()`).
        names: qualified names of the layers to quantize (default: every Linear / ``Conv1D``).

    Returns:
        The :class:`QuantLinear` layers by name.

    Raises:
        ValueError: a name is an embedding (``targets: ...``), not a Linear, already quantized with
            other settings, a ``Conv1D`` carrying buffers, or ``group_size`` does not divide its inputs.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> sorted(prepare_(net, QuantConfig(bits=4)))
        ['0', '2']
        >>> type(net[0]).__name__, net[0].weight_quantizer.spec.bits
        ('QuantLinear', 4)
    """
    config = config or QuantConfig()
    if names is None:
        names = linear_names(network)
    selected = {name: network.get_submodule(name) for name in names}
    for name, module in selected.items():
        _check_quantizable(name, module, config)
    return {name: _swap_in(network, name, module, config) for name, module in selected.items()}


def _check_quantizable(name: str, module: nn.Module, config: QuantConfig) -> None:
    if isinstance(module, nn.Embedding):
        raise ValueError(
            f"targets: {name} is an embedding ({type(module).__name__}); token embeddings stay in floating "
            f"point and only Linear layers can be quantized; narrow the pattern or exclude {name!r}"
        )
    if isinstance(module, QuantLinear):
        act = module.input_quantizer
        have = (module.weight_quantizer.spec, module.method, act.mode, act.bits)
        if have != (config.spec, config.method, config.activations, config.act_bits):
            raise ValueError(f"targets: {name} is already quantized with other settings (two quantizations?)")
        return
    if not linear_like(module):
        raise ValueError(f"targets: {name} is a {type(module).__name__}, not a Linear layer")
    if is_conv1d(module) and module._buffers:
        raise ValueError(
            f"targets: {name} is a GPT-2 Conv1D carrying {sorted(module._buffers)} from another technique "
            f"(e.g. N:M masks); quantization turns it into a new nn.Linear, which would leave them behind; "
            f"do not combine both on Conv1D models, or exclude {name!r}"
        )
    shape = cast(Tensor, module.weight).shape
    in_f = shape[0] if is_conv1d(module) else shape[1]
    if config.granularity == "group" and in_f % config.group_size:
        raise ValueError(
            f"group_size: {name} has {in_f} input features, not divisible by group_size={config.group_size}; "
            f"choose a divisor, another granularity, or exclude {name!r}"
        )


def _swap_in(network: nn.Module, name: str, module: nn.Module, config: QuantConfig) -> QuantLinear:
    if isinstance(module, QuantLinear):
        return module  # the same model prepared again (e.g. a second Trainer)
    linear = conv1d_to_linear(module) if is_conv1d(module) else cast(nn.Linear, module)
    q = QuantLinear.from_linear(linear, config.spec, config.method, config.activations, config.act_bits)
    if linear is module:  # buffers other techniques attached (N:M masks) stay with the layer, same tensors
        for key, buf in module._buffers.items():
            if key not in q._buffers and buf is not None:
                q.register_buffer(key, buf, persistent=key not in module._non_persistent_buffers_set)
    for param in q.weight_quantizer.parameters():
        param._no_weight_decay = True  # type: ignore[attr-defined]
    _replace(network, name, q)
    return q


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def static_quantizers(network: nn.Module) -> list[ActivationQuantizer]:
    """The static-mode input quantizers of ``network`` (those :func:`calibrate_` measures)."""
    return [m for m in network.modules() if isinstance(m, ActivationQuantizer) and m.mode == "static"]


@contextmanager
def calibrating(network: nn.Module) -> Iterator[list[ActivationQuantizer]]:
    """Inside the block, static input quantizers record ``max|x|`` (from zero) instead of quantizing."""
    quantizers = static_quantizers(network)
    for aq in quantizers:
        aq.amax.zero_()
        aq.calibrating = True
    try:
        yield quantizers
    finally:
        for aq in quantizers:
            aq.calibrating = False


@torch.no_grad()
def calibrate_(network: nn.Module, batches: Iterable[Any], run: Callable[[Any], Any] | None = None) -> int:
    """Measure the static activation ranges (``amax``) of ``network`` on ``batches``, in eval mode.

    Args:
        network: a model prepared with ``activations="static"``.
        batches: the calibration batches (dicts are passed as keyword arguments).
        run: how to forward one batch (default: ``network(**batch)`` or ``network(batch)``).

    Returns:
        The number of batches seen.

    Raises:
        RuntimeError: ``batches`` was empty (the ranges would stay zero).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> _ = prepare_(net, QuantConfig(activations="static"))
        >>> calibrate_(net, [torch.ones(1, 4) * 3]), float(net[0].input_quantizer.amax)
        (1, 3.0)
    """
    run = run or (lambda b: network(**b) if isinstance(b, Mapping) else network(b))
    flags = [(m, m.training) for m in network.modules()]
    seen = 0
    with calibrating(network):
        network.eval()
        try:
            for batch in batches:
                run(batch)
                seen += 1
        finally:
            for module, flag in flags:
                module.training = flag
    if not seen:
        raise RuntimeError("activations='static': no batch to calibrate on (empty dataloader)")
    return seen


def convert_(network: nn.Module) -> dict[str, nn.Module]:
    """Fold every :class:`QuantLinear` of ``network`` into its inference layer, in place.

    :class:`Int8Linear` where the integer kernel applies (symmetric per-tensor/channel weights, 8-bit
    activations), else :class:`DequantLinear`; both compute what the QAT layer computes with
    gradients off. The export (:mod:`lightcook.export`) stores the same codes on disk.

    Returns:
        The new layers by name.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
        >>> _ = prepare_(net, QuantConfig(bits=8))
        >>> x = torch.randn(3, 8)
        >>> with torch.no_grad():
        ...     before = net(x)
        >>> sorted(type(m).__name__ for m in convert_(net).values())
        ['Int8Linear', 'Int8Linear']
        >>> torch.equal(net(x), before)
        True
    """
    quantized = {n: m for n, m in network.named_modules() if n and isinstance(m, QuantLinear)}
    converted: dict[str, nn.Module] = {}
    for name, q in quantized.items():
        compatible = _int8_incompatibility(q.weight_quantizer.spec, q.input_quantizer) is None
        converted[name] = (
            Int8Linear.from_quant_linear(q) if compatible else DequantLinear.from_quant_linear(q)
        )
        _replace(network, name, converted[name])
    return converted
