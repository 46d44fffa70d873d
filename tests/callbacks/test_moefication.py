"""MoEficationCallback in real Lightning runs: FFN swap, the split at split_step after restore,
ReLU-fication, router fine-tuning through the ``router`` loss term, crash-and-resume and the resume
guard, DDP, a network stored as ``backbone``, misconfiguration, the app."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightcook.app import train
from lightcook.callbacks.moefication import HEATMAP, REPORT, MoEficationCallback
from lightcook.export import load_compressed, read_manifest, save_compressed
from lightcook.modules import CausalLMModule
from lightcook.ops.moe import MoEConfig, MoEFFN
from tests.helpers import TINY_LLAMA, CrashAt, keys_differing_across_ranks, make_trainer, token_loader
from tests.helpers.structured_moe import BackboneModule

VOCAB, LAYERS, D_FF = 256, 2, 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP barrier waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_module(seed: int = 0, **config) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(config={**TINY_LLAMA, **config}, tokenizer=None, lr=1e-2)


def small_cb(**kwargs) -> MoEficationCallback:
    args = {"num_experts": 8, "top_k": 2, "calibration_batches": 2, "router_steps": 20, "router_hidden": 16}
    return MoEficationCallback(**{**args, **kwargs})


# --------------------------------------------------------------------------- structure


def test_setup_swaps_every_ffn_and_keeps_the_dense_function(tmp_path):
    module = tiny_module()
    before = {n: p for n, p in module.model.named_parameters()}
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        dense = module.model.eval()(ids).logits
    cb = small_cb()
    cb.prepare_model(None, module)
    moes = {n: m for n, m in module.model.named_modules() if isinstance(m, MoEFFN)}
    assert sorted(moes) == sorted(cb.moe_modules) == [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    for name, moe in moes.items():
        assert moe.gate_proj.weight is before[f"{name}.gate_proj.weight"]  # same Parameters, same names
        assert not bool(moe.routed) and torch.equal(moe.perm, torch.arange(D_FF))
    with torch.no_grad():
        torch.testing.assert_close(module.model(ids).logits, dense)  # identity until the split
    cb.prepare_model(None, module)  # set up again (a second Trainer): kept as is
    assert all(module.model.get_submodule(n) is m for n, m in moes.items())


def test_split_at_step_zero_partitions_permutes_and_routes(tmp_path):
    module = tiny_module()
    originals = {
        i: layer.mlp.gate_proj.weight.detach().clone() for i, layer in enumerate(module.model.model.layers)
    }
    cb = small_cb(split="kmeans", router="mlp")
    trainer = make_trainer(tmp_path, [cb], max_steps=1)
    trainer.fit(module, token_loader())
    assert cb.state["split_done"] and cb.state["split_at_step"] == 0
    assert cb.state["calibration_tokens"] == 2 * 2 * 16
    for i, layer in enumerate(module.model.model.layers):
        moe = layer.mlp
        assert sorted(moe.perm.tolist()) == list(range(D_FF)) and not torch.equal(
            moe.perm, torch.arange(D_FF)
        )
        assert bool(moe.routed) and moe.top_k == 2 and moe.expert_size == D_FF // 8
        # one step of training after the split; the permutation was applied to the original rows
        assert torch.allclose(moe.gate_proj.weight, originals[i][moe.perm], atol=0.05)
    summary = cb.summary()
    assert summary["split_done"] and summary["split_at_step"] == 0 and summary["ffn_param_fraction"] == 0.25
    assert summary["layers"] == LAYERS  # no export of its own: the one export step is the report's


def test_report_and_heatmap_are_written(tmp_path):
    cb = small_cb()
    make_trainer(tmp_path, [cb], max_steps=3).fit(tiny_module(), token_loader())
    report = json.loads((tmp_path / REPORT).read_text())
    load = torch.tensor(report["expert_load"])
    assert load.shape == (LAYERS, 8) and int(load.sum()) == 3 * 2 * 16 * 2 * LAYERS  # steps*B*T*k*layers
    assert report["ffn_param_fraction"] == 0.25 and 0 < report["router_param_fraction"] < 0.2
    png = (tmp_path / HEATMAP).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (600, 300)  # 6 x 3 inches at 100 dpi: the smallest expert-load figure


@pytest.mark.parametrize("finetune", [True, False])
def test_router_finetune_puts_routers_in_the_optimizer(tmp_path, finetune):
    module = tiny_module()
    cb = small_cb(router_finetune=finetune, split_step=1)
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(module, token_loader())
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    routers = [p for m in cb.moe_modules.values() for p in m.router.parameters()]
    assert all((id(p) in in_optimizer) == finetune for p in routers)
    if finetune:
        state = trainer.optimizers[0].state
        assert all(float(state[p]["step"]) == 2 for p in routers)  # moments reset at the split (step 1)


def test_relufy_then_split_at_a_later_step(tmp_path):
    module = tiny_module()
    cb = small_cb(relufy=True, split_step=2)
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            mlp = pl_module.model.model.layers[0].mlp
            seen.append((trainer.global_step, bool(mlp.relu), bool(mlp.routed)))

    make_trainer(tmp_path, [cb, Probe()], max_steps=4).fit(module, token_loader())
    # the split happens in this callback's on_train_batch_start at step 2 (before Probe sees the batch)
    assert seen == [(0, True, False), (1, True, False), (2, True, True), (3, True, True)]
    before, at_split = cb.state["sparsity_before"], cb.state["sparsity_at_split"]
    assert before["zero_fraction"] == 0.0 and at_split["zero_fraction"] > 0.3  # SiLU -> ReLU
    assert at_split["mass_fraction"] < before["mass_fraction"]
    assert cb.state["split_at_step"] == 2 and cb.state["relu_active"]


def test_relufy_a_gelu_gpt2(tmp_path):
    torch.manual_seed(0)
    gpt2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4}
    module = CausalLMModule(config=gpt2, tokenizer=None, lr=1e-2)
    cb = small_cb(relufy=True, split_step=1, num_experts=16, top_k=4)  # GPT-2 d_ff = 4 * 32 = 128
    make_trainer(tmp_path, [cb], max_steps=2).fit(module, token_loader())
    assert sorted(cb.moe_modules) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    before, at_split = cb.state["sparsity_before"], cb.state["sparsity_at_split"]
    assert before["zero_fraction"] < 0.01 and at_split["zero_fraction"] > 0.3  # GELU -> ReLU
    assert load_compressed(save_compressed(module.model, tmp_path / "c")).transformer.h[1].mlp.relu


def test_distillation_from_the_dense_starting_model(tmp_path):
    from lightcook.callbacks.distillation import DistillationCallback

    module = tiny_module()
    moe, kd = small_cb(), DistillationCallback()
    make_trainer(tmp_path, [kd, moe], max_steps=2).fit(module, token_loader())  # any order: moe first
    assert moe.state["split_done"]
    assert not any(isinstance(m, MoEFFN) for m in kd.teacher_model.modules())  # the dense original


def test_split_permutes_adam_moments_of_the_ffn(tmp_path):
    module = tiny_module()
    cb = small_cb(split_step=1)
    captured = {}

    class Probe(Callback):  # runs after the callback's on_train_batch_start
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                p = pl_module.model.model.layers[0].mlp.gate_proj.weight
                captured["moment"] = trainer.optimizers[0].state[p]["exp_avg"].clone()
                captured["perm"] = pl_module.model.model.layers[0].mlp.perm.clone()

    class Before(Callback):  # runs before it
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                p = pl_module.model.model.layers[0].mlp.gate_proj.weight
                captured["before"] = trainer.optimizers[0].state[p]["exp_avg"].clone()

    make_trainer(tmp_path, [Before(), cb, Probe()], max_steps=2).fit(module, token_loader())
    assert torch.equal(captured["moment"], captured["before"][captured["perm"]])


def test_training_loss_decreases_with_routing(tmp_path):
    module = tiny_module()
    cb = small_cb(top_k=4)
    losses = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    make_trainer(tmp_path, [cb, Record()], max_steps=8).fit(module, token_loader(batches=1))
    assert losses[-1] < losses[0]


def test_split_without_batches_is_an_error():
    module = tiny_module()
    cb = small_cb()
    cb.prepare_model(None, module)
    with pytest.raises(ValueError, match=r"^compress\.moe\.calibration_batches: no training batch"):
        cb.split_experts(module, [])


class LossParts(Callback):
    """Per step: the loss the step returned, the module's own logged loss and the router term."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        router = m.get("compress/moe/router")
        self.rows.append(
            (float(outputs["loss"]), float(m["train/loss"]), None if router is None else float(router))
        )


def test_router_loss_is_a_logged_term_of_the_training_loss(tmp_path):
    """The routers learn from the ``router`` term that the base adds to the module's own loss: the
    loss the step returns (and Lightning logs) is the module's loss plus that term."""
    parts = LossParts()
    cb = small_cb(split_step=1)
    trainer = make_trainer(tmp_path, [cb, parts], max_steps=3)
    trainer.fit(tiny_module(), token_loader())
    assert parts.rows[0][2] is None  # before the split: no router loss (one process: no zero term)
    for total, own, router in parts.rows[1:]:
        assert router is not None and router > 0
        assert total == pytest.approx(own + router, rel=1e-5)
    assert all(m.aux_loss is None for m in cb.moe_modules.values())  # taken every step
    off = small_cb(split_step=0, router_finetune=False)
    assert off.adds_loss is False and small_cb().adds_loss is True


# --------------------------------------------------------------------------- resume


def _resume_run(root: Path, split_step: int, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = small_cb(split_step=split_step, relufy=True, plot=False)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=8, enable_checkpointing=True)
    trainer.fit(module, token_loader(4), ckpt_path=ckpt_path)
    return module, cb


@pytest.mark.parametrize("split_step", [1, 5])  # split before the checkpoint / after resuming
def test_crash_and_resume_matches_straight_run(tmp_path, split_step):
    straight, cb_straight = _resume_run(tmp_path / "straight", split_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(tmp_path / "crashed", split_step, crash_at=5)
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # primitives only
    assert ckpt["global_step"] == 4
    assert ckpt["callbacks"]["MoEficationCallback"]["split_done"] is (split_step < 4)
    assert any(k.endswith("mlp.perm") for k in ckpt["state_dict"])
    resumed, cb_resumed = _resume_run(tmp_path / "crashed", split_step, ckpt_path=str(last))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and sum(k.endswith("router.fc1.weight") for k in a) == LAYERS
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cb_resumed.state_dict() == cb_straight.state_dict()
    assert cb_resumed.state["split_at_step"] == split_step


def test_resume_with_fewer_experts_fails_before_training(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = small_cb(num_experts=4, top_k=2, plot=False)
    make_trainer(tmp_path, [cb, ckpt], max_steps=1, enable_checkpointing=True).fit(
        tiny_module(), token_loader(2)
    )
    other = small_cb(num_experts=2, top_k=1, plot=False)
    with pytest.raises(
        ValueError,
        match=r"^compress\.moe\.num_experts: the checkpoint .*last\.ckpt was trained with 4, this run has 2; "
        r"resume with the same setting",
    ):
        make_trainer(tmp_path, [other], max_steps=2).fit(
            tiny_module(), token_loader(2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    assert other.state["split_done"] is False  # no step, no split


# --------------------------------------------------------------------------- DDP


class RankAgreement(Callback):
    """Compares every tensor of the model across ranks (all_reduce max vs min); rank 0 writes the verdict."""

    def __init__(self, cb: MoEficationCallback, out: str) -> None:
        self.cb, self.out = cb, out

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().double().flatten() for k, v in pl_module.model.state_dict().items()}
        differ = keys_differing_across_ranks(trainer, state)
        if trainer.is_global_zero:
            save_compressed(pl_module.model, Path(self.out).parent / "compressed")
            Path(self.out).write_text(
                json.dumps({"differ": differ, "world": trainer.world_size, "state": self.cb.state})
            )


def test_ddp_spawn_two_ranks_agree(tmp_path):  # ~10 s on an idle 2-core machine, ~45 s on a busy one
    cb = small_cb(split_step=1)
    out = tmp_path / "verdict.json"
    trainer = make_trainer(
        tmp_path, [cb, RankAgreement(cb, str(out))], strategy="ddp_spawn", devices=2, max_steps=3
    )
    trainer.fit(tiny_module(), token_loader(8))
    verdict = json.loads(out.read_text())
    assert verdict["world"] == 2 and verdict["differ"] == []
    assert verdict["state"]["split_done"] and verdict["state"]["split_at_step"] == 1
    loaded = load_compressed(tmp_path / "compressed")  # rank 0's network
    assert sum(isinstance(m, MoEFFN) for m in loaded.modules()) == LAYERS
    report = json.loads((tmp_path / REPORT).read_text())
    assert (
        int(torch.tensor(report["expert_load"]).sum()) == 2 * 2 * 2 * 16 * 2 * LAYERS
    )  # ranks*steps*B*T*k*L


# --------------------------------------------------------------------------- misconfiguration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 0}, r"^compress\.moe\.num_experts: must lie in \[1, inf\], got 0$"),
        ({"top_k": 9, "num_experts": 8}, r"^compress\.moe\.top_k: must be <= num_experts \(8\), got 9$"),
        ({"top_k": 1.5}, r"^compress\.moe\.top_k: must be an integer, got 1.5$"),
        (
            {"split": "spectral"},
            r"^compress\.moe\.split: got 'spectral'; allowed: 'kmeans', 'coactivation', 'random', 'carve'$",
        ),
        (
            {"router": "gate"},
            r"^compress\.moe\.router: got 'gate'; allowed: 'mlp', 'centroid', 'oracle', 'random', "
            r"'representative'$",
        ),
        (
            {"split": "carve", "num_experts": 8, "shared_experts": 8},
            r"^compress\.moe\.shared_experts: must be < num_experts \(8\), got 8$",
        ),
        ({"split": "carve", "shared_experts": -1}, r"^compress\.moe\.shared_experts: must lie in \[0, inf\]"),
        (
            {"split": "coactivation", "shared_experts": 2},
            r"^compress\.moe\.shared_experts: always-on experts need split=carve \(got split='coactivation'\)",
        ),
        ({"router": "representative"}, r"^compress\.moe\.router: representative needs split=carve"),
        (
            {"split": "carve", "num_experts": 8, "shared_experts": 2, "top_k": 7},
            r"^compress\.moe\.top_k: must be <= num_experts - shared_experts \(6 routed experts\), got 7$",
        ),
        ({"split": "carve", "active_fraction": 1.5}, r"^compress\.moe\.active_fraction: must lie in"),
        ({"relufy": "yes"}, r"^compress\.moe\.relufy: got 'yes'; allowed: True, False$"),
        ({"router_finetune": 1}, r"^compress\.moe\.router_finetune: got 1; allowed: True, False$"),
        ({"plot": None}, r"^compress\.moe\.plot: got None; allowed: True, False$"),
        ({"router_lr": 0}, r"^compress\.moe\.router_lr: must be > 0, got 0$"),
        ({"router_loss_weight": -1}, r"^compress\.moe\.router_loss_weight: must lie in \[0, inf\], got -1$"),
        ({"router_steps": -1}, r"^compress\.moe\.router_steps: must lie in \[0, inf\]"),
        ({"split_step": -2}, r"^compress\.moe\.split_step: must lie in \[0, inf\]"),
        ({"calibration_batches": 0}, r"^compress\.moe\.calibration_batches: must lie in \[1, inf\]"),
        ({"buckets": 0}, r"^compress\.moe\.buckets: must lie in \[1, inf\]"),
        ({"router_hidden": 0}, r"^compress\.moe\.router_hidden: must lie in \[1, inf\]"),
        ({"router_batch_size": 0}, r"^compress\.moe\.router_batch_size: must lie in \[1, inf\]"),
        ({"kmeans_iters": 0}, r"^compress\.moe\.kmeans_iters: must lie in \[1, inf\]"),
        ({"seed": -1}, r"^compress\.moe\.seed: must lie in \[0, inf\]"),
        ({"export_dir": "moe"}, r"^compress\.moe\.export_dir: unknown key; allowed: num_experts, "),
        (
            {"architecture": "bert"},
            r"^compress\.moe\.architecture: 'bert' is not a registered layout; registered: \[",
        ),
        ({"architecture": {"layerz": "x"}}, r"^compress\.moe\.architecture: unknown keys \['layerz'\]"),
        ({"top_k": 40, "name": "moe2"}, r"^compress\.moe2\.top_k: "),
    ],
)
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEficationCallback(**kwargs)


def test_config_object_or_options_not_both():
    config = MoEConfig(num_experts=8, top_k=2)
    assert MoEficationCallback(config).config is config
    with pytest.raises(ValueError, match=r"^compress\.moe\.top_k: given both in config= and as an option"):
        MoEficationCallback(config, top_k=4)


class NoFFN(nn.Module):
    """A network with the HF call convention but no FFN the registry knows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None):
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return type("Out", (), {"logits": logits, "loss": loss})()


def test_model_without_recognisable_ffn_is_a_clear_error(tmp_path):
    module = CausalLMModule(model=NoFFN())
    with pytest.raises(
        ValueError,
        match=r"^compress\.moe\.architecture: NoFFN \(model_type=None\) has no known layout; registered: .*"
        r"\[looked in CausalLMModule\.model \(NoFFN\); set compress\.moe\.network to point elsewhere\]$",
    ):
        make_trainer(tmp_path, [small_cb()]).fit(module, token_loader())


@pytest.mark.parametrize("network", [None, "backbone"])
def test_network_stored_as_backbone(tmp_path, network):
    """A user module with its HF model as ``self.backbone`` (no ``.model``, no ``compute_loss``): found
    by default (the single pretrained model) or by ``network="backbone"``; its own training_step runs."""
    module = BackboneModule()
    cb = small_cb(network=network)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(module, token_loader())
    assert sorted(cb.moe_modules) == [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    assert all(module.backbone.get_submodule(n) is m for n, m in cb.moe_modules.items())
    assert cb.state["split_done"] and {"train/own", "compress/moe/router"} <= set(trainer.callback_metrics)


def test_network_without_ffn_names_where_it_looked(tmp_path):
    class WithHead(BackboneModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = NoFFN()

    with pytest.raises(
        ValueError,
        match=r"^compress\.moe\.architecture: NoFFN \(model_type=None\) has no known layout; .*"
        r"\[looked in WithHead\.head \(NoFFN\); set compress\.moe\.network to point elsewhere\]$",
    ):
        make_trainer(tmp_path, [small_cb(network="head")]).fit(WithHead(), token_loader())


def test_architecture_mapping_makes_a_custom_model_work():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Module()
            self.ff.up, self.ff.down, self.ff.act = nn.Linear(16, 32), nn.Linear(32, 16), nn.GELU()

    net = nn.Module()
    net.blocks = nn.ModuleList([Block(), Block()])
    mapping = {
        "layers": "blocks",
        "attention": None,
        "ffn": {"path": "ff", "norm": "ff", "inputs": ["up"], "output": "down", "activation": "act"},
    }
    cb = MoEficationCallback(num_experts=4, top_k=1, architecture=mapping)
    cb.prepare_model(None, net)
    assert (
        sorted(cb.moe_modules) == ["blocks.0.ff", "blocks.1.ff"] and not cb.moe_modules["blocks.0.ff"].gated
    )


def test_num_experts_not_dividing_the_intermediate_size(tmp_path):
    module = tiny_module()
    with pytest.raises(
        ValueError,
        match=r"^compress\.moe\.num_experts: 5 does not divide the intermediate size 64 "
        r"of model\.layers\.0\.mlp; allowed: a divisor such as",
    ):
        make_trainer(tmp_path, [small_cb(num_experts=5, top_k=1)]).fit(module, token_loader())
    assert not any(isinstance(m, MoEFFN) for m in module.modules())  # nothing half-swapped


def test_ffn_split_twice_with_other_settings_is_refused():
    module = tiny_module()
    small_cb().prepare_model(None, module)
    with pytest.raises(ValueError, match=r"compress\.moe\.num_experts: .* already split into 8 experts"):
        small_cb(num_experts=16, top_k=4).prepare_model(None, module)


# --------------------------------------------------------------------------- the app


def test_app_moe_run_exports_a_loadable_moe_model(compose):
    trim = [
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "validate_before=false",
        "save_model=false",
        "compress.moe.router_steps=20",
        "compress.moe.calibration_batches=2",
    ]
    summary = train(compose("model=tiny_llama", "trainer=fast", "report=fast", "+compress=[moe]", *trim))
    run = Path(summary["run_dir"])
    assert summary["train_steps"] == 3
    exports = json.loads((run / "summary.json").read_text())["exports"]
    assert exports == {"compressed": str(run / "compressed")}  # the one export step at fit end
    outcome = summary["compress"]["moe"]
    assert outcome["split_done"] and outcome["ffn_param_fraction"] == 0.25 and outcome["layers"] == 2
    manifest = read_manifest(run / "compressed")
    assert manifest["techniques"] == ["moe"] and len(manifest["moe"]) == 2
    assert (run / HEATMAP).is_file() and (run / REPORT).is_file()
    model = load_compressed(run / "compressed")
    ids = torch.randint(0, 49152, (2, 32))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 32, 49152) and bool(torch.isfinite(logits).all())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["MoEficationCallback"]["split_done"] is True
    with open(run / "csv" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert {"moe/ffn_param_fraction", "moe/load_imbalance", "moe/load_imbalance/layer_1"} <= set(columns)
    assert "compress/moe/router" in columns


# --------------------------------------------------------------------------- carved MoE (CMoE)


def carve_cb(**kwargs) -> MoEficationCallback:
    args = {"split": "carve", "shared_experts": 2, "router": "representative", "top_k": 2}
    return small_cb(**{**args, **kwargs})


def test_carve_with_every_routed_expert_is_the_dense_model(tmp_path):
    module = tiny_module()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        dense = module.model.eval()(ids).logits  # the outside reference: the unchanged HF model
    cb = carve_cb(top_k=6, router_finetune=False)  # 2 shared + all 6 routed = every neuron
    make_trainer(tmp_path, [cb], max_steps=1, limit_train_batches=1).fit(module, token_loader())
    assert cb.state["split_done"] and cb.summary()["ffn_param_fraction"] == 1.0
    # one optimizer step changed the weights: compare the MoE model with its own weights computed densely
    moes = list(cb.moe_modules.values())
    with torch.no_grad():
        routed = module.model.eval()(ids).logits
        for moe in moes:
            moe.set_routed(False)
        torch.testing.assert_close(routed, module.model(ids).logits, atol=1e-5, rtol=1e-5)
    assert all(m.shared_experts == 2 and m.routed_experts == 6 for m in moes)
    assert not torch.allclose(routed, dense, atol=1e-6)  # it did train a step


def test_carve_at_25_percent_counts_shared_plus_routed(tmp_path):
    cb = carve_cb(num_experts=8, shared_experts=1, top_k=1)  # (1 + 1) / 8
    assert cb.ffn_param_fraction == 0.25
    make_trainer(tmp_path, [cb], max_steps=2).fit(tiny_module(), token_loader())
    summary, report = cb.summary(), json.loads((tmp_path / REPORT).read_text())
    assert summary["ffn_param_fraction"] == report["ffn_param_fraction"] == 0.25
    assert summary["shared_experts"] == report["shared_experts"] == 1
    load = torch.tensor(report["expert_load"])  # routed experts only: each token picks top_k = 1
    assert load.shape == (LAYERS, 7) and int(load.sum()) == 2 * 2 * 16 * 1 * LAYERS
    assert all(m.compute_fraction == 0.25 for m in cb.moe_modules.values())
    assert cb.adds_loss  # the representative routers are fine-tuned by default


def test_carve_one_shot_without_a_trainer_matches_the_dense_model_with_all_experts():
    module = tiny_module()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        dense = module.model.eval()(ids).logits
    cb = carve_cb(top_k=6)
    cb.prepare_model(None, module)
    cb.split_experts(module, [next(iter(token_loader(1)))])
    with torch.no_grad():
        torch.testing.assert_close(module.model(ids).logits, dense, atol=1e-5, rtol=1e-5)


def test_carve_on_gpt2_names_the_split(tmp_path):
    module = CausalLMModule(
        config={"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 1, "n_head": 4},
        tokenizer=None,
    )
    with pytest.raises(
        ValueError, match=r"^compress\.moe\.split: carve needs a gated FFN .*no gate projection"
    ):
        make_trainer(tmp_path, [carve_cb()]).fit(module, token_loader())


def _carve_resume_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    module = tiny_module()
    cb = carve_cb(split_step=1, plot=False)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(root, [cb, ckpt, *extra], max_steps=6, enable_checkpointing=True)
    trainer.fit(module, token_loader(4), ckpt_path=ckpt_path)
    return module, cb


def test_carve_crash_and_resume_matches_straight_run(tmp_path):
    straight, cb_straight = _carve_resume_run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _carve_resume_run(tmp_path / "crashed", crash_at=5)
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["callbacks"]["MoEficationCallback"]["split_done"] is True
    assert ckpt["callbacks"]["MoEficationCallback"]["_config"]["shared_experts"] == 2
    resumed, cb_resumed = _carve_resume_run(tmp_path / "crashed", ckpt_path=str(last))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and sum(k.endswith("router.gate") for k in a) == LAYERS
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cb_resumed.state_dict() == cb_straight.state_dict()
    assert cb_resumed.state["split_at_step"] == 1  # the resumed run did not carve again
