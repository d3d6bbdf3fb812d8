"""Base class for wire messages: frozen dataclasses, checked as they load, that load from older peers.

`Wire.from_wire` ignores keys it does not know and fills missing ones from
defaults, so a message from an older or newer peer still loads. New fields
must therefore always have defaults.

Everything that arrives over the network is hostile until checked: `from_wire`
checks every field against its annotation (``int`` is an int and not a bool, a
``float`` is finite, a ``str`` is a string, ``tuple[int, ...]`` a list of ints,
nested messages recursively) and against the bounds its `field` declares
(`lo`/`hi` for numbers, `pattern` and `max_len` for strings, `max_items` for
lists), so a malformed message is refused with a `WireError` that names the
message and the field, before anything acts on it or stores it. Integers are
always within SQLite's 64 bits. `loads` is the JSON parser for bytes from a
peer: it refuses NaN, Infinity, numbers that overflow a float, and nesting
deeper than `MAX_DEPTH`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T", bound="Wire")

MAX_DEPTH = 32  # nesting of JSON from a peer
MAX_STR = 1024 * 1024  # a string field with no max_len of its own
MAX_ITEMS = 1_000_000  # a list field with no max_items of its own
INT64 = (-(2**63), 2**63 - 1)

# Alphabets of values that become file names, URL parts or SQLite keys.
ID = r"[0-9A-Za-z_-]{1,64}"  # job, agent and node ids
SHA256 = r"[0-9a-f]{64}"  # content digests
OPTIONAL_SHA256 = r"(?:[0-9a-f]{64})?"


class WireError(ValueError):
    """A message is missing a required field or has the wrong shape."""


def field(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    lo: float | None = None,
    hi: float | None = None,
    pattern: str | None = None,
    max_len: int | None = None,
    max_items: int | None = None,
) -> Any:
    """A dataclass field with bounds that `from_wire` checks."""
    bounds = {"lo": lo, "hi": hi, "pattern": re.compile(pattern) if pattern else None}
    bounds.update(max_len=max_len, max_items=max_items)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"wire": bounds})


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """JSON from a peer: no NaN or Infinity, no float overflow, at most `MAX_DEPTH` deep."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise WireError(f"JSON nested deeper than {MAX_DEPTH}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"not JSON: {e}") from None
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise WireError(f"JSON nested deeper than {limit}")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a message may hold")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} overflows a float")
    return value


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
        for name, (required, check) in _checkers(cls).items():
            if name not in data:
                if required:
                    raise WireError(f"{cls.__name__}: missing field {name!r}")
                continue
            kwargs[name] = check(data[name], f"{cls.__name__}.{name}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise WireError(f"{cls.__name__}: {e}") from None


# ---- checkers built from annotations ----------------------------------------------------

Check = typing.Callable[[Any, str], Any]
_CACHE: dict[type, dict[str, tuple[bool, Check]]] = {}


def _checkers(cls: type[Wire]) -> dict[str, tuple[bool, Check]]:
    found = _CACHE.get(cls)
    if found is None:
        import sys

        module = sys.modules[cls.__module__]
        hints = typing.get_type_hints(cls, vars(module))
        found = {}
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            found[f.name] = (required, _checker(hints[f.name], f.metadata.get("wire", {})))
        _CACHE[cls] = found
    return found


def _fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise WireError(f"{where}: expected {expected}, got {type(value).__name__} {shown}")


def _checker(hint: Any, bounds: dict[str, Any]) -> Check:  # noqa: C901 - one branch per kind of annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        inner = _checker(options[0] if len(options) == 1 else Any, bounds)
        return lambda value, where: None if value is None else inner(value, where)
    if isinstance(hint, type) and issubclass(hint, Wire):
        return lambda value, where: _nested(hint, value, where)
    if hint is bool:

        def check_bool(value: Any, where: str) -> bool:
            if not isinstance(value, bool):
                _fail(where, "true or false", value)
            return value

        return check_bool
    if hint in (int, float):
        lo, hi = bounds.get("lo"), bounds.get("hi")
        lo = INT64[0] if lo is None and hint is int else lo
        hi = INT64[1] if hi is None and hint is int else hi
        kinds = (int,) if hint is int else (int, float)
        expected = "an integer" if hint is int else "a number"
        if lo is not None or hi is not None:
            expected += f" in [{'' if lo is None else lo}, {'' if hi is None else hi}]"

        def check_number(value: Any, where: str) -> Any:
            if isinstance(value, bool) or not isinstance(value, kinds):
                _fail(where, expected, value)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(where, expected, value)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                _fail(where, expected, value)
            return float(value) if hint is float else value

        return check_number
    if hint is str:
        pattern, max_len = bounds.get("pattern"), bounds.get("max_len") or MAX_STR

        def check_str(value: Any, where: str) -> str:
            if not isinstance(value, str):
                _fail(where, "a string", value)
            if len(value) > max_len:
                raise WireError(f"{where}: longer than {max_len} characters")
            if pattern is not None and not pattern.fullmatch(value):
                _fail(where, f"a string matching {pattern.pattern}", value)
            return value

        return check_str
    if origin is tuple:
        item = _checker(args[0] if args else Any, {})
        if args and len(args) == 2 and args[1] is Ellipsis:
            item = _checker(args[0], {})
        max_items = bounds.get("max_items") or MAX_ITEMS

        def check_list(value: Any, where: str) -> tuple[Any, ...]:
            if not isinstance(value, (list, tuple)):
                _fail(where, "a list", value)
            if len(value) > max_items:
                raise WireError(f"{where}: more than {max_items} items")
            return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

        return check_list
    if origin is dict:
        key = _checker(args[0], {}) if args else _checker(str, {})
        val = _checker(args[1], {}) if args else _checker(Any, {})
        max_items = bounds.get("max_items") or MAX_ITEMS

        def check_dict(value: Any, where: str) -> dict[Any, Any]:
            if not isinstance(value, dict):
                _fail(where, "an object", value)
            if len(value) > max_items:
                raise WireError(f"{where}: more than {max_items} entries")
            return {key(k, f"{where} key"): val(v, f"{where}[{k!r}]") for k, v in value.items()}

        return check_dict
    raise TypeError(f"no wire check for the annotation {hint!r}")


def _nested(cls: type[Wire], value: Any, where: str) -> Wire:
    try:
        return cls.from_wire(value)
    except WireError as e:
        raise WireError(f"{where}: {e}") from None
