"""Typed settings from YAML files and command-line strings, with errors that say where.

Every configurable thing in lmforge is a typed dataclass or a typed function signature. This
module turns untyped input (a YAML mapping, a ``--key value`` string) into those types and, when
that fails, raises :class:`~lmforge.errors.LMForgeError` naming the file, line and key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, LMForgeError, did_you_mean

# key path ("train.lr") -> 1-based line in the YAML file
LineMap = dict[str, int]


def load_yaml(path: str | Path) -> tuple[dict[str, Any], LineMap]:
    """Read a YAML mapping and remember the line of every key.

    Raises:
        LMForgeError: missing file, invalid YAML (with its line) or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise LMForgeError("config file not found", file=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LMForgeError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LMForgeError(
            f"invalid YAML: {problem}", file=path, line=mark.line + 1 if mark else None
        ) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise LMForgeError("the top level must be a mapping of key: value", file=path, line=1)
    lines: LineMap = {}
    _collect_lines(node, "", lines)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: LineMap) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key + ".", lines)


def type_name(annotation: Any) -> str:
    """A short human name for a type annotation ('int', 'float or none', 'one of a, b')."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def coerce(
    value: Any, annotation: Any, *, key: str, file: str | Path | None = None, line: int | None = None
) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``annotation``.

    Strings are parsed the YAML way ("3" -> 3, "true" -> True, "null" -> None), so ``--lr 3e-4``
    and ``lr: 3e-4`` mean the same. Raises LMForgeError naming key, file and line on a mismatch.
    """

    def fail() -> LMForgeError:
        return LMForgeError(f"expected {type_name(annotation)}, got {value!r}", file=file, line=line, key=key)

    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in options:
                return None
            raise fail()
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key=key, file=file, line=line)
            except LMForgeError:
                continue
        raise fail()
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices:
            return value
        if isinstance(value, str):
            for choice in choices:
                if str(choice) == value:
                    return choice
        raise LMForgeError(
            f"expected one of {', '.join(map(str, choices))}, got {value!r}"
            + (did_you_mean(str(value), map(str, choices)) if isinstance(value, str) else ""),
            file=file,
            line=line,
            key=key,
        )
    if origin in (list, tuple):
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        if isinstance(value, str):
            parsed = _parse_scalar(value)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise fail()
        items = [coerce(v, item_type, key=key, file=file, line=line) for v in value]
        return items if origin is list else tuple(items)
    if annotation is Any:
        return _parse_scalar(value) if isinstance(value, str) else value
    if isinstance(value, str) and annotation is not str and annotation is not Path:
        value = _parse_scalar(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if annotation is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if annotation is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise fail()
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise fail()


def _parse_scalar(text: str) -> Any:
    """Parse a command-line string as a YAML scalar; also accept 1e-5 (YAML 1.1 reads it as text)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            return value
    return value


def _coerce_fields(
    cls: type, data: Any, *, file: str | Path | None, lines: LineMap, prefix: str
) -> dict[str, Any]:
    """Type-check a mapping against the fields of dataclass ``cls``; unknown keys are errors."""
    if not isinstance(data, dict):
        raise LMForgeError(
            f"expected a mapping for '{prefix.rstrip('.') or cls.__name__}', got {data!r}",
            file=file,
            line=lines.get(prefix.rstrip(".")),
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise LMForgeError(
                f"unknown key '{path}'" + did_you_mean(str(key), names), file=file, line=lines.get(path)
            )
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            values[key] = dataclass_from_dict(annotation, value, file=file, lines=lines, prefix=path + ".")
        else:
            values[key] = coerce(value, annotation, key=path, file=file, line=lines.get(path))
    return values


def _construct(
    build: Any, values: dict[str, Any], *, file: str | Path | None, lines: LineMap, prefix: str
) -> Any:
    try:
        return build(**values)
    except ConfigError as err:
        full_key = f"{prefix}{err.key}" if err.key else None
        raise ConfigError(err.message, file=file, line=lines.get(full_key or ""), key=full_key) from None


def dataclass_from_dict(
    cls: type,
    data: dict[str, Any],
    *,
    file: str | Path | None = None,
    lines: LineMap | None = None,
    prefix: str = "",
) -> Any:
    """Build dataclass ``cls`` from a mapping, type-checking each value and rejecting unknown keys
    (with the nearest known key suggested). Nested dataclass fields take nested mappings."""
    lines = lines or {}
    values = _coerce_fields(cls, data, file=file, lines=lines, prefix=prefix)
    return _construct(cls, values, file=file, lines=lines, prefix=prefix)


def dataclass_update(
    obj: Any,
    changes: dict[str, Any],
    *,
    file: str | Path | None = None,
    lines: LineMap | None = None,
    prefix: str = "",
) -> Any:
    """A copy of dataclass ``obj`` with ``changes`` (checked like :func:`dataclass_from_dict`).
    Uses ``obj.replace`` when the class has one (so derived fields are derived again)."""
    lines = lines or {}
    values = _coerce_fields(type(obj), changes, file=file, lines=lines, prefix=prefix)
    build = obj.replace if hasattr(obj, "replace") else (lambda **kw: dataclasses.replace(obj, **kw))
    return _construct(build, values, file=file, lines=lines, prefix=prefix)


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a dataclass (Paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(obj)
