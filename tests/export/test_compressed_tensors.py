"""The compressed-tensors export, read by its real consumers: ``compressed_tensors``' own packing and
plain ``transformers.AutoModelForCausalLM.from_pretrained`` (no lightcook code on the load path)."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightcook.export.compressed_tensors import pack_int32, save_compressed_tensors
from lightcook.ops.names import MASK
from lightcook.ops.quant import QuantLinear, QuantSpec
from lightcook.ops.sparsity import nm_mask
from tests.helpers import VOCAB
from tests.helpers.quant_sparsity import export_and_load, tiny_hf

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [8, 33, 64])
def test_pack_int32_equals_compressed_tensors_packing(bits: int, n: int) -> None:
    torch.manual_seed(bits * 100 + n)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, n), dtype=torch.int8)
    offset = 2 ** (bits - 1)
    assert torch.equal(pack_int32(codes, bits, offset), pack_to_int32(codes, bits))
    assert torch.equal(pack_int32(codes.T, bits, offset).T, pack_to_int32(codes, bits, packed_dim=0))


def _quantize(net, spec: QuantSpec, act_mode: str, head: bool = False, nm: tuple[int, int] | None = None):
    """Every block Linear of ``net`` (and the LM head when ``head``) as a QuantLinear; N:M masks first."""
    names = [n for n, m in net.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    for name in names:
        linear = net.get_submodule(name)
        if nm is not None:
            mask = nm_mask(linear.weight.detach().abs(), *nm)
            linear.weight.data.mul_(mask)
        layer = QuantLinear.from_linear(linear, spec, act_mode=act_mode) if spec is not None else linear
        if nm is not None:
            layer.register_buffer(MASK, mask)
        net.set_submodule(name, layer)
    if head:
        net.config.tie_word_embeddings = False
        net.lm_head = QuantLinear.from_linear(torch.nn.Linear(32, VOCAB, bias=False), spec, act_mode=act_mode)
    if act_mode == "static":
        calibrate(net)
    return net.eval()


def calibrate(net) -> None:
    quantizers = [m.input_quantizer for m in net.modules() if isinstance(m, QuantLinear)]
    for q in quantizers:
        q.calibrating = True
    with torch.no_grad():
        net(torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1)))
    for q in quantizers:
        q.calibrating = False


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

WEIGHT_ONLY = {
    "w8a16-channel": QuantSpec(8),
    "w4a16-g16": QuantSpec(4, "group", 16),
    "w3a16-g16": QuantSpec(3, "group", 16),
    "w2a16-g16": QuantSpec(2, "group", 16),
    "w8a16-tensor": QuantSpec(8, "tensor"),
}
ASYMMETRIC = {
    "w4a16-g16-asym": QuantSpec(4, "group", 16, symmetric=False),
    "w4a16-channel-asym": QuantSpec(4, "channel", symmetric=False),
    "w2a16-g16-asym": QuantSpec(2, "group", 16, symmetric=False),
    "w8a16-tensor-asym": QuantSpec(8, "tensor", symmetric=False),
}


@pytest.mark.parametrize("case", list(WEIGHT_ONLY))
def test_weight_only_exports_load_in_transformers_as_the_trained_model(tmp_path, case: str) -> None:
    """Weight-only schemes: the same dequantized weights, so the same logits up to summation order;
    and the same as lightcook's own loaded export."""
    net = _quantize(tiny_hf(seed=3), WEIGHT_ONLY[case], "none", head=case == "w4a16-g16")
    path = save_compressed_tensors(net, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    own = export_and_load(net, tmp_path / "own")
    with torch.no_grad():
        ref, got, own_logits = net(IDS).logits, loaded(IDS).logits, own(IDS).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    assert torch.allclose(got, own_logits, atol=1e-5, rtol=1e-5)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(config)  # compressed-tensors' own schema accepts it
    assert config["format"] == "pack-quantized"


def _their_weight(path, name: str):
    """Layer ``name``'s weight as compressed-tensors' own decompressor rebuilds it from the folder."""
    from compressed_tensors.compressors import BaseCompressor
    from transformers import AutoConfig

    qconfig = AutoConfig.from_pretrained(path).quantization_config
    scheme = QuantizationConfig.model_validate(qconfig).config_groups["group_0"]
    stored = load_file(path / "model.safetensors")
    state = {k.removeprefix(name + "."): v for k, v in stored.items() if k.startswith(name + ".")}
    return BaseCompressor.get_value_from_registry(scheme.format).decompress(state, scheme)["weight"], scheme


@pytest.mark.parametrize("case", list(ASYMMETRIC))
def test_asymmetric_exports_decompress_to_the_trained_weights(tmp_path, case: str) -> None:
    """Asymmetric codes and zero points (shifted into their signed range, the zero points packed
    along the output dim for group/channel) decompress, by compressed-tensors' own compressor, to
    exactly lightcook's dequantized weights."""
    net = _quantize(tiny_hf(seed=9), ASYMMETRIC[case], "none")
    path = save_compressed_tensors(net, tmp_path / "ct")
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
        layer = net.get_submodule(name)
        theirs, _ = _their_weight(path, name)
        assert torch.equal(theirs, layer.weight_quantizer(layer.weight).detach())


@pytest.mark.xfail(
    reason="transformers 5.25 + compressed-tensors 0.20.1 allocate asymmetric pack-quantized zero "
    "points unpacked and re-initialise them (llm-compressor#1618); passes once that is fixed",
    strict=True,
)
def test_asymmetric_group_export_loads_in_transformers(tmp_path) -> None:
    net = _quantize(tiny_hf(seed=9), ASYMMETRIC["w4a16-g16-asym"], "none")
    loaded = AutoModelForCausalLM.from_pretrained(save_compressed_tensors(net, tmp_path / "ct")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, net(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["w8a8", "2:4+w8a8"])
def test_w8a8_dynamic_is_int_quantized_and_differs_only_by_activation_rounding(tmp_path, nm) -> None:
    """W8A8: the int8 codes stored as they are (``int-quantized``); compressed-tensors rebuilds the
    same weights; transformers' loaded layer (its own per-token activation rounding) differs from
    lightcook's within the stated bound ``|dy_j| <= sum_i |W_ji| * amax_t / 127``."""
    net = _quantize(tiny_hf(seed=4), QuantSpec(8), "dynamic", nm=nm)
    path = save_compressed_tensors(net, tmp_path / "ct", nm=nm)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    assert config["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    name = "model.layers.0.mlp.up_proj"
    ours = net.get_submodule(name)
    stored = load_file(path / "model.safetensors")
    assert stored[f"{name}.weight"].dtype == torch.int8
    assert torch.equal(stored[f"{name}.weight"], ours.weight_quantizer.codes(ours.weight))
    weight, _ = _their_weight(path, name)
    assert torch.equal(weight, ours.weight_quantizer(ours.weight).detach())
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        ref, got = net(IDS).logits, loaded(IDS).logits  # the first forward decompresses the weights
        theirs = loaded.get_submodule(name)
        assert torch.equal(theirs.weight, weight)
        diff = (theirs(x) - ours(x)).abs()
        bound = (x.abs().amax(-1, keepdim=True) / 127) @ weight.abs().sum(1, keepdim=True).T
    assert diff.max() > 0  # the two roundings do differ ...
    assert bool((diff <= bound * (1 + 1e-5) + 1e-6).all())  # ... within the bound
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # and the network stays close
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_w8a8_static_exports_the_calibrated_input_scale(tmp_path) -> None:
    net = _quantize(tiny_hf(seed=5), QuantSpec(8), "static")
    path = save_compressed_tensors(net, tmp_path / "ct")
    layer = net.model.layers[1].self_attn.o_proj
    stored = load_file(path / "model.safetensors")
    assert torch.equal(
        stored["model.layers.1.self_attn.o_proj.input_scale"], layer.input_quantizer.static_scale().reshape(1)
    )
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref, got = net(IDS).logits, loaded(IDS).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_two_four_plus_int4_keeps_the_pattern_in_the_codes(tmp_path) -> None:
    net = _quantize(tiny_hf(seed=6), QuantSpec(4, "group", 16), "none", nm=(2, 4))
    path = save_compressed_tensors(net, tmp_path / "ct", nm=(2, 4))
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref, got = net(IDS).logits, loaded(IDS).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    config = json.loads((path / "config.json").read_text())
    assert config["lightcook"]["sparsity"] == {"pattern": "2:4", "stored": "dense"}


def test_two_four_alone_is_a_plain_hf_folder_with_zeros(tmp_path) -> None:
    net = _quantize(tiny_hf(seed=7), None, "none", nm=(2, 4))
    path = save_compressed_tensors(net, tmp_path / "ct", nm=(2, 4))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    weight = loaded.model.layers[0].mlp.down_proj.weight
    assert (weight.reshape(-1, 4) != 0).sum(-1).max() <= 2
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, net(IDS).logits)


def test_networks_it_cannot_hold_are_refused_with_the_export_that_can(tmp_path) -> None:
    from lightcook.callbacks.structured_pruning import StructuredPruningCallback
    from tests.export.codecs.test_moe import hf_model
    from tests.helpers import TINY_LLAMA

    model = hf_model(TINY_LLAMA)
    StructuredPruningCallback(target_sparsity=0.5).prepare_model(None, model)  # live gates, not sliced
    with pytest.raises(ValueError, match=r"cannot hold structured .*lightcook.export.save_compressed"):
        save_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


CONVERTED = {
    "w4a16-g16": (QuantSpec(4, "group", 16), "none", None),
    "w4a16-g16-asym": (QuantSpec(4, "group", 16, symmetric=False), "none", None),
    "w8a8-dynamic": (QuantSpec(8), "dynamic", None),
    "w8a8-static-tensor": (QuantSpec(8, "tensor"), "static", None),
    "w4a8-channel": (QuantSpec(4), "dynamic", None),
    "2:4+w4a16": (QuantSpec(4, "group", 16), "none", (2, 4)),
    "2:4": (None, "none", (2, 4)),
}


@pytest.mark.parametrize("case", list(CONVERTED))
def test_converting_a_lightcook_export_gives_the_same_folder(tmp_path, case: str) -> None:
    """``python -m lightcook.export.convert`` on the lightcook export writes exactly the tensors and
    config the live network's compressed-tensors export has (nothing re-quantized on the way)."""
    from lightcook.export import save_compressed
    from lightcook.export.convert import main

    spec, act, nm = CONVERTED[case]
    net = _quantize(tiny_hf(seed=10), spec, act, nm=nm)
    direct = save_compressed_tensors(net, tmp_path / "direct", nm=nm)
    own = save_compressed(net, tmp_path / "own", nm=nm)
    assert main([str(own), str(tmp_path / "converted")]) == 0
    a, b = load_file(direct / "model.safetensors"), load_file(tmp_path / "converted" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ]
    config_a = json.loads((direct / "config.json").read_text())
    config_b = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config_a.get("quantization_config") == config_b.get("quantization_config")
    assert config_a.get("lightcook") == config_b.get("lightcook")


def test_converter_refuses_bad_input_with_the_reason(tmp_path, capsys) -> None:
    from lightcook.export import save_compressed
    from lightcook.export.convert import main
    from tests.export.codecs.test_moe import moefied
    from tests.helpers import TINY_LLAMA

    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing: no such run directory or export folder" in capsys.readouterr().err
    model, _ = moefied(TINY_LLAMA, router="random")
    assert main([str(save_compressed(model, tmp_path / "moe")), str(tmp_path / "out")]) == 2
    assert "router 'random' is an evaluation baseline" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
