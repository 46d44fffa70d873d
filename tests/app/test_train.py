"""lightcook.app.train end to end: tiny runs, resume (also mid-epoch after a crash), unreadable
checkpoints that fail before training, summary.json["compress"], multirun, W&B, DDP from the CLI."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

from lightcook.app import CONFIG_DIR, build_module, compose_config, train
from lightcook.app.train import compress_summaries
from tests.helpers import REPO
from tests.helpers.app import max_diff, weights

TINY = {
    "tiny_llama": "data=shakespeare",
    "tiny_gpt2": "data=shakespeare",
    "tiny_t5": "data=shakespeare_seq2seq",
}


class SummaryProbe(Callback):
    """A callback reporting a fixed outcome through ``summary()``."""

    def summary(self) -> dict:
        return {"sparsity": 0.25, "target_sparsity": 0.5, "reached": False}


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A finished 1-step tiny Llama run: (its config, its summary)."""
    out = tmp_path_factory.mktemp("one_step")
    cfg = compose_config(
        ["model=tiny_llama", "trainer=fast", "trainer.max_steps=1", f"paths.output_dir={out}"]
    )
    return cfg, train(cfg)


@pytest.mark.parametrize("model", sorted(TINY))
def test_train_tiny_model_end_to_end(compose, model):
    summary = train(compose(f"model={model}", TINY[model], "trainer=fast"))
    run = Path(summary["run_dir"])
    assert summary["train_steps"] == 4 and summary["parameters"] > 0
    assert summary["val_ppl_after"] < summary["val_ppl_before"]  # a random model learns something in 4 steps
    assert summary["bytes_on_disk"] > summary["parameters"] * 4 * 0.9
    for path in (
        "config.yaml",
        "summary.json",
        "checkpoints/last.ckpt",
        "csv/metrics.csv",
        "model/config.json",
    ):
        assert (run / path).is_file(), path
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["model"] == OmegaConf.load(CONFIG_DIR / "model" / f"{model}.yaml").config.model_type
    for key in (
        "parameters",
        "bytes_on_disk",
        "val_ppl_before",
        "val_ppl_after",
        "train_steps",
        "wall_seconds",
    ):
        assert on_disk[key] is not None, key
    assert on_disk["compress"] == {}  # no +compress
    # checkpoints load without unpickling arbitrary objects
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_saved_model_reloads_with_identical_logits(one_step):
    from transformers import AutoModelForCausalLM

    cfg, summary = one_step
    reloaded = AutoModelForCausalLM.from_pretrained(Path(summary["run_dir"]) / "model").eval()
    module = build_module(cfg)
    state = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(state["state_dict"])
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model.eval()(ids).logits)


@pytest.mark.parametrize(
    ("model", "compress", "changed", "model_format"),
    [
        ("tiny_llama", "[quant]", ["quantized"], "compressed-tensors"),
        ("tiny_llama", "[prune]", ["nm"], "compressed-tensors"),
        ("tiny_llama", "[moe]", ["moe"], "compressed-tensors"),
        ("tiny_llama", "[structured]", ["structured"], "compressed-tensors"),  # converted, zero-padded
        ("tiny_gpt2", "[quant]", ["quantized"], None),  # GPT-2's Conv1D: compressed-tensors quantizes Linears
        ("tiny_llama", "[unstructured,kd]", [], "transformers"),
    ],
)
def test_model_dir_is_the_trained_network_or_not_written(compose, model, compress, changed, model_format):
    """``<run_dir>/model`` reloads with plain transformers as the trained network — a
    compressed-tensors folder for quantized / N:M / MoE / structured runs (logits as the lightcook export's, within
    the activation-rounding bound of W8A8; MoE with its model file, ``trust_remote_code``),
    save_pretrained for unstructured + KD — or is not written (a quantized GPT-2), summary.json
    saying why; the lightcook folder then refuses plain ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from lightcook.export import load_compressed

    summary = train(
        compose(
            f"model={model}", "trainer=fast", "report=fast", f"+compress={compress}", "validate_before=false"
        )
    )
    run = Path(summary["run_dir"])
    assert json.loads((run / "summary.json").read_text())["loadable_model"] == summary["loadable_model"]
    assert summary.get("model_format") == model_format
    ids = torch.randint(0, 1000, (1, 12))
    if model_format is None:
        assert not (run / "model").exists() and summary["bytes_on_disk"] is None
        assert summary["loadable_model"] == str(run / "compressed")
        assert changed[0] in summary["model_not_saved"] and "load_compressed" in summary["model_not_saved"]
        with pytest.raises(ValueError, match="contains custom code"):
            AutoModelForCausalLM.from_pretrained(run / "compressed")  # loud, not re-initialised
        loaded = load_compressed(summary["loadable_model"])
        assert loaded.compressed_techniques == changed
        with torch.no_grad():
            assert torch.isfinite(loaded.eval()(ids).logits).all()
        return
    assert summary["loadable_model"] == str(run / "model") and "model_not_saved" not in summary
    plain = AutoModelForCausalLM.from_pretrained(run / "model", trust_remote_code=changed == ["moe"]).eval()
    if not changed:
        return
    own = load_compressed(run / "compressed", dtype=torch.float32, backend="reference")
    assert own.compressed_techniques == changed
    with torch.no_grad():
        got, ref = plain(ids).logits, own(ids).logits
    if changed in (["nm"], ["moe"], ["structured"]):
        assert torch.allclose(got, ref, atol=1e-5)
    else:  # W8A8: the two per-token activation roundings differ by at most one lightcook step
        assert (got - ref).abs().max() < 0.05 * ref.abs().max()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_resume_continues_from_last_checkpoint(compose, tmp_path):
    run_dir = tmp_path / "run"
    first = train(compose("model=tiny_llama", "trainer=fast", f"paths.run_dir={run_dir}"))
    assert first["resumed_from"] is None
    second = train(
        compose("model=tiny_llama", "trainer=fast", "trainer.max_steps=6", f"paths.run_dir={run_dir}")
    )
    assert second["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert second["train_steps"] == 6
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    logged = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert logged[:4] == [0, 1, 2, 3] and len(logged) == 6  # rows from before the resume are kept


def test_crash_mid_epoch_and_resume_equals_the_straight_run(compose, tmp_path):
    steps = ["model=tiny_llama", "trainer=fast", "data.block_size=32", "trainer.max_steps=6"]
    steps += ["trainer.limit_val_batches=0", "callbacks.model_checkpoint.every_n_train_steps=1"]
    straight = train(compose(*steps, f"paths.run_dir={tmp_path / 'straight'}"))
    run_dir = f"paths.run_dir={tmp_path / 'resumed'}"
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAt", "+callbacks.crash.step=3"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose(*steps, run_dir, *crash))
    resumed = train(compose(*steps, run_dir))  # ckpt_path: auto -> last.ckpt of step 3, mid-epoch
    assert resumed["resumed_from"] and resumed["train_steps"] == 6
    assert max_diff(weights(resumed["run_dir"]), weights(straight["run_dir"])) < 1e-6


# --------------------------------------------------------------------------- unreadable checkpoints


def _truncated_copy(one_step, tmp_path: Path) -> Path:
    data = (Path(one_step[1]["run_dir"]) / "checkpoints" / "last.ckpt").read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_ckpt_path_fails_before_training_naming_the_file(one_step, compose, tmp_path):
    cut = _truncated_copy(one_step, tmp_path)
    cfg = compose("model=tiny_llama", "trainer=fast", f"ckpt_path={cut}", f"paths.run_dir={tmp_path / 'run'}")
    with pytest.raises(ValueError, match=rf"ckpt_path: {cut}: truncated or corrupt \(\d+ bytes\)") as err:
        train(cfg)
    assert "weights_only" not in str(err.value)  # not torch's advice to unpickle arbitrary code
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_truncated_last_ckpt_under_auto_fails_naming_it(one_step, compose, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    _truncated_copy(one_step, tmp_path).rename(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"ckpt_path: .*/run/checkpoints/last.ckpt: truncated or corrupt"):
        train(compose("model=tiny_llama", "trainer=fast", f"paths.run_dir={run_dir}"))
    assert not (run_dir / "config.yaml").exists()


def test_missing_ckpt_path_names_the_key_and_path(compose, tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=rf"ckpt_path='{missing}': no such file"):
        train(compose("model=tiny_llama", "trainer=fast", f"ckpt_path={missing}"))


def test_explicit_ckpt_path_resumes(one_step, compose, tmp_path):
    last = Path(one_step[1]["run_dir"]) / "checkpoints" / "last.ckpt"
    extra = ["trainer.max_steps=2", "save_model=false", f"ckpt_path={last}"]
    summary = train(compose("model=tiny_llama", "trainer=fast", *extra))
    assert summary["resumed_from"] == str(last) and summary["train_steps"] == 2


# --------------------------------------------------------------------------- summary["compress"]


def test_summary_records_what_each_callback_reports(compose):
    probe = ["+compress.probe._target_=tests.app.test_train.SummaryProbe", "report=none"]
    summary = train(compose("model=tiny_llama", "trainer=fast", "trainer.max_steps=1", *probe))
    expected = {"probe": {"sparsity": 0.25, "target_sparsity": 0.5, "reached": False}}
    assert summary["compress"] == expected
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["compress"] == expected


def test_compress_summaries_lists_every_key_and_skips_what_is_not_a_dict():
    class Odd(Callback):
        def summary(self):
            return 0.5

    cfg = DictConfig({"compress": {"none": {}, "prune": {"_target_": "x"}}})
    callbacks = {"prune": Callback(), "odd": Odd(), "mine": SummaryProbe()}
    with pytest.warns(UserWarning, match=r"odd: Odd.summary\(\) returned a float, not a dict"):
        entries = compress_summaries(cfg, callbacks)
    assert entries == {"mine": SummaryProbe().summary(), "none": {}, "prune": {}}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.name_or_path=/no/such/model"], r"model.name_or_path='/no/such/model'"),
        (
            ["model=tiny_llama", "data=text", "data.paths=[/no/such/dir]"],
            r"data.paths: '/no/such/dir' does not exist",
        ),
        (["model=tiny_llama", "data=text", "data.paths=[EMPTY]"], r"data.paths: no non-empty text"),
        (
            ["model=tiny_llama", "data.block_size=1024"],
            r"data.block_size=1024 exceeds the model's context of 512",
        ),
    ],
)
def test_bad_input_names_the_key(compose, tmp_path, overrides, match):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    with pytest.raises(ValueError, match=match):
        train(compose(*overrides, "trainer=fast"))


# --------------------------------------------------------------------------- the command line


def _run_cli(args, tmp_path, timeout=300):
    """run.py from a foreign working directory (``tmp_path``), outputs under ``tmp_path/out``."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"paths.output_dir={tmp_path / 'out'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_cli_multirun(tmp_path):
    _run_cli(["-m", "model=tiny_llama", "trainer=fast", "trainer.max_steps=1,2", "callbacks=none"], tmp_path)
    summaries = sorted((tmp_path / "out" / "multiruns").glob("*/*/summary.json"))
    assert [json.loads(p.read_text())["train_steps"] for p in summaries] == [1, 2]


def test_cli_wandb_offline_writes_run_files(tmp_path):
    _run_cli(["model=tiny_llama", "trainer=fast", "logger=wandb", "callbacks=none"], tmp_path)
    (run,) = (tmp_path / "out" / "runs").iterdir()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert (run / "csv" / "metrics.csv").is_file()


def test_cli_wandb_gets_the_report_table_plots_cards_and_the_exports_as_an_artifact(tmp_path):
    """A compression run under ``logger=wandb`` (offline): the report's exports table, its plots as
    images and every export folder in one ``model`` artifact; every folder has its model card, with
    the exact command."""
    from tests.app.test_sweeps import _wandb_records

    args = ["model=tiny_llama", "trainer=fast", "logger=wandb", "+compress=[quant]", "validate_before=false"]
    args += ["report.formats=[gguf]", "report=fast"]
    _run_cli(args, tmp_path)
    (run,) = (tmp_path / "out" / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(Path(p).parent.name for p in summary["model_cards"]) == ["compressed", "gguf", "model"]
    card = (run / "gguf" / "README.md").read_text()
    assert "python run.py model=tiny_llama trainer=fast logger=wandb '+compress=[quant]'" in card
    assert 'gguf_file="model.gguf"' in card and "| Perplexity (held-out) |" in card
    (log,) = next((run / "wandb").glob("offline-run-*")).glob("run-*.wandb")
    records = _wandb_records(log)
    history = {
        tuple(i.nested_key) or (i.key,): json.loads(i.value_json)
        for r in records
        if r.HasField("history")
        for i in r.history.item
    }
    assert history[("report/exports", "_type")] == "table-file" and history[("report/exports", "nrows")] == 2
    assert history[("report/report_layers", "_type")] == "image-file"
    (artifact,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "model"]
    assert artifact.type == "model"
    paths = {entry.path for entry in artifact.manifest.contents}
    assert {
        "compressed/model.safetensors",
        "compressed/README.md",
        "gguf/model.gguf",
        "model/config.json",
    } <= paths
    metadata = json.loads(artifact.metadata)
    assert metadata["gguf"]["held-out ppl"] == pytest.approx(
        json.loads((run / "report.json").read_text())["formats"]["gguf"]["ppl"]
    )


def test_cli_ddp_two_cpu_processes_one_run_dir(tmp_path):
    _run_cli(["model=tiny_llama", "trainer=ddp", "trainer.max_steps=2", "callbacks=none"], tmp_path)
    (run,) = (tmp_path / "out" / "runs").iterdir()  # the re-launched rank did not make its own directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 2


def test_cli_bad_compress_selection_exits_with_the_message(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "run.py"), "+compress=[prune,prune]"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "error: compress: ['prune'] given twice" in done.stderr
