"""The export folder every technique writes: HF ``config.json`` + ``model.safetensors`` + ``lightcook.json``.

``lightcook.json`` (the manifest) says which layers are stored in which compact form; tensors of
ordinary layers are stored as they are. Tied weights (an LM head sharing the embedding) are stored
once and re-tied on load. Folders are written atomically.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> net = torch.nn.Linear(2, 2)
    >>> out = Path(tempfile.mkdtemp()) / "export"
    >>> write_export(out, net, dict(net.state_dict()), {"layers": {}})
    >>> sorted(read_export(out)[1])
    ['bias', 'weight']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightcook.io import atomic_dir

MANIFEST = "lightcook.json"
TENSORS = "model.safetensors"
FORMAT_VERSION = 1


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """State-dict keys that share storage with an earlier key: ``{alias: original}``."""
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr() if tensor.numel() else None
        if ptr is not None and ptr in seen:
            aliases[key] = seen[ptr]
        elif ptr is not None:
            seen[ptr] = key
    return aliases


def write_export(
    path: str | Path, model: nn.Module, tensors: dict[str, Tensor], manifest: dict[str, Any]
) -> Path:
    """Write ``tensors`` (aliases of tied weights dropped), the model's HF config and the manifest."""
    path = Path(path)
    aliases = tied_aliases(model)
    stored = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if k not in aliases}
    manifest = {"format": "lightcook", "version": FORMAT_VERSION, **manifest, "tied": aliases}
    with atomic_dir(path) as tmp:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        save_file(stored, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_export(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], Any]:
    """Return ``(manifest, tensors, hf_config_or_None)`` of an export folder.

    Raises:
        ValueError: the folder has no lightcook manifest or an unknown format version.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path}: not a lightcook export (no {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != "lightcook" or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}/{MANIFEST}: unsupported format {manifest.get('format')} v{manifest.get('version')}"
        )
    config = None
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    return manifest, load_file(str(path / TENSORS)), config


def model_from_config(config: Any) -> nn.Module:
    """An (untrained) HF model of the exported architecture, causal or encoder-decoder."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_config(config)


def load_plain_tensors(
    model: nn.Module, tensors: dict[str, Tensor], manifest: dict[str, Any], compressed: set[str]
) -> None:
    """Load the ordinary tensors into ``model`` (tied weights re-tied by the model itself).

    ``compressed`` holds the state-dict keys that a technique's loader fills in instead.

    Raises:
        ValueError: a tensor of the model is neither in the export nor compressed (names the key).
    """
    missing, _ = model.load_state_dict(tensors, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    absent = [k for k in missing if k not in compressed and k not in manifest.get("tied", {})]
    if absent:
        raise ValueError(f"export is missing tensors {absent[:5]}")
