"""N:M codec: exact round trips (Llama with tied embeddings, GPT-2 Conv1D), byte counts equal to the
estimate, dtype casts, errors, and the semi-structured CUDA path (gpu marker)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightcook.callbacks.base import select_modules
from lightcook.export import estimate_bytes, load_compressed, read_manifest, save_compressed
from lightcook.export.format import TENSORS, nbytes, read_tensors
from lightcook.ops.sparsity import nm_mask, nm_storage_bytes

LLAMA = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
GPT2 = {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}


def pruned_model(kind: str = "llama", n: int = 2, m: int = 4, **overrides) -> torch.nn.Module:
    """A random HF model whose block Linears carry N:M masks and masked weights (as after training)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **{**(LLAMA if kind == "llama" else GPT2), **overrides})
    model = AutoModelForCausalLM.from_config(config)
    for module in select_modules(model).values():  # every Linear / Conv1D inside the blocks
        conv1d = type(module).__name__ == "Conv1D"
        w = module.weight.T if conv1d else module.weight  # (out, in)
        mask = nm_mask(w.abs(), n, m)
        module.register_buffer("weight_mask", mask.T.contiguous() if conv1d else mask)
        with torch.no_grad():
            module.weight.mul_(module.weight_mask)
    return model


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("weight_mask")}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_round_trip_is_exact(tmp_path, kind):
    model = pruned_model(kind)
    out = save_compressed(model, tmp_path / "sparse")
    manifest = read_manifest(out)["nm"]
    expected_layers = 2 * (7 if kind == "llama" else 4)
    assert len(manifest["layers"]) == expected_layers and manifest["n"] == 2 and manifest["m"] == 4
    loaded = load_compressed(out, backend="reference")
    a, b = plain_state(model), loaded.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.semi_structured_layers == [] and not loaded.training


def test_conv1d_layers_are_flagged_transposed(tmp_path):
    out = save_compressed(pruned_model("gpt2"), tmp_path / "g")
    layers = read_manifest(out)["nm"]["layers"]
    entry = layers["transformer.h.0.mlp.c_fc"]
    assert entry["transposed"] is True and entry["shape"] == [64, 256]


def test_tied_head_is_stored_once_and_retied(tmp_path):
    model = pruned_model("llama")
    out = save_compressed(model, tmp_path / "t")
    manifest = read_manifest(out)
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_compressed(out, backend="reference")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_packed_tensors_and_bytes(tmp_path):
    from safetensors.torch import load_file

    model = pruned_model("llama")
    out = save_compressed(model, tmp_path / "b", dtype=torch.float16)
    tensors = load_file(str(out / TENSORS))
    values = tensors["model.layers.0.mlp.down_proj.weight.values"]
    indices = tensors["model.layers.0.mlp.down_proj.weight.indices"]
    assert values.shape == (64, 64) and values.dtype == torch.float16  # (out, in // 4 * 2)
    assert indices.shape == (64, 16) and indices.dtype == torch.uint8  # 2 bits per kept weight
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    assert not any(k.endswith("weight_mask") for k in tensors)
    packed = sum(
        tensors[k].numel() * tensors[k].element_size() for k in tensors if k.endswith((".values", ".indices"))
    )
    estimate = estimate_bytes(model, dtype=torch.float16)
    assert packed == estimate["by_technique"]["nm"] == estimate["weight_bytes"]
    assert packed == (
        2 * (2 * nm_storage_bytes(64, 64, 2, 4, 2) + 2 * nm_storage_bytes(32, 64, 2, 4, 2))
        + 2 * (2 * nm_storage_bytes(128, 64, 2, 4, 2) + nm_storage_bytes(64, 128, 2, 4, 2))
    )
    assert estimate["fp32_weight_bytes"] == 2 * 4 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 2 + 64 * 128)


def test_half_export_loads_in_half_and_matches_cast(tmp_path):
    model = pruned_model("llama")
    loaded = load_compressed(save_compressed(model, tmp_path / "h", dtype=torch.float16), backend="reference")
    assert loaded.dtype == torch.float16
    ref = plain_state(model)
    assert all(torch.equal(v, ref[k].half()) for k, v in loaded.state_dict().items())


def test_other_n_m(tmp_path):
    model = pruned_model("llama", n=1, m=8)
    loaded = load_compressed(save_compressed(model, tmp_path / "18", nm=(1, 8)), backend="reference")
    ref = plain_state(model)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_masks_of_another_pattern_are_stored_dense(tmp_path):
    model = pruned_model("llama", n=1, m=4)
    out = save_compressed(model, tmp_path / "b")  # nm=(2, 4): the 1:4 masks only zero weights
    assert read_manifest(out)["techniques"] == []
    loaded = load_compressed(out, backend="reference")
    ref = plain_state(model)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_errors(tmp_path):
    model = pruned_model("llama")
    proj = model.model.layers[0].mlp.up_proj
    torch.nn.utils.parametrize.register_parametrization(proj, "weight", torch.nn.Identity())
    with pytest.raises(ValueError, match="still parametrized"):
        save_compressed(model, tmp_path / "c")
    out = save_compressed(pruned_model("llama"), tmp_path / "d")
    with pytest.raises(ValueError, match="semi_structured=True\\) needs device='cuda'"):
        load_compressed(out, semi_structured=True)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_estimate_equals_the_written_tensors(tmp_path, kind, dtype):
    model = pruned_model(kind)
    out = save_compressed(model, tmp_path / "e", dtype=dtype)
    tensors = read_tensors(out)
    estimate, manifest = estimate_bytes(model, dtype=dtype), read_manifest(out)
    assert estimate["tensor_bytes"] == manifest["tensor_bytes"] == sum(nbytes(t) for t in tensors.values())
    assert estimate["weight_bytes"] == manifest["weight_bytes"]
    packed = [t for k, t in tensors.items() if k.endswith((".weight.values", ".weight.indices"))]
    assert estimate["by_technique"]["nm"] == sum(nbytes(t) for t in packed)


def test_estimate_during_sr_ste_counts_the_folded_weight(tmp_path):
    class Masked(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.mask = mask

        def forward(self, weight):
            return weight * self.mask

    model = pruned_model("llama")
    folded = save_compressed(model, tmp_path / "f")
    for module in select_modules(model).values():
        torch.nn.utils.parametrize.register_parametrization(module, "weight", Masked(module.weight_mask))
    estimate = estimate_bytes(model)
    assert estimate["tensor_bytes"] == read_manifest(folded)["tensor_bytes"]
    assert estimate["layers"]["model.layers.0.mlp.up_proj"]["techniques"] == ["nm"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_semi_structured_linears(tmp_path):
    model = pruned_model("llama", hidden_size=128, intermediate_size=256)
    out = save_compressed(model, tmp_path / "cuda", dtype=torch.float16)
    sparse = load_compressed(out, device="cuda", backend="reference")
    dense = load_compressed(out, device="cuda", semi_structured=False, backend="reference")
    assert len(sparse.semi_structured_layers) == 2 * 7
    q = sparse.model.layers[0].self_attn.q_proj.weight
    assert isinstance(q, torch.sparse.SparseSemiStructuredTensor)
    ids = torch.randint(0, 256, (4, 32), device="cuda")
    with torch.no_grad():
        got, ref = sparse(input_ids=ids).logits.float(), dense(input_ids=ids).logits.float()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_smollm2_transposable_prune_export_round_trip(tmp_path):
    """The real model: 2-D masks on all 210 block Linears through the callback, fp16 export, exact reload."""
    from lightcook.callbacks.sparsity import SparsityCallback
    from lightcook.modules import CausalLMModule
    from lightcook.ops.sparsity import is_nm

    module = CausalLMModule(name_or_path="smollm2-135m-instruct")
    cb = SparsityCallback(pattern="2d")
    cb.prepare_once(None, module)
    cb.compute_masks(module)
    assert len(cb.layers) == 210
    assert all(is_nm(m.weight_mask, 2, 4) and is_nm(m.weight_mask.T, 2, 4) for m in cb.layers.values())
    out = save_compressed(module.model, tmp_path / "smol", dtype=torch.float16)
    estimate = estimate_bytes(module.model, dtype=torch.float16)
    assert estimate["by_technique"]["nm"] / (estimate["fp32_weight_bytes"] / 2) == pytest.approx(0.5625)
    loaded = load_compressed(out, backend="reference")
    ref = plain_state(module.model)
    assert [k for k, v in loaded.state_dict().items() if not torch.equal(v, ref[k].half())] == []
