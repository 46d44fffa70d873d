"""Packed N:M export: kept values + 2-bit in-group positions per Linear, everything else plain.

Every layer that carries an N:M ``weight_mask`` buffer (see
:class:`lightcook.callbacks.sparsity.SparsityCallback`) is stored as ``<layer>.weight.values``
``(out, in // m * n)`` and ``<layer>.weight.indices`` (uint8, :func:`~lightcook.ops.sparsity.pack_nm`),
listed in the manifest. GPT-2 ``Conv1D`` weights ``(in, out)`` are packed through their ``(out, in)``
view and flagged ``transposed``. Masks themselves are not stored: the indices are the mask.
:func:`load_sparse` rebuilds the Hugging Face model with dense weights; on CUDA with 2:4 it swaps
``nn.Linear`` weights to :func:`torch.sparse.to_sparse_semi_structured` tensors.

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> proj = model.model.layers[0].mlp.up_proj
    >>> mask = torch.tensor([True, True, False, False]).repeat(64, 8)
    >>> proj.register_buffer("weight_mask", mask)
    >>> out = export_sparse(model, tempfile.mkdtemp() + "/sparse", n=2, m=4)
    >>> loaded = load_sparse(out)
    >>> torch.equal(loaded.model.layers[0].mlp.up_proj.weight, proj.weight * mask)
    True
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightcook.export.common import load_plain_tensors, model_from_config, read_export, write_export
from lightcook.ops.sparsity import is_nm, nm_storage_bytes, pack_nm, unpack_nm

TECHNIQUE = "sparse"
MASK_SUFFIX = ".weight_mask"
_HALF = (torch.float16, torch.bfloat16)


def _is_conv1d(module: nn.Module) -> bool:
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def _out_in(tensor: Tensor, module: nn.Module) -> Tensor:
    return tensor.T if _is_conv1d(module) else tensor


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that carry a ``weight_mask`` buffer, by qualified name."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod._buffers.get("weight_mask"), Tensor)
    }


def _pack_layer(name: str, module: nn.Module, n: int, m: int, dtype: torch.dtype | None) -> tuple[dict, dict]:
    weight = _out_in(module.weight.detach(), module)  # (out, in)
    mask = _out_in(module.weight_mask, module)  # (out, in)
    if not is_nm(mask, n, m):
        raise ValueError(f"{name}.weight_mask is not {n}:{m} (an unfinished ramp or unstructured masks?)")
    values, indices = pack_nm(_cast(weight, dtype), mask, n, m)
    tensors = {f"{name}.weight.values": values, f"{name}.weight.indices": indices}
    entry = {
        "format": "nm",
        "key": f"{name}.weight",
        "shape": list(module.weight.shape),
        "transposed": _is_conv1d(module),
    }
    return tensors, entry


def export_sparse(
    model: nn.Module, path: str | Path, n: int = 2, m: int = 4, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model`` with every masked Linear packed as N:M values + position codes.

    Args:
        model: the network (a Hugging Face model for :func:`load_sparse` to rebuild it).
        path: export folder (written atomically; replaced if present).
        n: kept weights per group.
        m: group size along the input dimension (at most 16).
        dtype: cast floating tensors to this dtype (``None``: keep).

    Returns:
        ``path``.

    Raises:
        ValueError: no module carries a ``weight_mask``, a mask is not N:M, or a weight is still
            parametrized (fold SR-STE first).

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 2))
        >>> net[0].register_buffer("weight_mask", torch.tensor([True, False] * 8).reshape(2, 8))
        >>> export_sparse(net, tempfile.mkdtemp() + "/x", n=2, m=4).name
        'x'
    """
    state = model.state_dict()
    if any(".parametrizations." in f".{k}" for k in state):
        raise ValueError(
            "export_sparse: weights are still parametrized (SR-STE); remove the parametrizations first"
        )
    layers = masked_layers(model)
    if not layers:
        raise ValueError("export_sparse: no module carries a weight_mask buffer; nothing to pack")
    packed: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    for name, module in layers.items():
        tensors, entries[name] = _pack_layer(name, module, n, m, dtype)
        packed.update(tensors)
    skip = {entry["key"] for entry in entries.values()}
    plain = {k: _cast(v, dtype) for k, v in state.items() if k not in skip and not k.endswith(MASK_SUFFIX)}
    first = next(iter(layers.values())).weight
    manifest = {
        "technique": TECHNIQUE,
        "n": n,
        "m": m,
        "dtype": str(dtype or first.dtype).removeprefix("torch."),
        "layers": entries,
    }
    return write_export(path, model, {**plain, **packed}, manifest)


def _unpack_into(tensors: dict[str, Tensor], manifest: dict[str, Any]) -> None:
    """Replace each packed layer's values/indices in ``tensors`` by its dense weight."""
    n, m = manifest["n"], manifest["m"]
    for name, entry in manifest["layers"].items():
        shape = entry["shape"]
        in_f = shape[0] if entry["transposed"] else shape[1]
        values = tensors.pop(f"{name}.weight.values")
        dense = unpack_nm(values, tensors.pop(f"{name}.weight.indices"), n, m, in_f)  # (out, in)
        tensors[entry["key"]] = dense.T.contiguous() if entry["transposed"] else dense


def _resolve_semi_structured(
    flag: bool | None, device: torch.device, manifest: dict, dtype: torch.dtype
) -> bool:
    two_four = (manifest["n"], manifest["m"]) == (2, 4)
    if flag is None:
        return device.type == "cuda" and two_four and dtype in _HALF
    if flag and (device.type != "cuda" or not two_four or dtype not in _HALF):
        raise ValueError(
            "load_sparse(semi_structured=True) needs device='cuda', a 2:4 export and dtype float16 or "
            f"bfloat16; got device={device}, {manifest['n']}:{manifest['m']}, dtype={dtype}"
        )
    return flag


def _to_semi_structured_(model: nn.Module, names: list[str]) -> list[str]:
    """Swap ``nn.Linear`` weights to semi-structured sparse tensors; return the layers swapped."""
    from torch.sparse import to_sparse_semi_structured

    swapped = []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):  # Conv1D multiplies by the transposed layout: keep dense
            continue
        try:
            sparse = to_sparse_semi_structured(module.weight.detach())
        except (RuntimeError, ValueError) as err:  # shape below the kernel's minimum tile
            warnings.warn(f"load_sparse: {name} stays dense ({err})", stacklevel=3)
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        swapped.append(name)
    return swapped


def load_sparse(
    path: str | Path,
    device: str | torch.device = "cpu",
    semi_structured: bool | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild the exported Hugging Face model, unpacking N:M layers to dense weights.

    Args:
        path: folder written by :func:`export_sparse`.
        device: where the model goes.
        semi_structured: swap 2:4 ``nn.Linear`` weights to ``torch.sparse.to_sparse_semi_structured``
            (``None``: on CUDA with a 2:4 export in float16/bfloat16). Swapped layer names are in
            ``model.semi_structured_layers``.
        dtype: model dtype (``None``: the dtype the export was stored in).

    Returns:
        The model in eval mode.

    Raises:
        ValueError: not a sparse export, no ``config.json``, or ``semi_structured=True`` without
            CUDA, 2:4 and a half-precision dtype.

    Example:
        >>> # model = load_sparse("runs/<id>/sparse", device="cuda", dtype=torch.float16)
    """
    manifest, tensors, config = read_export(path)
    if manifest.get("technique") != TECHNIQUE:
        raise ValueError(f"{path}: a {manifest.get('technique')!r} export, not {TECHNIQUE!r}")
    if config is None:
        raise ValueError(f"{path}: no config.json; load_sparse rebuilds Hugging Face models only")
    dtype = dtype or getattr(torch, manifest.get("dtype", "float32"))
    device = torch.device(device)
    model = model_from_config(config).to(dtype)
    _unpack_into(tensors, manifest)
    load_plain_tensors(model, tensors, manifest, compressed=set())
    model.to(device).eval()
    use_sparse = _resolve_semi_structured(semi_structured, device, manifest, dtype)
    model.semi_structured_layers = _to_semi_structured_(model, list(manifest["layers"])) if use_sparse else []
    return model


def export_bytes(model: nn.Module, n: int = 2, m: int = 4, dtype_bytes: int = 2) -> tuple[int, int]:
    """``(packed, dense)`` bytes of the masked layers of a model at ``dtype_bytes`` per value.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 2))
        >>> net[0].register_buffer("weight_mask", torch.ones(2, 8, dtype=torch.bool))
        >>> export_bytes(net)
        (18, 32)
    """
    packed = dense = 0
    for module in masked_layers(model).values():
        out_f, in_f = _out_in(module.weight, module).shape
        packed += nm_storage_bytes(out_f, in_f, n, m, dtype_bytes)
        dense += out_f * in_f * dtype_bytes
    return packed, dense
