"""StructuredPruningCallback in real Lightning runs: gradients reach the gates, the Lagrangian drives
the model to the target, the compressed export of the trained network reloads with its outputs,
crash-and-resume is exact, the resume guard, DDP ranks agree, a network stored elsewhere than
``.model``, composition with distillation, misconfiguration, a run short of its target, the Hydra app."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightcook.callbacks.structured_pruning import StructuredPruningCallback
from lightcook.export import load_compressed, read_manifest, save_compressed
from lightcook.modules import CausalLMModule
from lightcook.ops.architectures import get_architecture, layer_parameter_count
from lightcook.ops.hard_concrete import StructuredConfig
from tests.helpers import CountPasses, CrashAt, make_trainer, token_loader
from tests.helpers.structured_moe import (
    MYSTERY_IN_MODULE,
    TINY,
    VOCAB,
    BackboneModule,
    MysteryLM,
    distinct_params,
)

GATE_KEYS = (
    "gates.heads.log_alpha",
    "gates.neurons.log_alpha",
    "gates.attention_layers.log_alpha",
    "gates.ffn_layers.log_alpha",
)


def tiny_module(kind: str = "llama", seed: int = 0) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(config=dict(TINY[kind]), tokenizer=None, lr=1e-2)


# --------------------------------------------------------------------------- misconfiguration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"target_sparsity": 0.0},
            r"^compress.structured.target_sparsity: must lie strictly between 0 and 1",
        ),
        ({"target_sparsity": 1.0}, r"^compress.structured.target_sparsity: "),
        ({"target_sparsity": 1.5}, r"^compress.structured.target_sparsity: "),
        (
            {"units": []},
            r"^compress.structured.units: choose at least one; allowed: attention_layers, ffn_layers, heads, neurons$",
        ),
        (
            {"units": ["hidden"]},
            r"^compress.structured.units: 'hidden' \(hidden-dimension pruning\) is not implemented",
        ),
        ({"units": ["heads", "channels"]}, r"^compress.structured.units: unknown unit 'channels'; allowed: "),
        ({"start_step": -1}, r"^compress.structured.start_step: must lie in \[0, inf\], got -1$"),
        (
            {"start_step": 5, "end_step": 4},
            r"^compress.structured.end_step: must be >= start_step \(5\), got 4$",
        ),
        ({"gate_lr": 0.0}, r"^compress.structured.gate_lr: must be > 0, or null"),
        ({"lambda_lr": -1.0}, r"^compress.structured.lambda_lr: must be > 0"),
        ({"droprate_init": 1.0}, r"^compress.structured.droprate_init: must lie in \(0, 1\)"),
        ({"beta": 0.0}, r"^compress.structured.beta: must be > 0"),
        ({"limit_l": 0.1}, r"^compress.structured.limit_l: limit_l/limit_r"),
        ({"tolerance": 1.0}, r"^compress.structured.tolerance: must lie in \[0, 1\)"),
        (
            {"architecture": "falcon"},
            r"^compress.structured.architecture: 'falcon' is not a registered layout; registered: \[",
        ),
        (
            {"architecture": {"layers": "x", "bogus": 1}},
            r"^compress.structured.architecture: unknown keys \['bogus'\]",
        ),
        (
            {"architecture": 3},
            r"^compress.structured.architecture: expected null, a layout name or a mapping",
        ),
        (
            {"init": "magnitude"},
            r"^compress.structured.init: got 'magnitude'; allowed: 'uniform', 'taylor', 'obs'$",
        ),
        (
            {"init": "obs", "calibration_batches": 0},
            r"^compress.structured.calibration_batches: init='obs' needs >= 1 training batch to calibrate on, got 0$",
        ),
        (
            {"init": "obs", "units": ["attention_layers", "ffn_layers"]},
            r"^compress.structured.units: init='obs' removes heads and neurons; add at least one of them",
        ),
        ({"percdamp": -0.1}, r"^compress.structured.percdamp: must lie in \[0, inf\], got -0.1$"),
        (
            {"allocation": "random"},
            r"^compress.structured.allocation: got 'random'; allowed: 'global', 'uniform'$",
        ),
        ({"calibration_batches": 0}, r"^compress.structured.calibration_batches: must lie in \[1, inf\]"),
        ({"init_spread": 0.0}, r"^compress.structured.init_spread: must be > 0"),
        (
            {"export_dir": "sliced"},
            r"^compress.structured.export_dir: unknown key; allowed: target_sparsity, ",
        ),
    ],
)
def test_misconfiguration_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredPruningCallback(**kwargs)


def test_named_instance_uses_its_own_key():
    with pytest.raises(ValueError, match=r"^compress.cofi.target_sparsity: must"):
        StructuredPruningCallback(target_sparsity=2, name="cofi")


def test_config_object_or_options_not_both():
    config = StructuredConfig(target_sparsity=0.3, units=["neurons"])
    assert StructuredPruningCallback(config).config is config
    with pytest.raises(
        ValueError, match=r"^compress.structured.end_step: given both in config= and as an option"
    ):
        StructuredPruningCallback(config, end_step=3)


def test_unknown_layout_without_mapping_fails_in_setup(tmp_path):
    module = CausalLMModule(model=MysteryLM())
    with pytest.raises(
        ValueError,
        match=r"^compress.structured.architecture: MysteryLM \(model_type=None\) has no known layout; .*"
        r"\[looked in CausalLMModule.model \(MysteryLM\); set compress.structured.network to point elsewhere\]$",
    ):
        make_trainer(tmp_path, [StructuredPruningCallback()], max_steps=4).fit(module, token_loader())


def test_unit_kind_the_architecture_lacks_fails_in_setup(tmp_path):
    module = CausalLMModule(model=MysteryLM())
    cb = StructuredPruningCallback(units=["heads", "neurons"], architecture=MYSTERY_IN_MODULE)
    with pytest.raises(
        ValueError,
        match=r"^compress.structured.units: \['heads'\] not available for architecture 'custom'; allowed here: \['neurons', 'ffn_layers'\]",
    ):
        make_trainer(tmp_path, [cb], max_steps=4).fit(module, token_loader())


def initial_log_alpha(droprate: float = 0.05) -> float:
    return math.log((1 - droprate) / droprate)


def test_custom_layout_mapping_trains(tmp_path):
    module = CausalLMModule(model=MysteryLM())
    cb = StructuredPruningCallback(units=["neurons"], architecture=MYSTERY_IN_MODULE, end_step=1)
    make_trainer(tmp_path, [cb], max_steps=2).fit(module, token_loader())
    log_alpha = module.model.lightcook_gates.gates.neurons.log_alpha
    assert log_alpha.shape == (64,)  # 2 blocks x 32 neurons
    assert not torch.allclose(log_alpha, torch.full((64,), initial_log_alpha()), atol=1e-4)  # learned


class ManualModule(CausalLMModule):
    def __init__(self) -> None:
        super().__init__(config=dict(TINY["llama"]), tokenizer=None)
        self.automatic_optimization = False


def test_manual_optimization_is_refused(tmp_path):
    """The Lagrangian is added to the loss training_step returns, which manual optimization ignores:
    setup says so, naming the callback. The user switches back to automatic optimization, or adds
    ``cb.loss_terms(trainer, module, batch, outputs)`` to the loss they backpropagate themselves."""
    for module in (ManualModule(), BackboneModule(manual=True)):
        with pytest.raises(
            TypeError,
            match=r"^compress.structured: add loss terms to the loss training_step returns, but "
            rf"{type(module).__name__} uses manual optimization .*use automatic optimization, or add "
            r"callback.loss_terms\(trainer, module, batch, outputs\) to your loss yourself$",
        ):
            make_trainer(tmp_path, [StructuredPruningCallback()], max_steps=4).fit(module, token_loader())
        assert not hasattr(module.model if hasattr(module, "model") else module.backbone, "lightcook_gates")


class SwapOutput(Callback):
    """Replaces a gated projection in setup, after the gates went in (as a fake-quant wrapper does)."""

    def setup(self, trainer, pl_module, stage):
        attn = pl_module.model.model.layers[0].self_attn
        new = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
        new.weight = attn.o_proj.weight  # same weight, new module: the old hooks are gone
        attn.o_proj = new


def test_projection_replaced_after_gating_is_hooked_again(tmp_path):
    cb = StructuredPruningCallback()
    module = tiny_module()
    make_trainer(tmp_path, [cb, SwapOutput()], max_steps=1).fit(module, token_loader(1))
    model = module.model
    assert cb.gates.unhooked_outputs(model) == []
    assert len(model.model.layers[0].self_attn.o_proj._forward_pre_hooks) == 1
    with torch.no_grad():  # the gates act on the new module: close every head of block 0
        cb.gates.gates["heads"].log_alpha[:2] = -10.0
        cb.gates.gates["attention_layers"].log_alpha[0] = 10.0
    captured = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, out: captured.append(out))
    model.eval()(torch.randint(0, VOCAB, (1, 8)))
    assert captured and bool((captured[0] == 0).all())


def test_gated_projection_that_vanished_is_a_clear_error():
    module = tiny_module()
    cb = StructuredPruningCallback()
    cb.prepare_model(None, module)
    del module.model.model.layers[1].mlp.down_proj
    with pytest.raises(ValueError, match="gated projection 'model.layers.1.mlp.down_proj' no longer exists"):
        cb.gates.install_hooks(module.model)


# --------------------------------------------------------------------------- gradients and the Lagrangian


class GradProbe(Callback):
    """Records the first backward's gate samples and gradients, while the multipliers are still 0."""

    def __init__(self, cb: StructuredPruningCallback) -> None:
        self.cb, self.grads, self.samples, self.lambdas, self.in_optimizer = cb, {}, {}, None, None

    def on_after_backward(self, trainer, pl_module):
        if self.grads:
            return
        gates = self.cb.gates
        self.lambdas = (gates.lambda_1.item(), gates.lambda_2.item())
        self.grads = {k: g.log_alpha.grad.clone() for k, g in gates.gates.items()}
        self.samples = {k: v.detach().clone() for k, v in gates.current().items()}
        ids = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.in_optimizer = any(id(p) in ids for p in gates.gate_parameters())


def _has_slope(cb: StructuredPruningCallback, samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where the loss can depend on a gate: sampled strictly inside (0, 1), and for a block gate,
    some unit of its block open (a block whose units are all closed contributes nothing anyway)."""
    slope = {kind: (z > 0) & (z < 1) for kind, z in samples.items()}
    for block in cb.gates.blocks:
        units, _ = cb.gates.block_factors(block, samples)
        kind = "attention_layers" if block.kind == "attention" else "ffn_layers"
        if units is not None and not bool((units > 0).any()):
            slope[kind][block.block_index] = False
    return slope


def test_task_loss_gradient_reaches_every_gate_in_a_real_step(tmp_path):
    """The gradient is nonzero exactly where the loss can depend on the sampled gate."""
    cb = StructuredPruningCallback(droprate_init=0.5)
    probe = GradProbe(cb)
    make_trainer(tmp_path, [cb, probe], max_steps=1).fit(tiny_module(), token_loader())
    assert probe.lambdas == (0.0, 0.0)  # the penalty contributes no gate gradient at step 0 ...
    inside_somewhere = {}
    for kind, slope in _has_slope(cb, probe.samples).items():  # ... so this is the task loss alone
        assert torch.equal(probe.grads[kind] != 0, slope), kind
        inside_somewhere[kind] = bool(slope.any())
    assert inside_somewhere["heads"] and inside_somewhere["neurons"]
    assert inside_somewhere["attention_layers"] or inside_somewhere["ffn_layers"]
    assert probe.in_optimizer is False  # stepped by the callback's own Adam at gate_lr


def test_target_warms_up_linearly():
    cb = StructuredPruningCallback(target_sparsity=0.6, start_step=10, end_step=20)
    assert [cb.target_at(s) for s in (0, 10, 15, 20, 99)] == [0.0, 0.0, pytest.approx(0.3), 0.6, 0.6]


def _overshot(dual_restart: bool, closed: bool) -> StructuredPruningCallback:
    """A callback after its schedule with lambda_1 wound up negative (pushing sparsity up); the gates
    all closed (expected sparsity ~1, above the 0.4 target) or all open (~0, below it)."""
    module = tiny_module()
    cb = StructuredPruningCallback(target_sparsity=0.4, end_step=4, dual_restart=dual_restart, tolerance=0.0)
    cb.prepare_model(None, module)
    with torch.no_grad():
        for gate in cb.gates.gates.values():
            gate.log_alpha.fill_(-20.0 if closed else 20.0)
        cb.gates.lambda_1.fill_(-500.0)
    for moments in cb.gates.moments.values():
        moments.exp_avg.fill_(3.0)
        moments.steps.fill_(7)
    cb.state["steps"] = 4
    return cb


def test_dual_restart_zeroes_lambda_1_when_it_pushes_away_from_the_target():
    cb = _overshot(dual_restart=True, closed=True)
    cb.after_optimizer_step(None, None)
    assert float(cb.gates.lambda_1) == 0.0 and cb.state["dual_restarts"] == 1
    # lambda_1's moments start afresh; the gates lose their momentum but keep their step count and
    # second moment; lambda_2 keeps everything
    moments = cb.gates.moments
    assert float(moments["lambda_1"].exp_avg) == 0.0 and int(moments["lambda_1"].steps) == 0
    for kind in cb.gates.gates:
        assert moments[kind].exp_avg.abs().max() == 0 and int(moments[kind].steps) == 7, kind
    assert float(moments["lambda_2"].exp_avg) == 3.0 and int(moments["lambda_2"].steps) == 7
    # below the target a negative lambda_1 pushes the right way: kept
    below = _overshot(dual_restart=True, closed=False)
    below.after_optimizer_step(None, None)
    assert float(below.gates.lambda_1) == -500.0 and below.state["dual_restarts"] == 0
    # switched off: kept as well
    off = _overshot(dual_restart=False, closed=True)
    off.after_optimizer_step(None, None)
    assert float(off.gates.lambda_1) == -500.0 and off.state["dual_restarts"] == 0


class Trace(Callback):
    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({k: float(m[k]) for k in m if k.startswith("compress/")})


def test_reaches_the_target_freezes_and_exports(tmp_path):  # ~25 s
    module = tiny_module()
    # tolerance 0.05: in this tiny model one FFN block is a third of the layer parameters, so the
    # deterministic sparsity moves in large steps. Without dual restarts: with them the expected
    # sparsity settles at 0.40 here while the deterministic one sits a block away at 0.50 (their
    # rule is tested on its own above; SmolLM2 runs in docs/benchmarks.md)
    cb = StructuredPruningCallback(
        target_sparsity=0.4,
        end_step=6,
        gate_lr=0.5,
        lambda_lr=1.0,
        droprate_init=0.1,
        tolerance=0.05,
        dual_restart=False,
    )
    trace = Trace()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb, trace], max_steps=20).fit(module, token_loader(8))
    assert not [w for w in caught if "not within tolerance" in str(w.message)]  # reached: no warning
    assert cb.state["phase"] == "fixed" and cb.state["frozen_at"] >= 6, cb.state
    summary = cb.summary()
    assert summary["target_met"] is True and 0.35 <= summary["reached_sparsity"] <= 0.45
    assert summary["frozen_at"] == cb.state["frozen_at"] and summary["target_sparsity"] == 0.4
    targets = [row["compress/target_sparsity"] for row in trace.rows if "compress/target_sparsity" in row]
    assert targets[:3] == [0.0, pytest.approx(0.4 / 6), pytest.approx(0.8 / 6)] and max(
        targets
    ) == pytest.approx(0.4)
    assert min(row["compress/lambda_1"] for row in trace.rows) < 0  # ascent: pushes sparsity up
    assert "compress/structured/lagrangian" in trace.rows[0]  # the loss term, logged by the base
    assert trace.rows[-1]["compress/phase"] == 1.0 and "training_step" not in module.__dict__
    # the compressed export of the trained network reloads as a plain, smaller HF Llama with the live
    # (gated, eval) model's outputs
    path = save_compressed(module.model, tmp_path / "compressed")
    assert read_manifest(path)["techniques"] == ["structured"]
    sliced = load_compressed(path, backend="reference")  # the stored float32
    ids = torch.randint(0, VOCAB, (2, 12))
    module.eval()
    with torch.no_grad():
        assert torch.allclose(sliced(ids).logits, module.model(ids).logits, atol=1e-5)
    assert layer_parameter_count(sliced, cb.architecture) == summary["layer_parameters_deterministic"]
    assert distinct_params(sliced) < 0.8 * (distinct_params(tiny_module().model))


# --------------------------------------------------------------------------- resume, DDP


def _resume_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = StructuredPruningCallback(target_sparsity=0.3, end_step=3, gate_lr=0.3)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=6, enable_checkpointing=True)
    trainer.fit(module, token_loader(3), ckpt_path=ckpt_path)
    return module, cb


def test_crash_and_resume_matches_straight_run(tmp_path):
    straight, cb_straight = _resume_run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(tmp_path / "crashed", crash_at=3)
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # primitives only in the callback state
    assert state["global_step"] == 3 and state["callbacks"]["StructuredPruningCallback"]["steps"] == 3
    assert all(f"model.lightcook_gates.{k}" in state["state_dict"] for k in GATE_KEYS)
    resumed, cb_resumed = _resume_run(tmp_path / "crashed", ckpt_path=str(last))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and int(a["model.lightcook_gates.draws"]) == 6
    assert cb_straight.state["phase"] == "fixed" or cb_straight.state["steps"] == 6
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cb_resumed.state_dict() == cb_straight.state_dict()


# --------------------------------------------------------------------------- init="taylor"


class NeuronInputs(Callback):
    """At train start, before the gates are ranked: ``Σ_batches Σ_tokens h·∂loss/∂h`` per FFN neuron,
    ``h`` = the input of each ``down_proj`` with every gate at 1 (the reference for the Taylor scores)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.total = batches, None

    def on_train_start(self, trainer, pl_module):
        model = pl_module.model
        gates = model.lightcook_gates
        seen = []
        hooks = [
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]) or None)
            for layer in model.model.layers
        ]
        total = 0
        with gates.probe():  # gates at 1, so h is the dense model's activation
            pl_module.eval()
            for batch in self.batches:
                seen.clear()
                loss, _ = pl_module.compute_loss(batch)
                grads = torch.autograd.grad(loss, seen)
                total = total + torch.cat([(h * g).sum((0, 1)) for h, g in zip(seen, grads)]).double()
            pl_module.train()
        for hook in hooks:
            hook.remove()
        self.total = total


def test_taylor_init_ranks_gates_by_first_order_importance(tmp_path):
    loader = token_loader(3)
    reference = NeuronInputs(list(loader)[:2])
    cb = StructuredPruningCallback(init="taylor", calibration_batches=2, init_spread=4.0)
    module = tiny_module()
    make_trainer(tmp_path, [reference, cb], max_steps=1, limit_train_batches=1).fit(module, loader)
    assert cb.state["initialized"] is True
    # the ranking took the reference's order: ranks of |Σ h·∂L/∂h| ...
    scores = reference.total.abs()
    ranks = torch.empty_like(scores)
    ranks[torch.sort(scores, stable=True).indices] = torch.arange(len(scores), dtype=scores.dtype)
    start = initial_log_alpha()
    expected = start + 4.0 * ranks / (len(scores) - 1)
    # ... then one gate step of Adam (lr 0.5) moved each logit by at most ~0.5
    log_alpha = module.model.lightcook_gates.gates["neurons"].log_alpha.detach().double()
    assert (log_alpha - expected).abs().max() < 0.51
    assert torch.corrcoef(torch.stack([log_alpha, expected]))[0, 1] > 0.95


def test_rank_init_rejects_unknown_kinds_and_wrong_shapes(tmp_path):
    cb = StructuredPruningCallback(init="uniform")
    module = tiny_module()
    cb.prepare_model(None, module)
    n = cb.gates.gates["neurons"].log_alpha.numel()
    with pytest.raises(ValueError, match="no 'hidden' gates here"):
        cb.gates.rank_init_({"hidden": torch.zeros(3)}, 4.0)
    with pytest.raises(ValueError, match=rf"neurons: \(3,\) scores for \({n},\) gates"):
        cb.gates.rank_init_({"neurons": torch.zeros(3)}, 4.0)


def test_taylor_init_keeps_the_dense_model_and_every_kind_spread(tmp_path):
    cb = StructuredPruningCallback(init="taylor", calibration_batches=2, gate_lr=None)
    module = tiny_module()

    class Check(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            gates = pl_module.model.lightcook_gates
            assert all(bool((v == 1).all()) for v in gates.deterministic().values())  # still dense
            for kind, gate in gates.gates.items():  # ranked: from the initial logit to + init_spread
                span = gate.log_alpha.detach()
                assert span.min() == pytest.approx(initial_log_alpha()), kind
                assert span.max() == pytest.approx(initial_log_alpha() + 4.0), kind
            raise RuntimeError("checked")  # before the first optimizer step

    with pytest.raises(RuntimeError, match="checked"):
        make_trainer(tmp_path, [cb, Check()], max_steps=1).fit(module, token_loader(2))


def test_taylor_init_prunes_dead_neurons_first(tmp_path):
    """Half of each FFN's neurons write nothing (zero down_proj columns): their gates have no task
    gradient, so the Taylor ranking closes them first; a uniform start closes a random mix."""

    def run(init: str) -> float:
        module = tiny_module()
        dead = []
        with torch.no_grad():
            for layer in module.model.model.layers:
                cols = torch.randperm(
                    layer.mlp.down_proj.in_features, generator=torch.Generator().manual_seed(1)
                )
                half = cols[: len(cols) // 2]
                layer.mlp.down_proj.weight[:, half] = 0
                dead.append(half)
        cb = StructuredPruningCallback(
            target_sparsity=0.2,
            units=["neurons"],
            end_step=6,
            gate_lr=0.5,
            init=init,
            calibration_batches=2,
            tolerance=0.02,
        )
        make_trainer(tmp_path / init, [cb], max_steps=30).fit(module, token_loader(4))
        assert cb.deterministic_sparsity() >= 0.18, init  # both reached the target (uniform overshoots)
        closed = cb.gates.deterministic()["neurons"] == 0
        width = module.model.config.intermediate_size
        dead_mask = torch.zeros_like(closed)
        for i, half in enumerate(dead):
            dead_mask[i * width + half] = True
        return float((closed & dead_mask).sum() / closed.sum())

    assert run("taylor") == 1.0  # every closed neuron was a dead one
    assert run("uniform") < 0.75


def test_taylor_init_runs_once_not_again_on_resume(tmp_path):
    def fit(root: Path, crash_at: int | None = None, ckpt_path: Path | None = None):
        module = tiny_module()
        cb = StructuredPruningCallback(init="taylor", calibration_batches=2)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
        extra = [CrashAt(crash_at)] if crash_at is not None else []
        trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=4, enable_checkpointing=True)
        trainer.fit(module, token_loader(2), ckpt_path=ckpt_path)
        return module

    straight = fit(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", crash_at=2)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert (
        torch.load(last, weights_only=True)["callbacks"]["StructuredPruningCallback"]["initialized"] is True
    )
    resumed = fit(tmp_path / "b", ckpt_path=last)
    a, b = straight.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # ranked once, at step 0 only


class DumpPerRank(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow  # two spawned processes: ~30 s on a shared 2-core machine
def test_ddp_spawn_two_ranks_agree(tmp_path):
    cb = StructuredPruningCallback(target_sparsity=0.3, end_step=2)
    trainer = make_trainer(
        tmp_path, [cb, DumpPerRank(str(tmp_path))], strategy="ddp_spawn", devices=2, max_steps=3
    )
    trainer.fit(tiny_module(), token_loader(6))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    alpha = "model.lightcook_gates.gates.neurons.log_alpha"
    assert not torch.allclose(
        ranks[0][alpha], torch.full_like(ranks[0][alpha], initial_log_alpha()), atol=1e-4
    )  # gates moved
    assert [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])] == []


# --------------------------------------------------------------------------- composition and the app


@pytest.mark.parametrize("kd_first", [False, True])
def test_composes_with_distillation_in_either_order(tmp_path, kd_first):
    from lightcook.callbacks import distillation

    callbacks = [StructuredPruningCallback(end_step=2), distillation.DistillationCallback()]
    if kd_first:
        callbacks.reverse()
    module = tiny_module()
    trainer = make_trainer(tmp_path, callbacks, max_steps=1)
    trainer.fit(module, token_loader(1))
    metrics = trainer.callback_metrics
    assert any(k.startswith("compress/kd/") for k in metrics), sorted(metrics)  # KD's loss terms
    assert {"compress/expected_sparsity", "compress/structured/lagrangian"} <= set(metrics)
    assert "training_step" not in module.__dict__  # both wrappers removed


def test_composes_with_fake_quant_listed_first(tmp_path):
    """Canonical order puts the gates (20) before fake-quant (40), which swaps the projections: the
    gates must follow the swap, and the float sliced export still reloads."""
    from lightcook.callbacks import quantization

    cb = StructuredPruningCallback(end_step=1)
    module = tiny_module()
    make_trainer(tmp_path, [quantization.QuantizationCallback(), cb], max_steps=2).fit(
        module, token_loader(2)
    )
    o_proj = module.model.model.layers[0].self_attn.o_proj
    assert type(o_proj).__name__ == "QuantLinear" and len(o_proj._forward_pre_hooks) == 1
    path = save_compressed(module.model, tmp_path / "compressed")
    assert "structured" in read_manifest(path)["techniques"]
    assert type(load_compressed(path)).__name__ == "LlamaForCausalLM"


def test_fast_app_run_short_of_the_target_warns_and_records_both(compose):
    """``trainer=fast`` with the default schedule (end_step=100) stops after 3 steps, far from the 50%
    target: the run says so with the reached and the wanted sparsity, and summary.json records both."""
    from lightcook.app import train

    cfg = compose(
        "model=tiny_llama",
        "trainer=fast",
        "report=fast",
        "+compress=[structured]",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "save_model=false",
    )
    assert cfg.compress.structured._target_.endswith("StructuredPruningCallback")
    with pytest.warns(
        UserWarning, match=r"compress.structured: training ended at 0\.0+ sparsity .*target_sparsity=0\.5"
    ):
        summary = train(cfg)
    outcome = summary["compress"]["structured"]
    assert outcome["target_sparsity"] == 0.5 and outcome["reached_sparsity"] == 0.0
    assert outcome["target_met"] is False and outcome["frozen_at"] is None and outcome["steps"] == 3
    export = Path(summary["exports"]["compressed"])  # the one export step at fit end
    assert export == Path(summary["run_dir"]) / "compressed"
    assert "structured" in read_manifest(export)["techniques"]
    assert type(load_compressed(export)).__name__ == "LlamaForCausalLM"


def test_summary_of_a_plain_trainer_run_short_of_the_target(tmp_path):
    cb = StructuredPruningCallback(target_sparsity=0.4, end_step=50)
    with pytest.warns(UserWarning, match=r"training ended at 0\.\d{4} sparsity .* target_sparsity=0\.4"):
        make_trainer(tmp_path, [cb], max_steps=3).fit(tiny_module(), token_loader(3))
    summary = cb.summary()
    assert summary["reached_sparsity"] == pytest.approx(cb.deterministic_sparsity(), abs=1e-6)
    assert summary["target_met"] is False and summary["frozen_at"] is None
    assert {"target_sparsity", "reached_sparsity", "target_met", "frozen_at"} <= set(summary)


# --------------------------------------------------------------------------- a network elsewhere, resume guard


@pytest.mark.parametrize("network", [None, "backbone"])
def test_network_stored_as_backbone(tmp_path, network):
    """A user module with its HF model as ``self.backbone`` and no ``compute_loss``: found by default
    (the single pretrained model) or by ``network="backbone"``; Taylor init uses the network's own
    ``.loss``; the module's own training_step (and its logging) still runs."""
    module = BackboneModule()
    cb = StructuredPruningCallback(target_sparsity=0.3, end_step=2, calibration_batches=2, network=network)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    with pytest.warns(UserWarning, match="not within tolerance"):
        trainer.fit(module, token_loader(2))
    assert module.backbone.lightcook_gates is cb.gates and cb.state["initialized"] is True
    spread = cb.gates.gates["neurons"].log_alpha.detach()
    assert float(spread.max() - spread.min()) > 2.0  # ranked by the Taylor scores (init_spread 4, 2 steps)
    assert {"train/own", "compress/structured/lagrangian", "compress/sparsity"} <= set(
        trainer.callback_metrics
    )


def test_network_that_is_not_a_transformer_names_where_it_looked(tmp_path):
    class TwoNets(BackboneModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 4)

    with pytest.raises(
        ValueError,
        match=r"^compress.structured.architecture: Linear \(model_type=None\) has no known layout; .*"
        r"\[looked in TwoNets.head \(Linear\); set compress.structured.network to point elsewhere\]$",
    ):
        make_trainer(tmp_path, [StructuredPruningCallback(network="head")]).fit(TwoNets(), token_loader(1))


def test_resume_with_other_units_fails_before_training(tmp_path):
    module = tiny_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = StructuredPruningCallback(units=["heads", "neurons"], end_step=1, tolerance=0.9)
    make_trainer(tmp_path, [cb, ckpt], max_steps=1, enable_checkpointing=True).fit(module, token_loader(1))
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed = tiny_module()
    other = StructuredPruningCallback(units=["neurons"], end_step=1)
    with pytest.raises(
        ValueError,
        match=r"^compress.structured.units: the checkpoint .*last.ckpt was trained with \['heads', 'neurons'\], "
        r"this run has \['neurons'\]",
    ):
        make_trainer(tmp_path, [other], max_steps=2).fit(resumed, token_loader(1), ckpt_path=str(last))
    assert other.state["steps"] == 0  # not a single step


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_gates_train_and_export(tmp_path):
    from lightcook.data import TextDataModule

    module = CausalLMModule(name_or_path="smollm2-135m-instruct")
    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=64, batch_size=2)
    cb = StructuredPruningCallback(target_sparsity=0.5, end_step=2, gate_lr=0.5)
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(module, data)
    assert cb.gates.layer_params == layer_parameter_count(module.model, cb.architecture)
    sliced = load_compressed(save_compressed(module.model, tmp_path / "compressed"), backend="reference")
    ids = torch.randint(0, 49152, (1, 16))
    module.eval()
    with torch.no_grad():
        assert torch.allclose(sliced(ids).logits, module.model(ids).logits, atol=1e-4)


# --------------------------------------------------------------------------- init="obs": one-shot structured OBS


def _obs(target: float = 0.4, **kwargs) -> StructuredPruningCallback:
    options = {"init": "obs", "target_sparsity": target, "end_step": 0, "calibration_batches": 4, **kwargs}
    return StructuredPruningCallback(**options)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_obs_one_shot_meets_the_target_freezes_and_the_sliced_export_is_the_gated_model(tmp_path):
    """``init=obs, end_step=0`` in a real fit: the prune runs at train start, the gates are frozen at
    step 0 at the target, and the export sliced from them computes what the gated model computes."""
    module = tiny_module()
    cb = _obs()
    make_trainer(tmp_path, [cb], max_steps=2).fit(module, token_loader(4, batch_size=2, seq=32))
    assert cb.state["phase"] == "fixed" and cb.state["frozen_at"] == 0 and cb.state["initialized"] is True
    summary = cb.summary()
    assert summary["target_met"] is True and 0.4 <= summary["reached_sparsity"] < 0.45, summary
    assert summary["expected_sparsity"] == pytest.approx(summary["reached_sparsity"], abs=1e-3)
    values = cb.gates.deterministic()
    assert all(bool(((v == 0) | (v == 1)).all()) for v in values.values())  # closed, or fully open
    ids = torch.randint(0, VOCAB, (2, 12))
    sliced = load_compressed(save_compressed(module.model, tmp_path / "compressed"), backend="reference")
    torch.testing.assert_close(_logits(sliced, ids), _logits(module.model, ids), rtol=1e-5, atol=1e-5)
    assert layer_parameter_count(sliced, cb.architecture) == summary["layer_parameters_deterministic"]


def test_obs_init_outside_fit_refits_the_first_projection_by_least_squares():
    """``obs_init`` after setup, no training step: layer 0's ``o_proj`` is exactly the least-squares
    refit (``torch.linalg.lstsq`` on its raw inputs) of the kept heads' columns; the cut ones are 0."""
    module = tiny_module()
    batches = list(token_loader(4, batch_size=2, seq=32))
    o_proj = module.model.model.layers[0].self_attn.o_proj
    seen = []
    hook = o_proj.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            module.model.eval()(input_ids=batch["input_ids"])
    hook.remove()
    x, w = torch.cat(seen).double(), o_proj.weight.detach().double().clone()
    cb = _obs(target=0.5, percdamp=0.0, units=["heads", "neurons"])
    cb.prepare_once(None, module)
    counts = cb.obs_init(module, batches=batches)
    assert set(counts) == {
        f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")
    }
    heads = cb.gates.deterministic()["heads"][:2] > 0
    assert 2 - int(heads.sum()) == counts["model.layers.0.self_attn.o_proj"]
    width = o_proj.in_features // 2
    kept = torch.arange(2 * width).reshape(2, width)[heads].flatten()
    refit = torch.zeros_like(w)
    if len(kept):
        refit[:, kept] = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    torch.testing.assert_close(o_proj.weight.detach().double(), refit, rtol=1e-4, atol=1e-4)
    assert cb.state["phase"] == "fixed"
    assert cb.summary()["target_met"] is True


def _obs_error_of(module: CausalLMModule, batches: list[dict], dense: nn.Module) -> float:
    """Distance of the pruned (gated) network's logits from the dense network's on ``batches``."""
    with torch.no_grad():
        return sum(
            float(
                (
                    module.model.eval()(input_ids=b["input_ids"]).logits
                    - dense.eval()(input_ids=b["input_ids"]).logits
                ).norm()
            )
            for b in batches
        )


def test_obs_beats_closing_the_same_units_without_the_refit_and_allocations_differ():
    batches = list(token_loader(4, batch_size=2, seq=32))
    dense = tiny_module().model
    errors, kept = {}, {}
    for allocation in ("global", "uniform"):
        module = tiny_module()
        cb = _obs(target=0.3, allocation=allocation, units=["neurons"])
        cb.prepare_once(None, module)
        cb.obs_init(module, batches=batches)
        errors[allocation] = _obs_error_of(module, batches, dense)
        neurons = cb.gates.deterministic()["neurons"] > 0
        kept[allocation] = [int(neurons[:64].sum()), int(neurons[64:].sum())]  # per layer
        if allocation == "global":  # the same gates on the dense weights: no least-squares refit
            plain = tiny_module()
            other = _obs(target=0.3, units=["neurons"])
            other.prepare_once(None, plain)
            other.gates.load_state_dict(cb.gates.state_dict())
            assert _obs_error_of(plain, batches, dense) > 1.2 * errors["global"]
    # uniform: each layer loses 30% of its own parameters (neurons only: 30% of all its parameters
    # comes out of its 64 neurons); global: whatever is cheapest
    per_layer_params = layer_parameter_count(dense, get_architecture(dense)) // 2
    need = math.ceil(0.3 * per_layer_params / (3 * 32))  # a neuron owns 3 x 32 parameters
    assert kept["uniform"] == [64 - need, 64 - need]
    assert sum(kept["global"]) == sum(kept["uniform"]) and kept["global"] != kept["uniform"]


def _obs_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = _obs(target=0.3)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=4, enable_checkpointing=True)
    trainer.fit(module, token_loader(2), ckpt_path=ckpt_path)  # crash at 2: resumes at an epoch boundary
    return module, cb


def test_obs_init_runs_once_not_again_on_resume(tmp_path, monkeypatch):
    passes = CountPasses(monkeypatch)
    straight, cb_straight = _obs_run(tmp_path / "straight")
    assert passes.calls == 2 and cb_straight.state["frozen_at"] == 0  # two passes: curves, then prune
    with pytest.raises(RuntimeError, match="simulated crash"):
        _obs_run(tmp_path / "crashed", crash_at=2)
    assert passes.calls == 4
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    stored = torch.load(last, weights_only=True)
    assert stored["callbacks"]["StructuredPruningCallback"]["initialized"] is True
    resumed, cb_resumed = _obs_run(tmp_path / "crashed", ckpt_path=str(last))
    assert passes.calls == 4  # gate logits and refit weights came back with the state dict
    a, b = straight.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cb_resumed.state_dict() == cb_straight.state_dict()


def test_obs_init_without_calibration_batches_names_the_key():
    module = tiny_module()
    cb = _obs()
    cb.prepare_once(None, module)
    with pytest.raises(RuntimeError, match=r"^compress\.structured\.init='obs': needs training batches"):
        cb.obs_init(module)
    with pytest.raises(RuntimeError, match=r"^compress\.structured\.init='obs': .*no calibration batch"):
        cb.obs_init(module, batches=[])


def test_obs_one_shot_on_gpt2_conv1d_projections(tmp_path):
    """GPT-2 keeps its projections as ``Conv1D`` ``(in, out)``: refit through the ``(out, in)`` view."""
    from tests.helpers.quant_sparsity import tiny_module as quant_tiny

    module = quant_tiny("gpt2", 0)
    dense = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = _obs(target=0.3)
    cb.prepare_once(None, module)
    cb.obs_init(module, batches=list(token_loader(4, batch_size=2, seq=32)))
    assert cb.summary()["target_met"] is True
    changed = [k for k, v in module.model.state_dict().items() if k in dense and not torch.equal(v, dense[k])]
    assert sorted({k.split(".", 3)[-1] for k in changed}) == ["attn.c_proj.weight", "mlp.c_proj.weight"]
    ids = torch.randint(0, VOCAB, (2, 12))
    sliced = load_compressed(save_compressed(module.model, tmp_path / "compressed"), backend="reference")
    torch.testing.assert_close(_logits(sliced, ids), _logits(module.model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_obs_one_shot_exports_the_gated_model(tmp_path):
    from lightcook.data import TextDataModule

    module = CausalLMModule(name_or_path="smollm2-135m-instruct")
    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=64, batch_size=2)
    data.setup("fit")
    batches = [b for _, b in zip(range(2), data.train_dataloader())]
    cb = _obs(target=0.25, calibration_batches=2)
    cb.prepare_once(None, module)
    cb.obs_init(module, batches=batches)
    summary = cb.summary()
    assert summary["target_met"] is True and cb.state["phase"] == "fixed"
    sliced = load_compressed(save_compressed(module.model, tmp_path / "compressed"), backend="reference")
    ids = torch.randint(0, 49152, (1, 16))
    torch.testing.assert_close(_logits(sliced, ids), _logits(module.model, ids), rtol=1e-4, atol=1e-4)
    assert layer_parameter_count(sliced, cb.architecture) == summary["layer_parameters_deterministic"]
