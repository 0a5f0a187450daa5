"""details.cause, hints and troubleshooting of failed runs, over the real socket.

The corpus (tests/error_corpus.py) holds common mistakes of script authors; each must
get its cause, no suggestion but the expected one (a wrong hint is worse than none),
and its expected hint where it names one.  The share of useful hints is reported.
"""

from __future__ import annotations

from typing import Any

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette.engine import hints
from tests.error_corpus import CORPUS, Mistake
from tests.test_jobs import run, wait_done

pytestmark = pytest.mark.timeout(300)


async def failure(client: Client, mistake: Mistake) -> dict[str, Any]:
    """The error details of running the mistake (as lua_eval, or as a stored script's job)."""
    if not mistake.job:
        reply = await client.request(t.LuaEval(code=mistake.code, params=mistake.params))
        assert isinstance(reply, t.Error) and reply.code == "lua_error", (mistake.code, reply)
        assert isinstance(reply.details, dict)
        return reply.details
    code = mistake.code if "function describe" in mistake.code else f"function main(params)\n{mistake.code}\nend"
    stored = await client.request(t.ScriptStore(content=code))
    assert isinstance(stored, t.Success), (mistake.code, stored)
    done = await wait_done(client, (await run(client, stored.result["hash"], mistake.params))["job_id"])
    assert done["status"] == "failed" and isinstance(done["error"], dict), (mistake.code, done)
    return done["error"]


def suggestions(details: dict[str, Any]) -> list[str]:
    return [h for h in details["hints"] if "did you mean" in h]


async def test_the_corpus_gets_right_causes_and_no_wrong_hint(client: Client) -> None:
    assert len(CORPUS) >= 60
    useful, wrong, mismatched = 0, [], []
    for mistake in CORPUS:
        details = await failure(client, mistake)
        if details.get("cause") != mistake.cause:
            mismatched.append((mistake.code, mistake.cause, details.get("cause"), details["message"]))
        expected = mistake.hint
        if expected is not None and any(expected in h for h in details["hints"]):
            useful += 1
        wrong += [(mistake.code, s) for s in suggestions(details) if expected is None or expected not in s]
        if expected is not None and not any(expected in h for h in details["hints"]):
            mismatched.append((mistake.code, expected, details["hints"], details["message"]))
        assert details["troubleshooting"], mistake.code
    share = useful / len(CORPUS)
    print(f"\nerror corpus: {len(CORPUS)} mistakes, {useful} useful hints ({share:.0%}), {len(wrong)} wrong hints")
    assert wrong == []
    assert mismatched == [], "\n".join(map(repr, mismatched))
    assert share >= 0.75


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        ("pirnt('x')", "nil_call"),
        ("local t = {}\nreturn t.a.b", "nil_index"),
        ("return #5", "type_error"),
        ("return {} + 1", "arithmetic"),
        ("os.execute('id')", "not_in_sandbox"),
        ("error('mine')", "user_error"),
        ("return string.rep()", "bad_argument"),
        ("return json.decode('{')", "namespace_error"),
        ("return 1 < {}", "compare"),
        ("return 'a' .. {}", "concat"),
        ("local function f() return 1 + f() end\nreturn f()", "stack_overflow"),
        ("return ('x'):find('[')", "bad_argument"),
        ("local ok, e = pcall(function() local t = nil; return t.x end)\nerror(e, 0)", "nil_index"),
    ],
)
async def test_kind_is_unchanged_and_cause_is_finer(client: Client, code: str, cause: str) -> None:
    reply = await client.request(t.LuaEval(code=code))
    assert isinstance(reply, t.Error) and reply.details is not None
    assert (reply.details["kind"], reply.details["cause"]) == ("lua_runtime", cause)


async def test_a_syntax_error_has_cause_syntax_and_a_hint(client: Client) -> None:
    reply = await client.request(t.LuaEval(code="function main()\n  return 1"))
    assert isinstance(reply, t.Error) and reply.details is not None
    details = reply.details
    assert (details["kind"], details["cause"]) == ("lua_syntax", "syntax")
    assert "missing 'end'" in details["hints"][0] and details["troubleshooting"]


async def test_missing_main_of_a_stored_script_names_the_cause(client: Client) -> None:
    stored = await client.request(t.ScriptStore(content="function describe() return {name = 'm'} end\n"))
    assert isinstance(stored, t.Success)
    done = await wait_done(client, (await run(client, stored.result["hash"]))["job_id"])
    error = done["error"]
    assert (error["kind"], error["cause"]) == ("lua_runtime", "missing_main")
    assert error["message"] == hints.MISSING_MAIN
    assert any("main(params)" in h for h in error["hints"])


async def test_a_stored_script_without_describe_may_still_return_from_its_chunk(client: Client) -> None:
    stored = await client.request(t.ScriptStore(content="return 42"))
    assert isinstance(stored, t.Success)
    done = await wait_done(client, (await run(client, stored.result["hash"]))["job_id"])
    assert (done["status"], done["result"]) == ("complete", 42)


async def test_a_task_error_keeps_its_cause_and_hint(client: Client) -> None:
    code = "local cfg = {tempo = 1}\nlocal h = core.spawn(function() return cfg.tempp + 1 end)\nreturn core.await(h)"
    reply = await client.request(t.LuaEval(code=code))
    assert isinstance(reply, t.Error) and reply.details is not None
    assert reply.details["cause"] == "arithmetic"
    assert "did you mean 'tempo'?" in reply.details["hints"]


def test_closest_suggests_only_near_names() -> None:
    assert hints.closest("fromat", ["format", "find"]) == ["format"]
    assert hints.closest("foo", ["floor", "fmod"]) == []
    assert hints.closest("Floor", ["floor"]) == ["floor"]
    assert hints.closest("jobid", ["job_id"]) == ["job_id"]
    assert hints.closest("parse", ["decode", "encode"], synonyms=True) == ["decode"]
    assert hints.closest("parse", ["decode", "encode"]) == []
    assert hints.closest("set_attr", ["set_attribute", "span_id"]) == ["set_attribute"]
    assert hints.closest("x", ["y", "xx"]) == []
    assert hints.closest("store", ["store"]) == []
