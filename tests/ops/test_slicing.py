"""Slicing against the gated model it comes from: same outputs (gate values folded in), parameter
counts equal to the expected-size formula for deterministic gates, rebuilding from the described
structure, config updates, layer deletion, and errors. (The export round trips are in
tests/export/codecs/test_structured.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightcook.ops.architectures import ZeroAttention, get_architecture, layer_parameter_count, resolve_blocks
from lightcook.ops.hard_concrete import GateSet, attach_gates
from lightcook.ops.slicing import BlockPlan, apply_structure, describe_structure, plan_from_gates, slice_model
from tests.helpers.structured_moe import distinct_params, model_inputs, tiny_model

ALL_UNITS = ["heads", "neurons", "attention_layers", "ffn_layers"]
OPEN, SHUT = 10.0, -10.0  # log_alpha far on either side: P(z != 0) is 1 or ~3e-4


def gated(kind: str, seed: int = 0) -> tuple[nn.Module, GateSet]:
    model = tiny_model(kind, seed=seed)
    arch = get_architecture(model)
    gates = attach_gates(model, resolve_blocks(model, arch), ALL_UNITS, layer_parameter_count(model, arch))
    return model, gates


def _random(gates: GateSet) -> None:
    generator = torch.Generator().manual_seed(5)
    for gate in gates.gates.values():
        gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=generator) * 3)
    gates.gates["attention_layers"].log_alpha.fill_(OPEN)  # keep some structure so outputs are not trivial


def _first_attention_off(gates: GateSet) -> None:  # T5: the layer that owns the relative position bias
    _random(gates)
    gates.gates["attention_layers"].log_alpha[0] = SHUT


def _heads_of_one_block_off(gates: GateSet) -> None:
    for gate in gates.gates.values():
        gate.log_alpha.fill_(OPEN)
    first = gates.blocks[0]
    gates.gates["heads"].log_alpha[first.unit_offset : first.unit_offset + first.units] = SHUT


def _all_neurons_of_last_ffn_off(gates: GateSet) -> None:
    _random(gates)
    last = [b for b in gates.blocks if b.kind == "ffn"][-1]
    gates.gates["neurons"].log_alpha[last.unit_offset : last.unit_offset + last.units] = SHUT


def _last_layer_gone(gates: GateSet) -> None:  # both blocks of the last decoder layer: deleted
    _random(gates)
    gates.gates["attention_layers"].log_alpha[-1] = SHUT
    gates.gates["ffn_layers"].log_alpha[-1] = SHUT


SETTINGS = {
    "random": _random,
    "first_attention_off": _first_attention_off,
    "heads_of_one_block_off": _heads_of_one_block_off,
    "all_neurons_of_last_ffn_off": _all_neurons_of_last_ffn_off,
    "last_layer_gone": _last_layer_gone,
}


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(kind)).logits


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_sliced_model_equals_gated_model_and_its_size_formula(kind, setting):
    model, gates = gated(kind)
    dense_total, dense_layers = (
        distinct_params(model) - sum(p.numel() for p in gates.parameters()),
        gates.layer_params,
    )
    with torch.no_grad():
        SETTINGS[setting](gates)
    reference = logits(model, kind)  # eval: deterministic gates, soft values included
    formula = gates.expected_size({k: (v > 0).double() for k, v in gates.deterministic().items()})
    assert float(formula) == gates.deterministic_size()  # exact for 0/1 gates
    arch = get_architecture(model)
    sliced = slice_model(copy.deepcopy(model), architecture=arch)
    assert not hasattr(sliced, "lightcook_gates")
    assert torch.allclose(logits(sliced, kind), reference, atol=1e-5)
    assert layer_parameter_count(sliced, arch) == gates.deterministic_size()
    assert distinct_params(sliced) == dense_total - dense_layers + gates.deterministic_size()


def test_soft_gate_values_are_folded_in():
    model, gates = gated("llama")
    with torch.no_grad():
        _random(gates)
    plan = plan_from_gates(gates)
    soft = [v for p in plan.values() for v in (p.unit_values or []) if 0 < v < 1]
    assert len(soft) > 10  # the fold really scales weights, not only cuts them
    reference = logits(model, "llama")
    assert torch.allclose(logits(slice_model(model, plan), "llama"), reference, atol=1e-5)


def test_block_value_scales_the_output_bias_too():
    model, gates = gated("gpt2")  # GPT-2's c_proj has a bias
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.log_alpha.fill_(OPEN)
        gates.gates["ffn_layers"].log_alpha[0] = 0.3  # block value strictly inside (0, 1)
    plan = plan_from_gates(gates)
    assert 0 < plan["transformer.h.0.mlp"].block_value < 1
    reference = logits(model, "gpt2")
    assert torch.allclose(logits(slice_model(model, plan), "gpt2"), reference, atol=1e-5)


def test_gqa_group_goes_with_all_its_query_heads():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    q, k, o = attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.o_proj.weight.clone()
    slice_model(model, {"model.layers.0.self_attn": BlockPlan(kept=[1])})
    assert torch.equal(attn.q_proj.weight, q[16:32]) and torch.equal(attn.k_proj.weight, k[8:16])
    assert torch.equal(attn.o_proj.weight, o[:, 16:32]) and attn.num_key_value_groups == 2


def test_deleted_layer_updates_the_config_and_layer_indices():
    model, gates = gated("llama")
    with torch.no_grad():
        _last_layer_gone(gates)
        gates.gates["attention_layers"].log_alpha[0] = SHUT  # layer 0 keeps only its FFN
    reference = logits(model, "llama")
    sliced = slice_model(model)
    assert sliced.config.num_hidden_layers == 1 and len(sliced.model.layers) == 1
    assert isinstance(sliced.model.layers[0].self_attn, ZeroAttention)
    assert isinstance(sliced.model.layers[0].input_layernorm, nn.Identity)
    assert torch.allclose(logits(sliced, "llama"), reference, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_described_structure_rebuilds_the_sliced_shapes(kind):
    model, gates = gated(kind)
    with torch.no_grad():
        _first_attention_off(gates)
    sliced = slice_model(model)
    rebuilt = apply_structure(type(sliced)(copy.deepcopy(sliced.config)), describe_structure(sliced))
    rebuilt.load_state_dict(sliced.state_dict())  # strict: every shape fits
    assert torch.allclose(logits(rebuilt.eval(), kind), logits(sliced, kind), atol=1e-6)


def test_plan_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="give a plan, or a model carrying gates"):
        slice_model(model)
    with pytest.raises(ValueError, match=r"blocks the model does not have: \['model.layers.9.mlp'\]"):
        slice_model(model, {"model.layers.9.mlp": BlockPlan(kept=[0])})
    with pytest.raises(ValueError, match=r"kept units must be distinct indices in \[0, 64\)"):
        slice_model(model, {"model.layers.0.mlp": BlockPlan(kept=[0, 64])})
    with pytest.raises(ValueError, match="2 unit values for 1 kept units"):
        slice_model(model, {"model.layers.0.mlp": BlockPlan(kept=[0], unit_values=[1.0, 1.0])})


def test_structure_naming_a_missing_block_fails():
    with pytest.raises(ValueError, match=r"blocks \['model.layers.9.mlp'\] do not exist"):
        apply_structure(tiny_model("llama"), {"model.layers.9.mlp": {"removed": True}})


def test_masks_and_parametrized_weights_are_cut_with_the_weight():
    """N:M-style artefacts on a projection: a weight_mask buffer and a weight parametrization."""
    from torch.nn.utils import parametrize

    class Halve(nn.Module):
        def forward(self, weight):
            return weight * 0.5

    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj
    down.register_buffer("weight_mask", torch.arange(down.weight.numel()).reshape(down.weight.shape) % 2 == 0)
    parametrize.register_parametrization(down, "weight", Halve())
    expected_weight = down.weight.detach()[:, [3, 7]].clone()
    expected_mask = down.weight_mask[:, [3, 7]].clone()
    slice_model(model, {"model.layers.0.mlp": BlockPlan(kept=[3, 7])})
    assert not parametrize.is_parametrized(down)
    assert torch.equal(down.weight, expected_weight) and torch.equal(down.weight_mask, expected_mask)
