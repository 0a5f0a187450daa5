"""Check a job's params against the ``params`` table a script's ``describe()`` returns.

``describe().params`` maps each name to ``{type, required, default, description}``.
Types: ``string``, ``number``, ``integer``, ``boolean``, ``table`` (or ``object``),
``array``, ``any``. A required param that is missing, or a value of the wrong type, is
refused with every problem listed; defaults fill in what is missing; params the
script does not declare pass through untouched.
"""

from __future__ import annotations

from typing import Any

CHECKS: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "table": lambda v: isinstance(v, (dict, list)),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


class InvalidParams(ValueError):
    """Params that do not fit the script's declaration; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def declared(schema: Any) -> dict[str, dict[str, Any]]:
    """The usable part of a ``describe().params`` table (anything malformed is ignored,
    so a sloppy describe() never blocks a job)."""
    if not isinstance(schema, dict):
        return {}
    return {name: spec for name, spec in schema.items() if isinstance(spec, dict)}


def validate(schema: Any, params: Any) -> Any:
    """Params with defaults filled in; raises :class:`InvalidParams`."""
    spec = declared(schema)
    if not spec:
        return params
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams([f"params must be an object, got {_kind(params)}"])
    out = dict(params)
    problems: list[str] = []
    for name, decl in spec.items():
        kind = decl.get("type", "any")
        if name not in out or out[name] is None:
            if "default" in decl:
                out[name] = decl["default"]
            elif decl.get("required"):
                problems.append(f"'{name}' is required ({kind})")
            continue
        check = CHECKS.get(kind)
        if check is not None and not check(out[name]):
            problems.append(f"'{name}' must be {_article(kind)}, got {_kind(out[name])}")
    if problems:
        raise InvalidParams(problems)
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
