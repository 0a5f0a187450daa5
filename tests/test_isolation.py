"""Isolation between runs: nothing one script does may be visible to the next.

Every case is a writer run A that tries to leave something behind (library fields,
replaced functions, globals, metatables, suspended coroutines, a random seed, ...) and
a separate, later run B in the same process that looks for it.  B is mostly ``PROBE``:
a read-only fingerprint of everything a script can see (globals, every library's
fields, metatables, a walk of every reachable value, the behaviour of every library
function).  Its pristine value is taken once per session from a brand-new Python
process, so it holds whatever the engine legitimately shows a first run, and the
parts that cannot legitimately change are also hard-coded below.

Runs are sequential, so an engine that reuses Lua states ("warm states") hands B the
state A just used.  The second half sends the same pairs to a real daemon as LuaEval
requests, many rounds, so a pool of states (or worker processes) is exercised too.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette import runtime
from luanette.runtime import SANDBOX_GLOBALS
from luanette.stdlib.json import JsonNamespace
from luanette.stdlib.log import LogNamespace

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent


class EchoNamespace:
    """A namespace with a sync and an async function (the async one makes a run wait)."""

    name = "echo"

    def functions(self, run: runtime.RunContext) -> Mapping[str, Callable[..., Any]]:
        def same(value: Any = None) -> Any:
            return value

        async def later(value: Any = None) -> Any:
            await asyncio.sleep(0.001)
            return value

        return {"same": same, "later": later}


NAMESPACES = [EchoNamespace(), LogNamespace(), JsonNamespace()]
NAMESPACE_NAMES = {"echo", "log", "json"}

PROBE_PARAMS = {"who": "probe", "list": [1, 2]}


# ---------------------------------------------------------------------------- the probe

# Read-only, apart from three writes it undoes before returning (a global, a string
# method, a library field), which check that B's own writes work as in a fresh sandbox.
# Every observation is a string (or a list/dict of strings), so it survives JSON.
PROBE = r"""
local type, tostring, next, pcall, select, rawequal, rawget, getmetatable =
  type, tostring, next, pcall, select, rawequal, rawget, getmetatable
local sort, concat = table.sort, table.concat
local gsub, byte = string.gsub, string.byte
local mtype = math.type

local function repr(v)
  local kind = type(v)
  if kind == "string" then
    return '"' .. (gsub(v, "[^%w%p ]", function(c) return "\\" .. byte(c) end)) .. '"'
  elseif kind == "number" then
    return mtype(v) .. ":" .. tostring(v)
  elseif kind == "boolean" or kind == "nil" then
    return tostring(v)
  end
  return kind
end

local function reprs(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = repr((select(i, ...))) end
  return concat(parts, ", ")
end

local function fields(t)
  local out = {}
  for k, v in next, t do
    local key = type(k) == "string" and k or "[" .. repr(k) .. "]"
    out[#out + 1] = key .. "=" .. repr(v)
  end
  sort(out)
  return out
end

local function meta(v)
  local mt = getmetatable(v)
  if type(mt) == "table" then return fields(mt) end
  return repr(mt)
end

local obs = {}

-- globals and every table among them ("libraries": string, math, ..., namespaces)
obs.globals = fields(_G)
obs.global_meta = meta(_G)
obs.libs, obs.lib_meta = {}, {}
local libs = {}
for name, value in next, _G do
  if type(name) == "string" and type(value) == "table" and name ~= "_G" and name ~= "params"
      and name ~= "args" then
    libs[name] = value
    obs.libs[name] = fields(value)
    obs.lib_meta[name] = meta(value)
  end
end

-- names a writer may have planted, looked up the ordinary way (metatables included)
local MARKERS = {"pwned", "leak", "leaked", "evil", "extra", "saved", "saved_co", "co",
  "from_load", "raw_field", "raw_leak", "x", "__index", "__metatable", "hits", "wrapped",
  "stash", "suspended_wrap", "leaked_by_coroutine", "from_load_default", "from_load_G",
  "env_leak", "helper", "main", "package", "debug", "io", "dofile", "loadfile",
  "python", "a_marker_nobody_sets_1234"}
local planted = {}
local function look(where, t)
  for _, name in next, MARKERS do
    local ok, v = pcall(function() return t[name] end)
    if not ok or v ~= nil then planted[#planted + 1] = where .. "." .. name .. "=" .. repr(v) end
  end
end
look("_G", _G)
look("''", "")
for _, name in next, {"string", "table", "math", "utf8", "os", "coroutine"} do
  if libs[name] then look(name, libs[name]) end
end
sort(planted)
obs.planted = planted

-- the string metatable: hidden, and its __index is this run's own `string`
obs.string_meta = repr(getmetatable(""))
local mismatched = {}
for k, v in next, string do
  if not rawequal(("")[k], v) then mismatched[#mismatched + 1] = tostring(k) end
end
sort(mismatched)
obs.string_methods_mismatched = mismatched

-- every value reachable from the globals (keys, values, metatables), by type
local seen, counts = {}, {}
local function walk(v)
  local kind = type(v)
  if kind ~= "table" and kind ~= "function" and kind ~= "thread" and kind ~= "userdata" then return end
  if seen[v] then return end
  seen[v] = true
  counts[kind] = (counts[kind] or 0) + 1
  if kind == "table" then
    for k, child in next, v do walk(k) walk(child) end
  end
  local mt = getmetatable(v)
  if mt ~= nil then walk(mt) end
end
walk(_G)
walk(getmetatable(""))
local inventory = {}
for kind, n in next, counts do inventory[kind] = tostring(n) end
obs.inventory = inventory

obs.params = {type(params), repr(params and params.who), repr(params and #params.list),
  repr(params and params.injected)}

-- behaviour of every function a script can reach
local B = {}
local function case(name, f) B[#B + 1] = {name, f} end

case("assert", function() return assert(1, 2), select(2, pcall(assert, false, "m")) end)
case("error", function() return pcall(error, "e", 0), select(2, pcall(error, {code = 1})) end)
case("ipairs", function()
  local out = {} for i, v in ipairs({10, 20, 30, nil, 50}) do out[#out + 1] = i .. ":" .. v end
  return concat(out, " ")
end)
case("next", function() return next({}), next({a = 1}) end)
case("pairs", function()
  local keys = {} for k, v in pairs({a = 1, b = 2, 10}) do keys[#keys + 1] = tostring(k) .. "=" .. v end
  sort(keys)
  local custom = {}
  for k, v in pairs(setmetatable({}, {__pairs = function(t)
    return function(_, k) if not k then return 1, "v" end end, t, nil
  end})) do custom[#custom + 1] = k .. v end
  return concat(keys, " "), concat(custom)
end)
case("pcall", function() return pcall(function() return 1, 2 end) end)
case("xpcall", function() return xpcall(error, function(e) return "h:" .. e end, "x", 0) end)
case("print", function() return type(print), select("#", print()) end)
case("rawequal", function() local t = {} return rawequal(t, t), rawequal(t, {}), rawequal("a", "a") end)
case("rawget", function() return rawget(setmetatable({}, {__index = function() return 1 end}), "k") end)
case("rawlen", function() return rawlen({1, 2, 3}), rawlen("abcd") end)
case("rawset", function()
  local t = setmetatable({}, {__newindex = function() error("no") end})
  rawset(t, "k", 5)
  return t.k
end)
case("select", function() return select("#", 1, nil, 3), select(-1, 1, 2, 3), select(2, "a", "b", "c") end)
case("setmetatable", function()
  return setmetatable({}, {__index = {a = 1}}).a, select(2, pcall(setmetatable, {}, {__gc = true}))
end)
case("getmetatable", function()
  return getmetatable(setmetatable({}, {__metatable = "locked"})), getmetatable({}), getmetatable("")
end)
case("tonumber", function() return tonumber("0x10"), tonumber("z", 36), tonumber("nope"), tonumber(" 1e2 ") end)
case("tostring", function()
  return tostring(nil), tostring(true), tostring(12), tostring(1.5),
    tostring(setmetatable({}, {__tostring = function() return "T" end}))
end)
case("type", function() return type(nil), type(1), type(""), type({}), type(print), type(coroutine.create(print)) end)
case("_VERSION", function() return _VERSION end)
case("_G", function() return rawequal(_G._G, _G), rawequal(_ENV, _G), rawequal(_G.string, string) end)
case("load", function()
  return load("return 1 + 1")(), load("return x", "=c", "t", {x = 5})(),
    select(2, load("this is not lua")), select(2, load("\27Lua")),
    load("return _ENV == _G and string == _G.string")()
end)
case("collectgarbage", function()
  return type(collectgarbage("count")), pcall(collectgarbage, "collect"), pcall(collectgarbage),
    pcall(collectgarbage, "stop"), pcall(collectgarbage, "isrunning")
end)

case("string.byte/char", function() return string.byte("AB", 1, 2), string.char(72, 105) end)
case("string.find", function() return string.find("hello", "l+"), string.find("a.b", ".", 1, true) end)
case("string.format", function() return string.format("%5.2f|%d|%s|%q|%x", 3.14159, 42, "s", "a\n", 255) end)
case("string.gmatch", function()
  local out = {} for w in string.gmatch("one two three", "%a+") do out[#out + 1] = w end
  return concat(out, ",")
end)
case("string.gsub", function() return string.gsub("hello", "l", "L"), string.gsub("abc", "%w", "%0%0", 2) end)
case("string.len/lower/upper/reverse", function()
  return string.len("abc"), string.lower("ABC"), string.upper("abc"), string.reverse("abc")
end)
case("string.match", function() return string.match("key=val", "(%w+)=(%w+)") end)
case("string.pack", function()
  return string.pack("<i4", 7), string.packsize("i4"), string.unpack("<i4", string.pack("<i4", 7))
end)
case("string.rep/sub", function()
  return string.rep("ab", 3, ","), string.sub("hello", 2, 4), string.sub("hello", -3)
end)
case("string methods", function()
  return ("abc"):upper(), ("%d-%s"):format(5, "x"), ("x"):rep(3), #"abc", ("abc"):len(), ("").dump
end)
case("string.dump", function() return string.dump end)

case("table.concat", function() return table.concat({1, 2, 3}, "-"), table.concat({}, "x") end)
case("table.insert/remove", function()
  local t = {1, 2, 3}
  table.insert(t, 4) table.insert(t, 1, 0)
  local removed = table.remove(t) local first = table.remove(t, 1)
  return concat(t, ","), removed, first
end)
case("table.move", function() return concat(table.move({1, 2, 3}, 1, 3, 2, {9}), ",") end)
case("table.pack/unpack", function()
  local p = table.pack(1, nil, 3)
  return p.n, table.unpack({1, 2, 3}), table.unpack({1, 2, 3}, 2, 3)
end)
case("table.sort", function()
  local t = {3, 1, 2} table.sort(t)
  local u = {3, 1, 2} table.sort(u, function(a, b) return a > b end)
  return concat(t, ","), concat(u, ",")
end)

case("math.ints", function()
  return math.abs(-3), math.ceil(1.2), math.floor(1.8), math.fmod(7, 3), math.max(1, 5, 3),
    math.min(4, 2, 8), math.tointeger(3.0), math.tointeger(3.5), math.ult(1, -1)
end)
case("math.floats", function()
  return math.sqrt(16), math.sin(0), math.cos(0), math.tan(0), math.exp(0), math.log(1),
    math.log(8, 2), math.deg(math.pi), math.rad(180), math.atan(1, 1), math.asin(1), math.acos(1), math.modf(3.75)
end)
case("math.type", function() return math.type(1), math.type(1.0), math.type("1") end)
case("math.constants", function()
  return math.pi, math.huge == 1 / 0, -math.huge == -1 / 0, math.maxinteger, math.mininteger
end)
case("math.random", function()
  local r = math.random()
  return math.random(3, 3), math.type(r), r >= 0 and r < 1, math.type(math.random(1, 6)), type(math.randomseed)
end)

case("utf8", function()
  local cps = {} for p, c in utf8.codes("h\u{2603}") do cps[#cps + 1] = p .. ":" .. c end
  return utf8.char(72, 9731), utf8.charpattern, utf8.codepoint("\u{2603}"), utf8.len("\u{2603}x"),
    utf8.offset("\u{2603}x", 2), concat(cps, " ")
end)

case("os", function()
  return type(os.clock()), math.type(os.time()), os.date("!%Y-%m-%d %H:%M:%S", 86400),
    os.time({year = 2000, month = 1, day = 1, hour = 12}) > 0
end)

case("coroutine", function()
  local co = coroutine.create(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
  local r1 = reprs(coroutine.resume(co, 1))
  local s1 = coroutine.status(co)
  local r2 = reprs(coroutine.resume(co, 10))
  local s2 = coroutine.status(co)
  local w = coroutine.wrap(function() coroutine.yield(1) return 2 end)
  local c = coroutine.create(function() coroutine.yield() end)
  coroutine.resume(c)
  local closed = reprs(coroutine.close(c))
  local inner = coroutine.wrap(function() return coroutine.isyieldable(), type(coroutine.running()) end)
  return r1, s1, r2, s2, w(), w(), closed, coroutine.status(c), inner()
end)

-- the namespaces this probe knows (others are only fingerprinted above)
case("echo", function() if echo then return echo.same("s"), echo.later("l") end return "absent" end)
case("log", function() if log then return type(log.info), select("#", log.debug("probe")) end return "absent" end)
case("json", function()
  if json then
    return json.encode({b = 1, a = {true}}), json.decode('{"x": [1, null]}').x[2] == json.null,
      tostring(json.null), json.encode(json.array())
  end
  return "absent"
end)

local behaviour = {}
for _, c in next, B do behaviour[c[1]] = reprs(pcall(c[2])) end
obs.behaviour = behaviour

-- this run's own writes work (and are undone, so the probe leaves nothing behind)
local writes = {}
probe_global = 1
writes.global = repr(rawget(_G, "probe_global"))
probe_global = nil
writes.string_method = reprs(pcall(function()
  string.probe_method = function(s) return "mine:" .. s end
  local r = ("x"):probe_method()
  string.probe_method = nil
  return r
end))
writes.math_field = reprs(pcall(function()
  local old = math.floor
  math.floor = function() return "mine" end
  local r = math.floor(1.5)
  math.floor = old
  return r
end))
obs.writes = writes

return obs
"""

# Parts of the probe's pristine value that no engine may change.
EXPECTED_BEHAVIOUR = {
    "tostring": 'true, "nil", "true", "12", "1.5", "T"',
    "string methods": 'true, "ABC", "5-x", "xxx", integer:3, integer:3, nil',
    "string.format": 'true, " 3.14|42|s|"a\\\\10"|ff"',
    "string.gsub": 'true, "heLLo", "aabbc", integer:2',
    "string.dump": "true, nil",
    "string.len/lower/upper/reverse": 'true, integer:3, "abc", "ABC", "cba"',
    "table.concat": 'true, "1-2-3", ""',
    "table.insert/remove": 'true, "1,2,3", integer:4, integer:0',
    "pairs": 'true, "1=10 a=1 b=2", "1v"',
    "ipairs": 'true, "1:10 2:20 3:30"',
    "next": 'true, nil, "a", integer:1',
    "type": 'true, "nil", "number", "string", "table", "function", "thread"',
    "getmetatable": 'true, "locked", nil, false',
    "_G": "true, true, true, true",
    "_VERSION": 'true, "Lua 5.4"',
    "math.constants": (
        "true, float:3.1415926535898, true, true, integer:9223372036854775807, integer:-9223372036854775808"
    ),
    "math.type": 'true, "integer", "float", nil',
    "collectgarbage": (
        'true, "number", false, false, false, false, "only collectgarbage("count") is available in the sandbox"'
    ),
    "setmetatable": 'true, integer:1, "__gc metamethods are not available in the sandbox"',
    "load": (
        "true, integer:2, integer:5, \"[string \"this is not lua\"]:1: syntax error near 'is'\", "
        "\"attempt to load a binary chunk (mode is 't')\", true"
    ),
    "echo": 'true, "s", "l"',
}
EXPECTED_WRITES = {
    "global": "integer:1",
    "string_method": 'true, "mine:x"',
    "math_field": 'true, "mine"',
}


def check_pristine_shape(obs: dict[str, Any], namespaces: set[str]) -> None:
    """The hard-coded part of a pristine probe result."""
    names = {entry.split("=", 1)[0] for entry in obs["globals"]}
    assert names == (SANDBOX_GLOBALS - {"main"}) | namespaces
    for name in namespaces:
        assert f"{name}=table" in obs["globals"]
    assert obs["global_meta"] == "nil"
    assert obs["planted"] in ([], {})  # (an empty Lua table comes back as {})
    assert obs["string_meta"] == "false"
    assert obs["string_methods_mismatched"] in ([], {})
    assert "thread" not in obs["inventory"]
    assert obs["params"] == ["table", '"probe"', "integer:2", "nil"]
    assert "dump" not in {entry.split("=", 1)[0] for entry in obs["libs"]["string"]}
    assert {entry.split("=", 1)[0] for entry in obs["libs"]["os"]} == {"clock", "time", "date"}
    assert obs["writes"] == EXPECTED_WRITES
    for name, expected in EXPECTED_BEHAVIOUR.items():
        if name == "echo" and "echo" not in namespaces:
            continue
        assert obs["behaviour"][name] == expected, name


# Runs the probe in a brand-new Python process: no state of this process exists there.
# First straight through run_script, then as the first LuaEval of a fresh daemon.
BASELINE_SCRIPT = r"""
import asyncio, json, sys, tempfile
from pathlib import Path

from hooteproto import types as t
from hooteproto.client import Client
from luanette import runtime
from tests import test_isolation as m
from tests.conftest import RunningServer, config_for_tests


async def main():
    local = (await runtime.run_script(m.PROBE, m.PROBE_PARAMS, namespaces=m.NAMESPACES)).result
    with tempfile.TemporaryDirectory() as tmp:
        running = await RunningServer(config_for_tests(Path(tmp))).start()
        try:
            async with Client(running.endpoint) as c:
                reply = await m.eval_reply(c, m.PROBE, m.PROBE_PARAMS)
        finally:
            await running.stop()
    assert isinstance(reply, t.Success), reply
    Path(sys.argv[1]).write_text(json.dumps({"local": local, "daemon": reply.result["result"]}))


asyncio.run(main())
"""


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> dict[str, Any]:
    """The probe's value in a fresh process: {"local": ..., "daemon": ...}."""
    out = tmp_path_factory.mktemp("pristine") / "probe.json"
    done = subprocess.run(
        [sys.executable, "-c", BASELINE_SCRIPT, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    baseline = json.loads(out.read_text())
    check_pristine_shape(baseline["local"], NAMESPACE_NAMES)
    daemon_namespaces = {entry.split("=", 1)[0] for entry in baseline["daemon"]["globals"]} - SANDBOX_GLOBALS
    assert {"log", "json", "clock"} <= daemon_namespaces
    check_pristine_shape(baseline["daemon"], daemon_namespaces)
    return baseline


async def probe(params: Any = PROBE_PARAMS) -> dict[str, Any]:
    return (await runtime.run_script(PROBE, params, namespaces=NAMESPACES)).result


def differences(seen: Any, pristine: Any, path: str = "") -> list[str]:
    """Readable differences between two probe values: added/removed entries, changed values."""
    if seen == pristine:
        return []
    if isinstance(seen, dict) and isinstance(pristine, dict):
        return [line for key in sorted(set(seen) | set(pristine))
                for line in differences(seen.get(key), pristine.get(key), f"{path}.{key}" if path else key)]
    if isinstance(seen, list) and isinstance(pristine, list) and all(isinstance(v, str) for v in seen + pristine):
        return [f"{path}: + {v}" for v in seen if v not in pristine] + [
            f"{path}: - {v}" for v in pristine if v not in seen]
    return [f"{path}: {seen!r} (pristine: {pristine!r})"]


def assert_pristine(seen: dict[str, Any], pristine: dict[str, Any], after: str) -> None:
    """``seen`` equals ``pristine``; on failure, list what differs."""
    if seen != pristine:
        lines = differences(seen, pristine) or [f"{seen!r} != {pristine!r}"]
        pytest.fail(f"state leaked from {after}:\n  " + "\n  ".join(lines[:80]), pytrace=False)


async def test_the_probe_alone_is_pristine(pristine) -> None:
    check_pristine_shape(await probe(), NAMESPACE_NAMES)
    assert_pristine(await probe(), pristine["local"], "nothing")


# ---------------------------------------------------------------------------- writers

# Every writer starts with this: `try`, so that an engine that refuses a write (say,
# read-only libraries) does not end the writer early, and its own `_error` for the
# endings below, out of reach of writers that replace the global `error`.
WRITER_PREFIX = """
local _pcall, _error = pcall, error
local function try(f) _pcall(f) end
"""

WRITERS: dict[str, str] = {
    "string_new_fields": """
        try(function() string.pwned = true end)
        try(function() string.evil = function() return "pwned" end end)
        try(function() string[1] = "one" end)
        try(function() string[string] = true end)
        try(function() string.leak = {nested = {1, 2}} end)
    """,
    "string_replace_functions": """
        try(function() string.format = function() return "pwned" end end)
        try(function() string.upper = function() return "pwned" end end)
        try(function() string.len = nil end)
        try(function() string.rep = nil end)
        try(function() string.gsub = string.sub end)
        try(function() string.byte = function() return 0 end end)
        try(function() string.dump = function() return "bytecode" end end)
    """,
    "table_lib": """
        try(function() table.insert = nil end)
        try(function() table.concat = function() return "pwned" end end)
        try(function() table.sort = function() end end)
        try(function() table.unpack = function() return "pwned" end end)
        try(function() table.extra = {} end)
        try(function() table.leak = function() return "pwned" end end)
    """,
    "math_lib": """
        try(function() math.pi = 3 end)
        try(function() math.huge = 0 end)
        try(function() math.maxinteger = 1 end)
        try(function() math.floor = nil end)
        try(function() math.random = function() return 4 end end)
        try(function() math.type = function() return "pwned" end end)
        try(function() math.extra = 1 end)
    """,
    "utf8_lib": """
        try(function() utf8.charpattern = "." end)
        try(function() utf8.char = nil end)
        try(function() utf8.len = function() return -1 end end)
        try(function() utf8.extra = 1 end)
    """,
    "os_lib": """
        try(function() os.execute = function() return true end end)
        try(function() os.exit = print end)
        try(function() os.getenv = function() return "/root" end end)
        try(function() os.time = function() return 0 end end)
        try(function() os.date = nil end)
        try(function() os.clock = function() return -1 end end)
        try(function() os.extra = 1 end)
    """,
    "coroutine_lib": """
        try(function() coroutine.wrap = nil end)
        try(function() coroutine.yield = function() return "pwned" end end)
        try(function() coroutine.resume = function() return true, "pwned" end end)
        try(function() coroutine.status = function() return "pwned" end end)
        try(function() coroutine.isyieldable = function() return false end end)
        try(function() coroutine.extra = coroutine.create(function() end) end)
    """,
    "globals": """
        leaked = "yes"
        _G.x = 2
        try(function() _ENV.env_leak = 1 end)
        try(function() _G._G = {fake = true} end)
        print = function() return "pwned" end
        tostring = function() return "pwned" end
        type = function() return "pwned" end
        pairs = function() return next, {} end
        ipairs = nil
        select = function() return 0 end
        tonumber = function() return 42 end
        _VERSION = "Lua 9.9"
        require = function() return {} end
        package = {loaded = {string = string}}
        debug = {getinfo = print}
        io = {open = print}
        dofile = print
        python = {}
        helper = function() return "pwned" end
    """,
    "wrapped_base_functions": """
        local orig_tostring, orig_pairs, orig_print = tostring, pairs, print
        local calls = 0
        tostring = function(v) calls = calls + 1 if v == nil then return "wrapped nil" end return orig_tostring(v) end
        pairs = function(t) calls = calls + 1 return orig_pairs({wrapped = true}) end
        print = function(...) calls = calls + 1 stash = {...} return orig_print(...) end
        pcall = function() calls = calls + 1 return true, "wrapped" end
        xpcall = function() return true, "wrapped" end
        load = function() return function() return "wrapped load" end end
        error = function() end
        assert = function(v) return v end
        getmetatable = function() return {} end
        setmetatable = function(t) return t end
        rawequal = function() return true end
        rawget = function() return "wrapped" end
        next = function() return nil end
        collectgarbage = function() return 0 end
        require = function(name) return _G[name] end
        try(function() string.format = function() calls = calls + 1 return "wrapped " .. orig_tostring(calls) end end)
    """,
    "rawset_globals": """
        rawset(_G, "raw_leak", true)
        rawset(_G, "tostring", nil)
        rawset(_G, "pairs", function() return next, {} end)
        try(function() rawset(string, "raw_field", 1) end)
        try(function() rawset(math, "pi", 4) end)
        rawset(_G, "string", {upper = function() return "pwned" end})
        rawset(_G, "_G", nil)
    """,
    "globals_metatable": """
        setmetatable(_G, {
          __index = function(_, k) return "from A: " .. k end,
          __newindex = function(t, k, v) rawset(t, k, "hijacked") end,
          __metatable = "locked by A",
        })
    """,
    "library_metatables": """
        for _, lib in next, {string, table, math, utf8, os, coroutine} do
          try(function()
            setmetatable(lib, {
              __index = function(_, k) return "pwned " .. k end,
              __newindex = function() end,
              __metatable = "A",
            })
          end)
        end
    """,
    "string_metatable": """
        try(function() getmetatable("").__index = {upper = function() return "pwned" end} end)
        try(function() rawset(getmetatable(""), "__index", {}) end)
        try(function() setmetatable("", {}) end)
        try(function() string.__index = function() return "pwned" end end)
        try(function() string.__metatable = "A" end)
        try(function() string.upper = function() return "pwned" end end)
        try(function() string.pwned = function() return "pwned" end end)
    """,
    "leftover_coroutines": """
        local function body()
          local n = 0
          while true do
            n = n + 1
            leaked_by_coroutine = n
            try(function() string.upper = nil end)
            coroutine.yield(n)
          end
        end
        local co = coroutine.create(body)
        coroutine.resume(co)
        saved_co = co
        suspended_wrap = coroutine.wrap(body)
        suspended_wrap()
        try(function() string.saved_co = co end)
        try(function() table.saved_co = coroutine.create(body) end)
        try(function() coroutine.saved = coroutine.wrap(body) end)
        try(function() math[co] = true end)
        try(function() os.saved = {co} end)
        try(function() setmetatable(utf8, {__index = {co = co}}) end)
        try(function() json.saved = co end)
        try(function() log.saved = coroutine.create(body) end)
    """,
    "load_with_env": """
        local env = {string = string, table = table, math = math, os = os}
        try(function()
          load("string.from_load = function() return 'pwned' end table.from_load = 1 "
            .. "os.exit = function() end", "=x", "t", env)()
        end)
        try(function() load("from_load_default = true string.format = function() return 'pwned' end")() end)
        try(function() load("from_load_G = true", "=y", "t", _G)() end)
        try(function() load("leak = 1", "=z", "t", string)() end)
        try(function() load("x = 1 huge = 0", "=w", "t", math)() end)
        try(function()
          local parts = {"utf8.from_load ", "= function() end"}
          local i = 0
          load(function() i = i + 1 return parts[i] end, "=r", "t", {utf8 = utf8})()
        end)
    """,
    "params_and_main": """
        try(function() params.injected = true end)
        try(function() params.list[3] = 3 end)
        params = {who = "A-global", list = {}}
        helper = function() return "pwned" end
    """,
    "namespaces": """
        try(function() json.null = "pwned" end)
        try(function() json.encode = function() return "pwned" end end)
        try(function() json.extra = 1 end)
        try(function() json.array = nil end)
        try(function() log.info = nil end)
        try(function() log.debug = function() return "pwned" end end)
        try(function() echo.same = function() return "pwned" end end)
        try(function() echo.later = nil end)
        try(function() setmetatable(json, {__index = function() return "pwned" end}) end)
        try(function() rawset(json.null, "x", 1) end)
        try(function() setmetatable(json.null, {}) end)
    """,
    # the sandbox's functions are made once per Lua state and shared by its runs: every
    # table they hand a script must still be the run's own
    "sandbox_machinery": """
        try(function() require.pwned = true end)
        try(function() rawset(require, "try", function() return "pwned" end) end)
        try(function() coroutine.pwned = true end)
        try(function() coroutine.create = function() return "pwned" end end)
        try(function() core.pwned = true end)
        try(function() core.spawn = function() return "pwned" end end)
        try(function() os.pwned = true end)
        try(function() rawset(print, "x", 1) end)
        try(function() local mt = getmetatable(require) mt.pwned = true end)
        local tasks = {}
        try(function()
          local h = core.spawn(function() return 1 end)
          rawset(h, "pwned", true)
          tasks[1] = h
        end)
    """,
    "absent_libraries_defined": """
        package = {loaded = {}, loadlib = print, path = "./?.lua"}
        require = function(name) return package.loaded[name] end
        debug = {sethook = print, getinfo = print}
        io = {open = print, write = print}
        dofile, loadfile = print, print
    """,
}

WRITER_PARAMS = {"who": "A", "list": [9]}


def writer(name: str, ending: str = "") -> str:
    return WRITER_PREFIX + WRITERS[name] + "\n" + ending + "\nreturn 'written'"


async def run_writer(name: str) -> None:
    outcome = await runtime.run_script(writer(name), WRITER_PARAMS, namespaces=NAMESPACES)
    assert outcome.result == "written"  # the writer ran to its end: every attempt was made


@pytest.mark.parametrize("name", list(WRITERS))
async def test_writer_leaves_nothing_for_the_next_run(pristine, name: str) -> None:
    await run_writer(name)
    assert_pristine(await probe(), pristine["local"], f"writer {name}")


@pytest.mark.parametrize("name", list(WRITERS))
async def test_writer_leaves_nothing_for_several_next_runs(pristine, name: str) -> None:
    await run_writer(name)
    await run_writer(name)
    for _ in range(3):
        assert_pristine(await probe(), pristine["local"], f"writer {name} (twice)")


async def test_many_alternating_runs(pristine) -> None:
    names = list(WRITERS)
    for i in range(50):
        await run_writer(names[i % len(names)])
        assert_pristine(await probe(), pristine["local"], f"writer {names[i % len(names)]} (round {i})")


# --------------------------------------------------------- writers that end abnormally

# A writer that makes its attempts and then does not end normally.
ENDINGS = {
    "runtime_error": ("local t = nil\nlocal _ = t.field", runtime.Limits(), "lua_runtime"),
    "error_call": ('_error("boom after writing")', runtime.Limits(), "lua_runtime"),
    "timeout": ("while true do end", runtime.Limits(timeout_s=0.2), "timeout"),
    "memory": ("local t, i = {}, 0\nwhile true do i = i + 1 t[i] = {i} end",
               runtime.Limits(memory_bytes=8 * 2**20), "memory_limit"),
    "cancel": ("while true do end", runtime.Limits(), "cancelled"),
    "unserializable": ("do return {f = print} end", runtime.Limits(), "result_not_serializable"),
}

# Needs what A's abnormal end took away: more time than A's deadline, more memory than
# A's limit, a run that is not cancelled.  Its values are asserted.
WORKS = """
local start = os.clock()
while os.clock() - start < params.spin do end
local big = string.rep("x", params.bytes)
local t = {}
for i = 1, 100000 do t[i] = i end
return {#big, #t, ("ok"):upper()}
"""


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_abnormal_end_leaves_nothing(pristine, ending: str, name: str) -> None:
    code, limits, kind = ENDINGS[ending]
    token = runtime.CancelToken()
    if ending == "cancel":
        asyncio.get_running_loop().call_later(0.1, token.cancel)
    with pytest.raises(runtime.ScriptError) as info:
        await runtime.run_script(writer(name, code), WRITER_PARAMS, limits=limits, cancel=token, namespaces=NAMESPACES)
    assert info.value.detail.kind == kind
    assert_pristine(await probe(), pristine["local"], f"writer {name} ending in {ending}")
    spin = 0.3 if ending == "timeout" else 0.0
    works = await runtime.run_script(WORKS, {"spin": spin, "bytes": 32 * 2**20}, namespaces=NAMESPACES)
    assert works.result == [32 * 2**20, 100000, "OK"]


# ------------------------------------------------------------------ specific checkers


async def result_of(code: str, params: Any = None, **kwargs: Any) -> Any:
    return (await runtime.run_script(code, params, namespaces=NAMESPACES, **kwargs)).result


async def test_string_method_call_uses_the_new_runs_string() -> None:
    await result_of(WRITER_PREFIX + """
        try(function() string.upper = function() return "pwned" end end)
        try(function() string.lower = nil end)
        try(function() string.shout = function() return "pwned" end end)
        return ("x"):upper()
    """)
    seen = await result_of("""
        return {("x"):upper(), ("X"):lower(), ("x").shout == nil, rawequal(("x").upper, string.upper),
                getmetatable("") == false}
    """)
    assert seen == ["X", "x", True, True, True]


async def test_string_metatable_stays_protected() -> None:
    first = await result_of("""
        local mt = getmetatable("")
        local ok = pcall(function() local m = getmetatable("") m.__index = {upper = function() return "pwned" end} end)
        string.__index = {upper = function() return "pwned" end}
        string.__metatable = "A"
        return {mt == false, ok, (pcall(setmetatable, "", {}))}
    """)
    assert first == [True, False, False]
    seen = await result_of(
        "return {getmetatable('') == false, ('abc'):upper(), string.__index == nil, string.__metatable == nil}"
    )
    assert seen == [True, "ABC", True, True]


async def test_main_and_params_of_a_run_do_not_reach_the_next() -> None:
    a = await result_of(
        "function main(p) return 'main of A: ' .. p.who end\n"
        "function helper() return 1 end\n"
        "params.x = 1\n",
        {"who": "A"},
    )
    assert a == "main of A: A"  # A's main did run for A
    b = await result_of("return {'chunk of B', type(main), type(helper), type(params)}")
    assert b == ["chunk of B", "nil", "nil", "nil"]
    b2 = await result_of("return {params.who, params.x == nil, type(main)}", {"who": "B"})
    assert b2 == ["B", True, "nil"]


async def test_main_left_in_a_globals_metatable_is_not_called() -> None:
    await result_of("setmetatable(_G, {__index = {main = function() return 'main of A' end}}) return 1")
    assert await result_of("return 'chunk of B'") == "chunk of B"


async def test_package_require_debug_absent_before_and_after() -> None:
    # require is the sandbox's own (a callable table), made anew for every run
    check = (
        "return {package == nil, getmetatable(require) == 'require', debug == nil, io == nil,"
        " rawget(_G, 'package') == nil}"
    )
    a = await result_of(WRITER_PREFIX + """
        local before = {package == nil, getmetatable(require) == 'require', debug == nil, io == nil,
          rawget(_G, 'package') == nil}
    """ + WRITERS["absent_libraries_defined"] + "\nreturn before")
    assert a == [True] * 5
    assert await result_of(check) == [True] * 5


async def test_collectgarbage_options_are_refused_and_stay_refused() -> None:
    options = ["collect", "stop", "restart", "step", "incremental", "generational", "isrunning",
               "setpause", "setstepmul"]
    code = """
        local out = {}
        for _, option in ipairs(params) do
          local ok, err = pcall(collectgarbage, option, 0)
          out[#out + 1] = {ok, err}
        end
        return out
    """
    refused = 'only collectgarbage("count") is available in the sandbox'
    assert await result_of(code, options) == [[False, refused]] * len(options)
    assert await result_of(code, options) == [[False, refused]] * len(options)
    assert await result_of("return type(collectgarbage('count'))") == "number"


DRAW = "return {math.random(1, 1 << 40), math.random(1, 1 << 40), math.random(1, 1 << 40), math.random(1, 1 << 40)}"


async def test_random_seed_does_not_carry_over() -> None:
    seeded = await result_of("math.randomseed(42)\n" + DRAW)
    assert seeded == await result_of("math.randomseed(42)\n" + DRAW)  # seeding is deterministic
    await result_of("math.randomseed(42) return 1")
    after_seed = await result_of(DRAW)
    assert after_seed != seeded
    await result_of("coroutine.wrap(function() math.randomseed(42) end)() return 1")
    assert await result_of(DRAW) != seeded


async def test_load_with_custom_env_stores_nothing_in_libraries() -> None:
    await result_of(WRITER_PREFIX + WRITERS["load_with_env"] + "\nreturn 1")
    seen = await result_of("""
        return {string.from_load == nil, table.from_load == nil, string.leak == nil, math.x == nil,
                math.huge == 1/0, utf8.from_load == nil, type(os.exit), from_load_default == nil,
                from_load_G == nil, string.format('%d', 7)}
    """)
    assert seen == [True, True, True, True, True, True, "nil", True, True, "7"]


async def test_wrapped_base_functions_are_gone() -> None:
    await run_writer("wrapped_base_functions")
    seen = await result_of("""
        local keys = {}
        for k in pairs({a = 1}) do keys[#keys + 1] = k end
        return {tostring(nil), keys, select('#', pcall(error, 'x')), load('return 5')(), string.format('%s', 'f'),
                stash == nil, rawget(_G, 'pairs') == pairs, getmetatable({}) == nil}
    """)
    assert seen == ["nil", ["a"], 2, 5, "f", True, True, True]


async def test_leftover_coroutines_are_unreachable() -> None:
    await run_writer("leftover_coroutines")
    seen = await result_of("""
        local found = {}
        local seen = {}
        local function walk(v, path)
          if type(v) == 'thread' then found[#found + 1] = path end
          if type(v) ~= 'table' or seen[v] then return end
          seen[v] = true
          for k, child in next, v do walk(k, path .. '<key>') walk(child, path .. '.' .. tostring(k)) end
          local mt = getmetatable(v)
          if mt ~= nil then walk(mt, path .. '<meta>') end
        end
        walk(_G, '_G')
        return {#found, table.concat(found, ' '), saved_co == nil, suspended_wrap == nil, leaked_by_coroutine == nil,
                ('x'):upper()}
    """)
    assert seen == [0, "", True, True, True, "X"]


# ------------------------------------------------------------- the same chunk, reused


@pytest.mark.parametrize(
    "code",
    [
        "hits = (hits or 0) + 1\n"
        "local ok = pcall(function() string.hits = (string.hits or 0) + 1 end)\n"
        "return {hits, string.hits or 0, ok}",
        "local calls = 0\nfunction main(p) calls = calls + 1 counter = (counter or 0) + 1 return {calls, counter} end",
        "local t = setmetatable({}, {__index = _G})\nt.n = (rawget(_G, 'n') or 0) + 1\nn = t.n\nreturn n",
    ],
    ids=["global_counter", "main_upvalue", "env_via_metatable"],
)
async def test_the_same_script_run_again_starts_over(code: str) -> None:
    results = [await result_of(code) for _ in range(10)]
    assert results[0] in ([1, 1, True], [1, 0, False], [1, 1], 1)
    assert results == [results[0]] * 10


async def test_concurrent_runs_of_the_same_script_keep_their_own_globals() -> None:
    code = """
        mine = params.id
        local ok = pcall(function() string.mine = params.id end)
        for i = 1, 3 do echo.later(i) end
        return {mine, rawget(_G, 'mine'), ok and string.mine or params.id, params.id}
    """
    results = await asyncio.gather(*(result_of(code, {"id": i}) for i in range(20)))
    assert results == [[i, i, i, i] for i in range(20)]


# --------------------------------------------------------------------- through a daemon

DAEMON_WRITERS = ["globals", "string_replace_functions", "globals_metatable", "library_metatables",
                  "leftover_coroutines", "namespaces", "wrapped_base_functions"]


async def eval_reply(client: Client, code: str, params: Any = None, *, retry_timeouts: bool = True) -> Any:
    """One LuaEval.  A daemon whose Lua workers are still starting (or are being replaced
    after a timeout) may answer kind "timeout" without running the script: with
    ``retry_timeouts`` such answers are retried (a script that cannot time out)."""
    for _ in range(100):
        reply = await client.request(t.LuaEval(code=code, params=params))
        timed_out = isinstance(reply, t.Error) and (reply.details or {}).get("kind") == "timeout"
        if not (retry_timeouts and timed_out):
            return reply
        await asyncio.sleep(0.05)
    return reply


async def eval_ok(client: Client, code: str, params: Any = None) -> Any:
    reply = await eval_reply(client, code, params)
    assert isinstance(reply, t.Success), reply
    return reply.result["result"]


async def test_daemon_probe_is_pristine_first(pristine, client) -> None:
    assert_pristine(await eval_ok(client, PROBE, PROBE_PARAMS), pristine["daemon"], "nothing (daemon)")


async def test_daemon_writers_leave_nothing(pristine, client) -> None:
    for round_ in range(20):
        for name in DAEMON_WRITERS:
            assert await eval_ok(client, writer(name), WRITER_PARAMS) == "written"
            seen = await eval_ok(client, PROBE, PROBE_PARAMS)
            assert_pristine(seen, pristine["daemon"], f"daemon writer {name} (round {round_})")
        seen = await eval_ok(client, "return {('x'):upper(), type(main), leaked == nil}")
        assert seen == ["X", "nil", True]


async def test_daemon_abnormal_ends_leave_nothing(pristine, make_server) -> None:
    running = await make_server(script_timeout=0.3)
    async with Client(running.endpoint) as client:
        for round_ in range(4):
            for name in ["globals", "string_replace_functions", "library_metatables", "leftover_coroutines"]:
                for ending, kind in [('_error("boom")', "lua_runtime"), ("while true do end", "timeout")]:
                    code = writer(name, ending)
                    reply = await eval_reply(client, code, WRITER_PARAMS, retry_timeouts=kind != "timeout")
                    assert isinstance(reply, t.Error) and reply.details["kind"] == kind, reply
                    seen = await eval_ok(client, PROBE, PROBE_PARAMS)
                    assert_pristine(seen, pristine["daemon"], f"daemon writer {name} ending {kind} (round {round_})")
