"""The shape every technique's configuration takes: a frozen dataclass that validates itself.

A technique defines ``XConfig(TechniqueConfig)`` in ``lightcook/ops/<technique>.py`` and checks its
fields in ``__post_init__`` with the helpers below, which raise ``ValueError("<field>: ... allowed:
...")`` — the field name, never a prefix. Whoever builds the config from user input adds the prefix
once (:meth:`TechniqueConfig.build`: ``compress.prune.`` in the app, nothing in plain Python).
``SHAPE_FIELDS`` names the fields that decide the structure or the meaning of the compression state
(bits, n:m, experts, units, ...): they are stored in checkpoints and compared on resume.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class DemoConfig(TechniqueConfig):
    ...     SHAPE_FIELDS = ("bits",)
    ...     bits: int = 8
    ...     def __post_init__(self) -> None:
    ...         check_choice("bits", self.bits, (2, 4, 8))
    >>> DemoConfig.build("compress.demo.", bits=4).shape()
    {'bits': 4}
    >>> DemoConfig.build("compress.demo.", bits=3)
    Traceback (most recent call last):
    ...
    ValueError: compress.demo.bits: got 3; allowed: 2, 4, 8
    >>> DemoConfig.build("compress.demo.", bit=3)
    Traceback (most recent call last):
    ...
    ValueError: compress.demo.bit: unknown key; allowed: bits
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

_C = TypeVar("_C", bound="TechniqueConfig")


@dataclasses.dataclass(frozen=True)
class TechniqueConfig:
    """Base of the technique configs (frozen dataclasses; subclasses validate in ``__post_init__``)."""

    #: Fields that shape the compressed model or its state; compared when a checkpoint is resumed.
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls: type[_C], prefix: str = "", **kwargs: Any) -> _C:
        """``cls(**kwargs)`` with every error message prefixed by ``prefix`` (e.g. ``compress.quant.``).

        Raises:
            ValueError: an unknown key (the allowed ones are listed) or a field's own check failed.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"{prefix}{unknown[0]}: unknown key; allowed: {', '.join(names)}")
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-friendly primitives (tuples become lists)."""
        return {f.name: _primitive(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def shape(self) -> dict[str, Any]:
        """The :attr:`SHAPE_FIELDS` as primitives (what a resumed run must agree with)."""
        values = self.to_dict()
        return {name: values[name] for name in self.SHAPE_FIELDS}


def _primitive(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_primitive(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _primitive(v) for k, v in value.items()}
    return value


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ``ValueError("<field>: got <value>; allowed: ...")`` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if not any(type(a) is type(value) and a == value for a in allowed):  # 1 is not True, 8.0 is not 8
        raise ValueError(f"{field}: got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_int(field: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """Raise unless ``value`` is an int (not a bool) within ``[low, high]`` (either bound optional)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{field}: must be an integer, got {value!r}")
    _check_bounds(field, value, low, high)


def check_number(
    field: str, value: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> None:
    """Raise unless ``value`` is a real number within ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{field}: must be a number, got {value!r}")
    if open_low and low is not None and not value > low:
        raise ValueError(f"{field}: must be > {low}, got {value!r}")
    _check_bounds(field, value, None if open_low else low, high)


def _check_bounds(field: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{field}: must lie in [{lo}, {hi}], got {value!r}")
