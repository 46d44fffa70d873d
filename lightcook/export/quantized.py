"""Real low-bit export of quantization-aware models: int8 codes (int4 / int2 packed) + scales.

Every :class:`~lightcook.ops.quant.QuantLinear` of the model is stored as

    ``<layer>.weight_packed``      uint8 ``(out, ceil(in * bits / 8))`` (:func:`~lightcook.ops.quant.pack_codes`)
    ``<layer>.weight_scale``       float ``scale_shape``: (1, 1), (out, 1) or (out, in // group_size, 1)
    ``<layer>.weight_zero_point``  uint8, same shape (asymmetric weights only)
    ``<layer>.bias``               plain (when the layer has one)
    ``<layer>.input_amax``         float scalar (static activations only)

with one manifest entry per layer; everything else (embeddings, norms, the LM head unless it was
quantized) is stored as it is. :func:`load_quantized` rebuilds the Hugging Face model and swaps each
stored layer for :class:`~lightcook.ops.quant.Int8Linear` (symmetric per-tensor / per-channel
weights of any bit width with 8-bit activations: one int8 GEMM kernel, ``torch._int_mm`` or
cpm_kernels) or :class:`~lightcook.ops.quant.DequantLinear` (group-wise, asymmetric, weight-only or
sub-8-bit activations: dequantize, then a float matmul). GPT-2 ``Conv1D`` layers were turned into
``nn.Linear`` by the quantization callback; they come back as the same integer layers.

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.ops.quant import QuantLinear, QuantSpec
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> mlp = model.model.layers[0].mlp
    >>> mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, QuantSpec(bits=8))
    >>> loaded = load_quantized(export_quantized(model, tempfile.mkdtemp() + "/q"))
    >>> type(loaded.model.layers[0].mlp.up_proj).__name__
    'Int8Linear'
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     torch.equal(model(ids).logits, loaded(ids).logits)
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightcook.export.common import load_plain_tensors, model_from_config, read_export, write_export
from lightcook.ops.quant import (
    ActivationQuantizer,
    DequantLinear,
    Int8Linear,
    QuantLinear,
    QuantSpec,
    pack_codes,
    unpack_codes,
)

__all__ = ["TECHNIQUE", "export_quantized", "int8_kernel_compatible", "load_quantized", "quantized_layers"]

TECHNIQUE = "quantized"
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


# --------------------------------------------------------------------------- export


def _encode_layer(name: str, q: QuantLinear) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Stored tensors (keys prefixed with ``name``) and the manifest entry of one layer."""
    spec, act = q.weight_quantizer.spec, q.input_quantizer
    if act.mode == "static" and not bool(act.amax > 0):
        raise ValueError(f"export_quantized: {name} has static activations that were never calibrated")
    with torch.no_grad():
        codes = q.weight_quantizer.codes(q.weight)  # (out, in) int8, or uint8 when asymmetric
        scale, zero_point = q.weight_quantizer.scale_and_zero_point(q.weight)
    weights = {"weight_packed": pack_codes(codes, spec.bits, spec.symmetric), "weight_scale": scale}
    if not spec.symmetric:
        weights["weight_zero_point"] = zero_point.to(torch.uint8)  # integers in [0, 2^bits - 1]
    tensors = dict(weights)
    if q.bias is not None:
        tensors["bias"] = q.bias.detach()
    if act.mode == "static":
        tensors["input_amax"] = act.amax.detach().float()
    kind = INT8 if int8_kernel_compatible(spec, act.mode, act.bits) else DEQUANT
    entry = {
        "format": kind,
        "in_features": q.in_features,
        "out_features": q.out_features,
        "bias": q.bias is not None,
        "bits": spec.bits,
        "granularity": spec.granularity,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "method": q.method,
        "act_mode": act.mode,
        "act_bits": act.bits,
        "weight_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "fp32_weight_bytes": q.in_features * q.out_features * 4,
    }
    return {f"{name}.{k}": v for k, v in tensors.items()}, entry


def _under(key: str, prefixes: dict[str, Any]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def export_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` with every :class:`QuantLinear` stored as integer codes + scales.

    Args:
        model: the network holding ``QuantLinear`` layers (a Hugging Face model, so that
            :func:`load_quantized` can rebuild it; e.g. ``pl_module.model`` after
            :class:`~lightcook.callbacks.quantization.QuantizationCallback` set it up).
        path: export folder (written atomically; replaced if present).

    Returns:
        ``path``. The manifest's ``weight_bytes`` / ``fp32_weight_bytes`` compare the stored
        quantized weights (codes, scales, zero points) with float32 weights of the same layers.

    Raises:
        ValueError: the model has no ``QuantLinear``, or a static-activation layer was never
            calibrated (its ``amax`` is 0).

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(QuantLinear.from_linear(nn.Linear(8, 4), QuantSpec(bits=4)))
        >>> export_quantized(net, tempfile.mkdtemp() + "/q").name
        'q'
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("export_quantized: the model has no QuantLinear layer; nothing to export")
    stored: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    for name, q in layers.items():
        tensors, entries[name] = _encode_layer(name, q)
        stored.update(tensors)
    plain = {k: v for k, v in model.state_dict().items() if not _under(k, layers)}
    manifest = {
        "technique": TECHNIQUE,
        "dtype": str(next(iter(layers.values())).weight.dtype).removeprefix("torch."),
        "weight_bytes": sum(e["weight_bytes"] for e in entries.values()),
        "fp32_weight_bytes": sum(e["fp32_weight_bytes"] for e in entries.values()),
        "layers": entries,
    }
    return write_export(path, model, {**plain, **stored}, manifest)


# --------------------------------------------------------------------------- load


def _spec(entry: dict[str, Any]) -> QuantSpec:
    return QuantSpec(entry["bits"], entry["granularity"], entry["group_size"], entry["symmetric"])


def _static_scale(amax: Tensor, bits: int) -> Tensor:
    """The static activation scale exactly as :class:`ActivationQuantizer` computes it."""
    act = ActivationQuantizer("static", bits)
    act.amax.copy_(amax)
    return act.static_scale()


def _build_int8(entry: dict[str, Any], t: dict[str, Tensor], dtype: torch.dtype) -> Int8Linear:
    in_f, out_f = entry["in_features"], entry["out_features"]
    m = Int8Linear(in_f, out_f, entry["bias"], entry["act_mode"], dtype=dtype)
    m.weight_codes.copy_(unpack_codes(t["weight_packed"], entry["bits"], in_f, signed=True))
    m.weight_scale.copy_(t["weight_scale"].float().expand(out_f, 1))
    if entry["bias"]:
        m.bias.copy_(t["bias"])
    if entry["act_mode"] == "static":
        m.act_scale.copy_(_static_scale(t["input_amax"], entry["act_bits"]))
    return m


def _build_dequant(entry: dict[str, Any], t: dict[str, Tensor], dtype: torch.dtype) -> DequantLinear:
    spec = _spec(entry)
    m = DequantLinear(
        entry["in_features"],
        entry["out_features"],
        spec,
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
        m.bias.copy_(t["bias"])
    if entry["act_mode"] == "static":
        m.input_quantizer.amax.copy_(t["input_amax"])
    return m


def _layer_tensors(name: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    prefix = f"{name}."
    return {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an export of :func:`export_quantized` with integer layers, ready for inference.

    Args:
        path: folder written by :func:`export_quantized`.
        device: where the model goes (``Int8Linear`` uses ``torch._int_mm`` on CPU and CUDA,
            cpm_kernels on CUDA when installed).

    Returns:
        The Hugging Face model in eval mode; stored layers are ``Int8Linear`` or ``DequantLinear``
        (the layer names and formats are in ``model.quantized_formats``).

    Raises:
        ValueError: not a quantized export, or no ``config.json`` to rebuild the model from.

    Example:
        >>> # model = load_quantized("outputs/runs/<id>/quantized"); model(input_ids).logits
    """
    manifest, tensors, config = read_export(path)
    if manifest.get("technique") != TECHNIQUE:
        raise ValueError(f"{path}: a {manifest.get('technique')!r} export, not {TECHNIQUE!r}")
    if config is None:
        raise ValueError(f"{path}: no config.json; load_quantized rebuilds Hugging Face models only")
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = model_from_config(config).to(dtype)
    layers = {name: _layer_tensors(name, tensors) for name in manifest["layers"]}
    compressed = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    load_plain_tensors(model, tensors, manifest, compressed)
    for name, entry in manifest["layers"].items():
        build = _build_int8 if entry["format"] == INT8 else _build_dequant
        model.set_submodule(name, build(entry, layers[name], dtype))
    model.quantized_formats = {name: entry["format"] for name, entry in manifest["layers"].items()}
    return model.to(device).eval()
