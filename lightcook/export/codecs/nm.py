"""N:M-masked layers: kept values + 2-bit (4-bit for m > 4) in-group positions; 2:4 kernels on CUDA.

Every Linear whose ``weight_mask`` follows the export's ``n:m`` pattern is stored as
``<layer>.weight.values`` ``(out, in // m * n)`` and ``<layer>.weight.indices`` (uint8,
:func:`~lightcook.ops.sparsity.pack_nm`). GPT-2 ``Conv1D`` weights ``(in, out)`` are packed through
their ``(out, in)`` view and flagged ``transposed``. Masks themselves are never stored: the positions
are the mask. A masked layer that is also quantized is stored by the quantized codec (kept codes +
positions) and only listed here (``quantized``). Masks of another pattern only zero weights: those
layers are stored dense. At load time the layers get their dense weights back; on CUDA with a 2:4
export in float16 / bfloat16 the ``nn.Linear`` weights become
:func:`torch.sparse.to_sparse_semi_structured` tensors.

Example:
    >>> from lightcook.export.codecs.base import Encoding
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 2))
    >>> net[0].register_buffer("weight_mask", torch.tensor([True, False] * 8).reshape(2, 8))
    >>> enc = Encoding(net, nm=(2, 4))
    >>> NMCodec().encode(enc)["layers"]["0"]["shape"], sorted(enc.tensors)
    ([2, 8], ['0.weight.indices', '0.weight.values'])
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.export.codecs.base import (
    Codec,
    Decoding,
    Encoding,
    LayerBytes,
    itemsize,
    kept_weights,
    nm_packed,
    stored_as,
)
from lightcook.ops.architectures import linear_dims
from lightcook.ops.names import MASK, is_conv1d, linear_like
from lightcook.ops.quant import QuantLinear
from lightcook.ops.sparsity import nm_storage_bytes, pack_nm, unpack_nm

__all__ = ["NMCodec", "masked_layers"]

_HALF = (torch.float16, torch.bfloat16)
#: The weight as stored, and the state key of an SR-STE parametrized weight (estimates only).
_WEIGHT_KEYS = ("weight", "parametrizations.weight.original")


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that carry a ``weight_mask`` buffer, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m._buffers.get(MASK), Tensor)}


def _out_in(tensor: Tensor, module: nn.Module) -> Tensor:
    return tensor.T if is_conv1d(module) else tensor


def _entry(name: str, module: nn.Module) -> dict[str, Any]:
    return {
        "format": "nm",
        "key": f"{name}.weight",
        "shape": list(cast(Tensor, module.weight).shape),
        "transposed": is_conv1d(module),
    }


def _resolve_semi_structured(flag: bool | None, dec: Decoding, n: int, m: int) -> bool:
    usable = dec.device.type == "cuda" and (n, m) == (2, 4) and dec.dtype in _HALF
    if flag and not usable:
        raise ValueError(
            "load_compressed(semi_structured=True) needs device='cuda', a 2:4 export and dtype float16 "
            f"or bfloat16; got device={dec.device}, {n}:{m}, dtype={dec.dtype}"
        )
    return usable if flag is None else flag


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
            warnings.warn(f"load_compressed: {name} stays dense ({err})", stacklevel=3)
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        swapped.append(name)
    return swapped


class NMCodec(Codec):
    """N:M masks ↔ packed kept values + positions ↔ dense (or 2:4 semi-structured) weights."""

    name = "nm"

    def _layers(self, enc: Encoding) -> dict[str, nn.Module]:
        net = enc.net
        return {n: mod for n, mod in net.named_modules() if linear_like(mod) and nm_packed(mod, enc.nm)}

    def _walk(self, enc: Encoding, pack: bool) -> dict[str, Any] | None:
        layers = self._layers(enc)
        if not layers:
            return None
        n, m = cast("tuple[int, int]", enc.nm)  # layers are packed only with a pattern
        entries = {}
        for name, module in layers.items():
            if isinstance(module, QuantLinear):
                continue  # stored by the quantized codec: kept codes + positions
            n_in, n_out, _ = linear_dims(module)
            if pack:
                weight = stored_as(
                    _out_in(cast(Tensor, module.weight).detach(), module), enc.dtype
                )  # (out, in)
                values, indices = pack_nm(weight, _out_in(getattr(module, MASK), module), n, m)
                enc.store(f"{name}.weight.values", values)
                enc.store(f"{name}.weight.indices", indices)
            else:
                size = itemsize(cast(Tensor, module.weight), enc.dtype)
                enc.count(f"{name}.weight.values", nm_storage_bytes(n_out, n_in, n, m, size))
            enc.claimed |= {f"{name}.{key}" for key in _WEIGHT_KEYS}
            weight_bytes = enc.size(
                [k for k in (f"{name}.weight.values", f"{name}.weight.indices") if k in enc.sizes]
            )
            enc.layers[name] = LayerBytes(n_in * n_out, weight_bytes, kept_weights(module), [self.name])
            entries[name] = _entry(name, module)
        quantized = sorted(name for name, mod in layers.items() if isinstance(mod, QuantLinear))
        return {"n": n, "m": m, "layers": entries, "quantized": quantized}

    def encode(self, enc: Encoding) -> dict[str, Any] | None:
        return self._walk(enc, pack=True)

    def estimate_bytes(self, enc: Encoding) -> dict[str, Any] | None:
        return self._walk(enc, pack=False)

    def decode(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        n, m = entry["n"], entry["m"]
        for name, layer in entry["layers"].items():
            shape = layer["shape"]
            in_f = shape[0] if layer["transposed"] else shape[1]
            values = dec.tensors.pop(f"{name}.weight.values")
            dense = unpack_nm(values, dec.tensors.pop(f"{name}.weight.indices"), n, m, in_f)  # (out, in)
            dec.tensors[layer["key"]] = dense.T.contiguous() if layer["transposed"] else dense

    def finish(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        use = bool(entry["layers"]) and _resolve_semi_structured(
            dec.semi_structured, dec, entry["n"], entry["m"]
        )
        dec.model.semi_structured_layers = (
            _to_semi_structured_(dec.model, list(entry["layers"])) if use else []  # type: ignore[assignment]
        )
