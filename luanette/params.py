"""Check a job's params against the ``params`` table a script's ``describe()`` returns.

``describe().params`` maps each name to ``{type, required, default, description}``.
Types: ``string``, ``number``, ``integer``, ``boolean``, ``table`` (or ``object``),
``array``, ``any``. A required param that is missing, or a value of the wrong type, is
refused with every problem listed; defaults fill in what is missing; params the
script does not declare pass through untouched.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any, Final

import msgspec

from hooteproto.depth import MAX_DEPTH as DEPTH_LIMIT

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


MAX_DEPTH: Final = DEPTH_LIMIT  # the one nesting limit (hooteproto.depth), as the Lua codec
_INT64: Final = (-(2**63), 2**64 - 1)  # what MessagePack (and so Lua) carries
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_representable(value: Any, *, json_keys: bool = False, root: str = "params") -> None:
    """Raise :class:`InvalidParams` naming the first place (``params.a[2]``, arrays
    counted from 1 as in Lua) of ``value`` that a script cannot be given: a nil map key,
    a MessagePack extension (a timestamp too), an integer beyond 64 bits, nesting over
    200.  ``json_keys``: also keys that are not strings or numbers (a job's params are
    kept as JSON)."""
    problem = _unrepresentable(value, root, 0, json_keys)
    if problem is not None:
        raise InvalidParams([problem])


def _unrepresentable(value: Any, path: str, depth: int, json_keys: bool) -> str | None:
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return None
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            return f"{path}: the integer {value} does not fit in 64 bits, which Lua cannot hold"
        return None
    if depth >= MAX_DEPTH:
        return f"{path}: nested more than {MAX_DEPTH} tables deep"
    if isinstance(value, list):
        for i, item in enumerate(value, 1):
            problem = _unrepresentable(item, f"{path}[{i}]", depth + 1, json_keys)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if key is None:
                return f"{path}: a map key is nil, which a Lua table cannot hold"
            if isinstance(key, msgspec.msgpack.Ext):
                return f"{path}: a map key is a MessagePack extension (type {key.code}), which Lua cannot hold"
            if json_keys and (isinstance(key, bool) or not isinstance(key, (str, int, float))):
                return f"{path}: a map key is {_kind(key)}; only string and number keys can be kept"
            problem = _unrepresentable(item, _child(path, key), depth + 1, json_keys)
            if problem is not None:
                return problem
        return None
    if isinstance(value, msgspec.msgpack.Ext):
        return f"{path}: a MessagePack extension (type {value.code}), which Lua cannot hold"
    if isinstance(value, (datetime.datetime, datetime.date)):
        return f"{path}: a MessagePack timestamp, which Lua cannot hold; send it as a string or a number"
    return f"{path}: {_kind(value)}, which Lua cannot hold"


def _child(path: str, key: Any) -> str:
    if isinstance(key, str) and _NAME.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]" if isinstance(key, str) else f"{path}[{key}]"


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
