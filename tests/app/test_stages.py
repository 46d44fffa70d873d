"""lightcook.app.stages: ``compress.kd.teacher=finetune`` fine-tunes the dense teacher in
``<run_dir>/teacher`` first, distils from it (and starts the student from it), resumes without
refitting, and refuses a stage it cannot run before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightcook.app import train
from lightcook.callbacks.distillation import DistillationCallback
from tests.helpers import make_trainer, token_loader
from tests.helpers.quant_sparsity import tiny_module

STAGE = [
    "model=tiny_llama",
    "trainer=fast",
    "report=fast",
    "callbacks=none",
    "validate_before=false",
    "+compress=[kd]",
    "compress.kd.teacher=finetune",
    "compress.kd.teacher_steps=3",
]


def test_teacher_is_fine_tuned_first_and_the_student_starts_from_it(compose, tmp_path):
    run_dir = tmp_path / "run"
    job = [o for o in STAGE if o != "callbacks=none"]  # checkpoints: the second start resumes
    cfg = compose(
        *job, "compress.kd.start_from_teacher=true", "trainer.max_steps=2", f"paths.run_dir={run_dir}"
    )
    summary = train(cfg)
    stage = json.loads((run_dir / "teacher" / "summary.json").read_text())
    assert stage["train_steps"] == 3 and stage["compress"] == {}  # a dense job of its own
    assert summary["train_steps"] == 2 and summary["teacher_stage"] == {
        "node": "compress.kd",
        "run_dir": str(run_dir / "teacher"),
        "model": str(run_dir / "teacher" / "model"),
        "steps": 3,
        "val_ppl": stage["val_ppl_after"],
        "start_from_teacher": True,
        "reused": False,
    }
    recorded = (run_dir / "config.yaml").read_text()
    assert (
        f"teacher: {run_dir / 'teacher' / 'model'}" in recorded
        and f"name_or_path: {run_dir / 'teacher' / 'model'}" in recorded
    )
    # the teacher is the fine-tuned folder, not the random start: its weights differ from the seed's init
    teacher = AutoModelForCausalLM.from_pretrained(run_dir / "teacher" / "model")
    fresh = train(
        compose(
            "model=tiny_llama",
            "trainer=fast",
            "callbacks=none",
            "trainer.max_steps=1",
            "validate_before=false",
            f"paths.run_dir={tmp_path / 'one'}",
        )
    )
    one_step = load_file(Path(fresh["loadable_model"]) / "model.safetensors")
    assert any(not torch.equal(t, one_step[k]) for k, t in teacher.state_dict().items() if k in one_step)

    # a second start of the same run: the finished stage is reused, not refitted; the job resumes
    mtime = (run_dir / "teacher" / "model" / "model.safetensors").stat().st_mtime_ns
    again = train(
        compose(
            *job, "compress.kd.start_from_teacher=true", "trainer.max_steps=3", f"paths.run_dir={run_dir}"
        )
    )
    assert again["teacher_stage"]["reused"] is True and again["train_steps"] == 3
    assert again["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert (run_dir / "teacher" / "model" / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["compress.kd.teacher_steps=0"],
            r"compress\.kd\.teacher_steps: teacher=finetune needs teacher_steps >= 1",
        ),
        (["compress.kd.teacher=student"], r"compress\.kd\.teacher_steps: only used with teacher=finetune"),
        (["compress.kd.start_from_teacher=yes"], r"compress\.kd\.start_from_teacher"),
        (["compress.prune.n=5", "+compress=[prune]"], r"compress\.prune"),
    ],
)
def test_a_stage_that_cannot_run_fails_before_any_training(compose, tmp_path, overrides, match):
    plus = [o for o in overrides if o.startswith("+compress")]
    rest = [o for o in overrides if not o.startswith("+compress")]
    stage = [*STAGE[:5], "+compress=[kd,prune]" if plus else STAGE[5], *STAGE[6:]]
    with pytest.raises(ValueError, match=match):
        train(compose(*stage, *rest, f"paths.run_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_finetune_outside_the_app_is_refused_in_setup(tmp_path):
    kd = DistillationCallback(teacher="finetune", teacher_steps=2)
    trainer = make_trainer(tmp_path, [kd], max_steps=1)
    with pytest.raises(ValueError, match=r"compress\.kd\.teacher: 'finetune' is a stage of the app"):
        trainer.fit(tiny_module(), token_loader())
