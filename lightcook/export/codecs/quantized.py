"""Quantized layers: integer codes (int4 / int2 packed) + scales, loaded on real integer kernels.

Every :class:`~lightcook.ops.quant.QuantLinear` is stored as

    ``<layer>.weight_packed``      uint8 ``(out, ceil(in * bits / 8))`` (:func:`~lightcook.ops.quant.pack_codes`)
    ``<layer>.weight_scale``       float ``scale_shape``: (1, 1), (out, 1) or (out, in // group_size, 1)
    ``<layer>.weight_zero_point``  uint8, same shape (asymmetric weights only)
    ``<layer>.weight_nm_indices``  uint8 positions, when the layer also carries an N:M mask: then only
                                   the kept codes are packed (``in // m * n`` per row)
    ``<layer>.bias``               plain (when the layer has one)
    ``<layer>.input_amax``         float scalar (static activations only)

with one manifest entry per layer. At load time each layer first becomes its reference module,
:class:`~lightcook.ops.quant.Int8Linear` (symmetric per-tensor / per-channel weights of any bit width
with 8-bit activations: one int8 GEMM, ``torch._int_mm`` or cpm_kernels) or
:class:`~lightcook.ops.quant.DequantLinear` (group-wise, asymmetric, weight-only or sub-8-bit
activations: dequantize, then a float matmul); then, unless the backend is ``"reference"``,
:func:`~lightcook.ops.kernels.install_kernels_` puts it on the load-time kernels
(:class:`~lightcook.ops.kernels.KernelLinear`: weight-only packed int8 / int4 for few rows, int8 GEMM
or a dequantized weight for many). ``model.quantized_kernels`` names the kernel(s) of every layer.

Example:
    >>> from lightcook.export.codecs.base import Encoding
    >>> from lightcook.ops.quant import QuantLinear, QuantSpec
    >>> net = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(8, 4), QuantSpec(bits=4)))
    >>> enc = Encoding(net)
    >>> entry = QuantizedCodec().encode(enc)
    >>> entry["0"]["format"], sorted(enc.tensors), enc.size(["0.weight_packed"])
    ('int8', ['0.bias', '0.weight_packed', '0.weight_scale'], 16)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.export.codecs.base import Codec, Decoding, Encoding, LayerBytes, kept_weights, nm_packed
from lightcook.ops.kernels import install_kernels_
from lightcook.ops.names import MASK
from lightcook.ops.quant import (
    ActivationQuantizer,
    DequantLinear,
    Int8Linear,
    QuantLinear,
    QuantSpec,
    pack_codes,
    scale_shape,
    unpack_codes,
)
from lightcook.ops.sparsity import nm_storage_bytes, pack_nm, unpack_nm

__all__ = ["DEQUANT", "INT8", "QuantizedCodec", "int8_kernel_compatible", "quantized_layers"]

INT8, DEQUANT = "int8", "dequant"


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The :class:`QuantLinear` modules of ``model``, by qualified name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}


def int8_kernel_compatible(spec: QuantSpec, act_mode: str, act_bits: int) -> bool:
    """Whether a layer runs as :class:`Int8Linear`: symmetric per-tensor/channel weights (8, 4 or
    2 bits: their codes are int8 values) and 8-bit dynamic or static activations."""
    return (
        spec.symmetric
        and spec.granularity in ("tensor", "channel")
        and act_mode in ("dynamic", "static")
        and act_bits == 8
    )


# --------------------------------------------------------------------------- encode


def describe(q: QuantLinear, nm: tuple[int, int] | None) -> dict[str, Any]:
    """The manifest entry of one layer, its ``weight_bytes`` computed from shapes alone.

    ``weight_bytes``: packed codes + scales (+ zero points, + N:M positions when ``nm``).
    """
    spec, act = q.weight_quantizer.spec, q.input_quantizer
    n_in, n_out = q.in_features, q.out_features
    cols = n_in // nm[1] * nm[0] if nm else n_in
    scales = math.prod(scale_shape((n_out, n_in), spec))
    scale_bytes = 8 if q.weight.dtype == torch.float64 else 4  # quantization math runs in fp32 / fp64
    weight = n_out * math.ceil(cols * spec.bits / 8) + scales * (scale_bytes + (0 if spec.symmetric else 1))
    if nm:
        weight += nm_storage_bytes(n_out, n_in, *nm, 0)  # the positions alone
    entry = {
        "format": INT8 if int8_kernel_compatible(spec, act.mode, act.bits) else DEQUANT,
        "in_features": n_in,
        "out_features": n_out,
        "bias": q.bias is not None,
        "bits": spec.bits,
        "granularity": spec.granularity,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "method": q.method,
        "act_mode": act.mode,
        "act_bits": act.bits,
        "weight_bytes": weight,
        "fp32_weight_bytes": n_in * n_out * 4,
    }
    return {**entry, "nm": list(nm)} if nm else entry


def _tensors(name: str, q: QuantLinear, nm: tuple[int, int] | None) -> dict[str, Tensor]:
    """The stored tensors of one layer (keys prefixed with ``name``)."""
    spec, act = q.weight_quantizer.spec, q.input_quantizer
    if act.mode == "static" and not bool(act.amax > 0):
        raise ValueError(f"save_compressed: {name} has static activations that were never calibrated")
    with torch.no_grad():
        codes = q.weight_quantizer.codes(q.weight)  # (out, in) int8, or uint8 when asymmetric
        scale, zero_point = q.weight_quantizer.scale_and_zero_point(q.weight)
    out: dict[str, Tensor] = {}
    if nm:
        codes, out["weight_nm_indices"] = pack_nm(codes, getattr(q, MASK), *nm)
    out["weight_packed"] = pack_codes(codes, spec.bits, spec.symmetric)
    out["weight_scale"] = scale
    if not spec.symmetric:
        out["weight_zero_point"] = zero_point.to(torch.uint8)  # integers in [0, 2^bits - 1]
    if q.bias is not None:
        out["bias"] = q.bias.detach()
    if act.mode == "static":
        out["input_amax"] = act.amax.detach().float()
    return {f"{name}.{k}": v for k, v in out.items()}


def _other_bytes(q: QuantLinear) -> int:
    """Stored bytes of a layer besides its weight: bias and static activation range."""
    bias = 0 if q.bias is None else q.bias.numel() * q.bias.element_size()
    return bias + (4 if q.input_quantizer.mode == "static" else 0)


# --------------------------------------------------------------------------- load


def _spec(entry: Mapping[str, Any]) -> QuantSpec:
    return QuantSpec(entry["bits"], entry["granularity"], entry["group_size"], entry["symmetric"])


def _static_scale(amax: Tensor, bits: int) -> Tensor:
    """The static activation scale exactly as :class:`ActivationQuantizer` computes it."""
    act = ActivationQuantizer("static", bits)
    act.amax.copy_(amax)
    return act.static_scale()


def _build_int8(entry: Mapping[str, Any], t: dict[str, Tensor], dtype: torch.dtype) -> Int8Linear:
    in_f, out_f = entry["in_features"], entry["out_features"]
    m = Int8Linear(in_f, out_f, entry["bias"], entry["act_mode"], dtype=dtype)
    m.weight_codes.copy_(unpack_codes(t["weight_packed"], entry["bits"], in_f, signed=True))
    m.weight_scale.copy_(t["weight_scale"].float().expand(out_f, 1))
    if entry["bias"]:
        cast(Tensor, m.bias).copy_(t["bias"])
    if entry["act_mode"] == "static":
        cast(Tensor, m.act_scale).copy_(_static_scale(t["input_amax"], entry["act_bits"]))
    return m


def _build_dequant(entry: Mapping[str, Any], t: dict[str, Tensor], dtype: torch.dtype) -> DequantLinear:
    m = DequantLinear(
        entry["in_features"],
        entry["out_features"],
        _spec(entry),
        entry["bias"],
        entry["act_mode"],
        entry["act_bits"],
        dtype=dtype,
    )
    m.weight_packed.copy_(t["weight_packed"])
    m.weight_scale = t["weight_scale"].clone()
    zero_point = t.get("weight_zero_point")
    m.weight_zero_point = (
        torch.zeros_like(m.weight_scale) if zero_point is None else zero_point.to(m.weight_scale.dtype)
    )
    if entry["bias"]:
        cast(Tensor, m.bias).copy_(t["bias"])
    if entry["act_mode"] == "static":
        m.input_quantizer.amax.copy_(t["input_amax"])
    return m


def _dense_codes(entry: Mapping[str, Any], t: dict[str, Tensor]) -> None:
    """Turn an N:M-packed layer's tensors back into the dense packed codes the builders read."""
    n, m = entry["nm"]
    bits, signed, in_f = entry["bits"], entry["symmetric"], entry["in_features"]
    values = unpack_codes(t.pop("weight_packed"), bits, in_f // m * n, signed)
    codes = unpack_nm(values, t.pop("weight_nm_indices"), n, m, in_f)
    t["weight_packed"] = pack_codes(codes, bits, signed)


def _take(name: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    prefix = f"{name}."
    return {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


class QuantizedCodec(Codec):
    """:class:`QuantLinear` layers ↔ packed integer codes + scales ↔ ``Int8Linear`` / ``DequantLinear``."""

    name = "quantized"

    def _layers(self, enc: Encoding) -> dict[str, tuple[QuantLinear, tuple[int, int] | None]]:
        return {
            n: (q, enc.nm if nm_packed(q, enc.nm) else None) for n, q in quantized_layers(enc.net).items()
        }

    def _record(self, enc: Encoding, name: str, q: QuantLinear, entry: Mapping[str, Any]) -> None:
        enc.claim(name, q)
        techniques = ["nm", self.name] if "nm" in entry else [self.name]
        enc.layers[name] = LayerBytes(
            q.in_features * q.out_features, entry["weight_bytes"], kept_weights(q), techniques
        )

    def encode(self, enc: Encoding) -> dict[str, Any] | None:
        entries = {}
        for name, (q, nm) in self._layers(enc).items():
            for key, tensor in _tensors(name, q, nm).items():
                enc.store(key, tensor)
            entries[name] = describe(q, nm)
            self._record(enc, name, q, entries[name])
        return entries or None

    def estimate_bytes(self, enc: Encoding) -> dict[str, Any] | None:
        entries = {}
        for name, (q, nm) in self._layers(enc).items():
            entries[name] = describe(q, nm)
            enc.count(f"{name}.weight_packed", entries[name]["weight_bytes"] + _other_bytes(q))
            self._record(enc, name, q, entries[name])
        return entries or None

    def decode(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        dec.held[self.name] = {name: _take(name, dec.tensors) for name in entry}
        dec.filled |= {f"{name}.{p}" for name in entry for p in ("weight", "bias")}

    def finish(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        layers = dec.held.pop(self.name)
        for name, layer in entry.items():
            if "nm" in layer:
                _dense_codes(layer, layers[name])
            build = _build_int8 if layer["format"] == INT8 else _build_dequant
            dec.model.set_submodule(name, build(layer, layers[name], dec.dtype).to(dec.device).eval())
        dec.model.quantized_formats = {name: layer["format"] for name, layer in entry.items()}  # type: ignore[assignment]
        kernels = install_kernels_(dec.model, entry, dec.backend, dtype=dec.dtype)
        dec.model.quantized_kernels = kernels  # type: ignore[assignment]
