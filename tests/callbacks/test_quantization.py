"""QuantizationCallback in real Lightning runs: module swaps, learned scales in the optimizer, static
calibration against a reference measured here, GPT-2 Conv1D, resume (and the resume guard), DDP, a
network stored elsewhere, manual optimization, misconfiguration, the app."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightcook.app import train
from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.ops.quant import Int8Linear, QuantConfig, QuantLinear, QuantSpec
from tests.helpers import CrashAt, keys_differing_across_ranks, make_trainer, token_loader
from tests.helpers.quant_sparsity import (
    LLAMA_TARGETS,
    VOCAB,
    BackboneModule,
    TrainingStarted,
    export_and_load,
    tiny_module,
)


def fit(root: Path, cb: QuantizationCallback, module=None, loader=None, extra=(), **kwargs):
    module = module or tiny_module()
    trainer = make_trainer(root, [cb, *extra], **kwargs)
    trainer.fit(module, loader or token_loader())
    return module, trainer


# --------------------------------------------------------------------------- structure


def test_block_linears_swapped_reusing_parameters(tmp_path):
    module = tiny_module()
    before = {
        n: (m.weight, m.bias) for n, m in module.model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    cb = QuantizationCallback()
    fit(tmp_path, cb, module, max_steps=1)
    swapped = {n: m for n, m in module.model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(swapped) == sorted(cb.quantized_modules) and len(swapped) == LLAMA_TARGETS
    assert all(swapped[n].weight is before[n][0] and swapped[n].bias is before[n][1] for n in swapped)
    assert type(module.model.lm_head) is torch.nn.Linear  # the LM head stays float by default
    assert type(module.model.model.embed_tokens) is torch.nn.Embedding
    q = swapped["model.layers.0.mlp.up_proj"]
    assert (
        q.weight_quantizer.spec == QuantSpec(8, "channel", 128, True) and q.input_quantizer.mode == "dynamic"
    )


@pytest.mark.parametrize(("method", "attr"), [("lsq", "step"), ("pact", "alpha"), ("dynamic", "gamma")])
def test_learned_scales_reach_the_optimizer_and_move(tmp_path, method, attr):
    module = tiny_module()
    cb = QuantizationCallback(bits=4, method=method)
    trainer = make_trainer(tmp_path, [cb])
    cb.setup(trainer, module, "fit")  # what Trainer.fit does first; fit below does not swap again
    scales = {n: getattr(q.weight_quantizer, attr) for n, q in cb.quantized_modules.items()}
    initial = {n: p.detach().clone() for n, p in scales.items()}
    assert all(p._no_weight_decay and p.requires_grad for p in scales.values())
    trainer.fit(module, token_loader())
    groups = trainer.optimizers[0].param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(p) in no_decay for p in scales.values())
    moved = [n for n, p in scales.items() if not torch.equal(p.detach(), initial[n])]
    assert len(moved) == LLAMA_TARGETS


def test_gpt2_conv1d_becomes_an_equivalent_linear(tmp_path):
    module = tiny_module("gpt2")
    convs = {n: m for n, m in module.model.named_modules() if type(m).__name__ == "Conv1D"}
    originals = {n: (m.weight.detach().clone(), m) for n, m in convs.items()}
    cb = QuantizationCallback(bits=4, method="lsq")
    cb.prepare_model(None, module)
    assert sorted(cb.quantized_modules) == sorted(convs) and len(convs) == 2 * 4
    for name, q in cb.quantized_modules.items():
        weight, conv = originals[name]
        x = torch.randn(3, q.in_features)
        assert torch.equal(q.weight.detach(), weight.t()) and q.bias is conv.bias
        torch.testing.assert_close(F.linear(x, q.weight, q.bias), conv(x))
    fit(tmp_path, cb, module, max_steps=2)  # trains and exports through the converted layers
    loaded = export_and_load(module.model, tmp_path / "compressed")
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_lm_head_can_be_targeted_explicitly(tmp_path):
    module = tiny_module()
    cb = QuantizationCallback(targets=["re:.*layers.*", "lm_head"])
    cb.prepare_model(None, module)
    assert isinstance(module.model.lm_head, QuantLinear) and len(cb.quantized_modules) == LLAMA_TARGETS + 1
    # still tied to the embedding, which stays float
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight


def test_with_nm_pruning_masks_stay_with_the_quantized_layers(tmp_path):
    module, prune = tiny_module(), SparsityCallback(n=2, m=4)
    quant = QuantizationCallback(bits=8)
    fit(tmp_path, quant, module, extra=[prune])  # listed after quant: prepared first all the same
    state = module.model.state_dict()
    for name, q in quant.quantized_modules.items():
        assert (
            f"{name}.weight_mask" in state and prune.layers[name] is q
        )  # the pruner acts on the layer that runs
        w = q.weight.detach()
        assert bool((w[~q.weight_mask] == 0).all()) and bool(
            ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
        )
        assert bool((q.weight_quantizer(w)[~q.weight_mask] == 0).all())  # fake-quant sees the masked weight


def test_gpt2_conv1d_with_pruning_masks_is_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"compress\.quant\.targets: transformer\.h\.0\.attn\.c_attn is a GPT-2 Conv1D carrying \['weight_mask'\]",
    ):
        fit(tmp_path, QuantizationCallback(), tiny_module("gpt2"), extra=[SparsityCallback()])


# --------------------------------------------------------------------------- static calibration


def test_static_calibration_once_on_train_data_matches_reference(tmp_path):
    train_loader, val_loader = token_loader(4, seed=1), token_loader(2, seed=2)
    # Reference: layer 0's q/k/v inputs do not depend on any quantized layer: max |input_layernorm(x)|
    # over the first 3 training batches, measured on the float model.
    reference_model, seen = tiny_module().model.eval(), []
    norm = reference_model.model.layers[0].input_layernorm
    norm.register_forward_hook(lambda _m, _a, out: seen.append(out.abs().max()))
    with torch.no_grad():
        for batch in list(train_loader)[:3]:
            reference_model(**batch)
    module = tiny_module()
    cb = QuantizationCallback(activations="static", calibration_batches=3)
    trainer = make_trainer(tmp_path, [cb], limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=1)
    trainer.fit(module, train_loader, val_loader)  # sanity check first: calibrates on train data
    amax = {n: q.input_quantizer.amax.clone() for n, q in cb.quantized_modules.items()}
    assert cb.state == {
        "calibrated": True, "calibration_batches": 3, "calibrated_at_step": 0, "gptq_done": False
    }  # fmt: skip
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(amax[f"model.layers.0.self_attn.{proj}"], torch.stack(seen).max())
    assert all(float(a) > 0 for a in amax.values())
    trainer.validate(module, val_loader, verbose=False)  # already calibrated: ranges unchanged
    assert all(torch.equal(q.input_quantizer.amax, amax[n]) for n, q in cb.quantized_modules.items())


def test_static_calibration_without_batches_raises(tmp_path):
    module = tiny_module()
    cb = QuantizationCallback(activations="static")
    cb.prepare_model(None, module)
    with pytest.raises(RuntimeError, match=r"compress\.quant\.activations='static': no batch"):
        cb.calibrate(None, module, [])


# --------------------------------------------------------------------------- resume


def _resume_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = QuantizationCallback(bits=4, method="lsq", activations="static", calibration_batches=2)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=6, enable_checkpointing=True)
    trainer.fit(module, token_loader(4), ckpt_path=ckpt_path)
    return module, cb


def test_crash_and_resume_matches_straight_run(tmp_path):
    straight, cb_straight = _resume_run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(tmp_path / "crashed", crash_at=5)
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # primitives only
    assert state["global_step"] == 4 and state["callbacks"]["QuantizationCallback"]["calibrated"] is True
    assert any(k.endswith("weight_quantizer.step") for k in state["state_dict"])
    resumed, cb_resumed = _resume_run(tmp_path / "crashed", ckpt_path=str(last))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and sum(k.endswith("input_quantizer.amax") for k in a) == LLAMA_TARGETS
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # calibrated once, before step 0, and not again after resuming; the shape fields ride along
    expected = {"calibrated": True, "calibration_batches": 2, "calibrated_at_step": 0, "gptq_done": False}
    assert (
        cb_resumed.state_dict()
        == cb_straight.state_dict()
        == {**expected, "_config": cb_straight.config.shape()}
    )
    assert state["callbacks"]["QuantizationCallback"]["_config"]["bits"] == 4


def test_resume_with_other_bits_fails_before_training(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, QuantizationCallback(bits=8), max_steps=2, extra=[ckpt], enable_checkpointing=True)
    module, probe = tiny_module(seed=1), TrainingStarted()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = make_trainer(tmp_path / "again", [QuantizationCallback(bits=4), probe], max_steps=4)
    with pytest.raises(
        ValueError,
        match=r"^compress\.quant\.bits: the checkpoint .*last\.ckpt was trained with 8, this run has 4",
    ):
        trainer.fit(module, token_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert probe.batches == 0  # no step ran
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items() if k in before)


# --------------------------------------------------------------------------- DDP


class RankAgreement(Callback):
    """After training, compares every tensor of the model and the callback state across ranks with
    one all_reduce max and one min; rank 0 writes the verdict (identical on every rank) to a file."""

    def __init__(self, cb: QuantizationCallback, out: str) -> None:
        self.cb, self.out = cb, out

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().double().flatten() for k, v in pl_module.model.state_dict().items()}
        state["callback"] = torch.tensor(
            [float(self.cb.state["calibrated"]), self.cb.state["calibration_batches"]]
        )
        differ = keys_differing_across_ranks(trainer, state)
        if trainer.is_global_zero:
            amax = [float(q.input_quantizer.amax) for q in self.cb.quantized_modules.values()]
            verdict = {"differ": differ, "keys": len(state), "amax": amax, "world": trainer.world_size}
            Path(self.out).write_text(json.dumps({**verdict, "state": self.cb.state}))


def test_ddp_spawn_two_ranks_agree(tmp_path):
    cb = QuantizationCallback(bits=4, method="lsq", activations="static", calibration_batches=2)
    out = tmp_path / "verdict.json"
    trainer = make_trainer(
        tmp_path, [cb, RankAgreement(cb, str(out))], strategy="ddp_spawn", devices=2, max_steps=2
    )
    trainer.fit(tiny_module(), token_loader(8))  # each rank trains and calibrates on its own batches
    verdict = json.loads(out.read_text())
    assert verdict["world"] == 2 and verdict["keys"] > 3 * LLAMA_TARGETS
    assert verdict["differ"] == []
    assert len(verdict["amax"]) == LLAMA_TARGETS and min(verdict["amax"]) > 0
    assert verdict["state"]["calibrated"] and verdict["state"]["calibration_batches"] == 2


# --------------------------------------------------------------------------- GPTQ init


class AtFirstBatch(Callback):
    """Records ``probe(pl_module)`` when the first training batch starts, after the compression
    callbacks' own ``on_train_batch_start`` (list it after them: they keep their slots)."""

    def __init__(self, probe) -> None:
        self.probe, self.result = probe, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.result is None:
            self.result = self.probe(pl_module)


def _logits(network, loader):
    with torch.no_grad():
        return torch.cat([network.eval()(input_ids=b["input_ids"]).logits for b in loader])


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_gptq_init_lowers_the_logit_error_of_4_bit_weights(tmp_path, granularity):
    loader = token_loader(4)
    dense = _logits(tiny_module().model, loader)
    errors = {}
    for init in ("none", "gptq"):
        options = {"granularity": granularity, "group_size": 16, "activations": "none"}
        cb = QuantizationCallback(bits=4, init=init, calibration_batches=4, **options)
        probe = AtFirstBatch(lambda m: _logits(m.model, loader))
        fit(tmp_path / init, cb, loader=loader, extra=[probe], max_steps=1)
        errors[init] = float((probe.result - dense).pow(2).mean())
        assert cb.state["gptq_done"] is (init == "gptq")
    assert errors["gptq"] < 0.8 * errors["none"], errors


def test_gptq_with_calibration_batches_0_names_the_key():
    with pytest.raises(ValueError, match=r"^compress\.quant\.calibration_batches: must lie in \[1, inf\]"):
        QuantizationCallback(init="gptq", calibration_batches=0)


def test_gptq_then_static_calibration_on_the_gptq_weights(tmp_path):
    cb = QuantizationCallback(bits=4, init="gptq", activations="static", calibration_batches=2)
    snapshot = AtFirstBatch(lambda m: copy.deepcopy(m))
    module, _ = fit(tmp_path, cb, extra=[snapshot], max_steps=1)
    at_step_0 = snapshot.result  # after GPTQ and the calibration, before the first optimizer step
    amax = {n: float(q.input_quantizer.amax) for n, q in cb.quantized_modules.items()}
    # reference: the ranges measured again on that model, same first 2 training batches
    reference = QuantizationCallback(bits=4, activations="static", calibration_batches=2)
    reference.prepare_model(None, at_step_0)
    reference.calibrate(None, at_step_0, list(token_loader())[:2])
    expected = {n: float(q.input_quantizer.amax) for n, q in reference.quantized_modules.items()}
    assert amax == expected and min(amax.values()) > 0
    assert cb.state["gptq_done"] and cb.state["calibrated"] and cb.state["calibrated_at_step"] == 0


def test_sparsegpt_prunes_before_gptq_quantizes(tmp_path):
    prune = SparsityCallback(n=2, m=4, criterion="sparsegpt", calibration_batches=2)
    quant = QuantizationCallback(bits=4, init="gptq", activations="none", calibration_batches=2)
    weights = AtFirstBatch(
        lambda m: {
            n: (q.weight.detach().clone(), q.weight_mask.clone()) for n, q in quant.quantized_modules.items()
        }
    )
    fit(tmp_path, quant, extra=[prune, weights], max_steps=1)  # listed after quant: runs first anyway
    assert prune.state["masks_computed"] and quant.state["gptq_done"]
    for name, (w, mask) in weights.result.items():
        layer = quant.quantized_modules[name]
        assert not bool(mask.all()) and bool((mask.reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
        assert bool((w[~mask] == 0).all()), name  # pruned weights exactly zero
        assert torch.equal(layer.weight_quantizer(w), w), name  # the rest on the 4-bit grid


def _gptq_resume_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = QuantizationCallback(bits=4, method="lsq", init="gptq", calibration_batches=2)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=4, enable_checkpointing=True)
    trainer.fit(module, token_loader(2), ckpt_path=ckpt_path)  # checkpoint at step 2 = an epoch end
    return module, cb


def test_gptq_resume_does_not_rerun_the_one_shot(tmp_path):
    straight, cb_straight = _gptq_resume_run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _gptq_resume_run(tmp_path / "crashed", crash_at=3)
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 2 and state["callbacks"]["QuantizationCallback"]["gptq_done"] is True
    resumed, cb_resumed = _gptq_resume_run(tmp_path / "crashed", ckpt_path=str(last))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cb_resumed.state == cb_straight.state and cb_resumed.state["gptq_done"]


def test_gptq_ddp_spawn_two_ranks_agree(tmp_path):
    cb = QuantizationCallback(bits=4, method="lsq", init="gptq", activations="static", calibration_batches=2)
    out = tmp_path / "verdict.json"
    trainer = make_trainer(
        tmp_path, [cb, RankAgreement(cb, str(out))], strategy="ddp_spawn", devices=2, max_steps=1
    )
    trainer.fit(tiny_module(), token_loader(8))  # each rank calibrates on its own batches
    verdict = json.loads(out.read_text())
    assert verdict["world"] == 2 and verdict["differ"] == [] and verdict["state"]["gptq_done"]


# --------------------------------------------------------------------------- misconfiguration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 5}, r"compress\.quant\.bits: got 5; allowed: 2, 3, 4, 8"),
        ({"bits": True}, r"compress\.quant\.bits: got True"),
        (
            {"granularity": "row"},
            r"compress\.quant\.granularity: got 'row'; allowed: 'tensor', 'channel', 'group'",
        ),
        (
            {"method": "minmax"},
            r"compress\.quant\.method: got 'minmax'; allowed: 'absmax', 'pact', 'lsq', 'dynamic'",
        ),
        (
            {"activations": "per_token"},
            r"compress\.quant\.activations: got 'per_token'; allowed: 'dynamic', 'static', 'none'",
        ),
        ({"act_bits": 16}, r"compress\.quant\.act_bits: got 16; allowed: 2, 3, 4, 8"),
        ({"symmetric": "yes"}, r"compress\.quant\.symmetric: got 'yes'; allowed: True, False"),
        ({"method": "dynamic", "symmetric": False}, r"compress\.quant\.symmetric: method 'dynamic'"),
        ({"group_size": 0}, r"compress\.quant\.group_size: must lie in \[1, inf\], got 0"),
        ({"group_size": 1.5}, r"compress\.quant\.group_size: must be an integer"),
        ({"calibration_batches": 0}, r"compress\.quant\.calibration_batches: must lie in \[1, inf\]"),
        ({"export_dir": "quantized"}, r"compress\.quant\.export_dir: unknown key; allowed: bits, "),
        ({"bits": 5, "name": "q4"}, r"compress\.q4\.bits"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}") as err:
        QuantizationCallback(**kwargs)
    key = f"compress.{kwargs.get('name', 'quant')}."
    assert str(err.value).count(key) == 1  # the prefix exactly once


def test_config_object_or_options_not_both():
    cb = QuantizationCallback(QuantConfig(bits=4), name="q4")
    assert cb.config.bits == 4 and cb.config_key == "compress.q4"
    with pytest.raises(ValueError, match=r"^compress\.quant\.bits: given both in config= and as an option"):
        QuantizationCallback(QuantConfig(), bits=4)
    with pytest.raises(TypeError, match=r"^compress\.quant\.config: must be a QuantConfig, got int"):
        QuantizationCallback(8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ["*.nothing"]}, r"compress\.quant\.targets: pattern '\*\.nothing' matches no module"),
        ({"exclude": ["*"]}, r"compress\.quant\.exclude: .* removes every module"),
        (
            {"targets": ["model.embed_tokens"]},
            r"compress\.quant\.targets: model\.embed_tokens is an embedding \(Embedding\)",
        ),
        (
            {"granularity": "group", "group_size": 48},
            r"compress\.quant\.group_size: model\.layers\.0\.self_attn\.q_proj has 32 input features, "
            r"not divisible by group_size=48",
        ),
    ],
)
def test_setup_errors_name_the_key(tmp_path, kwargs, match):
    module = tiny_module()
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, QuantizationCallback(**kwargs), module)
    assert not any(isinstance(m, QuantLinear) for m in module.modules())  # nothing half-swapped


def test_model_quantized_twice_with_other_settings_is_refused():
    module = tiny_module()
    QuantizationCallback(bits=8).prepare_model(None, module)
    QuantizationCallback(bits=8).prepare_model(None, module)  # same settings: kept as is
    with pytest.raises(
        ValueError, match=r"compress\.quant\.targets: .* already quantized with other settings"
    ):
        QuantizationCallback(bits=4).prepare_model(None, module)


# --------------------------------------------------------------------------- where the network lives


@pytest.mark.parametrize("network", [None, "backbone"])
def test_network_stored_as_backbone(tmp_path, network):
    module = BackboneModule()
    cb = QuantizationCallback(bits=4, network=network)
    fit(tmp_path, cb, module, max_steps=2)
    assert len(cb.quantized_modules) == LLAMA_TARGETS and module.steps_seen == 2
    assert all(module.backbone.get_submodule(n) is q for n, q in cb.quantized_modules.items())


def test_two_pretrained_models_and_no_model_attribute_fail_in_setup(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^compress\.quant\.network: BackboneModule holds several pretrained "
        r"models \(backbone, reference\) and no \.model; say which one with network=",
    ):
        fit(tmp_path, QuantizationCallback(), BackboneModule(second=True), max_steps=1)
    module = BackboneModule(second=True)
    fit(tmp_path / "ok", QuantizationCallback(network="reference"), module, max_steps=1)
    assert isinstance(module.reference.model.layers[0].mlp.up_proj, QuantLinear)
    assert type(module.backbone.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_unknown_network_names_the_key_and_the_children(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^compress\.quant\.network: BackboneModule has no submodule 'nope' \(its children: backbone\)",
    ):
        fit(tmp_path, QuantizationCallback(network="nope"), BackboneModule(), max_steps=1)


class AfterEveryStep(Callback):
    """After every real optimizer step: weights the masks drop are zero, and the quantized layers'
    forward still multiplies by a weight on the ``bits`` grid (at most 2**bits - 1 values per row)."""

    def __init__(self, quant: QuantizationCallback, prune: SparsityCallback) -> None:
        self.quant, self.prune, self.checks = quant, prune, []

    def on_fit_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(lambda *_: self.checks.append(self._check()))

    def _check(self) -> bool:
        ok = True
        for q in self.quant.quantized_modules.values():
            w = q.weight_quantizer(q.weight).detach()
            levels = max(len(row.unique()) for row in w)
            ok &= isinstance(q, QuantLinear) and levels <= 2**self.quant.config.bits - 1
            ok &= bool((q.weight[~q.weight_mask] == 0).all()) and bool((w[~q.weight_mask] == 0).all())
        return ok


def test_manual_optimization_keeps_masks_and_fake_quant(tmp_path):
    module = BackboneModule(manual=True)
    quant, prune = QuantizationCallback(bits=4, method="lsq"), SparsityCallback()
    probe = AfterEveryStep(quant, prune)
    trainer = fit(tmp_path, quant, module, extra=[prune, probe], max_steps=3)[1]
    assert trainer.global_step == 3 and probe.checks == [True] * 3
    x = torch.randn(2, 32)
    q = module.backbone.model.layers[0].mlp.up_proj
    torch.testing.assert_close(q(x), F.linear(q.input_quantizer(x), q.weight_quantizer(q.weight), q.bias))


# --------------------------------------------------------------------------- the app


def test_app_quant_run_exports_a_loadable_int8_model(compose):
    from lightcook.export import load_compressed

    trim = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "validate_before=false", "save_model=false"]
    summary = train(compose("model=tiny_llama", "trainer=fast", "report=fast", "+compress=[quant]", *trim))
    export = Path(summary["exports"]["compressed"])
    assert export == Path(summary["run_dir"]) / "compressed" and summary["train_steps"] == 2
    on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert on_disk["exports"] == {"compressed": str(export)}  # no per-callback export any more
    manifest = json.loads((export / "lightcook.json").read_text())
    assert manifest["techniques"] == ["quantized"] and len(manifest["quantized"]) == LLAMA_TARGETS
    assert {layer["format"] for layer in manifest["quantized"].values()} == {"int8"}
    assert manifest["weight_bytes"] < 0.27 * manifest["fp32_weight_bytes"]
    model = load_compressed(export, backend="reference")
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == LLAMA_TARGETS
    fast = load_compressed(export)  # the default: the fastest kernels here, bfloat16 around them
    assert len(fast.quantized_kernels) == LLAMA_TARGETS and fast.inference_backend in (
        "dispatch",
        "reference",
    )
    assert fast.inference_backend == "reference" or set(fast.quantized_kernels.values()) == {
        "int8pack|int_mm"
    }
    ids = torch.randint(0, 49152, (2, 32))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 32, 49152) and bool(torch.isfinite(logits).all())
    ckpt = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["QuantizationCallback"]["_config"]["bits"] == 8


def test_static_calibration_outside_fit_uses_the_datamodules_training_data(tmp_path):
    """trainer.validate(datamodule=dm) calibrates on dm's training batches, not on what it then measures."""
    import lightning as L

    class Recording(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.built: list[str] = []

        def train_dataloader(self):
            self.built.append("train")
            return token_loader(batches=2, seed=1)

        def val_dataloader(self):
            self.built.append("val")
            return token_loader(batches=2, seed=2)

    data, cb = Recording(), QuantizationCallback(activations="static", calibration_batches=2)
    make_trainer(tmp_path, [cb], limit_val_batches=2).validate(tiny_module(), datamodule=data)
    assert cb.state["calibrated"] and cb.state["calibration_batches"] == 2
    assert data.built == ["val", "train"]  # the validation loop's data, then the calibration's
