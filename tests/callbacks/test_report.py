"""CompressionReport in real Lightning runs: estimates against the measured export (quant + 2:4,
structured pruning, dense), the combined export reloaded and scored, plots, history across a crash
and resume, loggers, MoE expert load, misconfiguration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from transformers import LlamaConfig, LlamaForCausalLM

from lightcook.callbacks.moefication import MoEficationCallback
from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.callbacks.report import (
    EXPERT_PNG,
    HISTORY_PNG,
    LAYERS_PNG,
    REPORT_JSON,
    REPORT_MD,
    CompressionReport,
    estimate_summary,
)
from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.callbacks.structured_pruning import StructuredPruningCallback
from lightcook.export import estimate_bytes, load_compressed, read_manifest, save_compressed
from lightcook.measure import safetensors_payload
from lightcook.modules import CausalLMModule
from tests.helpers import TINY_LLAMA, CrashAt, make_trainer, token_loader

# Big enough that tensors dominate the folder (manifest and safetensors header are a few KB).
CONFIG = {**TINY_LLAMA, "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128}
VOCAB = CONFIG["vocab_size"]


def tiny_module(config: dict | None = None, seed: int = 0) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(config=config or CONFIG, tokenizer=None, lr=1e-3)


class CountValidations(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def small_report(**kwargs) -> CompressionReport:
    settings = {"speed_batch": (2, 16), "speed_repeats": 2, "eval_batches": 2, "decode_tokens": 4}
    return CompressionReport(**{**settings, **kwargs})


def fit(root: Path, callbacks: list, module=None, max_steps: int = 4, vocab: int = VOCAB, **kwargs):
    module = module or tiny_module()
    settings = {"max_steps": max_steps, "val_check_interval": 2, "limit_val_batches": 2}
    trainer = make_trainer(root, callbacks, **{**settings, **kwargs})
    trainer.fit(module, token_loader(4, vocab=vocab), token_loader(2, seed=1, vocab=vocab))
    return module, trainer


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linears inside the repeated blocks (``model.layers.<i>...``), by name."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name
    }


def block_weights(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in block_linears(model).values())


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


# --------------------------------------------------------------------------- quant + 2:4


@pytest.fixture(scope="module")
def quant_nm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_nm")
    counter = CountValidations()
    report_cb = small_report()
    callbacks = [QuantizationCallback(), SparsityCallback(mode="nm"), report_cb, counter]
    module, trainer = fit(root, callbacks)
    report = json.loads((root / REPORT_JSON).read_text())
    assert report_cb.exports == {"compressed": str(root / "compressed")} and report_cb.report == report
    return root, module, report, counter.steps


def test_report_files_and_plots(quant_nm_run):
    root, _, report, _ = quant_nm_run
    assert report["techniques"] == ["nm", "quantized"]
    assert sorted(report["compress"]) == ["prune", "quant"]
    assert set(report["callbacks"]) == {"compress.prune", "compress.quant"}
    assert report["plots"] == [LAYERS_PNG, HISTORY_PNG]
    for name in report["plots"]:
        assert_png(root / name)
    assert not (root / EXPERT_PNG).exists()
    text = (root / REPORT_MD).read_text()
    assert text.startswith("# Compression report") and "| 4 |" in text and LAYERS_PNG in text


def test_estimated_bytes_match_the_export(quant_nm_run):
    root, _, report, _ = quant_nm_run
    size = report["bytes"]
    folder = root / "compressed"  # the model, not the model card (nor a tokenizer) beside it
    assert size["measured"] == sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "README.md"
    )
    assert (folder / "README.md").is_file()
    assert size["estimated"] == size["tensors_measured"] == read_manifest(root / "compressed")["tensor_bytes"]
    assert abs(size["estimated"] - size["measured"]) / size["measured"] < 0.05  # + header and manifest
    assert size["dense_fp32"] == 4 * sum(p.numel() for p in tiny_module().model.parameters())  # tied once
    assert size["compression_ratio"] == pytest.approx(size["dense_fp32"] / size["measured"], rel=1e-3)


def test_bits_sparsity_ffn_and_history(quant_nm_run):
    _, _, report, validations = quant_nm_run
    # W8 on 2:4: 4 bits of kept codes + 1 bit of positions + one fp32 scale per row (32 / in bits)
    assert 5.0 < report["bits_per_weight"] < 5.6
    assert report["sparsity"] == 0.5 and report["ffn_fraction"] == 1.0
    assert all(layer["sparsity"] == 0.5 for layer in report["layers"]) and len(report["layers"]) == 14
    assert validations == [2, 4]
    assert [row["step"] for row in report["history"]] == validations
    row = report["history"][-1]
    assert row["sparsity"] == 0.5 and row["bits_per_weight"] == report["bits_per_weight"]
    assert row["val_ppl"] == report["ppl"]["val"] and row["val_ppl"] > 1


def test_export_is_what_the_live_model_computes(quant_nm_run):
    root, module, report, _ = quant_nm_run
    ppl = report["ppl"]
    assert ppl["eval_batches"] == 2 and ppl["eval_tokens"] == 2 * 2 * 15
    assert ppl["export"] == pytest.approx(ppl["live"], rel=1e-3)
    loaded = load_compressed(root / "compressed", backend="reference")  # exact: stored dtype
    ids = token_loader(1, seed=3, vocab=VOCAB).dataset[0]["input_ids"][None]
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits, atol=1e-4, rtol=1e-4)


def test_speed_is_measured(quant_nm_run):
    _, _, report, _ = quant_nm_run
    speed = report["speed"]
    assert speed["measured"] and speed["batch"] == [2, 16] and speed["threads"] == torch.get_num_threads()
    assert all(speed["seconds"][k] > 0 for k in ("compressed", "dense_fp32", "dense_bf16"))
    assert speed["speedup_vs_bf16"] == pytest.approx(
        speed["seconds"]["dense_bf16"] / speed["seconds"]["compressed"], rel=0.01
    )


def test_decode_is_measured_interleaved_against_both_dense_references(quant_nm_run):
    root, _, report, _ = quant_nm_run
    decode = report["speed"]["decode"]
    assert decode["measured"] and decode["new_tokens"] == 4 and decode["prompt_tokens"] == 16
    for name in ("compressed", "dense_fp32", "dense_bf16"):
        assert decode["tokens_per_second"][name] == pytest.approx(
            1 / decode["seconds_per_token"][name], rel=0.01
        )
        assert decode["prefill_seconds"][name] > 0 and decode["ttft_seconds"][name] > 0
    assert decode["speedup_vs_fp32"] == pytest.approx(
        decode["seconds_per_token"]["dense_fp32"] / decode["seconds_per_token"]["compressed"], rel=0.01
    )
    text = (root / REPORT_MD).read_text()
    assert "| decode, batch 1, 4 new tokens after 16: export / dense fp32 / dense bf16 |" in text
    assert f"{decode['speedup_vs_bf16']:.2f} x |" in text.split("decode speedup vs dense fp32 / bf16")[1]
    assert report["machine"]["torch"] == torch.__version__ and "Measured on: " in text


def test_the_export_records_the_base_model_for_the_bench(tmp_path):
    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    folder = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    module = CausalLMModule(name_or_path=str(folder), tokenizer=None)
    report = small_report(measure_speed=False, eval_batches=0, plots=False)
    fit(tmp_path / "run", [QuantizationCallback(), report], module=module, vocab=TINY_LLAMA["vocab_size"])
    assert read_manifest(tmp_path / "run" / "compressed")["base_model"] == str(folder)


def test_decode_skipped_when_off_or_no_room(tmp_path):
    report = small_report(decode_tokens=0, eval_batches=0, plots=False)
    fit(tmp_path / "off", [QuantizationCallback(), report], max_steps=2)
    decode = report.report["speed"]["decode"]
    assert decode == {"measured": False, "new_tokens": 0, "note": "decode_tokens=0: not measured"}
    report = small_report(decode_tokens=TINY_LLAMA["max_position_embeddings"], eval_batches=0, plots=False)
    fit(
        tmp_path / "full",
        [QuantizationCallback(), report],
        module=tiny_module(TINY_LLAMA),
        max_steps=2,
        vocab=256,
    )
    assert "leaves no room" in report.report["speed"]["decode"]["note"]
    assert "Note: decode: context 128 leaves no room" in (tmp_path / "full" / REPORT_MD).read_text()


# --------------------------------------------------------------------------- other combinations


def test_quant_only_is_about_8_bits_and_logs_to_the_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    report = CompressionReport(export_dir=None, measure_speed=False, plots=False)
    fit(tmp_path, [QuantizationCallback(), report], max_steps=2, logger=logger)
    (row,) = report.history
    assert 8.0 < row["bits_per_weight"] < 8.6 and row["sparsity"] == 0.0  # + one fp32 scale per row
    saved = json.loads((tmp_path / REPORT_JSON).read_text())
    assert saved["export_dir"] is None and saved["bytes"]["measured"] is None and saved["techniques"] == []
    assert not (tmp_path / "compressed").exists() and saved["ppl"]["export"] is None
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"report/bytes_estimated", "report/bits_per_weight", "report/sparsity"} <= set(header)


def test_structured_pruning_estimate_tracks_the_sliced_export(tmp_path):
    # uniform init: gates close within these 4 steps (Taylor-ranked gates start higher and need more)
    pruning = StructuredPruningCallback(target_sparsity=0.5, end_step=2, gate_lr=0.5, init="uniform")
    fit(tmp_path, [pruning, small_report(measure_speed=False)], max_steps=4)
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert report["techniques"] == ["structured"]
    size = report["bytes"]
    assert size["estimated"] == size["tensors_measured"]
    assert report["sparsity"] > 0 and report["ppl"]["export"] == pytest.approx(
        report["ppl"]["live"], rel=1e-3
    )
    # sparsity: the block weights slicing removed, per weight of the dense (live) layers
    dense, stored = (
        block_weights(tiny_module().model),
        block_weights(load_compressed(tmp_path / "compressed")),
    )
    assert report["sparsity"] == pytest.approx(1 - stored / dense, abs=1e-4)
    assert {layer["name"] for layer in report["layers"]} == set(block_linears(tiny_module().model))
    removed = [layer for layer in report["layers"] if layer["sparsity"] == 1.0]
    assert all(layer["bits_per_weight"] == 0.0 for layer in removed)


def test_dense_model_estimate_counts_tied_weights_once(tmp_path):
    model = tiny_module(TINY_LLAMA).model
    summary = estimate_summary(model)
    assert summary["bytes_estimated"] == 4 * sum(
        p.numel() for p in model.parameters()
    )  # parameters() dedupes
    export = save_compressed(model, tmp_path / "dense")
    assert summary["bytes_estimated"] == safetensors_payload(export)
    assert summary["bits_per_weight"] == 32.0 and summary["sparsity"] == 0.0
    assert summary["ffn_fraction"] == 1.0 and len(summary["layers"]) == len(block_linears(model)) == 14
    half = estimate_summary(model, dtype=torch.bfloat16)
    assert half["bits_per_weight"] == 16.0
    assert half["bytes_estimated"] == safetensors_payload(
        save_compressed(model, tmp_path / "bf16", dtype=torch.bfloat16)
    )


def test_summary_is_the_export_estimate_per_live_weight():
    model = tiny_module(TINY_LLAMA).model
    proj = model.model.layers[0].mlp.up_proj
    proj.register_buffer(
        "weight_mask",
        torch.tensor([True, False, True, False]).repeat(proj.out_features, proj.in_features // 4),
    )
    summary, estimate = estimate_summary(model), estimate_bytes(model)
    assert summary["bytes_estimated"] == estimate["tensor_bytes"]
    assert summary["bits_per_weight"] == pytest.approx(
        8 * estimate["weight_bytes"] / estimate["block_params"]
    )
    (row,) = [layer for layer in summary["layers"] if layer["name"] == "model.layers.0.mlp.up_proj"]
    assert row["sparsity"] == 0.5 and row["params"] == proj.weight.numel()
    assert row["bits_per_weight"] == pytest.approx(
        8 * estimate["layers"][row["name"]]["weight_bytes"] / row["params"]
    )
    assert summary["sparsity"] == pytest.approx(0.5 * proj.weight.numel() / estimate["block_params"])
    unpacked = estimate_summary(model, nm=None)  # a mask the export does not pack: stored dense
    assert unpacked["sparsity"] == summary["sparsity"] and unpacked["bits_per_weight"] == 32.0


def test_moe_expert_load_heatmap(tmp_path):
    moe = MoEficationCallback(num_experts=8, top_k=2, calibration_batches=1, router_steps=5)
    fit(tmp_path, [moe, small_report(measure_speed=False)], module=tiny_module(TINY_LLAMA), vocab=256)
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert report["ffn_fraction"] == 0.25 and report["techniques"] == ["moe"]
    # the export's router rule: routers are stored (in the bytes) but not weight bytes of a layer
    assert report["bytes"]["estimated"] == report["bytes"]["tensors_measured"]
    assert not [layer for layer in report["layers"] if ".router" in layer["name"]]
    assert report["bits_per_weight"] == 32.0 and report["sparsity"] == 0.0
    load = report["expert_load"]
    assert len(load["tokens"]) == 2 and all(len(row) == 8 for row in load["tokens"])
    assert all(sum(row) == 2 * 2 * 16 * 2 for row in load["tokens"])  # 2 val batches x 2 x 16 tokens x top-2
    assert EXPERT_PNG in report["plots"]
    assert_png(tmp_path / EXPERT_PNG)


def test_without_compression_callbacks_nothing_is_exported(tmp_path):
    report = small_report()
    fit(tmp_path, [report], max_steps=2)
    assert len(report.history) == 1 and report.history[0]["bits_per_weight"] == 32.0
    assert not (tmp_path / "compressed").exists() and not (tmp_path / REPORT_JSON).exists()
    assert report.exports == {} and report.report == {}


# --------------------------------------------------------------------------- resume


def _resume_run(root: Path, crash_at: int | None = None, ckpt_path: str | None = None):
    report = CompressionReport(export_dir=None, measure_speed=False, plots=False, eval_batches=0)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)
    extra = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = make_trainer(
        root,
        [QuantizationCallback(), report, ckpt, *extra],
        max_steps=6,
        enable_checkpointing=True,
        val_check_interval=2,
        limit_val_batches=1,
    )
    trainer.fit(tiny_module(TINY_LLAMA), token_loader(6), token_loader(1, seed=1), ckpt_path=ckpt_path)
    return report


def test_history_survives_crash_and_resume(tmp_path):
    straight = _resume_run(tmp_path / "straight")
    assert [row["step"] for row in straight.history] == [2, 4, 6]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(tmp_path / "crashed", crash_at=5)
    state = torch.load(tmp_path / "crashed" / "ckpt" / "last.ckpt", weights_only=True)  # primitives only
    assert [row["step"] for row in state["callbacks"]["CompressionReport"]["history"]] == [2, 4]
    resumed = _resume_run(tmp_path / "crashed", ckpt_path=str(tmp_path / "crashed" / "ckpt" / "last.ckpt"))
    assert resumed.history[:2] == straight.history[:2]  # restored from the checkpoint, not re-measured
    # after the resume the batches differ (a mid-epoch resume of a plain DataLoader), the estimates do not
    assert [{k: v for k, v in row.items() if k != "val_ppl"} for row in resumed.history] == [
        {k: v for k, v in row.items() if k != "val_ppl"} for row in straight.history
    ]


def test_state_dict_round_trip():
    report = CompressionReport()
    report.history.append({"step": 3, "val_ppl": 12.5, "bytes_estimated": 10})
    other = CompressionReport()
    other.load_state_dict(report.state_dict())
    assert other.history == report.history and other.history is not report.history


# --------------------------------------------------------------------------- misconfiguration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"export_dir": ""}, "report.export_dir"),
        ({"measure_speed": "yes"}, "report.measure_speed"),
        ({"plots": 1}, "report.plots"),
        ({"speed_batch": (4,)}, "report.speed_batch"),
        ({"speed_batch": (0, 8)}, "report.speed_batch"),
        ({"speed_repeats": 0}, "report.speed_repeats"),
        ({"eval_batches": -1}, "report.eval_batches"),
        ({"decode_tokens": -1}, "report.decode_tokens"),
        ({"decode_tokens": 1.5}, "report.decode_tokens"),
        ({"export_dtype": "int8"}, "report.export_dtype"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionReport(**kwargs)
