"""What every codec shares: the :class:`Codec` interface, the encoding / decoding state, byte counts.

A codec stores one technique's layers in their compact form. :func:`lightcook.export.save_compressed`
runs the registered codecs in order over one :class:`Encoding` (the network being exported, the
tensors stored so far, the state-dict keys already taken); :func:`lightcook.export.load_compressed`
runs them over one :class:`Decoding` (the rebuilt model and the stored tensors). ``estimate_bytes``
walks the same :class:`Encoding` without computing any tensor: it records the sizes ``encode`` writes.

Example:
    >>> import torch
    >>> enc = Encoding(torch.nn.Linear(4, 2), estimating=True)
    >>> enc.store("weight", torch.zeros(2, 4)); enc.size()
    32
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightcook.export.format import nbytes
from lightcook.ops.architectures import linear_dims
from lightcook.ops.names import MASK, MASK_SUFFIX, is_conv1d
from lightcook.ops.sparsity import is_nm

__all__ = [
    "Codec",
    "Decoding",
    "Encoding",
    "LayerBytes",
    "stored_as",
    "in_block",
    "is_mask",
    "itemsize",
    "kept_weights",
    "nm_packed",
    "under",
]

#: A module inside a repeated block (``model.layers.3.mlp.up_proj``): the layers the techniques compress.
_IN_BLOCK = re.compile(r"(.*\.)?\d+\..*")


@dataclass
class LayerBytes:
    """One Linear layer as stored.

    Attributes:
        params: weights of the stored layer (``in * out``, after structural slicing).
        weight_bytes: stored bytes of its weight: integer codes + scales (+ zero points), kept values +
            positions, or the plain weight at its stored dtype.
        kept: weights the mask keeps (``params`` without a mask).
        techniques: codecs that stored it (empty: stored as it is).
    """

    params: int
    weight_bytes: int
    kept: int
    techniques: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (manifest and estimate)."""
        return {
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "kept": self.kept,
            "fp32_weight_bytes": 4 * self.params,
            "techniques": list(self.techniques),
        }


@dataclass
class Encoding:
    """The state of one export (or one estimate: ``estimating=True`` records sizes, stores nothing).

    Attributes:
        net: the network being exported (a sliced copy once the structured codec ran).
        nm: the ``(n, m)`` pattern to pack (``None``: masked weights stay dense).
        dtype: cast of the floating tensors stored as they are.
        architecture: the slicing layout override (structured codec).
        sliced: the network was sliced already (record its structure without gates).
        tensors: the stored tensors (empty when estimating).
        sizes: bytes per stored key.
        claimed: state-dict keys of ``net`` a codec stored in its own form (skipped by the plain pass).
        layers: Linear layers stored by a codec, by name.
        by_technique: bytes each codec stored.
    """

    net: nn.Module
    nm: tuple[int, int] | None = None
    dtype: torch.dtype | None = None
    architecture: Any = None
    sliced: bool = False
    estimating: bool = False
    tensors: dict[str, Tensor] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)
    layers: dict[str, LayerBytes] = field(default_factory=dict)
    by_technique: dict[str, int] = field(default_factory=dict)

    def store(self, key: str, tensor: Tensor) -> None:
        """Store ``tensor`` under ``key`` (its size only, when estimating)."""
        self.sizes[key] = nbytes(tensor)
        if not self.estimating:
            self.tensors[key] = tensor

    def count(self, key: str, size: int) -> None:
        """Record ``size`` bytes for ``key`` without a tensor (estimating only)."""
        self.sizes[key] = size

    def size(self, keys: Any = None) -> int:
        """Bytes stored under ``keys`` (all keys by default)."""
        return sum(self.sizes[k] for k in (self.sizes if keys is None else keys))

    def claim(self, name: str, module: nn.Module) -> None:
        """Take every state-dict key of ``module`` (named ``name``) out of the plain pass."""
        self.claimed |= set(module.state_dict(prefix=f"{name}.", keep_vars=True))


@dataclass
class Decoding:
    """The state of one load.

    Attributes:
        model: the rebuilt network (full size until the structured codec resized it).
        tensors: stored tensors not yet taken by a codec.
        dtype: the model's dtype.
        device: where the model goes.
        filled: state-dict keys a codec fills in itself (not expected among the plain tensors).
        semi_structured: the 2:4 CUDA kernel choice (``None``: automatic).
        backend: the quantized layers' inference backend, resolved (:mod:`lightcook.ops.kernels`).
        held: what a codec's ``decode`` keeps for its ``finish`` (by codec name).
    """

    model: nn.Module
    tensors: dict[str, Tensor]
    dtype: torch.dtype
    device: torch.device
    filled: set[str] = field(default_factory=set)
    semi_structured: bool | None = None
    backend: str = "reference"
    held: dict[str, Any] = field(default_factory=dict)


class Codec:
    """One technique's storage. Subclasses set :attr:`name` and implement the four methods.

    ``encode`` / ``estimate_bytes`` return the manifest entry (``None``: the technique is absent from
    the network); ``decode`` runs before the plain tensors are loaded (reshape the model, take its own
    tensors), ``finish`` after, on the target device (install inference kernels).
    """

    name: ClassVar[str] = ""

    def encode(self, enc: Encoding) -> dict[str, Any] | None:
        """Store this technique's layers of ``enc.net`` into ``enc``; return the manifest entry."""
        raise NotImplementedError

    def estimate_bytes(self, enc: Encoding) -> dict[str, Any] | None:
        """Record in ``enc.sizes`` exactly the bytes :meth:`encode` would store; return the entry."""
        raise NotImplementedError

    def decode(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        """Reshape ``dec.model`` for this technique and take its tensors out of ``dec.tensors``."""

    def finish(self, dec: Decoding, entry: Mapping[str, Any]) -> None:
        """Install this technique's inference modules into the loaded ``dec.model``."""


def in_block(name: str) -> bool:
    """Whether module ``name`` lies inside a repeated block (a numeric path component)."""
    return bool(_IN_BLOCK.fullmatch(name))


def under(key: str, names: Mapping[str, Any] | set[str]) -> bool:
    """Whether state-dict ``key`` belongs to one of the modules ``names``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def itemsize(tensor: Tensor, dtype: torch.dtype | None) -> int:
    """Bytes per element of ``tensor`` stored as it is (floating tensors cast to ``dtype``)."""
    if dtype is not None and tensor.is_floating_point():
        return torch.empty((), dtype=dtype).element_size()
    return tensor.element_size()


def stored_as(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``tensor`` as it is stored: floating tensors cast to ``dtype`` (``None``: kept)."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def nm_packed(module: nn.Module, nm: tuple[int, int] | None) -> bool:
    """Whether ``module``'s ``weight_mask`` follows the ``n:m`` pattern (other masks only zero weights)."""
    mask = module._buffers.get(MASK)
    if nm is None or not isinstance(mask, Tensor):
        return False
    return is_nm(mask.t() if is_conv1d(module) else mask, *nm)


def kept_weights(module: nn.Module) -> int:
    """Weights ``module``'s mask keeps (all of them without a mask)."""
    mask = module._buffers.get(MASK)
    if isinstance(mask, Tensor):
        return int(mask.sum())
    n_in, n_out, _ = linear_dims(module)
    return n_in * n_out


def is_mask(key: str) -> bool:
    """Masks are never stored: the packed positions (or zeros) are the mask."""
    return key.endswith(MASK_SUFFIX)
