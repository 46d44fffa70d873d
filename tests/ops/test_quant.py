"""Tests for lightcook.ops.quant.

References outside our code where they exist: torch's fake-quantize ops (forward and STE
gradient), torch's learnable fake-quantize op (LSQ), int64 matmul, hand computations, and
autograd of explicit formulas written here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightcook.ops import quant
from lightcook.ops.quant import (
    WEIGHT_QUANTIZERS,
    AbsMaxQuantizer,
    ActivationQuantizer,
    DequantLinear,
    DynamicScalingQuantizer,
    Int8Linear,
    LSQQuantizer,
    PACTQuantizer,
    QuantLinear,
    QuantSpec,
    fake_quant,
    fake_quant_per_token,
    group_view,
    int8_matmul,
    make_weight_quantizer,
    pack_codes,
    pack_int2,
    pack_int4,
    quantize_per_token,
    scale_shape,
    unpack_codes,
    unpack_int2,
    unpack_int4,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _linear(in_f: int, out_f: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _groups(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One row per scale group."""
    v = group_view(t, spec)
    return v.reshape(1, -1) if spec.granularity == "tensor" else v.reshape(-1, v.shape[-1])


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("bits", "symmetric", "qmin", "qmax"),
    [
        (8, True, -127, 127),
        (4, True, -7, 7),
        (2, True, -1, 1),
        (8, False, 0, 255),
        (4, False, 0, 15),
        (2, False, 0, 3),
    ],
)
def test_quant_spec_range(bits, symmetric, qmin, qmax):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


def test_quant_spec_errors():
    with pytest.raises(ValueError, match=r"bits.*\[8, 4, 3, 2\].*5"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match=r"granularity.*'tensor', 'channel', 'group'.*'row'"):
        QuantSpec(granularity="row")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(symmetric="yes")


# --------------------------------------------------------------------------- fake_quant vs torch


def _with_ties(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Put exact half-way values (k + 0.5) * scale into x to exercise round-half-to-even."""
    x = x.clone()
    x.view(-1)[:10] = (torch.arange(-5, 5) + 0.5) * scale
    return x


@pytest.mark.parametrize(("qmin", "qmax", "zp"), [(-127, 127, 0), (0, 255, 37), (-7, 7, 0), (0, 15, 5)])
def test_fake_quant_matches_torch_per_tensor(qmin, qmax, zp):
    scale = 2.0**-5
    x = _with_ties(_randn(16, 33, seed=1) * 3, scale)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quant(xa, torch.tensor(scale), zp, qmin, qmax)
    yb = torch.fake_quantize_per_tensor_affine(xb, scale, zp, qmin, qmax)
    assert torch.equal(ya, yb)
    g = _randn(16, 33, seed=2)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert (xa.grad == 0).any() and (xa.grad != 0).any()  # both clipped and pass-through elements


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_matches_torch_per_channel(symmetric):
    qmin, qmax = (-127, 127) if symmetric else (0, 255)
    scale = torch.tensor([2.0**-6, 0.013, 0.02, 0.031, 0.005])
    zp = (
        torch.zeros(5, dtype=torch.int32)
        if symmetric
        else torch.tensor([0, 17, 128, 200, 255], dtype=torch.int32)
    )
    x = _with_ties(_randn(5, 40, seed=3) * 2, 2.0**-6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quant(xa, scale[:, None], zp[:, None].float(), qmin, qmax)
    yb = torch.fake_quantize_per_channel_affine(xb, scale, zp, 0, qmin, qmax)
    assert torch.equal(ya, yb)
    g = _randn(5, 40, seed=4)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert (xa.grad == 0).any() and (xa.grad != 0).any()


# --------------------------------------------------------------------------- granularity


@pytest.mark.parametrize(
    ("granularity", "expected"), [("tensor", (1, 1)), ("channel", (6, 1)), ("group", (6, 4, 1))]
)
def test_scale_shapes(granularity, expected):
    spec = QuantSpec(granularity=granularity, group_size=8)
    w = _randn(6, 32)
    assert scale_shape(w.shape, spec) == expected
    for method in WEIGHT_QUANTIZERS:
        scale, zero_point = make_weight_quantizer(method, spec, w).scale_and_zero_point(w)
        assert scale.shape == expected and zero_point.shape == expected
    assert group_view(w, spec).shape == ((6, 4, 8) if granularity == "group" else (6, 32))


def test_group_scale_is_per_consecutive_input_slice():
    spec = QuantSpec(bits=8, granularity="group", group_size=8)
    w = _randn(3, 24, seed=5)
    scale, _ = AbsMaxQuantizer(spec, w).scale_and_zero_point(w)
    for i in range(3):
        for j in range(3):
            expected = w[i, 8 * j : 8 * j + 8].abs().max() / 127
            assert torch.allclose(scale[i, j, 0], expected, rtol=1e-6)


def test_group_size_must_divide_in_features():
    spec = QuantSpec(granularity="group", group_size=128)
    with pytest.raises(ValueError, match=r"group_size=128.*in_features=100"):
        AbsMaxQuantizer(spec, torch.zeros(4, 100))
    with pytest.raises(ValueError, match=r"group_size=128.*in_features=100"):
        group_view(torch.zeros(4, 100), spec)


# --------------------------------------------------------------------------- weight quantizers


def _cases() -> list[tuple[str, int, str, bool]]:
    return [
        (m, b, g, s)
        for m in WEIGHT_QUANTIZERS
        for b in (2, 4)
        for g in ("tensor", "channel", "group")
        for s in (True, False)
        if not (m == "dynamic" and not s)
    ]


@pytest.mark.parametrize(("method", "bits", "granularity", "symmetric"), _cases())
def test_quantizer_output_levels(method, bits, granularity, symmetric):
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=32, symmetric=symmetric)
    w = _randn(4, 64, seed=bits)
    quantizer = make_weight_quantizer(method, spec, w)
    out = quantizer(w).detach()
    assert out.shape == w.shape
    distinct = [row.unique().numel() for row in _groups(out, spec)]
    assert max(distinct) <= 2**bits
    assert max(distinct) >= 3 if bits == 4 else max(distinct) >= 2  # not collapsed
    scale, zero_point = quantizer.scale_and_zero_point(w)
    q = group_view(out, spec) / scale + zero_point  # codes recovered from the output
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.round().min() >= spec.qmin and q.round().max() <= spec.qmax


def _perturb(quantizer: nn.Module, factor: float) -> None:
    """Move the learned values away from their init so that clipping is active."""
    with torch.no_grad():
        for name, p in quantizer.named_parameters():
            if name != "zero_point":
                p.mul_(factor)


_CODE_SPECS = [QuantSpec(8, "channel"), QuantSpec(4, "group", 16, symmetric=False), QuantSpec(2, "tensor")]


@pytest.mark.parametrize(
    ("method", "spec"),
    [
        (m, s) for m in WEIGHT_QUANTIZERS for s in _CODE_SPECS if s.symmetric or m != "dynamic"
    ],  # dynamic: symmetric only
)
def test_codes_dequantize_to_forward_exactly(method, spec):
    w = _randn(6, 32, seed=9)
    quantizer = make_weight_quantizer(method, spec, w)
    _perturb(quantizer, 0.6)
    codes = quantizer.codes(w)
    assert codes.dtype == (torch.int8 if spec.symmetric else torch.uint8) and codes.shape == w.shape
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    scale, zero_point = quantizer.scale_and_zero_point(w)
    dequant = ((group_view(codes.float(), spec) - zero_point) * scale).reshape(w.shape)
    with torch.no_grad():
        assert torch.equal(quantizer(w), dequant)
    assert torch.equal(quantizer(w).detach(), dequant)


def test_learned_values_are_parameters_in_state_dict():
    w = _randn(4, 16)
    expected = {
        ("pact", True): {"alpha"},
        ("pact", False): {"lower", "upper"},
        ("lsq", True): {"step"},
        ("lsq", False): {"step", "zero_point"},
        ("dynamic", True): {"gamma"},
        ("absmax", True): set(),
    }
    for (method, symmetric), names in expected.items():
        quantizer = make_weight_quantizer(method, QuantSpec(symmetric=symmetric), w)
        assert {n for n, _ in quantizer.named_parameters()} == names
        assert set(quantizer.state_dict()) == names


def _loss_grads(quantizer: nn.Module, w: torch.Tensor, seed: int = 11) -> torch.Tensor:
    w = w.clone().requires_grad_()
    (quantizer(w) * _randn(*w.shape, seed=seed)).sum().backward()
    return w.grad


def test_pact_alpha_gets_gradient_only_from_clipped_weights():
    w = _randn(4, 32, seed=12)
    quantizer = PACTQuantizer(QuantSpec(4, "channel"), w)
    _loss_grads(quantizer, w)  # at init alpha == absmax: the boundary element counts as clipped
    assert (quantizer.alpha.grad != 0).all()
    quantizer.alpha.grad = None
    _perturb(quantizer, 1.01)  # nothing clipped: PACT gives alpha no gradient
    _loss_grads(quantizer, w)
    assert torch.equal(quantizer.alpha.grad, torch.zeros(4, 1))
    quantizer.alpha.grad = None
    _perturb(quantizer, 0.5 / 1.01)
    grad_w = _loss_grads(quantizer, w)
    assert (quantizer.alpha.grad != 0).all()
    clipped = w.abs() >= quantizer.alpha.detach()
    assert clipped.any() and (grad_w[clipped] == 0).all() and (grad_w[~clipped] != 0).all()


def test_pact_gradients_by_hand_symmetric():
    w = torch.tensor([[0.5, -2.0, 1.0, 3.0]], requires_grad=True)
    quantizer = PACTQuantizer(QuantSpec(8, "tensor"), w.detach())
    with torch.no_grad():
        quantizer.alpha.fill_(1.5)
    out = quantizer(w)
    (out * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert quantizer.alpha.grad.item() == pytest.approx(-2.0 + 4.0)  # signed sum over clipped
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
    s = 1.5 / 127
    assert out.detach()[0].tolist() == pytest.approx([round(0.5 / s) * s, -1.5, round(1.0 / s) * s, 1.5])


def test_pact_gradients_by_hand_asymmetric():
    w = torch.tensor([[-3.0, -0.5, 0.2, 2.5]], requires_grad=True)
    quantizer = PACTQuantizer(QuantSpec(8, "tensor", symmetric=False), w.detach())
    with torch.no_grad():
        quantizer.lower.fill_(-1.0)
        quantizer.upper.fill_(2.0)
    (quantizer(w) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert quantizer.lower.grad.item() == pytest.approx(1.0)
    assert quantizer.upper.grad.item() == pytest.approx(4.0)
    assert torch.equal(w.grad, torch.tensor([[0.0, 2.0, 3.0, 0.0]]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_learned_values_get_gradient(symmetric):
    w = _randn(4, 32, seed=13)
    quantizer = LSQQuantizer(QuantSpec(4, "channel", symmetric=symmetric), w)
    _perturb(quantizer, 0.3)  # force clipping so the zero point gets gradient too
    _loss_grads(quantizer, w)
    assert (quantizer.step.grad != 0).all()
    if not symmetric:
        assert (quantizer.zero_point.grad != 0).any()


def _outside_band(u: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """u in (qmax, qmax + 0.5) or (qmin - 0.5, qmin): LSQ's eq. 3 (clamp before rounding)
    and torch's op (range test after rounding) disagree there."""
    return ((u > qmax) & (u < qmax + 0.5)) | ((u < qmin) & (u > qmin - 0.5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_matches_torch_learnable_fake_quant(symmetric):
    spec = QuantSpec(4, "channel" if symmetric else "tensor", symmetric=symmetric)
    w = _randn(5, 40, seed=14)
    quantizer = LSQQuantizer(spec, w)
    numel_per_group = 40 if symmetric else 200
    grad_factor = 1 / math.sqrt(numel_per_group * spec.qmax)  # LSQ paper's gradient scale
    _perturb(quantizer, 0.5)
    step = quantizer.step.detach().clone()
    zp = quantizer.zero_point.detach().clone() if not symmetric else torch.zeros_like(step)
    u = w / step + zp
    w = torch.where(_outside_band(u, spec.qmin, spec.qmax), torch.zeros_like(w), w)
    assert ((u > spec.qmax + 0.5) | (u < spec.qmin - 0.5)).any()  # some weights clipped
    g = _randn(5, 40, seed=15)
    wa = w.clone().requires_grad_()
    ya = quantizer(wa)
    (ya * g).sum().backward()
    wb, sb, zb = w.clone().requires_grad_(), step.clone().requires_grad_(), zp.clone().requires_grad_()
    if symmetric:
        yb = torch._fake_quantize_learnable_per_channel_affine(
            wb, sb[:, 0], zb[:, 0], 0, spec.qmin, spec.qmax, grad_factor
        )
    else:
        yb = torch._fake_quantize_learnable_per_tensor_affine(
            wb, sb.view(1), zb.view(1), spec.qmin, spec.qmax, grad_factor
        )
    (yb * g).sum().backward()
    assert torch.allclose(ya, yb, atol=1e-6)
    assert torch.allclose(wa.grad, wb.grad, atol=1e-5)
    assert torch.allclose(quantizer.step.grad.view(-1), sb.grad.view(-1), rtol=1e-4, atol=1e-6)
    if not symmetric:
        assert torch.allclose(quantizer.zero_point.grad.view(-1), zb.grad.view(-1), rtol=1e-4, atol=1e-6)
        assert zb.grad.abs().sum() > 0


def _dynamic_reference(
    w: torch.Tensor, gamma: torch.Tensor, qmax: int, dims: tuple[int, ...]
) -> torch.Tensor:
    """Explicit formula of Tao et al. 2022, differentiated by autograd:
    w_q = alpha * Q(clip(w / alpha, -1, 1)), alpha = gamma * mean|w|, Q rounded straight-through."""
    alpha = gamma * w.detach().abs().mean(dims, keepdim=True)
    u = torch.clamp(w / alpha, -1, 1)
    q_u = u + (torch.round(u * qmax) / qmax - u).detach()
    return alpha * q_u


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_dynamic_scaling_gradient_matches_explicit_formula(granularity):
    spec = QuantSpec(4, granularity)
    w = _randn(6, 16, seed=16)
    quantizer = DynamicScalingQuantizer(spec, w, gamma_init=1.0)  # the paper's init: much clipping
    with torch.no_grad():
        quantizer.gamma.mul_(torch.linspace(1.0, 2.5, quantizer.gamma.numel()).view_as(quantizer.gamma))
    gamma_ref = quantizer.gamma.detach().clone().requires_grad_()
    alpha = gamma_ref.detach() * w.abs().mean(quant._reduce_dims(spec), keepdim=True)
    assert (w.abs() > alpha).any() and (w.abs() < alpha).any()
    g = _randn(6, 16, seed=17)
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    ya = quantizer(wa)
    (ya * g).sum().backward()
    yb = _dynamic_reference(wb, gamma_ref, spec.qmax, quant._reduce_dims(spec))
    (yb * g).sum().backward()
    assert torch.allclose(ya, yb, atol=1e-6)
    assert torch.allclose(quantizer.gamma.grad, gamma_ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(wa.grad, wb.grad, atol=1e-6)


def test_dynamic_scaling_init_and_in_range_gradient():
    w = _randn(4, 32, seed=18)
    spec = QuantSpec(8, "channel")
    quantizer = DynamicScalingQuantizer(spec, w)
    with torch.no_grad():  # default init: starts identical to absmax
        assert torch.allclose(quantizer(w), AbsMaxQuantizer(spec, w)(w), atol=1e-6)
        quantizer.gamma.mul_(1.01)  # nothing clipped ...
    _loss_grads(quantizer, w)
    assert (quantizer.gamma.grad != 0).all()  # ... yet gamma learns, unlike PACT
    with pytest.raises(ValueError, match="symmetric"):
        DynamicScalingQuantizer(QuantSpec(symmetric=False), w)
    with pytest.raises(ValueError, match="gamma_init"):
        DynamicScalingQuantizer(spec, w, gamma_init="ones")


def test_make_weight_quantizer_unknown_method():
    with pytest.raises(ValueError, match=r"'gptq'.*absmax.*dynamic.*lsq.*pact"):
        make_weight_quantizer("gptq", QuantSpec(), torch.zeros(2, 4))
    assert isinstance(make_weight_quantizer("lsq", QuantSpec(), torch.ones(2, 4)), LSQQuantizer)


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_quant_error_bounded_by_half_scale(bits):
    x = _randn(3, 5, 64, seed=19) * torch.logspace(-3, 2, 5)[:, None]  # tokens of very different size
    codes, scale = quantize_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.shape == (3, 5, 1)
    assert (codes.abs().amax(-1) == qmax).all()
    err = (codes.float() * scale - x).abs()
    assert (err <= scale / 2 * (1 + 1e-6)).all()
    xr = x.clone().requires_grad_()
    y = fake_quant_per_token(xr, bits)
    assert torch.equal(y, codes.float() * scale)
    y.sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))  # absmax scale: nothing clipped


def test_activation_quantizer_modes():
    with pytest.raises(ValueError, match=r"'dynamic', 'static', 'none'.*'per_row'"):
        ActivationQuantizer("per_row")
    x = _randn(4, 8, seed=20)
    assert ActivationQuantizer("none")(x) is x
    aq = ActivationQuantizer("static", 8)
    aq.calibrating = True
    assert torch.equal(aq(x), x) and torch.equal(aq(x * 3), x * 3)  # pass-through while calibrating
    aq.calibrating = False
    assert aq.amax.item() == pytest.approx(3 * x.abs().max().item())
    assert "amax" in aq.state_dict()
    y = aq(x)
    q = y / aq.static_scale()
    assert torch.allclose(q, q.round(), atol=1e-4) and not torch.equal(y, x)
    with pytest.raises(RuntimeError, match="static"):
        ActivationQuantizer("dynamic").observe(x)


# --------------------------------------------------------------------------- int8 matmul


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [7, 64])
@pytest.mark.parametrize("n", [5, 48])
def test_int8_matmul_exact(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=_gen(m * k))
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=_gen(n * k + 1))
    a[0], b[0] = -128, -128  # extreme products
    ref = a.long() @ b.long().t()
    for fn in (int8_matmul, quant._padded_int_mm, quant._exact_int8_matmul):
        out = fn(a, b)
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out.long(), ref), fn.__name__


def test_int8_matmul_edge_cases():
    empty = int8_matmul(torch.zeros(0, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8))
    assert empty.shape == (0, 3) and empty.dtype == torch.int32
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="inner"):
        int8_matmul(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(3, 5, dtype=torch.int8))


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_reuses_parameters(bias):
    lin = _linear(16, 8, bias=bias).double()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    q = QuantLinear.from_linear(lin, QuantSpec(8, "channel"), "pact")
    assert q.weight is lin.weight and q.bias is lin.bias
    assert q.weight.dtype == torch.float64 and q.weight_quantizer.alpha.dtype == torch.float64
    assert opt.param_groups[0]["params"][0] is q.weight
    sd = q.state_dict()
    assert set(lin.state_dict()) <= set(sd) and "weight_quantizer.alpha" in sd
    before = lin.weight.detach().clone()
    q(_randn(4, 16, seed=21).double()).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(lin.weight, before) and q.weight is lin.weight


def _calibrate(q: QuantLinear, *xs: torch.Tensor) -> None:
    q.input_quantizer.calibrating = True
    with torch.no_grad():
        for x in xs:
            q(x)
    q.input_quantizer.calibrating = False


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("method", ["absmax", "lsq", "pact", "dynamic"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_int8_linear_bit_exact_with_quant_linear(act_mode, granularity, method, bits):
    spec = QuantSpec(bits, granularity)
    q = QuantLinear.from_linear(_linear(48, 20, seed=22), spec, method, act_mode, 8)
    x = _randn(2, 7, 48, seed=23)
    if act_mode == "static":
        _calibrate(q, x, 0.5 * x)
        x = 1.5 * x  # some activations clip
    m = Int8Linear.from_quant_linear(q)
    with torch.no_grad():
        assert q.int8_path_enabled()
        y_q, y_i = q(x), m(x)
    assert y_q.shape == (2, 7, 20)
    assert torch.equal(y_q, y_i)
    with torch.inference_mode():
        assert torch.equal(q(x), y_i)
    assert not q.int8_path_enabled()
    y_fake = q(x).detach()  # fake-quant path: same values up to float summation order
    assert torch.allclose(y_fake, y_q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_int8_linear_close_to_float(act_mode):
    lin = _linear(64, 32, seed=24)
    x = _randn(4, 10, 64, seed=25)
    amax = x.abs().max().item() if act_mode == "static" else None
    m = Int8Linear.from_float(lin, act_mode, act_amax=amax)
    assert set(m.state_dict()) == {"weight_codes", "weight_scale", "bias"} | (
        {"act_scale"} if amax else set()
    )
    with torch.no_grad():
        y, y_i = lin(x), m(x)
    assert (y_i - y).norm() / y.norm() < 0.02
    m16 = Int8Linear.from_float(_linear(64, 32, seed=24).bfloat16(), act_mode, act_amax=amax)
    y16 = m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and (y16.float() - y).norm() / y.norm() < 0.02


def test_int8_linear_rejects_incompatible_layers():
    lin = _linear(32, 8)
    for spec, act_mode, act_bits in [
        (QuantSpec(8, "group", 16), "dynamic", 8),
        (QuantSpec(4, "group", 16), "dynamic", 8),
        (QuantSpec(8, "channel", symmetric=False), "dynamic", 8),
        (QuantSpec(8, "channel"), "none", 8),
        (QuantSpec(8, "channel"), "dynamic", 4),
    ]:
        q = QuantLinear.from_linear(lin, spec, "absmax", act_mode, act_bits)
        with torch.no_grad():
            assert not q.int8_path_enabled()
        with pytest.raises(ValueError, match="DequantLinear"):
            Int8Linear.from_quant_linear(q)
    with pytest.raises(ValueError, match="act_amax"):
        Int8Linear.from_float(lin, "static")


def test_quant_linear_half_precision_trains():
    q = QuantLinear.from_linear(_linear(32, 8).bfloat16(), QuantSpec(4, "group", 16), "lsq", "dynamic", 8)
    y = q(_randn(3, 32, seed=26).bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert q.weight.grad is not None and q.weight_quantizer.step.grad is not None


@pytest.mark.parametrize(
    ("spec", "method", "act_mode", "act_bits"),
    [
        (QuantSpec(4, "group", 16, symmetric=False), "lsq", "dynamic", 4),
        (QuantSpec(2, "channel"), "pact", "none", 8),
        (QuantSpec(8, "group", 16), "absmax", "static", 8),
        (QuantSpec(4, "tensor"), "dynamic", "dynamic", 8),
        (QuantSpec(8, "channel", symmetric=False), "absmax", "static", 4),
    ],
)
def test_dequant_linear_matches_quant_linear(spec, method, act_mode, act_bits):
    q = QuantLinear.from_linear(_linear(48, 12, seed=27), spec, method, act_mode, act_bits)
    _perturb(q.weight_quantizer, 0.8)
    x = _randn(3, 5, 48, seed=28)
    if act_mode == "static":
        _calibrate(q, x)
    q.eval()
    d = DequantLinear.from_quant_linear(q)
    assert d.weight_packed.dtype == torch.uint8
    assert d.weight_packed.shape == (12, math.ceil(48 * spec.bits / 8))
    with torch.no_grad():
        y_q, y_d = q(x), d(x)
    assert torch.allclose(y_d, y_q, rtol=1e-6, atol=1e-6)
    d2 = DequantLinear(48, 12, spec, act_mode=act_mode, act_bits=act_bits)
    d2.load_state_dict(d.state_dict())
    with torch.no_grad():
        assert torch.equal(d2(x), y_d)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_int4_round_trip(n, signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (3, n), generator=_gen(n)).to(torch.int8 if signed else torch.uint8)
    packed, length = pack_int4(codes, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(n / 2)) and length == n
    assert torch.equal(unpack_int4(packed, length, signed), codes)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 34])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_int2_round_trip(n, signed):
    lo, hi = (-2, 2) if signed else (0, 4)
    codes = torch.randint(lo, hi, (2, 3, n), generator=_gen(n)).to(torch.int8 if signed else torch.uint8)
    packed, length = pack_int2(codes, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, math.ceil(n / 4)) and length == n
    assert torch.equal(unpack_int2(packed, length, signed), codes)


def test_pack_byte_layout_and_errors():
    packed, _ = pack_int4(torch.tensor([[1, -1, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0xF1, 0x07]]  # low nibble first, two's complement
    packed, _ = pack_int2(torch.tensor([[1, -2, 0, -1, 1]], dtype=torch.int8))
    assert packed.tolist() == [[0b11_00_10_01, 0b01]]
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8]))
    with pytest.raises(ValueError, match=r"\[-2, 1\]"):
        pack_int2(torch.tensor([-3]))


@pytest.mark.parametrize(
    ("bits", "signed"),
    [(8, True), (8, False), (4, True), (4, False), (3, True), (3, False), (2, True), (2, False)],
)
def test_pack_codes_round_trip(bits, signed):
    spec = QuantSpec(bits=bits, symmetric=signed)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (4, 10), generator=_gen(bits))
    codes = codes.to(torch.int8 if signed else torch.uint8)
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (4, math.ceil(10 * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, 10, signed), codes)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 576])
def test_3bit_codes_are_numpy_packbits_of_the_little_endian_bit_stream(n):
    """3-bit codes are one bit stream, code i in bits [3i, 3i+3) (low bit first): the same bytes as
    numpy's packbits over every code's 3 bits, little-endian, and ceil(3n / 8) of them."""
    np = pytest.importorskip("numpy")
    codes = torch.randint(-4, 4, (2, n), generator=_gen(n))
    fields = (codes & 0b111).numpy().astype(np.uint8)  # two's complement fields
    bit_stream = np.unpackbits(fields[..., None], axis=-1, bitorder="little")[..., :3].reshape(2, -1)
    expected = np.packbits(bit_stream, axis=-1, bitorder="little")
    packed = pack_codes(codes, 3)
    assert packed.numpy().tolist() == expected.tolist() and packed.shape[-1] == math.ceil(3 * n / 8)
    assert torch.equal(unpack_codes(packed, 3, n), codes.to(torch.int8))


# --------------------------------------------------------------------------- config and transforms


def test_quant_config_checks_every_field_without_a_prefix():
    from lightcook.ops.quant import QuantConfig

    cases = {
        "bits": {"bits": 5},
        "granularity": {"granularity": "row"},
        "group_size": {"group_size": 0},
        "symmetric": {"symmetric": 1},
        "method": {"method": "minmax"},
        "activations": {"activations": "int8"},
        "act_bits": {"act_bits": 16},
        "calibration_batches": {"calibration_batches": True},
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=f"^{field}: "):
            QuantConfig(**kwargs)
    cfg = QuantConfig(bits=4, granularity="group", group_size=32)
    assert cfg.spec == QuantSpec(4, "group", 32, True) and "calibration_batches" not in cfg.shape()
    with pytest.raises(AttributeError):
        cfg.bits = 8  # frozen


def test_quant_config_gptq_fields():
    from lightcook.ops.quant import QuantConfig

    cfg = QuantConfig()
    assert (cfg.init, cfg.blocksize, cfg.percdamp, cfg.desc_act) == ("none", 128, 0.01, False)
    cases = {
        "init": [{"init": "rtn"}, {"init": None}],
        "blocksize": [{"blocksize": 0}, {"blocksize": 1.5}, {"blocksize": True}],
        "percdamp": [{"percdamp": -0.01}, {"percdamp": 1.5}, {"percdamp": "0.1"}, {"percdamp": True}],
        "desc_act": [{"desc_act": 1}, {"desc_act": "true"}],
    }
    for field, bad in cases.items():
        for kwargs in bad:
            with pytest.raises(ValueError, match=f"^{field}: "):
                QuantConfig(**kwargs)
    cfg = QuantConfig(init="gptq", blocksize=32, percdamp=0.0, desc_act=True)
    assert cfg.shape()["init"] == "gptq"  # a resumed run must not switch the starting point
    assert not {"blocksize", "percdamp", "desc_act"} & set(cfg.shape())  # tuning knobs, not the state's shape
    with pytest.raises(ValueError, match="^compress.quant.init: got 'gtpq'"):
        QuantConfig.build("compress.quant.", init="gtpq")


def test_quant_yaml_gives_the_gptq_keys_with_their_defaults():
    from pathlib import Path

    from omegaconf import OmegaConf

    from lightcook.ops.quant import QuantConfig

    yaml = OmegaConf.load(Path(__file__).parents[2] / "conf" / "compress" / "quant.yaml")
    defaults = QuantConfig()
    for key in ("init", "blocksize", "percdamp", "desc_act"):
        assert yaml[key] == getattr(defaults, key), key


def _two_layer_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def test_prepare_swaps_selected_layers_keeping_parameters():
    from lightcook.ops.quant import QuantConfig, prepare_

    net = _two_layer_net()
    weight, bias = net[0].weight, net[0].bias
    net[0].register_buffer("weight_mask", torch.ones(8, 16, dtype=torch.bool))
    layers = prepare_(net, QuantConfig(bits=4, method="lsq"), ["0"])
    assert list(layers) == ["0"] and net[0] is layers["0"] and type(net[2]) is nn.Linear
    assert net[0].weight is weight and net[0].bias is bias and "weight_mask" in net[0]._buffers
    assert net[0].weight_quantizer.step._no_weight_decay
    assert prepare_(net, QuantConfig(bits=4, method="lsq"), ["0"])["0"] is layers["0"]  # idempotent
    with pytest.raises(ValueError, match=r"^targets: 0 is already quantized with other settings"):
        prepare_(net, QuantConfig(bits=8), ["0"])


def test_prepare_checks_every_layer_before_swapping_any():
    from lightcook.ops.quant import QuantConfig, prepare_

    net = _two_layer_net()
    with pytest.raises(
        ValueError, match=r"^group_size: 2 has 8 input features, not divisible by group_size=16"
    ):
        prepare_(net, QuantConfig(granularity="group", group_size=16))
    assert not any(isinstance(m, QuantLinear) for m in net.modules())
    with pytest.raises(ValueError, match=r"^targets: emb is an embedding"):
        prepare_(nn.ModuleDict({"emb": nn.Embedding(4, 4)}), QuantConfig(), ["emb"])


def test_prepare_turns_conv1d_into_the_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    from lightcook.ops.quant import QuantConfig, prepare_

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(8, 16))  # weight (in=16, out=8)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = net[0](x)
    weight = net[0].weight.detach().clone()
    prepare_(net, QuantConfig(activations="none", bits=8))
    assert isinstance(net[0], QuantLinear) and torch.equal(net[0].weight.detach(), weight.t())
    torch.testing.assert_close(torch.nn.functional.linear(x, net[0].weight, net[0].bias), want)


def test_calibrate_records_max_abs_input_in_eval_mode_and_restores_train():
    from lightcook.ops.quant import QuantConfig, calibrate_, prepare_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    batches = [torch.randn(2, 4, generator=_gen(i)) for i in range(3)]
    prepare_(net, QuantConfig(activations="static"))
    first = net[0]
    with torch.no_grad():  # calibrating: inputs pass unquantized, weights fake-quantized, dropout off
        w0 = first.weight_quantizer(first.weight)
        hidden = [torch.nn.functional.linear(b, w0, first.bias).abs().max() for b in batches]
    assert calibrate_(net, batches) == 3 and net.training
    assert torch.equal(net[0].input_quantizer.amax, torch.stack([b.abs().max() for b in batches]).max())
    assert torch.equal(net[2].input_quantizer.amax, torch.stack(hidden).max())
    with pytest.raises(RuntimeError, match=r"^activations='static': no batch"):
        calibrate_(net, [])


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [({"bits": 8}, "Int8Linear"), ({"bits": 4, "granularity": "group", "group_size": 8}, "DequantLinear")],
)
def test_convert_folds_quant_layers_into_their_inference_layers(kwargs, kind):
    from lightcook.ops.quant import QuantConfig, convert_, prepare_

    net = _two_layer_net()
    prepare_(net, QuantConfig(**kwargs))
    x = torch.randn(5, 16, generator=_gen(3))
    with torch.no_grad():
        want = net(x)
    converted = convert_(net)
    assert sorted(converted) == ["0", "2"] and {type(m).__name__ for m in net.modules()} >= {kind}
    assert not any(isinstance(m, QuantLinear) for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
