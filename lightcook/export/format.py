"""The lightcook export folder: ``model.safetensors`` + the ``lightcook.json`` manifest + ``hf_config.json``.

``hf_config.json`` is the network's Hugging Face config. ``config.json`` is a stub that points
transformers at ``lightcook_export.py`` (:mod:`lightcook.hf_remote_code`), so that
``AutoModelForCausalLM.from_pretrained(folder)`` fails loudly instead of loading a re-initialised
network, or — with ``trust_remote_code=True`` and lightcook installed — returns
:func:`~lightcook.export.load_compressed`'s model (version 3; folders of versions 1 and 2 kept the
network's config in ``config.json`` and are still read).

The manifest says which layers each technique stored in its compact form (one entry per technique,
see :mod:`lightcook.export.codecs`); every other tensor is stored as it is. Tied weights (an LM head
sharing the embedding) are stored once, listed under ``tied`` and re-tied on load. Folders are
written atomically (a temporary folder renamed into place). Unreadable input fails with a
``ValueError`` that names the folder or file and what is wrong with it.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> net = torch.nn.Linear(2, 2)
    >>> out = write_folder(Path(tempfile.mkdtemp()) / "export", net, dict(net.state_dict()), {})
    >>> read_manifest(out)["version"], sorted(read_tensors(out))
    (3, ['bias', 'weight'])
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightcook.io import atomic_dir

MANIFEST = "lightcook.json"
TENSORS = "model.safetensors"
CONFIG = "config.json"
HF_CONFIG = "hf_config.json"
REMOTE_CODE = "lightcook_export.py"
FORMAT = "lightcook"
#: ``config.json`` of a folder transformers cannot read as it is: it points at ``lightcook_export.py``
#: (a copy of :mod:`lightcook.hf_remote_code`, which this module does not import).
STUB_CONFIG = {
    "model_type": "lightcook_export",
    "auto_map": {
        "AutoConfig": "lightcook_export.LightcookExportConfig",
        "AutoModel": "lightcook_export.LightcookExportModel",
        "AutoModelForCausalLM": "lightcook_export.LightcookExportModel",
        "AutoModelForSeq2SeqLM": "lightcook_export.LightcookExportModel",
    },
    "lightcook": "a lightcook export, which transformers cannot read as it is: open it with "
    "lightcook.export.load_compressed(folder), or convert it with `python -m lightcook.export.convert "
    "<folder> <out>` (compressed-tensors, for transformers / vLLM)",
}
#: 3: the network's config in ``hf_config.json``, ``config.json`` the transformers stub;
#: 2: one entry per technique under ``techniques`` (codecs); 1: the previous release's five layouts.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

__all__ = [
    "CONFIG",
    "FORMAT_VERSION",
    "HF_CONFIG",
    "MANIFEST",
    "TENSORS",
    "is_plain_checkpoint",
    "load_plain_tensors",
    "model_from_config",
    "nbytes",
    "read_config",
    "read_manifest",
    "read_tensors",
    "tied_aliases",
    "write_folder",
]


def nbytes(tensor: Tensor) -> int:
    """Bytes of ``tensor``'s elements (what safetensors stores for it, header aside)."""
    return tensor.numel() * tensor.element_size()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """State-dict keys that share storage with an earlier key: ``{alias: original}``.

    Tensors on the ``meta`` device have no storage: they are tied when they are the same object.
    """
    seen: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.numel():
            continue
        ident = ("id", id(tensor)) if tensor.is_meta else ("ptr", tensor.data_ptr())
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def is_plain_checkpoint(config: Any, tensors: Mapping[str, Tensor]) -> bool:
    """Whether ``tensors`` are exactly the state dict (keys and shapes, tied aliases aside) of the
    model ``config`` builds: then ``from_pretrained`` loads the folder as the exported network.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> net = model_from_config(cfg)
        >>> is_plain_checkpoint(cfg, net.state_dict()), is_plain_checkpoint(cfg, {"x": torch.ones(1)})
        (True, False)
    """
    try:
        with torch.device("meta"):
            skeleton = model_from_config(copy.deepcopy(config))
    except (ValueError, KeyError, TypeError):
        return False
    aliases = tied_aliases(skeleton)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in aliases}
    got = {k: tuple(v.shape) for k, v in tensors.items() if k not in aliases}
    return expected == got


def write_folder(
    path: str | Path, model: nn.Module, tensors: Mapping[str, Tensor], manifest: Mapping[str, Any]
) -> Path:
    """Write ``tensors`` (aliases of tied weights dropped), ``model.config`` and the manifest, atomically.

    Args:
        path: the export folder (replaced if present).
        model: the exported network (its tied weights and its HF ``config``, when it has one).
        tensors: stored tensors by key.
        manifest: the manifest content; ``format``, ``version`` and ``tied`` are added.

    Returns:
        ``path``.
    """
    path = Path(path)
    aliases = tied_aliases(model)
    stored = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if k not in aliases}
    full = {"format": FORMAT, "version": FORMAT_VERSION, **manifest, "tied": aliases}
    with atomic_dir(path) as tmp:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            if is_plain_checkpoint(config, stored):  # transformers reads it as it is
                config.save_pretrained(tmp)
            else:
                (tmp / HF_CONFIG).write_text(config.to_json_string())
                (tmp / CONFIG).write_text(json.dumps(STUB_CONFIG, indent=2) + "\n")
                shutil.copyfile(Path(__file__).parent.parent / "hf_remote_code.py", tmp / REMOTE_CODE)
        save_file(stored, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked to be a lightcook manifest of a readable version.

    Raises:
        ValueError: the folder does not exist, has no ``lightcook.json``, or that file is not JSON,
            not a lightcook manifest, or of an unknown version (the message names the file).

    Example:
        >>> read_manifest("/nonexistent/export")
        Traceback (most recent call last):
        ...
        ValueError: /nonexistent/export: no such export folder
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such export folder")
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"{path}: not a lightcook export (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{file}: not a lightcook manifest (format {got!r}, expected {FORMAT!r})")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{file}: unsupported version {manifest.get('version')!r} (this release reads {READABLE_VERSIONS})"
        )
    return manifest


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an export folder's ``model.safetensors``.

    Raises:
        ValueError: the file is missing, truncated or corrupt (names the file).
    """
    file = Path(path) / TENSORS
    if not file.is_file():
        raise ValueError(f"{file}: missing (the export folder is incomplete)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: unreadable safetensors file, truncated or corrupt ({err})") from None


def read_config(path: str | Path) -> Any:
    """The Hugging Face config of an export folder: ``hf_config.json``, or the ``config.json`` of a
    version-1/2 folder (``None`` when there is neither).

    Raises:
        ValueError: the file is not a readable Hugging Face config (names the file).
    """
    from transformers import AutoConfig

    file = Path(path) / HF_CONFIG
    if file.is_file():
        try:
            data = json.loads(file.read_text())
            model_type = data.pop("model_type")
            return AutoConfig.for_model(model_type, **data)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{file}: not a readable Hugging Face config ({err!r})") from None
    file = Path(path) / CONFIG
    if not file.is_file():
        return None
    try:
        return AutoConfig.from_pretrained(Path(path))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{file}: not a readable Hugging Face config ({err})") from None


def model_from_config(config: Any) -> nn.Module:
    """An (untrained) HF model of the exported architecture, causal or encoder-decoder.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> type(model_from_config(cfg)).__name__
        'LlamaForCausalLM'
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_config(config)


def load_plain_tensors(
    model: nn.Module, tensors: Mapping[str, Tensor], tied: Mapping[str, str], filled: set[str]
) -> None:
    """Load the ordinary tensors into ``model``; tied weights are re-tied by the model itself.

    Args:
        model: the rebuilt network (codecs already reshaped it).
        tensors: the stored tensors the codecs left (their own ones taken out).
        tied: the manifest's ``{alias: original}``.
        filled: state-dict keys a codec fills in itself (not expected among ``tensors``).

    Raises:
        ValueError: a tensor of the model is neither stored nor filled, or a stored tensor belongs to
            no tensor of the model (names the keys).
    """
    missing, unexpected = model.load_state_dict(dict(tensors), strict=False)
    if hasattr(model, "tie_weights"):
        cast(Any, model).tie_weights()  # a transformers PreTrainedModel
    absent = [k for k in missing if k not in filled and k not in tied]
    if absent:
        raise ValueError(f"export is missing tensors {absent[:5]}")
    if unexpected:
        raise ValueError(f"export tensors {sorted(unexpected)[:4]} do not belong to the rebuilt model")
