"""SparsityCallback in real Lightning runs: masks, enforcement after every optimizer step, schedules,
Wanda against a reference computed here, SR-STE, resume (and the resume guard), DDP, a network stored
elsewhere, misconfiguration, the compressed export of the trained network, and the Hydra app."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.modules import CausalLMModule
from lightcook.ops.sparsity import InputNormAccumulator, NMConfig, as_out_in, is_nm, nm_mask, wanda_scores
from tests.helpers import CountPasses, CrashAt, make_trainer, token_loader
from tests.helpers.quant_sparsity import (
    LLAMA_TARGETS,
    TINY,
    BackboneModule,
    TrainingStarted,
    export_and_load,
)
from tests.helpers.quant_sparsity import tiny_module as _tiny_module


def tiny_module(kind: str = "llama", seed: int = 0, **config) -> CausalLMModule:
    """Llama untied (its default): the LM head is a Linear of its own."""
    untied = {"tie_word_embeddings": False} if kind == "llama" else {}
    return _tiny_module(kind, seed, **{**untied, **config})


def masked_out_is_zero(cb: SparsityCallback) -> bool:
    """Every weight the masks drop is exactly zero (the effective weight under SR-STE)."""
    return all(bool((mod.weight[~mod.weight_mask] == 0).all()) for mod in cb.layers.values())


def weights_nm(cb: SparsityCallback, n: int = 2, m: int = 4) -> bool:
    """Every targeted weight keeps at most n nonzeros per group of m inputs."""
    for mod in cb.layers.values():
        w = as_out_in(mod.weight.detach(), mod)
        if not bool(((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all()):
            return False
    return True


class StepProbe(Callback):
    """Checks the invariant right after every real optimizer step (hooks registered after the
    sparsity callback's, so they run after it) and at every batch end."""

    def __init__(self, cb: SparsityCallback) -> None:
        self.cb = cb
        self.after_step: list[tuple[int, bool]] = []
        self.batch_end: list[tuple[int, bool, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for opt in trainer.optimizers:
            opt.register_step_post_hook(lambda *_: self._record(trainer))

    def _record(self, trainer) -> None:
        self.after_step.append((trainer.global_step, masked_out_is_zero(self.cb)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch_end.append((trainer.global_step, masked_out_is_zero(self.cb), self.cb.sparsity_now()))


def fit(root: Path, cb: SparsityCallback, module=None, loader=None, extra=(), max_steps=4, **trainer_kwargs):
    module = module or tiny_module()
    probe = StepProbe(cb)
    trainer = make_trainer(root, [cb, probe, *extra], max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, loader or token_loader())
    return module, trainer, probe


# --------------------------------------------------------------------------- structure


def test_masks_are_buffers_on_block_linears_only(tmp_path):
    module, _, _ = fit(tmp_path, SparsityCallback(start_step=100), max_steps=1)
    keys = [k for k in module.model.state_dict() if k.endswith("weight_mask")]
    assert len(keys) == LLAMA_TARGETS
    assert all(".layers." in k for k in keys)
    assert not hasattr(module.model.lm_head, "weight_mask")
    assert not hasattr(module.model.model.embed_tokens, "weight_mask")
    assert all(bool(module.model.get_submodule(k.rsplit(".", 1)[0]).weight_mask.all()) for k in keys)


# --------------------------------------------------------------------------- enforcement


def test_one_shot_2to4_holds_with_accumulation_and_bf16(tmp_path):
    cb = SparsityCallback(n=2, m=4)
    before = {k: v.clone() for k, v in tiny_module().model.state_dict().items()}
    module, trainer, probe = fit(
        tmp_path, cb, max_steps=3, accumulate_grad_batches=2, precision="bf16-mixed", loader=token_loader(6)
    )
    assert trainer.global_step == 3
    assert len(probe.after_step) == 3 and all(ok for _, ok in probe.after_step)
    assert all(ok for _, ok, _ in probe.batch_end)
    assert all(is_nm(as_out_in(mod.weight_mask, mod), 2, 4) for mod in cb.layers.values())
    assert weights_nm(cb)
    name = "model.layers.0.mlp.up_proj"
    kept = module.model.get_submodule(name).weight_mask
    assert not torch.equal(module.model.state_dict()[f"{name}.weight"][kept], before[f"{name}.weight"][kept])
    assert cb.state["sparsity"] == pytest.approx(0.5)


def test_masks_appear_at_start_step(tmp_path):
    cb = SparsityCallback(start_step=3)
    _, _, probe = fit(tmp_path, cb, max_steps=5, loader=token_loader(5))
    sparsity_after = {step: s for step, _, s in probe.batch_end}  # step = global_step after the batch
    assert sparsity_after == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.5, 5: 0.5}
    assert cb.state["last_update_step"] == 3


class InfAtBatch(CausalLMModule):
    """Returns an infinite loss at one batch, so the fp16 GradScaler skips that optimizer step."""

    def __init__(self, bad_batch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_batch = bad_batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if batch_idx == self.bad_batch else loss


def test_fp16_scaler_skipped_step_keeps_masks(tmp_path):
    torch.manual_seed(0)
    module = InfAtBatch(
        bad_batch=2, config={**TINY["llama"], "tie_word_embeddings": False}, tokenizer=None, lr=1e-2
    )
    cb = SparsityCallback(start_step=2)  # masks computed right before the step the scaler skips
    plugin = MixedPrecision("16-mixed", "cpu")
    _, trainer, probe = fit(tmp_path, cb, module=module, plugins=[plugin], max_steps=4)
    assert plugin.scaler.get_scale() < 2.0**16  # the scaler saw inf and backed off
    assert [s for s, _ in probe.after_step] == [0, 1, 3]  # step 2 never reached optimizer.step
    assert trainer.global_step == 4
    assert all(ok for _, ok, _ in probe.batch_end) and weights_nm(cb)


class TwoOptimizers(CausalLMModule):
    """Manual optimization: attention weights and everything else stepped by separate optimizers."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def configure_optimizers(self):
        attn = [p for n, p in self.named_parameters() if "self_attn" in n]
        rest = [p for n, p in self.named_parameters() if "self_attn" not in n]
        return torch.optim.AdamW(attn, lr=1e-2), torch.optim.SGD(rest, lr=1e-1)

    def training_step(self, batch, batch_idx):
        opt_attn, opt_rest = self.optimizers()
        loss, _ = self.compute_loss(batch)
        self.manual_backward(loss)
        opt_attn.step()
        opt_rest.step()
        opt_attn.zero_grad()
        opt_rest.zero_grad()
        return loss


def test_manual_optimization_with_two_optimizers(tmp_path):
    torch.manual_seed(0)
    module = TwoOptimizers(config={**TINY["llama"], "tie_word_embeddings": False}, tokenizer=None)
    cb = SparsityCallback(start_step=2)
    _, trainer, probe = fit(tmp_path, cb, module=module, max_steps=8)
    assert trainer.global_step == 8  # two optimizer steps per batch
    assert len(probe.after_step) == 8 and all(ok for _, ok in probe.after_step)
    assert [s for _, _, s in probe.batch_end] == [0.0, 0.5, 0.5, 0.5]
    assert weights_nm(cb)


# --------------------------------------------------------------------------- patterns and criteria


def test_gpt2_conv1d_masks_run_along_inputs(tmp_path):
    module = tiny_module("gpt2")
    cb = SparsityCallback(n=2, m=4)
    fit(tmp_path, cb, module=module, max_steps=2)
    c_fc = module.model.transformer.h[0].mlp.c_fc  # Conv1D, weight (in=32, out=128)
    assert type(c_fc).__name__ == "Conv1D" and c_fc.weight.shape == (32, 128)
    assert is_nm(c_fc.weight_mask.T, 2, 4) and not is_nm(c_fc.weight_mask, 2, 4)
    assert len(cb.layers) == 2 * 4 and weights_nm(cb)


def test_transposable_2d_masks(tmp_path):
    cb = SparsityCallback(pattern="2d")
    fit(tmp_path, cb, max_steps=2)
    for mod in cb.layers.values():
        assert is_nm(mod.weight_mask, 2, 4) and is_nm(mod.weight_mask.T, 2, 4)
    assert weights_nm(cb) and masked_out_is_zero(cb)


def reference_wanda_masks(
    module: CausalLMModule, loader: DataLoader, batches: int
) -> dict[str, torch.Tensor]:
    """Wanda 2:4 masks computed independently: our own hooks over the first batches, eval mode."""
    linears = {
        n: m for n, m in module.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    }
    accs = {n: InputNormAccumulator(m.in_features) for n, m in linears.items()}
    hooks = [
        m.register_forward_hook(lambda _m, a, _o, acc=accs[n]: acc.add(a[0])) for n, m in linears.items()
    ]
    module.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == batches:
                break
            module.model(**batch)
    for h in hooks:
        h.remove()
    return {n: nm_mask(wanda_scores(m.weight, accs[n].sq_norm), 2, 4) for n, m in linears.items()}


def test_wanda_matches_reference_and_differs_from_magnitude(tmp_path):
    loader = token_loader(4)
    reference = reference_wanda_masks(tiny_module(), loader, batches=3)
    cb = SparsityCallback(criterion="wanda", calibration_batches=3)
    module, _, _ = fit(tmp_path, cb, loader=loader, max_steps=1)
    got = {n: module.model.get_submodule(n).weight_mask for n in reference}
    assert all(torch.equal(got[n], reference[n]) for n in reference)
    magnitude = {
        n: nm_mask(m.weight.abs(), 2, 4) for n, m in tiny_module().model.named_modules() if n in reference
    }
    assert any(not torch.equal(got[n], magnitude[n]) for n in reference)
    assert module.training  # calibration restored train mode


def test_gradual_ramp_reaches_2to4_at_end_step(tmp_path):
    cb = SparsityCallback(start_step=1, end_step=5, ramp_every=2)
    _, _, probe = fit(tmp_path, cb, max_steps=6, loader=token_loader(6))
    sparsity_after = [round(s, 6) for _, _, s in probe.batch_end]
    # updates at steps 1 (fraction 0), 3 (0.5 of the drops), 5 (full 2:4)
    assert sparsity_after == [0.0, 0.0, 0.0, 0.25, 0.25, 0.5]
    assert all(ok for _, ok, _ in probe.batch_end) and cb.complete and weights_nm(cb)


def test_ramp_completed_by_last_step_is_applied_at_train_end(tmp_path):
    cb = SparsityCallback(start_step=0, end_step=4, ramp_every=2)
    fit(tmp_path, cb, max_steps=4)  # step 4 never starts a batch; the full pattern is applied at the end
    assert cb.complete and cb.state["update"] == "final:0" and weights_nm(cb)


def test_unfinished_ramp_warns_and_the_trained_network_exports_packed(tmp_path):
    unfinished = SparsityCallback(start_step=0, end_step=10)
    with pytest.warns(
        UserWarning,
        match=r"compress\.prune: the full sparsity pattern was not reached by step 2 .*drop 5\.0%",
    ):
        fit(tmp_path, unfinished, max_steps=2)
    assert unfinished.summary()["complete"] is False
    done = SparsityCallback()
    module, _, _ = fit(tmp_path / "done", done, max_steps=2)
    assert done.summary()["complete"] is True and done.summary()["reached_sparsity"] == pytest.approx(0.5)
    loaded = export_and_load(
        module.model, tmp_path / "compressed", **done.export_options(), dtype=torch.bfloat16
    )
    manifest = json.loads((tmp_path / "compressed" / "lightcook.json").read_text())
    assert manifest["dtype"] == "bfloat16" and "nm" in manifest["techniques"]
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        want = module.model.eval().to(torch.bfloat16)(ids).logits.float()
        torch.testing.assert_close(loaded(ids).logits.float(), want, atol=0.1, rtol=0.05)


def test_unstructured_layer_and_global(tmp_path):
    layer = SparsityCallback(mode="unstructured", sparsity=0.3, name="unstructured")
    fit(tmp_path, layer, max_steps=2)
    for mod in layer.layers.values():
        assert int((~mod.weight_mask).sum()) == round(0.3 * mod.weight.numel())
    assert masked_out_is_zero(layer)
    glob = SparsityCallback(mode="unstructured", sparsity=0.3, scope="global", name="unstructured")
    fit(tmp_path / "g", glob, max_steps=2)
    masks = [mod.weight_mask for mod in glob.layers.values()]
    total = sum(mk.numel() for mk in masks)
    assert sum(int((~mk).sum()) for mk in masks) == round(0.3 * total)
    assert len({round(float((~mk).float().mean()), 3) for mk in masks}) > 1  # layers pruned unequally
    assert masked_out_is_zero(glob)


def test_sr_ste_keeps_dense_weights_learning_and_folds_at_fit_end(tmp_path):
    cb = SparsityCallback(sr_ste_decay=2e-4, recompute_every=1)
    seen: dict[str, object] = {}

    class Peek(Callback):
        def on_train_end(self, trainer, pl_module):
            q = pl_module.model.model.layers[0].self_attn.q_proj
            seen["parametrized"] = parametrize.is_parametrized(q, "weight")
            seen["dense_nonzero_pruned"] = bool(
                (q.parametrizations.weight.original[~q.weight_mask] != 0).any()
            )
            seen["effective_masked"] = masked_out_is_zero(cb)

    module, _, probe = fit(tmp_path, cb, max_steps=3, extra=[Peek()])
    assert seen == {"parametrized": True, "dense_nonzero_pruned": True, "effective_masked": True}
    assert all(ok for _, ok in probe.after_step)
    assert not any("parametrizations" in k for k in module.model.state_dict())
    assert weights_nm(cb) and masked_out_is_zero(cb)


# --------------------------------------------------------------------------- resume and DDP


def _resume_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = SparsityCallback(  # SR-STE: pruned weights keep learning, so a mask recomputed late would differ
        criterion="wanda",
        calibration_batches=2,
        start_step=1,
        end_step=5,
        ramp_every=2,
        recompute_every=2,
        sr_ste_decay=1e-3,
    )
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=8, enable_checkpointing=True)
    trainer.fit(module, token_loader(4), ckpt_path=ckpt_path)
    return module, cb


def test_crash_and_resume_matches_straight_run(tmp_path):
    straight, cb_straight = _resume_run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(tmp_path / "crashed", crash_at=4)
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4 and state["callbacks"]["SparsityCallback"]["update"] == "ramp:1"
    assert any("parametrizations.weight.original" in k for k in state["state_dict"])
    resumed, cb_resumed = _resume_run(tmp_path / "crashed", ckpt_path=str(last))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("weight_mask") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cb_resumed.state_dict() == cb_straight.state_dict()
    assert cb_straight.state["update"] == "final:1" and weights_nm(cb_resumed)


def test_resume_with_other_n_fails_before_training(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, SparsityCallback(n=2, m=4), max_steps=2, extra=[ckpt], enable_checkpointing=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["callbacks"]["SparsityCallback"]["_config"]["n"] == 2
    module, started = tiny_module(seed=1), TrainingStarted()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = make_trainer(tmp_path / "again", [SparsityCallback(n=1, m=4), started], max_steps=4)
    with pytest.raises(
        ValueError,
        match=r"^compress\.prune\.n: the checkpoint .*last\.ckpt was trained with 2, this run has 1",
    ):
        trainer.fit(module, token_loader(), ckpt_path=str(last))
    assert started.batches == 0 and trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items() if k in before)


class DumpPerRank(Callback):
    """Each DDP rank saves its model state (masks included) after training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_two_ranks_agree(tmp_path):
    cb = SparsityCallback(criterion="wanda", calibration_batches=2, start_step=1, recompute_every=2)
    trainer = make_trainer(
        tmp_path, [cb, DumpPerRank(str(tmp_path))], strategy="ddp_spawn", devices=2, max_steps=4
    )
    trainer.fit(tiny_module(), token_loader(8))  # each rank sees its own half of the batches
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    masks = [k for k in ranks[0] if k.endswith("weight_mask")]
    assert len(masks) == LLAMA_TARGETS and not all(bool(ranks[0][k].all()) for k in masks)
    assert [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])] == []
    for k in masks:
        assert is_nm(ranks[0][k], 2, 4)
        assert bool((ranks[0][k.replace("weight_mask", "weight")][~ranks[0][k]] == 0).all())


# --------------------------------------------------------------------------- misconfiguration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "blocks"}, r"compress\.prune\.mode: got 'blocks'; allowed: 'nm', 'unstructured'"),
        ({"pattern": "3d"}, r"compress\.prune\.pattern: .*allowed: '1d', '2d'"),
        ({"scope": "model"}, r"compress\.prune\.scope: .*allowed: 'layer', 'global'"),
        ({"criterion": "taylor"}, r"compress\.prune\.criterion: .*allowed: 'magnitude', 'wanda'"),
        ({"calibration_batches": 0}, r"compress\.prune\.calibration_batches: must lie in \[1, inf\]"),
        ({"n": 4, "m": 4}, r"compress\.prune\.n: N:M needs integers 1 <= n < m"),
        ({"n": 2, "m": 4.0}, r"compress\.prune\.n: N:M needs integers 1 <= n < m, got n=2, m=4\.0"),
        ({"pattern": "2d", "n": 4, "m": 8}, r"compress\.prune\.m: pattern '2d' supports m <= 4"),
        ({"sparsity": 0.5}, r"compress\.prune\.sparsity: applies to mode='unstructured'"),
        ({"scope": "global"}, r"compress\.prune\.scope: .*allowed: 'layer'"),
        ({"mode": "unstructured", "sparsity": 1.0}, r"compress\.prune\.sparsity: must lie in \[0, 1\)"),
        ({"mode": "unstructured", "sparsity": "half"}, r"compress\.prune\.sparsity: must be a number"),
        ({"mode": "unstructured", "pattern": "2d"}, r"compress\.prune\.pattern: '2d'"),
        ({"start_step": -1}, r"compress\.prune\.start_step: must lie in \[0, inf\]"),
        ({"start_step": 5, "end_step": 2}, r"compress\.prune\.end_step: .*>= start_step \(5\)"),
        ({"end_step": "10"}, r"compress\.prune\.end_step: must be an integer"),
        ({"ramp_every": 0}, r"compress\.prune\.ramp_every"),
        ({"recompute_every": -1}, r"compress\.prune\.recompute_every"),
        ({"sr_ste_decay": -0.1}, r"compress\.prune\.sr_ste_decay: must lie in \[0"),
        ({"export_dir": "sparse"}, r"compress\.prune\.export_dir: unknown key; allowed: mode, n, m"),
        (
            {"mode": "unstructured", "name": "unstructured", "sparsity": -0.1},
            r"compress\.unstructured\.sparsity",
        ),
    ],
)
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}") as err:
        SparsityCallback(**kwargs)
    key = f"compress.{kwargs.get('name', 'prune')}."
    assert str(err.value).count(key) == 1  # the prefix exactly once


def test_config_object_or_options_not_both():
    cb = SparsityCallback(NMConfig(mode="unstructured", sparsity=0.3), name="unstructured")
    assert cb.config.sparsity == 0.3 and cb.export_options() == {}
    with pytest.raises(ValueError, match=r"^compress\.prune\.n: given both in config= and as an option"):
        SparsityCallback(NMConfig(), n=1)


@pytest.mark.parametrize(
    ("cb_kwargs", "config", "match"),
    [
        (
            {"targets": ["*.nothing"]},
            {},
            r"compress\.prune\.targets: pattern '\*\.nothing' matches no module",
        ),
        ({"exclude": ["*"]}, {}, r"compress\.prune\.exclude: .* removes every module"),
        (
            {"n": 1, "m": 3},
            {},
            r"compress\.prune\.m: model\.layers\.0\.self_attn\.q_proj has 32 input features",
        ),
        (
            {"pattern": "2d"},
            {"intermediate_size": 34},
            r"compress\.prune\.m: .*gate_proj has 34 output features",
        ),
    ],
)
def test_setup_errors_name_the_key(tmp_path, cb_kwargs, config, match):
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, SparsityCallback(**cb_kwargs), module=tiny_module(**config), max_steps=1)


def test_two_sparsity_callbacks_on_one_layer_raise(tmp_path):
    prune, unstructured = SparsityCallback(), SparsityCallback(mode="unstructured", name="unstructured")
    with pytest.raises(
        ValueError, match=r"compress\.unstructured\.targets: .* already pruned by compress\.prune"
    ):
        make_trainer(tmp_path, [prune, unstructured], max_steps=4).fit(tiny_module(), token_loader())
    attn_only = SparsityCallback(mode="unstructured", name="unstructured", targets=["*.self_attn.*"])
    mlp_only = SparsityCallback(targets=["*.mlp.*"])
    fit(tmp_path / "ok", mlp_only, extra=[attn_only], max_steps=2)
    assert weights_nm(mlp_only) and masked_out_is_zero(attn_only) and len(attn_only.layers) == 8


def test_wanda_without_training_batches_raises(tmp_path):
    module = tiny_module()
    cb = SparsityCallback(criterion="wanda")
    cb.setup(make_trainer(tmp_path, [cb], max_steps=4), module, "validate")
    with pytest.raises(RuntimeError, match=r"compress\.prune\.criterion='wanda': needs training batches"):
        cb.compute_masks(module)
    with pytest.raises(RuntimeError, match=r"compress\.prune\.criterion='wanda': no calibration batch"):
        cb.compute_masks(module, batches=[])


# --------------------------------------------------------------------------- the app


def test_app_prune_run_exports_2to4(tmp_path):
    from lightcook.app import compose_config, train
    from lightcook.export import load_compressed

    cfg = compose_config(
        [
            "model=tiny_llama",
            "trainer=fast",
            "report=fast",
            "+compress=[prune]",
            f"paths.output_dir={tmp_path}",
            "callbacks=none",
            "logger=csv",
            "data.block_size=32",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
        ]
    )
    assert cfg.compress.prune._target_ == "lightcook.callbacks.sparsity.SparsityCallback"
    summary = train(cfg)
    export = Path(summary["exports"]["compressed"])
    assert (
        export.is_dir() and export.parent == Path(summary["run_dir"]) and "sparse" not in summary["exports"]
    )
    model = load_compressed(export)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(layers) == LLAMA_TARGETS
    for name in layers:
        w = model.get_submodule(name).weight
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), name


# --------------------------------------------------------------------------- where the network lives


@pytest.mark.parametrize("network", [None, "backbone"])
def test_network_stored_as_backbone(tmp_path, network):
    module = BackboneModule()
    cb = SparsityCallback(network=network)
    fit(tmp_path, cb, module=module, max_steps=2)
    assert len(cb.layers) == LLAMA_TARGETS and module.steps_seen == 2 and weights_nm(cb)
    assert all(module.backbone.get_submodule(n) is layer for n, layer in cb.layers.items())


def test_two_pretrained_models_and_no_model_attribute_fail_in_setup(tmp_path):
    with pytest.raises(
        ValueError, match=r"^compress\.prune\.network: .*several pretrained models .*network="
    ):
        fit(tmp_path, SparsityCallback(), module=BackboneModule(second=True), max_steps=1)


def test_unknown_network_names_the_key_and_the_children(tmp_path):
    with pytest.raises(
        ValueError, match=r"^compress\.prune\.network: .*no submodule 'nope' \(its children: backbone\)"
    ):
        fit(tmp_path, SparsityCallback(network="nope"), module=BackboneModule(), max_steps=1)


def test_manual_optimization_of_a_user_module(tmp_path):
    module = BackboneModule(manual=True)
    cb = SparsityCallback(start_step=1)
    _, trainer, probe = fit(tmp_path, cb, module=module, max_steps=3)
    assert trainer.global_step == 3 and [ok for _, ok in probe.after_step] == [True] * 3
    assert weights_nm(cb) and cb.state["sparsity"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- SparseGPT one-shot


def _one_shot(criterion: str, module=None, kind: str = "llama", **kwargs):
    """The callback's one-shot mask step after ``setup``, on fixed calibration batches."""
    module = module or tiny_module(kind)
    cb = SparsityCallback(criterion=criterion, calibration_batches=3, **kwargs)
    cb.prepare_once(None, module)
    cb.compute_masks(module, batches=_calibration())
    return module, cb


def _calibration() -> list[dict[str, torch.Tensor]]:
    return list(token_loader(3, batch_size=4, seq=32, seed=1))


def _logit_error(module, dense) -> float:
    """Distance of the pruned network's logits from the dense ones on the calibration batches."""
    with torch.no_grad():
        return sum(
            float(
                (
                    module.model(input_ids=b["input_ids"]).logits
                    - dense.model(input_ids=b["input_ids"]).logits
                ).norm()
            )
            for b in _calibration()
        )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sparsegpt_one_shot_matches_the_ops_and_beats_wanda_and_magnitude(kind):
    from lightcook.ops.calibrate import sequential_pass
    from lightcook.ops.sparsegpt import sparsegpt_

    dense = tiny_module(kind)
    module, cb = _one_shot("sparsegpt", kind=kind)
    assert (
        weights_nm(cb)
        and masked_out_is_zero(cb)
        and all(is_nm(as_out_in(m.weight_mask, m), 2, 4) for m in cb.layers.values())
    )
    reference = tiny_module(kind)  # the same pass written out with the ops

    def visit(name, layer, hessian):
        sparsegpt_(as_out_in(layer.weight.detach(), layer), hessian, n=2, m=4)

    options = {"true_sequential": True, "dense_targets": True, "dense_damp": 0.01}  # the config's defaults
    sequential_pass(reference.model.eval(), _calibration(), list(cb.layers), visit, **options)
    for name, layer in cb.layers.items():
        torch.testing.assert_close(layer.weight, reference.model.get_submodule(name).weight)
        kept = layer.weight_mask
        assert not torch.equal(layer.weight[kept], dense.model.get_submodule(name).weight[kept])  # updated
    wanda, _ = _one_shot("wanda", kind=kind)
    magnitude, _ = _one_shot("magnitude", kind=kind)
    assert _logit_error(module, dense) < min(_logit_error(wanda, dense), _logit_error(magnitude, dense))


def test_sparsegpt_unstructured_exact_sparsity(tmp_path):
    module, cb = _one_shot("sparsegpt", mode="unstructured", sparsity=0.6, name="unstructured")
    for layer in cb.layers.values():
        assert int((~layer.weight_mask).sum()) == round(0.6 * layer.weight_mask.numel())
    assert masked_out_is_zero(cb)


def _sparsegpt_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = SparsityCallback(criterion="sparsegpt", calibration_batches=2, start_step=1)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=6, enable_checkpointing=True)
    trainer.fit(module, token_loader(4), ckpt_path=ckpt_path)  # crash at 4: resumes at an epoch boundary
    return module, cb


def test_sparsegpt_resume_does_not_recalibrate(tmp_path, monkeypatch):
    passes = CountPasses(monkeypatch)
    straight, cb_straight = _sparsegpt_run(tmp_path / "straight")
    assert passes.calls == 1 and cb_straight.state["update"] == "final:0" and weights_nm(cb_straight)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _sparsegpt_run(tmp_path / "crashed", crash_at=4)
    assert passes.calls == 2
    resumed, cb_resumed = _sparsegpt_run(
        tmp_path / "crashed", ckpt_path=str(tmp_path / "crashed/ckpt/last.ckpt")
    )
    assert passes.calls == 2  # masks and updated weights came back with the state dict
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cb_resumed.state_dict() == cb_straight.state_dict()


def test_sparsegpt_ddp_spawn_two_ranks_agree(tmp_path):
    cb = SparsityCallback(criterion="sparsegpt", calibration_batches=2, start_step=1)
    trainer = make_trainer(
        tmp_path, [cb, DumpPerRank(str(tmp_path))], strategy="ddp_spawn", devices=2, max_steps=3
    )
    trainer.fit(tiny_module(), token_loader(8))  # each rank calibrates on its own batches; H is summed
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    masks = [k for k in ranks[0] if k.endswith("weight_mask")]
    assert len(masks) == LLAMA_TARGETS
    assert [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])] == []
    assert all(is_nm(ranks[0][k], 2, 4) for k in masks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"end_step": 10},
            r"compress\.prune\.end_step: criterion 'sparsegpt' prunes once.*a ramp is not supported",
        ),
        ({"recompute_every": 2}, r"compress\.prune\.recompute_every: criterion 'sparsegpt'"),
        ({"pattern": "2d"}, r"compress\.prune\.pattern: criterion 'sparsegpt'.*allowed: '1d'"),
        (
            {"mode": "unstructured", "scope": "global", "name": "unstructured"},
            r"compress\.unstructured\.scope: criterion 'sparsegpt'.*allowed: 'layer'",
        ),
        (
            {"calibration_batches": 0},
            r"compress\.prune\.calibration_batches: criterion 'sparsegpt' needs >= 1",
        ),
        ({"blocksize": 0}, r"compress\.prune\.blocksize: must lie in \[1, inf\]"),
        ({"percdamp": -0.1}, r"compress\.prune\.percdamp: must lie in \[0"),
    ],
)
def test_sparsegpt_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}"):
        SparsityCallback(criterion="sparsegpt", **kwargs)


def test_sparsegpt_setup_and_calibration_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"^compress\.prune\.targets: lm_head lies outside the repeated blocks"
    ):
        fit(tmp_path, SparsityCallback(criterion="sparsegpt", targets=["*_proj", "lm_head"]), max_steps=1)
    from lightcook.modules import Seq2SeqLMModule

    t5 = Seq2SeqLMModule(config=TINY["t5"])
    with pytest.raises(
        NotImplementedError, match=r"^compress\.prune\.criterion='sparsegpt': .*'t5' has 2 layer"
    ):
        SparsityCallback(criterion="sparsegpt").prepare_once(None, t5)
    module = tiny_module()
    cb = SparsityCallback(criterion="sparsegpt")
    cb.prepare_once(None, module)
    with pytest.raises(
        RuntimeError, match=r"^compress\.prune\.criterion='sparsegpt': needs training batches"
    ):
        cb.compute_masks(module)
    with pytest.raises(
        RuntimeError, match=r"^compress\.prune\.criterion='sparsegpt': .*no calibration batch"
    ):
        cb.compute_masks(module, batches=[])
    with pytest.raises(
        ValueError, match=r"^compress\.prune\.criterion: 'sparsegpt' prunes at the full pattern"
    ):
        cb.compute_masks(module, fraction=0.5)
