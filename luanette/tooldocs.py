"""What ``list_tools`` tells an AI client about each request: one table, kept as data.

Each entry is written for a model that has never seen Luanette: what the request does,
when to use it, and what it returns, plus a description of every field of its JSON
Schema.  The hooteproto types stay as seed 001 has them (their wire encoding is pinned
by golden vectors); :func:`describe_schema` adds these descriptions to the schema
msgspec makes of a type.  tests/test_tool_docs.py fails when a served request, or a
field of one, has no entry here, and when an entry names a field that no longer exists.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import msgspec


class ToolDoc(msgspec.Struct, frozen=True):
    """A request's description and its fields' descriptions (by field name)."""

    description: str
    fields: dict[str, str] = {}


_HASH = "A stored script's hash: 32 lowercase hex characters (as script_store or script_search return it)."
_JOB_ID = "A job id, as job_execute returned it (or job_list lists it)."
_SESSION_ID = "A pending session's id, as session_list lists it."

TOOL_DOCS: Final[dict[str, ToolDoc]] = {
    "ping": ToolDoc(
        "Check that the Luanette daemon is up. Use it as a health check before other calls. "
        "Returns a pong with the daemon's worker_id (stable while the process lives) and its uptime in seconds."
    ),
    "register": ToolDoc(
        "Announce a worker process (another hootenanny service) to this daemon. Meant for services of the "
        "stack, not for AI clients; needs an admin key under CURVE. Returns {registered: true, worker_id}.",
        {
            "worker_id": "The worker's UUID; registering again with the same id replaces the earlier record.",
            "worker_type": "What kind of worker it is: 'luanette' or 'chaosgarden'.",
            "worker_name": "A human-readable name for the worker, e.g. 'garden-1'.",
            "capabilities": "Names of the request types or features the worker serves.",
            "hostname": "The host the worker runs on.",
            "version": "The worker's software version.",
        },
    ),
    "shutdown": ToolDoc(
        "Stop the daemon gracefully: it refuses new work, lets running scripts finish for a while, then exits. "
        "Administrative; an AI client should not need it. Returns {shutting_down: true, reason}.",
        {"reason": "Why the daemon is being stopped; written to its log and broadcast to watchers."},
    ),
    "list_tools": ToolDoc(
        "List every request this daemon serves, each with a description and a JSON Schema of its fields "
        "(this list). Use it to discover what you can ask. Returns {tools: [{name, description, input_schema}]}."
    ),
    "lua_eval": ToolDoc(
        "Run a snippet of Lua 5.4 once, in a fresh sandbox, and return its value. Use it for quick "
        "computations, trying out the Lua API, or one-off checks; use script_store plus job_execute for "
        "anything long-running or reusable. The snippet sees `params` as a global; if it defines "
        "`main(params)`, main's return value is the result, otherwise the chunk's own return value. "
        "Which stdlib namespaces it gets is in lua://namespaces (each lists the kinds of run that get it). "
        "Returns {result, duration_ms}; a failing script returns error code lua_error with the line and a hint.",
        {
            "code": "The Lua 5.4 source to run, e.g. 'return 1 + 2' or a chunk that defines main(params).",
            "params": "Optional JSON value given to the script as the global `params` (and to main(params)).",
        },
    ),
    "script_store": ToolDoc(
        "Save a Lua script in the content-addressed store so it can be run as a job. Use it before "
        "job_execute. The script is compiled (a syntax error is refused), and its describe() function, if it "
        "defines one, is run to index its name, description and parameters. Storing the same text again "
        "gives the same hash. Returns {hash, artifact_id, name, described}.",
        {
            "content": "The Lua 5.4 source. Define main(params) for the work and, ideally, describe() returning "
            "{name, description, params = {<param> = {type, required, description, default}}}.",
            "tags": "Optional labels to find the script by later (script_search tag=...); 'type:lua' is added.",
            "creator": "Optional name of who wrote the script (e.g. your agent's name), searchable.",
        },
    ),
    "script_search": ToolDoc(
        "Find stored scripts. Use it to reuse an existing script instead of writing a new one. All filters "
        "are optional and combine with AND; with none, the newest scripts are listed (at most 100). "
        "Returns [{hash, name, description, tags, creator, params}].",
        {
            "tag": "Only scripts carrying exactly this tag, e.g. 'midi' or 'type:lua'.",
            "creator": "Only scripts stored with exactly this creator.",
            "vibe": "Free words matched against name, description and tags (case-insensitive); results are "
            "ranked by how many words match.",
        },
    ),
    "lua_describe": ToolDoc(
        "Get what a stored script says about itself: the table its describe() function returns (name, "
        "description, params with types, returns, ...). Use it to learn which params job_execute needs. "
        "Returns that table, or not_found when the script defines no describe().",
        {"script_hash": _HASH},
    ),
    "job_execute": ToolDoc(
        "Start a stored script as a background job. Use it for real work (model calls, MIDI processing, "
        "garden edits) and anything that may take a while. The params are checked against the script's "
        "describe() first. Answers at once with {job_id, script_hash}; follow the job with job_poll or "
        "job_status, and read its result there when it is complete.",
        {
            "script_hash": _HASH,
            "params": "The JSON object passed to the script's main(params); use {} when it takes none.",
            "tags": "Optional labels recorded with the job.",
            "priority": "Optional integer from -10 to 10 (default 0, normal): queued jobs with a higher priority "
            "start first, in the order they came within one priority. It only orders the queue; a running job "
            "is never interrupted.",
        },
    ),
    "job_status": ToolDoc(
        "Get one job's current state. Use it to check a job without waiting. Returns a JobInfo: {job_id, "
        "status (pending|running|complete|failed|cancelled), source (the script hash), result, error, "
        "created_at, started_at, completed_at (Unix seconds), progress ({percent, message} or null)}.",
        {"job_id": _JOB_ID},
    ),
    "job_list": ToolDoc(
        "List recent jobs, newest first (at most 100), optionally only those in one state. Use it to find a "
        "job id or see what is running. Returns [JobInfo].",
        {"status": "Optional state to filter by: pending, running, complete, failed or cancelled."},
    ),
    "job_poll": ToolDoc(
        "Wait for jobs to finish. Use it after job_execute instead of calling job_status in a loop. Returns "
        "when any (mode 'any') or all (mode 'all') of the jobs have finished, or when the timeout passes "
        "(capped at 30 s). Returns {completed: [JobInfo], pending: [job_id], timed_out}.",
        {
            "job_ids": "The ids of the jobs to wait for.",
            "timeout_ms": "How long to wait at most, in milliseconds (capped at 30000); 0 checks without waiting.",
            "mode": "'any' returns as soon as one job has finished; 'all' waits until every one has.",
        },
    ),
    "job_cancel": ToolDoc(
        "Cancel a pending or running job. The script is asked to stop (it may clean up) and is stopped hard "
        "after a grace period; the job ends 'cancelled'. Cancelling a finished job is an invalid_state error. "
        "Returns {cancelled: true, job_id, status}.",
        {"job_id": _JOB_ID},
    ),
    "list_resources": ToolDoc(
        "List the readable resources: the Lua API reference (lua://namespaces), example scripts "
        "(lua://examples), jobs (lua://jobs), job statistics, this tool list, the plugins (lua://plugins) and "
        "the Lua workers (lua://workers), plus URI templates for stored scripts and single jobs. Use it to "
        "discover context worth reading before writing a script. "
        "Returns [{uri or uri_template, name, description, mime_type}].",
    ),
    "read_resource": ToolDoc(
        "Read one resource by URI, e.g. lua://namespaces/midi (the midi API), lua://examples/hello (an "
        "example script), lua://scripts/<hash> (a stored script's source and describe()), lua://jobs/<id>. "
        "Returns {contents: [{uri, mime_type, text}]}; an unknown URI is not_found with the list of "
        "URI templates.",
        {"uri": "The resource's URI, as list_resources gives it or filled in from one of its templates."},
    ),
    "list_prompts": ToolDoc(
        "List the prompt templates this daemon offers (write-script, debug-script, explain-script, "
        "midi-workflow), each with its arguments. Returns {prompts: [{name, description, arguments: "
        "[{name, description, required}]}]}."
    ),
    "get_prompt": ToolDoc(
        "Fill in one prompt template: returns ready-to-use chat messages that carry the relevant context "
        "(the Lua API, a stored script's source, a job's error, an example). Use it to write, debug or "
        "explain a Luanette script. Returns {description, messages: [{role, content: {type: 'text', text}}]}.",
        {
            "name": "The prompt's name, as list_prompts gives it, e.g. 'write-script'.",
            "arguments": 'The prompt\'s arguments as a map of strings, e.g. {"task": "transpose a melody"}.',
        },
    ),
    "complete": ToolDoc(
        "Suggest values for an argument as it is being typed: script hashes, job ids, job states, tags, "
        "example names, namespace names, prompt styles and MIDI operations. Returns {values, total, has_more} "
        "(at most 100 values).",
        {
            "context": "What is being completed: a kind (script_hash, job_id, status, tag, example, namespace, "
            "prompt, style, operation) or an argument of a prompt, tool or resource template written "
            "'prompt:<name>#<argument>', 'tool:<name>#<field>' or '<uri template>#<variable>' "
            "(e.g. 'lua://jobs/{id}#id').",
            "partial": "What has been typed so far; values starting with it are suggested (empty: all).",
        },
    ),
    "timeline_event": ToolDoc(
        "Report a timeline event from chaosgarden (section change, beat marker, cue point, transition "
        "request). Configured trigger rules may start a job in response. Meant for the garden, not AI "
        "clients. Returns {job_id, rule, matched} (job_id null when no rule matched).",
        {
            "event_type": "section_change, beat_marker, cue_point or generate_transition.",
            "position_beats": "Where on the timeline the event happened, in beats.",
            "tempo": "The tempo at that point, in beats per minute.",
            "metadata": "Any JSON object with details of the event (e.g. the section's name); rules may match on it.",
        },
    ),
    "session_list": ToolDoc(
        "List garden sessions waiting for review: garden edits that jobs of scripts declaring review = true "
        "kept instead of applying. Returns [{session_id, job_id, script_hash, user, operation_count, "
        "created_at}], oldest first.",
        {"job_id": "Optional: only the sessions of this job."},
    ),
    "session_show": ToolDoc(
        "Show one pending garden session with its operations (create, move, delete of regions), to review "
        "before session_commit or session_discard.",
        {"session_id": _SESSION_ID},
    ),
    "session_commit": ToolDoc(
        "Apply a pending garden session to the garden, all or nothing (on failure what was applied is undone "
        "and the session stays pending). Only the client that started the job, or an admin, may commit. "
        "Returns {session_id, committed: true, operations, created}.",
        {"session_id": _SESSION_ID},
    ),
    "session_discard": ToolDoc(
        "Drop a pending garden session without applying any of it. Only the client that started the job, or "
        "an admin, may discard. Returns {session_id, discarded: true, operations}.",
        {"session_id": _SESSION_ID},
    ),
    "plugin_list": ToolDoc(
        "List the daemon's plugins (Lua modules whose hooks react to jobs, model calls and custom events): "
        "each with its name, origin (file or stored script), state (loaded or failed), error when it failed "
        "to load, declared capabilities and subscriptions (event, priority, pattern, once, delivery counts). "
        "Returns [{name, origin, state, error, capabilities, description, subscriptions}]."
    ),
    "plugin_load": ToolDoc(
        "Load a plugin: describe() and init(ctx) run once in the sandbox and its subscriptions take effect at "
        "once. Administrative; needs an admin key under CURVE. Returns the plugin as plugin_list shows it "
        "(state failed with the error when its init failed).",
        {
            "plugin": "A stored script's hash (32 hex; the script must be tagged 'plugin') or the name of a "
            "file in the daemon's --plugins directory, without '.lua'.",
        },
    ),
    "plugin_unload": ToolDoc(
        "Unload a plugin: its cleanup(ctx) runs, then its subscriptions are gone. Administrative. "
        "Returns {unloaded: true, name}.",
        {"name": "The plugin's name, as plugin_list shows it."},
    ),
    "plugin_reload": ToolDoc(
        "Unload a plugin and load it again from its origin (a file is read again). Administrative. Returns "
        "the plugin as plugin_list shows it.",
        {"name": "The plugin's name, as plugin_list shows it."},
    ),
    "flow_register": ToolDoc(
        "Register a flow (a state machine whose guards and enter/exit handlers are Lua functions): the module's "
        "define() runs once in the sandbox and its FlowDefinition {id, initial, states, context} is kept by id in "
        "the daemon's database (registering an id again replaces it). Returns the definition with its origin "
        "and the capabilities its handlers run with.",
        {
            "source": "The module that defines the flow: a stored script's hash (32 hex) or the name of a loaded "
            "plugin, as plugin_list shows it.",
        },
    ),
    "flow_start": ToolDoc(
        "Start an instance of a registered flow in its initial state (its enter handler runs). Instances and "
        "their history survive a daemon restart. Returns the instance {id, definition_id, current_state, "
        "context, subject, transitions, final, created_at, updated_at, history}.",
        {
            "definition": "The flow's id, as flow_register returned it.",
            "context": "A table merged over the definition's own context; handlers read and change it.",
            "subject": "What the instance is about, e.g. a garden region's id; flow_list can filter by it.",
            "user": "Act as this user (what guards see as ctx:current_user()); only an admin caller may name "
            "someone else. Default: the caller (its CURVE key, or 'local').",
        },
    ),
    "flow_send": ToolDoc(
        "Send an action to a flow instance. Returns a TransitionResult: {type: 'success', new_state, from_state, "
        "action, final}, {type: 'guard_failed', guard, reason}, {type: 'invalid_action', action, current_state} "
        "(the state has no such action) or {type: 'invalid_state', state} (the instance's state is no longer in "
        "its definition). A guard, then the old state's exit and the new state's enter handler run first; a "
        "failing handler is error flow_handler_failed and nothing changes.",
        {
            "instance": "The instance's id, as flow_start returned it.",
            "action": "The action to take, one of the current state's 'on' keys (e.g. 'submit', 'approve').",
            "data": "Any value handed to the guard and handlers with the event (a table's fields are also "
            "fields of the event); kept in the history.",
            "user": "Act as this user; only an admin caller may name someone else. Default: the caller.",
        },
    ),
    "flow_get": ToolDoc(
        "Show one flow instance: its state, context, subject and every transition so far (from, to, action, "
        "user, timestamp in Unix ms, data).",
        {"instance": "The instance's id, as flow_start returned it."},
    ),
    "flow_list": ToolDoc(
        "List flow instances (newest first, without history) matching every filter given; or, with "
        "definitions: true, the registered flow definitions.",
        {
            "subject": "Only instances about this subject.",
            "state": "Only instances in this state.",
            "definition": "Only instances of this flow id.",
            "limit": "At most this many instances (1..1000, default 100).",
            "definitions": "List the registered definitions instead of instances.",
        },
    ),
}


def describe_schema(tag: str, schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The description of request ``tag`` and a copy of its input ``schema`` with each
    documented property's ``description`` set. Raises KeyError for an undocumented tag."""
    doc = TOOL_DOCS[tag]
    described = copy.deepcopy(schema)
    for name, prop in described.get("properties", {}).items():
        text = doc.fields.get(name)
        if text is not None:
            prop["description"] = text
    return doc.description, described
