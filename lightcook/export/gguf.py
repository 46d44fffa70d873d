"""The GGUF export: one file that llama.cpp (and transformers' ``gguf_file=`` reader) opens.

:func:`save_gguf` writes the live network — plain, with N:M masks, with
:class:`~lightcook.ops.quant.QuantLinear` layers, or both — as a llama.cpp GGUF file of a
Llama-architecture model, with the tokenizer when one is given.

**Trained codes are never re-quantized where a GGUF block type holds them.** GGUF's block types
have one float16 scale per 32 consecutive inputs of a row, so a quantized layer whose groups are
whole multiples of 32 (per-tensor, per-channel, or group 32/64/128/...) maps exactly:

==========================================  =====================================================
lightcook codes                              GGUF block (32 weights)
==========================================  =====================================================
symmetric, 2-4 bits, ``[-q, q]``             ``Q4_0``: ``d * (n - 8)``, ``n = code + 8``
symmetric, 5-8 bits                          ``Q8_0``: ``d * code``
asymmetric, 2-4 bits, zero point ``z``       ``Q4_1``: ``d * code + m``, ``m = -z * d``
==========================================  =====================================================

with ``d`` the layer's scale of that block. The codes are equal bit for bit (tested); the only
difference is the scale's rounding to float16: per weight
``|w_gguf - w| <= |code| * |d - fp16(d)| <= 2^-11 * |code * d|`` (plus ``|z d| 2^-11`` for
``Q4_1``'s offset). Other quantized layers (asymmetric 5-8 bits, groups not a multiple of 32)
and every float 2-D weight are written in ``gguf_type``: ``bf16`` (default), ``f16``, ``f32``,
or re-quantized with the ``gguf`` package's reference quantizer into ``q8_0`` / ``q4_0`` (with
``q4_0`` the embedding and a float LM head go to ``Q8_0``, as in llama.cpp's own Q4 files of
SmolLM2). Norms stay ``F32``. Q/K rows are permuted to llama.cpp's rotary layout (transformers'
reader permutes them back). N:M zeros are stored dense (``lightcook.sparsity.pattern`` records the
pattern). llama.cpp quantizes activations itself (blocks of 32 for ``Q8_0``/``Q4_*`` dot
products): a W8A8 layer's static or per-token activation scales are not used there.

Structured slices whose layers differ in width are zero-padded to the widest layer (GGUF's Llama,
like transformers' config, holds one FFN width and head count; exact, see
:mod:`lightcook.export.hf_padding`), the kept widths recorded as ``lightcook.padded.*``. Refused,
before anything is written: non-Llama architectures, MoE networks, and rotary scalings other than
the default.

Example:
    >>> import tempfile, torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> from lightcook.ops.quant import QuantLinear, QuantSpec
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> mlp = model.model.layers[0].mlp
    >>> mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, QuantSpec(bits=4, granularity="group", group_size=32),
    ...                                       act_mode="none")
    >>> root = tempfile.mkdtemp()
    >>> written = save_gguf(model, root + "/model.gguf", gguf_type="f32")
    >>> written.types["model.layers.0.mlp.up_proj.weight"]
    'Q4_0'
    >>> loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file="model.gguf")
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     (loaded(ids).logits - model(ids).logits).abs().max().item() < 1e-3
    True
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightcook.export.compressed_tensors import LayerCodes, split_network
from lightcook.export.format import model_from_config, tied_aliases
from lightcook.export.hf_padding import pad_to_widest
from lightcook.io import atomic_path

__all__ = ["GGUF_TYPES", "GgufWritten", "block_type", "encode_blocks", "save_gguf", "write_gguf"]

#: What ``gguf_type`` may be: the type of the float 2-D weights (and of quantized layers no block holds).
GGUF_TYPES = ("bf16", "f16", "f32", "q8_0", "q4_0")
BLOCK = 32
_ARCHITECTURES = {"llama": "llama"}  # HF model_type -> GGUF architecture
_REFUSED = frozenset({"moe", "structured"})


@dataclass
class GgufWritten:
    """What :func:`save_gguf` wrote: the file, and the GGML type of each tensor by HF key.

    ``exact`` holds the quantized layers whose trained codes were written as they are;
    ``requantized`` the quantized layers no block type holds, written in ``gguf_type`` instead.
    """

    path: Path
    types: dict[str, str] = field(default_factory=dict)
    exact: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)


def block_type(layer: LayerCodes) -> str | None:
    """The GGUF block type that holds ``layer``'s codes exactly, or ``None`` when none does.

    Example:
        >>> from lightcook.ops.quant import QuantSpec
        >>> codes = torch.zeros(4, 64, dtype=torch.int8)
        >>> layer = LayerCodes(QuantSpec(bits=8), codes, torch.ones(4, 1), None, "dynamic", 8, None, None)
        >>> block_type(layer), block_type(LayerCodes(QuantSpec(bits=8, symmetric=False), codes,
        ...     torch.ones(4, 1), torch.zeros(4, 1), "none", 8, None, None))
        ('Q8_0', None)
    """
    spec = layer.spec
    in_features = layer.codes.shape[1]
    if in_features % BLOCK or (spec.granularity == "group" and spec.group_size % BLOCK):
        return None
    if spec.symmetric:
        return "Q4_0" if spec.bits <= 4 else "Q8_0"
    return "Q4_1" if spec.bits <= 4 else None


def _per_block(values: Tensor, rows: int, blocks: int) -> np.ndarray:
    """A scale / zero point (tensor, channel or group layout) spread to ``(rows, blocks)``: one
    value per block of ``columns / blocks`` weights (``blocks = columns``: one per weight)."""
    flat = values.detach().float().reshape(-1)
    if flat.numel() == 1:
        out = flat.expand(rows * blocks).reshape(rows, blocks)
    else:
        per_row = values.detach().float().reshape(rows, -1)
        out = per_row.repeat_interleave(blocks // per_row.shape[1], dim=1)
    return out.cpu().numpy()


def encode_blocks(layer: LayerCodes, qtype: str) -> np.ndarray:
    """``layer``'s codes and scales as GGUF blocks of ``qtype`` (``block_type(layer)``): a uint8
    array (out, bytes per row), the layout llama.cpp's ``block_q8_0`` / ``block_q4_0`` /
    ``block_q4_1`` structs have in memory.

    Example:
        >>> from gguf import GGMLQuantizationType, dequantize
        >>> from lightcook.ops.quant import QuantSpec
        >>> codes = torch.arange(-7, 8).repeat(2, 5)[:, :64].to(torch.int8)
        >>> layer = LayerCodes(QuantSpec(bits=4), codes, torch.tensor([[0.5], [2.0]]), None, "none", 8, None, None)
        >>> blocks = encode_blocks(layer, "Q4_0")
        >>> blocks.shape, bool((dequantize(blocks, GGMLQuantizationType.Q4_0) == (codes * layer.scale).numpy()).all())
        ((2, 36), True)
    """
    rows, cols = layer.codes.shape
    blocks = cols // BLOCK
    scale = _per_block(layer.scale, rows, blocks).astype(np.float16)
    head = [scale.reshape(rows, blocks, 1).view(np.uint8)]
    codes = layer.codes.to(torch.int16).cpu().numpy().reshape(rows, blocks, BLOCK)
    if qtype == "Q8_0":
        body = codes.astype(np.int8).view(np.uint8)
    else:
        if qtype == "Q4_0":
            nibbles = (codes + 8).astype(np.uint8)
        else:  # Q4_1: d * n + m with n the unsigned code, m = -zero_point * d
            assert layer.zero_point is not None
            zero = _per_block(layer.zero_point, rows, blocks)
            offset = (-zero * _per_block(layer.scale, rows, blocks)).astype(np.float16)
            head.append(offset.reshape(rows, blocks, 1).view(np.uint8))
            nibbles = codes.astype(np.uint8)
        half = BLOCK // 2
        body = nibbles[..., :half] | (nibbles[..., half:] << np.uint8(4))
    return np.concatenate([*head, body], axis=-1).reshape(rows, -1)


def _permute_rotary(x: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotary row order -> llama.cpp's (interleaved halves), per head; rows are dim 0."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _refuse(config: Any, techniques: list[str], where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"{where}: GGUF export holds Llama-architecture models (model_type 'llama'); this one is "
            f"{model_type!r}. Use the compressed-tensors or lightcook export"
        )
    refused = [t for t in techniques if t in _REFUSED]
    if refused:
        raise ValueError(
            f"{where}: GGUF cannot hold {', '.join(refused)} (llama.cpp's Llama graph has dense FFNs "
            "of one width); use the lightcook export (lightcook.export.save_compressed)"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if (rope.get("rope_type") or "default") != "default":
        raise ValueError(
            f"{where}: GGUF export writes the default rotary embedding only; this model has {rope}"
        )


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer's BPE vocabulary, merges and special tokens, as llama.cpp reads them."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = {int(i) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    added = {int(i) for i in tokenizer.added_tokens_decoder} - special
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(
            gguf.TokenType.CONTROL
            if i in special
            else gguf.TokenType.USER_DEFINED
            if i in added
            else gguf.TokenType.NORMAL
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pretokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _pretokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (it splits text before BPE)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export: the tokenizer is not a fast (tokenizers) BPE tokenizer")
    model = json.loads(backend.to_str())
    if model["model"]["type"] != "BPE":
        raise ValueError(
            f"GGUF export: writes byte-level BPE tokenizers; this one is {model['model']['type']}"
        )
    pre = model.get("pre_tokenizer") or {}
    kinds = [p["type"] for p in pre.get("pretokenizers", [pre])]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's split regex (SmolLM2's tokenizer too)
    raise ValueError(f"GGUF export: no llama.cpp pre-tokenizer known for {kinds}; pass tokenizer=None")


def write_gguf(
    path: str | Path,
    config: Any,
    layers: Mapping[str, LayerCodes],
    plain: Mapping[str, Tensor],
    gguf_type: str = "bf16",
    nm: tuple[int, int] | None = None,
    tokenizer: Any = None,
    techniques: Sequence[str] = (),
    name: str | None = None,
) -> GgufWritten:
    """Write a GGUF file from a network's parts (see :func:`save_gguf`), atomically.

    Args:
        path: the ``.gguf`` file (replaced if present).
        config: the HF config of the Llama architecture.
        layers: the quantized layers by module name.
        plain: every other tensor of the HF state dict (tied aliases may be present), by key.
        gguf_type: one of :data:`GGUF_TYPES`.
        nm: the N:M pattern, recorded as ``lightcook.sparsity.pattern``.
        tokenizer: a fast byte-level BPE tokenizer to embed (llama.cpp needs one; transformers'
            reader of the weights does not).
        techniques: what the network holds (``moe`` is refused with the reason).
        name: ``general.name``.

    Raises:
        ValueError: ``gguf_type`` is unknown, the architecture is not Llama, or a tensor of the
            architecture is missing or has a shape its (padded) config does not give.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}: must be one of {list(GGUF_TYPES)}")
    _refuse(config, [t for t in techniques if t != "structured"], "GGUF export")
    config, layers, plain = pad_to_widest(config, layers, plain)
    with torch.device("meta"):
        skeleton = model_from_config(copy.deepcopy(config))
    expected = skeleton.state_dict()
    aliases = tied_aliases(skeleton)
    tied = "lm_head.weight" in aliases or "lm_head" not in {k.rpartition(".")[0] for k in expected}
    n_layers, heads, kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    float_type = {"bf16": "BF16", "f16": "F16", "f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0"}[gguf_type]
    written = GgufWritten(Path(path))
    tensors: list[tuple[str, np.ndarray, str]] = []

    def gguf_name(key: str) -> str:
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"GGUF export: no llama.cpp tensor for {key!r}")
        return mapped

    def rotary(key: str, x: np.ndarray) -> np.ndarray:
        if ".self_attn.q_proj." in key:
            return _permute_rotary(x, heads)
        if ".self_attn.k_proj." in key:
            return _permute_rotary(x, kv)
        return x

    for key, meta in expected.items():
        owner = key.rpartition(".")[0]
        if key in aliases and tied:
            continue
        if owner in layers and key.endswith(".weight"):
            layer = layers[owner]
            if tuple(layer.codes.shape) != tuple(meta.shape):
                raise ValueError(
                    f"GGUF export: {owner} is {tuple(layer.codes.shape)}, the config gives {tuple(meta.shape)}"
                )
            qtype = block_type(layer)
            if qtype is not None:
                tensors.append((gguf_name(key), rotary(key, encode_blocks(layer, qtype)), qtype))
                written.exact.append(owner)
                written.types[key] = qtype
                continue
            written.requantized.append(owner)
            value = _dequantize(layer)
        elif owner in layers and key.endswith(".bias") and (bias := layers[owner].bias) is not None:
            value = bias
        elif key in plain:
            value = plain[key]
        else:
            raise ValueError(f"GGUF export: no tensor {key!r} of the HF architecture")
        if tuple(value.shape) != tuple(meta.shape):
            raise ValueError(
                f"GGUF export: {key} is {tuple(value.shape)}, the config gives {tuple(meta.shape)} "
                "(layers of different widths: GGUF's Llama holds one FFN width and head count)"
            )
        array = rotary(key, value.detach().float().cpu().numpy())
        qtype = _float_type(key, array, float_type)
        tensors.append((gguf_name(key), _encode_float(array, qtype), qtype))
        written.types[key] = qtype
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(name or getattr(config, "_name_or_path", "") or "lightcook")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("general.quantized_by", "lightcook")
    if nm is not None:
        writer.add_string("lightcook.sparsity.pattern", f"{nm[0]}:{nm[1]}")
    for key, kept in getattr(config, "lightcook", {}).get("padded", {}).items():
        writer.add_array(f"lightcook.padded.{key}", kept)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, config.vocab_size)
    for tensor_name, array, qtype in tensors:
        raw = None if qtype in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, qtype)
        writer.add_tensor(tensor_name, array, raw_dtype=raw)
    with atomic_path(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return written


_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType


def _dequantize(layer: LayerCodes) -> Tensor:
    rows, cols = layer.codes.shape
    scale = torch.from_numpy(_per_block(layer.scale, rows, cols))
    zero = 0 if layer.zero_point is None else torch.from_numpy(_per_block(layer.zero_point, rows, cols))
    return (layer.codes.float() - zero) * scale


def _float_type(key: str, array: np.ndarray, requested: str) -> str:
    """The GGML type of one float tensor: norms and biases F32; rows not a multiple of 32 stay in
    half precision; with ``q4_0`` the embedding / LM head go to Q8_0."""
    if array.ndim != 2:
        return "F32"
    if requested in ("Q8_0", "Q4_0") and array.shape[1] % BLOCK:
        return "F16"
    if requested == "Q4_0" and (key.startswith("model.embed_tokens.") or key.startswith("lm_head.")):
        return "Q8_0"
    return requested


def _encode_float(array: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "F32":
        return array.astype(np.float32)
    if qtype == "F16":
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), getattr(gguf.GGMLQuantizationType, qtype))


def save_gguf(
    model: nn.Module,
    path: str | Path,
    gguf_type: str = "bf16",
    nm: tuple[int, int] | None = None,
    tokenizer: Any = None,
) -> GgufWritten:
    """Write the live Llama ``model`` as a GGUF file, atomically; see the module docstring for the
    mapping.

    Args:
        model: the HF network after training (``QuantLinear`` layers and/or N:M masks).
        path: the ``.gguf`` file (replaced if present).
        gguf_type: the type of float 2-D weights and of quantized layers no block type holds
            (:data:`GGUF_TYPES`).
        nm: the N:M pattern of the masks (recorded in the metadata).
        tokenizer: a fast byte-level BPE tokenizer to embed, or ``None``.

    Returns:
        What was written: the GGML type of each weight, which quantized layers kept their codes.

    Raises:
        ValueError: no HF config, not a Llama architecture, MoE,
            or an unknown ``gguf_type`` — before anything is written.
    """
    from lightcook.export.pipeline import estimate_bytes

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("save_gguf: the model has no Hugging Face config to write")
    techniques = list(estimate_bytes(model, nm=nm)["techniques"])
    _refuse(config, [t for t in techniques if t != "structured"], "save_gguf")
    layers, plain = split_network(model)
    return write_gguf(path, config, layers, plain, gguf_type, nm, tokenizer, techniques)
