"""Strict TOML recipes: unknown keys and wrong types fail with the dotted path and a suggestion."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from exporter.errors import RecipeError, UsageError
from exporter.spec import ExportRecipe, TargetSpec

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExportRecipe:
    """Read a recipe file (or a name under recipes/), apply ``--set`` overrides, validate."""
    path = resolve_recipe_path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def resolve_recipe_path(path: str | Path) -> Path:
    """Accept a file path, or a name relative to the shipped recipes/ folder (with or without .toml)."""
    candidates = [Path(path)]
    name = str(path)
    candidates.append(RECIPES_DIR / name)
    if not name.endswith(".toml"):
        candidates.append(RECIPES_DIR / f"{name}.toml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = [str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in list_recipe_files()]
    close = difflib.get_close_matches(name.removesuffix(".toml"), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "run `recgpt-export recipes list` for the shipped recipes"
    raise UsageError(f"recipe {name!r} not found", hint=hint)


def list_recipe_files() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*/*.toml"))


def recipe_from_dict(raw: dict[str, Any]) -> ExportRecipe:
    return _build(ExportRecipe, raw, "")


def recipe_to_dict(recipe: ExportRecipe) -> dict[str, Any]:
    """Plain data (lists, not tuples) for the manifest and `recipes show`; the target's
    options under their own table, [target.<name>], as a recipe writes them."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    data = plain(dataclasses.asdict(recipe))
    target = recipe.target
    data["target"] = {"name": target.name, target.name: plain(dataclasses.asdict(target.options))}
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=c`` override; the value is read as a TOML value, or as a bare string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set {item!r} is not of the form a.b=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # bare words (e.g. target.name=executorch) are strings
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _child(node: Any, part: str, path: str, *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if part not in node and create:
        node[part] = {}
    if not isinstance(node[part], (dict, list)):
        raise UsageError(f"--set {path}: {path} is a value, not a table")
    return node[part]


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UsageError(f"--set {path}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _build_target(raw: Any, path: str) -> TargetSpec:
    """[target]: ``name`` picks the backend, whose own options class parses [target.<name>]."""
    from exporter.backends import backend_class, known_targets

    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a table, got {_type_name(raw)}")
    name = raw.get("name", TargetSpec.name)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{path}.name: expected a target name, got {name!r}")
    options_class = backend_class(name).options_class
    for key in raw:
        if key in ("name", name):
            continue
        if key == "backend":
            raise RecipeError(f"{path}.backend: no longer a recipe field (each target has one backend); delete it")
        if key in known_targets():
            raise RecipeError(f"{path}.{key}: options of the {key} target, but target.name is {name!r}")
        close = difflib.get_close_matches(key, ["name", name], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: name, {name} (the target's options)"
        raise RecipeError(f"{path}.{key}: unknown key{hint}")
    return TargetSpec(name=name, options=_build(options_class, raw.get(name, {}), f"{path}.{name}"))


def table_to_record(cls: type, raw: Any, path: str = "") -> Any:
    """Any frozen dataclass of plain fields from a TOML table, as strictly as a recipe (unknown
    keys with a did-you-mean, wrong types and missing keys refused with their dotted path)."""
    return _build(cls, raw, path)


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "recipe"
    if cls is TargetSpec:
        return _build_target(raw, path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise RecipeError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, dotted)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"{where}: missing required key {'.'.join(filter(None, [path, missing[0]]))}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise RecipeError(f"{where}: {exc}") from exc


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {_type_name(value)}")
        return tuple(_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise RecipeError(f"{path}: unsupported field type")  # pragma: no cover
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) and hint is not bool:
            raise RecipeError(f"{path}: expected {hint.__name__}, got a boolean")
        if not isinstance(value, hint):
            raise RecipeError(f"{path}: expected {hint.__name__}, got {_type_name(value)} {value!r}")
        return value
    raise RecipeError(f"{path}: unsupported field type {hint}")  # pragma: no cover


def _type_name(value: Any) -> str:
    return {dict: "a table", list: "a list"}.get(type(value), type(value).__name__)
