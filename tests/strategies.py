"""Hypothesis strategies that build any hooteproto struct from its type annotations."""

from __future__ import annotations

import enum
import functools
import types
import typing
import uuid
from typing import Any

import msgspec
from hypothesis import strategies as st

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _bounds(meta: tuple) -> dict:
    out = {}
    for m in meta:
        if isinstance(m, msgspec.Meta):
            if m.ge is not None:
                out["min_value"] = m.ge
            if m.le is not None:
                out["max_value"] = m.le
    return out


@functools.cache
def strategy_for(tp: Any) -> st.SearchStrategy:
    """A strategy for values of annotation ``tp`` (structs, unions, containers, JSON)."""
    if tp is Any:
        return json_values
    if tp is str:
        return st.text(max_size=30)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is bytes:
        return st.binary(max_size=30)
    if tp is uuid.UUID:
        return st.uuids()
    if tp is type(None):
        return st.none()
    if tp is msgspec.UnsetType:  # an extension field left out (e.g. JobExecute.priority)
        return st.just(msgspec.UNSET)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp, include_extras=True)
        return st.builds(tp, **{name: strategy_for(hints[name]) for name in tp.__struct_fields__})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        if args[0] is int:
            b = {"min_value": 0, "max_value": 2**64 - 1} | _bounds(tp.__metadata__)
            return st.integers(**b)
        return strategy_for(args[0])
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=4)
    raise TypeError(f"no strategy for {tp!r}")
