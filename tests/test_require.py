"""require (seed 003's module system, issue 11 item 3): modules from the --modules
directory and stored scripts, resolved by the front, loaded per run in the script's own
sandbox.  Over the real socket, with real worker processes."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette.engine import lua
from luanette.modules import ModuleError, Modules, check_name
from tests.test_capabilities import declaring, job, stored
from tests.test_jobs import run, wait_done

pytestmark = pytest.mark.timeout(120)

FILES = {
    "util.lua": "local M = {}\nfunction M.double(x) return x * 2 end\nreturn M\n",
    "lib/init.lua": "local u = require('../util')\nreturn {d = u.double(4), helper = require('./helper')}\n",
    "lib/helper.lua": "return 'helper'\n",
    "lib/lazy.lua": "return {get = function() local h = require('./helper') return h end,\n"
                    "        tail = function() return require('./helper') end}\n",
    "lib/forward.lua": "return require('./helper')\n",
    "lib/deep/leaf.lua": "return {up = require('../helper'), root = require('util').double(1)}\n",
    "a/boom.lua": "local M = {}\n\n\nfunction M.go()\n  local x = 1\n  error('boom')\nend\nreturn M\n",
    "cyc/a.lua": "return {b = require('./b')}\n",
    "cyc/b.lua": "return {a = require('./a')}\n",
    "self.lua": "return require('self')\n",
    "bad.lua": "local x = 1\n\nx = = 2\n",
    "noreturn.lua": "set_by_noreturn = (set_by_noreturn or 0) + 1\n",
    "counter.lua": "local M = {n = 0}\nfunction M.bump() M.n = M.n + 1 return M.n end\n"
                   "leaked_global = true\nreturn M\n",
    "writer.lua": "return {store = function() return cas.store('x') end}\n",
    "failing.lua": "error('failing at load', 0)\n",
}


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    root = tmp_path / "modules"
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    outside = tmp_path / "outside.lua"
    outside.write_text("return 'outside'\n")
    (root / "escape.lua").symlink_to(outside)
    (root / "escdir").symlink_to(tmp_path)  # escdir/outside.lua leads out too
    (root / "alias.lua").symlink_to(root / "util.lua")  # a link that stays inside is fine
    return root


@pytest.fixture
async def mc(make_server, modules_dir):
    """A client of a daemon with one worker (runs share its warm Lua states) and --modules."""
    running = await make_server(modules=str(modules_dir), workers=1)
    async with Client(running.endpoint) as c:
        yield c


async def evaluate(c: Client, code: str):
    reply = await c.request(t.LuaEval(code=code))
    assert isinstance(reply, t.Success), reply
    return reply.result["result"]


async def failure(c: Client, code: str) -> dict:
    reply = await c.request(t.LuaEval(code=code))
    assert isinstance(reply, t.Error) and reply.code == "lua_error", reply
    return reply.details


# --- loading ---------------------------------------------------------------------------


async def test_a_module_file_loads_and_is_the_same_table_twice(mc):
    result = await evaluate(mc, """
        local u = require("util")
        return {u.double(21), require("util") == u, require("./util") == u, require("alias") ~= u,
                type(require), getmetatable(require)}
    """)
    # alias.lua is another file (a link inside the directory): its own module
    assert result == [42, True, True, True, "table", "require"]


async def test_init_lua_nested_directories_and_relative_requires(mc):
    result = await evaluate(mc, """
        local lib = require("lib")
        local leaf = require("lib/deep/leaf")
        return {lib.d, lib.helper, leaf.up, leaf.root, require("lib/helper") == lib.helper}
    """)
    assert result == [8, "helper", "helper", 2, True]


async def test_relative_requires_are_lexical_to_the_module_that_calls(mc):
    # lib/lazy.lua's function requires ./helper when the script calls it: from lib/;
    # the script's own relative names start at the root, and cannot go above it
    result = await evaluate(mc, """
        return {require("lib/lazy").get(), require("./util").double(5), select(2, require.try("../util"))}
    """)
    assert result[:2] == ["helper", 10]
    assert result[2] == 'module refused: "../util" leads out of the modules directory'


async def test_a_tail_call_require_resolves_from_the_loading_module_or_says_why_not(mc):
    # at a module's top level the module being loaded is the requiring one
    assert await evaluate(mc, "return require('lib/forward')") == "helper"
    details = await failure(mc, "local lazy = require('lib/lazy')\nlazy.tail()")
    assert details["message"].startswith('require: cannot tell what "./helper" is relative to'), details
    assert details["line"] == 2


async def test_a_chunk_that_returns_nothing_is_cached_as_true(mc):
    assert await evaluate(mc, "return {require('noreturn'), require('noreturn'), set_by_noreturn}") == [
        True, True, 1,
    ]


async def test_nothing_of_a_module_outlives_its_run(mc):
    first = await evaluate(mc, "local c = require('counter') c.bump() return {c.bump(), leaked_global}")
    assert first == [2, True]
    # the same worker, the same warm states: a fresh module table, no global left over
    for _ in range(5):
        again = await evaluate(mc, "return {leaked_global == nil, require('counter').bump()}")
        assert again == [True, 1]


async def test_stored_scripts_by_name_newest_first_and_by_hash(mc):
    old = await stored(mc, "function describe() return {name = 'shared'} end\nreturn {version = 1}")
    new = await stored(mc, "function describe() return {name = 'shared'} end\nreturn {version = 2}\n")
    result = await evaluate(mc, f"""
        return {{require("script:shared").version, require("script:{old}").version,
                require("script:{new}") == require("script:shared")}}
    """)
    assert result == [2, 1, True]
    details = await failure(mc, 'require("script:nobody")')
    assert details["message"] == 'module not found: "script:nobody" (no stored script has that name)'


async def test_require_works_in_jobs_too(mc):
    done = await job(mc, "function main() return require('lib').d end")
    assert done["status"] == "complete" and done["result"] == 8, done


async def test_without_a_modules_directory_only_stored_scripts_load(client):
    h = await stored(client, "return {7}")
    assert await evaluate(client, f"return require('script:{h}')[1]") == 7
    details = await failure(client, "require('util')")
    assert "no modules directory is configured" in details["message"]


# --- errors ----------------------------------------------------------------------------


async def test_require_try_returns_nil_and_the_message(mc):
    result = await evaluate(mc, "local v, err = require.try('nope') return {v == nil, err, require.try('util') ~= nil}")
    assert result == [True, 'module not found: "nope" (tried modules:nope.lua, modules:nope/init.lua)', True]


async def test_not_found_names_what_was_tried_and_the_line(mc):
    details = await failure(mc, "local x = 1\nrequire('x/y')")
    assert details["message"] == 'module not found: "x/y" (tried modules:x/y.lua, modules:x/y/init.lua)'
    assert details["line"] == 2 and details["kind"] == "lua_runtime"


async def test_circular_requires_name_the_cycle(mc):
    details = await failure(mc, "require('cyc/a')")
    assert "circular require: cyc/a -> cyc/b -> cyc/a" in details["message"]
    assert [f["source"] for f in details["stack"]][:2] == ["cyc/b.lua", "cyc/a.lua"]
    assert "circular require: self -> self" in (await failure(mc, "require('self')"))["message"]


async def test_a_caught_cycle_or_failure_leaves_require_usable(mc):
    result = await evaluate(mc, """
        local a = {pcall(require, 'cyc/a')}
        local b = {pcall(require, 'cyc/a')}
        local f = {require.try('failing')}
        return {a[2] == b[2], a[2], f[2], require('util').double(2)}
    """)
    assert result[0] is True and result[1].endswith("circular require: cyc/a -> cyc/b -> cyc/a"), result
    assert result[2:] == ["failing at load", 4]


async def test_a_syntax_error_names_the_module_and_its_line(mc):
    details = await failure(mc, "\nrequire('bad')")
    assert details["message"] == "syntax error in \"bad\": bad.lua:3: unexpected symbol near '='"
    assert details["line"] == 2


async def test_a_runtime_error_in_a_module_names_the_module_file(mc):
    details = await failure(mc, "local boom = require('a/boom')\nboom.go()")
    assert details["message"] == "a/boom.lua:6: boom"
    assert details["stack"][0] == {"function": "go", "line": 6, "source": "a/boom.lua"}
    assert details["stack"][-1]["source"] == "eval" and details["stack"][-1]["line"] == 2


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../../etc/passwd", 'module refused: "../../etc/passwd" leads out of the modules directory'),
        ("./lib/../../x", 'invalid module name "./lib/../../x"'),
        ("/etc/passwd", 'invalid module name "/etc/passwd": absolute paths are refused'),
        ("escape", 'module refused: "escape" (modules:escape.lua leads out of the modules directory)'),
        ("escdir/outside", 'module refused: "escdir/outside" (modules:escdir/outside.lua leads out'),
        ("util.lua", "leave out the .lua suffix"),
        ("a\0b", 'invalid module name "a\\u0000b": it contains a NUL byte'),
        ("", 'invalid module name "": it is empty'),
        ("a//b", 'invalid module name "a//b"'),
        (".hidden", 'invalid module name ".hidden"'),
    ],
)
async def test_nothing_leaves_the_modules_directory(mc, name, message):
    reply = await mc.request(t.LuaEval(code="local v, err = require.try(params.name) return {v == nil, err}",
                                       params={"name": name}))
    assert isinstance(reply, t.Success), reply
    ok_nil, err = reply.result["result"]
    assert ok_nil is True and message in err, err
    assert "/tmp" not in err and str(Path.home()) not in err  # no host path


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("nil", "bad argument #1 to 'require' (string expected, got nil)"),
        ("{}", "bad argument #1 to 'require' (string expected, got table)"),
        ("42", "bad argument #1 to 'require' (string expected, got number)"),
        ("string.rep('a', 100000)", "bad argument #1 to 'require' (module name too long: 100000 bytes, at most 256)"),
    ],
)
async def test_hostile_arguments_are_bad_arguments(mc, arg, message):
    details = await failure(mc, f"require({arg})")
    assert details["message"] == message


async def test_require_cannot_wait_inside_a_c_callback(mc):
    details = await failure(mc, "table.sort({2, 1}, function(a, b) require('util') return a < b end)")
    assert "require waits for its module" in details["message"]


# --- capabilities ----------------------------------------------------------------------


async def test_a_module_has_exactly_the_scripts_capabilities(mc):
    # a job that declares nothing-but-always gets no cas: the module finds it absent, as the script does
    absent = await job(mc, declaring("{}", "function main() return require('writer').store() end"))
    assert "attempt to index a nil value (global 'cas')" in absent["error"]["message"], absent
    assert absent["error"]["stack"][0]["source"] == "writer.lua"
    # a job granted cas.read only: the module's cas.store is refused as the script's is
    done = await job(mc, declaring("{'cas.read'}", "function main() return require('writer').store() end"))
    assert done["status"] == "failed" and done["error"]["kind"] == "permission_denied", done
    assert "cas.write is not granted" in done["error"]["message"]
    granted = await job(mc, declaring("{'cas.write'}", "function main() return require('writer').store() end"))
    assert granted["status"] == "complete", granted


# --- limits ----------------------------------------------------------------------------


async def test_a_run_loads_at_most_256_modules(make_server, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(257):
        (root / f"m{i}.lua").write_text(f"return {i}")
    running = await make_server(modules=str(root))
    async with Client(running.endpoint) as c:
        assert await evaluate(c, "local s = 0 for i = 0, 255 do s = s + require('m' .. i) end return s") == 32640
        details = await failure(c, "for i = 0, 256 do require('m' .. i) end")
        assert details["kind"] == "too_many_modules"
        assert "a run may load at most 256 modules" in details["message"]
        # and looking up names is bounded too (each costs the front a lookup)
        details = await failure(c, "for i = 1, 5000 do require.try('none' .. i) end require('none0')")
        assert details["kind"] == "too_many_modules" and "look up at most 1024" in details["message"]


async def test_requires_nest_at_most_64_deep(make_server, tmp_path):
    root = tmp_path / "chain"
    root.mkdir()
    for i in range(70):
        (root / f"d{i}.lua").write_text(f"return require('d{i + 1}')" if i < 69 else "return 'bottom'")
    running = await make_server(modules=str(root))
    async with Client(running.endpoint) as c:
        details = await failure(c, "require('d0')")
        assert details["kind"] == "require_too_deep", details
        assert "at most 64 deep" in details["message"]
        assert await evaluate(c, "return require('d10')") == "bottom"  # 59 deep is fine


async def test_a_module_larger_than_a_script_may_be_is_refused(make_server, tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    (root / "big.lua").write_bytes(b"--" + b"x" * (4 * 2**20))
    running = await make_server(modules=str(root))
    async with Client(running.endpoint) as c:
        details = await failure(c, "require('big')")
    assert details["kind"] == "module_too_large"
    assert details["message"].startswith('require: module_too_large: "big" (modules:big.lua) is 4194306 bytes')


# --- the resolver itself, and the command line -------------------------------------------


@pytest.mark.parametrize("name", ["a", "a/b", "./a", "../../a/b-c_d", "script:any name", "script:" + "0" * 32])
def test_names_that_are_module_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", [3, None, "", "a/", "/a", "a/../b", "a/./b", "a b", "a.b", "x" * 300, "script:"])
def test_names_that_are_not(name):
    with pytest.raises(ModuleError, match="bad argument #1 to 'require'"):
        check_name(name)


async def test_the_resolver_refuses_a_forged_base_directory(modules_dir):
    modules = Modules(modules_dir, None, max_bytes=2**20)
    with pytest.raises(ModuleError, match="invalid requiring module"):
        await modules.resolve("./util", "../..")
    found = await modules.resolve("./helper", "lib")
    assert (found["key"], found["chunk"], found["dir"], found["name"]) == (
        "modules:lib/helper.lua", "lib/helper.lua", "lib", "lib/helper",
    )


def test_serve_takes_modules_from_the_command_line(daemon_process, modules_dir):
    daemon = daemon_process("--modules", str(modules_dir))

    async def check() -> None:
        async with Client(daemon.endpoint) as c:
            assert await evaluate(c, "return require('lib').d") == 8

    anyio.run(check)


async def test_a_stored_script_may_require_at_its_top_level(mc):
    # describe() is read in the sandbox when the script is stored: require works there too
    code = (
        "local util = require('util')\nfunction describe() return {name = 'uses_util'} end\n"
        "function main(p) return util.double(p.x) end"
    )
    script_hash = await stored(mc, code)
    reply = await mc.request(t.ScriptSearch(tag=None, creator=None, vibe="uses_util"))
    assert [s["hash"] for s in reply.result] == [script_hash]
    done = await wait_done(mc, (await run(mc, script_hash, {"x": 4}))["job_id"])
    assert done["status"] == "complete" and done["result"] == 8, done


async def test_a_module_is_compiled_once_per_worker(modules_dir):
    modules = Modules(modules_dir, None, max_bytes=2**20)
    await lua.run_script("return require('util').double(1)", modules=modules.resolve)
    hits = lua.stats.chunk_hits
    assert await lua.run_script("return require('util').double(2)", modules=modules.resolve) is not None
    assert lua.stats.chunk_hits >= hits + 1
