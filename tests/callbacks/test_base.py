import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightcook.callbacks.base import (
    BLOCK_LINEARS,
    CompressionCallback,
    StepSchedule,
    check_primitive,
    replace_module,
    select_modules,
)
from lightcook.modules import CausalLMModule
from tests.helpers import TINY_LLAMA, make_trainer, token_loader


@pytest.fixture
def llama():
    return CausalLMModule(config=TINY_LLAMA).model


def test_default_targets_are_block_linears_only(llama):
    names = set(select_modules(llama, BLOCK_LINEARS))
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "lm_head" not in names


def test_glob_regex_and_exclude(llama):
    mlp = select_modules(llama, ["*.mlp.*"], exclude=["*down_proj"])
    assert sorted(mlp) == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    layer0 = select_modules(llama, ["re:model\\.layers\\.0\\..*_proj"])
    assert len(layer0) == 7 and all(".0." in n for n in layer0)


def test_pattern_matching_nothing_names_owner_and_pattern(llama):
    with pytest.raises(ValueError, match=r"compress.prune.targets: pattern '\*\.nothing' matches no module"):
        select_modules(llama, ["*.mlp.*", "*.nothing"], owner="compress.prune")


def test_exclude_removing_everything_is_an_error(llama):
    with pytest.raises(ValueError, match="compress.quant.exclude"):
        select_modules(llama, ["*.mlp.*"], exclude=["*"], owner="compress.quant")


def test_gpt2_conv1d_counts_as_linear():
    gpt2 = CausalLMModule(
        config={"model_type": "gpt2", "vocab_size": 64, "n_embd": 16, "n_layer": 1, "n_head": 2}
    ).model
    assert sorted(select_modules(gpt2)) == [
        f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]


def test_step_schedule():
    s = StepSchedule(10, 20)
    assert [s.active(i) for i in (9, 10, 19, 20)] == [False, True, True, False]
    assert [s.progress(i) for i in (0, 10, 15, 25)] == [0.0, 0.0, 0.5, 1.0]
    assert StepSchedule(5).progress(5) == 1.0 and StepSchedule(5).active(10**6)
    with pytest.raises(ValueError, match="end_step"):
        StepSchedule(5, 4)
    with pytest.raises(ValueError, match="start_step"):
        StepSchedule(-1)


def test_state_must_be_primitive():
    check_primitive({"a": [1, 2.0, "x", None, {"b": True}]}, "state")
    with pytest.raises(TypeError, match=r"state\['t'\].*Tensor"):
        check_primitive({"t": torch.zeros(1)}, "state")
    cb = CompressionCallback()
    cb.state["mask"] = torch.ones(2)
    with pytest.raises(TypeError):
        cb.state_dict()


def test_state_key_distinguishes_named_instances():
    assert CompressionCallback().state_key == "CompressionCallback"
    assert CompressionCallback(name="a").state_key != CompressionCallback(name="b").state_key


def test_replace_module(llama):
    new = nn.Identity()
    replace_module(llama, "model.layers.0.mlp.up_proj", new)
    assert llama.model.layers[0].mlp.up_proj is new


class _CountingCallback(CompressionCallback):
    def __init__(self):
        super().__init__()
        self.prepared = 0
        self.steps = 0

    def prepare_model(self, trainer, pl_module):
        self.prepared += 1

    def after_optimizer_step(self, trainer, pl_module):
        self.steps += 1


def test_prepare_once_and_hook_every_optimizer_step(tmp_path):
    from torch.utils.data import DataLoader

    from tests.helpers import random_batch

    module = CausalLMModule(config=TINY_LLAMA)
    cb = _CountingCallback()
    batches = [random_batch(seed=i) for i in range(8)]
    loader = DataLoader(batches, batch_size=None)
    trainer = Trainer(
        max_steps=3,
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
    )
    trainer.validate(module, loader, verbose=False)
    trainer.fit(module, loader, loader)
    assert cb.prepared == 1
    assert cb.steps == 3 == trainer.global_step  # optimizer steps, not batches (6 batches ran)
    assert not cb._hook_handles  # removed at teardown


class _Recorder(CompressionCallback):
    log: list = []

    def __init__(self, label, order):
        super().__init__(name=label)
        self.label, self.order = label, order

    def prepare_model(self, trainer, pl_module):
        _Recorder.log.append(self.label)

    def on_validation_start(self, trainer, pl_module):
        _Recorder.log.append(f"{self.label}:validation_start")


@pytest.mark.parametrize("listed", [["quant", "moe", "kd"], ["kd", "quant", "moe"]])
def test_structural_changes_follow_canonical_order_not_list_order(tmp_path, listed):
    orders = {"moe": 10, "quant": 40, "kd": 50}
    _Recorder.log = []
    callbacks = [_Recorder(label, orders[label]) for label in listed]
    trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    from torch.utils.data import DataLoader

    from tests.helpers import random_batch

    trainer.validate(
        CausalLMModule(config=TINY_LLAMA), DataLoader([random_batch()], batch_size=None), verbose=False
    )
    # Structural changes, then every later hook, in canonical order; other callbacks keep their slots.
    assert _Recorder.log == ["moe", "quant", "kd", *(f"{c}:validation_start" for c in ("moe", "quant", "kd"))]
    assert [c.label for c in trainer.callbacks if isinstance(c, _Recorder)] == ["moe", "quant", "kd"]
    assert [type(c).__name__ for c in trainer.callbacks][-1] == "ModelCheckpoint"


def test_gloo_group_is_destroyed_at_exit(tmp_path, monkeypatch):
    """A rank's gloo group must not outlive the interpreter (left alive it can SIGABRT the rank at exit):
    the compression callbacks' setup registers its destruction, once."""
    import atexit

    import torch.distributed as dist

    from lightcook.callbacks import base

    registered: list = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(base, "_GLOO_CLEANUP_REGISTERED", False)
    base.destroy_gloo_group_at_exit()  # no group yet: nothing to do
    assert registered == []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        base.destroy_gloo_group_at_exit()
        base.destroy_gloo_group_at_exit()
        assert registered == [base._destroy_process_group]
        registered[0]()  # what the interpreter runs at exit
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_compression_setup_registers_the_gloo_teardown(tmp_path, monkeypatch):
    """The helper above is only useful if the callbacks' setup calls it (the ddp_spawn tests flake without)."""
    from lightcook.callbacks import base
    from tests.helpers import make_trainer, token_loader

    calls = []
    monkeypatch.setattr(base, "destroy_gloo_group_at_exit", lambda: calls.append(1))

    class Noop(CompressionCallback):
        pass

    make_trainer(tmp_path, [Noop()], max_steps=1).fit(CausalLMModule(config=TINY_LLAMA), token_loader(1))
    assert calls == [1]


# --------------------------------------------------------------------------- network, loss hook, guards


class _Extra(CompressionCallback):
    """Adds ``weight * mean(logits ** 2)`` of the captured outputs, and halves the module's loss."""

    technique = "extra"

    def __init__(self, weight: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.weight, self.seen = weight, []

    def loss_terms(self, trainer, pl_module, batch, outputs):
        self.seen.append(outputs)
        return {"square": self.weight * outputs.logits.float().pow(2).mean()}

    def task_scale(self) -> float:
        return 0.5


class _OwnStep(LightningModule):
    """A user's module: network in ``self.backbone``, its own loss term and logging, a dict output."""

    def __init__(self, manual: bool = False):
        super().__init__()
        self.backbone = CausalLMModule(config=TINY_LLAMA).model
        self.automatic_optimization = not manual
        self.returned = []

    def training_step(self, batch, batch_idx):
        out = self.backbone(**batch)
        loss = out.loss + 0.0 * out.logits.sum()
        self.log("train/own", loss.detach(), batch_size=2)
        self.returned.append(loss.detach())
        return {"loss": loss, "own": loss.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_find_network_default_path_callable_and_errors(llama):
    from lightcook.callbacks.base import find_network

    user = _OwnStep()
    assert find_network(user) is user.backbone  # the one PreTrainedModel, no .model needed
    assert find_network(user, "backbone.model") is user.backbone.model
    assert find_network(user, lambda m: m.backbone.lm_head) is user.backbone.lm_head
    assert find_network(CausalLMModule(config=TINY_LLAMA)).__class__.__name__ == "LlamaForCausalLM"
    assert find_network(llama) is llama  # a network given directly is its own network
    with pytest.raises(
        ValueError, match=r"compress.x.network: _OwnStep has no submodule 'nope' \(its children: backbone\)"
    ):
        find_network(user, "nope", owner="compress.x")
    user.second = CausalLMModule(config=TINY_LLAMA).model
    with pytest.raises(
        ValueError, match=r"several pretrained models \(backbone, second\).*network='<attribute>'"
    ):
        find_network(user, owner="compress.x")


def test_loss_hook_keeps_the_users_step_adds_terms_logs_them_and_is_removed(tmp_path):
    module, extra = _OwnStep(), _Extra()
    trainer = make_trainer(tmp_path, [extra], max_steps=1)
    trainer.fit(module, token_loader(batches=1))
    outputs = extra.seen[0]
    assert "train/own" in trainer.callback_metrics  # the user's own logging survived
    square = 0.5 * outputs.logits.float().pow(2).mean().detach()
    assert torch.allclose(trainer.callback_metrics["compress/extra/square"], square)
    total = trainer.callback_metrics["compress/loss"]  # what was optimized: 0.5 * own + term
    assert torch.allclose(total, 0.5 * module.returned[0] + square)
    assert "training_step" not in module.__dict__  # teardown put the class's method back


def test_loss_hook_returns_the_combined_loss(tmp_path):
    module, extra = _OwnStep(), _Extra(weight=2.0)
    trainer = make_trainer(tmp_path, [extra], max_steps=1)
    trainer.strategy.connect(module)
    extra.setup(trainer, module, "fit")  # installs the wrapper (no fit: call it by hand)
    batch = next(iter(token_loader(batches=1)))
    combined = module.training_step(batch, 0)
    own = module.returned[-1]
    square = extra.seen[-1].logits.float().pow(2).mean()
    assert torch.allclose(combined["loss"], 0.5 * own + 2.0 * square) and combined["own"] is not None
    extra.teardown(trainer, module, "fit")
    assert "training_step" not in module.__dict__


def test_terms_with_manual_optimization_fail_in_setup(tmp_path):
    with pytest.raises(TypeError, match=r"compress.extra: add loss terms .*manual optimization"):
        make_trainer(tmp_path, [_Extra()], max_steps=1).fit(_OwnStep(manual=True), token_loader(batches=1))


def test_conflict_table_names_both_keys():
    from lightcook.callbacks.base import check_combination
    from lightcook.callbacks.moefication import MoEficationCallback
    from lightcook.callbacks.structured_pruning import StructuredPruningCallback

    moe, structured = (
        MoEficationCallback(num_experts=4, top_k=1),
        StructuredPruningCallback(units=["neurons"]),
    )
    with pytest.raises(
        ValueError, match=r"^compress.moe cannot be combined with compress.structured: .*neurons"
    ):
        check_combination([moe, structured], CausalLMModule(config=TINY_LLAMA).model)


def test_calibration_batches_leave_the_global_rng_alone(tmp_path):
    from lightcook.callbacks.base import calibration_batches

    with pytest.raises(RuntimeError, match=r"compress.x: needs training batches"):
        next(calibration_batches(None, 2, "compress.x"))
    trainer = make_trainer(tmp_path, [], max_steps=1)
    trainer.fit(_OwnStep(), token_loader(batches=3))
    state = torch.random.get_rng_state()
    batches = list(calibration_batches(trainer, 2, "compress.x"))
    assert len(batches) == 2 and torch.equal(torch.random.get_rng_state(), state)
