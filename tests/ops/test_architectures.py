"""The architecture registry against real Hugging Face models: every unit's channels, every parameter
accounted for, FFN parts for MoEfication, custom layouts and clear errors for unknown ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightcook.ops.architectures import (
    ARCHITECTURES,
    ATTENTION,
    FFN,
    architecture_from_dict,
    find_blocks,
    get_architecture,
    layer_parameter_count,
    linear_dims,
    resolve_blocks,
)
from lightcook.ops.hard_concrete import block_counts
from tests.helpers.structured_moe import (
    MYSTERY_LAYOUT,
    TINY,
    Mystery,
    distinct_params,
    tiny_model,
)

EXPECTED_BLOCKS = {  # (attention blocks, FFN blocks)
    "llama": (2, 2),
    "gpt2": (2, 2),
    "t5": (2 + 4, 4),  # encoder self; decoder self + cross
}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_blocks_are_found_with_their_units(kind):
    model = tiny_model(kind)
    blocks = resolve_blocks(model, get_architecture(model))
    kinds = [b.kind for b in blocks]
    assert (kinds.count(ATTENTION), kinds.count(FFN)) == EXPECTED_BLOCKS[kind]
    attention = [b for b in blocks if b.kind == ATTENTION]
    if kind == "llama":  # 4 query heads over 2 KV heads: 2 units of 2 heads x 8 channels
        assert {(b.units, b.heads_per_unit, b.unit_width) for b in attention} == {(2, 2, 16)}
    else:
        assert {(b.units, b.heads_per_unit, b.unit_width) for b in attention} == {(4, 1, 8)}
    widths = {b.units for b in blocks if b.kind == FFN}
    assert widths == {64 if kind != "gpt2" else 128}  # GPT-2: n_inner = 4 * n_embd


@pytest.mark.parametrize("kind", sorted(TINY))
def test_cuts_partition_every_projection(kind):
    """Each unit owns disjoint channels, and together the units own every channel of the projection."""
    model = tiny_model(kind)
    for block in resolve_blocks(model, get_architecture(model)):
        for cut in block.cuts:
            n_in, n_out, _ = linear_dims(model.get_submodule(cut.module))
            size = n_out if cut.side == "out" else n_in
            flat = cut.channels.flatten()
            assert cut.channels.shape[0] == block.units
            assert sorted(flat.tolist()) == list(range(size)), (block.name, cut.module)


def test_gqa_units_own_their_query_heads():
    """KV group g owns query heads g*rep..(g+1)*rep-1, matching Hugging Face's repeat_kv."""
    model = tiny_model("llama")
    block = resolve_blocks(model, get_architecture(model))[0]
    q, k, _v, o = block.cuts
    assert q.channels[1].tolist() == list(range(16, 32))  # query heads 2 and 3 (8 channels each)
    assert k.channels[1].tolist() == list(range(8, 16))  # KV head 1
    assert torch.equal(o.channels, q.channels) and o.side == "in"


def test_gpt2_fused_qkv_cut_takes_each_third():
    model = tiny_model("gpt2")
    block = resolve_blocks(model, get_architecture(model))[0]
    (fused, out) = block.cuts
    assert fused.channels[1].tolist() == [*range(8, 16), *range(40, 48), *range(72, 80)]
    assert out.channels[1].tolist() == list(range(8, 16))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_every_layer_parameter_is_accounted_for(kind):
    """units x per-unit + block constant (+ fixed) sums to the real parameters of the layers."""
    model = tiny_model(kind)
    arch = get_architecture(model)
    blocks = resolve_blocks(model, arch)
    counted = 0
    for block in blocks:
        per_unit, const = block_counts(block)
        assert per_unit > 0 and const >= 0
        counted += block.units * per_unit + const + sum(p.numel() for p in block.fixed_parameters())
    outside = distinct_params(model) - layer_parameter_count(model, arch)
    assert counted == layer_parameter_count(model, arch)
    assert outside == distinct_params(model) - counted  # embeddings, head, final norms


def test_per_unit_counts_by_hand():
    model = tiny_model("llama")
    attention, ffn = resolve_blocks(model, get_architecture(model))[:2]
    # a KV group: q rows 16x32, k and v rows 8x32 each, o columns 32x16; const: the RMSNorm (32)
    assert block_counts(attention) == (16 * 32 + 2 * 8 * 32 + 32 * 16, 32)
    assert block_counts(ffn) == (3 * 32, 32)  # gate row + up row + down column per neuron


def test_t5_relative_bias_is_fixed_not_pruned():
    model = tiny_model("t5")
    first = resolve_blocks(model, get_architecture(model))[0]
    assert first.name == "encoder.block.0.layer.0.SelfAttention"
    assert [p.shape for p in first.fixed_parameters()] == [torch.Size([32, 4])]


@pytest.mark.parametrize("kind", sorted(TINY))
def test_ffn_parts_for_moefication(kind):
    model = tiny_model(kind)
    ffn = next(b for b in resolve_blocks(model, get_architecture(model)) if b.kind == FFN)
    parts = ffn.ffn_parts()
    mlp = ffn.module
    if kind == "llama":
        assert parts["inputs"] == [mlp.gate_proj, mlp.up_proj] and parts["gate"] is mlp.gate_proj
        assert parts["output"] is mlp.down_proj and parts["activation"] is mlp.act_fn
    elif kind == "gpt2":
        assert parts["inputs"] == [mlp.c_fc] and parts["gate"] is None and parts["output"] is mlp.c_proj
    else:
        assert parts["inputs"] == [mlp.wi_0, mlp.wi_1] and parts["output"] is mlp.wo
    x = torch.randn(3, 32)
    reference = mlp(x)
    first = parts["activation"](_apply(parts["inputs"][0], x))
    hidden = first * _apply(parts["inputs"][1], x) if len(parts["inputs"]) == 2 else first
    assert torch.allclose(_apply(parts["output"], hidden), reference, atol=1e-6)  # the parts rebuild the FFN


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def test_ffn_parts_refuses_attention_blocks():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="attention block"):
        resolve_blocks(model, get_architecture(model))[0].ffn_parts()


def test_t5_plain_relu_ffn_is_recognised():
    model = tiny_model("t5", feed_forward_proj="relu")
    ffn = next(b for b in resolve_blocks(model, get_architecture(model)) if b.kind == FFN)
    assert ffn.layout.inputs == ("wi",) and not ffn.layout.gated


def test_aliases_and_registered_names():
    assert {"llama", "mistral", "qwen2", "gpt2", "t5", "mt5"} <= set(ARCHITECTURES)
    model = tiny_model("llama")
    assert get_architecture(model).name == "llama"
    assert get_architecture(model, "mistral").name == "llama"


def test_unknown_layout_without_mapping_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"^compress.structured.architecture: Mystery \(model_type=None\) has no known layout; registered: \[.*'llama'",
    ):
        get_architecture(Mystery(), key="compress.structured.architecture")
    with pytest.raises(
        ValueError, match="compress.structured.architecture: 'falcon' is not a registered layout"
    ):
        get_architecture(Mystery(), "falcon", key="compress.structured.architecture")


def test_custom_layout_from_a_dict():
    model = Mystery()
    arch = get_architecture(model, MYSTERY_LAYOUT)
    assert arch.units == ("neurons", "ffn_layers")
    blocks = resolve_blocks(model, arch)
    assert [(b.name, b.units) for b in blocks] == [("blocks.0.ff", 32), ("blocks.1.ff", 32)]
    assert block_counts(blocks[0]) == (16 + 1 + 16, 16 + 2 * 16)  # up row+bias, down column; down bias + LN


def test_dict_layout_errors_name_the_key():
    with pytest.raises(ValueError, match=r"arch: unknown keys \['heads'\]"):
        architecture_from_dict({"layers": "x", "heads": 3}, "arch")
    with pytest.raises(ValueError, match="arch: needs 'layers'"):
        architecture_from_dict({"ffn": None}, "arch")
    with pytest.raises(ValueError, match=r"arch.ffn: .*unexpected keyword"):
        architecture_from_dict({"layers": "x", "ffn": {"path": "ff", "bogus": 1}}, "arch")


def test_wrong_layout_for_the_model_says_where():
    with pytest.raises(ValueError, match="no layer list at 'transformer.h'"):
        resolve_blocks(tiny_model("llama"), get_architecture(tiny_model("llama"), "gpt2"))


def test_find_blocks_filters_by_kind_and_says_where_it_looked():
    arch, blocks = find_blocks(tiny_model("gpt2"), kind=FFN)
    assert arch.name == "gpt2" and [b.name for b in blocks] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    where = "looked in Demo.backbone (Mystery); set compress.moe.network to point elsewhere"
    with pytest.raises(
        ValueError,
        match=r"^architecture: Mystery \(model_type=None\) has no known layout.*\[looked in Demo\.backbone",
    ):
        find_blocks(Mystery(), where=where)
    with pytest.raises(
        ValueError,
        match=r"^architecture: layout 'gpt2': the model has no layer list .*compress\.moe\.network",
    ):
        find_blocks(tiny_model("llama"), "gpt2", where=where)
    no_attention = {**MYSTERY_LAYOUT, "ffn": None}
    with pytest.raises(
        ValueError, match=r"^architecture: layout 'custom' finds no ffn in Mystery; give a mapping with 'ffn'"
    ):
        find_blocks(Mystery(), no_attention, kind=FFN)


@pytest.mark.slow
def test_smollm2_layout():
    from lightcook.modules import CausalLMModule

    model = CausalLMModule(name_or_path="smollm2-135m-instruct").model
    arch = get_architecture(model)
    blocks = resolve_blocks(model, arch)
    assert len(blocks) == 60
    attention = blocks[0]
    assert (attention.units, attention.heads_per_unit, attention.unit_width) == (3, 3, 192)
    assert blocks[1].units == 1536
    assert block_counts(attention) == (192 * 576 + 2 * 64 * 576 + 576 * 192, 576)
    assert layer_parameter_count(model, arch) == distinct_params(model) - 49152 * 576 - 576
