"""Value conversion between Lua and Python for the Lua runtime.

Values cross the Lua/Python boundary only as MessagePack bytes: Lua code in
``LUA_CODEC`` encodes Lua values to MessagePack and decodes MessagePack into fresh
Lua tables, and msgspec does the Python half.  No lupa proxy object ever reaches a
namespace function or a result, and no Python object ever reaches Lua.

The Lua -> Python rules are the JSON rules of the design notes:

* nil and the null sentinel -> None; booleans; integers stay ``int`` and floats stay
  ``float`` (2.0 stays 2.0); NaN and infinities are refused;
* strings must be valid UTF-8 for results (arguments to namespace functions may be
  binary: those arrive as ``bytes``);
* a table marked as an array, or whose keys are exactly 1..n (n >= 1), is a list
  (holes in a marked array become None); any other table is a dict whose keys are
  strings (number keys become their decimal text, so ``{1, 2, x = 3}`` is
  ``{"1": 1, "2": 2, "x": 3}``); an empty unmarked table is ``{}``;
* functions, coroutines, userdata, cycles and nesting deeper than 128 levels
  (``hooteproto.depth.MAX_DEPTH``, the limit of every decoder) are refused with a
  message naming the path, e.g. ``result.cb is a function; ...``.

Python -> Lua: dicts become tables, lists and tuples become tables marked as arrays
(so ``[]`` comes back as ``[]``), None is nil at the top level and the null sentinel
inside a container, ``NULL`` is the null sentinel anywhere, bytes and str become
strings.  A value nested deeper than ``MAX_DEPTH`` is refused with
``hooteproto.depth.TooDeepError`` (a ValueError), so no value reaching Lua is deeper
than one leaving it.
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Final

import msgspec

from hooteproto.depth import MAX_DEPTH, TooDeepError, check_value

# MessagePack extension type that carries the null sentinel (see ``NULL``).
_NULL_EXT_TYPE: Final = 1


class _Null:
    """Type of ``NULL``; a singleton so ``is`` comparisons work."""

    _instance: _Null | None = None

    def __new__(cls) -> _Null:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"


NULL: Final = _Null()
"""Python stand-in for Lua's null sentinel: converts to it even at the top level,
where plain None converts to nil.  Namespace functions return it (via
``RunContext.null``) to give Lua an explicit null."""


def _enc_hook(obj: Any) -> Any:
    if obj is NULL:
        return msgspec.msgpack.Ext(_NULL_EXT_TYPE, b"")
    raise TypeError(f"{type(obj).__name__} values cannot be passed to Lua")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder()


def to_lua(value: Any) -> bytes:
    """Encode a Python value for ``codec.decode`` on the Lua side.

    Raises TypeError, ValueError or OverflowError (integers beyond 64 bits) for values
    that have no Lua form; :class:`TooDeepError` (a ValueError) for one nested deeper
    than ``MAX_DEPTH``.
    """
    check_value(value)
    try:
        return _encoder.encode(value)
    except RecursionError:  # not after the check; but never let it out
        raise TooDeepError() from None


def from_lua(data: bytes) -> Any:
    """Decode bytes written by ``codec.encode`` on the Lua side (which refuses tables
    nested deeper than ``MAX_DEPTH``)."""
    try:
        return _decoder.decode(data)
    except RecursionError:
        raise TooDeepError() from None


# The Lua half: a chunk body that the runtime runs, once per runtime, as the first part
# of its privileged setup (before the sandbox exists); it captures the real library
# functions it needs as locals and returns the codec table.  The array marker and the
# null sentinel are created here so every table the codec makes uses the same ones.  Its
# nesting limit is the one of every decoder, set here.
LUA_CODEC: Final = (
    b"local MAX_DEPTH = %d\n" % MAX_DEPTH + (importlib.resources.files("luanette.engine") / "codec.lua").read_bytes()
)
