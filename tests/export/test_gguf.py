"""The GGUF export, read by its real consumers: the ``gguf`` package's reader and dequantizers and
transformers' ``from_pretrained(folder, gguf_file=...)`` (no lightcook code on the load path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightcook.export.compressed_tensors import LayerCodes
from lightcook.export.gguf import block_type, encode_blocks, save_gguf
from lightcook.ops.names import MASK
from lightcook.ops.quant import QuantLinear, QuantSpec
from lightcook.ops.sparsity import nm_mask
from tests.helpers.quant_sparsity import tiny_hf

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WIDE = {"hidden_size": 128, "intermediate_size": 256}  # rows of whole 32-weight blocks
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantize(net, spec: QuantSpec | None, act_mode: str = "none", nm: tuple[int, int] | None = None):
    """Every block Linear of ``net`` as a QuantLinear (N:M masks first); ``spec=None``: masks only."""
    for name in [n for n, m in net.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]:
        linear = net.get_submodule(name)
        if nm is not None:
            mask = nm_mask(linear.weight.detach().abs(), *nm)
            linear.weight.data.mul_(mask)
        layer = QuantLinear.from_linear(linear, spec, act_mode=act_mode) if spec is not None else linear
        if nm is not None:
            layer.register_buffer(MASK, mask)
        net.set_submodule(name, layer)
    return net.eval()


def _effective(net) -> dict[str, torch.Tensor]:
    """The weights the live network computes with, by HF key (fake-quantized, masked)."""
    out = {}
    for name, module in net.named_modules():
        if isinstance(module, QuantLinear):
            with torch.no_grad():
                out[f"{name}.weight"] = module.weight_quantizer(module.weight).detach()
        elif isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            weight = module.weight.detach()
            mask = getattr(module, MASK, None)
            out[f"{name}.weight"] = weight * mask if mask is not None else weight
    return out


def _spread(values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A tensor / channel / group scale as one value per weight."""
    if values.numel() == 1:
        return values.float().reshape(1, 1).expand(rows, cols)
    per_row = values.float().reshape(rows, -1)
    return per_row.repeat_interleave(cols // per_row.shape[1], 1)


def _load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.mark.parametrize(
    ("spec", "qtype"),
    [
        (QuantSpec(8), "Q8_0"),
        (QuantSpec(8, "tensor"), "Q8_0"),
        (QuantSpec(8, "group", 64), "Q8_0"),
        (QuantSpec(4, "group", 32), "Q4_0"),
        (QuantSpec(3, "group", 128), "Q4_0"),
        (QuantSpec(2, "channel"), "Q4_0"),
        (QuantSpec(4, "group", 32, symmetric=False), "Q4_1"),
        (QuantSpec(2, "group", 64, symmetric=False), "Q4_1"),
    ],
    ids=str,
)
def test_blocks_hold_the_trained_codes_and_decode_to_the_trained_weights(spec: QuantSpec, qtype: str) -> None:
    """The gguf package's own dequantizer turns our blocks into code * fp16(scale) (+ offset):
    the codes bit for bit, the scale rounded to float16 only."""
    torch.manual_seed(spec.bits)
    q = QuantLinear.from_linear(torch.nn.Linear(256, 6), spec, act_mode="none")
    layer = LayerCodes.from_quant_linear("x", q)
    assert block_type(layer) == qtype
    blocks = encode_blocks(layer, qtype)
    decoded = dequantize(blocks, getattr(GGMLQuantizationType, qtype))
    rows, cols = layer.codes.shape
    scale = _spread(layer.scale, rows, cols)
    scale16 = scale.half().float()
    codes = layer.codes.float()
    if spec.symmetric:
        expected = codes * scale16
    else:
        zero = _spread(layer.zero_point, rows, cols)
        expected = codes * scale16 + (-zero * scale).half().float()
    assert np.array_equal(decoded, expected.numpy())
    # and the fp16 rounding is the whole difference from the trained weight (the stated bound)
    trained = q.weight_quantizer(q.weight).detach()
    bound = codes.abs() * (scale - scale16).abs() + (0 if spec.symmetric else (zero * scale).abs() * 2**-11)
    assert bool(((torch.from_numpy(decoded) - trained).abs() <= bound + 1e-7).all())


def test_layers_no_block_holds_are_named_and_written_in_the_requested_type() -> None:
    codes = torch.zeros(4, 64, dtype=torch.int16)
    ones = torch.ones(4, 1)
    assert (
        block_type(LayerCodes(QuantSpec(8, symmetric=False), codes, ones, ones, "none", 8, None, None))
        is None
    )
    group16 = LayerCodes(QuantSpec(4, "group", 16), codes, torch.ones(4, 4, 1), None, "none", 8, None, None)
    assert block_type(group16) is None
    assert block_type(LayerCodes(QuantSpec(4), torch.zeros(4, 48), ones, None, "none", 8, None, None)) is None


SCHEMES = {
    "w8a8-dynamic": (QuantSpec(8), "dynamic", None),
    "w8a16-channel": (QuantSpec(8), "none", None),
    "w4a16-g32": (QuantSpec(4, "group", 32), "none", None),
    "w4a16-g128": (QuantSpec(4, "group", 128), "none", None),
    "w4a16-g64-asym": (QuantSpec(4, "group", 64, symmetric=False), "none", None),
    "w3a16-g32": (QuantSpec(3, "group", 32), "none", None),
    "2:4": (None, "none", (2, 4)),
    "2:4+w8a8": (QuantSpec(8), "dynamic", (2, 4)),
    "2:4+w4a16-g32": (QuantSpec(4, "group", 32), "none", (2, 4)),
}


@pytest.mark.parametrize("case", list(SCHEMES))
def test_transformers_gguf_reader_loads_the_trained_network(tmp_path, case: str) -> None:
    """transformers' GGUF loader (rotary rows permuted back by it, blocks dequantized by gguf) gives
    the trained weights within the fp16 rounding of the block scales, and the same logits as the
    trained network (up to that rounding and, for W8A8, our activation rounding)."""
    spec, act, nm = SCHEMES[case]
    net = _quantize(tiny_hf(seed=3, **WIDE), spec, act, nm)
    written = save_gguf(net, tmp_path / "model.gguf", gguf_type="f32", nm=nm)
    loaded = _load(written.path)
    trained = _effective(net)
    state = loaded.state_dict()
    for key, weight in trained.items():
        if key == "lm_head.weight":
            continue  # tied: the reader ties it to token_embd
        # symmetric: code * fp16(d) is within 2^-11 of each weight; asymmetric adds fp16(-z d), whose
        # rounding leaves up to 2^-11 |z d| even where the trained weight is 0 (both <= the row range)
        atol = 1e-6 if spec is None or spec.symmetric else 2**-9 * weight.abs().max().item()
        assert torch.allclose(state[key], weight, rtol=2**-10, atol=atol), key
        if nm is not None and key.rpartition(".")[0].rsplit(".", 1)[-1] in TARGETS:
            zeros = state[key].reshape(weight.shape[0], -1, nm[1]) == 0
            assert bool((zeros.sum(-1) >= nm[1] - nm[0]).all()), f"{key} lost its {nm} pattern"
    if spec is not None:
        assert sorted(written.exact) == sorted(
            n for n, m in net.named_modules() if isinstance(m, QuantLinear)
        )
    with torch.no_grad():
        ours, theirs = net(IDS).logits, loaded(IDS).logits
    tol = 0.05 if act == "dynamic" else 2e-3  # W8A8: transformers computes in float (no act. rounding)
    assert (ours - theirs).abs().max().item() < tol


def test_codes_in_the_file_are_the_trained_codes(tmp_path) -> None:
    """Read the raw Q4_0 blocks of a non-permuted layer with the gguf reader: nibble - 8 = our code."""
    net = _quantize(tiny_hf(seed=4, **WIDE), QuantSpec(4, "group", 32))
    path = save_gguf(net, tmp_path / "m.gguf").path
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_0
    raw = np.asarray(tensor.data).reshape(256, -1, 18)
    nibbles = raw[..., 2:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int16) - 8
    layer = net.get_submodule("model.layers.1.mlp.up_proj")
    expected = layer.weight_quantizer.codes(layer.weight).to(torch.int16).reshape(256, -1, 32)
    assert np.array_equal(codes, expected.numpy())


@pytest.mark.parametrize("gguf_type", ["bf16", "f16", "q8_0", "q4_0"])
def test_dense_models_in_each_type_load_close_to_the_float_model(tmp_path, gguf_type: str) -> None:
    net = tiny_hf(seed=5, **WIDE).eval()
    written = save_gguf(net, tmp_path / "d.gguf", gguf_type=gguf_type)
    assert written.types["model.layers.0.mlp.up_proj.weight"] == gguf_type.upper()
    assert written.types["model.embed_tokens.weight"] == (
        "Q8_0" if gguf_type == "q4_0" else gguf_type.upper()
    )
    assert written.types["model.norm.weight"] == "F32"
    loaded = _load(written.path)
    with torch.no_grad():
        ours, theirs = net(IDS).logits, loaded(IDS).logits
    tol = {"bf16": 0.02, "f16": 2e-3, "q8_0": 0.02, "q4_0": 0.3}[gguf_type]
    assert (ours - theirs).abs().max().item() < tol


def test_an_untied_quantized_head_is_written_as_output(tmp_path) -> None:
    net = tiny_hf(seed=6, **WIDE, tie_word_embeddings=False)
    net.lm_head = QuantLinear.from_linear(net.lm_head, QuantSpec(8), act_mode="none")
    written = save_gguf(net.eval(), tmp_path / "h.gguf", gguf_type="f32")
    assert written.types["lm_head.weight"] == "Q8_0"
    assert "output.weight" in {t.name for t in GGUFReader(written.path).tensors}
    loaded = _load(written.path)
    assert not loaded.config.tie_word_embeddings
    with torch.no_grad():
        assert (net(IDS).logits - loaded(IDS).logits).abs().max().item() < 2e-3


def test_uniformly_sliced_model_is_a_smaller_llama(tmp_path) -> None:
    from lightcook.ops.slicing import BlockPlan, slice_model

    net = tiny_hf(seed=7, **WIDE)
    plan = {f"model.layers.{i}.mlp": BlockPlan(kept=list(range(0, 256, 2))) for i in range(2)}
    sliced = slice_model(net, plan).eval()
    loaded = _load(save_gguf(sliced, tmp_path / "s.gguf", gguf_type="f32").path)
    assert loaded.config.intermediate_size == 128
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, sliced(IDS).logits, atol=1e-5)


def test_the_tokenizer_travels_in_the_file(tmp_path) -> None:
    """transformers rebuilds the tokenizer from the GGUF metadata and it encodes as the original."""
    from lightcook.data import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    net = tiny_hf(seed=8, **WIDE, vocab_size=len(tokenizer)).eval()
    path = save_gguf(net, tmp_path / "t.gguf", tokenizer=tokenizer).path
    fields = GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "ROMEO. But soft, what light through yonder window breaks? 1234 <|im_start|>user"
    assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert rebuilt.eos_token_id == tokenizer.eos_token_id


def test_what_gguf_cannot_hold_is_refused_before_writing(tmp_path) -> None:
    from tests.export.codecs.test_moe import moefied
    from tests.helpers import TINY_LLAMA

    target = tmp_path / "x.gguf"
    moe, _ = moefied(TINY_LLAMA)
    with pytest.raises(ValueError, match=r"GGUF cannot hold moe .*save_compressed"):
        save_gguf(moe, target)
    gpt2 = tiny_hf(seed=0, model_type="gpt2", n_embd=32, n_layer=1, n_head=4)
    with pytest.raises(ValueError, match=r"Llama-architecture models .* 'gpt2'"):
        save_gguf(gpt2, target)
    # uneven FFN widths are no longer refused: they are zero-padded (tests/export/test_hf_padding.py)
    with pytest.raises(ValueError, match=r"gguf_type='q5_k'"):
        save_gguf(tiny_hf(), target, gguf_type="q5_k")
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_w4_g32_exports_score_as_the_trained_model_in_transformers(tmp_path) -> None:
    """The real model, W4 group-32 weights on all 210 block Linears: the GGUF (every layer Q4_0 with
    the trained codes) and the compressed-tensors folder, each reloaded by transformers, score the
    held-out text within 1% of the live network's perplexity."""
    from lightcook.callbacks.quantization import QuantizationCallback
    from lightcook.data import TextDataModule
    from lightcook.export.compressed_tensors import save_compressed_tensors
    from lightcook.export.convert import open_with_transformers
    from lightcook.measure import perplexity
    from lightcook.modules import CausalLMModule

    module = CausalLMModule(name_or_path="smollm2-135m-instruct")
    QuantizationCallback(bits=4, granularity="group", group_size=32, activations="none").prepare_once(
        None, module
    )
    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=128, batch_size=4)
    data.setup("fit")
    batches = [b for _, b in zip(range(2), data.val_dataloader())]
    live = perplexity(module.model.eval(), batches).value
    written = save_gguf(module.model, tmp_path / "gguf" / "model.gguf", tokenizer=data.tokenizer)
    assert len(written.exact) == 210 and set(written.types[f"{n}.weight"] for n in written.exact) == {"Q4_0"}
    assert not written.requantized
    gguf = perplexity(open_with_transformers(tmp_path / "gguf", "gguf"), batches).value
    ct = save_compressed_tensors(module.model, tmp_path / "ct")
    hf = perplexity(open_with_transformers(ct, "compressed-tensors"), batches).value
    assert gguf == pytest.approx(live, rel=0.01) and hf == pytest.approx(live, rel=0.001)
