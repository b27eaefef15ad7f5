"""Strict loading: a recipe from YAML and `section.key=value` overrides, every problem reported at once (unknown
keys with a "did you mean", wrong types, values out of range, then the cross-field checks), and back to YAML.

    recipe = load_recipe("configs/demo.yaml", overrides=["training.max_steps=20"])
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .checks import _cross_checks
from .schema import Recipe, RecipeError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the (lightly coerced) value or record a problem."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a section (mapping), got {value!r}")
            return tp()
        return _build(tp, value, path, problems)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        listed = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, list) and listed:
            return _convert(value, listed[0], path, problems)
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _convert(value, arg, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            fix = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}: {value!r} is not one of {' | '.join(map(str, choices))}{fix}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string: accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            problems.append(f"{path}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp} at {path} is not supported")  # a bug in the schema, not in the recipe


def _check_bounds(value: Any, meta: dict, path: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if key in meta and not ok(value, meta[key]):
            problems.append(f"{path}: must be {word} {meta[key]}, got {value!r}")


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(fields)}"
            problems.append(f"{path}: unknown key ({fix})")
            continue
        before = len(problems)
        converted = _convert(value, hints[key], path, problems)
        if len(problems) == before:
            _check_bounds(converted, dict(fields[key].metadata), path, problems)
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - all fields have defaults
        problems.append(f"{prefix or 'recipe'}: {exc}")
        return cls()


def _set_dotted(tree: dict, dotted: str, value: Any, problems: list[str]) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(f"override {dotted}: {part} is not a section")
            return
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str], problems: list[str]) -> dict:
    """`section.key=value` strings to a nested dict; values are read as YAML (so 3e-4, true, [a, b] work)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value, problems)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(data).__name__}"], source)
    recipe = _build(Recipe, data, "", problems)
    if not problems:
        problems.extend(_cross_checks(recipe))
    if problems:
        raise RecipeError(problems, source)
    return recipe


def load_recipe(path: Union[str, Path, None], overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe (or only defaults when path is None), apply overrides, and validate everything."""
    problems: list[str] = []
    data: dict = {}
    source = str(path) if path else "recipe"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError([f"{p}: no such recipe file"], source)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RecipeError([f"{p}: not valid YAML ({exc})"], source) from None
        if not isinstance(data, dict):
            raise RecipeError([f"{p}: the top level must be a mapping of sections"], source)
    extra = parse_overrides(overrides or [], problems)
    if problems:
        raise RecipeError(problems, source)
    return recipe_from_dict(_merge(data, extra), source)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def describe_schema(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf: used by `dist-ft check --schema` and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe_schema(hints[f.name], key + "."))
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((key, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
