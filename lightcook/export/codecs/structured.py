"""Structured pruning: heads, FFN neurons and whole blocks physically removed, per-block shapes recorded.

When the network carries structured-pruning gates (``lightcook_gates``), :meth:`StructuredCodec.encode`
replaces the network being exported by a sliced copy (:func:`~lightcook.ops.slicing.slice_model`:
deterministic gate values folded into the weights, zero units cut, removed blocks replaced by zero
modules, empty layers deleted); the live network keeps its gates. The entry records the layout and
the per-block shapes (:func:`~lightcook.ops.slicing.describe_structure`), which a plain Hugging Face
config cannot hold; at load time :func:`~lightcook.ops.slicing.apply_structure` resizes the model
built from the config before its weights are loaded. The codec stores no tensor of its own: the
sliced weights are the other codecs' and the plain ones. Estimates slice a copy on the ``meta``
device (shapes only; masks and gates stay real).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.export.codecs.base import Encoding
    >>> from lightcook.ops.architectures import get_architecture, layer_parameter_count, resolve_blocks
    >>> from lightcook.ops.hard_concrete import attach_gates
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> arch = get_architecture(model)
    >>> gates = attach_gates(model, resolve_blocks(model, arch), ["heads"], layer_parameter_count(model, arch))
    >>> _ = gates.gates["heads"].log_alpha.data.copy_(torch.tensor([10.0, -10.0]))
    >>> enc = Encoding(model)
    >>> StructuredCodec().encode(enc)["blocks"]["model.layers.0.self_attn"]["units"], hasattr(model, "lightcook_gates")
    (1, True)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightcook.export.codecs.base import Codec, Decoding, Encoding
from lightcook.ops.architectures import get_architecture, layer_parameter_count
from lightcook.ops.hard_concrete import GateSet
from lightcook.ops.names import GATES
from lightcook.ops.slicing import apply_structure, describe_structure, slice_model

__all__ = ["StructuredCodec", "gated_copy"]


def _meta_memo(model: nn.Module, keep: set[int]) -> dict[int, Any]:
    """A ``deepcopy`` memo that copies floating parameters and buffers as ``meta`` tensors (shapes
    only), except those in ``keep``; masks, indices and flags stay real."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is None or not tensor.is_floating_point() or id(tensor) in keep or id(tensor) in memo:
                continue
            meta = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = (
                nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
            )
    return memo


def gated_copy(model: nn.Module, meta: bool = False) -> nn.Module:
    """A deep copy of a gated ``model`` (``meta``: shapes only); the gate hooks are lifted for the copy
    (their closures point at the live model) and put back on the original."""
    gates: GateSet = getattr(model, GATES)
    gates.remove_hooks()
    try:
        keep = {id(t) for t in gates.state_dict(keep_vars=True).values()}
        return copy.deepcopy(model, _meta_memo(model, keep) if meta else {})
    finally:
        gates.install_hooks(model)


class StructuredCodec(Codec):
    """Gated network ↔ sliced network + per-block shapes ↔ resized Hugging Face model."""

    name = "structured"

    def _walk(self, enc: Encoding, meta: bool) -> dict[str, Any] | None:
        if isinstance(getattr(enc.net, GATES, None), GateSet):
            enc.net = slice_model(gated_copy(enc.net, meta), None, enc.architecture)
        elif not enc.sliced:
            return None
        arch = get_architecture(enc.net, enc.architecture)
        record = enc.architecture if isinstance(enc.architecture, str | Mapping) else arch.name
        return {
            "architecture": dict(record) if isinstance(record, Mapping) else record,
            "layer_parameters": layer_parameter_count(enc.net, arch),
            "blocks": describe_structure(enc.net, arch),
        }

    def encode(self, enc: Encoding) -> dict[str, Any] | None:
        return self._walk(enc, meta=False)

    def estimate_bytes(self, enc: Encoding) -> dict[str, Any] | None:
        return self._walk(enc, meta=True)

    def decode(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        architecture = dec.held.pop("architecture", None) or entry["architecture"]
        apply_structure(dec.model, entry["blocks"], get_architecture(dec.model, architecture))
