"""Structured codec: a gated network exports as its sliced copy (the live one keeps its gates),
reloads with the same outputs, and the estimate (sliced on the meta device) equals the written bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightcook.export import estimate_bytes, load_compressed, read_manifest, save_compressed
from lightcook.export.format import nbytes, read_tensors
from lightcook.ops.architectures import get_architecture, layer_parameter_count, resolve_blocks
from lightcook.ops.hard_concrete import GateSet, attach_gates
from lightcook.ops.slicing import BlockPlan, slice_model
from tests.helpers.structured_moe import distinct_params, model_inputs, tiny_model

UNITS = ["heads", "neurons", "attention_layers", "ffn_layers"]


def gated(kind: str, last_layer_gone: bool = False) -> tuple[nn.Module, GateSet]:
    """A tiny model with gates: random unit gates (some soft values), optionally the last layer gone."""
    model = tiny_model(kind)
    arch = get_architecture(model)
    gates = attach_gates(model, resolve_blocks(model, arch), UNITS, layer_parameter_count(model, arch))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=generator) * 3)
        gates.gates["attention_layers"].log_alpha.fill_(10.0)
        if last_layer_gone:
            gates.gates["attention_layers"].log_alpha[-1] = -10.0
            gates.gates["ffn_layers"].log_alpha[-1] = -10.0
    return model.eval(), gates


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(kind)).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_gated_network_exports_its_sliced_copy(tmp_path, kind):
    model, gates = gated(kind)
    reference = logits(model, kind)
    out = save_compressed(model, tmp_path / "s")
    assert model.lightcook_gates is gates and torch.equal(logits(model, kind), reference)  # live: unchanged
    manifest = read_manifest(out)
    assert manifest["techniques"] == ["structured"]
    assert manifest["structured"]["layer_parameters"] == gates.deterministic_size()
    loaded = load_compressed(out, backend="reference")
    assert not loaded.training and not hasattr(loaded, "lightcook_gates")
    assert torch.allclose(logits(loaded, kind), reference, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("last_layer_gone", [False, True])
def test_estimate_equals_the_written_tensors(tmp_path, kind, last_layer_gone):
    model, _ = gated(kind, last_layer_gone)
    out = save_compressed(model, tmp_path / "s", dtype=torch.bfloat16)
    estimate, manifest = estimate_bytes(model, dtype=torch.bfloat16), read_manifest(out)
    assert (
        estimate["tensor_bytes"]
        == manifest["tensor_bytes"]
        == sum(nbytes(t) for t in read_tensors(out).values())
    )
    assert estimate["weight_bytes"] == manifest["weight_bytes"] < estimate["block_params"] * 2
    assert estimate["techniques"] == ["structured"] and estimate["by_technique"]["structured"] == 0


def test_estimate_leaves_the_live_network_alone():
    model, gates = gated("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate_bytes(model)
    assert all(torch.equal(v, before[k]) and not v.is_meta for k, v in model.state_dict().items())
    assert model.lightcook_gates is gates and gates._handles  # hooks back in place


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_already_sliced_model_round_trip(tmp_path, kind):
    model, _ = gated(kind)
    sliced = slice_model(model)
    out = save_compressed(sliced, tmp_path / "sliced", sliced=True, extra={"note": "x"})
    assert read_manifest(out)["note"] == "x"
    reloaded = load_compressed(out, backend="reference")
    assert type(reloaded) is type(sliced) and not reloaded.training
    assert torch.allclose(logits(reloaded, kind), logits(sliced, kind), atol=1e-6)
    assert distinct_params(reloaded) == distinct_params(sliced)
    if kind == "llama":  # tied embeddings stay tied
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_uniform_pruning_gives_a_plain_hugging_face_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    plan = {f"model.layers.{i}.self_attn": BlockPlan(kept=[1]) for i in range(2)}
    plan.update({f"model.layers.{i}.mlp": BlockPlan(kept=list(range(40))) for i in range(2)})
    sliced = slice_model(model, plan)
    out = save_compressed(sliced, tmp_path / "uniform", sliced=True)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no lightcook loader involved
    assert torch.allclose(logits(plain, "llama"), logits(sliced, "llama"), atol=1e-6)
