"""Base class for wire messages: frozen dataclasses that load from older peers.

`Wire.from_wire` ignores keys it does not know and fills missing ones from
defaults, so a message from an older or newer peer still loads. New fields
must therefore always have defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T", bound="Wire")


class WireError(ValueError):
    """A message is missing a required field or has the wrong shape."""


@dataclasses.dataclass(frozen=True)
class Wire:
    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Wire):
                value = value.to_wire()
            elif isinstance(value, tuple):
                value = [v.to_wire() if isinstance(v, Wire) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_wire(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise WireError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise WireError(f"{cls.__name__}: missing field {f.name!r}")
                continue
            value = data[f.name]
            nested = _NESTED.get((cls.__name__, f.name))
            if nested is not None and value is not None:
                if isinstance(value, list):
                    value = tuple(nested.from_wire(v) for v in value)
                else:
                    value = nested.from_wire(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise WireError(f"{cls.__name__}: {e}") from None


# (class name, field name) -> nested Wire class, filled in by `nested()`.
_NESTED: dict[tuple[str, str], type[Wire]] = {}


def nested(owner: str, field: str, cls: type[Wire]) -> None:
    """Declare that `owner.field` holds a `cls` (or a list of them) on the wire."""
    _NESTED[(owner, field)] = cls
