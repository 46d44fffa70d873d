"""Tests for lightcook.ops.gptq.

References outside our code: round-to-nearest written here with ``torch.fake_quantize_per_channel_affine``
and absmax scales computed in the test, the least-squares optimum from ``torch.linalg.lstsq``, and the
layer's own reconstruction error ``‖XWᵀ − XŴᵀ‖``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightcook.ops import gptq as gptq_module
from lightcook.ops.gptq import GPTQResult, gptq_, gptq_layer_
from lightcook.ops.names import MASK
from lightcook.ops.quant import AbsMaxQuantizer, DequantLinear, QuantLinear, QuantSpec

SPECS = [
    QuantSpec(bits, granularity, 16, symmetric)
    for bits, granularity, symmetric in itertools.product(
        (8, 4, 2), ("tensor", "channel", "group"), (True, False)
    )
]


def _layer(
    out_f: int = 24, in_f: int = 64, n: int = 512, seed: int = 0, dominant: int = 0, dtype=torch.float32
):
    """``(X, W)``: inputs with correlated features (and ``dominant`` loud channels, scattered)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.9 * torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(n, in_f, generator=g) @ mix
    if dominant:
        x[:, torch.randperm(in_f, generator=g)[:dominant]] *= 10.0
    return x.to(dtype), torch.randn(out_f, in_f, generator=g).to(dtype)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x


def _error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ (w - q).T).norm() / (x @ w.T).norm())


def _rows(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One row per scale group (the view ``torch.fake_quantize_per_channel_affine`` takes on axis 0)."""
    if spec.granularity == "tensor":
        return t.reshape(1, -1)
    if spec.granularity == "channel":
        return t
    return t.reshape(-1, spec.group_size)


def _torch_fake_quant(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """torch's own per-channel fake quantization of ``w`` with the given (scale_shape) scales."""
    rows = _rows(w, spec)
    out = torch.fake_quantize_per_channel_affine(
        rows, scale.reshape(-1).float(), zero.reshape(-1).int(), 0, spec.qmin, spec.qmax
    )
    return out.reshape(w.shape)


def _round_to_nearest(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Absmax round-to-nearest, scales computed here (zero always representable)."""
    rows = _rows(w, spec)
    lower, upper = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    if spec.symmetric:
        scale, zero = torch.maximum(upper, -lower) / spec.qmax, torch.zeros_like(upper)
    else:
        scale = (upper - lower) / (spec.qmax - spec.qmin)
        zero = (spec.qmin - torch.round(lower / scale)).clamp(spec.qmin, spec.qmax)
    out = torch.fake_quantize_per_channel_affine(rows, scale, zero.int(), 0, spec.qmin, spec.qmax)
    return out.reshape(w.shape)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_round_to_nearest(bits, granularity, symmetric):
    spec = QuantSpec(bits, granularity, 16, symmetric)
    x, w = _layer()
    q = w.clone()
    gptq_(q, _hessian(x), spec, blocksize=16)
    rtn = _round_to_nearest(w, spec)
    assert _error(x, w, q) < 0.95 * _error(x, w, rtn)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_identity_hessian_is_round_to_nearest(spec):
    _, w = _layer(seed=1)
    q = w.clone()
    res = gptq_(q, 3.0 * torch.eye(w.shape[1]), spec, blocksize=8)
    assert torch.equal(q, _torch_fake_quant(w, res.scale, res.zero_point, spec))  # no error propagated
    rtn_scale = AbsMaxQuantizer(spec, w).scale_and_zero_point(w)[0]
    torch.testing.assert_close(res.scale, rtn_scale, rtol=2.0**-14, atol=0)  # the absmax scale, shortened


def test_first_column_update_is_the_least_squares_optimum():
    """After quantizing column 0, the OBS update of the rest minimises ‖X Wᵀ − X Ŵᵀ‖ given that column."""
    x, w = _layer(out_f=6, in_f=12, n=200, seed=2, dtype=torch.float64)
    spec = QuantSpec(2, "channel", 16, True)
    work = w.clone()
    grid = gptq_module._Grid(spec, work, pin_range=False)
    gptq_module._run(work, _hessian(x), grid, 4, 0.0, False, None, stop=1)
    q0, rest = work[:, :1], work[:, 1:]
    assert not torch.allclose(q0, w[:, :1]) and not torch.allclose(rest, w[:, 1:])
    target = x @ w.T - x[:, :1] @ q0.T
    best = torch.linalg.lstsq(x[:, 1:], target).solution.T
    torch.testing.assert_close(rest, best, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("bits", [4, 2])
def test_act_order_is_at_least_as_good_with_dominant_channels(granularity, bits):
    spec = QuantSpec(bits, granularity, 16, True)
    x, w = _layer(dominant=4, seed=3)
    plain, ordered = w.clone(), w.clone()
    gptq_(plain, _hessian(x), spec)
    res = gptq_(ordered, _hessian(x), spec, desc_act=True)
    assert res.perm is not None and not torch.equal(res.perm, torch.arange(w.shape[1]))
    assert _error(x, w, ordered) <= _error(x, w, plain)


def test_blocksize_changes_only_the_schedule():
    """Lazy block updates are exact: any blocksize (and dynamic groups crossing blocks) gives one result."""
    x, w = _layer(seed=4, dtype=torch.float64)
    spec = QuantSpec(4, "group", 16, False)
    results = []
    for blocksize in (1, 7, 16, 128):
        q = w.clone()
        gptq_(q, _hessian(x), spec, blocksize=blocksize, static_groups=False)
        results.append(q)
    for q in results[1:]:
        torch.testing.assert_close(q, results[0], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("desc_act", [False, True])
def test_result_is_exactly_on_the_absmax_grid(spec, desc_act):
    x, w = _layer(seed=5, dominant=3)
    q = w.clone()
    res = gptq_(q, _hessian(x), spec, desc_act=desc_act, blocksize=16)
    quantizer = AbsMaxQuantizer(spec, q)
    scale, zero = quantizer.scale_and_zero_point(q)
    assert torch.equal(scale, res.scale) and torch.equal(zero, res.zero_point)
    assert torch.equal(quantizer(q), q)  # QAT starts exactly at the GPTQ weights
    assert torch.equal(_torch_fake_quant(q, res.scale, res.zero_point, spec), q)
    codes = _rows(quantizer.codes(q).float(), spec)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_asymmetric_codes_in_range_and_ends_used(bits):
    spec = QuantSpec(bits, "group", 16, False)
    x, w = _layer(seed=6)
    q = w.clone()
    res = gptq_(q, _hessian(x), spec)
    codes = q.reshape(w.shape[0], -1, 16) / res.scale + res.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    codes = codes.round()
    assert codes.min() == 0 and codes.max() == 2**bits - 1
    assert bool((codes.amax(-1) == 2**bits - 1).all())  # every group keeps its range (pin_range)


def test_act_order_exports_original_groups():
    x, w = _layer(seed=7, dominant=4)
    layer = QuantLinear.from_linear(nn.Linear(64, 24), QuantSpec(4, "group", 16, True))
    with torch.no_grad():
        layer.weight.copy_(w)
    res = gptq_layer_(layer, _hessian(x), desc_act=True)
    dequant = DequantLinear.from_quant_linear(layer)
    assert torch.equal(dequant.dequantized_weight().to(layer.weight.dtype), layer.weight)
    assert torch.equal(dequant.weight_scale.reshape(res.scale.shape), res.scale)


def test_dead_columns_are_rounded_and_kept():
    x, w = _layer(seed=8)
    dead = torch.tensor([3, 17, 40])
    x[:, dead] = 0.0
    spec = QuantSpec(4, "group", 16, True)
    q = w.clone()
    res = gptq_(q, _hessian(x), spec)
    rounded = _torch_fake_quant(w, res.scale, res.zero_point, spec)
    assert torch.equal(q[:, dead], rounded[:, dead]) and bool(q[:, dead].ne(0).any())
    assert _error(x, w, q) < _error(x, w, _round_to_nearest(w, spec))
    all_dead = w.clone()
    gptq_(all_dead, torch.zeros(64, 64), spec)
    assert torch.equal(
        all_dead, _torch_fake_quant(w, *AbsMaxQuantizer(spec, all_dead).scale_and_zero_point(all_dead), spec)
    )


@pytest.mark.parametrize(
    "spec", [QuantSpec(4, "channel", 16, True), QuantSpec(4, "group", 16, False)], ids=repr
)
@pytest.mark.parametrize("desc_act", [False, True])
def test_mask_keeps_pruned_weights_at_zero(spec, desc_act):
    x, w = _layer(seed=9)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask.view(-1, 4)[:, :2] = False  # 2:4 along the inputs
    q = w.clone()
    res = gptq_(q, _hessian(x), spec, mask=mask, desc_act=desc_act, static_groups=False)
    assert bool((q[~mask] == 0).all())
    sparse = w * mask
    assert _error(x, sparse, q) < _error(x, sparse, _round_to_nearest(sparse, spec))
    scale, zero = AbsMaxQuantizer(spec, q).scale_and_zero_point(q)  # pruned weights never set a range
    assert torch.equal(scale, res.scale) and torch.equal(zero, res.zero_point)


def test_half_precision_weight_keeps_its_dtype():
    x, w = _layer(seed=10)
    q = w.to(torch.bfloat16)
    res = gptq_(q, _hessian(x), QuantSpec(4, "channel", 16, True))
    assert q.dtype == torch.bfloat16 and res.scale.dtype == torch.float32
    assert _error(x, w, q.float()) < _error(x, w, _round_to_nearest(w, QuantSpec(4)))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": QuantSpec(4, "group", 24)}, "^group_size: 24 does not divide in_features=64"),
        ({"H": torch.eye(63)}, "^H: need shape"),
        ({"H": torch.full((64, 64), float("nan"))}, "^H: has inf or nan"),
        ({"H": -torch.eye(64), "percdamp": 0.0}, "^percdamp: H is not positive definite"),
        ({"blocksize": 0}, "^blocksize: "),
        ({"percdamp": -0.1}, "^percdamp: "),
        ({"desc_act": "yes"}, "^desc_act: "),
        ({"static_groups": 1}, "^static_groups: "),
        ({"pin_range": None}, "^pin_range: "),
        ({"mask": torch.ones(3, 3, dtype=torch.bool)}, "^mask: shape"),
        ({"weight": torch.ones(64)}, "^weight: need a 2-D float"),
    ],
)
def test_bad_input_names_the_key(kwargs, match):
    args = {"weight": torch.randn(8, 64), "H": torch.eye(64), "spec": QuantSpec(4)}
    args.update(kwargs)
    weight, H, spec = args.pop("weight"), args.pop("H"), args.pop("spec")
    with pytest.raises(ValueError, match=match):
        gptq_(weight, H, spec, **args)


# --------------------------------------------------------------------------- QuantLinear


METHODS = [
    ("absmax", True), ("absmax", False), ("pact", True), ("pact", False),
    ("lsq", True), ("lsq", False), ("dynamic", True),
]  # fmt: skip


@pytest.mark.parametrize(("method", "symmetric"), METHODS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_gptq_layer_starts_the_quantizer_on_the_gptq_grid(method, symmetric, granularity):
    x, w = _layer(seed=11)
    spec = QuantSpec(4, granularity, 16, symmetric)
    layer = QuantLinear.from_linear(nn.Linear(64, 24), spec, method=method, act_mode="none")
    with torch.no_grad():
        layer.weight.copy_(w)
    before = _error(x, w, layer.weight_quantizer(layer.weight).detach())
    res = gptq_layer_(layer, _hessian(x), blocksize=32)
    assert isinstance(res, GPTQResult)
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        start, (scale, zero) = quantizer(layer.weight), quantizer.scale_and_zero_point(layer.weight)
    if method == "dynamic":  # gamma * mean|W| cannot always hit qmax * scale exactly in floating point
        torch.testing.assert_close(start, layer.weight.detach(), rtol=2.0**-22, atol=0)
        torch.testing.assert_close(scale, res.scale, rtol=2.0**-22, atol=0)
    else:
        assert torch.equal(start, layer.weight)  # QAT starts at the GPTQ weights
        assert torch.equal(scale, res.scale) and torch.equal(zero, res.zero_point)
    assert _error(x, w, layer.weight.detach()) < before
    out = layer(x[:4])
    out.sum().backward()  # still trainable
    assert layer.weight.grad is not None


def test_gptq_layer_keeps_the_mask_and_rejects_other_layers():
    x, w = _layer(seed=12)
    layer = QuantLinear.from_linear(nn.Linear(64, 24), QuantSpec(4), act_mode="none")
    mask = torch.rand(24, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    layer.register_buffer(MASK, mask)
    with torch.no_grad():
        layer.weight.copy_(w * mask)
    gptq_layer_(layer, _hessian(x))
    assert bool((layer.weight[~mask] == 0).all())
    with pytest.raises(TypeError, match="needs a QuantLinear, got Linear"):
        gptq_layer_(nn.Linear(64, 24), _hessian(x))
