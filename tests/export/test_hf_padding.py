"""Unevenly sliced networks in the stock folders: every layer zero-padded to the widest, read back by
transformers (compressed-tensors folder and GGUF file) as the sliced network."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from lightcook.export import save_compressed
from lightcook.export.compressed_tensors import LayerCodes, save_compressed_tensors
from lightcook.export.convert import GGUF_FILE, convert
from lightcook.export.gguf import save_gguf
from lightcook.export.hf_padding import pad_to_widest
from lightcook.ops.quant import QuantLinear, QuantSpec
from lightcook.ops.slicing import BlockPlan, slice_model
from tests.helpers.quant_sparsity import tiny_hf

CFG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}  # 4 heads in 2 kv groups
PLAN = {
    "model.layers.0.mlp": BlockPlan(kept=list(range(96))),
    "model.layers.0.self_attn": BlockPlan(kept=[1]),  # one kv group (of 2) with its 2 query heads
    "model.layers.1.mlp": BlockPlan(kept=[]),  # removed FFN
    "model.layers.2.mlp": BlockPlan(kept=list(range(0, 128, 4))),
    "model.layers.2.self_attn": BlockPlan(kept=[]),  # removed attention
}
KEPT = {"intermediate_size": [96, 0, 32], "num_key_value_heads": [1, 2, 0]}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def uneven(seed: int = 0, spec: QuantSpec | None = None, act_mode: str = "none") -> torch.nn.Module:
    net = slice_model(tiny_hf(seed, **CFG), PLAN)
    if spec is not None:
        for name in [n for n, m in net.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]:
            net.set_submodule(name, QuantLinear.from_linear(net.get_submodule(name), spec, act_mode=act_mode))
    return net.eval()


def _weights(layer: LayerCodes) -> torch.Tensor:
    """``(code - zero_point) * scale`` per weight, computed here from the parts."""
    rows, cols = layer.codes.shape

    def spread(v: torch.Tensor) -> torch.Tensor:
        per_row = v.float().reshape(1 if v.numel() == 1 else rows, -1).expand(rows, -1)
        return per_row.repeat_interleave(cols // per_row.shape[1], 1)

    zero = 0 if layer.zero_point is None else spread(layer.zero_point)
    return (layer.codes.float() - zero) * spread(layer.scale)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, "group", 32),
        QuantSpec(4, "group", 32, symmetric=False),
        QuantSpec(4, "channel", symmetric=False),
        QuantSpec(8, "tensor", symmetric=False),
        QuantSpec(8),
    ],
    ids=str,
)
def test_padded_codes_decode_to_the_kept_weights_and_exact_zeros(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    layer = LayerCodes.from_quant_linear("x", QuantLinear.from_linear(torch.nn.Linear(64, 40), spec))
    from lightcook.export.hf_padding import _pad_layer

    padded = _pad_layer(layer, (64, 128), "x")
    weights = _weights(padded)
    assert torch.equal(weights[:40, :64], _weights(layer))
    assert torch.count_nonzero(weights[40:]) == 0 and torch.count_nonzero(weights[:, 64:]) == 0
    assert torch.equal(padded.bias[:40], layer.bias) and torch.count_nonzero(padded.bias[40:]) == 0
    if spec.granularity == "group":
        with pytest.raises(ValueError, match=r"padding 64 to 80 input channels splits its groups of 32"):
            _pad_layer(layer, (40, 80), "x")


def test_uniform_shapes_are_left_alone() -> None:
    net = tiny_hf(0, **CFG).eval()
    plain = dict(net.state_dict())
    config, _, out = pad_to_widest(net.config, {}, plain)
    assert config is net.config and all(out[k] is plain[k] for k in plain)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gguf"])
def test_an_uneven_lightcook_export_converts_and_loads_as_the_sliced_network(tmp_path, fmt: str) -> None:
    """The converter's path: a sliced run's lightcook export → a stock folder transformers opens."""
    net = uneven(seed=1)
    src = save_compressed(net, tmp_path / "own", sliced=True)
    out = convert(src, tmp_path / fmt, fmt, gguf_type="f32")
    loaded = AutoModelForCausalLM.from_pretrained(out, **({"gguf_file": GGUF_FILE} if fmt == "gguf" else {}))
    cfg = loaded.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (96, 4, 2)
    if fmt == "gguf":
        fields = GGUFReader(out / GGUF_FILE).fields
        for key, kept in KEPT.items():
            assert list(fields[f"lightcook.padded.{key}"].contents()) == kept
    else:
        assert json.loads((out / "config.json").read_text())["lightcook"]["padded"] == KEPT
    layers = loaded.eval().model.layers
    assert torch.count_nonzero(layers[2].mlp.down_proj.weight[:, 32:]) == 0  # the padding is zeros
    assert torch.count_nonzero(layers[1].mlp.gate_proj.weight) == 0  # a removed FFN
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, net(IDS).logits, atol=1e-5)


SCHEMES = {
    "w4a16-g32": (QuantSpec(4, "group", 32), "none"),
    "w4a16-channel-asym": (QuantSpec(4, "channel", symmetric=False), "none"),
    "w8a8-dynamic": (QuantSpec(8), "dynamic"),
}


@pytest.mark.parametrize("case", list(SCHEMES))
def test_quantized_uneven_slices_keep_their_codes_in_gguf(tmp_path, case: str) -> None:
    """The padded layers are still the trained codes (no layer re-quantized), and transformers' GGUF
    reader gives the network within the block scales' fp16 rounding (and, W8A8, our activation rounding)."""
    spec, act = SCHEMES[case]
    net = uneven(seed=2, spec=spec, act_mode=act)
    written = save_gguf(net, tmp_path / "model.gguf", gguf_type="f32")
    assert sorted(written.exact) == sorted(n for n, m in net.named_modules() if isinstance(m, QuantLinear))
    assert written.requantized == []
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    with torch.no_grad():
        ours, theirs = net(IDS).logits, loaded(IDS).logits
    assert (ours - theirs).abs().max().item() < (0.05 if act == "dynamic" else 2e-3)


@pytest.mark.parametrize("case", ["w4a16-g32", "w8a8-dynamic"])
def test_quantized_uneven_slices_load_from_compressed_tensors(tmp_path, case: str) -> None:
    spec, act = SCHEMES[case]
    net = uneven(seed=3, spec=spec, act_mode=act)
    path = save_compressed_tensors(net, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert loaded.config.intermediate_size == 96
    with torch.no_grad():
        ref, got = net(IDS).logits, loaded(IDS).logits
    if act == "none":  # weight-only: exact up to float summation order
        assert torch.allclose(got, ref, atol=1e-5)
    else:  # the activation rounding of the W8A8 tests (test_compressed_tensors)
        assert (got - ref).abs().max() < 0.05 * ref.abs().max()
