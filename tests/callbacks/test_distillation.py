"""DistillationCallback in real Trainer runs: loss composition through the base's loss hook (the
module's own training_step runs), teacher isolation, projections and the memory bank through
checkpoint/resume, the resume guard, causal and encoder-decoder models, user modules with the network
anywhere, composition with pruning, the Hydra app, errors."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightcook.app import CONFIG_DIR, train
from lightcook.callbacks.base import CompressionCallback, replace_module
from lightcook.callbacks.distillation import DistillationCallback
from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.modules import CausalLMModule, Seq2SeqLMModule
from lightcook.ops.distill import KDConfig
from tests.helpers import TINY_LLAMA, make_trainer
from tests.helpers.distillation import (
    TINY_T5,
    WIDE_LLAMA,
    ExtraLossModule,
    ManualModule,
    StepOutputs,
    causal_loader,
    extra_term,
    seq2seq_loader,
    student,
)


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory) -> Path:
    """A saved random 4-layer, width-48 Llama (a teacher given by path)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "wide_llama"
    CausalLMModule(config=WIDE_LLAMA).model.save_pretrained(path)
    return path


def kl_reference(student_logits, teacher_logits, real, temperature):
    """T² · KL(teacher ‖ student) over the real positions, from F.kl_div."""
    return temperature**2 * F.kl_div(
        F.log_softmax(student_logits[real] / temperature, -1),
        F.log_softmax(teacher_logits[real] / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )


# --------------------------------------------------------------------------- loss composition


def test_loss_is_task_plus_scaled_kd_and_matches_reference(tmp_path, wide_teacher):
    module, loader = student(), causal_loader()
    batch = next(iter(loader))
    teacher = CausalLMModule(name_or_path=str(wide_teacher)).model.eval()
    with torch.no_grad():  # reference at the initial weights, from HF outputs and F.kl_div
        task_ref, s_out = module.compute_loss(batch)
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl_ref = kl_reference(s_out.logits, t_logits, batch["attention_mask"].bool(), 2.0)
    kd = DistillationCallback(teacher=str(wide_teacher), temperature=2.0, task_scale=0.5, logits_scale=3.0)
    record = StepOutputs()
    make_trainer(tmp_path, [kd, record], max_steps=1).fit(module, loader)
    first = record.metrics[0]
    assert first["compress/kd/logits"] == pytest.approx(3.0 * float(kl_ref), rel=1e-4)  # already weighted
    assert first["train/loss"] == pytest.approx(float(task_ref), rel=1e-5)  # the module's own logging
    assert record.losses[0] == pytest.approx(0.5 * float(task_ref) + 3.0 * float(kl_ref), rel=1e-4)
    assert "training_step" not in module.__dict__  # the wrapper is gone after fit


# --------------------------------------------------------------------------- teacher isolation


def test_teacher_frozen_outside_parameters_and_checkpoint(tmp_path, wide_teacher):
    module = student()
    kd = DistillationCallback(
        teacher=str(wide_teacher), hidden_scale=1.0, hidden_map=["model.layers.1:model.layers.3"]
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    before_student = {k: v.clone() for k, v in module.state_dict().items()}
    seen_teacher = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            teacher = kd.teacher_model
            seen_teacher.update(
                training=teacher.training, grads=any(p.requires_grad for p in teacher.parameters())
            )
            seen_teacher.setdefault("state", {k: v.clone() for k, v in teacher.state_dict().items()})
            seen_teacher["optimized"] = {
                id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]
            }

    make_trainer(tmp_path, [kd, Probe(), ckpt], max_steps=3, enable_checkpointing=True).fit(
        module, causal_loader()
    )
    teacher = kd.teacher_model
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert not teacher_ids & seen_teacher["optimized"]
    assert seen_teacher["training"] is False and seen_teacher["grads"] is False
    for key, value in teacher.state_dict().items():  # unchanged by training
        assert torch.equal(value, seen_teacher["state"][key]), key
    assert any(
        not torch.equal(module.state_dict()[k], v) for k, v in before_student.items()
    )  # student trained

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    keys = set(saved["state_dict"])
    assert keys == set(module.state_dict())  # student + projections, nothing of the teacher
    assert {k for k in keys if k.startswith("kd_projections.")} == {
        "kd_projections.hidden_0.weight",
        "kd_projections.hidden_0.bias",
    }
    teacher_only = {f"model.{k}" for k in teacher.state_dict()} - set(module.state_dict())
    assert teacher_only and not teacher_only & keys  # e.g. model.model.layers.3.* exist only in the teacher
    assert saved["callbacks"]["DistillationCallback"] == {
        "kd_steps": 3,
        "_config": {
            "hidden_map": ["model.layers.1:model.layers.3"],
            "projection": True,
            "memory_bank_size": 0,
        },
    }


def test_projection_trains_and_survives_resume(tmp_path, wide_teacher):
    def kd() -> DistillationCallback:
        return DistillationCallback(
            teacher=str(wide_teacher),
            hidden_scale=1.0,
            hidden_map=["model.layers.0:model.layers.1", "[pre]model.layers.1:[pre]model.layers.3"],
        )

    # One batch per epoch: Lightning 2.6 replays a plain DataLoader from its start on resume, so with
    # several batches the data order (not the callback) would make the runs differ.
    loader = causal_loader(rows=2)
    straight, initial = student(), {}

    class Initial(Callback):
        def on_fit_start(self, trainer, pl_module):  # projections exist from setup on
            initial.update({k: v.clone() for k, v in pl_module.kd_projections.state_dict().items()})

    make_trainer(tmp_path / "a", [kd(), Initial()], max_steps=6).fit(straight, loader)
    assert set(initial) == {"hidden_0.weight", "hidden_0.bias", "hidden_1.weight", "hidden_1.bias"}
    for key, value in straight.kd_projections.state_dict().items():  # the optimizer trained them
        assert not torch.equal(value, initial[key]), key

    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    make_trainer(tmp_path / "b", [kd(), ckpt], max_steps=3, enable_checkpointing=True).fit(student(), loader)
    resumed, callback = student(), kd()
    with torch.no_grad():  # scramble: everything must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    make_trainer(tmp_path / "c", [callback], max_steps=6).fit(
        resumed, loader, ckpt_path=tmp_path / "b" / "last.ckpt"
    )
    assert callback.state["kd_steps"] == 6
    for key, value in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key


def test_contrastive_memory_bank_survives_resume(tmp_path, wide_teacher):
    def kd() -> DistillationCallback:
        return DistillationCallback(teacher=str(wide_teacher), contrastive_scale=1.0, memory_bank_size=40)

    loader = causal_loader(rows=2)  # one batch per epoch (see the projection test)
    straight = student()
    make_trainer(tmp_path / "a", [kd()], max_steps=5).fit(straight, loader)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    first = kd()
    make_trainer(tmp_path / "b", [first, ckpt], max_steps=2, enable_checkpointing=True).fit(student(), loader)
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert saved["memory_bank"].shape == (40, 48)  # two batches of real tokens, the newest 40 kept
    assert torch.equal(saved["memory_bank"], first.bank.tensor)

    resumed, callback = student(), kd()
    make_trainer(tmp_path / "c", [callback], max_steps=5).fit(
        resumed, loader, ckpt_path=tmp_path / "b" / "last.ckpt"
    )
    for key, value in straight.state_dict().items():  # an empty bank after resume changes the loss
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key


# --------------------------------------------------------------------------- every term, both model kinds


def test_causal_all_terms_with_deeper_wider_bf16_teacher(tmp_path, wide_teacher):
    module = student()
    kd = DistillationCallback(
        teacher=str(wide_teacher),
        teacher_dtype="bf16",
        hidden_scale=1.0,
        hidden_map=["[post]model.layers.0:[post]model.layers.1"],
        attention_scale=1.0,
        attention_kind="kl",
        contrastive_scale=0.5,
        contrastive_negatives="batch",
        memory_bank_size=20,
    )
    seen = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["attn"] = (
                pl_module.model.config._attn_implementation,
                kd.teacher_model.config._attn_implementation,
            )

    record = StepOutputs()
    make_trainer(tmp_path, [kd, Probe(), record], max_steps=3).fit(module, causal_loader())
    assert kd.plan.attention_pairs == {"attentions": [(0, 1), (1, 3)]}  # uniform: 2 student layers, 4 teacher
    assert seen["attn"] == ("eager", "eager")
    assert module.model.config._attn_implementation == "sdpa"  # restored at teardown
    assert next(kd.teacher_model.parameters()).dtype == torch.bfloat16
    assert set(module.kd_projections) == {"hidden_0", "contrastive"}
    assert kd.bank.tensor.shape == (20, 48)
    for metrics in record.metrics:
        terms = [metrics[f"compress/kd/{k}"] for k in ("logits", "hidden", "attention", "contrastive")]
        assert all(torch.isfinite(torch.tensor(terms))) and all(v > 0 for v in terms)


def test_encoder_decoder_t5_all_terms(tmp_path):
    torch.manual_seed(0)
    module = Seq2SeqLMModule(config=TINY_T5, lr=1e-2)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    kd = DistillationCallback(  # teacher = the starting model, rebuilt from the config
        hidden_scale=1.0,
        hidden_map=["encoder.block.1:encoder.block.1", "decoder.block.0:decoder.block.1"],
        attention_scale=1.0,
        contrastive_scale=1.0,
    )
    record = StepOutputs()
    make_trainer(tmp_path, [kd, record], max_steps=2).fit(module, seq2seq_loader())
    assert kd.plan.hidden_sides == ["encoder", "decoder"]
    assert set(kd.plan.attention_pairs) == {"encoder_attentions", "decoder_attentions"}
    assert record.metrics[0]["compress/kd/logits"] == pytest.approx(
        0.0, abs=1e-6
    )  # teacher == student at step 0
    assert record.metrics[1]["compress/kd/logits"] > 1e-6 and record.metrics[1]["compress/kd/hidden"] > 0
    for key, value in kd.teacher_model.state_dict().items():  # the teacher is the untrained start
        assert torch.equal(value, initial[key]), key
    assert not any(p is q for p in module.parameters() for q in kd.teacher_model.parameters())


def test_padding_changes_no_kd_term(tmp_path):
    """Extra padded positions (with any token ids) leave every logged distillation term unchanged."""
    ids = torch.randint(2, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    padded_ids = torch.cat([ids, torch.randint(2, 256, (2, 4))], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 4, dtype=torch.long)], dim=1)
    values = []
    for batch in (
        {"input_ids": ids, "labels": ids},
        {"input_ids": padded_ids, "attention_mask": mask, "labels": padded_ids},
    ):
        kd = DistillationCallback(
            hidden_scale=1.0,
            hidden_map=["model.layers.0:model.layers.1"],
            attention_scale=1.0,
            contrastive_scale=1.0,
        )
        module, record = student(), StepOutputs()
        loader = torch.utils.data.DataLoader(
            [{k: v[i] for k, v in batch.items()} for i in range(2)], batch_size=2
        )
        make_trainer(tmp_path, [kd, record], max_steps=1).fit(module, loader)
        values.append(
            {k: v for k, v in record.metrics[0].items() if k.startswith(("train/", "compress/kd/"))}
        )
    assert values[0].keys() == values[1].keys() and len(values[0]) == 5  # train/loss + four terms
    for key in values[0]:
        assert values[1][key] == pytest.approx(values[0][key], rel=1e-4, abs=1e-6), key


# --------------------------------------------------------------------------- a user's own module


def test_user_training_step_runs_and_loss_is_its_loss_scaled_plus_kd(tmp_path, wide_teacher):
    module, loader = ExtraLossModule(), causal_loader()
    assert not hasattr(module, "compute_loss")
    batch = next(iter(loader))
    teacher = CausalLMModule(name_or_path=str(wide_teacher)).model.eval()
    with torch.no_grad():  # hand computation at the initial weights
        out = module.backbone(**batch)
        extra_ref = extra_term(out.logits)
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl_ref = kl_reference(out.logits, t_logits, batch["attention_mask"].bool(), 2.0)
    kd = DistillationCallback(teacher=str(wide_teacher), temperature=2.0, task_scale=0.5, logits_scale=3.0)
    record = StepOutputs()
    trainer = make_trainer(tmp_path, [kd, record], max_steps=3)
    trainer.fit(module, loader)
    assert module.calls == 3 and kd.state["kd_steps"] == 3  # the user's training_step ran every step
    assert record.metrics[0]["train/extra"] == pytest.approx(float(extra_ref), rel=1e-5)
    assert "train/extra" in trainer.callback_metrics and "compress/kd/logits" in trainer.callback_metrics
    expected = 0.5 * (float(out.loss) + float(extra_ref)) + 3.0 * float(kl_ref)
    assert record.losses[0] == pytest.approx(expected, rel=1e-4)
    assert record.metrics[0]["compress/kd/logits"] == pytest.approx(3.0 * float(kl_ref), rel=1e-4)
    assert "training_step" not in module.__dict__


def test_network_found_in_backbone_by_default_and_by_network_argument(tmp_path):
    hidden = {"hidden_scale": 1.0, "hidden_map": ["model.layers.0:model.layers.1"]}
    module, kd = ExtraLossModule(), DistillationCallback(**hidden)  # the single pretrained model
    record = StepOutputs()
    make_trainer(tmp_path, [kd, record], max_steps=2).fit(module, causal_loader())
    assert record.metrics[1]["compress/kd/hidden"] > 0 and record.metrics[1]["compress/kd/logits"] > 0
    assert kd.state["kd_steps"] == 2

    two = lambda: ExtraLossModule(attr="student", second="reference")  # noqa: E731
    with pytest.raises(
        ValueError, match=r"compress.kd.network: .* holds several pretrained models \(.*student"
    ):
        make_trainer(tmp_path, [DistillationCallback(**hidden)], max_steps=1).fit(two(), causal_loader())
    module, kd = two(), DistillationCallback(network="student", **hidden)
    initial = {k: v.clone() for k, v in module.student.state_dict().items()}
    make_trainer(tmp_path, [kd], max_steps=1).fit(module, causal_loader())
    teacher_state = kd.teacher_model.state_dict()
    assert all(
        torch.equal(teacher_state[k], v) for k, v in initial.items()
    )  # the teacher is `student`'s start
    assert kd.state["kd_steps"] == 1


def test_manual_optimization_fails_in_setup_saying_why(tmp_path):
    with pytest.raises(TypeError, match=r"^compress.kd: add loss terms .* manual optimization"):
        make_trainer(tmp_path, [DistillationCallback()], max_steps=1).fit(ManualModule(), causal_loader())


def test_resume_guard_names_the_changed_shape_field(tmp_path):
    def kd(**kwargs) -> DistillationCallback:
        return DistillationCallback(
            hidden_scale=1.0, **{"hidden_map": ["model.layers.0:model.layers.1"], **kwargs}
        )

    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", save_last=True)
    make_trainer(tmp_path / "a", [kd(), ckpt], max_steps=2, enable_checkpointing=True).fit(
        student(), causal_loader()
    )
    last = tmp_path / "a" / "last.ckpt"
    with pytest.raises(
        ValueError,
        match=r"^compress.kd.hidden_map: the checkpoint .*last.ckpt was trained with \['model.layers.0:model.layers.1'\], "
        r"this run has \['model.layers.1:model.layers.1'\]",
    ):
        make_trainer(tmp_path / "b", [kd(hidden_map=["model.layers.1:model.layers.1"])], max_steps=3).fit(
            student(), causal_loader(), ckpt_path=last
        )
    with pytest.raises(
        ValueError, match=r"^compress.kd.memory_bank_size: the checkpoint .* with 0, this run has 8"
    ):
        make_trainer(tmp_path / "c", [kd(contrastive_scale=1.0, memory_bank_size=8)], max_steps=3).fit(
            student(), causal_loader(), ckpt_path=last
        )
    resumed = kd(temperature=3.0)  # not a shape field: resuming with another temperature is fine
    make_trainer(tmp_path / "d", [resumed], max_steps=3).fit(student(), causal_loader(), ckpt_path=last)
    assert resumed.state["kd_steps"] == 3


def test_a_second_fit_of_the_same_module_distils_again(tmp_path):
    module, kd = student(), DistillationCallback()  # the benchmarks refit one module with one callback
    make_trainer(tmp_path, [kd], max_steps=1).fit(module, causal_loader())
    make_trainer(tmp_path, [kd], max_steps=1).fit(module, causal_loader())
    assert kd.state["kd_steps"] == 2


def test_summary_is_primitives(tmp_path):
    kd = DistillationCallback(contrastive_scale=0.5)
    make_trainer(tmp_path, [kd], max_steps=1).fit(student(), causal_loader())
    assert kd.summary() == {"teacher": "student", "terms": ["logits", "contrastive"], "kd_steps": 1}


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("listed", ["canonical", "reversed"])
def test_with_pruning_and_quantization_the_teacher_stays_dense(tmp_path, listed):
    module = student()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    prune, quant, kd = (
        SparsityCallback(n=2, m=4),
        QuantizationCallback(),
        DistillationCallback(temperature=2.0),
    )
    callbacks = [prune, quant, kd] if listed == "canonical" else [kd, quant, prune]
    record = StepOutputs()
    make_trainer(tmp_path, [*callbacks, record], max_steps=2).fit(module, causal_loader())
    q_student = dict(module.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    q_teacher = kd.teacher_model.model.layers[0].self_attn.q_proj
    assert bool(((q_student.reshape(-1, 4) != 0).sum(-1) <= 2).all())  # student is 2:4 (and fake-quantized)
    assert type(q_teacher) is nn.Linear  # the teacher has no fake-quant wrapper, no mask
    assert torch.equal(
        q_teacher.weight, initial["model.layers.0.self_attn.q_proj.weight"]
    )  # dense, untouched
    assert not any("mask" in k or "quant" in k for k in kd.teacher_model.state_dict())
    assert record.metrics[0]["compress/kd/logits"] > 1e-4  # the compressed student differs from the teacher


class _WrapDownProj(CompressionCallback):
    """A compression callback that restructures the model in setup (a module swap)."""

    technique = "swap"

    def __init__(self, order: int) -> None:
        super().__init__()
        self.order = order

    def prepare_model(self, trainer, pl_module):
        layer = pl_module.model.model.layers[0].mlp
        replace_module(layer, "down_proj", nn.Sequential(layer.down_proj))


def test_teacher_student_follows_the_canonical_order_not_the_list_order(tmp_path):
    # a swap earlier in the canonical order than kd (50), listed after kd: the weights have moved
    with pytest.raises(
        ValueError, match=r"compress.kd.teacher: .*compress.swap \(earlier in the canonical order"
    ):
        make_trainer(tmp_path, [DistillationCallback(), _WrapDownProj(order=45)], max_steps=2).fit(
            student(), causal_loader()
        )
    module, kd = student(), DistillationCallback()  # a swap later than kd, listed first: teacher is pristine
    make_trainer(tmp_path, [_WrapDownProj(order=60), kd], max_steps=1).fit(module, causal_loader())
    assert isinstance(kd.teacher_model.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(module.model.model.layers[0].mlp.down_proj, nn.Sequential)


# --------------------------------------------------------------------------- the Hydra app


def test_app_plus_compress_kd_logs_kd_terms(compose):
    cfg = compose(
        "model=tiny_llama",
        "trainer=fast",
        "report=fast",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "data.batch_size=2",
        "data.block_size=32",
        "validate_before=false",
        "save_model=false",
        "callbacks=none",
        "+compress=[kd]",
        "compress.kd.hidden_scale=0.5",
        "compress.kd.hidden_map=[model.layers.1:model.layers.1]",
    )
    assert cfg.compress.kd._target_ == "lightcook.callbacks.distillation.DistillationCallback"
    summary = train(cfg)
    with open(Path(summary["run_dir"]) / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(r["compress/kd/logits"]) for r in rows if r.get("compress/kd/logits")]
    assert len(logged) == 2 and logged[0] == pytest.approx(0.0, abs=1e-6) and logged[1] > 0
    assert any(r.get("compress/kd/hidden") for r in rows) and any(r.get("train/loss") for r in rows)
    assert summary["compress"] == {"kd": {"teacher": "student", "terms": ["logits", "hidden"], "kd_steps": 2}}
    assert summary["val_ppl_after"] is not None


def test_kd_yaml_lists_and_comments_every_argument():
    path = CONFIG_DIR / "compress" / "kd.yaml"
    lines = path.read_text().splitlines()
    assert (
        lines[0] == "# @package compress.kd"
    )  # lands under cfg.compress.kd (Hydra 1.3 has no _group_/_name_)
    node = yaml.safe_load(path.read_text())
    fields = {f.name for f in dataclasses.fields(KDConfig)}
    assert set(node) - {"_target_"} == fields | {"name", "network"}  # every field; base args that apply
    for line in lines[1:]:
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith("_target_"):
            assert " # " in line, f"uncommented field: {line}"
    DistillationCallback(**{k: v for k, v in node.items() if k != "_target_"})  # the defaults are valid


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logits_scale": 0.0}, r"^compress.kd.logits_scale: every distillation scale is 0"),
        ({"logits_scale": -1.0}, r"^compress.kd.logits_scale: must lie in \[0.0, inf\], got -1.0"),
        ({"hidden_scale": float("inf")}, r"^compress.kd.hidden_scale: must be a finite number >= 0"),
        ({"hidden_scale": 1.0}, r"^compress.kd.hidden_map: hidden_scale > 0 needs"),
        (
            {"hidden_scale": 1.0, "hidden_map": ["model.layers.0"]},
            r"^compress.kd.hidden_map\[0\]: 'model.layers.0' is not",
        ),
        (
            {"hidden_scale": 1.0, "hidden_map": ["[mid]a:b"]},
            r"^compress.kd.hidden_map\[0\]: unknown point \[mid\]",
        ),
        (
            {"teacher_dtype": "int8"},
            r"^compress.kd.teacher_dtype: got 'int8'; allowed: None, 'auto', 'float32'",
        ),
        ({"temperature": 0}, r"^compress.kd.temperature: must be > 0"),
        ({"attention_kind": "l1"}, r"^compress.kd.attention_kind: got 'l1'; allowed: 'mse', 'kl'"),
        (
            {"attention_layers": ["0-1"]},
            r"^compress.kd.attention_layers\[0\]: expected 'student_layer:teacher_layer'",
        ),
        (
            {"contrastive_negatives": "queue"},
            r"^compress.kd.contrastive_negatives: got 'queue'; allowed: 'sequence', 'batch'",
        ),
        ({"memory_bank_size": -1}, r"^compress.kd.memory_bank_size: must lie in \[0, inf\]"),
        ({"projection": "yes"}, r"^compress.kd.projection: got 'yes'; allowed: True, False"),
        ({"teacher": ""}, r"^compress.kd.teacher: 'student' or a model path"),
        (
            {"tempreature": 2.0},
            r"^compress.kd.tempreature: unknown key; allowed: teacher, teacher_steps, start_from_teacher, teacher_dtype",
        ),
        ({"logits_scale": 0.0, "name": "kd2"}, r"^compress.kd2.logits_scale: every distillation scale is 0"),
        ({"targets": ["*.mlp.*"]}, r"^compress.kd.targets: distillation selects no modules"),
        (
            {"config": KDConfig(), "temperature": 2.0},
            r"^compress.kd.temperature: given both in config= and as an option",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        DistillationCallback(**kwargs)
    assert str(info.value).count("compress.") == 1 or "compress.kd.projection" in str(
        info.value
    )  # prefix once


def test_config_object_or_options_and_no_positional_teacher():
    config = KDConfig(temperature=2.0, hidden_scale=1.0, hidden_map=["model.layers.0:model.layers.1"])
    assert DistillationCallback(config).config is config
    assert (
        DistillationCallback(
            temperature=2.0, hidden_scale=1.0, hidden_map=["model.layers.0:model.layers.1"]
        ).config
        == config
    )
    with pytest.raises(
        TypeError,
        match=r"compress.kd.config: must be a KDConfig, got str; or give its fields as keyword options",
    ):
        DistillationCallback("student")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"hidden_scale": 1.0, "hidden_map": ["model.layers.7:model.layers.1"]},
            r"^compress.kd.hidden_map\[0\]: the student has no module 'model.layers.7'",
        ),
        (
            {"hidden_scale": 1.0, "hidden_map": ["model.layers.1:model.layers.9"]},
            r"^compress.kd.hidden_map\[0\]: the teacher has no module 'model.layers.9'",
        ),
        (
            {"hidden_scale": 1.0, "hidden_map": ["model.layers.1:model.layers.3"], "projection": False},
            r"^compress.kd.hidden_map\[0\]: widths differ \(student 32, teacher 48\) and projection is false",
        ),
        (
            {"contrastive_scale": 1.0, "projection": False},
            r"^compress.kd.contrastive_scale: widths differ \(student 32, teacher 48\)",
        ),
        (
            {"attention_scale": 1.0, "attention_layers": ["1:4"]},
            r"^compress.kd.attention_layers: pair 1:4 is out of range",
        ),
    ],
)
def test_bad_maps_fail_in_setup(tmp_path, wide_teacher, kwargs, match):
    kd = DistillationCallback(teacher=str(wide_teacher), **kwargs)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [kd], max_steps=2).fit(student(), causal_loader())


def test_vocabulary_mismatch_and_missing_teacher(tmp_path):
    other = tmp_path / "other_vocab"
    CausalLMModule(config={**TINY_LLAMA, "vocab_size": 300}).model.save_pretrained(other)
    with pytest.raises(
        ValueError, match=r"^compress.kd.teacher: vocabulary mismatch: .* 300 tokens, the student 256"
    ):
        make_trainer(tmp_path, [DistillationCallback(teacher=str(other))], max_steps=2).fit(
            student(), causal_loader()
        )
    with pytest.raises(ValueError, match=r"compress.kd.teacher="):
        make_trainer(tmp_path, [DistillationCallback(teacher=str(tmp_path / "nowhere"))], max_steps=2).fit(
            student(), causal_loader()
        )


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_teacher_is_the_pretrained_model_even_when_pruned(tmp_path):
    from lightcook.data import TextDataModule

    module = CausalLMModule(name_or_path="smollm2-135m-instruct", lr=1e-5)
    reference = module.model.model.layers[3].mlp.up_proj.weight.detach().clone()
    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=128, batch_size=2)
    prune, kd = SparsityCallback(n=2, m=4), DistillationCallback(temperature=2.0)
    record = StepOutputs()
    make_trainer(tmp_path, [prune, kd, record], max_steps=2).fit(module, data)
    assert torch.equal(kd.teacher_model.model.layers[3].mlp.up_proj.weight, reference)
    assert record.metrics[0]["compress/kd/logits"] > 0.05  # 2:4 pruning moved the student away


# --------------------------------------------------------------------------- DDP


class _DDPProbe(Callback):
    """Inside each rank: the teacher is outside the DDP wrapper and identical across ranks."""

    def __init__(self, kd: DistillationCallback, out: Path) -> None:
        self.kd, self.out = kd, str(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = trainer.strategy.model
        assert isinstance(wrapped, DistributedDataParallel)
        teacher = {id(p) for p in self.kd.teacher_model.parameters()}
        assert not teacher & {id(p) for p in wrapped.parameters()}
        projection = {id(p) for p in pl_module.kd_projections.parameters()}
        optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        synced = projection <= {id(p) for p in wrapped.parameters()} and projection <= optimized
        q = self.kd.teacher_model.model.layers[0].self_attn.q_proj.weight
        mark = Path(self.out, f"rank{trainer.global_rank}-step{trainer.global_step}")
        mark.write_text(f"{float(q.sum()):.6f} projection trained and synced: {synced}")


@pytest.mark.slow
def test_two_process_ddp_spawn(tmp_path, wide_teacher):
    kd = DistillationCallback(
        teacher=str(wide_teacher), hidden_scale=1.0, hidden_map=["model.layers.1:model.layers.3"]
    )
    trainer = make_trainer(
        tmp_path, [kd, _DDPProbe(kd, tmp_path)], max_steps=2, strategy="ddp_spawn", devices=2
    )
    module = student()
    trainer.fit(module, causal_loader(rows=8))
    marks = {p.name: p.read_text() for p in tmp_path.glob("rank*-step*")}
    assert set(marks) == {f"rank{r}-step{s}" for r in (0, 1) for s in (0, 1)}
    assert len(set(marks.values())) == 1  # the same frozen teacher on both ranks, unchanged by steps
    assert next(iter(marks.values())).endswith("projection trained and synced: True")
    # ddp_spawn trains in child processes: the parent module never gets the setup-time projections
    # (nor other callbacks' masks); use strategy=ddp (re-launched ranks) to keep them.


def test_distillation_only_trains_on_batches_without_labels(tmp_path):
    """task_scale=0: batches without labels give the module no loss; the KD terms alone are the loss."""
    rows = [{k: v for k, v in row.items() if k != "labels"} for row in causal_loader().dataset]
    unlabelled = torch.utils.data.DataLoader(rows, batch_size=2)
    torch.manual_seed(1)
    CausalLMModule(config=TINY_LLAMA).model.save_pretrained(tmp_path / "teacher")  # another tiny Llama
    module = student()
    before = [p.detach().clone() for p in module.parameters()]
    kd = DistillationCallback(teacher=str(tmp_path / "teacher"), task_scale=0.0)
    trainer = make_trainer(tmp_path, [kd], max_steps=2)
    trainer.fit(module, unlabelled)
    assert kd.state["kd_steps"] == 2 and "train/loss" not in trainer.callback_metrics
    assert torch.equal(
        trainer.callback_metrics["compress/loss"], trainer.callback_metrics["compress/kd/logits"]
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))  # it trained
