"""Capabilities (seed 003): what a script declares is what its run gets; the policy
decides what may be declared, what undeclared scripts and lua_eval get. Over the real
socket, with real worker processes."""

from __future__ import annotations

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette import capabilities as caps
from luanette.settings import SettingsError, parse_settings
from tests.test_jobs import run, wait_done

pytestmark = pytest.mark.timeout(90)


def declaring(capabilities: str, body: str) -> str:
    return f"function describe() return {{name = 'declared', capabilities = {capabilities}}} end\n{body}"


async def stored(c: Client, code: str, **kw) -> str:
    reply = await c.request(t.ScriptStore(content=code, **kw))
    assert isinstance(reply, t.Success), reply
    return reply.result["hash"]


async def job(c: Client, code: str, **kw) -> dict:
    return await wait_done(c, (await run(c, await stored(c, code, **kw)))["job_id"])


# --- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "scope"),
    [("model:orpheus", "model", "orpheus"), ("model", "model", None), ("cas.read", "cas.read", None),
     ("fs.read:samples:drums/*", "fs.read", "samples:drums/*"), ("net.http.client:llm", "net.http.client", "llm")],
)  # fmt: skip
def test_capabilities_parse(text, name, scope):
    assert caps.parse(text) == caps.Capability(name, scope)
    assert str(caps.parse(text)) == text


@pytest.mark.parametrize("bad", ["", "os.execute", "cas.read:x", "garden", 3, "model*"])
def test_what_is_not_a_capability_says_so(bad):
    with pytest.raises(caps.CapabilityError):
        caps.parse(bad)


def test_grants_and_scopes():
    grants = caps.Grants.of(["model:orpheus", "fs.read:samples:drums/*", "cas.read"])
    assert grants.allows("model", "orpheus") and not grants.allows("model", "llm")
    assert grants.allows("fs.read", "samples:drums/kick.wav") and not grants.allows("fs.read", "samples:x.wav")
    assert grants.allows("cas.read") and not grants.allows("cas.write")
    assert caps.admits(grants, "orpheus") and not caps.admits(grants, "musicgen")
    assert caps.admits(grants, "cas") and not caps.admits(grants, "garden") and caps.admits(grants, "log")
    assert caps.admits(caps.Grants.of(["model:*"]), "llm")


def test_the_policy_allows_per_creator_and_tag():
    policy = caps.Policy(
        allowed=["cas.read", "model:orpheus"],
        creators={"ada": caps.RolePolicy(allowed=["cas.write"])},
        tags={"studio": caps.RolePolicy(allowed=["fs.read:samples:*"])},
    )
    assert policy.refused(["cas.read", "model:orpheus"], None, []) == []
    assert policy.refused(["cas.write", "model:llm"], None, []) == ["cas.write", "model:llm"]
    assert policy.refused(["cas.write"], "ada", []) == []
    assert policy.refused(["fs.read:samples:drums/*"], None, ["studio"]) == []
    assert policy.refused(["fs.read:secrets:*"], None, ["studio"]) == ["fs.read:secrets:*"]


def test_a_policy_with_a_bad_capability_is_refused_at_start():
    with pytest.raises(SettingsError, match="policy.*unknown capability 'disk.wipe'"):
        parse_settings({"policy": {"default": ["disk.wipe"]}})
    with pytest.raises(SettingsError, match="policy.nope"):
        parse_settings({"policy": {"nope": []}})


# --- over the socket -----------------------------------------------------------------------


async def test_a_script_gets_only_what_it_declares(client):
    done = await job(client, declaring("{'cas.read'}", """
        function main()
          local h = "0123456789abcdef0123456789abcdef"
          local ok, err = pcall(cas.store, "data")
          return {garden = type(garden), orpheus = type(orpheus), midi = type(midi), temp = type(temp),
                  cas = type(cas), log = type(log), exists = cas.exists(h), store = err}
        end
    """))
    assert done["status"] == "complete", done
    result = done["result"]
    assert (result["garden"], result["orpheus"], result["midi"], result["temp"]) == ("nil",) * 4, result
    assert (result["cas"], result["log"], result["exists"]) == ("table", "table", False)
    assert result["store"].startswith("cas.store: permission_denied: cas.write is not granted")


async def test_a_gated_call_checks_its_arguments_like_any_other(client):
    # the gate's wrapper once hid the signature: a wrong argument count became
    # "internal error in garden.seek" (and a traceback in the daemon's log)
    done = await job(client, declaring("{'garden.read', 'garden.write', 'cas.read'}", """
        function main()
          local _, seek = pcall(garden.seek, 1, 2, 3)
          local _, exists = pcall(cas.exists, "a", "b")
          return {seek = seek, exists = exists}
        end
    """))
    result = done["result"]
    assert "garden.seek: wrong arguments (too many positional arguments)" in result["seek"], result
    assert "cas.exists: wrong arguments" in result["exists"], result
    assert "internal error" not in result["seek"] + result["exists"]


async def test_an_uncaught_refusal_fails_the_job_with_its_kind(client):
    done = await job(client, declaring("{'cas.read'}", "function main() cas.store('x') end"))
    assert done["status"] == "failed" and done["error"]["kind"] == "permission_denied"
    assert "cas.write" in done["error"]["message"]


async def test_a_backend_call_needs_its_backend_named(client):
    done = await job(client, declaring("{'net.http.client:llm'}", """
        function main() local ok, err = pcall(backend.call, "orpheus", {}) return err end
    """))
    assert "permission_denied: net.http.client:orpheus is not granted" in done["result"]
    assert "net.http.client:llm" in done["result"]  # says what it has


async def test_a_script_that_declares_nothing_keeps_todays_namespaces(client):
    done = await job(client, "return {type(cas), type(garden), type(orpheus), type(midi), type(temp), type(fs)}")
    assert done["result"] == ["table", "table", "table", "table", "table", "nil"]


async def test_an_empty_declaration_gets_only_the_always_present(client):
    done = await job(client, declaring("{}", "return {type(cas), type(garden), type(log), type(json), type(clock)}"))
    assert done["result"] == ["nil", "nil", "table", "table", "table"]


async def test_a_describe_that_cannot_be_read_is_refused_not_defaulted(client):
    # its top level does the work (and fails without namespaces while describing):
    # stored, it would have run with the default grants instead of its declaration
    code = declaring("{'cas.read'}", "return cas.store('x')")
    reply = await client.request(t.ScriptStore(content=code))
    assert isinstance(reply, t.Error) and reply.code == "lua_error"
    assert reply.details["kind"] == "describe_failed" and "main()" in reply.details["hints"][0]


async def test_a_declaration_that_is_not_one_is_refused_at_store(client):
    reply = await client.request(t.ScriptStore(content=declaring("{'disk.wipe'}", "return 1")))
    assert isinstance(reply, t.Error) and reply.code == "invalid_params"
    assert "disk.wipe" in reply.message
    found = await client.request(t.ScriptSearch(tag=None, creator=None, vibe="declared"))
    assert found.result == []  # nothing was stored


async def test_the_policy_refuses_at_job_execute_before_a_job_exists(make_server):
    policy = {"policy": {"allowed": ["cas.read"], "creators": {"ada": {"allowed": ["cas.write"]}}}}
    running = await make_server(settings=parse_settings(policy))
    async with Client(running.endpoint) as c:
        writer = declaring("{'cas.read', 'cas.write'}", "function main() return cas.store('x') end")
        refused = await c.request(t.JobExecute(script_hash=await stored(c, writer, creator="bob"), params=None))
        assert isinstance(refused, t.Error) and refused.code == "permission_denied"
        assert "cas.write" in refused.message and "cas.read" not in refused.message.split(":")[-1]
        assert (await c.request(t.JobList(status=None))).result == []
        # the same content stored by ada: her creator entry allows it (the index keeps
        # the first creator, so store a variant)
        ada = await job(c, writer + "\n-- ada's", creator="ada")
        assert ada["status"] == "complete", ada


async def test_lua_eval_gets_what_the_policy_gives_it(make_server):
    default = await make_server()
    async with Client(default.endpoint) as c:
        reply = await c.request(t.LuaEval(code="return {type(garden), type(cas), type(log), type(midi), type(temp)}"))
        assert reply.result["result"] == ["table", "table", "table", "table", "table"]  # the job stdlib
    bare = await make_server(settings=parse_settings({"policy": {"eval": []}}))
    async with Client(bare.endpoint) as c:
        reply = await c.request(t.LuaEval(code="return {type(garden), type(cas), type(log)}"))
        assert reply.result["result"] == ["nil", "nil", "table"]
    narrow = await make_server(settings=parse_settings({"policy": {"eval": ["cas.read", "garden.read"]}}))
    async with Client(narrow.endpoint) as c:
        code = "return {type(cas), type(midi), type(temp), type(orpheus), select(2, pcall(cas.store, 'x'))}"
        reply = await c.request(t.LuaEval(code=code))
        assert reply.result["result"][:4] == ["table", "nil", "nil", "nil"]
        assert "permission_denied: cas.write is not granted" in reply.result["result"][4]


async def test_garden_reads_and_writes_are_separate(client):
    done = await job(client, declaring("{'garden.read'}", """
        function main() local ok, err = pcall(garden.play) return err end
    """))
    assert "permission_denied: garden.write is not granted" in done["result"]


async def test_fs_reaches_the_declared_globs_under_configured_roots(make_server, tmp_path):
    samples = tmp_path / "samples"
    (samples / "drums").mkdir(parents=True)
    (samples / "drums" / "kick.wav").write_bytes(b"RIFF-kick")
    (samples / "secret.txt").write_text("no")
    running = await make_server(settings=parse_settings({"fs": {"roots": {"samples": str(samples)}}}))
    async with Client(running.endpoint) as c:
        done = await job(c, declaring("{'fs.read:samples:drums/*'}", """
            function main()
              local ok, err = pcall(fs.read, "samples:secret.txt")
              return {kick = fs.read("samples:drums/kick.wav"), denied = err, cas = type(cas)}
            end
        """))
        assert done["status"] == "complete", done
        assert done["result"]["kick"] == "RIFF-kick" and done["result"]["cas"] == "nil"
        assert "permission_denied: fs.read:samples:secret.txt is not granted" in done["result"]["denied"]
        assert str(tmp_path) not in done["result"]["denied"]  # no host path
        # undeclared: no fs at all (the default keeps what jobs had, which had no fs)
        plain = await job(c, "return type(fs)")
        assert plain["result"] == "nil"
        bad = await c.request(t.ScriptStore(content=declaring("{'fs.read:samples:../x'}", "return 1")))
        assert isinstance(bad, t.Error) and bad.code == "invalid_params"
