"""The `json` namespace: JSON text to and from Lua values.

- ``json.encode(value [, opts]) -> string``: compact JSON with object keys sorted, so
  equal tables give equal text (and equal CAS hashes).  ``opts.indent`` (0..8) pretty-
  prints.  The rules are the result rules of the runtime: a table whose keys are 1..n
  is an array, any other table an object (number keys become strings), an empty table
  is ``{}`` unless marked with ``json.array``; ``nil`` inside a table is dropped, so use
  ``json.null`` for an explicit null.  Functions, NaN, infinities, cycles and strings
  that are not UTF-8 are errors naming the place, e.g. ``value.tags[2]``.
- ``json.decode(text) -> value``: objects become tables, arrays become tables marked
  as arrays (so they encode back as arrays, ``[]`` included), ``null`` inside a
  container is ``json.null`` (so the key survives) and a top-level ``null`` is ``nil``.
  Integers beyond 64 bits become floats.  Malformed text is an error with its byte
  position; text nested deeper than 128 levels (``hooteproto.depth.MAX_DEPTH``) is an
  error too (``text is nested deeper than 128 levels``), as is a value to encode nested
  deeper than that (Lua tables refuse to cross deeper).
- ``json.null``: the null sentinel (``tostring(json.null) == "null"``; read-only).
- ``json.array([t]) -> t``: marks ``t`` (default a new table) as an array, so an empty
  one encodes as ``[]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from hooteproto.depth import MAX_DEPTH, TooDeepError, decode_json
from luanette.engine.api import LuaCallError, RunContext
from luanette.stdlib.paths import as_text, lua_type

MAX_INDENT: Final = 8
_INT64: Final = range(-(2**63), 2**63)

_compact = msgspec.json.Encoder(order="sorted")


def _key(key: str, path: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def _check_text(value: Any, path: str) -> None:
    """Find the first binary (non-UTF-8) string: msgspec would write it as base64."""
    if isinstance(value, bytes):
        raise LuaCallError(f"{path} is not valid UTF-8 text")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, _key(k, path))
    elif isinstance(value, list):
        for i, v in enumerate(value, 1):
            _check_text(v, f"{path}[{i}]")


def _for_lua(value: Any) -> Any:
    """Decoded JSON as the runtime can hand it to Lua: 64-bit integers.  (Its depth is
    checked by the decoder: at most ``MAX_DEPTH`` levels of recursion here.)"""
    if isinstance(value, dict):
        return {k: _for_lua(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_for_lua(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return float(value)
    return value


class JsonNamespace:
    """Lua global `json`.  Stateless: one instance can serve every run."""

    name = "json"
    # Values cannot cross from Python as functions do: the Lua half publishes them.
    lua_prelude_lazy = True  # (only fills its own table: runs on first use)
    lua_prelude = b"local json, marks = ...\njson.null = marks.NULL\njson.array = marks.array\n"

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {"encode": self.encode, "decode": self.decode}

    def encode(self, value: Any = None, opts: Any = None) -> str:
        indent = 0
        if opts is not None:
            if not isinstance(opts, dict):
                raise LuaCallError(f"opts must be a table, got {lua_type(opts)}")
            unknown = sorted(set(opts) - {"indent"})
            if unknown:
                raise LuaCallError(f"opts has an unknown key {unknown[0]!r}; known: indent")
            indent = opts.get("indent", 0)
            if isinstance(indent, bool) or not isinstance(indent, int) or not 0 <= indent <= MAX_INDENT:
                raise LuaCallError(f"opts.indent must be an integer from 0 to {MAX_INDENT}")
        _check_text(value, "value")
        data = _compact.encode(value)
        if indent:
            data = msgspec.json.format(data, indent=indent)
        return data.decode()

    def decode(self, text: Any) -> Any:
        raw = as_text(text, "text")
        try:
            value = decode_json(raw, MAX_DEPTH)
        except msgspec.DecodeError as exc:
            raise LuaCallError(f"text is not valid JSON: {exc}") from None
        except TooDeepError as exc:
            raise LuaCallError(f"text is {exc}") from None
        return _for_lua(value)
