"""The transformers model of a lightcook MoE export: copied into the folder as ``modeling_lightcook_moe.py``.

No stock transformers MoE architecture computes what a lightcook MoE FFN computes. Mixtral,
Qwen2-MoE / Qwen3-MoE and DeepSeek-V3 score experts with one *linear* gate and weight each chosen
expert's output by its softmax (or sigmoid) probability, and Qwen2-MoE scales its shared expert by a
sigmoid gate; lightcook picks the top-k routed experts with an MLP, centroid or representative-neuron
router and *adds* their outputs unweighted to those of the always-on shared experts. So a lightcook MoE
folder is a Llama folder whose ``config.json`` (``model_type: lightcook_moe``) points here through
``auto_map``, and ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds:

- every layer listed in ``config.moe_layers`` (``{"<layer index>": {num_experts, shared_experts,
  expert_size, top_k, router, router_hidden, activation}}``) with a :class:`LightcookMoE` FFN:
  ``shared_experts`` (one gated MLP of ``shared_experts * expert_size`` neurons, computed by every
  token), ``experts.<e>`` (``num_experts - shared_experts`` gated MLPs of ``expert_size`` neurons) and
  ``router`` (scores the routed experts; each token computes its ``top_k`` best);
- everything else as ``LlamaForCausalLM``.

Each expert is an ``nn.Linear`` triple (``gate_proj``, ``up_proj``, ``down_proj``), so a
compressed-tensors ``quantization_config`` targets the experts' projections by name and transformers'
own compressed-tensors loader quantizes them. This file imports only torch and transformers: it runs
where lightcook is not installed.

Example:
    >>> cfg = LightcookMoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, moe_layers={"0": {"num_experts": 4,
    ...     "shared_experts": 1, "expert_size": 8, "top_k": 2, "router": "centroid"}})
    >>> model = LightcookMoeForCausalLM(cfg)
    >>> type(model.model.layers[0].mlp).__name__, len(model.model.layers[0].mlp.experts)
    ('LightcookMoE', 3)
    >>> model(torch.randint(0, 32, (1, 5))).logits.shape
    torch.Size([1, 5, 32])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

#: What ``config.json``'s ``model_type`` says.
MODEL_TYPE = "lightcook_moe"
#: The routers this file builds (lightcook's ``oracle`` and ``random`` are evaluation baselines).
ROUTERS = ("mlp", "centroid", "representative")


class LightcookMoeConfig(LlamaConfig):
    """A Llama config plus ``moe_layers``: the MoE FFN of each listed layer (see the module docstring)."""

    model_type = MODEL_TYPE

    def __init__(self, moe_layers: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        self.moe_layers = dict(moe_layers or {})
        super().__init__(**kwargs)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with ``width`` neurons (one expert, or all shared experts)."""

    def __init__(self, hidden_size: int, width: int, activation: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)
        self.act_fn = ACT2FN[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLPRouter(nn.Module):
    """``fc2(relu(fc1(x)))``: a score per routed expert."""

    def __init__(self, hidden_size: int, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class CentroidRouter(nn.Module):
    """``x · c_e``: similarity to each routed expert's centroid."""

    centroids: Tensor

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.register_buffer("centroids", torch.zeros(num_experts, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.centroids.to(x.dtype).t()


class RepresentativeRouter(nn.Module):
    """``|act(ĝ_e · x̂) (û_e · x̂)|``: the activation of each expert's representative neuron."""

    def __init__(self, hidden_size: int, num_experts: int, activation: str) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.act = ACT2FN[activation]

    def forward(self, x: Tensor) -> Tensor:
        xn = F.normalize(x, dim=-1)
        return (self.act(xn @ self.gate.to(x.dtype).t()) * (xn @ self.up.to(x.dtype).t())).abs()


def make_router(spec: dict[str, Any], hidden_size: int, router_activation: str) -> nn.Module:
    """The router ``spec["router"]`` names, over ``num_experts - shared_experts`` experts."""
    routed = spec["num_experts"] - spec.get("shared_experts", 0)
    kind = spec["router"]
    if kind == "mlp":
        return MLPRouter(hidden_size, routed, spec.get("router_hidden") or 128)
    if kind == "centroid":
        return CentroidRouter(hidden_size, routed)
    if kind == "representative":
        return RepresentativeRouter(hidden_size, routed, router_activation)
    raise ValueError(f"moe_layers: router {kind!r} is not one of {', '.join(ROUTERS)}")


class LightcookMoE(nn.Module):
    """The shared experts plus the ``top_k`` routed experts the router picks per token, added unweighted."""

    def __init__(self, config: LightcookMoeConfig, spec: dict[str, Any]) -> None:
        super().__init__()
        d, m = config.hidden_size, spec["expert_size"]
        shared, routed = spec.get("shared_experts", 0), spec["num_experts"] - spec.get("shared_experts", 0)
        activation = spec.get("activation") or config.hidden_act
        self.top_k = int(spec["top_k"])
        self.shared_experts = GatedMLP(d, shared * m, activation) if shared else None
        self.experts = nn.ModuleList(GatedMLP(d, m, activation) for _ in range(routed))
        self.router = make_router(spec, d, config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        chosen = self.router(x).topk(self.top_k, dim=-1).indices  # (N, k)
        for e, expert in enumerate(self.experts):
            rows = (chosen == e).any(dim=-1).nonzero().squeeze(-1)
            if rows.numel():
                out = out.index_add(0, rows, expert(x.index_select(0, rows)).to(out.dtype))
        return out.view(hidden_states.shape)


class LightcookMoeForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with the FFNs of ``config.moe_layers`` replaced by :class:`LightcookMoE`."""

    config_class = LightcookMoeConfig

    def __init__(self, config: LightcookMoeConfig) -> None:
        super().__init__(config)
        for index, spec in config.moe_layers.items():
            self.model.layers[int(index)].mlp = LightcookMoE(config, spec)
        self.post_init()
