"""MoE networks as transformers folders (experts as their own Linears, the model file beside the
weights), loaded by plain ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightcook.export import load_compressed, save_compressed
from lightcook.export.compressed_tensors import save_compressed_tensors
from lightcook.export.convert import convert, main, open_with_transformers
from lightcook.export.hf_moe import REMOTE_FILE
from lightcook.ops.moe import moe_modules
from lightcook.ops.quant import QuantLinear, QuantSpec
from tests.export.codecs.test_moe import moefied
from tests.helpers import TINY_LLAMA

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
MOES = {
    "mlp": {"router": "mlp"},
    "centroid-relufied": {"router": "centroid", "relufy": True},
    "carved-shared": {"router": "representative", "split": "carve", "shared_experts": 2},
}


def _quantize_experts(model, spec: QuantSpec, act_mode: str):
    for moe in moe_modules(model).values():
        for name in [*moe.input_names, moe.output_name]:
            setattr(moe, name, QuantLinear.from_linear(getattr(moe, name), spec, act_mode=act_mode))
    return model.eval()


@pytest.mark.parametrize("case", list(MOES))
def test_moe_folder_loads_in_transformers_as_the_trained_moe(tmp_path, case: str) -> None:
    model, dense = moefied(TINY_LLAMA, **MOES[case])
    path = save_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lightcook_moe" and (path / REMOTE_FILE).is_file()
    assert set(config["moe_layers"]) == {"0", "1"}
    with pytest.raises(ValueError, match="trust_remote_code"):  # custom code: transformers asks first
        AutoModelForCausalLM.from_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    shared = MOES[case].get("shared_experts", 0)
    block = loaded.model.layers[0].mlp
    assert len(block.experts) == 8 - shared and (block.shared_experts is not None) == bool(shared)
    own = load_compressed(save_compressed(model, tmp_path / "own"), backend="reference")
    with torch.no_grad():
        ref, got, own_logits = model(IDS).logits, loaded(IDS).logits, own(IDS).logits
        dense_logits = dense(IDS).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    assert torch.allclose(got, own_logits, atol=1e-5, rtol=1e-5)
    assert (got - dense_logits).abs().max() > 1e-3  # really routed: not the dense network


def test_quantized_experts_keep_their_codes_and_load_quantized(tmp_path) -> None:
    """W4A16 g8 (the expert size is 8): every expert's packed codes are the rows / columns of the
    trained layer's codes, and transformers' compressed-tensors loader gives the same logits."""
    model, _ = moefied(TINY_LLAMA)
    model = _quantize_experts(model, QuantSpec(4, "group", 8), "none")
    path = save_compressed_tensors(model, tmp_path / "ct")
    stored = load_file(path / "model.safetensors")
    moe = model.model.layers[1].mlp
    scale = moe.down_proj.weight_quantizer.scale_and_zero_point(moe.down_proj.weight)[0]
    expert = stored["model.layers.1.mlp.experts.3.down_proj.weight_scale"]
    assert torch.equal(expert, scale.reshape(32, -1)[:, 3:4].float())  # group 3 = expert 3's columns
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    targets = config["config_groups"]["group_0"]["targets"]
    assert r"re:^model\.layers\.1\.mlp\.experts\.3\.down_proj$" in targets
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        ref, got = model(IDS).logits, loaded(IDS).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


def test_w8a8_experts_differ_only_by_activation_rounding(tmp_path) -> None:
    """W8A8 dynamic: each expert's down projection quantizes its own slice of the activations (and
    compressed-tensors rounds with amax/127.5): close to the trained network, not bit-equal."""
    model, _ = moefied(TINY_LLAMA)
    model = _quantize_experts(model, QuantSpec(8), "dynamic")
    path = save_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        ref, got = model(IDS).logits, loaded(IDS).logits
    assert 0 < (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_converting_a_moe_export_gives_the_same_folder_and_model(tmp_path, capsys) -> None:
    model, _ = moefied(TINY_LLAMA, router="representative", split="carve", shared_experts=2)
    direct = save_compressed_tensors(model, tmp_path / "direct")
    own = save_compressed(model, tmp_path / "own")
    assert main([str(own), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    a, b = load_file(direct / "model.safetensors"), load_file(tmp_path / "ct" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        got = open_with_transformers(tmp_path / "ct", "compressed-tensors")(IDS).logits
        assert torch.allclose(got, model(IDS).logits, atol=1e-5, rtol=1e-5)
    assert main([str(own), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 2
    assert "GGUF cannot hold moe" in capsys.readouterr().err
    assert not (tmp_path / "gguf").exists()


def test_groups_straddling_experts_are_refused_before_writing(tmp_path) -> None:
    model, _ = moefied(TINY_LLAMA)
    model = _quantize_experts(model, QuantSpec(4, "group", 16), "none")  # experts of 8 neurons
    with pytest.raises(ValueError, match="split the down projection's groups of 16"):
        save_compressed_tensors(model, tmp_path / "ct")
    with pytest.raises(ValueError, match="split the down projection's groups of 16"):
        convert(save_compressed(model, tmp_path / "own"), tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "out").exists()


def test_evaluation_routers_are_refused(tmp_path) -> None:
    model, _ = moefied(TINY_LLAMA, router="random")
    with pytest.raises(ValueError, match="router 'random' is an evaluation baseline"):
        save_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
