"""MoE FFNs: one spec per :class:`~lightcook.ops.moe.MoEFFN`, rebuilt at load time as sparse MoE FFNs.

The experts' weights are the FFN projections in their permuted (expert-contiguous) order, stored
under their usual names like any other layer's (or packed by the N:M / quantized codecs); this codec
stores each FFN's router tensors and its ``perm`` / ``routed`` / ``relu`` buffers, and the manifest
entry ``{ffn name: MoEFFN.spec()}`` (projection names, activation, experts, top-k, router kind, and
``shared_experts``: the always-on experts of a carved MoE, 0 when absent as in older exports). At load
time each listed FFN of the rebuilt model is wrapped in a :class:`MoEFFN` with a frozen router: without
gradients it runs the conditional-computation path (the shared experts' weights and only the top-k
routed experts' weights per token).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.export.codecs.base import Encoding
    >>> from lightcook.ops.moe import MoEFFN
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> mlp = model.model.layers[0].mlp
    >>> model.model.layers[0].mlp = MoEFFN.from_ffn(mlp, ["gate_proj", "up_proj"], "down_proj", "act_fn",
    ...                                             True, 8, 2, "centroid")
    >>> enc = Encoding(model)
    >>> MoECodec().encode(enc)["model.layers.0.mlp"]["num_experts"], sorted(enc.tensors)[0]
    (8, 'model.layers.0.mlp.perm')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightcook.export.codecs.base import Codec, Decoding, Encoding, itemsize, stored_as
from lightcook.ops.moe import MoEFFN, moe_modules

__all__ = ["MoECodec", "router_names"]


def router_names(model: nn.Module) -> set[str]:
    """Qualified names of the routers of ``model``'s MoE FFNs."""
    return {f"{name}.router" for name in moe_modules(model)}


def _own_tensors(name: str, moe: MoEFFN) -> dict[str, Tensor]:
    """The FFN's router tensors and its own buffers (the projections are stored by other codecs)."""
    own = {f"{name}.{k}": v for k, v in moe._buffers.items() if v is not None}
    own.update(moe.router.state_dict(prefix=f"{name}.router."))
    return own


def _wrap(model: nn.Module, name: str, spec: Mapping[str, Any]) -> None:
    moe = MoEFFN.from_ffn(
        model.get_submodule(name),
        spec["inputs"],
        spec["output"],
        spec["activation"],
        spec["gated"],
        spec["num_experts"],
        spec["top_k"],
        spec["router"],
        spec.get("router_hidden") or 128,
        spec.get("buckets", 8),
        shared_experts=spec.get("shared_experts", 0),  # exports before carved MoE have none
    )
    moe.router.requires_grad_(False)
    model.set_submodule(name, moe)


class MoECodec(Codec):
    """:class:`MoEFFN` layers ↔ specs + router tensors ↔ sparse MoE FFNs."""

    name = "moe"

    def _walk(self, enc: Encoding, store: bool) -> dict[str, Any] | None:
        moes = moe_modules(enc.net)
        for name, moe in moes.items():
            for key, tensor in _own_tensors(name, moe).items():
                if store:
                    enc.store(key, stored_as(tensor, enc.dtype))
                else:
                    enc.count(key, tensor.numel() * itemsize(tensor, enc.dtype))
                enc.claimed.add(key)
        return {name: moe.spec() for name, moe in moes.items()} or None

    def encode(self, enc: Encoding) -> dict[str, Any] | None:
        return self._walk(enc, store=True)

    def estimate_bytes(self, enc: Encoding) -> dict[str, Any] | None:
        return self._walk(enc, store=False)

    def decode(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        for name, spec in entry.items():
            _wrap(dec.model, name, spec)
