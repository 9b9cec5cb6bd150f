"""YAML -> Recipe, with command-line overrides and errors that point at the line to fix.

Recipe files come from other teams and are untrusted: only `yaml.safe_load`-level constructs
are read (no tags that build objects, no expression evaluation).
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sparsekit.errors import RecipeError
from sparsekit.recipe.checks import check_recipe
from sparsekit.recipe.schema import PHASE_KINDS, Recipe

# Limits a recipe never needs but a hostile file could exploit: a recipe is a few kB.
MAX_BYTES = 1 << 20  # 1 MiB of YAML
MAX_DEPTH = 32  # nested mappings and lists
MAX_VALUES = 100_000  # values once YAML aliases are expanded ("billion laughs")

_OVERRIDE_PATH = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|(\.)")
Loc = tuple[str | int, ...]


def load_recipe(source: str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        source: a YAML file path, or the recipe as a dict.
        overrides: `path=value` strings such as `training.epochs=3` or `phases[1].sparsity=0.6`.

    Raises:
        RecipeError: naming every problem with its field path and YAML line.
    """
    if isinstance(source, dict):
        data, lines, label = copy.deepcopy(source), {}, "recipe"
    else:
        path = Path(source)
        data, lines = _read_yaml(path)
        label = str(path)
    overridden: dict[Loc, str] = {}
    for text in overrides or []:
        loc, value = _parse_override(text)
        _apply_override(data, loc, value, text)
        overridden[loc] = text
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = [_describe(e, data) for e in err.errors()]
        raise RecipeError(_format(label, problems, lines, overridden)) from None
    problems = check_recipe(recipe)
    if problems:
        raise RecipeError(_format(label, problems, lines, overridden))
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML with every default filled in (what a run actually used)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _read_yaml(path: Path) -> tuple[dict, dict[Loc, int]]:
    """Parse a YAML mapping safely and record the line of every value by its field path."""
    if not path.is_file():
        raise RecipeError(
            f"{path}: no such recipe file. Check the path, or list the shipped "
            "recipes in the recipes/ folder."
        )
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RecipeError(
            f"{path}: the recipe file is {size:,} bytes; recipes are limited to {MAX_BYTES:,} "
            "bytes (a real recipe is a few kB). Check that this is the file you meant."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(
            f"{path}: cannot read the recipe ({err}). Save it as UTF-8 text."
        ) from None
    node, data = _parse_yaml(text, str(path))
    if node is None or data is None:
        raise RecipeError(
            f"{path}: the recipe file is empty. A recipe needs at least `name:` "
            "and usually `training:` and `phases:`; see recipes/ for examples."
        )
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe must be a YAML mapping (key: value lines), "
            f"but the file holds a {type(data).__name__}."
        )
    lines: dict[Loc, int] = {}
    _index_lines(node, (), lines, path)
    return data, lines


def clip(text: str, limit: int = 60) -> str:
    """A command-line value short enough to quote in a one-paragraph error."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def parse_value(raw: str, where: str) -> Any:
    """A command-line value (`--set PATH=VALUE`, `--model-arg KEY=VALUE`) read as YAML, with
    the recipe file's limits: plain YAML only, bounded nesting and size.

    Raises:
        RecipeError: a tag that does not construct, nesting too deep, too many values.
    """
    if not raw.strip():
        return ""
    try:
        yaml.compose(raw, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return raw  # not YAML at all (`a: b: c`): the text as it is, for the schema to judge
    except RecursionError:
        pass  # _parse_yaml says so
    return _parse_yaml(raw, where)[1]


def _parse_yaml(text: str, where: str) -> tuple[yaml.Node | None, Any]:
    """Compose (checking nesting and size before anything is built), then construct."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_size(node, where)
        return node, yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(
            f"{where}: the YAML is nested too deeply to read; recipes nest at most "
            f"{MAX_DEPTH} levels."
        ) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as err:
        # PyYAML's own constructors fail this way on some malformed tagged scalars
        # (`!!timestamp 2001-12-14#...`, `!!binary` with bad padding).
        raise RecipeError(
            f"{where}: not valid YAML: a value could not be read ({type(err).__name__}: {err}). "
            "Recipes are plain YAML mappings; tags such as !!timestamp or !!binary are not needed."
        ) from None
    except yaml.YAMLError as err:
        where_in = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where_in = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(
            f"{where}: not valid YAML{where_in}: {problem}. Recipes are plain YAML mappings; "
            "tags such as !!python/object are refused."
        ) from None


def _check_size(node: yaml.Node | None, path: Path | str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and more than MAX_VALUES values with aliases
    expanded, before anything walks the tree value by value."""
    if node is None:
        return
    counts: dict[int, int] = {}  # values under each node, aliases expanded

    def count(n: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise RecipeError(
                f"{path}: values are nested more than {MAX_DEPTH} levels deep (line "
                f"{n.start_mark.line + 1}); recipes nest a few levels."
            )
        if id(n) in counts:
            return counts[id(n)]
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(count(k, depth + 1) + count(v, depth + 1) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(count(v, depth + 1) for v in n.value)
        if total > MAX_VALUES:
            raise RecipeError(
                f"{path}: the recipe expands to more than {MAX_VALUES:,} values (YAML anchors "
                "and aliases that repeat each other?); a recipe holds a few dozen."
            )
        counts[id(n)] = total
        return total

    count(node, 0)


def _index_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int], path: Path) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise RecipeError(
                    f"{path}: key {key!r} appears twice in the same mapping (line "
                    f"{key_node.start_mark.line + 1}); YAML would silently keep the last one. "
                    "Remove one of them."
                )
            seen.add(key)
            lines[(*loc, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*loc, key), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*loc, i), lines, path)


def _parse_override(text: str) -> tuple[Loc, Any]:
    """`phases[1].sparsity=0.6` -> (("phases", 1, "sparsity"), 0.6); the value is read as YAML."""
    path, sep, raw = text.partition("=")
    bad = RecipeError(
        f"--set {clip(text)!r}: expected PATH=VALUE, for example `--set training.epochs=3` or "
        "`--set phases[1].sparsity=0.6`."
    )
    if not sep or not path.strip():
        raise bad
    loc: list[str | int] = []
    pos, path = 0, path.strip()
    expect_name = True
    for match in _OVERRIDE_PATH.finditer(path):
        if match.start() != pos:
            raise bad
        name, index, dot = match.groups()
        if name is not None:
            if not expect_name:
                raise bad
            loc.append(name)
            expect_name = False
        elif index is not None:
            if expect_name:
                raise bad
            loc.append(int(index))
        else:
            if expect_name:
                raise bad
            expect_name = True
        pos = match.end()
    if pos != len(path) or expect_name:
        raise bad
    return tuple(loc), parse_value(raw, f"--set {clip(text)}")


def _apply_override(data: dict, loc: Loc, value: Any, text: str) -> None:
    target: Any = data
    for depth, part in enumerate(loc[:-1]):
        nxt = loc[depth + 1]
        if isinstance(part, int):
            if not isinstance(target, list) or part >= len(target):
                size = len(target) if isinstance(target, list) else 0
                raise RecipeError(
                    f"--set {clip(text)!r}: {_loc_str(loc[: depth + 1])} does not exist; the recipe "
                    f"has {size} item(s) there (indices start at 0)."
                )
            target = target[part]
        else:
            if not isinstance(target, dict):
                raise RecipeError(
                    f"--set {clip(text)!r}: {_loc_str(loc[:depth])} is not a mapping."
                )
            if part not in target or target[part] is None:
                target[part] = [] if isinstance(nxt, int) else {}
            target = target[part]
    last = loc[-1]
    if isinstance(last, int):
        if not isinstance(target, list) or last >= len(target):
            raise RecipeError(f"--set {clip(text)!r}: {_loc_str(loc)} does not exist.")
    elif not isinstance(target, dict):
        raise RecipeError(f"--set {clip(text)!r}: {_loc_str(loc[:-1])} is not a mapping.")
    target[last] = value


def _describe(error: dict, data: dict) -> tuple[Loc, str]:
    """One pydantic error as (field path in the file, message with allowed values and hints)."""
    loc = _file_loc(tuple(error["loc"]), data)
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], data)
        hint = _closest(str(loc[-1]), allowed)
        return loc, f"unknown key{hint}; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "union_tag_not_found":
        return loc, f"this phase has no `kind`; allowed values: {', '.join(PHASE_KINDS)}"
    got = (
        f"; got {error['input']!r}"
        if "input" in error and not isinstance(error["input"], (dict, list))
        else ""
    )
    if kind in ("literal_error", "union_tag_invalid"):
        ctx = error.get("ctx", {})
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", ctx.get("expected_tags", ""))))
        given = error.get("input") if kind == "literal_error" else ctx.get("tag")
        hint = _closest(str(given), expected) if expected else ""
        allowed = f"allowed values: {', '.join(expected)}" if expected else msg
        return loc, f"{allowed}{got if kind == 'literal_error' else f'; got {given!r}'}{hint}"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    return loc, f"{msg}{got}"


def _file_loc(loc: Loc, data: dict) -> Loc:
    """Drop the union tags pydantic inserts (phases.1.unstructured_dst.x -> phases.1.x)."""
    out: list[str | int] = []
    node: Any = data
    for part in loc:
        if (
            isinstance(node, dict)
            and isinstance(part, str)
            and part not in node
            and (node.get("kind") == part)
        ):
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _allowed_keys(loc: Loc, data: dict) -> list[str]:
    """Field names of the recipe model found at `loc` (following phase kinds)."""
    model: Any = Recipe
    node: Any = data
    for position, part in enumerate(loc):
        node = node[part] if isinstance(node, (dict, list)) else None
        if isinstance(part, int):
            continue
        # A list field (phases) holds a union: pick the member by the kind of the item at loc.
        item = node
        following = loc[position + 1] if position + 1 < len(loc) else None
        if isinstance(node, list) and isinstance(following, int) and following < len(node):
            item = node[following]
        model = _field_model(model, part, item)
        if model is None:
            return []
    return list(model.model_fields) if model is not None else []


def _field_model(model: type[BaseModel], field: str, node: Any) -> type[BaseModel] | None:
    """The model class a field holds, unwrapping lists, optionals and the phase union."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    candidates = [info.annotation]
    while candidates:
        tp = candidates.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            kind_field = tp.model_fields.get("kind")
            kinds = typing.get_args(kind_field.annotation) if kind_field else ()
            if not kinds or not isinstance(node, dict) or node.get("kind") in kinds:
                return tp
            continue
        candidates.extend(typing.get_args(tp))
    return None


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _loc_str(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _format(label: str, problems: list, lines: dict[Loc, int], overridden: dict[Loc, str]) -> str:
    parts = []
    for loc, msg in problems:
        where = ""
        for cut in range(len(loc), -1, -1):
            if loc[:cut] in overridden:
                where = f" (from --set {clip(overridden[loc[:cut]])})"
                break
            if loc[:cut] in lines:
                where = f" (line {lines[loc[:cut]]})"
                break
        parts.append(f"  - {_loc_str(loc)}{where}: {msg}")
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return (
        f"{label}: invalid recipe, {count}:\n" + "\n".join(parts) + "\nFix the recipe and check "
        "it with `sparsekit recipe validate FILE`; `sparsekit recipe schema` lists every field."
    )
