"""Atomic file and folder writes, and on-disk sizes.

Every checkpoint, export, summary and cache entry lightcook writes goes through these helpers, so a
crash never leaves a half-written file where a finished one is expected; :func:`read_checkpoint`
reads a checkpoint back and says which file is unreadable and why.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_json_atomic(d / "summary.json", {"ppl": 12.5})
    >>> (d / "summary.json").read_text().strip().startswith("{")
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode(0o666))  # mkstemp makes 0600; a plain open() would honour the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes 0700; a plain mkdir would honour the umask
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _default_mode(base: int) -> int:
    """``base`` minus the process umask: the mode ``open()`` / ``mkdir()`` would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def bytes_on_disk(path: str | os.PathLike) -> int:
    """Total size in bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: Files of a model folder that are not the model: the tokenizer saved beside it, its model card.
NOT_THE_MODEL = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
        "README.md",
    }
)


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes of a model file or folder without the tokenizer files and model card beside it (what
    the compression changes: weights, config, manifest).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "model.safetensors").write_bytes(b"x" * 10)
        >>> _ = (folder / "tokenizer.json").write_text("{}")
        >>> model_bytes(folder), bytes_on_disk(folder)
        (10, 12)
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in NOT_THE_MODEL)


_ZIP_MAGIC = b"PK\x03\x04"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a torch checkpoint with ``weights_only=True`` (memory-mapped when it is a zip archive, as
    ``torch.save`` writes by default), failing with the file and what is wrong with it.

    Args:
        path: a ``.ckpt`` / ``.pt`` file written by ``torch.save`` (Lightning checkpoints are).

    Returns:
        The checkpoint's top-level dict (tensors on the CPU).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is empty, truncated or corrupt, holds objects that ``weights_only``
            loading refuses, or does not hold a dict; the message starts with the path.

    Example:
        >>> import tempfile, torch
        >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
        >>> read_checkpoint(path)["global_step"]
        3
        >>> _ = path.write_bytes(path.read_bytes()[:100])
        >>> read_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../last.ckpt: truncated or corrupt (100 bytes): ...
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the checkpoint file is empty (0 bytes); an interrupted copy or write?")
    zipped = zipfile.is_zipfile(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: {_unpickling_problem(err, path, size)}") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: {_damage(path, size)}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a checkpoint dict")
    return data


def _damage(path: Path, size: int) -> str:
    """What is wrong with a file ``torch.load`` could not read."""
    with path.open("rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    if head == _ZIP_MAGIC:
        why = "a zip archive (torch.save's format) whose end is missing or damaged"
    else:
        why = "neither a zip archive (torch.save's format) nor a readable legacy torch pickle"
    return f"truncated or corrupt ({size} bytes): {why}; an interrupted copy or write? Use an intact copy"


def _unpickling_problem(err: pickle.UnpicklingError, path: Path, size: int) -> str:
    """A refused global names itself (``Unsupported global: GLOBAL x.Y``); anything else is damage."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if refused is None:
        return _damage(path, size)
    return (
        f"holds an object that weights_only loading refuses ({refused.group(1)}); lightcook checkpoints hold "
        "tensors and primitives only: keep callback state_dict() and hyperparameters to primitives"
    )
