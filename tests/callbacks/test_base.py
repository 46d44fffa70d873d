import pytest
import torch
from lightning.pytorch import Trainer
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
from tests.helpers import TINY_LLAMA


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
