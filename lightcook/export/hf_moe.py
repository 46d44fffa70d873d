"""MoE networks as transformers folders: each MoE FFN split into its experts' own Linear layers.

A lightcook :class:`~lightcook.ops.moe.MoEFFN` keeps the dense FFN's three projections, their neurons
permuted so each expert is a contiguous slice (the shared experts first). For transformers these
become the layout of :mod:`lightcook.export.moe_remote_code` (copied into the folder, found through
``auto_map``; no stock MoE architecture computes the same function, see there):

======================================  ==================================================
lightcook (``model.layers.<i>.mlp.``)   transformers folder (``model.layers.<i>.mlp.``)
======================================  ==================================================
``gate_proj`` rows ``[0, S·m)``         ``shared_experts.gate_proj`` (also ``up_proj``)
``down_proj`` columns ``[0, S·m)``      ``shared_experts.down_proj``
rows / columns of routed expert ``e``   ``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``
``router.*``                            ``router.*`` (same tensors)
======================================  ==================================================

Quantized projections are split the same way: codes and per-channel / per-group scales by rows, the
down projection's codes by columns (its per-channel scales shared by every expert; per-group scales
need the expert size to be a multiple of the group size). The codes are the trained ones, never
re-quantized. **One arithmetic difference**: with dynamic per-token activation quantization, each
expert's down projection quantizes its own slice of the intermediate activations, where lightcook
quantizes the token's whole (masked) intermediate row at once; the split's per-token scale is never
larger, so each element differs by at most one lightcook step (``amax / 127``) of the row. Everything
else is exact up to float summation order.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.ops.moe import MoEFFN
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> mlp = model.model.layers[0].mlp
    >>> model.model.layers[0].mlp = MoEFFN.from_ffn(mlp, ["gate_proj", "up_proj"], "down_proj", "act_fn",
    ...                                             True, 8, 2, "centroid")
    >>> model.model.layers[0].mlp.set_routed(True)
    >>> moe_specs(model)["model.layers.0.mlp"]["expert_size"]
    8
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from lightcook.export.moe_remote_code import ROUTERS, LightcookMoeConfig
from lightcook.ops.moe import moe_modules

#: A :class:`~lightcook.export.compressed_tensors.LayerCodes` (not imported: that module imports this one).
LayerCodes = Any

__all__ = ["REMOTE_FILE", "moe_config", "moe_specs", "split_moe"]

#: The name of the model file in an MoE folder (``auto_map`` points to it).
REMOTE_FILE = "modeling_lightcook_moe.py"
_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp$")
_OWN_BUFFERS = ("perm", "routed", "relu")


def moe_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The routed MoE FFNs of ``model`` as ``config.moe_layers`` entries (plus ``layer``, ``d_ff``),
    by module name; FFNs not (yet) routed compute the dense FFN and are left out.

    Raises:
        ValueError: an MoE FFN this layout cannot hold (not a Llama ``model.layers.<i>.mlp``, not
            ``gate_proj``/``up_proj``/``down_proj`` without biases, or an evaluation-only router).
    """
    specs: dict[str, dict[str, Any]] = {}
    for name, moe in moe_modules(model).items():
        if not bool(moe.routed):
            continue
        spec, where = moe.spec(), f"MoE export to transformers: {name}"
        match = _FFN.match(name)
        if match is None:
            raise ValueError(f"{where}: holds Llama-family FFNs at model.layers.<i>.mlp only")
        if spec["inputs"] != ["gate_proj", "up_proj"] or spec["output"] != "down_proj" or not spec["gated"]:
            raise ValueError(f"{where}: needs a gated gate_proj/up_proj/down_proj FFN, got {spec}")
        if any(getattr(p, "bias", None) is not None for p in moe.projections):
            raise ValueError(f"{where}: FFN projections with biases (mlp_bias) are not supported")
        if spec["router"] not in ROUTERS:
            raise ValueError(
                f"{where}: router {spec['router']!r} is an evaluation baseline; the folder holds "
                + ", ".join(ROUTERS)
            )
        specs[name] = {
            "layer": int(match.group(1)),
            "d_ff": moe.d_ff,
            "num_experts": moe.num_experts,
            "shared_experts": moe.shared_experts,
            "expert_size": moe.expert_size,
            "top_k": moe.top_k,
            "router": spec["router"],
            "router_hidden": spec["router_hidden"],
            "activation": "relu" if spec["relu"] else None,
        }
    return specs


def moe_config(config: Any, specs: Mapping[str, Mapping[str, Any]]) -> LightcookMoeConfig:
    """The folder's config: ``config`` (a Llama config) as :class:`LightcookMoeConfig` with
    ``moe_layers`` and the ``auto_map`` to :data:`REMOTE_FILE`.

    Raises:
        ValueError: ``config`` is not a Llama config.
    """
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(
            f"MoE export to transformers: holds Llama models, got model_type {config.model_type!r}"
        )
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    keep = ("num_experts", "shared_experts", "expert_size", "top_k", "router", "router_hidden", "activation")
    moe_layers = {str(s["layer"]): {k: s[k] for k in keep} for s in specs.values()}
    out = LightcookMoeConfig(moe_layers=moe_layers, **fields)
    out.architectures = ["LightcookMoeForCausalLM"]
    module = REMOTE_FILE.removesuffix(".py")
    out.auto_map = {
        "AutoConfig": f"{module}.LightcookMoeConfig",
        "AutoModelForCausalLM": f"{module}.LightcookMoeForCausalLM",
    }
    return out


def _expert_slices(spec: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Sub-module name → neuron range ``[start, stop)`` of the permuted FFN."""
    m, shared = spec["expert_size"], spec["shared_experts"]
    out = {"shared_experts": (0, shared * m)} if shared else {}
    for e in range(spec["num_experts"] - shared):
        out[f"experts.{e}"] = (shared * m + e * m, shared * m + (e + 1) * m)
    return out


def _own(tensor: Tensor | None) -> Tensor | None:
    """A copy for a tensor every expert shares (safetensors stores no shared memory)."""
    return None if tensor is None else tensor.clone()


def _rows(layer: LayerCodes, start: int, stop: int) -> LayerCodes:
    if layer.spec.granularity == "tensor":
        return replace(
            layer, codes=layer.codes[start:stop], scale=layer.scale.clone(), zero_point=_own(layer.zero_point)
        )
    zp = layer.zero_point
    return replace(
        layer,
        codes=layer.codes[start:stop],
        scale=layer.scale[start:stop],
        zero_point=None if zp is None else zp[start:stop],
    )


def _columns(layer: LayerCodes, start: int, stop: int, where: str) -> LayerCodes:
    if layer.spec.granularity != "group":
        return replace(
            layer,
            codes=layer.codes[:, start:stop],
            scale=layer.scale.clone(),
            zero_point=_own(layer.zero_point),
        )
    g = layer.spec.group_size
    if start % g or stop % g:
        raise ValueError(
            f"{where}: the experts' {stop - start} neurons split the down projection's groups of {g}; "
            "a group size that divides the expert size is needed"
        )
    zp = layer.zero_point
    return replace(
        layer,
        codes=layer.codes[:, start:stop],
        scale=layer.scale[:, start // g : stop // g],
        zero_point=None if zp is None else zp[:, start // g : stop // g],
    )


def split_moe(
    specs: Mapping[str, Mapping[str, Any]],
    layers: Mapping[str, LayerCodes],
    plain: Mapping[str, Tensor],
) -> tuple[dict[str, LayerCodes], dict[str, Tensor]]:
    """The parts of a network with MoE FFNs (``specs`` from :func:`moe_specs`) in the folder's layout.

    Args:
        specs: the routed MoE FFNs.
        layers / plain: the quantized layers and other tensors (``split_network``'s parts). Of MoE
            FFNs not in ``specs`` (not routed: they compute the dense FFN) the own buffers and
            routers are dropped; their projections stay, in permuted order (the same function).

    Raises:
        ValueError: a per-group down projection whose groups straddle experts.
    """
    out_layers, out_plain = dict(layers), dict(plain)
    unrouted = {key.rpartition(".")[0] for key in plain if key.endswith(".routed")} - set(specs)
    for name in unrouted:
        for key in list(out_plain):
            if key in {f"{name}.{b}" for b in _OWN_BUFFERS} or key.startswith(f"{name}.router."):
                del out_plain[key]
    for name, spec in specs.items():
        for buffer in _OWN_BUFFERS:
            out_plain.pop(f"{name}.{buffer}", None)
        slices = _expert_slices(spec)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key, rows = f"{name}.{proj}", proj != "down_proj"
            if key in out_layers:
                layer = out_layers.pop(key)
                for sub, (a, b) in slices.items():
                    part = _rows(layer, a, b) if rows else _columns(layer, a, b, f"MoE export: {key}")
                    out_layers[f"{name}.{sub}.{proj}"] = part
            else:
                weight = out_plain.pop(f"{key}.weight")
                for sub, (a, b) in slices.items():
                    out_plain[f"{name}.{sub}.{proj}.weight"] = weight[a:b] if rows else weight[:, a:b]
    return out_layers, out_plain
