"""Physically cut heads, FFN neurons and whole blocks out of a model; describe and rebuild its shapes.

A :class:`BlockPlan` per block says which units stay and with which gate values. :func:`slice_model`
folds the values into the output projection (so the sliced model computes exactly what the gated
model computed), cuts every projection to the kept channels, replaces removed blocks by zero modules
(their pre-norms by ``nn.Identity``), deletes layers whose blocks are all gone where the layout
allows it, and updates the Hugging Face config (layer count; head counts and FFN width when they
are the same in every kept layer).

Per-layer head counts and FFN widths are not representable in a plain Hugging Face config:
:func:`describe_structure` gives the per-block shapes and :func:`apply_structure` resizes a model
freshly built from the config to them, so that the export (the structured codec of
:mod:`lightcook.export`) rebuilds an ordinary ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` /
``T5ForConditionalGeneration`` instance of the smaller shape.

Example:
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(cfg).eval()
    >>> plan = {"model.layers.0.mlp": BlockPlan(kept=list(range(40))),
    ...         "model.layers.1.self_attn": BlockPlan(kept=[])}
    >>> model = slice_model(model, plan)
    >>> model.model.layers[0].mlp.down_proj.in_features, type(model.model.layers[1].self_attn).__name__
    (40, 'ZeroAttention')
    >>> rebuilt = apply_structure(AutoModelForCausalLM.from_config(cfg), describe_structure(model))
    >>> _ = rebuilt.load_state_dict(model.state_dict())
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> torch.allclose(rebuilt.eval()(ids).logits, model(ids).logits, atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightcook.ops.architectures import (
    ATTENTION,
    BLOCK_GATE,
    BLOCK_UNIT,
    FFN,
    Architecture,
    AttentionLayout,
    Block,
    Cut,
    FFNLayout,
    ZeroFFN,
    get_architecture,
    is_conv1d,
    is_removed,
    iter_layers,
    resolve_blocks,
)
from lightcook.ops.hard_concrete import GateSet, detach_gates

FORMAT = "structured"


@dataclass
class BlockPlan:
    """What happens to one block.

    Attributes:
        kept: indices of the units that stay (sorted on use); empty: the block goes.
        unit_values: gate value per *kept* unit, folded into the output projection (``None``: 1).
        block_value: block gate value, folded into the output projection and its bias; 0: the block goes.
    """

    kept: list[int]
    unit_values: list[float] | None = None
    block_value: float = 1.0

    @property
    def removed(self) -> bool:
        """Whether the whole block is removed."""
        return not self.kept or self.block_value == 0


def plan_from_gates(gate_set: GateSet) -> dict[str, BlockPlan]:
    """The slicing plan of a gate set's deterministic gates (values folded, zeros cut)."""
    values = gate_set.deterministic()
    plan = {}
    for block in gate_set.blocks:
        units, scale = gate_set.block_factors(block, values)
        kept = list(range(block.units)) if units is None else torch.nonzero(units > 0).flatten().tolist()
        unit_values = None if units is None else units[kept].tolist()
        plan[block.name] = BlockPlan(kept, unit_values, 1.0 if scale is None else float(scale))
    return plan


# --------------------------------------------------------------------------- slicing


def slice_model(
    model: nn.Module,
    plan: Mapping[str, BlockPlan] | None = None,
    architecture: str | Mapping[str, Any] | Architecture | None = None,
) -> nn.Module:
    """Cut ``model`` in place according to ``plan`` and return it.

    Args:
        model: the network. If it carries a gate set (``model.lightcook_gates``) the gates are removed
            first, and with ``plan=None`` their deterministic values are the plan.
        plan: block name → :class:`BlockPlan`; blocks not named stay as they are.
        architecture: layout override (see :func:`~lightcook.ops.architectures.get_architecture`).

    Raises:
        ValueError: no plan and no gates, a plan naming an unknown block, kept indices out of range
            or values of the wrong length, or an unknown layout.
    """
    arch = get_architecture(model, architecture)
    gate_set = detach_gates(model)
    if plan is None:
        if gate_set is None:
            raise ValueError("slice_model: give a plan, or a model carrying gates (model.lightcook_gates)")
        plan = plan_from_gates(gate_set)
    blocks = {b.name: b for b in resolve_blocks(model, arch)}
    unknown = sorted(set(plan) - set(blocks))
    if unknown:
        raise ValueError(f"slice_model: plan names blocks the model does not have: {unknown[:4]}")
    with torch.no_grad():
        for name, block_plan in plan.items():
            _apply(blocks[name], block_plan, arch)
    _delete_empty_layers(model, arch)
    _update_config(model, arch)
    return model


def _apply(block: Block, plan: BlockPlan, arch: Architecture) -> None:
    kept = sorted(plan.kept)
    if kept and (kept[0] < 0 or kept[-1] >= block.units or len(set(kept)) != len(kept)):
        raise ValueError(
            f"{block.name}: kept units must be distinct indices in [0, {block.units}), got {plan.kept}"
        )
    if plan.unit_values is not None and len(plan.unit_values) != len(kept):
        raise ValueError(f"{block.name}: {len(plan.unit_values)} unit values for {len(kept)} kept units")
    if plan.removed:
        remove_block(block, arch)
        return
    order = sorted(range(len(plan.kept)), key=lambda i: plan.kept[i])
    values = None if plan.unit_values is None else [plan.unit_values[i] for i in order]
    _fold(block, kept, values, plan.block_value)
    cut_block(block, kept, arch)


def _fold(block: Block, kept: list[int], unit_values: list[float] | None, block_value: float) -> None:
    """Fold the gate values into the weights so the sliced block computes what the gated one did.

    Unit values go into the rows of a projection that is linear in the unit's channels — the value
    projection (attention) or the up projection (gated FFN) — when there is one: scaling whole rows
    leaves per-row (and per-tensor, for the block value) integer codes of fake-quantized layers
    unchanged, so a quantized model is sliced exactly. Otherwise (fused GPT-2 ``c_attn``, plain
    ``act(fc)`` FFNs) they go into the output projection's unit channels. The block value scales the
    output projection and its bias.
    """
    out = block.model.get_submodule(block.output)
    scale = torch.zeros(block.units, dtype=torch.float64)
    scale[kept] = 1.0 if unit_values is None else torch.tensor(unit_values, dtype=torch.float64)
    producer = _linear_producer(block) if unit_values is not None else None
    if producer is not None:
        module, rows = producer  # rows: (units, k) output channels of each unit in ``module``
        row_scale = torch.ones(module.weight.shape[0], dtype=torch.float64)
        row_scale[rows.flatten()] = scale.repeat_interleave(rows.shape[1])
        module.weight.mul_(row_scale.to(module.weight.dtype)[:, None])
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(row_scale.to(module.bias.dtype))
        scale = (scale > 0).to(torch.float64)  # the output projection keeps only the block value
    channel_scale = (scale * block_value).repeat_interleave(block.unit_width)  # (units * unit_width,)
    weight = cast(Tensor, out.weight)  # Linear (out, in) / Conv1D (in, out)
    shape = (-1, 1) if is_conv1d(out) else (1, -1)
    weight.mul_(channel_scale.to(weight.dtype).reshape(shape))
    if getattr(out, "bias", None) is not None:
        cast(Tensor, out.bias).mul_(block_value)


def _linear_producer(block: Block) -> tuple[nn.Linear, Tensor] | None:
    """``(module, per-unit rows)`` of the ``nn.Linear`` whose output channels a unit's gate may scale
    instead of the output projection's inputs: ``v`` of unfused attention, ``up`` of a gated FFN."""
    layout = block.layout
    if block.kind == ATTENTION and not getattr(layout, "fused_qkv", False):
        name = f"{block.name}.{cast(AttentionLayout, layout).v}"
    elif block.kind == FFN and getattr(layout, "gated", False):
        name = f"{block.name}.{cast(FFNLayout, layout).inputs[1]}"
    else:
        return None
    cut = next((c for c in block.cuts if c.module == name and c.side == "out"), None)
    module = block.model.get_submodule(name) if cut is not None else None
    if not isinstance(module, nn.Linear) or parametrize.is_parametrized(module, "weight"):
        return None
    return module, cast(Cut, cut).channels  # a module was found, so was its cut


def cut_block(block: Block, kept: list[int], arch: Architecture) -> None:
    """Keep only units ``kept`` (sorted) in every projection of ``block``; update module attributes."""
    index = torch.tensor(kept, dtype=torch.long)
    for cut in block.cuts:
        channels = cut.channels[index].flatten().sort().values  # fused [q|k|v] stays in thirds
        _cut_linear(block.model.get_submodule(cut.module), cut.side, channels)
    if block.kind == ATTENTION and arch.resize_attention is not None:
        heads = [u * block.heads_per_unit + r for u in kept for r in range(block.heads_per_unit)]
        arch.resize_attention(block.module, heads)
    if block.kind == FFN and hasattr(block.module, "intermediate_size"):
        block.module.intermediate_size = len(kept)  # type: ignore[assignment]  # torch types only Tensor/Module


def _cut_linear(module: nn.Module, side: str, channels: Tensor) -> None:
    """Cut a Linear/Conv1D to ``channels`` on ``side``; parametrized weights (e.g. N:M masks) are
    folded first, and buffers shaped like the weight (``weight_mask``) are cut with it."""
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    conv = is_conv1d(module)
    weight_dim = {("out", False): 0, ("in", False): 1, ("out", True): 1, ("in", True): 0}[(side, conv)]
    weight = cast(Tensor, module.weight)
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.shape == weight.shape:
            setattr(module, name, buffer.index_select(weight_dim, channels.to(buffer.device)).clone())
    module.weight = nn.Parameter(
        weight.index_select(weight_dim, channels.to(weight.device)).clone(), weight.requires_grad
    )
    if side == "out" and getattr(module, "bias", None) is not None:
        bias = cast(Tensor, module.bias)
        module.bias = nn.Parameter(bias.index_select(0, channels.to(bias.device)).clone(), bias.requires_grad)
    if conv:
        module.nx, module.nf = module.weight.shape  # type: ignore[assignment]  # Conv1D's int attributes
    else:
        module.out_features, module.in_features = module.weight.shape  # type: ignore[assignment]


def remove_block(block: Block, arch: Architecture) -> None:
    """Replace ``block`` by a module that adds zeros to the residual stream; its pre-norm by Identity."""
    model = block.model
    if block.kind == FFN:
        _set(model, block.name, ZeroFFN())
    elif arch.zero_attention is not None:
        _set(model, block.name, arch.zero_attention(block.module))
    else:  # e.g. T5: the block must keep passing the shared position bias on
        cut_block(block, [], arch)
    _set(model, block.norm_path, nn.Identity())


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _layer_removed(stack, layer: nn.Module) -> bool:
    paths = [a.path for a in stack.attention] + [f.path for f in stack.ffn]
    present = [layer.get_submodule(p) for p in dict.fromkeys(paths) if _has_child(layer, p)]
    return bool(present) and all(is_removed(m) for m in present)


def _has_child(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _delete_empty_layers(model: nn.Module, arch: Architecture) -> None:
    config = getattr(model, "config", None)
    for stack in arch.stacks:
        if stack.num_layers_key is None or config is None:
            continue
        if any(getattr(config, flag, False) for flag in stack.no_delete_if):
            continue
        layers = cast(nn.ModuleList, model.get_submodule(stack.layers))
        keep = [layer for layer in layers if not _layer_removed(stack, layer)]
        if len(keep) == len(layers):
            continue
        _set(model, stack.layers, nn.ModuleList(keep))
        for i, layer in enumerate(keep):
            for attr in stack.layer_index_attrs:
                owner, _, name = attr.rpartition(".")
                target = layer.get_submodule(owner) if owner else layer
                if hasattr(target, name):
                    setattr(target, name, i)
        setattr(config, stack.num_layers_key, len(keep))


def _update_config(model: nn.Module, arch: Architecture) -> None:
    """Rewrite head counts / FFN width in the HF config when every kept block agrees."""
    config = getattr(model, "config", None)
    if config is None:
        return
    blocks = resolve_blocks(model, arch)
    attention = {
        (b.units * b.heads_per_unit, b.units, b.unit_width // b.heads_per_unit)
        for b in blocks
        if b.kind == ATTENTION
    }
    if len(attention) == 1 and arch.heads_config:
        ((q_heads, kv_heads, head_dim),) = attention
        if arch.head_dim_config:
            setattr(config, arch.head_dim_config, head_dim)
        for key, value in zip(arch.heads_config, (q_heads, kv_heads), strict=False):
            setattr(config, key, value)
    widths = {b.units for b in blocks if b.kind == FFN}
    if len(widths) == 1 and arch.ffn_config:
        setattr(config, arch.ffn_config, widths.pop())


# --------------------------------------------------------------------------- structure


def describe_structure(
    model: nn.Module, architecture: str | Mapping[str, Any] | Architecture | None = None
) -> dict:
    """Per-block shapes: ``{block name: {"kind", "removed", "units", ["kept_heads"]}}`` for every block
    slot of every layer (removed ones included)."""
    arch = get_architecture(model, architecture)
    live = {b.name: b for b in resolve_blocks(model, arch)}
    out: dict[str, dict] = {}
    for stack, _i, layer_path, layer in iter_layers(model, arch):
        layouts: list[AttentionLayout | FFNLayout] = [*stack.attention, *stack.ffn]
        for layout in layouts:
            name = f"{layer_path}.{layout.path}"
            if name in out or not _has_child(layer, layout.path):
                continue
            kind = ATTENTION if isinstance(layout, AttentionLayout) else FFN
            if kind == FFN and name not in live and not isinstance(layer.get_submodule(layout.path), ZeroFFN):
                continue  # the other FFN candidate (T5 gated/plain) names the same module
            entry: dict[str, Any] = {
                "kind": kind,
                "removed": name not in live,
                "units": live[name].units if name in live else 0,
            }
            kept = getattr(model.get_submodule(name), "kept_heads", None)
            if kept is not None:
                entry["kept_heads"] = list(kept)
            out[name] = entry
    return out


def apply_structure(
    model: nn.Module, structure: Mapping[str, Mapping[str, Any]], architecture: Any = None
) -> nn.Module:
    """Resize a freshly built full model to the shapes of :func:`describe_structure` (weights not kept).

    Raises:
        ValueError: the structure names a block the model does not have.
    """
    arch = get_architecture(model, architecture)
    blocks = {b.name: b for b in resolve_blocks(model, arch)}
    missing = sorted(set(structure) - set(blocks))
    if missing:
        raise ValueError(f"sliced export: blocks {missing[:4]} do not exist in the rebuilt model")
    for name, entry in structure.items():
        block = blocks[name]
        if entry["removed"]:
            remove_block(block, arch)
        elif entry["units"] != block.units:
            heads = entry.get("kept_heads")
            valid = (
                heads is not None and len(heads) == entry["units"] and max(heads, default=-1) < block.units
            )
            cut_block(block, sorted(cast(list[int], heads)) if valid else list(range(entry["units"])), arch)
    return model


@torch.no_grad()
def gate_summary(gate_set: GateSet) -> dict[str, Any]:
    """Expected/deterministic sizes and kept units per kind, for logs and manifests."""
    expected = float(gate_set.expected_size())
    kept = {kind: int((value > 0).sum()) for kind, value in gate_set.deterministic().items()}
    sizes = {kind: cast(Tensor, gate.log_alpha).numel() for kind, gate in gate_set.gates.items()}
    return {
        "layer_parameters_dense": gate_set.layer_params,
        "layer_parameters_expected": round(expected),
        "layer_parameters_deterministic": gate_set.deterministic_size(),
        "kept_units": {kind: f"{kept[kind]}/{sizes[kind]}" for kind in kept},
    }


__all__ = [
    "BLOCK_GATE",
    "BLOCK_UNIT",
    "BlockPlan",
    "apply_structure",
    "cut_block",
    "describe_structure",
    "gate_summary",
    "plan_from_gates",
    "remove_block",
    "slice_model",
]
