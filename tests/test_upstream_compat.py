"""Issue 12 item 5: scripts written for the Rust luanette run unchanged, over the real socket.

The scripts below are written as upstream's tests and examples write them
(crates/luanette/tests/integration.rs, examples/*.lua, src/stdlib/*.rs doc comments).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mido

from hooteproto import types as t
from hooteproto.client import Client
from luanette.sim import run_models
from tests.test_jobs import run, store, wait_done
from tests.test_models_e2e import settings_for


async def evaluate(c: Client, code: str) -> object:
    reply = await c.request(t.LuaEval(code=code))
    assert isinstance(reply, t.Success), reply
    return reply.result["result"]


def midi_file() -> bytes:
    track = mido.MidiTrack(
        [
            mido.MetaMessage("set_tempo", tempo=600_000),
            mido.Message("control_change", channel=0, control=7, value=90),
            mido.Message("note_on", channel=0, note=60, velocity=100),
            mido.Message("note_off", channel=0, note=60, velocity=0, time=470),
        ]
    )
    buffer = io.BytesIO()
    mido.MidiFile(type=1, tracks=[track]).save(file=buffer)
    return buffer.getvalue()


# --- lua_eval gets the job stdlib ------------------------------------------------------


async def test_lua_eval_has_temp_cas_and_midi_and_its_temp_dir_goes(client, server):
    code = """
        local path = temp.path("x.mid")
        local w = midi.write(path, {tracks = {{events = {{type = "note_on", note = 60}}}}})
        local hash = cas.store_file(path, "audio/midi")
        return {path = path, hash = hash, notes = #midi.notes(hash), models = type(orpheus), garden = type(garden)}
    """
    got = await evaluate(client, code)
    assert got["path"] == "x.mid" and got["notes"] == 1
    assert got["models"] == "table" and got["garden"] == "table"
    # the eval's own temp directory was removed when it ended (before the reply went)
    root = server.server.engine.config.temp_root
    left = [p for p in Path(root).rglob("*") if not p.name.startswith("job-worker-")]  # (each worker's root)
    assert left == []


async def test_upstream_integration_style_temp_and_midi(client):
    # integration.rs: test_midi_transpose_available, test_temp_path_available
    transposed = await evaluate(
        client,
        """
        function main(params)
            if midi and midi.transpose then
                local events = {
                    { type = "note_on", note = 60 },
                    { type = "note_on", note = 64 }
                }
                midi.transpose(events, 12)
                return events
            else
                return { error = "midi module not available" }
            end
        end
    """,
    )
    assert [e["note"] for e in transposed] == [72, 76]
    temp = await evaluate(
        client,
        """
        function main(params)
            if temp and temp.path then
                local path = temp.path("test.txt")
                return { has_temp = true, path_type = type(path) }
            end
            return { has_temp = false }
        end
    """,
    )
    assert temp == {"has_temp": True, "path_type": "string"}


# --- the main rule ---------------------------------------------------------------------


async def test_main_rule_and_shebang(client):
    assert await evaluate(client, "function main(p) return 'main' end") == "main"
    assert await evaluate(client, "function main(p) return 'main' end\nreturn 2 + 2") == 4
    assert await evaluate(client, "#!/usr/bin/env luanette\nreturn 'ran'") == "ran"
    reply = await client.request(t.LuaEval(code="#!/usr/bin/env lua\nlocal x = nil\nreturn x.y"))
    assert isinstance(reply, t.Error)
    assert ":3:" in str(reply.message) or "line 3" in str(reply.details) or "3" in str(reply.details)


# --- midi ------------------------------------------------------------------------------


async def test_midi_takes_upstream_names_object_paths_and_event_lists(client):
    # store the file through the upstream bridge, as tool_call.lua does
    stored = await evaluate(
        client,
        f"""
        local r = hootenanny.cas_store {{ content_base64 = "{base64.b64encode(midi_file()).decode()}",
                                          mime_type = "audio/midi" }}
        local info = hootenanny.cas_inspect {{ hash = r.hash }}
        local song = midi.read(info.local_path, {{names = "upstream"}})
        local by_hash = midi.read(r.hash)
        local events = song.tracks[1].events
        midi.transpose(events, 5)
        midi.quantize(events, 480)
        local w = midi.write({{tracks = {{{{events = events}}}}}})
        local back = midi.read(w.hash)
        local merged = midi.merge({{ {{events = {{ {{type = "note_on", note = 1, delta = 10}} }}}},
                                    {{events = {{ {{type = "meta", meta_type = "tempo", tempo = 400000}} }}}} }})
        return {{r = r, info = info, first = events[1], cc = events[2], ours = back.tracks[1].events,
                 by_hash = #by_hash.tracks, merged = merged.events,
                 size = cas.size(r.hash), read = #cas.read(r.hash), missing = cas.read(string.rep("0", 32)),
                 base = cas.base_path(), rejoined = cas.exists(cas.base_path() .. "/" .. cas.path(r.hash))}}
    """,
    )
    assert stored["r"]["mime_type"] == "audio/midi" and stored["r"]["size"] == len(midi_file())
    assert stored["info"]["exists"] is True and stored["info"]["local_path"].startswith("objects/")
    assert stored["first"]["type"] == "meta" and stored["first"]["meta_type"] == "tempo"
    assert stored["cc"]["controller"] == 7
    ours = stored["ours"]
    assert ours[0]["type"] == "set_tempo" and ours[0]["tempo"] == 600_000
    assert ours[1]["control"] == 7
    assert [e["note"] for e in ours if e["type"] in ("note_on", "note_off")] == [65, 65]
    assert ours[3]["tick"] == 470  # quantize moves note starts, keeping durations
    assert [e.get("meta_type", e["type"]) for e in stored["merged"]] == ["tempo", "note_on", "end_of_track"]
    assert stored["size"] == stored["read"] == len(midi_file()) and "missing" not in stored
    assert stored["base"] == "" and stored["rejoined"] is True
    assert stored["by_hash"] == 1


# --- descriptors -----------------------------------------------------------------------


async def test_space_context_and_encoding_descriptors(client):
    got = await evaluate(
        client,
        """
        local orpheus = space("Orpheus-Loops")
        local audio = space("audio")
        local ctx = context({ temperature = 0.8, seed = 12345, max_tokens = 512 })
        local hotter = ctx:with({ temperature = 1.2 })
        local enc = encoding("midi", { content_hash = "abc", artifact_id = "art" })
        return {
          name = orpheus:name(), samples = orpheus:can_sample(), continues = orpheus:can_continue(),
          output = orpheus:output_type(), audio = audio:output_type(), shown = tostring(orpheus),
          ctx = ctx:to_table(), hotter = hotter:to_table(), enc = enc:to_table(), kind = enc:type(),
          hash = enc:content_hash(), cancelled = context.cancelled(), job = context.job_id(),
          bad = select(2, pcall(context, {temperature = "hot"})),
        }
    """,
    )
    assert got["name"] == "orpheus_loops" and got["samples"] is True and got["continues"] is True
    assert got["output"] == "midi" and got["audio"] == "unknown" and got["shown"] == "Space(orpheus_loops)"
    assert got["ctx"] == {"temperature": 0.8, "seed": 12345, "max_tokens": 512}
    assert got["hotter"]["temperature"] == 1.2 and got["hotter"]["seed"] == 12345
    assert got["enc"] == {"type": "midi", "content_hash": "abc", "artifact_id": "art"}
    assert got["kind"] == "midi" and got["hash"] == "abc"
    assert got["cancelled"] is False and "job" not in got
    assert "temperature must be a number, got string" in got["bad"]


# --- the hootenanny bridge -------------------------------------------------------------


async def test_unknown_tools_are_not_supported_by_name(client):
    got = await evaluate(
        client,
        """
        local function err(f, ...) return select(2, pcall(f, ...)) end
        return {
          err(hootenanny.convert_midi_to_wav, {input_hash = "x"}),
          err(mcp.hootenanny.beatthis_analyze, {}),
          err(chaosgarden.attach_audio, {}),
          err(mcp.other.tool, {}),
          err(hootenanny.abc_parse, {abc = "X:1"}),
        }
    """,
    )
    assert "not_supported: hootenanny.convert_midi_to_wav" in got[0]
    assert "not_supported: hootenanny.beatthis_analyze" in got[1]
    assert "not_supported: chaosgarden.attach_audio" in got[2]
    assert "not_supported: mcp.other.tool" in got[3]
    assert "use abc.parse" in got[4]


async def test_the_bridge_reaches_only_what_was_granted(client):
    code = """
        function describe() return {name = "x", capabilities = {"cas.read"}} end
        function main()
          return {select(2, pcall(hootenanny.cas_store, {content = "x"})),
                  select(2, pcall(hootenanny.orpheus_generate, {})),
                  select(2, pcall(chaosgarden.play))}
        end
    """
    done = await wait_done(client, (await run(client, await store(client, code)))["job_id"])
    assert done["status"] == "complete", done
    denied = done["result"]
    assert "permission_denied: cas.write is not granted" in denied[0]
    assert "hootenanny.orpheus_generate: permission_denied" in denied[1] and "model:orpheus" in denied[1]
    assert "chaosgarden.play: permission_denied" in denied[2]


async def test_upstream_orpheus_job_flow_and_upload(make_server):
    # workflow.rs's wait_job and midi_process.lua, against the model simulator
    async with run_models("all", seed=7) as sim:
        running = await make_server(settings=settings_for(sim.url))
        async with Client(running.endpoint) as c:
            code = """
                function main(params)
                  local job = hootenanny.orpheus_generate({ temperature = 1.0, max_tokens = 256,
                                                            num_variations = 2, creator = "lua" })
                  local poll = hootenanny.job_poll({ job_ids = { job.job_id }, timeout_ms = 120000 })
                  local status = hootenanny.job_status({ job_id = job.job_id })
                  local info = hootenanny.cas_inspect { hash = status.result.output_hashes[1] }
                  local track = midi.read(info.local_path)
                  local output_path = temp.path("processed.mid")
                  midi.write(output_path, midi.transpose(track, 2))
                  local result = hootenanny.cas_upload_file { file_path = output_path, mime_type = "audio/midi" }
                  local list = hootenanny.job_list({})
                  return { job = job, completed = poll.completed, status = status.status,
                           hashes = status.result.output_hashes, artifacts = status.result.artifact_ids,
                           uploaded = result, total = list.total }
                end
            """
            done = await wait_done(c, (await run(c, await store(c, code)))["job_id"])
            assert done["status"] == "complete", done
            got = done["result"]
            assert got["job"] == {"job_id": "local-1", "tool": "orpheus_generate"}
            assert got["completed"] == ["local-1"] and got["status"] == "complete"
            assert len(got["hashes"]) == 2 and got["artifacts"] == got["hashes"]
            assert got["uploaded"]["mime_type"] == "audio/midi" and got["total"] == 1


async def test_private_python_halves_stay_hidden_and_the_wrapped_ones_work(client):
    # The preludes take their namespaces' private halves out of the tables (bound only on
    # their first call): a script sees neither them nor them in pairs().
    hidden = await evaluate(client, """
        local seen = {}
        for _, ns in ipairs({pipeline, hootenanny, midi}) do
          for k in pairs(ns) do if type(k) == "string" and k:sub(1, 1) == "_" then seen[#seen + 1] = k end end
        end
        return {seen = #seen, check = pipeline._check == nil, tokens = pipeline._tokens == nil,
                filter = type(midi.filter), transpose = type(midi.transpose)}
    """)
    assert hidden == {"seen": 0, "check": True, "tokens": True, "filter": "function", "transpose": "function"}
    # the wrapped halves still answer (bound on this first call): a transposed note
    moved = await evaluate(client, """
        local events = {{type = "note_on", note = 60, velocity = 90, channel = 0, time = 0}}
        return midi.transpose(events, 2)[1].note
    """)
    assert moved == 62
    counted = await evaluate(client, "return pipeline.count_tokens('one two three')")
    assert isinstance(counted, int) and counted > 0
