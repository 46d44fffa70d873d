"""Quantized export round trip: the loaded integer model reproduces the fake-quant model's logits,
stores what the manifest says in the bytes it says, and bad inputs fail clearly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.export.common import write_export
from lightcook.export.quantized import export_quantized, load_quantized, quantized_layers
from lightcook.modules import CausalLMModule
from lightcook.ops.quant import DequantLinear, Int8Linear
from tests.conftest import TINY_LLAMA, random_batch

LAYERS = 2 * 7


def quantized_tiny(
    seed: int = 0, steps: int = 2, **cb_kwargs
) -> tuple[torch.nn.Module, QuantizationCallback]:
    """A tiny Llama set up by the callback, trained ``steps`` SGD steps (learned scales move off
    their initial values), calibrated first when activations are static."""
    torch.manual_seed(seed)
    module = CausalLMModule(config=TINY_LLAMA, tokenizer=None)
    cb = QuantizationCallback(**cb_kwargs)
    cb.prepare_model(None, module)
    if cb.activations == "static":
        cb.calibrate(None, module, [random_batch(seed=s) for s in (10, 11)])
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    for step in range(steps):
        module.model(**random_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return module.model.eval(), cb


def logit_gap(a: torch.nn.Module, b: torch.nn.Module, seeds=(100, 101)) -> tuple[float, float]:
    """max and mean |logit difference| on held-out batches (gradients off, as at inference)."""
    gaps = []
    with torch.no_grad():
        for seed in seeds:
            ids = random_batch(batch=2, length=24, seed=seed)["input_ids"]
            gaps.append((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().flatten())
    gap = torch.cat(gaps)
    return float(gap.max()), float(gap.mean())


# Symmetric per-tensor/channel weights with 8-bit activations run the same int8 kernel in the
# fake-quant model (gradients off) and in the export; the other layouts the same dequantized weights
# and the same float ops. Either way the logits agree exactly: max |delta logit| = 0.
CASES = {
    "w8a8-channel-dynamic": ({"bits": 8}, Int8Linear),
    "w8a8-tensor-static-lsq": (
        {"bits": 8, "granularity": "tensor", "method": "lsq", "activations": "static"},
        Int8Linear,
    ),
    "w4a8-channel-lsq": ({"bits": 4, "method": "lsq"}, Int8Linear),
    "w2a8-channel-dynamic": ({"bits": 2, "method": "dynamic"}, Int8Linear),
    "w4-group16-weight-only-pact": (
        {"bits": 4, "granularity": "group", "group_size": 16, "method": "pact", "activations": "none"},
        DequantLinear,
    ),
    "w2-group16-asym-lsq-a8": (
        {"bits": 2, "granularity": "group", "group_size": 16, "symmetric": False, "method": "lsq"},
        DequantLinear,
    ),
    "w8a4-channel": ({"bits": 8, "act_bits": 4}, DequantLinear),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_matches_fake_quant_model(tmp_path, case):
    kwargs, kind = CASES[case]
    model, cb = quantized_tiny(**kwargs)
    loaded = load_quantized(export_quantized(model, tmp_path / "q"))
    layers = {n: loaded.get_submodule(n) for n in cb.quantized_modules}
    assert len(layers) == LAYERS and all(type(m) is kind for m in layers.values())
    assert logit_gap(model, loaded) == (0.0, 0.0)  # (max, mean) |delta logit| on held-out batches
    # every other tensor came back unchanged
    plain = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
    reloaded = loaded.state_dict()
    assert [k for k, v in plain.items() if not torch.equal(v, reloaded[k])] == []


@pytest.mark.parametrize(
    ("kwargs", "packed_cols", "scale_shape", "zero_point"),
    [
        ({"bits": 8}, lambda i: i, lambda o, i: (o, 1), False),
        ({"bits": 4}, lambda i: i // 2, lambda o, i: (o, 1), False),
        ({"bits": 2, "granularity": "tensor"}, lambda i: i // 4, lambda o, i: (1, 1), False),
        (
            {"bits": 4, "granularity": "group", "group_size": 16, "symmetric": False, "method": "lsq"},
            lambda i: i // 2,
            lambda o, i: (o, i // 16, 1),
            True,
        ),
    ],
)
def test_stored_bytes_are_packed_codes_and_scales(tmp_path, kwargs, packed_cols, scale_shape, zero_point):
    model, cb = quantized_tiny(steps=0, **kwargs)
    out = export_quantized(model, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    manifest = json.loads((out / "lightcook.json").read_text())
    expected_bytes = 0
    for name, q in cb.quantized_modules.items():
        o, i = q.out_features, q.in_features
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.uint8 and packed.shape == (o, packed_cols(i))
        assert scale.shape == scale_shape(o, i) and f"{name}.weight" not in tensors
        assert (f"{name}.weight_zero_point" in tensors) == zero_point
        zp_bytes = math.prod(scale.shape) if zero_point else 0
        entry = manifest["layers"][name]
        assert entry["weight_bytes"] == packed.numel() + scale.numel() * 4 + zp_bytes
        assert entry["fp32_weight_bytes"] == o * i * 4
        expected_bytes += entry["weight_bytes"]
    assert manifest["weight_bytes"] == expected_bytes
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}  # stored once


def test_quantized_tied_lm_head_round_trip(tmp_path):
    model, cb = quantized_tiny(targets=["re:.*layers.*", "lm_head"], bits=8)
    loaded = load_quantized(export_quantized(model, tmp_path / "q"))
    assert isinstance(loaded.lm_head, Int8Linear) and "lm_head" in loaded.quantized_formats
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)  # float embedding
    assert logit_gap(model, loaded) == (0.0, 0.0)


def test_export_errors(tmp_path):
    torch.manual_seed(0)
    plain = CausalLMModule(config=TINY_LLAMA, tokenizer=None).model
    with pytest.raises(ValueError, match="no QuantLinear layer"):
        export_quantized(plain, tmp_path / "plain")
    module = CausalLMModule(config=TINY_LLAMA, tokenizer=None)
    QuantizationCallback(activations="static").prepare_model(None, module)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.self_attn\.q_proj has static activations that were never calibrated",
    ):
        export_quantized(module.model, tmp_path / "uncalibrated")
    assert not (tmp_path / "uncalibrated").exists()
    write_export(tmp_path / "other", plain, dict(plain.state_dict()), {"technique": "sparse", "layers": {}})
    with pytest.raises(ValueError, match="a 'sparse' export, not 'quantized'"):
        load_quantized(tmp_path / "other")
    with pytest.raises(ValueError, match="not a lightcook export"):
        load_quantized(tmp_path)


def test_quantized_layers_lists_quantlinear_only():
    model, cb = quantized_tiny(steps=0)
    assert sorted(quantized_layers(model)) == sorted(cb.quantized_modules)


@pytest.mark.slow
def test_smollm2_fake_quant_and_int8_export_agree_on_held_out_text(tmp_path):
    """SmolLM2-135M W8A8 (per-channel absmax, dynamic per-token activations) and W4A8 (LSQ): max
    |delta logit| between the fake-quant model and the exported integer model on held-out
    Shakespeare is 0 (the same int8 kernel on both sides), and the stored weights are small."""
    from lightcook.data import TextDataModule

    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=128, batch_size=4)
    data.setup()
    ids = next(iter(data.val_dataloader()))["input_ids"][:2]  # (2, 128) held-out plays
    for kwargs, ratio in (({"bits": 8}, 0.27), ({"bits": 4, "method": "lsq"}, 0.15)):
        module = CausalLMModule(name_or_path="smollm2-135m-instruct")
        cb = QuantizationCallback(**kwargs)
        cb.prepare_model(None, module)
        model = module.model.eval()
        out = export_quantized(model, tmp_path / f"w{kwargs['bits']}")
        loaded = load_quantized(out)
        with torch.no_grad():
            gap = (model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs()
        assert float(gap.max()) == 0.0, (kwargs, float(gap.max()), float(gap.mean()))
        manifest = json.loads((out / "lightcook.json").read_text())
        assert manifest["weight_bytes"] <= ratio * manifest["fp32_weight_bytes"]
        assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 30 * 7
