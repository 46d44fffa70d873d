"""Convert a lightcook export folder into a compressed-tensors folder that transformers and vLLM open.

The integer codes, scales and zero points are carried over as stored (never re-quantized), N:M layers
become dense weights with their zeros, everything else is copied; see
:mod:`lightcook.export.compressed_tensors` for the layout and the one arithmetic difference
(activation rounding). Structured (sliced) and MoE exports are refused with the reason.

Command line::

    python -m lightcook.export.convert outputs/runs/<id>/compressed outputs/runs/<id>/hf

Example:
    >>> import tempfile, torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> from lightcook.export import save_compressed
    >>> from lightcook.ops.quant import QuantLinear, QuantSpec
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> model.model.layers[0].mlp.up_proj = QuantLinear.from_linear(
    ...     model.model.layers[0].mlp.up_proj, QuantSpec(bits=4, granularity="group", group_size=16), act_mode="none")
    >>> root = tempfile.mkdtemp()
    >>> hf = convert_to_compressed_tensors(save_compressed(model, root + "/lc"), root + "/hf")
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     torch.allclose(AutoModelForCausalLM.from_pretrained(hf)(ids).logits, model(ids).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.export.compressed_tensors import LayerCodes, refuse_unsupported, write_compressed_tensors
from lightcook.export.pipeline import load_compressed, read_manifest
from lightcook.ops.quant import DequantLinear, Int8Linear, QuantSpec

__all__ = ["convert_to_compressed_tensors", "main"]


def _codes(entry: Mapping[str, Any], module: nn.Module) -> LayerCodes:
    """A loaded reference layer (``Int8Linear`` / ``DequantLinear``) and its manifest entry as codes."""
    spec = QuantSpec(entry["bits"], entry["granularity"], entry["group_size"], entry["symmetric"])
    bias = cast("Tensor | None", module.bias)
    bias = None if bias is None else bias.detach()
    if isinstance(module, Int8Linear):  # symmetric per-tensor / channel; scales expanded to (out, 1)
        scale = module.weight_scale[:1] if spec.granularity == "tensor" else module.weight_scale
        static = module.act_scale if module.act_mode == "static" else None
        return LayerCodes(spec, module.weight_codes, scale, None, module.act_mode, 8, static, bias)
    if isinstance(module, DequantLinear):
        act = module.input_quantizer
        return LayerCodes(
            spec,
            cast(DequantLinear, module).weight_codes(),
            module.weight_scale,
            None if spec.symmetric else module.weight_zero_point,
            act.mode,
            act.bits,
            act.static_scale() if act.mode == "static" else None,
            bias,
        )
    raise ValueError(f"{type(module).__name__} is not a quantized reference layer")


def folder_parts(
    src: str | Path, where: str
) -> tuple[Any, dict[str, LayerCodes], dict[str, Tensor], tuple[int, int] | None]:
    """A lightcook export folder as the parts the ecosystem writers take: its HF config, quantized
    layers as :class:`LayerCodes`, every other tensor by key, and the N:M pattern (or ``None``).

    Raises:
        ValueError: ``src`` is not a readable lightcook export, or it holds a technique
            compressed-tensors and GGUF cannot express (structured slicing, MoE); ``where`` names
            the caller in the message.
    """
    manifest = read_manifest(src)
    refuse_unsupported(list(manifest["techniques"]), f"{where} {src}")
    stored = getattr(torch, manifest.get("dtype", "float32"))
    model = load_compressed(src, dtype=stored, backend="reference")
    entries: Mapping[str, Any] = manifest.get("quantized") or {}
    layers = {name: _codes(entry, model.get_submodule(name)) for name, entry in entries.items()}
    plain: dict[str, Tensor] = {
        key: value for key, value in model.state_dict().items() if key.rpartition(".")[0] not in layers
    }
    nm = (manifest["nm"]["n"], manifest["nm"]["m"]) if "nm" in manifest else None
    return model.config, layers, plain, nm


def convert_to_compressed_tensors(src: str | Path, dst: str | Path) -> Path:
    """Write the lightcook export ``src`` as the compressed-tensors folder ``dst`` (atomically).

    Raises:
        ValueError: ``src`` is not a readable lightcook export (names the file), or it holds a
            technique compressed-tensors cannot express (structured slicing, MoE).
    """
    config, layers, plain, nm = folder_parts(src, "convert")
    return write_compressed_tensors(dst, config, layers, plain, nm)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightcook.export.convert SRC DST``: 0 on success, 2 with the error on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m lightcook.export.convert",
        description="Convert a lightcook export folder into a compressed-tensors folder "
        "(AutoModelForCausalLM.from_pretrained / vLLM open it).",
    )
    parser.add_argument("src", help="the lightcook export folder (holds lightcook.json)")
    parser.add_argument("dst", help="the compressed-tensors folder to write (replaced if present)")
    args = parser.parse_args(argv)
    try:
        out = convert_to_compressed_tensors(args.src, args.dst)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (compressed-tensors; open with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
