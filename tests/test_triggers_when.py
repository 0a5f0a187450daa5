"""Trigger rules, completed: ``when`` conditions (luanette.when), ``concurrency``
(queue / single / replace) and the start-up cycle check over ``describe().emits``."""

from __future__ import annotations

import graphlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hooteproto import types as t
from hooteproto.client import Client
from luanette.settings import SettingsError, load_settings, parse_settings
from luanette.sim.garden import send_timeline_event
from luanette.triggers import TriggerError, TriggerRule, declared_emits, find_cycle, matches
from luanette.when import MAX_DEPTH, MAX_LENGTH, WhenError, parse
from tests.test_jobs import store, wait_done
from tests.test_triggers import event

pytestmark = pytest.mark.timeout(60)

EVENT = {
    "event_type": "generate_transition",
    "position_beats": 32.0,
    "tempo": 120.0,
    "metadata": {"beats": 8, "kind": "bridge", "on": True, "none": None, "deep": {"x": {"y": "z"}}},
}


# --- the language ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("metadata.beats >= 8 and event_type == 'generate_transition' and position_beats < 64", True),
        ("metadata.beats > 8", False),
        ("metadata.beats == 8.0", True),  # numbers compare by value
        ("metadata.beats != 8", False),
        ("metadata.beats <= 8 and tempo >= 120 and tempo < 120.5", True),
        ('metadata.kind == "bridge"', True),
        ("metadata.kind < 'c' and metadata.kind > 'a'", True),  # strings compare as text
        ("metadata.deep.x.y == 'z'", True),
        ("metadata.deep.x == 'z'", False),
        ("metadata.on", True),  # a bare field holds only when it is true
        ("metadata.kind", False),
        ("metadata.on == true and metadata.on != 1", True),  # booleans are not numbers
        ("metadata.on == 1", False),
        # missing fields are null: == null holds, ordering never does
        ("metadata.nope == null", True),
        ("metadata.none == null", True),
        ("metadata.nope != null", False),
        ("metadata.beats != null", True),
        ("metadata.nope != 5", True),
        ("metadata.nope < 5", False),
        ("metadata.nope >= 5", False),
        ("not (metadata.nope < 5)", True),
        ("metadata.deep.x.y.z == null", True),
        ("metadata.beats < 'x'", False),  # different types: false
        ("metadata.kind in ['drop', 'bridge']", True),
        ("metadata.kind not in ['drop', 'bridge',]", False),
        ("metadata.nope in [null]", True),
        ("metadata.beats in []", False),
        ("not metadata.kind in ['x']", True),
        ("true or metadata.nope > 1", True),
        ("false or (true and not false)", True),
        ("not not true", True),
        ("1 < 2 and -1.5e0 < -1 and .5 == 0.5", True),
        ("'it\\'s' == \"it's\"", True),
        ("event_type == 'cue_point' or tempo > 100 and position_beats < 0", False),  # and binds tighter
        ("(event_type == 'cue_point' or tempo > 100) and position_beats > 0", True),
    ],
)
def test_conditions_evaluate_over_the_event(text, expected):
    assert parse(text).holds(EVENT) is expected


def test_a_condition_reads_the_event_itself():
    condition = parse("event_type == 'cue_point' and metadata.kind == 'drop' and tempo == 118")
    assert condition.holds(event("cue_point", {"kind": "drop"}, tempo=118.0))
    assert not condition.holds(event("cue_point", {"kind": "drop"}))
    assert not condition.holds(event("beat_marker", {"kind": "drop"}, tempo=118.0))


@pytest.mark.parametrize(
    ("text", "fragment", "position"),
    [
        ("metadata.beats >=", "expected a value", 18),
        ("metadata.beats >= 8 and", "expected a value", 24),
        ("metadata.beats = 8", "unexpected character '='", 16),
        ("beats == 8", "unknown field 'beats'", 1),
        ("tempo.x == 1", "tempo has no fields", 1),
        ("metadata. == 1", "expected a key after '.'", 10),
        ("(tempo > 1", "expected ')'", 11),
        ("tempo > 1)", "expected 'and', 'or' or the end", 10),
        ("tempo in 1", "expected '[' after 'in'", 10),
        ("tempo in [tempo]", "expected a value", 11),
        ("'open", "unterminated string", 1),
        ("tempo == 1e999", "out of range", 10),
        ("metadata.x.__class__ == 1 and tempo @ 2", "unexpected character '@'", 37),
        ("__import__('os')", "unknown field '__import__'", 1),
    ],
)
def test_syntax_errors_name_the_position(text, fragment, position):
    with pytest.raises(WhenError) as info:
        parse(text)
    assert fragment in str(info.value) and info.value.position == position
    assert f"at character {position}" in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("(" * (MAX_DEPTH + 1) + "true" + ")" * (MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} deep"),
        ("not " * (MAX_DEPTH + 1) + "true", f"nested more than {MAX_DEPTH} deep"),
        ("(" * 100_000, "more than the limit"),
        ("true and " * 1000 + "true", f"more than the limit of {MAX_LENGTH}"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_hostile_conditions_are_refused(text, fragment):
    with pytest.raises(WhenError) as info:
        parse(text)
    assert fragment in str(info.value)


def test_the_limits_themselves_are_fine():
    assert parse("(" * MAX_DEPTH + "true" + ")" * MAX_DEPTH).holds({})
    wide = " and ".join(["tempo > 1"] * ((MAX_LENGTH + 5) // len("tempo > 1 and ")))
    assert len(wide) <= MAX_LENGTH and parse(wide).holds(EVENT)


WORDS = st.sampled_from(
    ["and", "or", "not", "in", "true", "false", "null", "tempo", "metadata.a", "metadata.a.b", "event_type",
     "position_beats", "(", ")", "[", "]", ",", "==", "!=", "<", "<=", ">", ">=", "1", "-2.5", "'s'", '"t"', " "]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(WORDS, max_size=30).map(" ".join)))
def test_the_parser_parses_or_names_the_error(text):
    try:
        condition = parse(text)
    except WhenError as e:
        assert "at character" in str(e) or "empty" in str(e)
        assert 0 <= e.position <= len(text) + 1
        return
    for metadata in ({}, {"a": 1}, {"a": {"b": "s"}}, {"a": [1]}):
        assert condition.holds({**EVENT, "metadata": metadata}) in (True, False)


# --- rules ----------------------------------------------------------------------------


def test_a_bad_condition_stops_the_config_naming_the_rule_and_position():
    with pytest.raises(SettingsError) as info:
        parse_settings({"triggers": [
            {"name": "ok", "event_type": "cue_point", "script": "x", "when": "tempo > 1"},
            {"name": "broken", "event_type": "cue_point", "script": "x", "when": "tempo >> 1"},
        ]})  # fmt: skip
    message = str(info.value)
    assert "triggers[1]" in message and "'broken'" in message and "at character 8" in message


def test_a_rule_matches_only_when_its_condition_holds():
    rule = TriggerRule(event_type="cue_point", script="s", match={"kind": "drop"}, when="metadata.beats >= 8")
    assert matches(rule, event("cue_point", {"kind": "drop", "beats": 8}))
    assert not matches(rule, event("cue_point", {"kind": "drop", "beats": 4}))
    assert not matches(rule, event("cue_point", {"kind": "drop"}))
    assert not matches(rule, event("cue_point", {"kind": "riser", "beats": 8}))


ECHO = """
function describe() return {name = "echo_params", params = {}} end
function main(p) if p.wait and p.wait > 0 then clock.sleep(p.wait) end return p end
"""


async def test_conditions_choose_the_rule_over_the_socket(make_server):
    rules = [
        {"name": "long", "event_type": "generate_transition", "script": "echo_params",
         "when": "metadata.beats >= 8 and position_beats < 64", "params": {"rule": "long", "beats": "$metadata.beats"}},
        {"name": "short", "event_type": "generate_transition", "script": "echo_params",
         "when": "metadata.beats < 8", "params": {"rule": "short", "beats": "$metadata.beats"}},
    ]  # fmt: skip
    running = await make_server(settings=parse_settings({"triggers": rules}))
    async with Client(running.endpoint) as c:
        await store(c, ECHO)
        replies = {}
        for name, position, beats in (("long", 32, 8), ("short", 32, 4), ("late", 96, 16), ("none", 0, None)):
            metadata = {} if beats is None else {"beats": beats}
            replies[name] = await send_timeline_event(running.endpoint, "generate_transition", position, 120, metadata)
            assert isinstance(replies[name], t.Success), replies[name]
        assert (await wait_done(c, replies["long"].result["job_id"]))["result"] == {"rule": "long", "beats": 8}
        assert (await wait_done(c, replies["short"].result["job_id"]))["result"] == {"rule": "short", "beats": 4}
        # 96 beats is past the long rule; a missing beats is null, and null < 8 is false
        for name in ("late", "none"):
            assert replies[name].result == {"job_id": None, "rule": None, "matched": False}


# --- concurrency ---------------------------------------------------------------------


async def test_single_ignores_a_match_while_its_job_runs(make_server):
    rules = [{"name": "once", "event_type": "cue_point", "script": "echo_params", "concurrency": "single",
              "params": {"wait": "$metadata.wait"}}]  # fmt: skip
    running = await make_server(settings=parse_settings({"triggers": rules}))
    async with Client(running.endpoint) as c:
        await store(c, ECHO)
        first = await send_timeline_event(running.endpoint, "cue_point", 1, 120, {"wait": 86_400_000})
        job_id = first.result["job_id"]
        ignored = await send_timeline_event(running.endpoint, "cue_point", 2, 120, {"wait": 0})
        assert isinstance(ignored, t.Success)
        assert ignored.result == {"job_id": None, "rule": "once", "matched": True, "ignored": True, "running": job_id}
        assert isinstance(await c.request(t.JobCancel(job_id=job_id)), t.Success)
        assert (await wait_done(c, job_id))["status"] == "cancelled"
        again = await send_timeline_event(running.endpoint, "cue_point", 3, 120, {"wait": 0})
        assert again.result["job_id"] not in (None, job_id)
        assert (await wait_done(c, again.result["job_id"]))["status"] == "complete"
        # and once that one is over, the next match starts a job too
        last = await send_timeline_event(running.endpoint, "cue_point", 4, 120, {"wait": 0})
        assert last.result["job_id"] not in (None, job_id, again.result["job_id"])
        await wait_done(c, last.result["job_id"])


async def test_replace_cancels_the_running_job_and_starts_anew(make_server):
    rules = [{"name": "latest", "event_type": "section_change", "script": "echo_params", "concurrency": "replace",
              "params": {"wait": "$metadata.wait", "section": "$metadata.section"}}]  # fmt: skip
    running = await make_server(settings=parse_settings({"triggers": rules}))
    async with Client(running.endpoint) as c:
        await store(c, ECHO)
        first = await send_timeline_event(running.endpoint, "section_change", 1, 120, {"wait": 86_400_000,
                                                                                       "section": "A"})
        old = first.result["job_id"]
        second = await send_timeline_event(running.endpoint, "section_change", 2, 120, {"wait": 0, "section": "B"})
        assert isinstance(second, t.Success) and second.result["replaced"] == [old]
        assert second.result["job_id"] != old
        assert (await wait_done(c, old))["status"] == "cancelled"
        done = await wait_done(c, second.result["job_id"])
        assert done["status"] == "complete" and done["result"]["section"] == "B"
        # nothing running any more: nothing to replace
        third = await send_timeline_event(running.endpoint, "section_change", 3, 120, {"wait": 0, "section": "C"})
        assert third.result["replaced"] == []
        await wait_done(c, third.result["job_id"])


async def test_queue_is_the_default_and_starts_every_match(make_server):
    rules = [{"name": "each", "event_type": "beat_marker", "script": "echo_params",
              "params": {"wait": "$metadata.wait"}}]  # fmt: skip
    running = await make_server(settings=parse_settings({"triggers": rules}))
    async with Client(running.endpoint) as c:
        await store(c, ECHO)
        first = await send_timeline_event(running.endpoint, "beat_marker", 1, 120, {"wait": 86_400_000})
        second = await send_timeline_event(running.endpoint, "beat_marker", 2, 120, {"wait": 0})
        assert second.result["job_id"] not in (None, first.result["job_id"]) and "replaced" not in second.result
        assert (await wait_done(c, second.result["job_id"]))["status"] == "complete"
        await c.request(t.JobCancel(job_id=first.result["job_id"]))
        await wait_done(c, first.result["job_id"])


# --- cycles ------------------------------------------------------------------------------


def emitting(name: str, *events: str) -> str:
    listed = ", ".join(f'"{e}"' for e in events)
    return f'function describe() return {{name = "{name}", emits = {{{listed}}}}} end\nfunction main(p) return p end\n'


def write_config(tmp_path, rules: list[tuple[str, str, str, tuple[str, ...]]]):
    """rules: (rule name, event type it listens to, script name, events the script emits)."""
    text = []
    for rule, listens, script, emits in rules:
        (tmp_path / f"{script}.lua").write_text(emitting(script, *emits))
        text.append(f'[[triggers]]\nname = "{rule}"\nevent_type = "{listens}"\nscript_file = "{script}.lua"\n')
    path = tmp_path / "luanette.toml"
    path.write_text("".join(text))
    return path


def serve(tmp_path, config) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "luanette.cli.daemon", "serve", "--bind", "tcp://127.0.0.1:*", "--pub", "none",
         "--config", str(config), "--state-dir", str(tmp_path / "state"), "--cas-root", str(tmp_path / "cas")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_daemon_refuses_rules_that_form_a_cycle(tmp_path):
    config = write_config(tmp_path, [
        ("on_section", "section_change", "bridge", ("cue_point",)),
        ("on_cue", "cue_point", "marker", ("beat_marker", "section_change")),
        ("on_beat", "beat_marker", "quiet", ()),
    ])  # fmt: skip
    proc = serve(tmp_path, config)
    assert proc.returncode == 2
    assert (
        "rule on_cue -> script marker -> event section_change -> rule on_section -> script bridge -> "
        "event cue_point -> rule on_cue" in proc.stdout + proc.stderr
    )


async def test_rules_without_a_cycle_are_accepted(make_server, tmp_path):
    config = write_config(tmp_path, [
        ("on_section", "section_change", "bridge", ("cue_point",)),
        ("on_cue", "cue_point", "marker", ("beat_marker",)),
        ("on_beat", "beat_marker", "quiet", ()),
    ])  # fmt: skip
    running = await make_server(settings=load_settings(config))
    await running.server.load_trigger_scripts()  # checks again: still fine
    assert running.server.store.find_script_by_name("bridge").emits == ["cue_point"]
    assert running.server.store.find_script_by_name("quiet").emits == []
    reply = await send_timeline_event(running.endpoint, "section_change", 1, 120, {})
    assert isinstance(reply, t.Success) and reply.result["rule"] == "on_section"
    async with Client(running.endpoint) as c:
        assert (await wait_done(c, reply.result["job_id"]))["status"] == "complete"


async def test_a_self_cycle_and_a_wildcard_are_found(make_server, tmp_path):
    config = write_config(tmp_path, [("any", "*", "chatty", ("*",))])
    with pytest.raises(TriggerError) as info:  # the check at start fails: the server stops
        await make_server(settings=load_settings(config))
    assert info.value.code == "trigger_cycle"
    assert "rule any -> script chatty -> event " in str(info.value) and str(info.value).count("rule any") == 2


async def test_bad_emits_are_refused_when_stored(client):
    for bad, fragment in (('"cue_point"', "must be a list"), ('{"cue_pointe"}', "'cue_pointe' is not an event type")):
        reply = await client.request(t.ScriptStore(content=f"function describe() return {{emits = {bad}}} end"))
        assert isinstance(reply, t.Error) and fragment in reply.message, reply


def test_declared_emits():
    assert declared_emits({}) is None and declared_emits({"emits": {}}) == []
    assert declared_emits({"emits": ["cue_point", "cue_point", "*"]}) == ["cue_point", "*"]
    with pytest.raises(ValueError):
        declared_emits({"emits": [1]})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 7), st.lists(st.integers(0, 7), max_size=4), max_size=8))
def test_find_cycle_agrees_with_a_topological_sort(edges):
    graph = {f"rule {a}": [f"rule {b}" for b in succ] for a, succ in edges.items()}
    cycle = find_cycle(graph)
    try:
        list(graphlib.TopologicalSorter({k: set(v) for k, v in graph.items()}).static_order())
        acyclic = True
    except graphlib.CycleError:
        acyclic = False
    assert (cycle is None) == acyclic
    if cycle is not None:
        assert cycle[0] == cycle[-1] and len(set(cycle[:-1])) == len(cycle) - 1
        assert all(b in graph.get(a, []) for a, b in zip(cycle, cycle[1:], strict=False))
