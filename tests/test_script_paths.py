"""Housekeeping (issue 10, item 6): CAS temp leftovers go at start-up, and a script sees
paths relative to its own roots, never a host path, in any value or error message."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import msgspec
import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette.cas import Cas
from luanette.runtime import run_script
from luanette.stdlib.cas import CasNamespace
from luanette.stdlib.midi import MidiNamespace
from luanette.stdlib.temp import TempNamespace

pytestmark = pytest.mark.timeout(90)


def host_forms(*paths: Path) -> set[str]:
    return {form for path in paths for form in (str(path), os.path.realpath(path))}


def assert_no_host_path(value: object, *paths: Path) -> None:
    text = msgspec.json.encode(value).decode()
    for form in host_forms(*paths):
        assert form not in text, f"the host path {form} reached a script: {text}"


# ------------------------------------------------------------------ CAS temp files


def temp_name() -> str:
    return f"luanette-{os.getpid()}-{secrets.token_hex(8)}.tmp"


async def test_stale_cas_temp_files_are_removed_at_start_up_and_fresh_ones_kept(make_server, tmp_path):
    tmp = tmp_path / "cas" / "tmp"
    tmp.mkdir(parents=True)
    stale, fresh, foreign = tmp / temp_name(), tmp / temp_name(), tmp / "not-ours.tmp"
    for path in (stale, fresh, foreign):
        path.write_bytes(b"half an object")
    two_hours_ago = time.time() - 7200
    for path in (stale, foreign):
        os.utime(path, (two_hours_ago, two_hours_ago))
    running = await make_server(workers=1)
    assert not stale.exists()  # a crashed writer's leftover, over an hour old
    assert fresh.exists()  # may belong to a live writer sharing the CAS
    assert foreign.exists()  # not a name the CAS writes
    async with Client(running.endpoint) as c:
        assert isinstance(await c.request(t.Ping()), t.Pong)


async def test_a_read_only_cas_is_not_cleaned(make_server, tmp_path, monkeypatch):
    tmp = tmp_path / "cas" / "tmp"
    tmp.mkdir(parents=True)
    stale = tmp / temp_name()
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200,) * 2)
    monkeypatch.setenv("HOOTENANNY_CAS_READONLY", "1")
    await make_server(workers=1)
    assert stale.exists()  # read-only means no writes at all, removals included


# ------------------------------------------------------------- what scripts see

SWEEP = r"""
function main(p)
  local seen = {}
  local function try(name, f, ...)
    local r = table.pack(pcall(f, ...))
    seen[#seen + 1] = {name = name, ok = r[1], value = r[2]}
  end
  local song = {ticks_per_beat = 480, tracks = {{events = {
    {type = "note_on", note = 60}, {type = "note_off", note = 60, delta = 480}}}}}
  -- temp.dir() is a path the temp, midi and cas functions accept
  try("temp.dir", temp.dir)
  try("temp.path", temp.path, "a/b.mid")
  try("temp.path fresh", temp.path)
  try("midi.write dest", midi.write, song, temp.dir() .. "/a/b.mid")
  try("temp.list", temp.list)
  try("temp.exists", temp.exists, temp.dir() .. "/a/b.mid")
  try("cas.store_file", cas.store_file, temp.dir() .. "/a/b.mid", "audio/midi")
  try("midi.read temp", midi.read, temp.dir() .. "/a/b.mid")
  try("midi.info temp", midi.info, "a/b.mid")
  local stored = midi.write(song)
  try("cas.path", cas.path, stored.hash)
  try("cas.inspect", cas.inspect, stored.hash)
  try("cas.exists", cas.exists, stored.hash)
  -- and what goes wrong
  try("cas.get missing", cas.get, string.rep("0", 32))
  try("cas.inspect missing", cas.inspect, string.rep("0", 32))
  try("cas.path missing", cas.path, string.rep("0", 32))
  try("cas.get bad", cas.get, "../../etc")
  try("midi.read missing", midi.read, "nope.mid")
  try("midi.read not midi", midi.read, cas.store("not midi"))
  try("midi.read a directory", midi.read, "a")
  try("temp.exists up", temp.exists, "../x")
  try("temp.exists elsewhere", temp.exists, "/etc/passwd")
  try("temp.remove the dir", temp.remove, temp.dir())
  try("midi.write to the dir", midi.write, song, temp.dir() .. "/")
  try("temp.path too long", temp.path, string.rep("n", 300))
  try("cas.store_file missing", cas.store_file, "missing.bin")
  try("midi.write over a dir", midi.write, song, "a")
  try("temp.remove", temp.remove, "a")
  try("temp.list after", temp.list)
  return seen
end
"""


async def test_no_host_path_in_what_scripts_see_over_a_daemon(server, client, tmp_path):
    script = (await client.request(t.ScriptStore(content=SWEEP))).result["hash"]
    started = (await client.request(t.JobExecute(script_hash=script, params=None))).result
    reply = await client.request(t.JobPoll(job_ids=[started["job_id"]], timeout_ms=30000, mode=t.PollMode.ALL))
    done = reply.result["completed"][0]
    assert done["status"] == "complete", done
    seen = {entry["name"]: (entry["ok"], entry["value"]) for entry in done["result"]}
    roots = (tmp_path, Path(server.server.config.cas_root), Path(server.server.config.state_dir))
    assert_no_host_path(done["result"], *roots)
    # the relative forms, and temp.dir() accepted wherever a temp path is
    assert seen["temp.dir"] == (True, ".")
    assert seen["temp.path"] == (True, "a/b.mid")
    assert seen["temp.path fresh"][0] and not seen["temp.path fresh"][1].startswith("/")
    assert seen["midi.write dest"][1]["path"] == "a/b.mid"
    assert seen["temp.list"] == (True, ["a/b.mid"])
    for name in ("temp.exists", "cas.store_file", "midi.read temp", "midi.info temp"):
        assert seen[name][0] is True, (name, seen[name])
    stored = seen["cas.inspect"][1]["hash"]
    assert seen["cas.path"] == (True, f"objects/{stored[:2]}/{stored[2:]}")
    assert (Path(server.server.config.cas_root) / seen["cas.path"][1]).is_file()
    assert set(seen["cas.inspect"][1]) == {"hash", "mime_type", "size_bytes"}
    failures = [name for name, (ok, _) in seen.items() if not ok]
    assert sorted(failures) == sorted([
        "cas.get missing", "cas.inspect missing", "cas.path missing", "cas.get bad", "midi.read missing",
        "midi.read not midi", "midi.read a directory", "temp.exists up", "temp.exists elsewhere",
        "temp.remove the dir", "midi.write to the dir", "temp.path too long", "cas.store_file missing",
        "midi.write over a dir",
    ])
    for name in failures:
        assert "internal error" not in seen[name][1], (name, seen[name])
    assert seen["temp.list after"] == (True, [])

    # an uncaught error ends the job with the message: no host path there either
    failing = "midi.write({tracks = {}}, temp.path('x/y.mid')) return cas.get(string.rep('0', 32))"
    script = (await client.request(t.ScriptStore(content=failing))).result["hash"]
    started = (await client.request(t.JobExecute(script_hash=script, params=None))).result
    reply = await client.request(t.JobPoll(job_ids=[started["job_id"]], timeout_ms=30000, mode=t.PollMode.ALL))
    done = reply.result["completed"][0]
    assert done["status"] == "failed" and "no object" in done["error"]["message"], done
    assert_no_host_path(done["error"], *roots)


async def test_no_host_path_in_errors_of_a_tree_with_traps(tmp_path):
    """Symlinks out and in, a FIFO, a file where a directory is needed: the errors name
    the script's own values and names inside its directory, never the host's paths."""
    cas = Cas(tmp_path / "cas")
    temp = TempNamespace(tmp_path / "temp")
    namespaces = [temp, CasNamespace(cas, temp=temp), MidiNamespace(cas, temp)]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.mid").write_bytes(b"MThd")
    try:
        directory = temp.directory
        (directory / "out").symlink_to(outside, target_is_directory=True)
        (directory / "out-file").symlink_to(outside / "secret.mid")
        (directory / "in").symlink_to("real.mid")
        (directory / "real.mid").write_bytes(b"not midi")
        (directory / "file").write_bytes(b"x")
        os.mkfifo(directory / "fifo")
        code = """
        local out = {}
        for _, call in ipairs({
          function() return temp.exists("out/secret.mid") end,
          function() return midi.read("out-file") end,
          function() return cas.store_file("out/secret.mid") end,
          function() return midi.write({tracks = {}}, "out/new.mid") end,
          function() return temp.path("in") end,
          function() return midi.read("in") end,
          function() return midi.read("fifo") end,
          function() return temp.path("file/below") end,
          function() return midi.write({tracks = {}}, "file/below.mid") end,
          function() return temp.list() end,
        }) do
          out[#out + 1] = {pcall(call)}
        end
        return out
        """
        result = (await run_script(code, namespaces=namespaces)).result
        assert_no_host_path(result, tmp_path)
        for i in (0, 1, 2, 3):
            assert result[i][0] is False and "through a symlink" in result[i][1], result[i]
        assert result[4] == [True, "real.mid"]  # a symlink inside: its target, relative
        assert result[5][0] is False and "not a readable MIDI file" in result[5][1]
        assert result[6][0] is False and "'fifo' is not a regular file" in result[6][1]
        assert result[7][0] is False and result[8][0] is False
        assert result[9] == [True, ["fifo", "file", "in", "out-file", "real.mid"]]
        assert all("internal error" not in str(entry) for entry in result)
        assert (outside / "secret.mid").read_bytes() == b"MThd"
    finally:
        temp.close()
