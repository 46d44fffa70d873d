"""Quantized codec: the loaded integer model reproduces the fake-quant model's logits, stores what
the manifest says in the bytes it says (and what estimate_bytes predicts), and bad inputs fail clearly."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from lightcook.export import estimate_bytes, load_compressed, read_manifest, save_compressed
from lightcook.export.codecs.quantized import quantized_layers
from lightcook.export.format import nbytes, read_tensors
from lightcook.modules import CausalLMModule
from lightcook.ops.quant import DequantLinear, Int8Linear, QuantLinear, QuantSpec
from tests.helpers import TINY_LLAMA, random_batch

LAYERS = 2 * 7


def quantized_tiny(
    seed: int = 0,
    steps: int = 2,
    targets: str = r"layers\.",
    method: str = "absmax",
    activations: str = "dynamic",
    act_bits: int = 8,
    **spec,
) -> tuple[torch.nn.Module, dict[str, QuantLinear]]:
    """A tiny Llama whose block Linears (``targets``: a name regex) are :class:`QuantLinear`, trained
    ``steps`` SGD steps (learned scales move off their initial values), calibrated first when
    activations are static."""
    torch.manual_seed(seed)
    model = CausalLMModule(config=TINY_LLAMA, tokenizer=None).model
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and re.search(targets, n)]
    layers = {}
    for name in names:
        layers[name] = QuantLinear.from_linear(
            model.get_submodule(name), QuantSpec(**spec), method, activations, act_bits
        )
        model.set_submodule(name, layers[name])
    if activations == "static":
        calibrate(model, layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        model(**random_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), layers


def calibrate(model: torch.nn.Module, layers: dict[str, QuantLinear]) -> None:
    for q in layers.values():
        q.input_quantizer.calibrating = True
    with torch.no_grad():
        for seed in (10, 11):
            model(**random_batch(seed=seed))
    for q in layers.values():
        q.input_quantizer.calibrating = False


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
    model, layers_ = quantized_tiny(**kwargs)
    loaded = load_compressed(save_compressed(model, tmp_path / "q"), backend="reference")
    layers = {n: loaded.get_submodule(n) for n in layers_}
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
    model, layers_ = quantized_tiny(steps=0, **kwargs)
    out = save_compressed(model, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    manifest = read_manifest(out)
    expected_bytes = 0
    for name, q in layers_.items():
        o, i = q.out_features, q.in_features
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.uint8 and packed.shape == (o, packed_cols(i))
        assert scale.shape == scale_shape(o, i) and f"{name}.weight" not in tensors
        assert (f"{name}.weight_zero_point" in tensors) == zero_point
        zp_bytes = math.prod(scale.shape) if zero_point else 0
        entry = manifest["quantized"][name]
        assert entry["weight_bytes"] == packed.numel() + scale.numel() * 4 + zp_bytes
        assert entry["fp32_weight_bytes"] == o * i * 4
        expected_bytes += entry["weight_bytes"]
    assert manifest["weight_bytes"] == expected_bytes  # every block Linear is quantized
    assert estimate_bytes(model)["weight_bytes"] == expected_bytes
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}  # stored once


def test_quantized_tied_lm_head_round_trip(tmp_path):
    model, layers_ = quantized_tiny(targets=r"layers\.|lm_head", bits=8)
    loaded = load_compressed(save_compressed(model, tmp_path / "q"), backend="reference")
    assert isinstance(loaded.lm_head, Int8Linear) and "lm_head" in loaded.quantized_formats
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)  # float embedding
    assert logit_gap(model, loaded) == (0.0, 0.0)


def test_uncalibrated_static_activations_fail_naming_the_layer(tmp_path):
    model, _ = quantized_tiny(steps=0, activations="static")
    for q in quantized_layers(model).values():
        q.input_quantizer.amax.zero_()  # as if calibration never ran
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.self_attn\.q_proj has static activations that were never calibrated",
    ):
        save_compressed(model, tmp_path / "uncalibrated")
    assert not (tmp_path / "uncalibrated").exists()
    assert estimate_bytes(model)["techniques"] == ["quantized"]  # estimates need no calibration


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_estimate_equals_the_written_tensors(tmp_path, case, dtype):
    model, _ = quantized_tiny(steps=0, **CASES[case][0])
    out = save_compressed(model, tmp_path / "q", dtype=dtype)
    written = sum(nbytes(t) for t in read_tensors(out).values())
    estimate, manifest = estimate_bytes(model, dtype=dtype), read_manifest(out)
    assert estimate["tensor_bytes"] == manifest["tensor_bytes"] == written
    assert estimate["weight_bytes"] == manifest["weight_bytes"]
    assert estimate["by_technique"]["quantized"] == sum(
        nbytes(t) for k, t in read_tensors(out).items() if k.rsplit(".", 1)[0] in manifest["quantized"]
    )


def test_quantized_layers_lists_quantlinear_only():
    model, layers_ = quantized_tiny(steps=0)
    assert sorted(quantized_layers(model)) == sorted(layers_)


@pytest.mark.slow
def test_smollm2_fake_quant_and_int8_export_agree_on_held_out_text(tmp_path):
    """SmolLM2-135M W8A8 (per-channel absmax, dynamic per-token activations) and W4A8 (LSQ): max
    |delta logit| between the fake-quant model and the exported integer model on held-out
    Shakespeare is 0 (the same int8 kernel on both sides), and the stored weights are small."""
    from lightcook.callbacks.quantization import QuantizationCallback
    from lightcook.data import TextDataModule

    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=128, batch_size=4)
    data.setup()
    ids = next(iter(data.val_dataloader()))["input_ids"][:2]  # (2, 128) held-out plays
    for kwargs, ratio in (({"bits": 8}, 0.27), ({"bits": 4, "method": "lsq"}, 0.15)):
        module = CausalLMModule(name_or_path="smollm2-135m-instruct")
        cb = QuantizationCallback(**kwargs)
        cb.prepare_model(None, module)
        model = module.model.eval()
        out = save_compressed(model, tmp_path / f"w{kwargs['bits']}")
        loaded = load_compressed(out, backend="reference")
        with torch.no_grad():
            gap = (model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs()
        assert float(gap.max()) == 0.0, (kwargs, float(gap.max()), float(gap.mean()))
        manifest = read_manifest(out)
        assert manifest["weight_bytes"] <= ratio * manifest["fp32_weight_bytes"]
        assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 30 * 7
