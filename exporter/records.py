"""Typed records to and from JSON, in one place: the manifest and the reports use it.

A record is a frozen dataclass whose fields are plain values, tuples, ``dict[str, X]``,
``X | None`` or other records. ``to_json`` gives the plain data that is written (tuples as
lists, ``None`` optional records left out); ``from_json`` reads it back, refusing a missing
field so that a truncated or foreign file fails in one line rather than deep in a consumer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class RecordError(ValueError):
    """A JSON document that does not have the fields of the record it is read as."""


def to_json(record: Any) -> Any:
    """Plain JSON data of a record (recursively); optional fields that are None are omitted."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        out = {}
        for f in dataclasses.fields(record):
            value = getattr(record, f.name)
            if value is None and f.metadata.get("omit_none", False):
                continue
            out[f.name] = to_json(value)
        return out
    if isinstance(record, (list, tuple)):
        return [to_json(v) for v in record]
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    return record


def omitted_when_none(default: Any = None) -> Any:
    """A field written only when it is set (older files may lack it)."""
    return dataclasses.field(default=default, metadata={"omit_none": True})


def from_json(cls: type[T], data: Any, path: str = "") -> T:
    return _read(cls, data, path or cls.__name__)


def _read(hint: Any, data: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(data, dict):
            raise RecordError(f"{path}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(hint)
        kwargs = {}
        for f in dataclasses.fields(hint):
            if f.name in data:
                kwargs[f.name] = _read(hints[f.name], data[f.name], f"{path}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{path}: missing field {f.name!r}")
        return hint(**kwargs)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _read(inner, data, path)
    if origin is tuple:
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a list, got {type(data).__name__}")
        return tuple(_read(args[0], v, f"{path}[{i}]") for i, v in enumerate(data))
    if origin is dict:
        if not isinstance(data, dict):
            raise RecordError(f"{path}: expected an object, got {type(data).__name__}")
        return {k: _read(args[1], v, f"{path}.{k}") for k, v in data.items()}
    wanted = _PLAIN.get(hint)
    if wanted is not None and (not isinstance(data, wanted) or (hint is not bool and isinstance(data, bool))):
        raise RecordError(f"{path}: expected {hint.__name__}, got {type(data).__name__}")
    return data  # plain values (and Any) as they are


# The JSON types a plain field's value may have (a float field takes an integer, no field takes
# a bool but a bool one).
_PLAIN = {str: str, int: int, float: (int, float), bool: bool}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (a record or plain data) through a temporary sibling: never half a file."""
    write_text_atomic(path, json.dumps(to_json(data), indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text through a temporary sibling, renamed into place: never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
