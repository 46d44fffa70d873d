"""One export for any combination of techniques, and the loader that runs it with the real kernels.

:func:`export_compressed` takes the live network after training — with any of structured-pruning
gates, MoE FFNs, N:M ``weight_mask`` buffers, :class:`~lightcook.ops.quant.QuantLinear` layers — and
writes one folder in the shared lightcook format (:mod:`lightcook.export.common`), applying the
techniques in the canonical order of :mod:`lightcook.callbacks.base`:

1. **structured**: a copy of the network is sliced with the deterministic gates (heads, neurons and
   blocks physically removed); the per-block shapes go to the manifest's ``structure`` entry;
2. **moe**: every :class:`~lightcook.ops.moe.MoEFFN` is recorded (``moe``: spec per FFN); its experts'
   weights are stored like any other layer's (permuted, expert-contiguous) with the router tensors;
3. **nm**: masked layers are stored as kept values + 2-bit positions (``<layer>.weight.values`` /
   ``.indices``), or, when also quantized, as kept integer codes + positions;
4. **quantized**: integer codes (int4 / int2 packed) + scales per layer (``quantized``), as in
   :mod:`lightcook.export.quantized`.

Everything else (embeddings, norms, biases) is stored as it is, optionally cast to ``dtype``.
:func:`load_compressed` rebuilds the Hugging Face model: resized to the sliced shapes, MoE FFNs that
compute only the routed experts without gradients, W8A8 layers on the int8 GEMM (``torch._int_mm``),
other integer layers dequantized, and on CUDA non-quantized 2:4 layers as semi-structured sparse
tensors. Masks, gates and quantizer training state are not stored.

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.ops.quant import QuantLinear, QuantSpec
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> mlp = model.model.layers[0].mlp
    >>> mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, QuantSpec(bits=8))
    >>> mlp.up_proj.register_buffer("weight_mask", torch.tensor([True, False, True, False]).repeat(64, 8))
    >>> _ = mlp.up_proj.weight.data.mul_(mlp.up_proj.weight_mask)
    >>> path = export_compressed(model, tempfile.mkdtemp() + "/c", nm=(2, 4))
    >>> loaded = load_compressed(path)
    >>> read_manifest(path)["techniques"], type(loaded.model.layers[0].mlp.up_proj).__name__
    (['nm', 'quantized'], 'Int8Linear')
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightcook.export.common import MANIFEST, load_plain_tensors, model_from_config, read_export, write_export
from lightcook.export.moe import _wrap as wrap_moe
from lightcook.export.quantized import INT8, _build_dequant, _build_int8, _encode_layer, _layer_tensors
from lightcook.export.sparse import (
    MASK_SUFFIX,
    _pack_layer,
    _resolve_semi_structured,
    _to_semi_structured_,
    _unpack_into,
)
from lightcook.ops.architectures import get_architecture
from lightcook.ops.hard_concrete import GateSet
from lightcook.ops.moe import moe_modules
from lightcook.ops.quant import QuantLinear, pack_codes, unpack_codes
from lightcook.ops.slicing import apply_structure, describe_structure, slice_model
from lightcook.ops.sparsity import is_nm, pack_nm, unpack_nm

__all__ = ["TECHNIQUE", "export_compressed", "load_compressed", "read_manifest"]

TECHNIQUE = "compressed"
#: The manifest lists techniques in the callbacks' canonical order (slicing is applied first here).
CANONICAL = ("moe", "structured", "nm", "quantized")
GATES = "lightcook_gates"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The ``lightcook.json`` manifest of an export folder."""
    return json.loads((Path(path) / MANIFEST).read_text())


# --------------------------------------------------------------------------- export


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``; structured-pruning gate hooks are lifted for the copy (their closures
    point at the live model) and put back on the original."""
    gates = getattr(model, GATES, None)
    if isinstance(gates, GateSet):
        gates.remove_hooks()
        try:
            return copy.deepcopy(model)
        finally:
            gates.install_hooks(model)
    return copy.deepcopy(model)


def _masked_nm(model: nn.Module, nm: tuple[int, int] | None) -> dict[str, nn.Module]:
    """Layers whose ``weight_mask`` is ``n:m`` (other masks only zero weights: stored dense)."""
    if nm is None:
        return {}
    n, m = nm
    found = {}
    for name, module in model.named_modules():
        mask = module._buffers.get("weight_mask")
        if not isinstance(mask, Tensor):
            continue
        rows = mask.t() if type(module).__name__ == "Conv1D" else mask
        if is_nm(rows, n, m):
            found[name] = module
    return found


def _encode_quant_nm(name: str, q: QuantLinear, n: int, m: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A quantized N:M layer: only the kept integer codes (packed to ``bits``) + their positions."""
    tensors, entry = _encode_layer(name, q)
    spec = q.weight_quantizer.spec
    with torch.no_grad():
        codes = q.weight_quantizer.codes(q.weight)
    values, indices = pack_nm(codes, q.weight_mask, n, m)
    packed = pack_codes(values, spec.bits, spec.symmetric)
    tensors[f"{name}.weight_packed"] = packed
    tensors[f"{name}.weight_nm_indices"] = indices
    stored = [packed, indices, tensors[f"{name}.weight_scale"]]
    if f"{name}.weight_zero_point" in tensors:
        stored.append(tensors[f"{name}.weight_zero_point"])
    entry.update(nm=[n, m], weight_bytes=sum(t.numel() * t.element_size() for t in stored))
    return tensors, entry


def _under(key: str, names: Mapping[str, Any]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def export_compressed(
    model: nn.Module,
    path: str | Path,
    nm: tuple[int, int] | None = (2, 4),
    architecture: str | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the compressed ``model`` (left unchanged) to ``path``, atomically.

    Args:
        model: the trained network (``pl_module.model``), a Hugging Face model.
        path: export folder (replaced if present).
        nm: the ``(n, m)`` pattern of N:M masks to pack (``None``: store masked weights dense).
        architecture: layout override for slicing (a registered name or a layout dict; recorded).
        dtype: cast the floating tensors stored as they are (embeddings, norms, float layers).
        extra: more JSON data for the manifest (e.g. the callbacks' settings).

    Returns:
        ``path``. The manifest lists ``techniques`` (in canonical order) and, per technique, its layers;
        ``weight_bytes`` / ``fp32_weight_bytes`` compare the stored Linear weights with float32.

    Raises:
        ValueError: a static-activation layer was never calibrated; weights still parametrized (SR-STE).
    """
    net = _plain_copy(model)
    techniques: list[str] = []
    manifest: dict[str, Any] = {"technique": TECHNIQUE}
    if isinstance(getattr(net, GATES, None), GateSet):
        slice_model(net, None, architecture)
        arch = get_architecture(net, architecture)
        record = architecture if isinstance(architecture, str | Mapping) else arch.name
        manifest["structure"] = {
            "architecture": dict(record) if isinstance(record, Mapping) else record,
            "blocks": describe_structure(net, arch),
        }
        techniques.append("structured")
    state = net.state_dict()
    if any(".parametrizations." in f".{k}" for k in state):
        raise ValueError("export_compressed: weights are still parametrized (SR-STE); fold them first")
    moes = moe_modules(net)
    if moes:
        manifest["moe"] = {name: m.spec() for name, m in moes.items()}
        techniques.append("moe")
    quantized = {name: mod for name, mod in net.named_modules() if isinstance(mod, QuantLinear)}
    masked = _masked_nm(net, nm)
    stored: dict[str, Tensor] = {}
    nm_entries: dict[str, Any] = {}
    for name, module in masked.items():
        if name not in quantized:
            tensors, nm_entries[name] = _pack_layer(name, module, nm[0], nm[1], dtype)
            stored.update(tensors)
    q_entries: dict[str, Any] = {}
    for name, q in quantized.items():
        tensors, q_entries[name] = (
            _encode_quant_nm(name, q, *nm) if name in masked else _encode_layer(name, q)
        )
        stored.update(tensors)
    if masked:
        manifest["nm"] = {
            "n": nm[0],
            "m": nm[1],
            "layers": nm_entries,
            "quantized": sorted(set(masked) & set(quantized)),
        }
        techniques.append("nm")
    if quantized:
        manifest["quantized"] = q_entries
        techniques.append("quantized")
    skip = {entry["key"] for entry in nm_entries.values()}
    for key, tensor in state.items():
        if key in skip or key.endswith(MASK_SUFFIX) or _under(key, quantized):
            continue
        stored[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    manifest["techniques"] = sorted(techniques, key=CANONICAL.index)
    manifest["dtype"] = str(dtype or next(net.parameters()).dtype).removeprefix("torch.")
    manifest.update(_weight_bytes(net, stored, q_entries, nm_entries), **dict(extra or {}))
    return write_export(path, net, stored, manifest)


#: Linear layers inside the repeated transformer blocks (``...layers.3.mlp.up_proj``): what the
#: techniques compress. The LM head, embeddings and MoE routers are outside this count.
_BLOCK_LINEAR = re.compile(r"(.*\.)?\d+\..*")


def _weight_bytes(
    net: nn.Module, stored: Mapping[str, Tensor], q_entries: Mapping[str, Any], nm_entries: Mapping[str, Any]
) -> dict[str, int]:
    """Stored bytes of the blocks' Linear weights vs. the same weights in float32 (the folder size,
    measured with :func:`lightcook.io.bytes_on_disk`, covers everything else too)."""
    total = fp32 = 0
    for name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if name in q_entries:
            total += q_entries[name]["weight_bytes"]
            fp32 += q_entries[name]["fp32_weight_bytes"]
            continue
        if not isinstance(weight, Tensor) or weight.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        if not _BLOCK_LINEAR.fullmatch(name) or ".router." in f".{name}.":
            continue
        fp32 += weight.numel() * 4
        keys = (
            [f"{name}.weight.values", f"{name}.weight.indices"] if name in nm_entries else [f"{name}.weight"]
        )
        total += sum(stored[k].numel() * stored[k].element_size() for k in keys if k in stored)
    return {"weight_bytes": total, "fp32_weight_bytes": fp32}


# --------------------------------------------------------------------------- load


def _dense_codes(entry: Mapping[str, Any], t: dict[str, Tensor]) -> None:
    """Turn an N:M-packed quantized layer's tensors back into the dense packed codes the builders read."""
    n, m = entry["nm"]
    bits, signed, in_f = entry["bits"], entry["symmetric"], entry["in_features"]
    values = unpack_codes(t.pop("weight_packed"), bits, in_f // m * n, signed)
    codes = unpack_nm(values, t.pop("weight_nm_indices"), n, m, in_f)
    t["weight_packed"] = pack_codes(codes, bits, signed)


def load_compressed(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an :func:`export_compressed` folder as an inference model (eval mode).

    Returns:
        The Hugging Face model; ``model.compressed_techniques`` lists what was applied.

    Raises:
        ValueError: not a compressed export, no ``config.json``, or tensors that do not fit.

    Example:
        >>> # model = load_compressed("outputs/runs/<id>/compressed"); model(input_ids).logits
    """
    manifest, tensors, config = read_export(path)
    if manifest.get("technique") != TECHNIQUE:
        raise ValueError(f"{path}: a {manifest.get('technique')!r} export, not {TECHNIQUE!r}")
    if config is None:
        raise ValueError(f"{path}: no config.json; load_compressed rebuilds Hugging Face models only")
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = model_from_config(config).to(dtype)
    structure = manifest.get("structure")
    if structure:
        apply_structure(model, structure["blocks"], get_architecture(model, structure["architecture"]))
    for name, entry in manifest.get("moe", {}).items():
        wrap_moe(model, name, entry)
    nm = manifest.get("nm")
    if nm and nm["layers"]:
        _unpack_into(tensors, {"n": nm["n"], "m": nm["m"], "layers": nm["layers"]})
    q_entries = manifest.get("quantized", {})
    layers = {name: _layer_tensors(name, tensors) for name in q_entries}
    compressed = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    load_plain_tensors(model, tensors, manifest, compressed)
    unexpected = sorted(set(tensors) - set(model.state_dict()) - set(manifest.get("tied", {})))
    if unexpected:
        raise ValueError(f"{path}: tensors {unexpected[:4]} do not belong to the rebuilt model")
    for name, entry in q_entries.items():
        if "nm" in entry:
            _dense_codes(entry, layers[name])
        build = _build_int8 if entry["format"] == INT8 else _build_dequant
        model.set_submodule(name, build(entry, layers[name], dtype))
    model = model.to(device).eval()
    if nm and nm["layers"] and _resolve_semi_structured(None, torch.device(device), nm, dtype):
        _to_semi_structured_(model, list(nm["layers"]))
    model.compressed_techniques = list(manifest.get("techniques", []))
    return model
