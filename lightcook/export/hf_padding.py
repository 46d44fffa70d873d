"""Unevenly sliced networks as a stock Hugging Face config: every layer zero-padded to the widest.

A stock Llama-family config holds one FFN width (``intermediate_size``) and one head count for every
layer, while structured pruning keeps a different number of neurons and key/value groups in each
layer (and removes whole blocks). For the folders other stacks open (compressed-tensors, GGUF),
:func:`pad_to_widest` pads each layer with *zero units* up to the widest kept layer:

* FFN: zero ``gate_proj``/``up_proj`` rows and zero ``down_proj`` columns: ``act(0) * 0 = 0``, and the
  down projection reads nothing from them;
* attention: whole zero key/value groups (zero ``q``/``k``/``v`` rows, zero ``o_proj`` columns), each
  with its ``num_attention_heads / num_key_value_heads`` query heads, so ``repeat_kv`` pairs them
  with each other: their output is zero and ``o_proj`` reads nothing from it;
* a removed block: all zero (its pre-norm, an identity in the sliced network, is written as zeros:
  nothing reads it).

So the padded network computes the same function, **exactly**: the padded terms are exact zeros in
every sum (quantized layers too: zero codes, or codes equal to the zero point). The price is the
padding's bytes, compute and KV cache: the lightcook export stays the compact folder. The widths each
layer really keeps are recorded in ``config.json`` under ``lightcook.padded``.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.ops.slicing import BlockPlan, slice_model
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> net = slice_model(LlamaForCausalLM(cfg).eval(), {"model.layers.0.mlp": BlockPlan(kept=list(range(40))),
    ...                                                  "model.layers.1.mlp": BlockPlan(kept=list(range(24)))})
    >>> plain = dict(net.state_dict())
    >>> config, _, padded = pad_to_widest(net.config, {}, plain)
    >>> config.intermediate_size, config.lightcook["padded"]["intermediate_size"]
    (40, [40, 24])
    >>> padded["model.layers.1.mlp.down_proj.weight"].shape
    torch.Size([32, 40])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lightcook.export.format import model_from_config
from lightcook.ops.architectures import ARCHITECTURES

#: A :class:`~lightcook.export.compressed_tensors.LayerCodes` (not imported: that module imports this one).
LayerCodes = Any

__all__ = ["pad_to_widest"]


def _pad(tensor: Tensor, shape: tuple[int, ...], value: float = 0) -> Tensor:
    """``tensor`` grown at the end of each dim to ``shape``, the new entries ``value``."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = tensor.new_full(shape, value)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def _pad_layer(layer: LayerCodes, shape: tuple[int, ...], where: str) -> LayerCodes:
    """A quantized layer grown to ``shape`` with weights that are exactly zero."""
    (rows, cols), (out, inp) = layer.codes.shape, shape
    if (rows, cols) == (out, inp):
        return layer
    spec, zp = layer.spec, layer.zero_point
    scale = layer.scale
    if spec.granularity == "group":
        g = spec.group_size
        if (inp - cols) % g:
            raise ValueError(
                f"{where}: padding {cols} to {inp} input channels splits its groups of {g} "
                "(the kept widths must be multiples of the group size)"
            )
        scale = _pad(scale, (out, inp // g, *scale.shape[2:]), 1.0)
    elif spec.granularity == "channel":
        scale = _pad(scale, (out, *scale.shape[1:]), 1.0)
    if zp is not None and spec.granularity == "tensor":  # one zero point: every padded code is it
        codes = _pad(layer.codes, (out, inp), int(zp.reshape(-1)[0].item()))
    else:
        codes = _pad(layer.codes, (out, inp), 0)
    if zp is not None and spec.granularity != "tensor":
        zp = _pad(zp, tuple(scale.shape), 0.0)  # padded rows / groups: code 0 = zero point 0
        if spec.granularity == "channel" and inp > cols:  # padded columns of a kept row: its zero point
            codes[:rows, cols:] = layer.zero_point.reshape(-1, 1).to(codes.dtype)
    bias = None if layer.bias is None else _pad(layer.bias, (out,), 0)
    return replace(layer, codes=codes, scale=scale, zero_point=zp, bias=bias)


def _shape(key: str, layers: Mapping[str, LayerCodes], plain: Mapping[str, Tensor]) -> tuple[int, ...] | None:
    owner = key.rpartition(".")[0]
    if owner in layers:
        return tuple(layers[owner].codes.shape)
    return tuple(plain[key].shape) if key in plain else None


def pad_to_widest(
    config: Any, layers: Mapping[str, LayerCodes], plain: Mapping[str, Tensor]
) -> tuple[Any, dict[str, LayerCodes], dict[str, Tensor]]:
    """The parts of a sliced network with every layer zero-padded to the widest kept layer.

    Args:
        config: the HF config the network was built from (a registered decoder layout with per-model
            head-count and FFN-width keys: Llama, Qwen2, Mistral ...).
        layers / plain: the quantized layers and the other tensors (``split_network``'s parts).

    Returns:
        ``(config, layers, plain)``: unchanged when every layer already has the config's shapes (or
        the layout is not one a stock config can pad); otherwise a config with the widest widths (and
        ``head_dim`` pinned) and ``lightcook.padded`` = the kept widths per layer, and padded parts.

    Raises:
        ValueError: a per-group quantized projection whose padding would split its groups.
    """
    arch = ARCHITECTURES.get(getattr(config, "model_type", None) or "")
    if arch is None or len(arch.stacks) != 1 or not arch.heads_config or not arch.ffn_config:
        return config, dict(layers), dict(plain)
    stack = arch.stacks[0]
    attention, ffn = stack.attention[0], stack.ffn[0]
    heads_key, kv_key = arch.heads_config
    n_layers = int(getattr(config, stack.num_layers_key or "num_hidden_layers"))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // getattr(config, heads_key))
    rep = getattr(config, heads_key) // getattr(config, kv_key)
    widths, groups = [], []
    for i in range(n_layers):
        base = f"{stack.layers}.{i}"
        down = _shape(f"{base}.{ffn.path}.{ffn.output}.weight", layers, plain)
        k = _shape(f"{base}.{attention.path}.{attention.k}.weight", layers, plain)
        widths.append(0 if down is None else down[1])
        groups.append(0 if k is None else k[0] // head_dim)
    if set(widths) == {getattr(config, arch.ffn_config)} and set(groups) == {getattr(config, kv_key)}:
        return config, dict(layers), dict(plain)
    out = copy.deepcopy(config)
    setattr(out, arch.ffn_config, max(widths) or 1)
    setattr(out, kv_key, max(groups) or 1)
    setattr(out, heads_key, (max(groups) or 1) * rep)
    if arch.head_dim_config:
        setattr(out, arch.head_dim_config, head_dim)
    out.lightcook = {**getattr(config, "lightcook", {}), "padded": {arch.ffn_config: widths, kv_key: groups}}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_from_config(copy.deepcopy(out)).state_dict().items()}
    floats = [t.dtype for t in plain.values() if t.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    new_layers, new_plain = dict(layers), dict(plain)
    for key, shape in expected.items():
        if not key.startswith(f"{stack.layers}."):
            continue
        owner = key.rpartition(".")[0]
        if owner in layers:
            if key.endswith(".weight"):
                new_layers[owner] = _pad_layer(layers[owner], shape, f"padding {owner}")
        elif key in plain:
            new_plain[key] = _pad(plain[key].detach(), shape, 0)
        else:  # a removed block (or its identity pre-norm)
            new_plain[key] = torch.zeros(shape, dtype=dtype)
    return out, new_layers, new_plain
