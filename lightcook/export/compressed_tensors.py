"""The compressed-tensors export: the folder llm-compressor writes, which transformers and vLLM open.

:func:`save_compressed_tensors` writes the live network — plain, with N:M ``weight_mask`` layers, with
:class:`~lightcook.ops.quant.QuantLinear` layers, or both — as a Hugging Face folder whose
``config.json`` carries a compressed-tensors ``quantization_config``. Plain
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` then loads the trained model (the
``compressed-tensors`` package must be installed, as for any llm-compressor model).

What each lightcook layer becomes (one config group per distinct scheme, its ``targets`` the layer
names):

============================================  ===============================================
lightcook                                     compressed-tensors
============================================  ===============================================
8-bit weights + int8 activations (W8A8)       ``int-quantized``: ``weight`` int8 codes
any other bits / weight-only (W8A16, W4A16)   ``pack-quantized``: ``weight_packed`` int32
symmetric codes ``[-q, q]``, ``scale``        the same codes and scales (their range holds ours)
asymmetric codes ``[0, 2^b-1]``, zero point   codes and zero point shifted by ``-2^(b-1)``
dynamic activations (per token)               ``input_activations`` strategy ``token``, dynamic
static activations (``amax``)                 strategy ``tensor``, ``input_scale = amax / q``
N:M masks                                     zeros in the weights (or codes); the N:M pattern
                                              is recorded under ``lightcook.sparsity``
============================================  ===============================================

The weights are the trained ones bit for bit: ``(code - zero_point) * scale`` is stored, never
re-quantized. **The only arithmetic difference is activation rounding**: compressed-tensors
quantizes an int8 activation with ``scale = amax / 127.5`` into ``[-128, 127]`` where lightcook uses
``amax / 127`` into ``[-127, 127]``; per input element the two fake-quantized values differ by at most
``amax / 127`` (one lightcook step). Weight-only schemes are exact up to float summation order.
N:M needs no kernel here: compressed-tensors 0.20 dropped its ``sparse-24-bitmask`` format and vLLM
its 2:4 kernels, so the pruned weights are stored dense (the sizes on disk are those of the
quantization alone). MoE networks are written with each expert as its own Linear layers and the
model file :mod:`lightcook.export.moe_remote_code` beside the weights (no stock transformers MoE
architecture computes the same function; :mod:`lightcook.export.hf_moe`), so they load with
``trust_remote_code=True``. A live structured (gated) network is refused with the reason; its sliced
lightcook export converts (:mod:`lightcook.export.convert`), layers of uneven widths zero-padded to
the widest (exact; :mod:`lightcook.export.hf_padding`).

Example:
    >>> import tempfile, torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> from lightcook.ops.quant import QuantLinear, QuantSpec
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> mlp = model.model.layers[0].mlp
    >>> mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, QuantSpec(bits=4, granularity="group", group_size=16),
    ...                                       act_mode="none")
    >>> path = save_compressed_tensors(model, tempfile.mkdtemp() + "/ct")
    >>> loaded = AutoModelForCausalLM.from_pretrained(path)
    >>> import json
    >>> json.loads((path / "config.json").read_text())["quantization_config"]["format"]
    'pack-quantized'
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightcook.export import moe_remote_code
from lightcook.export.codecs.quantized import quantized_layers
from lightcook.export.format import CONFIG, TENSORS, model_from_config, tied_aliases
from lightcook.export.hf_moe import REMOTE_FILE, moe_config, moe_specs, split_moe
from lightcook.export.hf_padding import pad_to_widest
from lightcook.io import atomic_dir
from lightcook.ops.names import MASK
from lightcook.ops.quant import QuantLinear, QuantSpec, pack_codes

__all__ = [
    "INT_QUANTIZED",
    "PACK_QUANTIZED",
    "LayerCodes",
    "layer_tensors",
    "pack_int32",
    "quantization_config",
    "refuse_unsupported",
    "save_compressed_tensors",
    "split_network",
    "write_compressed_tensors",
]

INT_QUANTIZED, PACK_QUANTIZED, MIXED = "int-quantized", "pack-quantized", "mixed-precision"
#: Techniques of :func:`~lightcook.export.estimate_bytes` this format holds.
SUPPORTED = frozenset({"nm", "quantized", "moe"})
_ORIGINAL = ".parametrizations.weight.original"


def pack_int32(codes: Tensor, bits: int, offset: int) -> Tensor:
    """compressed-tensors' dense int32 packing of integer ``codes`` (..., n) along the last dim.

    Element ``i`` of a row occupies bits ``[i * bits, (i + 1) * bits)`` of the row's bit stream
    (low bits first, 32-bit little-endian words), holding ``code + offset``; the row is zero-padded to
    whole words. Same layout as ``compressed_tensors``' ``pack_to_int32`` (tested against it).

    Example:
        >>> pack_int32(torch.tensor([[-8, 7, 0, 1, -1, 2, 3, -3]]), 4, offset=8)
        tensor([[1537710320]], dtype=torch.int32)
    """
    if sys.byteorder != "little":
        raise RuntimeError("pack_int32: compressed-tensors packing assumes a little-endian host")
    unsigned = (codes.to(torch.int16) + offset).to(torch.uint8)
    packed = pack_codes(unsigned, bits, signed=False)  # uint8 bit stream, low bits first
    packed = torch.nn.functional.pad(packed, (0, (-packed.shape[-1]) % 4))
    return packed.contiguous().view(torch.int32)


@dataclass(frozen=True)
class LayerCodes:
    """One quantized layer as integers: what both the live network and a lightcook folder hold.

    ``codes`` (out, in) in lightcook's convention (signed when symmetric, ``[0, 2^b-1]`` otherwise),
    ``scale`` / ``zero_point`` shaped :func:`~lightcook.ops.quant.scale_shape`, ``input_scale`` the
    static activation scale (static mode only).
    """

    spec: QuantSpec
    codes: Tensor
    scale: Tensor
    zero_point: Tensor | None
    act_mode: str
    act_bits: int
    input_scale: Tensor | None
    bias: Tensor | None

    @classmethod
    def from_quant_linear(cls, name: str, q: QuantLinear) -> LayerCodes:
        """The codes of a live :class:`QuantLinear` (its static activations must be calibrated)."""
        act = q.input_quantizer
        if act.mode == "static" and not bool(act.amax > 0):
            raise ValueError(
                f"save_compressed_tensors: {name} has static activations that were never calibrated"
            )
        spec = q.weight_quantizer.spec
        with torch.no_grad():
            codes = q.weight_quantizer.codes(q.weight)
            scale, zero_point = q.weight_quantizer.scale_and_zero_point(q.weight)
        return cls(
            spec,
            codes,
            scale,
            None if spec.symmetric else zero_point,
            act.mode,
            act.bits,
            act.static_scale() if act.mode == "static" else None,
            None if q.bias is None else q.bias.detach(),
        )


def _weight_args(spec: QuantSpec) -> dict[str, Any]:
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": spec.granularity,
        "group_size": spec.group_size if spec.granularity == "group" else None,
        "dynamic": False,
        "observer": "minmax",
    }


def _input_args(act_mode: str, act_bits: int) -> dict[str, Any] | None:
    if act_mode == "none":
        return None
    dynamic = act_mode == "dynamic"
    return {
        "num_bits": act_bits,
        "type": "int",
        "symmetric": True,
        "strategy": "token" if dynamic else "tensor",
        "dynamic": dynamic,
        "observer": None if dynamic else "minmax",
    }


def _format(layer: LayerCodes) -> str:
    return INT_QUANTIZED if layer.spec.bits == 8 and layer.act_mode != "none" else PACK_QUANTIZED


def _scheme(layer: LayerCodes) -> dict[str, Any]:
    return {
        "weights": _weight_args(layer.spec),
        "input_activations": _input_args(layer.act_mode, layer.act_bits),
        "format": _format(layer),
    }


def quantization_config(layers: Mapping[str, LayerCodes]) -> dict[str, Any] | None:
    """The compressed-tensors ``quantization_config`` of ``layers`` (``None`` when there are none):
    one config group per distinct scheme, targeting its layers by exact name.

    Example:
        >>> from lightcook.ops.quant import QuantSpec
        >>> q = QuantLinear.from_linear(torch.nn.Linear(8, 4), QuantSpec(bits=8))
        >>> cfg = quantization_config({"mlp.up_proj": LayerCodes.from_quant_linear("mlp.up_proj", q)})
        >>> cfg["format"], cfg["config_groups"]["group_0"]["targets"]
        ('int-quantized', ['re:^mlp\\\\.up_proj$'])
    """
    if not layers:
        return None
    groups: list[tuple[dict[str, Any], list[str]]] = []
    for name, layer in layers.items():
        scheme, target = _scheme(layer), f"re:^{re.escape(name)}$"
        for known, targets in groups:
            if known == scheme:
                targets.append(target)
                break
        else:
            groups.append((scheme, [target]))
    formats = {scheme["format"] for scheme, _ in groups}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {**scheme, "targets": targets, "output_activations": None}
            for i, (scheme, targets) in enumerate(groups)
        },
        "ignore": [],
        "kv_cache_scheme": None,
    }


def layer_tensors(name: str, layer: LayerCodes) -> dict[str, Tensor]:
    """The compressed-tensors tensors of one quantized layer, keys prefixed with ``name``."""
    spec = layer.spec
    shift = 0 if spec.symmetric else 2 ** (spec.bits - 1)  # our unsigned codes -> their signed range
    codes = layer.codes.to(torch.int16) - shift
    out_f, in_f = codes.shape
    scale = layer.scale.reshape(1) if spec.granularity == "tensor" else layer.scale.reshape(out_f, -1)
    out: dict[str, Tensor] = {"weight_scale": scale.float()}
    if _format(layer) == INT_QUANTIZED:
        out["weight"] = codes.to(torch.int8)
    else:
        out["weight_packed"] = pack_int32(codes, spec.bits, 2 ** (spec.bits - 1))
        out["weight_shape"] = torch.tensor([out_f, in_f])
    if layer.zero_point is not None:
        zp = layer.zero_point.reshape(scale.shape).to(torch.int16) - shift
        if spec.granularity == "tensor" or _format(layer) == INT_QUANTIZED:
            out["weight_zero_point"] = zp.to(torch.int8)
        else:  # packed along the output dim: (ceil(out * bits / 32), groups)
            out["weight_zero_point"] = pack_int32(zp.T, spec.bits, 2 ** (spec.bits - 1)).T.contiguous()
    if layer.input_scale is not None:
        out["input_scale"] = layer.input_scale.float().reshape(1)
        out["input_zero_point"] = torch.zeros(1, dtype=torch.int8)
    if layer.bias is not None:
        out["bias"] = layer.bias
    return {f"{name}.{k}": v for k, v in out.items()}


def _plain_weight(module: nn.Module) -> Tensor:
    """A Linear-like module's effective weight (an SR-STE parametrization evaluated, mask applied)."""
    weight = cast(Tensor, module.weight)
    mask = getattr(module, MASK, None)
    return weight * mask if isinstance(mask, Tensor) else weight


def _techniques(model: nn.Module, nm: tuple[int, int] | None) -> list[str]:
    from lightcook.export.pipeline import estimate_bytes

    return list(estimate_bytes(model, nm=nm)["techniques"])


def refuse_unsupported(techniques: list[str], where: str, holds: frozenset[str] = SUPPORTED) -> None:
    """Raise the clear error for techniques this format cannot hold (``where`` names the caller;
    ``holds`` adds ``structured`` for already-sliced folders, whose shapes are then checked)."""
    unsupported = [t for t in techniques if t not in holds]
    if unsupported:
        raise ValueError(
            f"{where}: compressed-tensors cannot hold {', '.join(unsupported)} (a different network "
            "shape); the lightcook export (lightcook.export.save_compressed / load_compressed) does"
        )


def _check_shape(key: str, got: Any, expected: Any) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"compressed-tensors export: {key} is {tuple(got)}, the config gives {tuple(expected)} "
            "(layers of different widths: a stock config holds one FFN width and head count)"
        )


def write_compressed_tensors(
    path: str | Path,
    config: Any,
    layers: Mapping[str, LayerCodes],
    plain: Mapping[str, Tensor],
    nm: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    moe: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a compressed-tensors folder from its parts, atomically.

    Args:
        path: the folder (replaced if present).
        config: the HF config of the (dense-shaped) architecture.
        layers: the quantized layers by module name.
        plain: every other tensor of the HF state dict (tied aliases left out), by key.
        nm: the masks' N:M pattern, recorded under ``lightcook.sparsity`` in ``config.json``.
        dtype: cast for the float ``plain`` tensors (default: as they are).
        moe: the routed MoE FFNs (:func:`~lightcook.export.hf_moe.moe_specs`); ``layers`` and
            ``plain`` hold them as lightcook does, and they are split into experts here.

    Raises:
        ValueError: a quantized layer is not an ``nn.Linear`` of the HF architecture (GPT-2
            ``Conv1D``), a tensor of the architecture is in neither ``layers`` nor ``plain``, or an
            MoE FFN the folder cannot hold (:func:`~lightcook.export.hf_moe.split_moe`).
    """
    remote = None
    if moe or any(key.endswith(".routed") for key in plain):
        layers, plain = split_moe(moe or {}, layers, plain)
        if moe:
            config, remote = moe_config(config, moe), REMOTE_FILE
    if remote is None:
        config, layers, plain = pad_to_widest(config, layers, plain)
    with torch.device("meta"):
        if remote:
            skeleton: nn.Module = moe_remote_code.LightcookMoeForCausalLM(copy.deepcopy(config))
        else:
            skeleton = model_from_config(copy.deepcopy(config))
    for name in layers:
        module = skeleton.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"compressed-tensors export: {name} is a {type(module).__name__}; compressed-tensors "
                "quantizes nn.Linear layers only"
            )
        _check_shape(f"{name}.weight", layers[name].codes.shape, module.weight.shape)
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors.update(layer_tensors(name, layer))
    aliases = tied_aliases(skeleton)
    for key in skeleton.state_dict():
        if key in aliases or key.rpartition(".")[0] in layers:
            continue
        if key not in plain:
            raise ValueError(f"compressed-tensors export: no tensor {key!r} of the HF architecture")
        value = plain[key].detach()
        _check_shape(key, value.shape, skeleton.state_dict()[key].shape)
        tensors[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    out_config = copy.deepcopy(config)
    qconfig = quantization_config(layers)
    if qconfig is not None:
        out_config.quantization_config = qconfig
    elif hasattr(out_config, "quantization_config"):
        del out_config.quantization_config
    if nm is not None:
        sparsity = {"pattern": f"{nm[0]}:{nm[1]}", "stored": "dense"}
        out_config.lightcook = {**getattr(out_config, "lightcook", {}), "sparsity": sparsity}
    floats = [t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith("_scale")]
    out_config.dtype = dtype or (floats[0] if floats else torch.float32)
    path = Path(path)
    with atomic_dir(path) as tmp:
        out_config.save_pretrained(tmp)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS), {"format": "pt"})
        json.loads((tmp / CONFIG).read_text())  # written and readable
        if remote:
            shutil.copy2(moe_remote_code.__file__, tmp / remote)
    return path


def split_network(model: nn.Module) -> tuple[dict[str, LayerCodes], dict[str, Tensor]]:
    """The live network as the parts the ecosystem writers take: its quantized layers as
    :class:`LayerCodes` by module name, and every other tensor of the HF state dict by key (N:M
    masks and SR-STE parametrizations evaluated into plain weights).

    Example:
        >>> from lightcook.ops.quant import QuantSpec
        >>> net = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(8, 4), QuantSpec(bits=8)))
        >>> layers, plain = split_network(net)
        >>> list(layers), sorted(plain)
        (['0'], [])
    """
    layers = {name: LayerCodes.from_quant_linear(name, q) for name, q in quantized_layers(model).items()}
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    plain: dict[str, Tensor] = {}
    for key, value in live.items():
        owner = key.rpartition(".")[0]
        if owner in layers or key.endswith(MASK) or _ORIGINAL in key:
            continue
        plain[key] = value
    for owner in {k.rpartition(".")[0] for k in live if k.endswith(MASK)} | {
        k.split(_ORIGINAL)[0] for k in live if _ORIGINAL in k
    }:
        if owner not in layers:
            plain[f"{owner}.weight"] = _plain_weight(model.get_submodule(owner))
    return layers, plain


def save_compressed_tensors(
    model: nn.Module,
    path: str | Path,
    nm: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the live ``model`` as a compressed-tensors Hugging Face folder, atomically.

    Args:
        model: the HF network after training (``QuantLinear`` layers and/or N:M masks).
        path: the folder (replaced if present).
        nm: the N:M pattern of the masks, recorded in ``config.json`` (``lightcook.sparsity``).
        dtype: the dtype of the float tensors (norms, embeddings, plain layers, biases);
            default: as they are. Scales are stored in float32.

    Returns:
        ``path``.

    Raises:
        ValueError: the model has no HF ``config``, holds a technique this format cannot express
            (structured slicing, MoE: the message names it and the export that can), or a quantized
            layer is not an ``nn.Linear`` in the HF architecture (GPT-2 ``Conv1D``).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError("save_compressed_tensors: the model has no Hugging Face config to write")
    refuse_unsupported(_techniques(model, nm), "save_compressed_tensors")
    layers, plain = split_network(model)
    return write_compressed_tensors(path, config, layers, plain, nm, dtype, moe_specs(model))
