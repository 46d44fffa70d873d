"""Save, load and size one compressed export: the registered codecs over one folder.

:func:`save_compressed` takes the live network after training — with any of structured-pruning
gates, MoE FFNs, N:M ``weight_mask`` buffers, :class:`~lightcook.ops.quant.QuantLinear` layers — and
runs every codec of :data:`~lightcook.export.codecs.CODECS` in order; each stores its layers in their
compact form and adds its manifest entry; every other tensor (embeddings, norms, biases, plain
layers) is stored as it is, optionally cast to ``dtype``. A single-technique export is the same
folder with one entry. :func:`load_compressed` rebuilds the Hugging Face model and lets each codec
reshape it and install its inference modules (int8 GEMM, dequant layers, sparse MoE FFNs, 2:4 on CUDA).
:func:`estimate_bytes` walks the same codecs without computing a tensor.

**Weight bytes** (manifest ``weight_bytes`` / ``fp32_weight_bytes``, and the estimate): the Linear
weights inside the repeated blocks as stored, against the same weights in float32, plus any other
layer a codec stored compactly (a quantized LM head). **MoE routers are not counted** there: they
are added by MoEfication, not compressed by any technique, and stored as trained; their bytes are in
``tensor_bytes`` (every stored tensor) and in the ``moe`` share of ``by_technique``.

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
    >>> path = save_compressed(model, tempfile.mkdtemp() + "/c", nm=(2, 4))
    >>> loaded = load_compressed(path, backend="reference")  # exact: the stored dtype, reference modules
    >>> read_manifest(path)["techniques"], type(loaded.model.layers[0].mlp.up_proj).__name__
    (['nm', 'quantized'], 'Int8Linear')
    >>> estimate_bytes(model)["tensor_bytes"] == read_manifest(path)["tensor_bytes"]
    True
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    True
    >>> fast = load_compressed(path, dtype=torch.float32, backend="dense")  # any device
    >>> fast.inference_backend, fast.quantized_kernels
    ('dense', {'model.layers.0.mlp.up_proj': 'dense'})
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.export.codecs import CODECS, MANIFEST_ORDER
from lightcook.export.codecs.base import (
    Decoding,
    Encoding,
    LayerBytes,
    in_block,
    is_mask,
    itemsize,
    kept_weights,
    stored_as,
    under,
)
from lightcook.export.codecs.moe import router_names
from lightcook.export.format import (
    load_plain_tensors,
    model_from_config,
    read_config,
    read_tensors,
    tied_aliases,
    write_folder,
)
from lightcook.export.format import read_manifest as read_raw_manifest
from lightcook.export.legacy import upgrade
from lightcook.ops.kernels import inference_dtype, resolve_backend
from lightcook.ops.names import GATES, linear_like

__all__ = ["estimate_bytes", "load_compressed", "read_manifest", "save_compressed"]

_ORIGINAL = ".parametrizations.weight.original"  # an SR-STE weight, stored as ``.weight``
#: Keys a manifest keeps for itself (``extra`` may not overwrite them).
_RESERVED = {
    "format",
    "version",
    "tied",
    "techniques",
    "dtype",
    "weight_bytes",
    "fp32_weight_bytes",
    "tensor_bytes",
    *MANIFEST_ORDER,
}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an export folder in the current layout (version-1 folders translated).

    Raises:
        ValueError: no such folder, no/invalid ``lightcook.json`` (names the file), or an old kind
            that cannot be translated (says how to re-export).

    Example:
        >>> read_manifest("/nonexistent")
        Traceback (most recent call last):
        ...
        ValueError: /nonexistent: no such export folder
    """
    return upgrade(read_raw_manifest(path), path)


# --------------------------------------------------------------------------- encode


def _run(model: nn.Module, nm, architecture, dtype, sliced: bool, estimating: bool):
    enc = Encoding(model, nm, dtype, architecture, sliced, estimating)
    entries: dict[str, Any] = {}
    for codec in CODECS:
        before = enc.size()
        entry = codec.estimate_bytes(enc) if estimating else codec.encode(enc)
        if entry is not None:
            entries[codec.name] = entry
            enc.by_technique[codec.name] = enc.size() - before
    before = enc.size()
    _plain(enc)
    enc.by_technique["plain"] = enc.size() - before
    _plain_layers(enc)
    return enc, entries


def _plain(enc: Encoding) -> None:
    """Store every tensor no codec took, as it is (cast to ``enc.dtype``); masks, gates and aliases of
    tied weights are not stored."""
    aliases = tied_aliases(enc.net)
    for key, tensor in enc.net.state_dict(keep_vars=enc.estimating).items():
        if key in enc.claimed or key in aliases or is_mask(key) or key.split(".")[0] == GATES:
            continue
        if ".parametrizations." in f".{key}":  # estimates during SR-STE training: the folded weight
            if not key.endswith(_ORIGINAL):
                continue
            key = key.removesuffix(_ORIGINAL) + ".weight"
        if enc.estimating:
            enc.count(key, tensor.numel() * itemsize(tensor, enc.dtype))
        else:
            enc.store(key, stored_as(tensor.detach(), enc.dtype))


def _plain_layers(enc: Encoding) -> None:
    """The block Linears no codec stored, at their stored weight size."""
    for name, module in _block_linears(enc.net).items():
        if name not in enc.layers:
            size = enc.sizes.get(f"{name}.weight", 0)
            enc.layers[name] = LayerBytes(cast(Tensor, module.weight).numel(), size, kept_weights(module))


def _totals(enc: Encoding) -> dict[str, int]:
    layers = enc.layers.values()
    return {
        "weight_bytes": sum(layer.weight_bytes for layer in layers),
        "fp32_weight_bytes": sum(4 * layer.params for layer in layers),
        "tensor_bytes": enc.size(),
    }


def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    nm: tuple[int, int] | None = (2, 4),
    architecture: str | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
    sliced: bool = False,
) -> Path:
    """Write the compressed ``model`` (left unchanged) to ``path``, atomically.

    Args:
        model: the trained network (``pl_module.model``), a Hugging Face model for
            :func:`load_compressed` to rebuild it.
        path: export folder (replaced if present).
        nm: the ``(n, m)`` pattern of N:M masks to pack (``None``: store masked weights dense).
        architecture: layout override for slicing (a registered name or a layout dict; recorded).
        dtype: cast the floating tensors stored as they are (embeddings, norms, float layers).
        extra: more JSON data for the manifest (e.g. the callbacks' settings).
        sliced: ``model`` was already sliced (:func:`~lightcook.ops.slicing.slice_model`): record its
            per-block shapes as the structured entry.

    Returns:
        ``path``. The manifest lists ``techniques`` (canonical order), one entry per technique,
        ``weight_bytes`` / ``fp32_weight_bytes`` (see the module notes) and ``tensor_bytes``.

    Raises:
        ValueError: weights still parametrized (SR-STE), a static-activation layer never
            calibrated, or ``extra`` overwriting a manifest key.
    """
    clash = sorted(set(extra or {}) & _RESERVED)
    if clash:
        raise ValueError(f"save_compressed: extra may not set the manifest keys {clash}")
    if any(_ORIGINAL in f".{k}" for k in model.state_dict()):
        raise ValueError("save_compressed: weights are still parametrized (SR-STE); fold them first")
    enc, entries = _run(model, nm, architecture, dtype, sliced, estimating=False)
    manifest = {
        "techniques": [t for t in MANIFEST_ORDER if t in entries],
        "dtype": str(dtype or next(enc.net.parameters()).dtype).removeprefix("torch."),
        **_totals(enc),
        **entries,
        **dict(extra or {}),
    }
    return write_folder(path, enc.net, enc.tensors, manifest)


def estimate_bytes(
    model: nn.Module,
    *,
    nm: tuple[int, int] | None = (2, 4),
    architecture: str | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """What :func:`save_compressed` with the same arguments would store, computed without a tensor.

    Args:
        model: the live network (also while training: SR-STE weights count as folded).
        nm, architecture, dtype: as for :func:`save_compressed`.

    Returns:
        ``weight_bytes``, ``fp32_weight_bytes`` and ``tensor_bytes`` (equal to the manifest's),
        ``techniques``, ``by_technique`` (bytes each codec stores, ``plain`` for the rest) and
        ``layers``: per Linear counted in ``weight_bytes`` (every block Linear of the live network,
        MoE routers excluded, and any other layer a codec stored compactly) ``params`` (as stored,
        after slicing), ``live_params`` (in the live network), ``weight_bytes``,
        ``fp32_weight_bytes``, ``kept`` (weights the mask keeps) and the ``techniques`` that stored
        it; a layer slicing removed entirely has ``params == weight_bytes == kept == 0`` and
        ``techniques == ["structured"]``. ``block_params``: the block Linears' weights of the live
        (unsliced) network, to express what slicing removed.

    Example:
        >>> net = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(8, 4, bias=False)})])  # "0.proj"
        >>> net[0]["proj"].register_buffer("weight_mask", torch.tensor([True, False]).repeat(4, 4))
        >>> est = estimate_bytes(net)
        >>> est["weight_bytes"], est["fp32_weight_bytes"], est["layers"]["0.proj"]["kept"]
        (68, 128, 16)
        >>> est["layers"]["0.proj"]["params"], est["layers"]["0.proj"]["live_params"]
        (32, 32)
    """
    enc, entries = _run(model, nm, architecture, dtype, False, estimating=True)
    live = {name: cast(Tensor, module.weight).numel() for name, module in _block_linears(model).items()}
    return {
        **_totals(enc),
        "techniques": [t for t in MANIFEST_ORDER if t in entries],
        "by_technique": dict(enc.by_technique),
        "layers": _layer_breakdown(enc, live),
        "block_params": sum(live.values()),
    }


def _layer_breakdown(enc: Encoding, live: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The stored layers with their live size, plus the live block Linears slicing removed."""
    layers = {name: {**layer.as_dict(), "live_params": layer.params} for name, layer in enc.layers.items()}
    for name, params in live.items():
        removed = LayerBytes(0, 0, 0, ["structured"]).as_dict()
        layers.setdefault(name, removed)["live_params"] = params
    return layers


def _block_linears(net: nn.Module) -> dict[str, nn.Module]:
    """The Linears inside the repeated blocks, MoE routers and gates excluded."""
    routers = router_names(net)
    return {
        name: module
        for name, module in net.named_modules()
        if linear_like(module)
        and in_block(name)
        and name.split(".")[0] != GATES
        and not under(f"{name}.weight", routers)
    }


# --------------------------------------------------------------------------- decode


def load_compressed(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    semi_structured: bool | None = None,
    architecture: str | Mapping[str, Any] | None = None,
) -> nn.Module:
    """Rebuild a compressed export (also a version-1 folder) as an inference model in eval mode.

    Args:
        path: the export folder.
        device: where the model goes.
        dtype: dtype of everything not integer (embeddings, norms, attention, LM head, scales the
            kernels read). ``None``: bfloat16 where ``device`` computes in it natively and ``backend``
            is not ``"reference"``, else the dtype the export was stored in.
        backend: the quantized layers' kernels (:mod:`lightcook.ops.kernels`): ``"auto"`` (the fastest
            available: on a CPU in bfloat16, weight-only packed int8 / int4 for up to 4 rows per call,
            int8 GEMM or the dequantized weight above), ``"reference"`` (the exact
            :class:`~lightcook.ops.quant.Int8Linear` / :class:`~lightcook.ops.quant.DequantLinear`, in
            the stored dtype by default), ``"dense"``, ``"packed"`` or ``"dispatch"``.
        semi_structured: 2:4 layers as ``torch.sparse.to_sparse_semi_structured`` weights (``None``: on
            CUDA with a 2:4 export in float16 / bfloat16).
        architecture: layout override for a structured export (``None``: the recorded one).

    Returns:
        The Hugging Face model; ``model.compressed_techniques`` lists what was applied,
        ``inference_backend`` the backend ``backend`` resolved to, ``quantized_formats`` /
        ``quantized_kernels`` (stored format / kernel names per quantized layer) and
        ``semi_structured_layers`` what the quantized / N:M codecs installed.

    Raises:
        ValueError: an unreadable folder (names the file and what is wrong), no ``config.json``,
            tensors that do not fit the rebuilt model, ``semi_structured=True`` off CUDA, or a
            ``backend`` unknown or unavailable on ``device`` with ``dtype`` (lists the available ones).

    Example:
        >>> # model = load_compressed("outputs/runs/<id>/compressed"); model(input_ids).logits
    """
    manifest = read_manifest(path)
    config = read_config(path)
    if config is None:
        raise ValueError(f"{path}: no config.json; load_compressed rebuilds Hugging Face models only")
    device = torch.device(device)
    dtype = dtype or inference_dtype(device, backend, getattr(torch, manifest.get("dtype", "float32")))
    backend = resolve_backend(backend, device, dtype)
    tensors = read_tensors(path)
    dec = Decoding(model_from_config(config).to(dtype), tensors, dtype, device, backend=backend)
    dec.semi_structured = semi_structured
    if architecture is not None:
        dec.held["architecture"] = architecture
    present = [c for c in CODECS if c.name in manifest["techniques"]]
    try:
        for codec in present:
            codec.decode(dec, manifest[codec.name])
        load_plain_tensors(dec.model, dec.tensors, manifest.get("tied", {}), dec.filled)
    except (KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path}: the stored tensors do not fit the rebuilt model ({err})") from None
    dec.model.to(dec.device).eval()
    for codec in present:
        codec.finish(dec, manifest[codec.name])
    dec.model.compressed_techniques = list(manifest["techniques"])  # type: ignore[assignment]
    dec.model.inference_backend = backend  # type: ignore[assignment]
    return dec.model
