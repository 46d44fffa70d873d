"""One converter command: a run or a lightcook export folder into the format a serving stack opens.

``python -m lightcook.export SRC --format {lightcook,compressed-tensors,gguf} --out DIR`` (also
``python -m lightcook.export.convert``) reads ``SRC`` — a lightcook export folder (it holds
``lightcook.json``) or a run directory (its ``compressed/`` export) — and writes ``DIR`` atomically:

- ``compressed-tensors``: the folder transformers and vLLM open
  (:mod:`lightcook.export.compressed_tensors`); the integer codes, scales and zero points are carried
  over as stored, never re-quantized.
- ``gguf``: ``DIR/model.gguf`` for llama.cpp (:mod:`lightcook.export.gguf`; ``--gguf-type`` the
  type of float weights), the trained codes kept where a GGUF block type holds them.
- ``lightcook``: a copy of the lightcook folder.

The export's tokenizer files (the app writes them beside the weights) travel along, and every
written folder gets a ``README.md`` model card. It prints what it wrote and the folder's bytes; bad
input (no export, a combination the format cannot hold, such as MoE in GGUF) exits with status 2
and the reason, leaving nothing behind.

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
    >>> hf = convert(save_compressed(model, root + "/lc"), root + "/hf", "compressed-tensors")
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> with torch.no_grad():
    ...     torch.allclose(AutoModelForCausalLM.from_pretrained(hf)(ids).logits, model(ids).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.export.card import export_facts, write_model_card
from lightcook.export.compressed_tensors import (
    SUPPORTED,
    LayerCodes,
    refuse_unsupported,
    write_compressed_tensors,
)
from lightcook.export.format import MANIFEST
from lightcook.export.gguf import GGUF_TYPES, write_gguf
from lightcook.export.hf_moe import REMOTE_FILE, moe_specs
from lightcook.export.pipeline import load_compressed, read_manifest
from lightcook.io import atomic_dir, model_bytes
from lightcook.ops.quant import DequantLinear, Int8Linear, QuantSpec

__all__ = [
    "ECOSYSTEM_FORMATS",
    "FORMATS",
    "GGUF_FILE",
    "FolderParts",
    "convert",
    "convert_to_compressed_tensors",
    "export_folder",
    "folder_parts",
    "main",
    "open_with_transformers",
]

#: What ``--format`` may be.
FORMATS = ("lightcook", "compressed-tensors", "gguf")
#: The formats other stacks open (what ``report.formats`` may list).
ECOSYSTEM_FORMATS = ("compressed-tensors", "gguf")
#: The file a GGUF export folder holds.
GGUF_FILE = "model.gguf"
#: An already-sliced folder: a smaller stock config (uneven layers zero-padded: export.hf_padding).
SLICED = SUPPORTED | {"structured"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


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


@dataclass(frozen=True)
class FolderParts:
    """A lightcook export folder as the parts the ecosystem writers take: its HF config, quantized
    layers as :class:`LayerCodes`, every other tensor by key, the N:M pattern, its techniques, and
    its routed MoE FFNs (:func:`~lightcook.export.hf_moe.moe_specs`)."""

    config: Any
    layers: dict[str, LayerCodes]
    plain: dict[str, Tensor]
    nm: tuple[int, int] | None
    techniques: list[str]
    moe: dict[str, dict[str, Any]]


def folder_parts(src: str | Path) -> FolderParts:
    """Read the lightcook export ``src`` (the reference layers, so the codes are the stored ones).

    Raises:
        ValueError: ``src`` is not a readable lightcook export (names the file).
    """
    manifest = read_manifest(src)
    stored = getattr(torch, manifest.get("dtype", "float32"))
    model = load_compressed(src, dtype=stored, backend="reference")
    entries: Mapping[str, Any] = manifest.get("quantized") or {}
    layers = {name: _codes(entry, model.get_submodule(name)) for name, entry in entries.items()}
    plain: dict[str, Tensor] = {
        key: value for key, value in model.state_dict().items() if key.rpartition(".")[0] not in layers
    }
    nm = (manifest["nm"]["n"], manifest["nm"]["m"]) if "nm" in manifest else None
    return FolderParts(model.config, layers, plain, nm, list(manifest["techniques"]), moe_specs(model))


def convert_to_compressed_tensors(src: str | Path, dst: str | Path) -> Path:
    """Write the lightcook export ``src`` as the compressed-tensors folder ``dst`` (atomically).

    Raises:
        ValueError: ``src`` is not a readable lightcook export (names the file), or it holds a
            technique compressed-tensors cannot express.
    """
    parts = folder_parts(src)
    refuse_unsupported(parts.techniques, f"convert {src}", SLICED)
    return write_compressed_tensors(dst, parts.config, parts.layers, parts.plain, parts.nm, moe=parts.moe)


def export_folder(src: str | Path) -> Path:
    """The lightcook export folder ``src`` names: itself, or a run directory's ``compressed/``.

    Raises:
        ValueError: ``src`` is neither (names what is missing).

    Example:
        >>> export_folder("/no/such/run")
        Traceback (most recent call last):
        ...
        ValueError: /no/such/run: no such run directory or export folder
    """
    path = Path(src)
    if (path / MANIFEST).is_file():
        return path
    if (path / "compressed" / MANIFEST).is_file():
        return path / "compressed"
    if not path.exists():
        raise ValueError(f"{src}: no such run directory or export folder")
    raise ValueError(
        f"{src}: neither an export folder (no {MANIFEST}) nor a run directory with a compressed/ export "
        "(a run with report=none writes none)"
    )


def folder_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved beside an export's weights, or ``None`` when the folder has none."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    # not trusted: a lightcook folder's config.json is the remote-code stub, which the tokenizer does not need
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer files of folder ``src`` (those it has) into ``dst``."""
    for name in _TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def convert(src: str | Path, out: str | Path, fmt: str, gguf_type: str = "bf16") -> Path:
    """Write the export of ``src`` (an export folder or a run directory) in format ``fmt`` as ``out``.

    Args:
        src: a lightcook export folder or a run directory holding one.
        out: the folder to write (replaced atomically; nothing is left on failure).
        fmt: one of :data:`FORMATS`.
        gguf_type: for ``gguf``, the type of float weights (:data:`~lightcook.export.gguf.GGUF_TYPES`).

    Returns:
        ``out``.

    Raises:
        ValueError: unknown ``fmt`` / ``gguf_type``, ``src`` holds no export, or the export holds a
            technique ``fmt`` cannot express (the message names the format and what it lacks).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type {gguf_type!r}: must be one of {', '.join(GGUF_TYPES)}")
    folder, out = export_folder(src), Path(out)
    if out.resolve() == folder.resolve():
        raise ValueError(f"--out {out}: is the source export itself")
    manifest = read_manifest(folder)
    if fmt == "lightcook":
        with atomic_dir(out) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            if not (tmp / "README.md").is_file():
                write_model_card(tmp, export_facts(fmt, manifest, bytes=model_bytes(tmp)))
        return out
    parts = folder_parts(folder)
    if fmt == "compressed-tensors":
        refuse_unsupported(parts.techniques, f"--format compressed-tensors {folder}", SLICED)
    with atomic_dir(out) as tmp:
        if fmt == "compressed-tensors":
            write_compressed_tensors(
                tmp / "ct", parts.config, parts.layers, parts.plain, parts.nm, moe=parts.moe
            )
            for item in (tmp / "ct").iterdir():
                item.rename(tmp / item.name)
            (tmp / "ct").rmdir()
            copy_tokenizer(folder, tmp)
        else:
            tokenizer = folder_tokenizer(folder)
            write_gguf(
                tmp / GGUF_FILE,
                parts.config,
                parts.layers,
                parts.plain,
                gguf_type,
                parts.nm,
                tokenizer,
                parts.techniques,
            )
        write_model_card(tmp, export_facts(fmt, manifest, bytes=model_bytes(tmp)))
    return out


def open_with_transformers(path: str | Path, fmt: str) -> nn.Module:
    """Load an ecosystem export the way a transformers user does (no lightcook code on the path; an
    MoE folder's own model file, :data:`~lightcook.export.hf_moe.REMOTE_FILE`, with
    ``trust_remote_code=True``)."""
    from transformers import AutoModelForCausalLM

    extra: dict[str, Any] = {"gguf_file": GGUF_FILE} if fmt == "gguf" else {}
    if (Path(path) / REMOTE_FILE).is_file():
        extra["trust_remote_code"] = True
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **extra).eval()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightcook.export SRC --format F --out DIR``: 0 on success, 2 with the error."""
    parser = argparse.ArgumentParser(
        prog="python -m lightcook.export",
        description="Write a run's (or an export folder's) compressed model in the format a serving "
        "stack opens: compressed-tensors (transformers, vLLM), gguf (llama.cpp), or lightcook.",
    )
    parser.add_argument("src", help="a run directory (its compressed/ export) or a lightcook export folder")
    parser.add_argument("dst", nargs="?", help=argparse.SUPPRESS)  # the older `convert SRC DST` form
    parser.add_argument(
        "--format", default="compressed-tensors", choices=FORMATS, help="(default: %(default)s)"
    )
    parser.add_argument("--out", help="the folder to write (replaced if present)")
    parser.add_argument(
        "--gguf-type",
        default="bf16",
        choices=GGUF_TYPES,
        help="gguf: type of the float weights (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    out = args.out or args.dst
    if out is None:
        parser.print_usage(sys.stderr)
        print("error: --out DIR is required", file=sys.stderr)
        return 2
    try:
        written = convert(args.src, out, args.format, args.gguf_type)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = model_bytes(written)
    opens = {
        "compressed-tensors": "transformers.AutoModelForCausalLM.from_pretrained(dir) / vllm serve dir",
        "gguf": f"llama-cli -m {Path(written) / GGUF_FILE} / from_pretrained(dir, gguf_file={GGUF_FILE!r})",
        "lightcook": "lightcook.export.load_compressed(dir)",
    }[args.format]
    print(f"wrote {written} ({args.format}, {size:,} bytes = {size / 1e6:.1f} MB); open with {opens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
