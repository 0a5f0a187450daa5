"""Check a job's params against the ``params`` table a script's ``describe()`` returns.

``describe().params`` maps each name to ``{type, required, default, description}``.
Types: ``string``, ``number``, ``integer``, ``boolean``, ``table`` (or ``object``),
``array``, ``any``. A required param that is missing, or a value of the wrong type, is
refused with every problem listed; defaults fill in what is missing. Params the script
does not declare are refused when ``describe().additional_params`` is false, else
accepted and reported (:attr:`Checked.unknown`) so the caller can be warned.

Each problem is a dict ``{path, expected, got, message}`` (``path`` dotted from
``params``, arrays counted from 1 as in Lua: ``params.notes[2]``), so a client (or a
model) can fix every one at once; at most :data:`MAX_PROBLEMS` are listed.
"""

from __future__ import annotations

import datetime
import difflib
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


MAX_PROBLEMS: Final = 20
"""Problems listed in one refusal (the count says how many there were)."""


def problem(path: str, expected: str, got: str, message: str) -> dict[str, str]:
    """One entry of ``details.problems``."""
    return {"path": path, "expected": expected, "got": got, "message": message}


class InvalidParams(ValueError):
    """Params that do not fit the script's declaration; ``problems`` lists each one as
    ``{path, expected, got, message}`` (see :func:`problem`)."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("; ".join(p["message"] for p in problems[:MAX_PROBLEMS]))
        self.problems = problems

    def details(self) -> dict[str, Any]:
        """``details`` of the ``invalid_params`` reply: the problems (at most
        MAX_PROBLEMS) and how many there were."""
        return {"problems": self.problems[:MAX_PROBLEMS], "problem_count": len(self.problems)}


class Checked(msgspec.Struct):
    """Params that fit: with defaults filled in, and the names the script does not
    declare (accepted; the caller warns about them)."""

    params: Any
    unknown: list[str] = []


MAX_DEPTH: Final = DEPTH_LIMIT  # the one nesting limit (hooteproto.depth), as the Lua codec
_INT64: Final = (-(2**63), 2**64 - 1)  # what MessagePack (and so Lua) carries
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_representable(value: Any, *, json_keys: bool = False, root: str = "params") -> None:
    """Raise :class:`InvalidParams` naming the first place (``params.a[2]``, arrays
    counted from 1 as in Lua) of ``value`` that a script cannot be given: a nil map key,
    a MessagePack extension (a timestamp too), an integer beyond 64 bits, nesting over
    200.  ``json_keys``: also keys that are not strings or numbers (a job's params are
    kept as JSON)."""
    found = _unrepresentable(value, root, 0, json_keys)
    if found is not None:
        path, got, message = found
        raise InvalidParams([problem(path, "a value Lua can hold", got, f"{path}: {message}")])


def _unrepresentable(value: Any, path: str, depth: int, json_keys: bool) -> tuple[str, str, str] | None:
    """``(path, got, message)`` of the first value under ``value`` a script cannot be
    given, or None."""
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return None
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            message = f"the integer {value} does not fit in 64 bits, which Lua cannot hold"
            return path, "an integer beyond 64 bits", message
        return None
    if depth >= MAX_DEPTH:
        return path, "deeper nesting", f"nested more than {MAX_DEPTH} tables deep"
    if isinstance(value, list):
        for i, item in enumerate(value, 1):
            found = _unrepresentable(item, f"{path}[{i}]", depth + 1, json_keys)
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if key is None:
                return path, "a nil key", "a map key is nil, which a Lua table cannot hold"
            if isinstance(key, msgspec.msgpack.Ext):
                message = f"a map key is a MessagePack extension (type {key.code}), which Lua cannot hold"
                return path, "an extension key", message
            if json_keys and (isinstance(key, bool) or not isinstance(key, (str, int, float))):
                message = f"a map key is {_kind(key)}; only string and number keys can be kept"
                return path, f"a key that is {_kind(key)}", message
            found = _unrepresentable(item, _child(path, key), depth + 1, json_keys)
            if found is not None:
                return found
        return None
    if isinstance(value, msgspec.msgpack.Ext):
        return path, "an extension", f"a MessagePack extension (type {value.code}), which Lua cannot hold"
    if isinstance(value, (datetime.datetime, datetime.date)):
        return path, "a timestamp", "a MessagePack timestamp, which Lua cannot hold; send it as a string or a number"
    return path, _kind(value), f"{_kind(value)}, which Lua cannot hold"


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


def validate(schema: Any, params: Any, *, additional: bool = True) -> Checked:
    """Check ``params`` against a ``describe().params`` table: defaults filled in, the
    undeclared names listed.  ``additional=False`` (``describe().additional_params =
    false``) refuses undeclared names instead.  Raises :class:`InvalidParams` with every
    problem."""
    spec = declared(schema)
    # a params table, even an empty one, declares the script's params; without one
    # nothing is known to be undeclared, unless the script refuses extras outright
    declares = isinstance(schema, (dict, list)) or not additional
    if not spec and not declares:
        return Checked(params)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams(
            [problem("params", "object", _kind(params), f"params must be an object, got {_kind(params)}")]
        )
    out = dict(params)
    problems: list[dict[str, str]] = []
    for name, decl in spec.items():
        kind = decl.get("type", "any")
        path = _child("params", name)
        if name not in out or out[name] is None:
            if "default" in decl:
                out[name] = decl["default"]
            elif decl.get("required"):
                got = "null" if name in out else "nothing"
                problems.append(problem(path, kind, got, f"'{name}' is required ({kind})"))
            continue
        check = CHECKS.get(kind)
        if check is not None and not check(out[name]):
            got = _kind(out[name])
            problems.append(problem(path, kind, got, f"'{name}' must be {_article(kind)}, got {got}"))
    unknown = [key for key in params if key not in spec]
    if not additional:
        names = ", ".join(sorted(spec)) or "none"
        for key in unknown:
            message = f"'{key}' is not a param of this script (additional_params = false; it declares: {names})"
            close = difflib.get_close_matches(str(key), list(spec), n=1) if isinstance(key, str) else []
            if close:
                message += f"; did you mean '{close[0]}'?"
            problems.append(problem(_child("params", key), f"one of: {names}", "an undeclared param", message))
    if problems:
        raise InvalidParams(problems)
    return Checked(out, [str(key) for key in unknown] if declares else [])


def check_schema(schema: Any, where: str = "describe().params") -> list[dict[str, str]]:
    """The problems of a ``describe().params`` table itself (checked when a script is
    stored): each entry must be a table with a known ``type``, a boolean ``required``,
    a string ``description`` and a ``default`` of its type."""
    if schema is None or schema == []:  # (an empty Lua table may arrive as a list)
        return []
    expected = 'a table of name = {type = "..."}'
    if not isinstance(schema, dict):
        return [problem(where, expected, _kind(schema), f"{where} must be {expected}, got {_kind(schema)}")]
    problems: list[dict[str, str]] = []
    for name, decl in schema.items():
        path = _child(where, name)
        if not isinstance(decl, dict):
            example = f'{{type = "{_TYPE_OF.get(type(decl), "any")}"}}'
            message = f"{path} must be a table such as {example}, got {_kind(decl)}"
            problems.append(problem(path, "a table", _kind(decl), message))
            continue
        kind = decl.get("type", "any")
        if kind not in CHECKS:
            accepted = ", ".join(CHECKS)
            got = repr(kind) if isinstance(kind, str) else _kind(kind)
            message = f"{path}.type must be one of {accepted}, got {got}"
            problems.append(problem(f"{path}.type", f"one of: {accepted}", got, message))
            kind = "any"
        for field, want in (("required", bool), ("description", str)):
            if field in decl and not isinstance(decl[field], want):
                wanted = "boolean" if want is bool else "string"
                got = _kind(decl[field])
                message = f"{path}.{field} must be {_article(wanted)}, got {got}"
                problems.append(problem(f"{path}.{field}", wanted, got, message))
        if decl.get("default") is not None and not CHECKS[kind](decl["default"]):
            got = _kind(decl["default"])
            message = f"{path}.default must be {_article(kind)} (its type), got {got}"
            problems.append(problem(f"{path}.default", kind, got, message))
    return problems


_TYPE_OF: Final = {str: "string", int: "integer", float: "number", bool: "boolean"}


def kind_of(value: Any) -> str:
    """The JSON name of a value's type (``integer``, ``string``, ``object``, ...)."""
    return _kind(value)


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
