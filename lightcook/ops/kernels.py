"""Inference kernels for exported quantized layers, chosen at load time.

:func:`lightcook.export.load_compressed` first rebuilds every quantized layer as its reference module
(:class:`~lightcook.ops.quant.Int8Linear` or :class:`~lightcook.ops.quant.DequantLinear`: exact, but
slow on CPU), then :func:`install_kernels_` swaps each one for a :class:`KernelLinear` built from the
same integer codes and scales. A :class:`KernelLinear` holds one or two *paths*, both built once, and
picks one per call by the rows it gets (``rows = x.numel() // in_features``):

    ``rows <= threshold`` (decode, a few tokens): a weight-only packed kernel, memory-bound, reads
        1 byte (``int8pack``: ``torch.ops.aten._weight_int8pack_mm``) or 1/2 byte
        (``int4pack``: ``_weight_int4pack_mm_for_cpu``) per weight, in bfloat16;
    ``rows > threshold`` (prefill, many tokens): the int8 GEMM ``torch._int_mm`` with per-token (or
        the calibrated static) activation codes (``int_mm``) for layers exported as W8A8 / W4A8 / W2A8,
        else a bfloat16 ``F.linear`` over the weight dequantized once at load (``dense``).

Backends (:func:`available_backends` lists those a device and dtype can run):

    ``"reference"``  the reference modules as they are (exact; any device and dtype).
    ``"dense"``      every layer dequantized once at load to the model dtype, ``F.linear`` (any device;
                     2 bytes per weight in memory in bfloat16).
    ``"packed"``     weight-only packed kernels for every row count: the least memory (int4 codes stay
                     4-bit), fast at decode, slow at prefill. CPU, bfloat16.
    ``"dispatch"``   ``packed`` for few rows, ``int_mm`` / ``dense`` for many. CPU, bfloat16.
    ``"auto"``       the fastest available: ``dispatch`` on a CPU in bfloat16, ``dense`` on CUDA in
                     float16 / bfloat16, else ``reference``.

Numerics, path by path, against the reference module on the same input:

    ``int_mm``  the same activation codes, the same exact int32 products and the same float32 rescale
                operations as :func:`~lightcook.ops.quant.int8_linear`: bit-identical.
    ``dense``   for a :class:`~lightcook.ops.quant.DequantLinear` the very ops of its forward:
                bit-identical; for an :class:`~lightcook.ops.quant.Int8Linear` the activation codes are
                dequantized and multiplied in floating point (float rounding only).
    ``int8pack`` / ``int4pack``  *weight-only*: 8-bit activation quantization, which exists only to feed
                an integer GEMM, is skipped (activation quantization below 8 bits is part of the trained
                model and kept); the scales (and zero points) are rounded to bfloat16 and the kernel
                rounds its float32 accumulator to bfloat16 once, so each output is within
                ``2**-8 * (|x| @ m.T + |bias|)`` of the weight-only float product, ``m = |w|``; for
                asymmetric codes ``c`` with zero point ``zp`` (int4pack rounds the scale and the zero
                term separately) ``m = (|c - 8| + |8 - zp|) * scale``.

A layer a kernel cannot take (asymmetric or group-wise 8-bit codes for ``int8pack``; a group size with
no divisor in {32, 64, 128, 256}, or outputs not a multiple of 16, for ``int4pack``; inputs not a
multiple of 16) keeps its reference module; :func:`install_kernels_` says so in one warning.
Projections inside a :class:`~lightcook.ops.moe.MoEFFN` keep theirs silently: its sparse path reads
their weights directly.

Example:
    >>> from lightcook.ops.quant import Int8Linear
    >>> ref = Int8Linear.from_float(torch.nn.Linear(64, 32))
    >>> fast = kernel_linear(ref, "dispatch")
    >>> fast.kernel, fast(torch.randn(1, 64, dtype=torch.bfloat16)).shape
    ('int8pack|int_mm', torch.Size([1, 32]))
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcook.ops.moe import MoEFFN
from lightcook.ops.quant import (
    ActivationQuantizer,
    DequantLinear,
    Int8Linear,
    QuantSpec,
    _quantize,
    group_view,
    int8_matmul,
    quantize_per_token,
    scale_shape,
)

__all__ = [
    "BACKENDS",
    "ROWS",
    "DensePath",
    "Int4PackPath",
    "Int8PackPath",
    "IntMMPath",
    "KernelLinear",
    "KernelPath",
    "UnsupportedLayer",
    "available_backends",
    "bf16_supported",
    "inference_dtype",
    "install_kernels_",
    "kernel_linear",
    "reference_kernel",
    "resolve_backend",
]

#: Backend names :func:`resolve_backend` accepts.
BACKENDS = ("auto", "reference", "dense", "packed", "dispatch")
#: Default :attr:`KernelLinear.threshold`: at most this many rows per call take the weight-only packed
#: kernel. Measured on one Xeon thread (576 -> 1536, bfloat16): int8pack 27 / 61 / 115 us at 1 / 4 / 8
#: rows, bfloat16 ``F.linear`` 83 / 78 / 99 us; beyond 4 rows the GEMM paths win.
ROWS = 4
_INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu takes, largest first
_ALIGN = 64  # bytes: the packed kernels load their rows with aligned vector loads


class UnsupportedLayer(ValueError):
    """A layer whose format or shape the requested kernel cannot take (the message says why)."""


# --------------------------------------------------------------------------- devices and backends


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes in bfloat16 natively (CPU: oneDNN's check; CUDA: the GPU's).

    Example:
        >>> isinstance(bf16_supported("cpu"), bool)
        True
    """
    device = torch.device(device)
    try:
        if device.type == "cpu":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if device.type == "cuda":
            return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return False


@functools.lru_cache(maxsize=1)
def _cpu_packed_kernels() -> bool:
    """Whether the CPU weight-only kernels exist here and run (a tiny aligned probe, once)."""
    ops = torch.ops.aten
    if not (bf16_supported("cpu") and hasattr(ops, "_weight_int8pack_mm")):
        return False
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16)
        scales = torch.ones(16, dtype=torch.bfloat16)
        y8 = ops._weight_int8pack_mm(x, torch.ones(16, 32, dtype=torch.int8), scales)
        packed = ops._convert_weight_to_int4pack_for_cpu(torch.full((16, 32), 9, dtype=torch.int32), 1)
        y4 = ops._weight_int4pack_mm_for_cpu(x, packed, 32, torch.zeros(1, 16, 2, dtype=torch.bfloat16) + 1)
    except (AttributeError, RuntimeError):
        return False
    return bool((y8 == 32).all() and (y4 == 64).all())  # 32 * 1, and 32 * ((9 - 8) * 1 + 1)


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The backends that can run on ``device`` with model dtype ``dtype`` (``"auto"`` aside).

    Example:
        >>> available_backends("cpu", torch.float32)
        ['reference', 'dense']
    """
    names = ["reference", "dense"]
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and _cpu_packed_kernels():
        names += ["packed", "dispatch"]
    return names


def resolve_backend(
    backend: str = "auto", device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> str:
    """The concrete backend ``backend`` names on ``device`` / ``dtype`` (``"auto"``: the fastest).

    Raises:
        ValueError: an unknown name, or one this device and dtype cannot run; lists the available ones.

    Example:
        >>> resolve_backend("auto", "cpu", torch.float32)
        'reference'
        >>> resolve_backend("packed", "cpu", torch.float32)
        Traceback (most recent call last):
        ...
        ValueError: backend 'packed' is not available on cpu with dtype torch.float32; available: ['auto', 'reference', 'dense']
    """
    device = torch.device(device)
    available = available_backends(device, dtype)
    if backend == "auto":
        if "dispatch" in available:
            return "dispatch"
        return "dense" if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) else "reference"
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {list(BACKENDS)}, got {backend!r}; available on {device.type} with "
            f"dtype {dtype}: {['auto', *available]}"
        )
    if backend not in available:
        raise ValueError(
            f"backend {backend!r} is not available on {device.type} with dtype {dtype}; "
            f"available: {['auto', *available]}"
        )
    return backend


def inference_dtype(device: str | torch.device, backend: str, stored: torch.dtype) -> torch.dtype:
    """The model dtype a load uses when none is asked for: bfloat16 where ``device`` supports it and
    ``backend`` is not ``"reference"``, else ``stored`` (the export's dtype).

    Example:
        >>> inference_dtype("cpu", "reference", torch.float32)
        torch.float32
    """
    if backend == "reference" or not bf16_supported(device):
        return stored
    return torch.bfloat16


# --------------------------------------------------------------------------- the exported layer


@dataclass(frozen=True)
class _Layer:
    """The integer codes and scales of one reference module, in one form for every path."""

    spec: QuantSpec  # how ``codes`` relate to the weights
    codes: Tensor  # (out, in): int8 when symmetric, uint8 otherwise
    scale: Tensor  # float32, scale_shape
    zero_point: Tensor  # float32, scale_shape (zeros when symmetric)
    bias: Tensor | None  # (out,), the model dtype
    act: ActivationQuantizer  # the input quantization of the reference module
    gemm: bool  # the reference runs an int8 GEMM (Int8Linear)

    @classmethod
    def of(cls, module: nn.Module) -> _Layer:
        if isinstance(module, Int8Linear):
            spec = QuantSpec(bits=8, granularity="channel", symmetric=True)  # codes of any width, as int8
            act = ActivationQuantizer(module.act_mode, 8)
            if module.act_scale is not None:  # static: the scale back as the range it came from
                act.amax = module.act_scale.detach().float() * act.qmax
            scale = module.weight_scale.float()
            return cls(spec, module.weight_codes, scale, torch.zeros_like(scale), module.bias, act, True)
        if isinstance(module, DequantLinear):
            scale = module.weight_scale.float()
            act = copy.deepcopy(module.input_quantizer)
            zero_point = module.weight_zero_point.float()
            return cls(module.spec, module.weight_codes(), scale, zero_point, module.bias, act, False)
        raise UnsupportedLayer(f"expected an Int8Linear or DequantLinear, got {type(module).__name__}")

    @property
    def shape(self) -> tuple[int, int]:
        return cast("tuple[int, int]", tuple(self.codes.shape))

    def sub8_act(self) -> ActivationQuantizer | None:
        """The input quantization a weight-only path keeps: only below 8 bits."""
        return self.act if self.act.mode != "none" and self.act.bits < 8 else None


def _aligned(x: Tensor) -> Tensor:
    """``x`` contiguous at an aligned address (the packed kernels read rows with aligned loads)."""
    x = x.contiguous()
    return x if x.data_ptr() % _ALIGN == 0 else x.clone()


def _fresh(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous, aligned copy of ``t`` (loaded tensors may be views into a mapped file)."""
    return t.detach().to(dtype or t.dtype).contiguous().clone()


def _bias(bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if bias is None else _fresh(bias, dtype)


# --------------------------------------------------------------------------- paths


class KernelPath(nn.Module):
    """One way to compute a layer: 2-D ``x`` (M, in) in :attr:`dtype` -> (M, out).

    Attributes:
        kernel: the kernel's name.
        dtype: the dtype it takes and returns (``None``: any; :class:`IntMMPath`).
    """

    kernel: ClassVar[str] = ""
    bias: Tensor | None

    def __init__(
        self, out_features: int, in_features: int, bias: Tensor | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel!r}"


class Int8PackPath(KernelPath):
    """Weight-only int8: ``_weight_int8pack_mm(x, codes, scale)``, one bfloat16 scale per output.

    Takes symmetric per-tensor / per-channel codes of any width (they are int8 values) and inputs a
    multiple of 16. See the module notes for the numerics.

    Example:
        >>> from lightcook.ops.quant import Int8Linear
        >>> path = Int8PackPath.of(Int8Linear.from_float(torch.nn.Linear(32, 16)))
        >>> path(torch.randn(2, 32, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """

    kernel = "int8pack"
    codes: Tensor
    scales: Tensor

    def __init__(
        self,
        codes: Tensor,
        scale: Tensor,
        bias: Tensor | None = None,
        act: ActivationQuantizer | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(codes.shape[0], codes.shape[1], _bias(bias, dtype), dtype)
        self.register_buffer("codes", codes)  # (out, in) int8, shared with an IntMMPath
        self.register_buffer("scales", _fresh(scale.reshape(-1).expand(codes.shape[0]), dtype))  # (out,)
        self.act = act

    @classmethod
    def of(
        cls, module: nn.Module, dtype: torch.dtype = torch.bfloat16, codes: Tensor | None = None
    ) -> Int8PackPath:
        """Build from a reference module; ``codes``: its int8 codes already copied (to share them)."""
        layer = _Layer.of(module)
        _check_int8pack(layer)
        codes = _fresh(layer.codes.to(torch.int8)) if codes is None else codes
        return cls(codes, layer.scale, layer.bias, layer.sub8_act(), dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = _aligned(x if self.act is None else self.act(x))
        y = torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)
        return y if self.bias is None else y.add_(self.bias)


def _check_int8pack(layer: _Layer) -> None:
    spec, (_, in_f) = layer.spec, layer.shape
    if not spec.symmetric or spec.granularity == "group":
        raise UnsupportedLayer(f"int8pack takes symmetric per-tensor/channel codes, not {_describe(spec)}")
    if in_f % 16:
        raise UnsupportedLayer(f"int8pack needs in_features divisible by 16, got {in_f}")


def _describe(spec: QuantSpec) -> str:
    kind = "symmetric" if spec.symmetric else "asymmetric"
    group = f" group {spec.group_size}" if spec.granularity == "group" else f" per-{spec.granularity}"
    return f"{spec.bits}-bit {kind}{group}"


def _int4_group(layer: _Layer) -> int:
    """The kernel group size for ``layer``: the largest of 256..32 dividing its scale group."""
    spec, (out_f, in_f) = layer.spec, layer.shape
    if spec.bits > 4:
        raise UnsupportedLayer(f"int4pack takes codes of at most 4 bits, not {_describe(spec)}")
    if out_f % 16:
        raise UnsupportedLayer(f"int4pack needs out_features divisible by 16, got {out_f}")
    size = spec.group_size if spec.granularity == "group" else in_f
    for group in _INT4_GROUPS:
        if size % group == 0:
            return group
    raise UnsupportedLayer(f"int4pack needs scale groups divisible by 32, 64, 128 or 256, got {size}")


class Int4PackPath(KernelPath):
    """Weight-only int4: ``_weight_int4pack_mm_for_cpu`` with per-group bfloat16 scales and zeros.

    The kernel computes ``w = (u - 8) * s + z`` for unsigned 4-bit ``u`` per group of ``g`` inputs.
    Codes ``c`` with ``w = (c - zp) * scale`` map onto it as ``u = c + 8, z = 0`` (symmetric, zero point
    0) or ``u = c, z = (8 - zp) * scale`` (asymmetric); a per-channel / per-tensor scale, or a group of
    ``G`` inputs, is repeated over kernel groups of ``g`` dividing ``G`` (the same weights). 2-bit codes
    fit too.

    Example:
        >>> from lightcook.ops.quant import DequantLinear, QuantLinear, QuantSpec
        >>> spec = QuantSpec(bits=4, granularity="group", group_size=32, symmetric=False)
        >>> ref = DequantLinear.from_quant_linear(QuantLinear.from_linear(torch.nn.Linear(64, 16), spec))
        >>> path = Int4PackPath.of(ref)
        >>> path.groupsize, path(torch.randn(3, 64, dtype=torch.bfloat16)).shape
        (32, torch.Size([3, 16]))
    """

    kernel = "int4pack"
    packed: Tensor
    scales_and_zeros: Tensor

    def __init__(
        self,
        layer: _Layer,
        groupsize: int,
        act: ActivationQuantizer | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        out_f, in_f = layer.shape
        super().__init__(out_f, in_f, _bias(layer.bias, dtype), dtype)
        spec = layer.spec
        u = layer.codes.to(torch.int32) + (8 if spec.symmetric else 0)  # (out, in) in [0, 15]
        ratio = (spec.group_size if spec.granularity == "group" else in_f) // groupsize
        scale = self._per_group(layer.scale, spec, layer.shape, ratio)  # (out, in // groupsize)
        zero = (8 - self._per_group(layer.zero_point, spec, layer.shape, ratio)) * scale
        zeros = torch.zeros_like(scale) if spec.symmetric else zero
        saz = torch.stack([scale.t(), zeros.t()], dim=-1)  # (in // groupsize, out, 2)
        self.groupsize, self.act = groupsize, act
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1))
        self.register_buffer("scales_and_zeros", _fresh(saz, dtype))

    @staticmethod
    def _per_group(t: Tensor, spec: QuantSpec, shape: tuple[int, int], ratio: int) -> Tensor:
        """A :func:`~lightcook.ops.quant.scale_shape` d tensor as one float32 value per kernel group,
        (out, in // groupsize)."""
        if tuple(t.shape) != scale_shape(shape, spec):
            raise ValueError(f"expected a scale shaped {scale_shape(shape, spec)}, got {tuple(t.shape)}")
        per_row = t.float().reshape(t.shape[0], -1).expand(shape[0], -1)  # (out, scale groups)
        return per_row.repeat_interleave(ratio, dim=1)

    @classmethod
    def of(cls, module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Int4PackPath:
        """Build from a reference module (codes of at most 4 bits, or int8 codes within [-7, 7])."""
        layer = _Layer.of(module)
        if layer.gemm and layer.codes.numel() and int(layer.codes.abs().max()) <= 7:
            layer = replace(layer, spec=QuantSpec(4, "channel", symmetric=True))  # int8 codes of 4-bit values
        return cls(layer, _int4_group(layer), layer.sub8_act(), dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = _aligned(x if self.act is None else self.act(x))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.groupsize, self.scales_and_zeros)
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groupsize={self.groupsize}"


class IntMMPath(KernelPath):
    """W8A8: per-token dynamic (or the static) int8 activation codes, ``torch._int_mm``, float32 rescale.

    The same codes, exact int32 products and rescale operations as
    :func:`~lightcook.ops.quant.int8_linear`: bit-identical to the :class:`~lightcook.ops.quant.Int8Linear`
    it is built from, in any dtype; fast for many rows (the rescale runs in place).

    Example:
        >>> from lightcook.ops.quant import Int8Linear
        >>> ref = Int8Linear.from_float(torch.nn.Linear(32, 8))
        >>> x = torch.randn(5, 32)
        >>> torch.equal(IntMMPath.of(ref)(x), ref(x))
        True
    """

    kernel = "int_mm"
    codes: Tensor
    weight_scale: Tensor
    act_scale: Tensor | None

    def __init__(
        self, codes: Tensor, scale: Tensor, bias: Tensor | None = None, act_scale: Tensor | None = None
    ) -> None:
        super().__init__(codes.shape[0], codes.shape[1], None if bias is None else _fresh(bias), None)
        self.register_buffer("codes", codes)  # (out, in) int8
        self.register_buffer("weight_scale", _fresh(scale.float().reshape(1, -1).expand(1, codes.shape[0])))
        self.register_buffer("act_scale", None if act_scale is None else _fresh(act_scale.float()))

    @classmethod
    def of(cls, module: nn.Module, codes: Tensor | None = None) -> IntMMPath:
        """Build from an :class:`~lightcook.ops.quant.Int8Linear` (``codes``: shared int8 codes)."""
        if not isinstance(module, Int8Linear):
            raise UnsupportedLayer(
                f"int_mm needs an Int8Linear layer (W8A8 export), got {type(module).__name__}"
            )
        codes = _fresh(module.weight_codes) if codes is None else codes
        return cls(codes, module.weight_scale, module.bias, module.act_scale)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.detach().float()  # (M, K)
        if self.act_scale is None:
            a_codes, a_scale = quantize_per_token(x2)  # (M, K) int8, (M, 1)
        else:
            a_scale = self.act_scale
            a_codes = _quantize(x2, a_scale, 0.0, -127, 127).to(torch.int8)
        y = int8_matmul(a_codes, self.codes).to(torch.float32)  # (M, N), exact int32 products
        y.mul_(a_scale * self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias.to(torch.float32))
        return y.to(x.dtype)


class DensePath(KernelPath):
    """The weight dequantized once (``(codes - zero_point) * scale``, to the model dtype), ``F.linear``.

    Keeps the reference module's input quantization. From a :class:`~lightcook.ops.quant.DequantLinear`
    the same ops as its forward (bit-identical); costs 2 bytes per weight in bfloat16.

    Example:
        >>> from lightcook.ops.quant import DequantLinear, QuantLinear, QuantSpec
        >>> ref = DequantLinear.from_quant_linear(QuantLinear.from_linear(torch.nn.Linear(8, 4), QuantSpec(bits=4)))
        >>> x = torch.randn(3, 8)
        >>> torch.equal(DensePath.of(ref, torch.float32)(x), ref(x))
        True
    """

    kernel = "dense"
    weight: Tensor

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, act: ActivationQuantizer | None = None
    ) -> None:
        super().__init__(
            weight.shape[0],
            weight.shape[1],
            None if bias is None else _fresh(bias, weight.dtype),
            weight.dtype,
        )
        self.register_buffer("weight", weight)
        self.act = act

    @classmethod
    def of(cls, module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> DensePath:
        """Build from a reference module."""
        layer = _Layer.of(module)
        if isinstance(module, DequantLinear):
            weight = module.dequantized_weight().to(dtype)
        else:
            weight = (
                (group_view(layer.codes.float(), layer.spec) * layer.scale).reshape(layer.shape).to(dtype)
            )
        act = None if layer.act.mode == "none" else layer.act
        return cls(_fresh(weight), layer.bias, act)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x if self.act is None else self.act(x), self.weight, self.bias)


# --------------------------------------------------------------------------- the layer


class KernelLinear(nn.Module):
    """One exported quantized layer on load-time kernels: ``few`` for up to ``threshold`` rows per
    call, ``many`` above (``few`` for all rows when ``many`` is ``None``). Inference only.

    Args:
        few: the path for small calls (a weight-only packed kernel, or any path).
        many: the path for large calls, or ``None``.
        threshold: most rows per call that take ``few``.

    Example:
        >>> from lightcook.ops.quant import Int8Linear
        >>> ref = Int8Linear.from_float(torch.nn.Linear(32, 16))
        >>> layer = KernelLinear(Int8PackPath.of(ref), IntMMPath.of(ref), threshold=4)
        >>> layer.extra_repr()
        'in_features=32, out_features=16, kernels=int8pack (rows <= 4) | int_mm (rows > 4)'
        >>> layer(torch.randn(2, 3, 32, dtype=torch.bfloat16)).shape
        torch.Size([2, 3, 16])
    """

    def __init__(self, few: KernelPath, many: KernelPath | None = None, threshold: int = ROWS) -> None:
        super().__init__()
        if many is not None and (few.in_features, few.out_features) != (many.in_features, many.out_features):
            raise ValueError("KernelLinear: the two paths compute layers of different shapes")
        self.in_features, self.out_features = few.in_features, few.out_features
        self.few, self.many, self.threshold = few, many, threshold

    @property
    def kernel(self) -> str:
        """The kernel name(s): ``"int8pack"``, or ``"int8pack|int_mm"`` (few | many)."""
        return self.few.kernel if self.many is None else f"{self.few.kernel}|{self.many.kernel}"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        path = self.few if self.many is None or x2.shape[0] <= self.threshold else self.many
        return path(x2.to(path.dtype or x.dtype)).to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.many is None:
            return f"{shape}, kernels={self.few.kernel}"
        t = self.threshold
        return f"{shape}, kernels={self.few.kernel} (rows <= {t}) | {self.many.kernel} (rows > {t})"


def reference_kernel(module: nn.Module) -> str:
    """The kernel name of a reference module: ``"int8_linear"`` or ``"dequant"``.

    Example:
        >>> from lightcook.ops.quant import Int8Linear
        >>> reference_kernel(Int8Linear(4, 2))
        'int8_linear'
    """
    return "int8_linear" if isinstance(module, Int8Linear) else "dequant"


def _packed(module: nn.Module, dtype: torch.dtype) -> KernelPath:
    """The weight-only packed path of ``module``: int4pack for codes of at most 4 bits where it fits,
    else int8pack."""
    try:
        return Int4PackPath.of(module, dtype)
    except UnsupportedLayer as int4:
        try:
            return Int8PackPath.of(module, dtype)
        except UnsupportedLayer as int8:
            raise UnsupportedLayer(f"{int8}; {int4}") from None


def kernel_linear(
    module: nn.Module,
    backend: str = "dispatch",
    *,
    dtype: torch.dtype = torch.bfloat16,
    threshold: int = ROWS,
) -> KernelLinear:
    """The :class:`KernelLinear` of a reference module for a concrete ``backend``.

    ``"dense"`` and ``"packed"``: one path for every call; ``"dispatch"``: for an
    :class:`~lightcook.ops.quant.Int8Linear` int8pack (few rows) and int_mm (many) sharing one copy of
    the int8 codes, for a :class:`~lightcook.ops.quant.DequantLinear` int4pack / int8pack and dense.

    Args:
        module: an :class:`~lightcook.ops.quant.Int8Linear` or :class:`~lightcook.ops.quant.DequantLinear`.
        backend: ``"dense"``, ``"packed"`` or ``"dispatch"``.
        dtype: the model dtype (the packed kernels need bfloat16).
        threshold: see :class:`KernelLinear`.

    Raises:
        UnsupportedLayer: the layer's format or shape does not fit the kernel (the message says why).
        ValueError: another backend name.

    Example:
        >>> from lightcook.ops.quant import DequantLinear, QuantLinear, QuantSpec
        >>> spec = QuantSpec(bits=4, granularity="group", group_size=16)
        >>> ref = DequantLinear.from_quant_linear(QuantLinear.from_linear(torch.nn.Linear(64, 16), spec))
        >>> kernel_linear(ref, "packed")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightcook.ops.kernels.UnsupportedLayer: int8pack takes ...; int4pack needs scale groups divisible by 32, 64, 128 or 256, got 16
    """
    if backend == "dense":
        return KernelLinear(DensePath.of(module, dtype), None, threshold)
    if backend == "packed":
        return KernelLinear(_packed(module, dtype), None, threshold)
    if backend != "dispatch":
        raise ValueError(
            f"kernel_linear: backend must be one of ['dense', 'packed', 'dispatch'], got {backend!r}"
        )
    if isinstance(module, Int8Linear):
        codes = _fresh(module.weight_codes)  # one copy, read by both paths
        return KernelLinear(Int8PackPath.of(module, dtype, codes), IntMMPath.of(module, codes), threshold)
    return KernelLinear(_packed(module, dtype), DensePath.of(module, dtype), threshold)


def _in_moe(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), MoEFFN)


def install_kernels_(
    model: nn.Module,
    names: Iterable[str],
    backend: str = "auto",
    *,
    dtype: torch.dtype | None = None,
    threshold: int = ROWS,
) -> dict[str, str]:
    """Swap the named reference layers of ``model`` for :class:`KernelLinear`, in place.

    A layer the backend's kernels cannot take keeps its reference module; one warning lists why.

    Args:
        model: the loaded model (its quantized layers are :class:`~lightcook.ops.quant.Int8Linear` /
            :class:`~lightcook.ops.quant.DequantLinear`).
        names: qualified names of those layers.
        backend: a name of :data:`BACKENDS`.
        dtype: the model dtype (default: the dtype of the model's first floating parameter or buffer).
        threshold: see :class:`KernelLinear`.

    Returns:
        The kernel(s) of every named layer (:attr:`KernelLinear.kernel` or :func:`reference_kernel`).

    Raises:
        ValueError: ``backend`` is unknown or unavailable here (lists the available ones).

    Example:
        >>> from lightcook.ops.quant import Int8Linear
        >>> net = torch.nn.Sequential(Int8Linear.from_float(torch.nn.Linear(32, 16)))
        >>> install_kernels_(net, ["0"], "dense", dtype=torch.float32)
        {'0': 'dense'}
    """
    names = list(names)
    layers = {name: model.get_submodule(name) for name in names}
    device = next((t.device for m in layers.values() for t in m.buffers()), torch.device("cpu"))
    dtype = dtype or _model_dtype(model)
    resolved = resolve_backend(backend, device, dtype)
    kernels: dict[str, str] = {}
    unfit: dict[str, list[str]] = {}
    for name, module in layers.items():
        kernels[name] = reference_kernel(module)
        if resolved == "reference" or _in_moe(model, name):
            continue
        try:
            fast = kernel_linear(module, resolved, dtype=dtype, threshold=threshold)
        except UnsupportedLayer as err:
            unfit.setdefault(str(err), []).append(name)
            continue
        model.set_submodule(name, fast.to(device).eval())
        kernels[name] = fast.kernel
    if unfit:
        _warn_fallbacks(unfit, resolved, len(names))
    return kernels


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _warn_fallbacks(unfit: dict[str, list[str]], backend: str, total: int) -> None:
    count = sum(len(v) for v in unfit.values())
    why = "; ".join(f"{len(v)} layer(s), e.g. {v[0]}: {reason}" for reason, v in unfit.items())
    warnings.warn(
        f"backend {backend!r}: {count} of {total} quantized layers keep their reference modules "
        f"(Int8Linear / DequantLinear), their format does not fit the kernels: {why}",
        stacklevel=3,
    )
