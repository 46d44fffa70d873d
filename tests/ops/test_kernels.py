"""Load-time kernels (lightcook.ops.kernels): every path against the reference module it is built
from, with the bound its docstring states; row dispatch; the errors; install_kernels_ on a model;
and load_compressed end to end with each backend this machine runs."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from lightcook.export import load_compressed, save_compressed
from lightcook.ops.kernels import (
    BACKENDS,
    DensePath,
    Int4PackPath,
    Int8PackPath,
    IntMMPath,
    KernelLinear,
    UnsupportedLayer,
    available_backends,
    install_kernels_,
    kernel_linear,
    resolve_backend,
)
from lightcook.ops.moe import MoEFFN
from lightcook.ops.quant import DequantLinear, Int8Linear, QuantLinear, QuantSpec, group_view
from tests.export.codecs.test_quantized import quantized_tiny
from tests.helpers import random_batch

PACKED = "packed" in available_backends("cpu", torch.bfloat16)
needs_packed = pytest.mark.skipif(not PACKED, reason="no CPU bfloat16 packed kernels on this machine")


def linear(in_f: int = 64, out_f: int = 32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def dequant(
    spec: QuantSpec, in_f: int = 64, out_f: int = 32, act: str = "none", act_bits: int = 8
) -> DequantLinear:
    q = QuantLinear.from_linear(linear(in_f, out_f), spec, "absmax", act, act_bits)
    return DequantLinear.from_quant_linear(q).eval()


def int8(act: str = "dynamic", in_f: int = 64, out_f: int = 32) -> Int8Linear:
    return Int8Linear.from_float(linear(in_f, out_f), act, act_amax=3.0 if act == "static" else None).eval()


def inputs(rows: int, in_f: int = 64, dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)


def weight_of(module: nn.Module) -> torch.Tensor:
    if isinstance(module, Int8Linear):
        return module.weight_codes.float() * module.weight_scale.float()
    return module.dequantized_weight().float()


def magnitudes(module: nn.Module) -> torch.Tensor:
    """``m`` of the packed kernels' bound: ``|w|``, and for asymmetric codes ``c`` with zero point
    ``zp`` the two terms the int4 kernel rounds, ``(|c - 8| + |8 - zp|) * scale``."""
    if isinstance(module, Int8Linear) or module.spec.symmetric:
        return weight_of(module).abs()
    view = group_view(module.weight_codes().float(), module.spec)  # (out, groups, size) or (out, in)
    scale, zp = module.weight_scale.float(), module.weight_zero_point.float()
    return (((view - 8).abs() + (8 - zp).abs()) * scale).reshape(module.out_features, -1)


def assert_within_packed_bound(y: torch.Tensor, module: nn.Module, x: torch.Tensor) -> None:
    """The packed kernels' documented bound: each output within 2**-8 * (|x| @ m.T + |bias|) of the
    weight-only float product (x exactly as given, w the dequantized weight; m: :func:`magnitudes`)."""
    w, b = weight_of(module), module.bias.float()
    exact = x.float() @ w.t() + b
    bound = 2**-8 * (x.float().abs() @ magnitudes(module).t() + b.abs())
    err = (y.float() - exact).abs()
    assert (err <= bound).all(), f"max err/bound {float((err / bound).max()):.3f}"
    assert err.max() > 0  # bfloat16 rounding happened: the comparison is not of a tensor with itself


# --------------------------------------------------------------------------- paths vs reference


@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_int_mm_is_bit_identical_to_int8linear(act, dtype, rows):
    ref = int8(act)
    x = inputs(rows, dtype=dtype)
    path = IntMMPath.of(ref)
    assert path(x).dtype == dtype
    assert torch.equal(path(x), ref(x))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, granularity="channel"),
        QuantSpec(bits=4, granularity="group", group_size=16, symmetric=False),
        QuantSpec(bits=3, granularity="group", group_size=32),
        QuantSpec(bits=8, granularity="tensor", symmetric=False),
        QuantSpec(bits=2, granularity="group", group_size=32, symmetric=False),
    ],
)
def test_dense_is_bit_identical_to_dequantlinear(spec):
    ref = dequant(spec)
    x = inputs(7, dtype=torch.float32)
    assert torch.equal(DensePath.of(ref, torch.float32)(x), ref(x))


def test_dense_from_int8linear_differs_by_float_rounding_only():
    ref = int8("dynamic")
    x = inputs(6, dtype=torch.float32)
    y, expected = DensePath.of(ref, torch.float32)(x), ref(x)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dense_keeps_the_activation_quantization_of_the_reference():
    ref = dequant(QuantSpec(bits=4), act="dynamic", act_bits=4)
    x = inputs(3, dtype=torch.float32)
    assert torch.equal(DensePath.of(ref, torch.float32)(x), ref(x))
    assert not torch.allclose(ref(x), x @ weight_of(ref).t() + ref.bias, atol=1e-3)  # A4 changes outputs


@needs_packed
@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_int8pack_is_within_its_bound_of_the_weight_only_product(act, rows):
    ref = int8(act)
    x = inputs(rows)
    path = Int8PackPath.of(ref)
    assert path.act is None  # 8-bit activation quantization only feeds an int GEMM: skipped
    assert_within_packed_bound(path(x), ref, x)


@needs_packed
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, granularity="channel"),
        QuantSpec(bits=4, granularity="channel"),
        QuantSpec(bits=8, granularity="tensor"),
    ],
)
def test_int8pack_takes_symmetric_dequantlinear_codes(spec):
    ref = dequant(spec)
    x = inputs(3)
    assert_within_packed_bound(Int8PackPath.of(ref)(x), ref, x)


@needs_packed
@pytest.mark.parametrize(
    ("spec", "groupsize"),
    [
        (QuantSpec(bits=4, granularity="channel"), 64),
        (QuantSpec(bits=4, granularity="group", group_size=32), 32),
        (QuantSpec(bits=4, granularity="group", group_size=64, symmetric=False), 64),
        (QuantSpec(bits=3, granularity="group", group_size=32), 32),
        (QuantSpec(bits=2, granularity="group", group_size=32, symmetric=False), 32),
        (QuantSpec(bits=4, granularity="tensor"), 64),
    ],
)
@pytest.mark.parametrize("rows", [1, 6])
def test_int4pack_is_within_its_bound_of_the_weight_only_product(spec, groupsize, rows):
    ref = dequant(spec)
    x = inputs(rows)
    path = Int4PackPath.of(ref)
    assert path.groupsize == groupsize
    assert_within_packed_bound(path(x), ref, x)


@needs_packed
def test_int4pack_takes_int8linear_codes_of_4_bit_values():
    q = QuantLinear.from_linear(linear(), QuantSpec(bits=4), "absmax", "dynamic", 8)
    ref = Int8Linear.from_quant_linear(q)  # W4A8 stored as int8 codes in [-7, 7]
    x = inputs(2)
    path = Int4PackPath.of(ref)
    assert_within_packed_bound(path(x), ref, x)


@needs_packed
def test_packed_paths_keep_sub_8_bit_activation_quantization():
    ref = dequant(QuantSpec(bits=4), act="dynamic", act_bits=4)
    path = Int4PackPath.of(ref)
    assert path.act is not None and path.act.bits == 4
    x = inputs(2)
    expected = path.act(x).float() @ weight_of(ref).t() + ref.bias
    assert torch.allclose(path(x).float(), expected, rtol=2**-6, atol=2**-6)


# --------------------------------------------------------------------------- KernelLinear


@needs_packed
def test_kernel_linear_dispatches_by_rows_and_keeps_the_leading_shape():
    ref = int8("dynamic")
    layer = kernel_linear(ref, "dispatch", threshold=4)
    assert layer.kernel == "int8pack|int_mm"
    assert layer.few.codes is layer.many.codes  # one copy of the int8 codes
    for rows, path in ((1, layer.few), (4, layer.few), (5, layer.many), (12, layer.many)):
        x = inputs(rows)
        assert torch.equal(layer(x.reshape(1, rows, 64)), path(x).reshape(1, rows, 32)), rows
    assert torch.equal(layer(inputs(12).reshape(3, 4, 64)), layer.many(inputs(12)).reshape(3, 4, 32))
    assert layer(torch.zeros(2, 0, 64, dtype=torch.bfloat16)).shape == (2, 0, 32)


@needs_packed
def test_dispatch_for_dequantlinear_is_int4pack_then_dense():
    layer = kernel_linear(dequant(QuantSpec(bits=4, granularity="group", group_size=32)), "dispatch")
    assert layer.kernel == "int4pack|dense"
    assert kernel_linear(dequant(QuantSpec(bits=8)), "dispatch").kernel == "int8pack|dense"


def test_kernel_linear_refuses_paths_of_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        KernelLinear(DensePath.of(int8(), torch.float32), DensePath.of(int8(out_f=16), torch.float32))


def test_kernel_linear_unknown_backend():
    with pytest.raises(
        ValueError, match=r"backend must be one of \['dense', 'packed', 'dispatch'\], got 'fast'"
    ):
        kernel_linear(int8(), "fast")


# --------------------------------------------------------------------------- what a kernel refuses


@pytest.mark.parametrize(
    ("make", "build", "message"),
    [
        (
            lambda: dequant(QuantSpec(bits=8, granularity="group", group_size=32)),
            Int8PackPath.of,
            "int8pack takes symmetric per-tensor/channel codes, not 8-bit symmetric group 32",
        ),
        (
            lambda: dequant(QuantSpec(bits=8, symmetric=False)),
            Int8PackPath.of,
            "int8pack takes symmetric per-tensor/channel codes, not 8-bit asymmetric per-channel",
        ),
        (lambda: int8(in_f=40), Int8PackPath.of, "int8pack needs in_features divisible by 16, got 40"),
        (
            lambda: dequant(QuantSpec(bits=8)),
            Int4PackPath.of,
            "int4pack takes codes of at most 4 bits, not 8-bit",
        ),
        (
            lambda: dequant(QuantSpec(bits=4), out_f=24),
            Int4PackPath.of,
            "out_features divisible by 16, got 24",
        ),
        (
            lambda: dequant(QuantSpec(bits=4, granularity="group", group_size=16)),
            Int4PackPath.of,
            "scale groups divisible by 32, 64, 128 or 256, got 16",
        ),
        (
            lambda: dequant(QuantSpec(bits=4)),
            IntMMPath.of,
            "int_mm needs an Int8Linear layer (W8A8 export), got DequantLinear",
        ),
        (lambda: nn.Linear(32, 16), DensePath.of, "expected an Int8Linear or DequantLinear, got Linear"),
    ],
)
def test_unsupported_layers_say_why(make, build, message):
    with pytest.raises(UnsupportedLayer, match=re.escape(message)):
        build(make())


def test_resolve_backend_names_the_available_ones():
    assert set(BACKENDS) == {"auto", "reference", "dense", "packed", "dispatch"}
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'int4'; available on cpu"):
        resolve_backend("int4")
    with pytest.raises(
        ValueError, match=r"backend 'dispatch' is not available on cpu with dtype torch.float32"
    ):
        resolve_backend("dispatch", "cpu", torch.float32)
    assert resolve_backend("auto", "cpu", torch.float32) == "reference"
    assert resolve_backend("dense", "cpu", torch.float32) == "dense"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == ("dispatch" if PACKED else "reference")


# --------------------------------------------------------------------------- install_kernels_


def tiny_mlp_model() -> nn.Module:
    """A dense W8A8 projection, a group-16 int4 one (int4pack refuses it) and a W8A8 MoE FFN."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu"))
    moe = MoEFFN.from_ffn(mlp, ["gate_proj", "up_proj"], "down_proj", "act_fn", True, 4, 2, "oracle")
    for name in ("gate_proj", "up_proj", "down_proj"):
        moe.set_submodule(name, Int8Linear.from_float(moe.get_submodule(name)))
    model = nn.Module()
    model.proj = Int8Linear.from_float(linear(32, 32))
    model.odd = DequantLinear.from_quant_linear(
        QuantLinear.from_linear(
            linear(64, 32), QuantSpec(bits=4, granularity="group", group_size=16), "absmax", "none"
        )
    )
    model.mlp = moe
    return model.eval()


@needs_packed
def test_install_kernels_swaps_what_fits_warns_once_and_leaves_moe_projections():
    model = tiny_mlp_model().to(torch.bfloat16)
    names = ["proj", "odd", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    with pytest.warns(UserWarning) as record:
        kernels = install_kernels_(model, names, "auto")
    assert len(record) == 1
    message = str(record[0].message)
    assert "backend 'dispatch': 1 of 5 quantized layers keep their reference modules" in message
    assert "e.g. odd:" in message and "got 16" in message
    assert kernels == {
        "proj": "int8pack|int_mm",
        "odd": "dequant",
        "mlp.gate_proj": "int8_linear",
        "mlp.up_proj": "int8_linear",
        "mlp.down_proj": "int8_linear",
    }
    assert isinstance(model.proj, KernelLinear) and isinstance(model.odd, DequantLinear)
    assert isinstance(model.mlp.up_proj, Int8Linear)  # the MoE sparse path reads its weights itself


def test_install_kernels_reference_keeps_everything_and_is_silent():
    model = tiny_mlp_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels = install_kernels_(model, ["proj", "odd"], "reference")
    assert kernels == {"proj": "int8_linear", "odd": "dequant"}
    assert isinstance(model.proj, Int8Linear)


def test_install_kernels_dense_in_float32():
    model = tiny_mlp_model()
    x = inputs(3, 32, torch.float32)
    expected = model.proj(x)
    assert install_kernels_(model, ["proj"], "dense") == {"proj": "dense"}
    assert torch.allclose(model.proj(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A W8A8 export and a W4 group-32 weight-only export of the tiny Llama."""
    root = tmp_path_factory.mktemp("kernels")
    w8a8, _ = quantized_tiny()
    w4, _ = quantized_tiny(bits=4, granularity="group", group_size=32, activations="none")
    return {
        "w8a8": save_compressed(w8a8, root / "w8a8"),
        "w4": save_compressed(w4, root / "w4"),
    }


@pytest.mark.parametrize("export", ["w8a8", "w4"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_load_compressed_with_each_backend_computes_the_exported_model(exports, export, backend):
    if backend not in available_backends("cpu", torch.bfloat16):
        pytest.skip(f"backend {backend!r} needs the CPU bfloat16 packed kernels")
    reference = load_compressed(exports[export], backend="reference")
    model = load_compressed(exports[export], backend=backend, dtype=torch.bfloat16)
    assert model.inference_backend == backend
    assert len(model.quantized_kernels) == 2 * 7
    kernels = set(model.quantized_kernels.values())
    expected = {
        "reference": {"int8_linear"} if export == "w8a8" else {"dequant"},
        "dense": {"dense"},
        "packed": {"int8pack"} if export == "w8a8" else {"int4pack"},
        "dispatch": {"int8pack|int_mm"} if export == "w8a8" else {"int4pack|dense"},
    }[backend]
    assert kernels == expected
    batch = random_batch(seed=7)
    with torch.no_grad():
        want = reference(input_ids=batch["input_ids"]).logits.float()
        got = model(input_ids=batch["input_ids"]).logits.float()
        one = model(input_ids=batch["input_ids"][:1, :1]).logits.float()  # one row: the decode path
        one_ref = reference(input_ids=batch["input_ids"][:1, :1]).logits.float()
    assert got.dtype == want.dtype and float((got - want).norm() / want.norm()) < 0.05
    assert float((one - one_ref).norm() / one_ref.norm()) < 0.05
    out = model.generate(batch["input_ids"][:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_load_compressed_refuses_an_unknown_backend(exports):
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'turbo'"):
        load_compressed(exports["w8a8"], backend="turbo")
