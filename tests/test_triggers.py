"""Timeline triggers: rules from the config file turn chaosgarden's timeline_event
requests into jobs; params templates; no rule fires itself in a loop."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from luanette.settings import SettingsError, parse_settings
from luanette.triggers import TriggerError, TriggerRule, expand, matches
from tests.test_jobs import store, wait_done
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)

ECHO = """
function describe() return {name = "echo_params", params = {}} end
function main(p) if p.wait then clock.sleep(p.wait) end return p end
"""


def event(event_type="generate_transition", metadata=None, position=32.0, tempo=120.0) -> t.TimelineEvent:
    return t.TimelineEvent(
        event_type=t.TimelineEventType(event_type), position_beats=position, tempo=tempo, metadata=metadata or {}
    )


def trace(trace_id: str | None = None) -> str:
    return f"00-{trace_id or uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


# --- templates and matching --------------------------------------------------------------


def test_placeholders_keep_their_type_or_become_text():
    e = event(metadata={"from": "abc", "beats": 8, "nested": {"key": [1, 2]}})
    template = {
        "a": "$metadata.from",
        "beats": "$metadata.beats",
        "deep": "$metadata.nested.key",
        "where": "$position_beats",
        "label": "at $position_beats beats, $tempo bpm, $event_type ($$5)",
        "list": ["$tempo", 3, None, True],
    }
    assert expand(template, e) == {
        "a": "abc",
        "beats": 8,
        "deep": [1, 2],
        "where": 32.0,
        "label": "at 32.0 beats, 120.0 bpm, generate_transition ($5)",
        "list": [120.0, 3, None, True],
    }
    with pytest.raises(TriggerError) as info:
        expand({"x": ["$metadata.to"]}, e)
    assert info.value.code == "invalid_params" and "params.x[1]" in str(info.value) and "'to'" in str(info.value)


def test_rules_match_type_and_metadata_fields():
    rule = TriggerRule(event_type="cue_point", script="s", match={"kind": ["drop", "riser"], "section.name": "B"})
    assert matches(rule, event("cue_point", {"kind": "drop", "section": {"name": "B"}}))
    assert not matches(rule, event("cue_point", {"kind": "intro", "section": {"name": "B"}}))
    assert not matches(rule, event("cue_point", {"kind": "drop"}))
    assert not matches(rule, event("beat_marker", {"kind": "drop", "section": {"name": "B"}}))
    assert matches(TriggerRule(event_type="*", script="s"), event("beat_marker"))


@pytest.mark.parametrize(
    ("rules", "fragment"),
    [
        ([{"event_type": "drop_the_bass", "script": "x"}], "event_type: must be one of"),
        ([{"event_type": "cue_point"}], "give exactly one of script"),
        ([{"event_type": "cue_point", "script": "x", "script_file": "y.lua"}], "give exactly one of script"),
        ([{"event_type": "cue_point", "script": "x", "params": {"t": "$tmpo"}}], "unknown placeholder $tmpo"),
        ([{"event_type": "cue_point", "script": "x", "when": 1}], "when"),
        ([{"event_type": "cue_point", "script": "x", "mode": "session"}], "unknown key"),
        ([{"event_type": "cue_point", "script": "x", "concurrency": "parallel"}], "must be one of queue, single"),
        ([{"name": "a", "event_type": "cue_point", "script": "x"}] * 2, "two rules are named 'a'"),
        ([{"event_type": "cue_point", "script": "x", "priority": 11}], "priority: must be an integer from -10"),
        ([{"event_type": "cue_point", "script": "x", "group": "no spaces"}], "group: must name a worker group"),
    ],
)
def test_bad_rules_are_refused_with_the_key(rules, fragment):
    with pytest.raises(SettingsError) as info:
        parse_settings({"triggers": rules})
    assert "triggers" in str(info.value) and fragment in str(info.value)


# --- through the daemon --------------------------------------------------------------------


async def daemon_with(make_server, rules, **kw):
    running = await make_server(settings=parse_settings({"triggers": rules}), **kw)
    return running, Client(running.endpoint)


async def test_a_matching_event_starts_the_named_script_with_its_params(make_server):
    rules = [
        {"event_type": "beat_marker", "script": "nothing_stored_under_this_name"},
        {
            "name": "transition",
            "event_type": "generate_transition",
            "script": "echo_params",
            "params": {"from": "$metadata.from", "to": "$metadata.to", "tempo": "$tempo", "at": "$position_beats"},
        },
    ]
    running, client = await daemon_with(make_server, rules)
    async with client as c:
        digest = await store(c, ECHO)
        reply = await c.request(event(metadata={"from": "a" * 32, "to": "b" * 32}))
        assert isinstance(reply, t.Success), reply
        assert reply.result["rule"] == "transition" and reply.result["script_hash"] == digest
        done = await wait_done(c, reply.result["job_id"])
        assert done["status"] == "complete"
        assert done["result"] == {"from": "a" * 32, "to": "b" * 32, "tempo": 120.0, "at": 32.0}

        unmatched = await c.request(event("cue_point"))
        assert isinstance(unmatched, t.Success) and unmatched.result == {"job_id": None, "rule": None, "matched": False}

        missing = await c.request(event("beat_marker"))
        assert isinstance(missing, t.Error) and missing.code == "not_found"
        assert "nothing_stored_under_this_name" in missing.message

        no_key = await c.request(event(metadata={"from": "x"}))
        assert isinstance(no_key, t.Error) and no_key.code == "invalid_params" and "'to'" in no_key.message
    assert running.server.jobs.active == 0


async def test_a_rule_cannot_fire_itself_while_its_job_runs(make_server):
    rules = [{"name": "self", "event_type": "cue_point", "script": "echo_params", "params": {"wait": 600}}]
    running, client = await daemon_with(make_server, rules)
    async with client as c:
        await store(c, ECHO)
        tp = trace()
        first = await c.request(event("cue_point"), traceparent=tp)
        job_id = first.result["job_id"]
        # the job's garden calls carry its trace on; an event in that trace is its echo
        echo = await c.request(event("cue_point"), traceparent=trace(tp.split("-")[1]))
        assert isinstance(echo, t.Error) and echo.code == "invalid_state" and job_id in echo.message
        named = await c.request(event("cue_point", {"luanette_job_id": job_id}))
        assert isinstance(named, t.Error) and named.code == "invalid_state"
        other = await c.request(event("cue_point"), traceparent=trace())  # another trace: fine
        assert isinstance(other, t.Success) and other.result["job_id"] != job_id
        await wait_done(c, job_id)
        again = await c.request(event("cue_point"), traceparent=tp)  # its job is over
        assert isinstance(again, t.Success) and again.result["job_id"] not in (job_id, other.result["job_id"])
        for done in (other.result["job_id"], again.result["job_id"]):
            await wait_done(c, done)


async def test_script_files_are_stored_at_start(make_server, tmp_path):
    script = tmp_path / "echo.lua"
    script.write_text(ECHO)
    settings_file = tmp_path / "luanette.toml"
    settings_file.write_text(
        '[[triggers]]\nevent_type = "section_change"\nscript_file = "echo.lua"\n'
        '[triggers.params]\nsection = "$metadata.section"\n'
    )
    from luanette.settings import load_settings

    running = await make_server(settings=load_settings(settings_file))
    async with Client(running.endpoint) as c:
        reply = await c.request(event("section_change", {"section": "chorus"}))
        done = await wait_done(c, reply.result["job_id"])
    assert done["result"] == {"section": "chorus"}
    assert running.server.store.find_script_by_name("echo_params").hash == reply.result["script_hash"]


def test_the_daemon_refuses_to_start_with_a_missing_script_file(tmp_path):
    settings_file = tmp_path / "luanette.toml"
    settings_file.write_text('[[triggers]]\nevent_type = "cue_point"\nscript_file = "gone.lua"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "luanette.cli.daemon", "serve", "--bind", "tcp://127.0.0.1:*", "--pub", "none",
         "--config", str(settings_file), "--state-dir", str(tmp_path / "state"), "--cas-root", str(tmp_path / "cas")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "gone.lua" in proc.stdout + proc.stderr


async def test_a_rules_group_and_priority_reach_its_jobs(make_server):
    rules = [
        {"name": "gpu", "event_type": "cue_point", "script": "echo_params", "group": "nope"},
        {"name": "urgent", "event_type": "beat_marker", "script": "echo_params", "priority": 5},
    ]
    running, client = await daemon_with(make_server, rules, max_jobs=1, no_worker_timeout=60.0)
    jobs = running.server.jobs
    async with client as c:
        await store(c, ECHO)
        parked = (await c.request(event("cue_point"))).result["job_id"]

        async def waits_for_its_group():
            info = (await c.request(t.JobStatusRequest(job_id=parked))).result
            return info["status"] == "pending" and "group 'nope'" in ((info.get("progress") or {}).get("message") or "")

        await until(waits_for_its_group, "the group rule's job waits for a worker of its group", step=0.02)
        blocker = (await c.request(t.JobExecute(script_hash=await store(c, "while true do end"), params=None)))
        blocker_id = blocker.result["job_id"]
        await until(lambda: jobs.queue_stats()["queue_depth"] == 0 and jobs.is_live(blocker_id), "the blocker runs")

        async def running_blocker():
            return (await c.request(t.JobStatusRequest(job_id=blocker_id))).result["status"] == "running"

        await until(running_blocker, "the blocker runs", step=0.02)
        urgent = (await c.request(event("beat_marker"))).result["job_id"]
        assert jobs.queue_stats()["by_priority"] == {"5": 1}
        for job_id in (urgent, blocker_id, parked):
            await c.request(t.JobCancel(job_id=job_id))
