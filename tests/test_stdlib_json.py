"""luanette.stdlib.json through the real runtime: encode/decode, json.null, json.array."""

from __future__ import annotations

import json as pyjson
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luanette.runtime import ScriptError, run_script
from luanette.stdlib.json import JsonNamespace

NAMESPACES = [JsonNamespace()]


async def run(code: str, params: Any = None) -> Any:
    return (await run_script(code, params, namespaces=NAMESPACES)).result


async def error(code: str, params: Any = None) -> str:
    with pytest.raises(ScriptError) as info:
        await run_script(code, params, namespaces=NAMESPACES)
    message = info.value.detail.message
    assert "internal error" not in message, message
    return message


@pytest.mark.parametrize(
    ("lua", "text"),
    [
        ("nil", "null"),
        ("json.null", "null"),
        ("{}", "{}"),
        ("json.array()", "[]"),
        ("json.array({})", "[]"),
        ("{1, 2.5, 'x', true}", '[1,2.5,"x",true]'),
        ("{b = 1, a = {json.null, 2}}", '{"a":[null,2],"b":1}'),  # keys sorted
        ("{[1] = 'a', [3] = 'c'}", '{"1":"a","3":"c"}'),
        ("{n = 2.0}", '{"n":2.0}'),
        ("{list = json.array({1, json.null, 3})}", '{"list":[1,null,3]}'),
        ("'é\\n'", '"é\\n"'),
    ],
)
async def test_encode(lua: str, text: str) -> None:
    assert await run(f"return json.encode({lua})") == text


async def test_encode_indent_and_equal_tables_give_equal_text() -> None:
    result = await run(
        """
        local a, b = {x = 1, y = {2, 3}, z = "w"}, {}
        b.z = "w"; b.y = {2, 3}; b.x = 1
        return {json.encode(a) == json.encode(b), json.encode(a, {indent = 2})}
        """
    )
    assert result[0] is True
    assert result[1] == '{\n  "x": 1,\n  "y": [\n    2,\n    3\n  ],\n  "z": "w"\n}'


@pytest.mark.parametrize(
    ("lua", "fragment"),
    [
        ("{f = print}", "argument #1.f is a function"),
        ("{0/0}", "argument #1[1] is NaN"),
        ("{x = {'ok', '\\255'}}", "value.x[2] is not valid UTF-8 text"),
        ("{}, {indent = 9}", "opts.indent must be an integer from 0 to 8"),
        ("{}, {pretty = true}", "opts has an unknown key 'pretty'"),
        ("{}, 3", "opts must be a table, got number"),
    ],
)
async def test_encode_errors(lua: str, fragment: str) -> None:
    message = await error(f"return json.encode({lua})")
    assert message.startswith("json.encode: "), message
    assert fragment in message


async def test_decode_values_nulls_and_arrays_round_trip() -> None:
    result = await run(
        """
        local v = json.decode('{"a": [], "b": {}, "c": [1, null, "x"], "d": null, "e": 1.5, "big": 123456789012345678901}')
        local checks = {
          empty_array = json.encode(v.a) == "[]",
          empty_object = json.encode(v.b) == "{}",
          null_kept = v.d == json.null and v.c[2] == json.null,
          null_text = tostring(json.null),
          top_null_is_nil = json.decode("null") == nil,
          big = v.big,
          length = #v.c,
        }
        return {checks = checks, again = json.decode(json.encode(v))}
        """
    )
    checks = result["checks"]
    assert checks["empty_array"] and checks["empty_object"] and checks["null_kept"] and checks["top_null_is_nil"]
    assert checks["null_text"] == "null" and checks["length"] == 3
    assert checks["big"] == pytest.approx(1.2345678901234568e20)
    assert result["again"] == {"a": [], "b": {}, "c": [1, None, "x"], "d": None, "e": 1.5, "big": checks["big"]}


@pytest.mark.parametrize(
    ("lua", "fragment"),
    [
        ("'{\"a\": }'", "text is not valid JSON"),
        ("'[1, 2'", "text is not valid JSON"),
        ("42", "text must be a string, got number"),
        ("string.rep('[', 300) .. string.rep(']', 300)", "text is nested deeper than 128 levels"),
        ("string.rep('[', 5000) .. string.rep(']', 5000)", "text is nested deeper than 128 levels"),
    ],
)
async def test_decode_errors(lua: str, fragment: str) -> None:
    message = await error(f"local r = json.decode({lua})\nreturn r")
    assert message.startswith("json.decode: "), message
    assert fragment in message


async def test_null_and_array_marks_are_safe() -> None:
    result = await run(
        """
        local ok1, e1 = pcall(function() json.null.x = 1 end)
        local ok2, e2 = pcall(json.array, 5)
        local t = json.array({1, 2})
        local ok3 = pcall(setmetatable, t, {})
        local ok4, e4 = pcall(json.encode, json.array({x = 1}))
        return {ok1, e1, ok2, e2, getmetatable(t), ok3, ok4, e4}
        """
    )
    assert result[0] is False and "read-only" in result[1]
    assert result[2] is False and "table expected, got number" in result[3]
    assert result[4] is False  # the mark is hidden from scripts
    assert result[5] is False  # and cannot be replaced
    assert result[6] is False and "marked as an array" in result[7]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(json_values)
async def test_decode_then_encode_is_the_same_json(value: Any) -> None:
    text = pyjson.dumps(value)
    again = await run("return json.encode(json.decode(params.text))", {"text": text})
    assert pyjson.loads(again) == value
