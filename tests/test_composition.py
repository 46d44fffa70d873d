"""Techniques combined: every pair and all five on a tiny Llama, one export, order independence, resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightcook.app import build_callbacks, build_datamodule, build_module, train
from lightcook.callbacks import QuantizationCallback, SparsityCallback, StructuredPruningCallback
from lightcook.callbacks.base import compression_callbacks
from lightcook.export import load_compressed, read_manifest, save_compressed

TECHNIQUES = ("moe", "structured", "prune", "quant", "kd")
#: What each technique leaves in the combined export's manifest (distillation changes only weights).
IN_MANIFEST = {"moe": "moe", "structured": "structured", "prune": "nm", "quant": "quantized"}
#: Settings that make every technique take effect within a few steps of the tiny model, and the
#: structured units that combine with N:M and MoE (whole heads and blocks; see test_conflicts).
SETTINGS = {
    "moe": [
        "compress.moe.num_experts=4",
        "compress.moe.top_k=2",
        "compress.moe.calibration_batches=2",
        "compress.moe.router_steps=5",
    ],
    "structured": [
        "compress.structured.units=[heads,attention_layers,ffn_layers]",
        "compress.structured.target_sparsity=0.3",
        "compress.structured.end_step=2",
        "compress.structured.droprate_init=0.3",  # fractional gate values: the export must fold them
    ],
    "prune": [],
    "quant": [],
    "kd": [],
}
TINY = ["model=tiny_llama", "trainer=fast", "trainer.max_steps=4", "report=fast"]


def overrides(names: tuple[str, ...], *extra: str) -> list[str]:
    return [f"+compress=[{','.join(names)}]", *TINY, *(o for n in names for o in SETTINGS[n]), *extra]


def fit_live(compose, names: tuple[str, ...], tmp_path: Path, steps: int = 6):
    """Fit the app's module/data/callbacks with a bare Trainer; return the live module and data."""
    chosen = [
        o for o in overrides(names, "callbacks=none", f"paths.run_dir={tmp_path}") if "report." not in o
    ]
    cfg = compose(*chosen, "report=none")
    torch.manual_seed(0)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    callbacks = build_callbacks(cfg)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule)
    return module, datamodule, compression_callbacks(callbacks)


@pytest.mark.parametrize("names", [*itertools.combinations(TECHNIQUES, 2), TECHNIQUES], ids="+".join)
def test_combination_exports_one_model_that_computes_what_was_trained(compose, tmp_path, names):
    module, datamodule, callbacks = fit_live(compose, names, tmp_path)
    options = {k: v for cb in callbacks for k, v in cb.export_options().items()}
    path = save_compressed(module.model, tmp_path / "compressed", **options)
    manifest = read_manifest(path)
    assert manifest["techniques"] == [IN_MANIFEST[n] for n in TECHNIQUES if n in names and n in IN_MANIFEST]
    loaded = load_compressed(path, backend="reference")  # the stored float32, reference modules
    fast = load_compressed(path)  # the default: bfloat16 and the load-time kernels
    ids = next(iter(datamodule.val_dataloader()))["input_ids"][:2]
    module.model.eval()
    with torch.no_grad():
        live, exported = module.model(input_ids=ids).logits, loaded(input_ids=ids).logits
        default = fast(input_ids=ids).logits.float()
    # bfloat16 activations (8 bits of mantissa) through 2 layers: within a few percent of the logit scale
    assert (live - default).abs().max().item() < 0.05 * live.abs().max().item()
    # Gate values fold into whole rows of v/up projections (int8 codes unchanged), but cutting the
    # input columns of a per-row quantized output projection re-derives a row's scale when a removed
    # column held its largest weight (structured + quant); every other combination is exact.
    approximate = "structured" in names and "quant" in names
    tolerance = 0.02 if approximate else 1e-4
    assert (live - exported).abs().max().item() < tolerance * live.abs().max().item()
    if "prune" in names:  # the N:M pattern survived every other technique's changes
        n, m = manifest["nm"]["n"], manifest["nm"]["m"]
        assert manifest["nm"]["layers"] or manifest["nm"]["quantized"]
        for name, q in manifest.get("quantized", {}).items():
            assert q.get("nm") == [n, m], name
    if "quant" in names:
        assert manifest["weight_bytes"] < 0.3 * manifest["fp32_weight_bytes"]
    if names == TECHNIQUES:  # shipped in bfloat16 (embeddings, norms, experts): still the same model
        half = load_compressed(
            save_compressed(module.model, tmp_path / "bf16", dtype=torch.bfloat16, **options)
        )
        with torch.no_grad():
            logits = half(input_ids=ids).logits.float()
        assert half.dtype == torch.bfloat16
        assert (live - logits).abs().max().item() < 0.15 * live.abs().max().item()
    compressed_layers = [*manifest.get("quantized", {}), *manifest.get("nm", {}).get("layers", {})]
    assert compressed_layers or not {"prune", "quant"} & set(names)
    assert not [n for n in compressed_layers if ".router." in n]  # MoE routers stay as trained


def test_full_combination_through_the_app_ignores_command_line_order(compose, tmp_path):
    runs = {}
    for order in (TECHNIQUES, tuple(reversed(TECHNIQUES))):
        summary = train(compose(*overrides(order, f"paths.run_dir={tmp_path / '-'.join(order)}")))
        assert math.isfinite(summary["val_ppl_after"])
        export = Path(summary["exports"]["compressed"])
        runs[order] = (summary, load_file(export / "model.safetensors"), read_manifest(export))
    (a, tensors_a, manifest_a), (b, tensors_b, manifest_b) = runs.values()
    assert a["val_ppl_after"] == b["val_ppl_after"]
    assert manifest_a["techniques"] == manifest_b["techniques"] == ["moe", "structured", "nm", "quantized"]
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def test_four_way_combination_resumes_exactly(compose, tmp_path):
    """A run that crashes at step 3 and is restarted (``ckpt_path=auto``) ends where an uninterrupted
    run ends: same trained weights, same combined export (MoE split, masks, quantizers, KD)."""
    names = ("moe", "prune", "quant", "kd")
    every_step = "callbacks.model_checkpoint.every_n_train_steps=1"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose(*overrides(names, "trainer.max_steps=6", every_step, f"paths.run_dir={straight}")))
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAt", "+callbacks.crash.step=3"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            compose(*overrides(names, "trainer.max_steps=6", every_step, *crash, f"paths.run_dir={resumed}"))
        )
    second = train(compose(*overrides(names, "trainer.max_steps=6", every_step, f"paths.run_dir={resumed}")))
    assert second["resumed_from"] == str(resumed / "checkpoints" / "last.ckpt")
    # the trained weights (a compressed run keeps them in its last checkpoint, not in model/) ...
    a, b = (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for run in (straight, resumed)
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "checkpoint"
    # ... and the combined export made from them
    a, b = (load_file(run / "compressed" / "model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "compressed"


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (
            lambda: [
                StructuredPruningCallback(target_sparsity=0.3, units=["heads", "neurons"]),
                SparsityCallback(),
            ],
            r"compress.prune cannot be combined with compress.structured: slicing single FFN neurons",
        ),
        (
            lambda: [SparsityCallback(sr_ste_decay=2e-4), QuantizationCallback()],
            r"compress.prune cannot be combined with compress.quant: SR-STE",
        ),
        (
            lambda: [StructuredPruningCallback(target_sparsity=0.3), QuantizationCallback(method="lsq")],
            r"compress.quant cannot be combined with compress.structured: .*method='lsq'",
        ),
    ],
    ids=["nm+neurons", "sr_ste+quant", "lsq+slicing"],
)
def test_combinations_that_cannot_work_fail_in_setup_naming_both(tmp_path, callbacks, match):
    from lightcook.modules import CausalLMModule
    from tests.helpers import TINY_LLAMA, random_batch

    module = CausalLMModule(config=TINY_LLAMA, tokenizer=None)
    data = torch.utils.data.DataLoader([random_batch(batch=1, seed=i) for i in range(2)], batch_size=None)
    trainer = L.Trainer(
        max_steps=1,
        callbacks=callbacks(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises((ValueError, RuntimeError), match=match):
        trainer.fit(module, data)


def test_moe_and_neuron_pruning_conflict_names_both(compose):
    with pytest.raises(ValueError, match=r"compress.moe cannot be combined with compress.structured"):
        train(compose("+compress=[structured,moe]", *TINY, *SETTINGS["moe"]))


def test_nm_masks_before_the_expert_split_are_rejected(compose):
    with pytest.raises(ValueError, match=r"set compress.prune.start_step >= compress.moe.split_step"):
        train(compose("+compress=[moe,prune]", *TINY, *SETTINGS["moe"], "compress.moe.split_step=2"))


@pytest.mark.parametrize(
    ("selection", "match"),
    [
        ("+compress=[]", r"compress: the list is empty"),
        ("+compress=[quant,quant]", r"compress: \['quant'\] given twice"),
        ("+compress=[quant,nope]", r"compress: unknown technique\(s\) \['nope'\]; available: \['kd'"),
        ("+compress=[none,quant]", r"compress: 'none' \(the uncompressed baseline\) stands alone"),
    ],
)
def test_bad_compress_selection_is_a_clear_error(compose, selection, match):
    with pytest.raises(ValueError, match=match):
        compose(selection, "model=tiny_llama")


def test_wanda_masks_are_the_same_with_fake_quant_installed_after_them(tmp_path):
    """Fake-quant (order 40) replaces the Linear objects the sparsity callback (order 30) selected:
    Wanda's input statistics must come from the layers that actually run (it once scored random
    masks: 49% agreement)."""
    from lightcook.modules import CausalLMModule
    from tests.helpers import TINY_LLAMA, make_trainer, token_loader

    def masks(callbacks):
        torch.manual_seed(0)
        module = CausalLMModule(config=TINY_LLAMA, tokenizer=None)
        make_trainer(tmp_path, callbacks, max_steps=1).fit(module, token_loader())
        return {n: b.clone() for n, b in module.model.named_buffers() if n.endswith("weight_mask")}

    wanda = masks([SparsityCallback(criterion="wanda", calibration_batches=2)])
    with_quant = masks([SparsityCallback(criterion="wanda", calibration_batches=2), QuantizationCallback()])
    magnitude = masks([SparsityCallback(criterion="magnitude")])

    def agreement(a, b):
        return sum((a[k] == b[k]).float().mean().item() for k in a) / len(a)

    # fake-quantized activations upstream move a few scores; magnitude masks differ far more
    assert agreement(wanda, with_quant) > 0.99 > 0.96 > agreement(wanda, magnitude)
