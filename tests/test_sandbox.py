"""The Lua sandbox: what a script can and cannot reach.

Each test tries a real escape against a real lupa.lua54 runtime and asserts it fails
(or that the safe alternative works, so a test cannot pass by breaking everything).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio
import lupa.lua54
import pytest

from luanette.runtime import SANDBOX_GLOBALS, RunContext, ScriptError, run_script
from luanette.stdlib.log import LogNamespace


class EchoNamespace:
    """A namespace with sync and async functions, to check they leak nothing."""

    name = "echo"

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        def same(value: Any = None) -> Any:
            return value

        async def later(value: Any = None) -> Any:
            return value

        return {"same": same, "later": later}


NAMESPACES = [EchoNamespace(), LogNamespace()]


async def result_of(code: str, params: Any = None) -> Any:
    return (await run_script(code, params, namespaces=NAMESPACES)).result


async def error_message(code: str) -> str:
    with pytest.raises(ScriptError) as info:
        await run_script(code, namespaces=NAMESPACES)
    assert info.value.detail.kind == "lua_runtime"
    return info.value.detail.message


# ------------------------------------------------------------------------- globals


async def test_globals_are_exactly_the_allowed_set() -> None:
    code = "local names = {} for k in pairs(_G) do names[#names + 1] = k end return names"
    names = await result_of(code, {"p": 1})
    expected = (SANDBOX_GLOBALS - {"main"}) | {"echo", "log"}
    assert set(names) == expected
    assert {"params", "args"} <= expected  # the script's params, under seed 003's name too


async def test_namespace_tables_behave_as_if_filled() -> None:
    # Their functions are bound when first read (a run calls few of them): pairs still
    # sees every one, an assignment replaces one for good, the metatable is protected.
    listed = await result_of("local n = {} for k in pairs(echo) do n[#n + 1] = k end table.sort(n) return n")
    assert listed == ["later", "same"]
    replaced = await result_of("echo.same = nil return {echo.same == nil, echo.later(3), echo.same == nil}")
    assert replaced == [True, 3, True]
    custom = await result_of("echo.same = function() return 'mine' end return echo.same()")
    assert custom == "mine"
    assert await result_of("return getmetatable(echo)") == "namespace"
    assert "protected metatable" in await error_message("setmetatable(echo, {})")
    assert await result_of("return {echo.same(1), echo.same(2), rawequal(echo.same, echo.same)}") == [1, 2, True]


async def test_args_is_params() -> None:
    assert await result_of("return {rawequal(args, params), args.p}", {"p": 1}) == [True, 1]
    assert await result_of("return {args == nil, params == nil}") == [True, True]


def test_no_namespace_may_be_called_args() -> None:
    class Args:
        name = "args"

        def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
            return {}

    with pytest.raises(ValueError, match="not usable as a Lua global"):
        anyio.run(lambda: run_script("return 1", namespaces=[Args()]))


@pytest.mark.parametrize(
    "expression",
    [
        "io",
        "debug",
        "dofile",
        "loadfile",
        "package",
        "python",
        "loadstring",
        "module",
        "setfenv",
        "getfenv",
        "unpack",
        "newproxy",
        "warn",
        "gcinfo",
        "jit",
        "string.dump",
        "('').dump",
        "os.execute",
        "os.remove",
        "os.rename",
        "os.exit",
        "os.getenv",
        "os.tmpname",
        "os.setlocale",
        "_G._G.io",
        "_ENV.debug",
    ],
)
async def test_forbidden_things_are_nil(expression: str) -> None:
    assert await result_of(f"return {expression} == nil") is True


async def test_os_has_only_clock_time_and_date() -> None:
    result = await result_of(
        "local keys = {} for k in pairs(os) do keys[#keys + 1] = k end table.sort(keys)"
        " return {keys, type(os.clock()), math.type(os.time()), type(os.date('%Y'))}"
    )
    assert result == [["clock", "date", "time"], "number", "integer", "string"]


async def test_safe_libraries_work() -> None:
    code = """
      return {
        string.format('%05.1f', 3.14159), ('abc'):upper(), table.concat({1, 2}, ','),
        math.floor(2.5), utf8.char(9731), select('#', 1, 2, 3), tonumber('0x10'),
        rawlen({1, 2}), _VERSION,
      }
    """
    assert await result_of(code) == ["003.1", "ABC", "1,2", 2, "☃", 3, 16, 2, "Lua 5.4"]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("require('os')", 'module not found: "os" (modules are not available to this run)'),
        ("package.loadlib('libc.so.6', 'system')", "attempt to index a nil value (global 'package')"),
        ("dofile('/etc/passwd')", "attempt to call a nil value (global 'dofile')"),
        ("loadfile('/etc/passwd')", "attempt to call a nil value (global 'loadfile')"),
        ("io.open('/etc/passwd')", "attempt to index a nil value (global 'io')"),
        ("os.execute('true')", "attempt to call a nil value (field 'execute')"),
        ("os.getenv('HOME')", "attempt to call a nil value (field 'getenv')"),
        ("debug.sethook()", "attempt to index a nil value (global 'debug')"),
        ("string.dump(print)", "attempt to call a nil value (field 'dump')"),
        ("python.eval('1')", "attempt to index a nil value (global 'python')"),
    ],
)
async def test_forbidden_calls_fail(code: str, message: str) -> None:
    assert await error_message(code) == message


# ------------------------------------------------------------- no Python objects


# Walks every value reachable from the globals (tables, their metatables, the string
# metatable, values returned by namespace functions) and reports anything that is not
# plain Lua, plus every value on which a Python attribute walk does not simply fail.
WALK = """
local seen, bad = {}, {}
local probes = {'__class__', '__globals__', '__dict__', '__self__', '__func__',
                '__builtins__', '__import__', '__subclasses__', '__code__', '__closure__'}
local function probe(v, path)
  for _, attr in ipairs(probes) do
    local ok, found = pcall(function() return v[attr] end)
    if ok and found ~= nil then bad[#bad + 1] = path .. '.' .. attr end
  end
end
local function walk(v, path)
  local kind = type(v)
  if kind == 'userdata' then bad[#bad + 1] = path .. ' is userdata' end
  if kind ~= 'table' and kind ~= 'function' and kind ~= 'thread' then return end
  if seen[v] then return end
  seen[v] = true
  probe(v, path)
  if kind == 'table' then
    for k, child in next, v do
      walk(k, path .. '<key>')
      walk(child, path .. '.' .. tostring(k))
    end
  end
  local mt = getmetatable(v)
  if mt ~= nil then walk(mt, path .. '<meta>') end
end
walk(_G, '_G')
walk(getmetatable(''), '<string meta>')
walk(coroutine.running(), '<script coroutine>')
walk(echo.same({list = {}, map = {}}), '<echo result>')
walk(echo.later({1, {2}}), '<echo async result>')
walk(params, 'params')
for _, v in ipairs({print, echo.same, echo.later, log.info, pcall, load, coroutine.wrap(print)}) do
  local ok, err = pcall(function() return v.__globals__ end)
  if ok then bad[#bad + 1] = 'indexing a function did not fail' end
end
return table.concat(bad, "; ")
"""


async def test_no_python_object_is_reachable() -> None:
    assert await result_of(WALK, {"list": [], "null": None, "nested": {"x": [None]}}) == ""


async def test_namespace_functions_are_lua_functions() -> None:
    code = "return {type(echo.same), type(echo.later), type(log.info), type(print)}"
    assert await result_of(code) == ["function"] * 4


# ------------------------------------------------------------------------- bytecode


@pytest.fixture(scope="module")
def bytecode() -> bytes:
    """A compiled chunk made by an unsandboxed Lua 5.4 runtime."""
    free = lupa.lua54.LuaRuntime(encoding=None)
    return free.eval("string.dump(function() return 'bytecode ran' end)")


@pytest.mark.parametrize(
    "call",
    [
        "load(params.code)",
        "load(params.code, 'x', 'b')",
        "load(params.code, 'x', 'bt', _G)",
        "load(function() local c = params.code params.code = nil return c end)",
    ],
)
async def test_bytecode_cannot_be_loaded(bytecode: bytes, call: str) -> None:
    assert bytecode.startswith(b"\x1bLua")
    result = await result_of(f"local f, err = {call} return {{f == nil, err}}", {"code": bytecode})
    assert result == [True, "attempt to load a binary chunk (mode is 't')"]


async def test_load_of_text_uses_the_sandbox_env_by_default() -> None:
    code = "return {load('return print == _G.print and io == nil')(), load('return x', 'c', 't', {x = 5})()}"
    assert await result_of(code) == [True, 5]


async def test_loaded_chunk_errors_keep_their_chunk_name() -> None:
    message = await error_message("load('error(\"inner\")', '=helper')()")
    assert message == "helper:1: inner"


# ---------------------------------------------------------------- string metatable


async def test_string_metatable_is_hidden() -> None:
    assert await result_of("return getmetatable('') == false") is True


@pytest.mark.parametrize(
    "attack",
    [
        "getmetatable('').__index = {upper = function() return 'pwned' end}",
        "rawset(getmetatable(''), '__index', {})",
        "setmetatable('', {})",
        "debug.setmetatable('', {})",
    ],
)
async def test_string_metatable_cannot_be_changed(attack: str) -> None:
    code = f"local ok = pcall(function() {attack} end) return {{ok, ('abc'):upper()}}"
    assert await result_of(code) == [False, "ABC"]


async def test_changing_the_script_string_table_does_not_break_the_runtime() -> None:
    # the runtime's own code uses the real library, captured before the script ran
    with pytest.raises(ScriptError) as info:
        await run_script(
            "string.format = error string.match = error string.rep = error string.pack = error return {['a b'] = print}"
        )
    assert info.value.detail.message.startswith('result["a b"] is a function')


async def test_string_methods_are_the_sandbox_copy_without_dump() -> None:
    assert await result_of("string.shout = string.upper return {('x'):shout(), ('x').dump == nil}") == ["X", True]


# ------------------------------------------------------------ other hardening


@pytest.mark.parametrize("option", ['"collect"', "", '"stop"', '"step", 100', '"incremental"', '"generational"'])
async def test_collectgarbage_only_counts(option: str) -> None:
    message = await error_message(f"collectgarbage({option})")
    assert message == 'only collectgarbage("count") is available in the sandbox'


async def test_collectgarbage_count_works() -> None:
    assert await result_of("return collectgarbage('count') > 0") is True


async def test_gc_metamethods_are_refused() -> None:
    message = await error_message("setmetatable({}, {__gc = function() while true do end end})")
    assert message == "__gc metamethods are not available in the sandbox"


async def test_other_metamethods_work() -> None:
    code = (
        "local v = setmetatable({}, {__add = function() return 7 end, __index = function() return 1 end})"
        " return v + v + v.x"
    )
    assert await result_of(code) == 8


async def test_xpcall_handler_runs_for_ordinary_errors() -> None:
    assert (
        await result_of("return select(2, xpcall(error, function(e) return 'handled ' .. e end, 'x', 0))")
        == "handled x"
    )


async def test_pcall_still_catches_ordinary_errors() -> None:
    assert await result_of("return {pcall(error, 'x', 0)}") == [False, "x"]


async def test_each_run_gets_a_fresh_runtime() -> None:
    await result_of("leaked = 'yes' string.upper = nil")
    assert await result_of("return {leaked == nil, ('a'):upper()}") == [True, "A"]
