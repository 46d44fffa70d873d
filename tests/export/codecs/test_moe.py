"""MoE codec: the folder reloads as the MoE model (sparse FFNs) with the same outputs; the estimate
equals the written tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightcook.callbacks.moefication import MoEficationCallback
from lightcook.export import estimate_bytes, load_compressed, read_manifest, save_compressed
from lightcook.export.format import nbytes, read_tensors
from lightcook.ops.moe import MoEFFN, moe_modules, set_top_k
from tests.helpers import TINY_LLAMA, random_batch

TINY_GPT2 = {
    "model_type": "gpt2",
    "vocab_size": 256,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_model(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).eval()


def moefied(config: dict, router: str = "mlp", relufy: bool = False, **kwargs):
    """A tiny HF model MoEfied by the callback's own split (no Trainer), plus a dense copy."""
    model, dense = hf_model(config), hf_model(config)
    cb = MoEficationCallback(
        num_experts=8,
        top_k=2,
        router=router,
        calibration_batches=2,
        router_steps=20,
        router_hidden=16,
        **kwargs,
    )
    cb.prepare_model(None, model)
    if relufy:
        for moe in cb.moe_modules.values():
            moe.set_relu(True)
    cb.split_experts(model, [random_batch(seed=s) for s in range(2)])
    return model.eval(), dense


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("router", ["mlp", "centroid"])
def test_export_reloads_as_the_moe_model(tmp_path, config, router):
    model, dense = moefied(config, router)
    path = save_compressed(model, tmp_path / "moe")
    manifest = read_manifest(path)
    assert manifest["techniques"] == ["moe"] and len(manifest["moe"]) == 2
    assert all(spec["num_experts"] == 8 and spec["top_k"] == 2 for spec in manifest["moe"].values())
    loaded = load_compressed(path, backend="reference")
    assert sorted(moe_modules(loaded)) == sorted(moe_modules(model))
    assert all(bool(m.routed) and m.top_k == 2 and not m.training for m in moe_modules(loaded).values())
    ids = random_batch(seed=7)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        set_top_k(loaded, 8)  # every expert: the dense model again
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def test_relufied_export_keeps_relu(tmp_path):
    model, _ = moefied(TINY_LLAMA, relufy=True)
    loaded = load_compressed(save_compressed(model, tmp_path / "moe"), backend="reference")
    assert all(bool(m.relu) for m in moe_modules(loaded).values())
    assert read_manifest(tmp_path / "moe")["moe"]["model.layers.0.mlp"]["relu"]
    ids = random_batch(seed=3)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_loaded_model_runs_the_sparse_path(tmp_path):
    model, _ = moefied(TINY_LLAMA)
    loaded = load_compressed(save_compressed(model, tmp_path / "moe"), backend="reference")
    moe = loaded.model.layers[0].mlp
    calls = []
    moe._sparse = (lambda original: lambda x: calls.append(x.shape) or original(x))(moe._sparse)
    with torch.no_grad():
        loaded(random_batch(seed=1)["input_ids"])
    assert calls == [torch.Size([2, 16, 32])]


def test_tied_embeddings_are_stored_once(tmp_path):
    model, _ = moefied(TINY_LLAMA)
    path = save_compressed(model, tmp_path / "moe")
    manifest = read_manifest(path)
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_compressed(path, backend="reference")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_unsplit_moe_ffn_reloads_computing_densely(tmp_path):
    model = hf_model(TINY_LLAMA)
    MoEficationCallback(num_experts=8, top_k=2).prepare_model(None, model)  # routing still off
    loaded = load_compressed(save_compressed(model.eval(), tmp_path / "b"), backend="reference")
    assert not any(bool(m.routed) for m in moe_modules(loaded).values())
    ids = random_batch(seed=2)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_estimate_equals_the_written_tensors(tmp_path, config, dtype):
    model, _ = moefied(config)
    out = save_compressed(model, tmp_path / "e", dtype=dtype)
    tensors = read_tensors(out)
    estimate, manifest = estimate_bytes(model, dtype=dtype), read_manifest(out)
    assert estimate["tensor_bytes"] == manifest["tensor_bytes"] == sum(nbytes(t) for t in tensors.values())
    assert estimate["weight_bytes"] == manifest["weight_bytes"]
    own = [t for k, t in tensors.items() if ".router." in k or k.endswith((".perm", ".routed", ".relu"))]
    assert estimate["by_technique"]["moe"] == sum(nbytes(t) for t in own) > 0
    assert not [name for name in estimate["layers"] if ".router." in name]  # routers: not weight bytes


def test_export_is_not_a_plain_dense_model_in_disguise(tmp_path):
    model, _ = moefied(TINY_LLAMA)
    loaded = load_compressed(save_compressed(model, tmp_path / "moe"), backend="reference")
    assert isinstance(loaded.model.layers[1].mlp, MoEFFN)
    assert loaded.model.layers[1].mlp.router.fc1.weight.requires_grad is False


def test_carved_export_round_trip_keeps_the_shared_experts(tmp_path):
    """A carved MoE (2 shared + top 2 of 6 routed, representative routers) reloads with the same
    logits; with every routed expert it is the dense model again."""
    model, dense = moefied(TINY_LLAMA, router="representative", split="carve", shared_experts=2)
    path = save_compressed(model, tmp_path / "carved")
    specs = read_manifest(path)["moe"]
    assert all(spec["shared_experts"] == 2 and spec["router"] == "representative" for spec in specs.values())
    loaded = load_compressed(path, backend="reference")
    moes = moe_modules(loaded)
    assert all(
        m.shared_experts == 2 and m.routed_experts == 6 and m.compute_fraction == 0.5 for m in moes.values()
    )
    assert all(not m.router.gate.requires_grad for m in moes.values())
    ids = random_batch(seed=5)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        set_top_k(loaded, 6)  # every routed expert
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
