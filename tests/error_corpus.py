"""Common mistakes of script authors, with the cause and hint their error must carry.

Data for tests/test_error_causes.py.  ``hint`` is a substring one of ``details.hints``
must contain (a useful hint), or None where no hint is expected; a "did you mean"
suggestion is only ever right when ``hint`` names it.  ``job``: run as a stored
script's job (the job namespaces: cas, temp, midi, models), else as ``lua_eval``.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Mistake(NamedTuple):
    code: str
    cause: str
    hint: str | None
    job: bool = False
    params: Any = None


DESCRIBED = "function describe() return {name = 'corpus'} end\n"

CORPUS: list[Mistake] = [
    # typos in globals and namespace functions
    Mistake('pirnt("x")', "nil_call", "did you mean 'print'?"),
    Mistake("log.inf('x')", "nil_call", "did you mean 'log.info'?"),
    Mistake("log.warning('x')", "nil_call", "did you mean 'log.warn'?"),
    Mistake("Log.info('x')", "nil_index", "did you mean 'log'?"),
    Mistake("return json.encod({})", "nil_call", "did you mean 'json.encode'?"),
    Mistake("return JSON.encode({})", "nil_index", "did you mean 'json'?"),
    Mistake("return json.parse('{}')", "nil_call", "did you mean 'json.decode'?"),
    Mistake("return json.stringify({})", "nil_call", "did you mean 'json.encode'?"),
    Mistake("return clock.time()", "nil_call", "did you mean 'clock.now'?"),
    Mistake("clock.slep(1)", "nil_call", "did you mean 'clock.sleep'?"),
    Mistake("return string.fromat('%d', 1)", "nil_call", "did you mean 'string.format'?"),
    Mistake("return math.Floor(1.5)", "nil_call", "did you mean 'math.floor'?"),
    Mistake("return tabel.concat({})", "nil_index", "did you mean 'table'?"),
    Mistake("garden.plya()", "nil_call", "did you mean 'garden.play'?"),
    Mistake("garden.set_temp(120)", "nil_call", "did you mean 'garden.set_tempo'?"),
    Mistake("return context.jobid()", "nil_call", "did you mean 'context.job_id'?"),
    Mistake("otel.set_attr('a', 1)", "nil_call", "did you mean 'otel.set_attribute'?"),
    Mistake("return cas.stroe('x')", "nil_call", "did you mean 'cas.store'?", job=True),
    Mistake("return cas.gett('x')", "nil_call", "did you mean 'cas.get'?", job=True),
    Mistake("return midi.raed('x')", "nil_call", "did you mean 'midi.read'?", job=True),
    Mistake("return temp.paht('a.mid')", "nil_call", "did you mean 'temp.path'?", job=True),
    Mistake("return orpheus.genrate({})", "nil_call", "did you mean 'orpheus.generate'?", job=True),
    Mistake("zzzzqqq()", "nil_call", None),
    Mistake("local count = 1\nreturn cuont + 1", "arithmetic", "did you mean 'count'?"),
    Mistake("helper_fn = function() end\nhelpr_fn()", "nil_call", "did you mean 'helper_fn'?"),
    # fields of the script's own tables and params
    Mistake("local t = {}\nreturn t.foo.bar", "nil_index", "'t' has no field 'foo' (it has no string keys)"),
    Mistake("local cfg = {tempo = 120}\nreturn cfg.tempp * 2", "arithmetic", "did you mean 'tempo'?"),
    Mistake("local cfg = {tempo = 120}\nreturn cfg.temp.x", "nil_index", "did you mean 'tempo'?"),
    Mistake("local M = {run = function() end}\nM.rnu()", "nil_call", "did you mean 'run'?"),
    Mistake("local t = {}\nt.fn()", "nil_call", "'t' has no field 'fn'"),
    Mistake("local cfg = {now = 1}\nreturn cfg.time + 1", "arithmetic", "(it has: now)"),
    Mistake("local string = {fmt = 1}\nreturn string.fromat('x')", "nil_call", "(it has: fmt)"),
    Mistake(
        "local cfg = {depth = 2}\nlocal function f() return cfg.dept + 1 end\nreturn f()",
        "arithmetic",
        "did you mean 'depth'?",
    ),
    Mistake("function main(p) return p.titel:upper() end", "nil_index", "did you mean 'title'?", params={"title": "x"}),
    Mistake("function main(p) return p.cout + 1 end", "arithmetic", "did you mean 'count'?", params={"count": 1}),
    Mistake("return params.count + 1", "nil_index", "no params"),
    Mistake("return json.decode('{\"a\": 1}').b.c", "nil_index", None),
    Mistake("local t = nil\nt[1] = 1", "nil_index", "'t' is nil"),
    # methods: `.` instead of `:`, missing methods
    Mistake("local s = 'abc'\nreturn s:uper()", "nil_call", "did you mean 'upper'?"),
    Mistake("return ('x'):uper()", "nil_call", "did you mean 'upper'?"),
    Mistake("local s = 'abc'\nreturn s.upper()", "bad_argument", "s:upper("),
    Mistake("local s = 'a,b'\nreturn s.find(',')", "bad_argument", "s:find("),
    Mistake(
        "local Obj = {}\nObj.__index = Obj\nfunction Obj.new() return setmetatable({n = 1}, Obj) end\n"
        "function Obj:get() return self.n end\nlocal o = Obj.new()\nreturn o.get()",
        "nil_index",
        "':'",
    ),
    Mistake(
        "local Obj = {}\nObj.__index = Obj\nfunction Obj:get() return 1 end\n"
        "local o = setmetatable({}, Obj)\nreturn o:gte()",
        "nil_call",
        "did you mean 'get'?",
    ),
    Mistake("local list = {1, 2}\nlist:insert(3)", "nil_call", "table.insert(list"),
    Mistake("local n = 42\nreturn n:len()", "type_error", "tostring"),
    # functions the sandbox removed, and what Lua 5.4 no longer has
    Mistake('os.execute("id")', "not_in_sandbox", "os.execute is not available in the sandbox"),
    Mistake('return io.open("x.txt")', "not_in_sandbox", "io.open is not available in the sandbox"),
    Mistake('io.write("x")', "not_in_sandbox", "log.info"),
    Mistake('return loadfile("x.lua")', "not_in_sandbox", "not available in the sandbox"),
    Mistake('dofile("x.lua")', "not_in_sandbox", "not available in the sandbox"),
    Mistake("return debug.traceback()", "not_in_sandbox", "debug.traceback is not available in the sandbox"),
    Mistake("return string.dump(print)", "not_in_sandbox", "string.dump is not available in the sandbox"),
    Mistake("os.exit(1)", "not_in_sandbox", "error("),
    Mistake('return os.getenv("HOME")', "not_in_sandbox", "params"),
    Mistake('os.remove("x")', "not_in_sandbox", "temp.remove"),
    Mistake("return os.tmpname()", "not_in_sandbox", "temp.path"),
    Mistake('return require("socket")', "not_in_sandbox", "not available in the sandbox"),
    Mistake('return require("lfs")', "not_in_sandbox", "fs."),
    Mistake('return require("cjson").encode({})', "not_in_sandbox", "json"),
    Mistake("setmetatable({}, {__gc = print})", "not_in_sandbox", None),
    Mistake('collectgarbage("collect")', "not_in_sandbox", None),
    Mistake("return fs.read('x')", "nil_index", "not available to this run"),
    Mistake("return unpack({1, 2})", "nil_call", "table.unpack"),
    Mistake('return loadstring("return 1")', "nil_call", "load("),
    Mistake("return math.pow(2, 3)", "nil_call", "2 ^ 3"),
    Mistake("return table.getn({})", "nil_call", "#t"),
    Mistake('return string.split("a,b", ",")', "nil_call", "gmatch"),
    # type confusion: strings and numbers, arithmetic, comparison, concatenation
    Mistake('return "abc" + 1', "arithmetic", "tonumber"),
    Mistake('local label = "count: "\nreturn label + 5', "arithmetic", ".."),
    Mistake("return 1 + nil", "arithmetic", None),
    Mistake('return 1 < "2"', "compare", "tonumber"),
    Mistake("return {} < {}", "compare", None),
    Mistake("return 'n=' .. nil", "concat", "tostring"),
    Mistake("local t = {}\nreturn 'x' .. t", "concat", "json.encode"),
    Mistake("return 1 // 0", "arithmetic", "divisor"),
    Mistake("local n = 5\nreturn #n", "type_error", "strings and tables"),
    Mistake("local x = 5\nx()", "type_error", None),
    Mistake("for x in {1, 2} do end", "type_error", "ipairs"),
    Mistake("local limit = {}\nfor i = 1, limit do end", "type_error", "must be numbers"),
    Mistake("return math.floor('abc')", "bad_argument", "tonumber"),
    Mistake("return string.format('%d', 'x')", "bad_argument", "tonumber"),
    Mistake("return string.format('%d', 1.5)", "bad_argument", "math.floor"),
    Mistake("for k, v in pairs(nil) do end", "bad_argument", None),
    Mistake("local t = {}\ntable.insert(t, 1, 2, 3)", "bad_argument", None),
    Mistake("return ('abc'):sub('x')", "bad_argument", "tonumber"),
    # 0- vs 1-based indexing
    Mistake("local t = {1, 2, 3}\nreturn t[0] + 1", "arithmetic", "start at 1"),
    Mistake("local t = {10, 20}\nfor i = 0, #t do local _ = t[i] + 1 end", "arithmetic", "start at 1"),
    Mistake("local t = {1, 2, 3}\nreturn t[#t + 1] * 2", "arithmetic", "t[#t]"),
    # the script's own errors and namespace failures
    Mistake("error('boom')", "user_error", None),
    Mistake("error({code = 1})", "user_error", None),
    Mistake("assert(false, 'bad input')", "user_error", None),
    Mistake("local f = coroutine.wrap(function() error('in co') end)\nf()", "user_error", None),
    Mistake("return json.decode('{bad')", "namespace_error", None),
    Mistake("log.info('x', 'y')", "namespace_error", None),
    Mistake("local function f() return 1 + f() end\nreturn f()", "stack_overflow", "recursion"),
    Mistake("log:info('x')", "namespace_error", "log.info("),
    # code that does not compile
    Mistake("function main()\n  return 1", "syntax", "missing 'end'"),
    Mistake("local x = 1\nx += 1", "syntax", "x = x + 1"),
    Mistake("if x != 1 then end", "syntax", "~="),
    Mistake("return a && b", "syntax", "and, or, not"),
    Mistake("for i = 1, 3 print(i) end", "syntax", "do"),
    # forgotten or misnamed main in a stored script
    Mistake(DESCRIBED + "local x = 1", "missing_main", "function main(params)", job=True),
    Mistake(DESCRIBED + "function mian(p) return 1 end", "missing_main", "'mian'", job=True),
    Mistake(DESCRIBED + "local function main(p) return 1 end", "missing_main", "global", job=True),
]
