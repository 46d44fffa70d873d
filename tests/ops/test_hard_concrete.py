"""Hard-concrete gates against Monte-Carlo and hand-written references; the model-wide gate set:
task-loss gradients reach every gate (checked against finite differences), reproducible noise,
its own Adam against torch.optim.Adam."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightcook.ops.architectures import get_architecture, layer_parameter_count, resolve_blocks
from lightcook.ops.hard_concrete import (
    AdamMoments,
    HardConcreteGate,
    StructuredConfig,
    attach_gates,
    check_gate_args,
    detach_gates,
    deterministic_sparsity,
    expected_sparsity,
    gate_gradients,
    lagrangian,
    prepare_,
    reverse_grad,
)
from tests.helpers.structured_moe import MYSTERY_LAYOUT, Mystery, model_inputs, tiny_model

ALL_UNITS = ["heads", "neurons", "attention_layers", "ffn_layers"]


def test_initial_log_alpha_from_droprate():
    gate = HardConcreteGate(3, droprate_init=0.2)
    assert torch.allclose(gate.log_alpha, torch.full((3,), math.log(0.8 / 0.2)))
    assert getattr(gate.log_alpha, "_no_weight_decay", False)


def test_sample_matches_the_formula_by_hand():
    gate = HardConcreteGate(2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.3, -1.0]))
    u = torch.tensor([0.25, 0.9])
    manual = []
    for la, ui in zip([0.3, -1.0], [0.25, 0.9], strict=True):
        s = 1 / (1 + math.exp(-(math.log(ui) - math.log(1 - ui) + la) / (2 / 3)))
        manual.append(min(1.0, max(0.0, s * 1.2 - 0.1)))
    assert torch.allclose(gate.sample(u), torch.tensor(manual))


def test_prob_nonzero_matches_monte_carlo():
    gate = HardConcreteGate(5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    u = torch.rand(50_000, 5, generator=torch.Generator().manual_seed(0))
    z = gate.sample(u).detach()  # (samples, gates), broadcast over samples
    frequency = (z > 0).float().mean(0)
    assert torch.allclose(frequency, gate.prob_nonzero().detach(), atol=0.01)
    assert bool(((z == 0).any(0) | (gate.log_alpha > 2)).all())  # exact zeros happen
    assert bool((z == 1).any())  # and exact ones


def test_deterministic_keeps_round_of_expected_count_largest_first():
    gate = HardConcreteGate(6)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([4.0, -4.0, 0.5, -3.0, 6.0, -6.0]))
    expected = round(float(gate.prob_nonzero().detach().sum()))  # 3.18
    z = gate.deterministic()
    assert int((z > 0).sum()) == expected == 3
    assert (z > 0).tolist() == [True, False, True, False, True, False]
    assert z[0] == 1 and z[4] == 1 and 0 < z[2] < 1  # large log_alpha: exactly 1; middling: soft
    assert not z.requires_grad


def test_deterministic_at_init_keeps_everything_at_one():
    gate = HardConcreteGate(4096, droprate_init=0.01)
    assert round(float(gate.prob_nonzero().detach().sum())) < 4096  # the count rule alone would drop some
    assert bool((gate.deterministic() == 1).all())  # but every estimate is exactly 1: all kept


def test_certain_gates_are_kept_beyond_the_count():
    gate = HardConcreteGate(3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([2.5, 2.5, -9.0]))  # P = 0.985, 0.985, 0.0006: round(sum) = 2
    eligible = torch.tensor([True, False, True])
    assert (gate.deterministic(keep=0) > 0).tolist() == [True, True, False]
    assert (gate.deterministic(keep=3, eligible=eligible) > 0).tolist() == [True, False, True]


def test_reverse_grad_negates_only_the_gradient():
    x = torch.tensor(2.0, requires_grad=True)
    y = reverse_grad(x) ** 2
    y.backward()
    assert float(y.detach()) == 4.0 and float(x.grad) == -4.0


def test_adam_moments_match_torch_adam():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    reference = torch.optim.Adam([b], lr=0.05)
    moments = AdamMoments((4,))
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        grad = torch.randn(4, generator=generator)
        a.grad, b.grad = grad.clone(), grad.clone()
        moments.step_(a, lr=0.05)
        reference.step()
    assert torch.allclose(a, b, atol=1e-7) and int(moments.steps) == 6


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 2 / 3, -0.1, 1.1), r"k.droprate_init: must lie in"),
        ((1.0, 2 / 3, -0.1, 1.1), r"k.droprate_init: must lie in"),
        ((0.1, 0.0, -0.1, 1.1), "k.beta: must be > 0"),
        ((0.1, 2 / 3, 0.1, 1.1), "limit_l < 0 < 1 < limit_r"),
        ((0.1, 2 / 3, -0.1, 0.9), "limit_l < 0 < 1 < limit_r"),
    ],
)
def test_gate_argument_errors(args, match):
    with pytest.raises(ValueError, match=match):
        check_gate_args(*args, key="k")


def gated(kind: str, units=ALL_UNITS, seed: int = 0):
    model = tiny_model(kind, seed=seed)
    arch = get_architecture(model)
    gates = attach_gates(
        model, resolve_blocks(model, arch), units, layer_parameter_count(model, arch), seed=seed
    )
    return model, gates


def task_loss(model: nn.Module, kind: str) -> torch.Tensor:
    """Next-token cross-entropy computed here in the logits' dtype (HF's loss upcasts to float32 only)."""
    inputs = model_inputs(kind)
    logits = model(**inputs).logits  # (B, T, V)
    if kind == "t5":
        return nn.functional.cross_entropy(logits.flatten(0, 1), inputs["decoder_input_ids"].flatten())
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_task_loss_gradient_reaches_every_gate(kind):
    """BMCook detached the mask; here the plain task loss must move every kind of gate."""
    model, gates = gated(kind)
    model.train()
    with torch.no_grad():  # middling logits: samples inside (0, 1), where the gate has a slope
        for gate in gates.gates.values():
            gate.log_alpha.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1))
    task_loss(model, kind).backward()
    for kind_name, gate in gates.gates.items():
        grad = gate.log_alpha.grad
        assert grad is not None and int((grad != 0).sum()) > gate.log_alpha.numel() // 4, kind_name
    assert gates.lambda_1.grad is None  # the task loss does not involve the multipliers


def test_gate_gradient_equals_finite_difference():
    """d loss / d log_alpha along a random direction, same noise both times (fixed draw counter)."""
    model, gates = gated("llama")
    model.train()
    neurons = gates.gates["neurons"].log_alpha
    with torch.no_grad():
        neurons.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(neurons.shape, generator=torch.Generator().manual_seed(3))
    model.double()

    def loss_at(offset: float) -> torch.Tensor:
        gates.draws.zero_()
        with torch.no_grad():
            neurons.add_(offset * direction)
        loss = task_loss(model, "llama")
        with torch.no_grad():
            neurons.sub_(offset * direction)
        return loss

    loss_at(0.0).backward()
    analytic = float((neurons.grad * direction).sum())
    eps = 1e-3  # Llama's RMSNorm computes in float32, so smaller steps drown in rounding
    with torch.no_grad():
        numeric = float((loss_at(eps) - loss_at(-eps)) / (2 * eps))
    assert analytic != 0 and math.isclose(analytic, numeric, rel_tol=2e-2)


def test_noise_is_reproducible_per_draw_and_rank():
    model, gates = gated("llama")
    model.train()
    gates.refresh()
    first = {k: v.detach().clone() for k, v in gates.current().items()}
    gates.refresh()
    second = gates.current()["neurons"].detach().clone()
    assert not torch.equal(first["neurons"], second)  # a new draw each forward
    gates.draws.zero_()
    gates.refresh()
    assert torch.equal(gates.current()["neurons"], first["neurons"])  # same counter, same noise
    gates.draws.zero_()
    gates.rank = 1
    gates.refresh()
    assert not torch.equal(gates.current()["neurons"], first["neurons"])  # ranks differ


def test_eval_and_frozen_gates_are_deterministic_and_detached():
    model, gates = gated("gpt2")
    model.eval()
    gates.refresh()
    assert all(not v.requires_grad for v in gates.current().values())
    model.train()
    gates.frozen.fill_(True)
    gates.refresh()
    assert all(torch.equal(gates.current()[k], v) for k, v in gates.deterministic().items())
    assert int(gates.draws) == 0


def test_gates_live_in_the_model_state_dict():
    model, _ = gated("t5", units=["heads", "ffn_layers"])
    keys = {k for k in model.state_dict() if k.startswith("lightcook_gates.")}
    assert {
        "lightcook_gates.gates.heads.log_alpha",
        "lightcook_gates.gates.ffn_layers.log_alpha",
        "lightcook_gates.lambda_1",
        "lightcook_gates.draws",
        "lightcook_gates.frozen",
        "lightcook_gates.moments.heads.exp_avg",
    } <= keys
    assert model.state_dict()["lightcook_gates.gates.heads.log_alpha"].shape == (6 * 4,)  # 6 attention blocks


def test_initial_eval_model_equals_the_dense_model():
    dense = tiny_model("llama")
    model, _ = gated("llama")
    inputs = model_inputs("llama")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, dense(**inputs).logits)


def test_detach_restores_the_plain_model():
    model, gates = gated("llama")
    with torch.no_grad():
        gates.gates["heads"].log_alpha.fill_(-9.0)  # every head closed
    inputs = model_inputs("llama")
    with torch.no_grad():
        closed = model(**inputs).logits
        assert detach_gates(model) is gates and not hasattr(model, "lightcook_gates")
        assert not torch.allclose(model(**inputs).logits, closed)
    assert detach_gates(model) is None


def test_attach_twice_or_without_units_fails():
    model, _ = gated("llama")
    arch = get_architecture(model)
    with pytest.raises(ValueError, match="already has gates"):
        attach_gates(model, resolve_blocks(model, arch), ["heads"], 0)
    detach_gates(model)
    with pytest.raises(ValueError, match="no block of the model carries"):
        attach_gates(model, [], ["heads"], 0)


# --------------------------------------------------------------------------- config and pure transforms


def test_structured_config_normalises_and_validates():
    config = StructuredConfig(
        units=["neurons", "heads", "neurons"], target_sparsity=0.4, start_step=2, end_step=6
    )
    assert config.units == ("neurons", "heads") and config.shape() == {
        "units": ["neurons", "heads"],
        "architecture": None,
    }
    assert [config.target_at(s) for s in (0, 2, 4, 6, 9)] == [0.0, 0.0, pytest.approx(0.2), 0.4, 0.4]
    assert StructuredConfig(gate_lr=0.3, lambda_lr=None).multiplier_lr == 0.3
    with pytest.raises(ValueError, match=r"^end_step: must be >= start_step \(5\), got 4$"):
        StructuredConfig(start_step=5, end_step=4)
    with pytest.raises(ValueError, match=r"^dual_restart: got 1; allowed: True, False$"):
        StructuredConfig(dual_restart=1)


def test_prepare_gates_a_network_without_lightning_and_keeps_its_function():
    model = tiny_model("gpt2")
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        dense = model(**inputs).logits
    gates = prepare_(model, StructuredConfig(units=["heads", "ffn_layers"], seed=3))
    assert model.lightcook_gates is gates and gates.architecture.name == "gpt2" and gates.seed == 3
    assert sorted(gates.gates) == ["ffn_layers", "heads"] and deterministic_sparsity(gates) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, dense)  # eval: every gate open
    with pytest.raises(ValueError, match=r"^units: \['heads'\] not available for architecture 'custom'"):
        prepare_(Mystery(), StructuredConfig(units=["heads"], architecture=MYSTERY_LAYOUT))


def test_lagrangian_value_and_gradient_ascent_on_the_multipliers():
    model = tiny_model("llama")
    gates = prepare_(model, StructuredConfig(units=["neurons"]))
    with torch.no_grad():
        gates.lambda_1.fill_(2.0)
        gates.lambda_2.fill_(3.0)
    penalty, expected = lagrangian(gates, 0.5)
    gap = float(expected.detach()) - 0.5
    assert float(penalty.detach()) == pytest.approx(2.0 * gap + 3.0 * gap**2, rel=1e-5)
    assert torch.equal(expected, expected_sparsity(gates).float())
    penalty.backward()
    assert float(gates.lambda_1.grad) == pytest.approx(-gap, rel=1e-5)  # reversed: ascent
    assert float(gates.lambda_2.grad) == pytest.approx(-(gap**2), rel=1e-5)
    assert gates.gates["neurons"].log_alpha.grad is not None


def test_gate_gradients_equal_the_unit_outputs_times_their_gradients():
    """At z = 1, ∂L/∂z of an FFN neuron is Σ_tokens h·∂L/∂h with h the input of down_proj."""
    model = tiny_model("llama")
    gates = prepare_(model, StructuredConfig(units=["neurons"]))
    batches = [model_inputs("llama", seed=s) for s in (0, 1)]
    loss_of = lambda b: model(**b, labels=b["input_ids"]).loss  # noqa: E731
    got = gate_gradients(gates, loss_of, batches)["neurons"]
    seen: list[torch.Tensor] = []
    layers = model.model.layers
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for layer in layers
    ]
    reference = 0
    with gates.probe():
        for batch in batches:
            seen.clear()
            grads = torch.autograd.grad(loss_of(batch), seen)
            reference = reference + torch.cat([(h * g).sum((0, 1)) for h, g in zip(seen, grads)]).double()
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the weights got no gradient
