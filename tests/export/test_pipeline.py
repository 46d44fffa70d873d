"""The codecs together: every combination exports, reloads computing what was trained, and the
estimate equals the written bytes; the registry order decides the manifest."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightcook.export import estimate_bytes, load_compressed, read_manifest, save_compressed
from lightcook.export.codecs import CODECS, MANIFEST_ORDER
from lightcook.export.format import nbytes, read_tensors
from lightcook.ops.architectures import get_architecture, layer_parameter_count, resolve_blocks
from lightcook.ops.hard_concrete import attach_gates
from lightcook.ops.moe import MoEFFN
from lightcook.ops.quant import QuantLinear, QuantSpec
from lightcook.ops.sparsity import nm_mask
from tests.helpers.structured_moe import model_inputs, tiny_model

TECHNIQUES = ("moe", "structured", "nm", "quantized")


def compressed(techniques: tuple[str, ...]) -> torch.nn.Module:
    """A tiny Llama with the ``techniques`` applied in the callbacks' canonical order."""
    model = tiny_model("llama")
    layers = model.model.layers
    if "moe" in techniques:
        ffn = layers[1].mlp
        moe = MoEFFN.from_ffn(ffn, ["gate_proj", "up_proj"], "down_proj", "act_fn", True, 4, 2, "mlp", 8)
        moe.set_routed(True)
        layers[1].mlp = moe
    if "structured" in techniques:
        arch = get_architecture(model)
        units = ["heads", "attention_layers", "ffn_layers"]
        gates = attach_gates(model, resolve_blocks(model, arch), units, layer_parameter_count(model, arch))
        with torch.no_grad():
            for gate in gates.gates.values():
                gate.log_alpha.fill_(10.0)
            gates.gates["heads"].log_alpha[0] = -10.0
    for i in range(2):
        mlp = layers[i].mlp
        if "quantized" in techniques:
            mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, QuantSpec(bits=4))
            mlp.down_proj = QuantLinear.from_linear(
                mlp.down_proj, QuantSpec(bits=8, granularity="group", group_size=16)
            )
        if "nm" in techniques:
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.register_buffer("weight_mask", nm_mask(proj.weight.abs(), 2, 4))
                with torch.no_grad():
                    proj.weight.mul_(proj.weight_mask)
    return model.eval()


COMBINATIONS = [c for r in range(1, 5) for c in itertools.combinations(TECHNIQUES, r)]


@pytest.mark.parametrize("techniques", COMBINATIONS, ids="+".join)
def test_combination_round_trip_and_estimate(tmp_path, techniques):
    model = compressed(techniques)
    with torch.no_grad():
        live = model(**model_inputs("llama")).logits
    out = save_compressed(model, tmp_path / "c")
    manifest = read_manifest(out)
    assert manifest["techniques"] == list(techniques)  # canonical order, whatever was applied
    with torch.no_grad():
        exported = load_compressed(out, backend="reference")(**model_inputs("llama")).logits
    assert (live - exported).abs().max() < 1e-4 * live.abs().max()
    estimate = estimate_bytes(model)
    written = sum(nbytes(t) for t in read_tensors(out).values())
    assert estimate["tensor_bytes"] == manifest["tensor_bytes"] == written
    assert estimate["weight_bytes"] == manifest["weight_bytes"]
    assert estimate["fp32_weight_bytes"] == manifest["fp32_weight_bytes"]
    assert sum(estimate["by_technique"].values()) == written


def test_registry_order():
    assert [c.name for c in CODECS][0] == "structured"  # slicing changes every other codec's shapes
    assert sorted(c.name for c in CODECS) == sorted(MANIFEST_ORDER)
