"""luanette.runtime: results, Lua <-> JSON conversion, structured errors, logging.

Real Lua (lupa.lua54) throughout; limits, I/O and concurrency are in test_runtime_io.py,
sandbox escapes in test_sandbox.py.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from luanette.runtime import ErrorDetail, Limits, Outcome, ScriptError, check_syntax, run_script
from luanette.stdlib.log import LogNamespace


async def result_of(code: str, params: Any = None, **kwargs: Any) -> Any:
    outcome = await run_script(code, params, **kwargs)
    assert isinstance(outcome, Outcome)
    return outcome.result


async def error_of(code: str, params: Any = None, **kwargs: Any) -> ErrorDetail:
    with pytest.raises(ScriptError) as info:
        await run_script(code, params, **kwargs)
    assert str(info.value) == info.value.detail.message
    return info.value.detail


# ------------------------------------------------------------------ script convention


async def test_chunk_return_value_is_the_result() -> None:
    assert await result_of("return 2 + 2") == 4


async def test_only_the_first_return_value_counts() -> None:
    assert await result_of("return 1, 2, 3") == 1


async def test_no_return_value_is_none() -> None:
    assert await result_of("local x = 1") is None


async def test_main_is_called_with_params_when_the_chunk_returns_nothing() -> None:
    code = "function main(p) return p.x * 2, 'ignored' end\nlocal unused = 1"
    assert await result_of(code, {"x": 21}) == 42


async def test_a_chunk_value_wins_over_main() -> None:
    # upstream's eval: the chunk is an expression even when it defines main
    code = "function main(p) return p.x * 2 end\nreturn 'chunk value'"
    assert await result_of(code, {"x": 21}) == "chunk value"
    assert await result_of("function main(p) return 'main' end\nreturn nil") == "main"


async def test_params_global_is_the_same_table_main_receives() -> None:
    assert await result_of("function main(p) return rawequal(p, params) end", {"a": 1}) is True


async def test_local_main_is_not_the_convention() -> None:
    assert await result_of("local function main() return 1 end\nreturn 2") == 2


async def test_non_function_main_is_ignored() -> None:
    assert await result_of("main = 5\nreturn 'chunk'") == "chunk"


async def test_no_params_means_nil_params() -> None:
    assert await result_of("return params == nil") is True


async def test_duration_is_measured() -> None:
    started = time.monotonic()
    outcome = await run_script("local x = 0 for i = 1, 1e5 do x = x + i end return x")
    elapsed_ms = (time.monotonic() - started) * 1000
    assert outcome.result == 5000050000
    assert 0 < outcome.duration_ms <= elapsed_ms  # milliseconds, of this run


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0}, {"memory_bytes": 0}, {"hook_interval": 0}, {"timeout_s": -1.0}])
def test_limits_that_would_disable_a_guard_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid limits"):
        Limits(**kwargs)


# ---------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("return 3", 3),
        ("return -7", -7),
        ("return math.maxinteger", 2**63 - 1),
        ("return math.mininteger", -(2**63)),
        ("return 0.5", 0.5),
        ("return true", True),
        ("return false", False),
        ("return nil", None),
        ("return 'héllo ✓ 😀'", "héllo ✓ 😀"),
        ("return ''", ""),
        ("return {1, 2, 3}", [1, 2, 3]),
        ("return {'a', {'b', {'c'}}}", ["a", ["b", ["c"]]]),
        ("return {x = 1, y = {z = 'w'}}", {"x": 1, "y": {"z": "w"}}),
        # mixed tables keep every key; integer keys become their decimal text
        ("return {1, 2, x = 3}", {"1": 1, "2": 2, "x": 3}),
        ("return {[1] = 'a', [3] = 'c'}", {"1": "a", "3": "c"}),
        ("return {[2] = 'b'}", {"2": "b"}),
        ("return {[0] = 'z', 'a'}", {"0": "z", "1": "a"}),
        ("return {[-1] = 'n'}", {"-1": "n"}),
        ("return {[1.5] = 'f'}", {"1.5": "f"}),
        ("return {}", {}),
        ("return {{}, {n = {}}}", [{}, {"n": {}}]),
    ],
)
async def test_lua_values_become_json_values(code: str, expected: Any) -> None:
    assert await result_of(code) == expected


async def test_integers_stay_integers_and_floats_stay_floats() -> None:
    result = await result_of("return {1, 2.0, 3 // 1, 3 / 1, 2^53, 1e300}")
    assert result == [1, 2.0, 3, 3.0, 2.0**53, 1e300]
    assert [type(v) for v in result] == [int, float, int, float, float, float]


async def test_params_numbers_keep_their_type_in_lua() -> None:
    code = "return {math.type(params.i), math.type(params.f), math.type(params.big)}"
    assert await result_of(code, {"i": 3, "f": 3.0, "big": 2**62}) == ["integer", "float", "integer"]


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"a": []},
        {"list": [], "dict": {}},
        [[], [[]], {}],
        {"a": None, "b": [1, None, 3], "c": {"d": None}},
        [None],
        {"unicode": "日本語 ✓", "emoji": ["😀"]},
        {"n": 2**62, "f": 0.1, "neg": -5, "t": True, "F": False},
    ],
)
async def test_params_round_trip_unchanged(value: Any) -> None:
    assert await result_of("return params", value) == value


async def test_empty_list_from_python_is_still_an_array_after_lua_appends() -> None:
    assert await result_of("params.items[1] = 'x' return params.items", {"items": []}) == ["x"]


async def test_null_inside_containers_is_a_sentinel_not_nil() -> None:
    code = """
      return {
        a_is_nil = params.a == nil,
        a_text = tostring(params.a),
        length = #params.b,
        second_text = tostring(params.b[2]),
      }
    """
    result = await result_of(code, {"a": None, "b": [1, None, 3]})
    assert result == {"a_is_nil": False, "a_text": "null", "length": 3, "second_text": "null"}


async def test_null_sentinel_is_read_only() -> None:
    detail = await error_of("params.a.x = 1", {"a": None})
    assert detail.message == "null is read-only"


async def test_bytes_params_become_lua_strings() -> None:
    assert await result_of("return #params.data", {"data": b"\x00\xff\x01"}) == 3


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            "return {cb = function() end}",
            "result.cb is a function; only tables, strings, numbers, booleans and nil can be returned",
        ),
        ("return print", "result is a function; only tables, strings, numbers, booleans and nil can be returned"),
        ("return {items = {{name = print}}}", "result.items[1].name is a function"),
        ("return {['a b'] = coroutine.create(print)}", 'result["a b"] is a thread'),
        ("local t = {} t.self = t return t", "result.self contains itself (a cycle)"),
        ("local t = {1} t[2] = t return t", "result[2] contains itself (a cycle)"),
        ("return 0/0", "result is NaN"),
        ("return {x = {1/0}}", "result.x[1] is infinite"),
        ("return {-1/0}", "result[1] is infinite"),
        ("return {s = '\\xff\\xfe'}", "result.s is not valid UTF-8 text"),
        ("return {['\\xff'] = 1}", "result has a key that is not valid UTF-8 text"),
        ("return {[true] = 1}", "result has a boolean as a key"),
        ("return {[{}] = 1}", "result has a table as a key"),
        ("return {[1] = 'a', ['1'] = 'b', x = 1}", 'result has both the number key 1 and the string key "1"'),
    ],
)
async def test_unconvertible_results_name_the_path(code: str, message: str) -> None:
    detail = await error_of(code)
    assert detail.kind == "result_not_serializable"
    assert detail.message.startswith(message), detail.message
    assert detail.hints


async def test_nesting_is_capped_at_128() -> None:
    # `n` nested tables below the top one: 128 tables in all are fine (MAX_DEPTH), 129 are not
    deep = "local t = {} local c = t for i = 1, %d do c.x = {} c = c.x end return t"
    assert await result_of(deep % 127) is not None
    detail = await error_of(deep % 128)
    assert detail.kind == "result_not_serializable"
    assert "nested deeper than 128 levels" in detail.message


async def test_shared_subtable_is_not_a_cycle() -> None:
    assert await result_of("local s = {1} return {a = s, b = s}") == {"a": [1], "b": [1]}


async def test_unconvertible_params_are_invalid_params() -> None:
    for bad in (object(), {"n": 2**70}):
        with pytest.raises(ScriptError) as info:
            await run_script("return 1", bad)
        assert info.value.detail.kind == "invalid_params"


# ------------------------------------------------------------------ structured errors


async def test_syntax_error_has_line_and_clean_message() -> None:
    detail = await error_of("local x = 1\nlocal y = = 2\n")
    assert detail.kind == "lua_syntax"
    assert detail.line == 2
    assert detail.message == "unexpected symbol near '='"


async def test_unclosed_function_reports_where() -> None:
    detail = await error_of("function main()\n  return 1\n")
    assert detail.kind == "lua_syntax"
    assert detail.line == 3
    assert "'end' expected" in detail.message


async def test_check_syntax_compiles_without_running() -> None:
    assert check_syntax("error('never runs')") is None
    detail = check_syntax("return 1 +", chunk_name="job.lua")
    assert detail is not None
    assert detail.kind == "lua_syntax"
    assert detail.line == 1
    assert detail.message == "unexpected symbol near <eof>"


async def test_error_inside_main_reports_real_message_and_line() -> None:
    # (not `return helper(params)`: a tail call replaces main's frame in Lua)
    code = (
        "local function helper(t)\n"
        "  return t.missing.field\n"
        "end\n"
        "function main(params)\n"
        "  local r = helper(params)\n"
        "  return r\n"
        "end\n"
    )
    detail = await error_of(code, {})
    assert detail.kind == "lua_runtime"
    assert detail.message == "attempt to index a nil value (field 'missing')"
    assert detail.line == 2
    assert "main(params)" not in detail.message
    assert [(f.function, f.line) for f in detail.stack] == [("helper", 2), ("main", 5)]
    assert {f.source for f in detail.stack} == {"script"}


async def test_error_call_in_main_keeps_line() -> None:
    detail = await error_of("function main()\n\n  error('boom')\nend")
    assert (detail.message, detail.line) == ("boom", 3)


async def test_stack_shows_script_function_names_innermost_first() -> None:
    code = "local function inner() error('deep') end\nlocal function outer() inner() end\nfunction main() outer() end\n"
    detail = await error_of(code)
    assert [f.function for f in detail.stack] == ["inner", "outer", "main"]
    assert [f.line for f in detail.stack] == [1, 2, 3]


async def test_error_in_main_chunk_frame_is_named() -> None:
    detail = await error_of("local x = nil\nx()")
    assert detail.stack[0].function == "main chunk"
    assert detail.line == 2


async def test_error_level_zero_has_no_line() -> None:
    detail = await error_of("error('x', 0)")
    assert (detail.message, detail.line) == ("x", None)


async def test_error_with_table_value_uses_its_message() -> None:
    detail = await error_of("error({message = 'bad input', code = 'E42'})")
    assert detail.message == "bad input"


async def test_error_with_table_without_message_is_rendered() -> None:
    detail = await error_of("error({code = 'E42', retry = false})")
    assert detail.message == '{code = "E42", retry = false}'


async def test_error_with_nil_value() -> None:
    detail = await error_of("error()")
    assert detail.message == "(error object is a nil value)"


async def test_custom_chunk_name_is_stripped() -> None:
    detail = await error_of("\nerror('boom')", chunk_name="jobs/mix.lua")
    assert (detail.message, detail.line) == ("boom", 2)
    assert detail.stack[0].source == "jobs/mix.lua"


async def test_error_rethrown_from_pcall_keeps_original_line() -> None:
    detail = await error_of(
        "local ok, e = pcall(error, 'inner')\nlocal ok2, e2 = pcall(function()\n error('x') end)\nerror(e2, 0)"
    )
    assert (detail.message, detail.line) == ("x", 3)


async def test_error_in_user_coroutine_keeps_inner_line() -> None:
    detail = await error_of("local f = coroutine.wrap(function()\n  error('in co')\nend)\nf()")
    assert (detail.message, detail.line) == ("in co", 2)


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        ('pirnt("x")', "did you mean 'print'?"),
        ("return string.fromat('%d', 1)", "did you mean 'string.format'?"),
        ("return strng.format('x')", "did you mean 'string'?"),
        ("return ('x'):uper()", "did you mean 'upper'?"),
        ("return tabel.concat({})", "did you mean 'table'?"),
        ("helper_fn = function() end\nhelpr_fn()", "did you mean 'helper_fn'?"),
    ],
)
async def test_typos_get_did_you_mean_hints(code: str, hint: str) -> None:
    detail = await error_of(code)
    assert detail.kind == "lua_runtime"
    assert hint in detail.hints


async def test_no_hint_without_a_close_name() -> None:
    detail = await error_of("zzzzqqq()")
    assert detail.hints == []


async def test_namespace_functions_are_hint_candidates() -> None:
    detail = await error_of("log.inf('x')", namespaces=[LogNamespace()])
    assert "did you mean 'log.info'?" in detail.hints


async def test_stack_overflow_is_reported_with_capped_stack() -> None:
    detail = await error_of("local function f() return 1 + f() end\nf()")
    assert detail.kind == "lua_runtime"
    assert "stack overflow" in detail.message
    assert 0 < len(detail.stack) <= 32


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("setmetatable(nil, {})", "bad argument #1 to 'setmetatable' (table expected, got nil)"),
        ("pcall()", "bad argument #1 to 'pcall' (value expected)"),
        ("load(nil)", "bad argument #1 to 'load' (function expected, got nil)"),
        ("coroutine.resume(42)", "bad argument #1 to 'resume' (thread expected, got number)"),
        ("coroutine.close(42)", "bad argument #1 to 'close' (thread expected, got number)"),
    ],
)
async def test_argument_errors_behind_sandbox_wrappers_name_the_function(code: str, message: str) -> None:
    # the wrappers are runtime code: neither their names nor their positions show
    detail = await error_of(f"\n{code}")
    assert detail.message == message
    assert [(f.function, f.line) for f in detail.stack] == [("main chunk", 2)]


# --------------------------------------------------------------------------- logging


async def test_print_logs_tab_joined_args_with_bound_context() -> None:
    with capture_logs() as logs:
        logger = structlog.get_logger("test").bind(request_id="req-1")
        await run_script("print('a', 1, nil, true, 2.5)", log=logger)
    [event] = [e for e in logs if e["event"] == "lua.log"]
    assert event["message"] == "a\t1\tnil\ttrue\t2.5"
    assert event["log_level"] == "info"
    assert event["request_id"] == "req-1"
    assert event["run_id"]


async def test_print_uses_tostring_metamethods() -> None:
    with capture_logs() as logs:
        await run_script("print(setmetatable({}, {__tostring = function() return 'custom' end}))")
    assert [e["message"] for e in logs if e["event"] == "lua.log"] == ["custom"]


async def test_log_namespace_levels_and_fields() -> None:
    code = "log.debug('d') log.info('i', {n = 1}) log.warn('w', {tags = {'x'}}) log.error('e')"
    with capture_logs() as logs:
        await run_script(code, namespaces=[LogNamespace()], log=structlog.get_logger().bind(request_id="r2"))
    events = [e for e in logs if e["event"] == "lua.log"]
    assert [(e["log_level"], e["message"]) for e in events] == [
        ("debug", "d"),
        ("info", "i"),
        ("warning", "w"),
        ("error", "e"),
    ]
    assert events[1]["fields"] == {"n": 1}
    assert events[2]["fields"] == {"tags": ["x"]}
    assert all(e["request_id"] == "r2" for e in events)


async def test_log_with_non_table_fields_is_a_catchable_error() -> None:
    code = "local ok, err = pcall(log.info, 'x', {1, 2}) return {ok, err}"
    assert await result_of(code, namespaces=[LogNamespace()]) == [
        False,
        "log.info: fields must be a table with string keys",
    ]


async def test_log_message_of_other_types_is_text() -> None:
    with capture_logs() as logs:
        await run_script("log.info(42) log.info(nil) log.info(true)", namespaces=[LogNamespace()])
    assert [e["message"] for e in logs if e["event"] == "lua.log"] == ["42", "nil", "true"]


async def test_float_results_are_exact() -> None:
    result = await result_of("return {0.1, 1/3, -2.5e-300}")
    assert result == [0.1, 1 / 3, -2.5e-300]
    assert not any(math.isnan(v) for v in result)
