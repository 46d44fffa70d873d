"""The codec registry: one codec per technique, in the order the export applies them.

A new technique adds one file here (a :class:`~lightcook.export.codecs.base.Codec` subclass with
``encode`` / ``decode`` / ``estimate_bytes``) and one line to :data:`CODECS` — the shape of
transformers' ``AUTO_QUANTIZER_MAPPING`` and torchao's config → handler table.

Example:
    >>> [codec.name for codec in CODECS], MANIFEST_ORDER
    (['structured', 'moe', 'nm', 'quantized'], ('moe', 'structured', 'nm', 'quantized'))
"""

from __future__ import annotations

from lightcook.export.codecs.base import Codec
from lightcook.export.codecs.moe import MoECodec
from lightcook.export.codecs.nm import NMCodec
from lightcook.export.codecs.quantized import QuantizedCodec
from lightcook.export.codecs.structured import StructuredCodec

__all__ = ["CODECS", "MANIFEST_ORDER", "Codec", "codec"]

#: Encoding (and decoding) order: slicing first (it changes the shapes every other codec stores),
#: then the MoE specs of the sliced FFNs, N:M packing, integer codes (which read the N:M masks).
CODECS: tuple[Codec, ...] = (StructuredCodec(), MoECodec(), NMCodec(), QuantizedCodec())
#: The manifest lists ``techniques`` in the callbacks' canonical order.
MANIFEST_ORDER = ("moe", "structured", "nm", "quantized")


def codec(name: str) -> Codec:
    """The registered codec of technique ``name``.

    Raises:
        ValueError: no codec has that name (lists the known ones).
    """
    for found in CODECS:
        if found.name == name:
            return found
    raise ValueError(f"unknown technique {name!r}; known: {', '.join(MANIFEST_ORDER)}")
